"""EditPipeline end to end against diffusers' StableDiffusionInstructPix2PixPipeline (PyTorch)."""
import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                       StableDiffusionInstructPix2PixPipeline)
from PIL import Image

from jaxedit.pipeline import EditPipeline
from tests.torch_ref import assert_close, nhwc

STEPS = 6


class KarrasEulerAncestral(EulerAncestralDiscreteScheduler):
    """diffusers' Euler ancestral step on Karras sigmas (diffusers 0.42 drops `use_karras_sigmas`
    for this class; the table comes from `EulerDiscreteScheduler`, which has it)."""

    def set_timesteps(self, num_inference_steps, device=None):
        super().set_timesteps(num_inference_steps, device)
        karras = EulerDiscreteScheduler.from_config({**self.config, "use_karras_sigmas": True})
        karras.set_timesteps(num_inference_steps, device)
        self.sigmas, self.timesteps = karras.sigmas.clone(), karras.timesteps.clone()


@pytest.fixture(scope="module")
def pipes(tiny_checkpoint):
    ref = StableDiffusionInstructPix2PixPipeline.from_pretrained(tiny_checkpoint, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    return EditPipeline.from_pretrained(tiny_checkpoint), ref


def _torch_noises(seed, steps, shape):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(steps)]


@pytest.mark.parametrize("sampler", ["euler_ancestral", "ddim"])
def test_matches_diffusers_pipeline(pipes, sampler):
    pipe, ref = pipes
    if sampler == "ddim":
        ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
    else:
        ref.scheduler = KarrasEulerAncestral.from_config(ref.scheduler.config)
    g = torch.Generator().manual_seed(1)
    image = torch.rand(2, 3, 64, 48, generator=g) * 2 - 1
    latents = torch.randn(2, 4, 8, 6, generator=g)
    prompts = ["make it snow", "turn the road into gold"]
    # diffusers draws one normal per step from the generator; replay the same draws.
    noises = _torch_noises(123, STEPS, (2, 4, 8, 6))
    out = ref(prompts, image=image, num_inference_steps=STEPS, guidance_scale=7.5, image_guidance_scale=1.5,
              latents=latents.clone(), generator=torch.Generator().manual_seed(123), eta=1.0, output_type="pt").images
    ours = pipe.edit_arrays(nhwc(image), prompts, steps=STEPS, sampler=sampler, eta=1.0, latents=nhwc(latents),
                            noises=np.stack([nhwc(n) for n in noises]))
    # diffusers returns [0,1] images clamped; compare in that space.
    rel = assert_close(np.clip((np.asarray(ours) + 1) / 2, 0, 1), nhwc(out), rel=1e-4)
    print(f"{sampler}: max|diff| / max|ref| = {rel:.2e}")


def test_edit_pil_batches_and_errors(pipes):
    pipe, _ = pipes
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (40, 36, 3), np.uint8)),
            rng.integers(0, 255, (64, 64, 3), np.uint8), Image.fromarray(rng.integers(0, 255, (64, 64, 4), np.uint8))]
    out = pipe.edit(imgs, "make it snow", steps=2, batch_size=2, seed=3)
    assert [o.size for o in out] == [(32, 40), (64, 64), (64, 64)]
    again = pipe.edit(imgs, "make it snow", steps=2, batch_size=2, seed=3)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(out, again))  # same seed, same pixels
    with pytest.raises(ValueError, match="empty instruction"):
        pipe.edit(imgs[:1], " ", steps=2)
    with pytest.raises(ValueError, match="unknown sampler 'plms'"):
        pipe.edit(imgs[:1], "x", steps=2, sampler="plms")
    with pytest.raises(ValueError, match="takes no style images"):
        pipe.edit(imgs[:1], "x", [imgs[1]], steps=2)
    with pytest.raises(ValueError, match="2 instructions for 3 images"):
        pipe.edit(imgs, ["a", "b"], steps=2)


def test_fresh_specialist_pipeline_equals_instruct_pix2pix(pipes, tiny_checkpoint, tmp_path):
    """A 12-channel model made from the tiny checkpoint (zero new conv_in channels, fresh adapter)
    loads as a style pipeline and edits exactly like the 8-channel one: 3-way guidance reduces to 2-way."""
    import jax

    from jaxedit.models import style_adapter

    pipe, _ = pipes
    spec_dir = str(tmp_path / "specialist")
    pipe.with_style_adapter(style_adapter.Config(dim=16, heads=2, cross_attention_dim=32),
                            key=jax.random.key(0)).save_pretrained(spec_dir)
    spec = EditPipeline.from_pretrained(spec_dir)
    assert spec.style
    rng = np.random.default_rng(0)
    img, sty = rng.integers(0, 255, (2, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="give style images"):
        spec.edit([img], "make it snow", steps=3)
    a = spec.edit([img], "make it snow", [sty], steps=3, guidance_style=4.0, seed=5)[0]
    b = pipe.edit([img], "make it snow", steps=3, seed=5)[0]
    diff = np.abs(np.asarray(a, int) - np.asarray(b, int))
    assert diff.max() <= 1 and diff.mean() < 0.01  # equal up to float rounding of two different programs
