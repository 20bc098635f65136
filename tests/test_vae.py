"""VAE: parity with diffusers' AutoencoderKL, legacy names, config checks, export, posterior."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from safetensors.torch import save_file

from jaxedit.models import load, vae
from jaxedit.models.state_dict import CheckpointError
from tests.torch_ref import assert_close, nhwc, randomize_

# Three blocks: two (padding-0) downsamples, channel changes (conv_shortcut) in both halves.
TINY = dict(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4,
            sample_size=32, down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3)
# A second config: no mid-block attention, no quant convs, two layers per block.
PLAIN = dict(TINY, block_out_channels=(16, 32), layers_per_block=2,
             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, mid_block_add_attention=False, use_quant_conv=False,
             use_post_quant_conv=False)


@pytest.fixture(scope="module")
def torch_vae():
    return randomize_(TorchVAE(**TINY), seed=1)


@pytest.fixture(scope="module")
def folders(torch_vae, tmp_path_factory):
    """The same random model saved as safetensors and as a torch .bin."""
    out = {}
    for name, kw in (("safetensors", {}), ("bin", dict(safe_serialization=False))):
        folder = str(tmp_path_factory.mktemp(f"vae_{name}"))
        torch_vae.save_pretrained(folder, **kw)
        out[name] = folder
    assert os.path.isfile(os.path.join(out["bin"], "diffusion_pytorch_model.bin"))
    return out


@pytest.fixture(scope="module")
def loaded(folders):
    return load.load_vae(folders["safetensors"])


def _image(shape=(2, 3, 32, 32), seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _latent(shape=(2, 4, 8, 8), seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@functools.lru_cache
def _jitted(config, dtype, method):
    module = vae.build(config, dtype=dtype)
    return jax.jit(lambda p, x: module.apply({"params": p}, x, method=method))


def _encode(module, params, x):
    return _jitted(module.config, module.dtype, "encode")(params, x)


def _decode(module, params, z):
    return _jitted(module.config, module.dtype, "decode")(params, z)


def _check_parity(model, module, params, size=(32, 32), label=""):
    x, f = _image((2, 3) + size), 2 ** (len(model.config.block_out_channels) - 1)
    z = _latent((2, 4, size[0] // f, size[1] // f))
    with torch.no_grad():
        post = model.encode(x).latent_dist
        ref_mean, ref_logvar, ref_img = nhwc(post.mean), nhwc(post.logvar), nhwc(model.decode(z).sample)
    got = _encode(module, params, jnp.asarray(nhwc(x)))
    img = _decode(module, params, jnp.asarray(nhwc(z)))
    pairs = (("mean", got.mean, ref_mean), ("logvar", got.logvar, ref_logvar), ("decode", img, ref_img))
    for what, a, b in pairs:
        rel = assert_close(a, b)
        print(f"{label} {size} {what}: max|diff| {np.abs(np.asarray(a) - b).max():.2e}, rel {rel:.2e}")


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_matches_diffusers(torch_vae, folders, fmt):
    module, params = load.load_vae(folders[fmt])
    assert module.config.scaling_factor == pytest.approx(0.18215)
    _check_parity(torch_vae, module, params, label=fmt)


def test_matches_diffusers_non_square(torch_vae, loaded):
    _check_parity(torch_vae, *loaded, size=(24, 16), label="non-square")


def test_matches_diffusers_without_attention_or_quant_convs(tmp_path):
    model = randomize_(TorchVAE(**PLAIN), seed=2)
    model.save_pretrained(str(tmp_path))
    module, params = load.load_vae(str(tmp_path))
    assert "quant_conv" not in params and "attentions_0" not in params["encoder"]["mid_block"]
    _check_parity(model, module, params, label="plain")


def test_reconstruction_and_bf16(torch_vae, loaded):
    module, params = loaded
    x = jnp.asarray(nhwc(_image()))
    rec = _jitted(module.config, module.dtype, "__call__")(params, x)
    with torch.no_grad():
        ref = nhwc(torch_vae(_image(), sample_posterior=False).sample)
    assert_close(rec, ref)
    bf16 = vae.build(module.config, dtype=jnp.bfloat16)
    z = jnp.asarray(nhwc(_latent()))
    out = _decode(bf16, params, z)
    assert out.dtype == jnp.bfloat16
    assert_close(out.astype(jnp.float32), _decode(module, params, z), rel=5e-2)


def test_legacy_attention_names(torch_vae, loaded, tmp_path):
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for key, value in torch_vae.state_dict().items():
        for new, legacy in old.items():
            if f".attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{legacy}.")
                if key.endswith(".weight") and legacy in ("query", "key"):
                    value = value[:, :, None, None]  # 1x1 conv weights as in LDM-era files
        state[key] = value.contiguous()
    assert "encoder.mid_block.attentions.0.query.weight" in state
    assert state["decoder.mid_block.attentions.0.key.weight"].ndim == 4
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with open(tmp_path / "config.json", "w") as f:
        json.dump(dict(torch_vae.config), f)
    _, params = load.load_vae(str(tmp_path))
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, loaded[1])


@pytest.mark.parametrize("change, field", [
    (dict(down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]), "AttnDownEncoderBlock2D"),
    (dict(up_block_types=["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]), "AttnUpDecoderBlock2D"),
    (dict(act_fn="gelu"), "act_fn"),
    (dict(latents_mean=[0.0] * 4), "latents_mean"),
    (dict(mystery_option=3), "mystery_option"),
    (dict(down_block_types=["DownEncoderBlock2D"]), "down_block_types"),
])
def test_config_rejects_unsupported(change, field):
    base = vae.Config(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2).to_dict()
    with pytest.raises(CheckpointError, match=field):
        vae.Config.from_dict({**base, **change})


def test_config_round_trip(torch_vae):
    d = {**dict(torch_vae.config), "_name_or_path": "x"}
    cfg = vae.Config.from_dict(d)
    assert cfg.block_out_channels == (32, 64, 64) and cfg.shift_factor is None
    assert vae.Config.from_dict(cfg.to_dict()) == cfg
    # Missing keys mean what they mean to diffusers.
    assert vae.Config.from_dict({}) == vae.Config.from_dict(dict(TorchVAE().config))
    assert vae.Config().block_out_channels == (128, 256, 512, 512)  # Config() is SD 1.x's VAE


def test_export_loads_in_diffusers(torch_vae, loaded, tmp_path):
    module, params = loaded
    load.export_model(params, module.config, str(tmp_path))
    reloaded = TorchVAE.from_pretrained(str(tmp_path)).eval()
    z = _latent()
    with torch.no_grad():
        ref, out = torch_vae.decode(z).sample, reloaded.decode(z).sample
    np.testing.assert_array_equal(out.numpy(), ref.numpy())
    assert_close(_decode(module, params, jnp.asarray(nhwc(z))), nhwc(out))


def test_posterior_sample():
    mean = jnp.broadcast_to(jnp.array([-1.0, 0.0, 0.5, 2.0]), (20000, 2, 2, 4))
    logvar = jnp.broadcast_to(jnp.log(jnp.array([0.25, 1.0, 4.0, 0.01])), mean.shape)
    post = vae.DiagonalGaussian(mean, logvar)
    key = jax.random.key(3)
    s = post.sample(key)
    np.testing.assert_allclose(s, mean + post.std * jax.random.normal(key, mean.shape), rtol=1e-6, atol=1e-6)
    assert post.mode() is mean
    np.testing.assert_allclose(s.mean(axis=(0, 1, 2)), [-1.0, 0.0, 0.5, 2.0], atol=0.02)
    np.testing.assert_allclose(s.std(axis=(0, 1, 2)), [0.5, 1.0, 2.0, 0.1], rtol=0.02)
    assert not np.array_equal(s, post.sample(jax.random.key(4)))


def test_logvar_clipped(loaded):
    module, params = loaded
    x = jnp.asarray(nhwc(_image()))
    for bias, want in ((1e4, 20.0), (-1e4, -30.0)):
        b = params["quant_conv"]["bias"].at[4:].set(bias)
        p = {**params, "quant_conv": {**params["quant_conv"], "bias": b}}
        np.testing.assert_array_equal(_encode(module, p, x).logvar, want)
