"""Whole-checkpoint loading: the tiny checkpoint loads in jaxedit and in diffusers identically."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInstructPix2PixPipeline

from jaxedit.models import load, text, tiny
from jaxedit.models.state_dict import CheckpointError
from tests.torch_ref import assert_close, nhwc


@pytest.fixture(scope="module")
def both(tiny_checkpoint):
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(tiny_checkpoint, safety_checker=None)
    return load.load_checkpoint(tiny_checkpoint), pipe


def test_tiny_checkpoint_matches_diffusers_pipeline(both):
    ckpt, pipe = both
    prompts = ["make it snow", "", "turn the road into gold"]
    ids = text.tokenize(ckpt.tokenizer, prompts, ckpt.text_encoder.config.max_position_embeddings)
    torch_ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                               return_tensors="pt").input_ids
    np.testing.assert_array_equal(ids, torch_ids.numpy())
    with torch.no_grad():
        ref_states = pipe.text_encoder(torch_ids)[0].numpy()
    states, _ = ckpt.text_encoder.apply({"params": ckpt.text_params}, jnp.asarray(ids))
    assert_close(states, ref_states)

    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        ref_latent = pipe.vae.encode(image).latent_dist.mode()
        z = torch.randn(1, 4, 8, 8, generator=g)
        ref_eps = pipe.unet(torch.cat([z, ref_latent], 1), torch.tensor([500]),
                            torch.from_numpy(ref_states[:1])).sample
    latent = ckpt.vae.apply({"params": ckpt.vae_params}, jnp.asarray(nhwc(image)),
                            method=ckpt.vae.encode).mode()
    assert_close(latent, nhwc(ref_latent))
    eps = ckpt.unet.apply({"params": ckpt.unet_params}, jnp.concatenate([jnp.asarray(nhwc(z)), latent], -1),
                          jnp.array([500]), states[:1])
    assert_close(eps, nhwc(ref_eps))
    assert ckpt.scheduler_config["beta_schedule"] == "scaled_linear"


def test_every_tiny_parameter_is_random(both):
    ckpt, _ = both
    for params in (ckpt.unet_params, ckpt.vae_params, ckpt.text_params):
        for path, leaf in jax.tree_util.tree_leaves_with_path(params):
            assert float(jnp.std(leaf)) > 0 or leaf.size == 1, jax.tree_util.keystr(path)


def test_incomplete_checkpoint_is_rebuilt_and_missing_parts_named(tmp_path):
    half = tmp_path / "ckpt"
    (half / "unet").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"missing subfolder\(s\) \['vae', 'text_encoder', 'tokenizer', 'scheduler'\]"):
        load.load_checkpoint(str(half))
    tiny.make_tiny_checkpoint(str(half))  # no completion marker: rebuilt whole
    assert sorted(os.listdir(half)) == sorted(load.SUBFOLDERS + ("model_index.json", ".jaxedit-tiny-complete"))
    assert [p for p in os.listdir(tmp_path) if p.startswith(".tiny-")] == []
