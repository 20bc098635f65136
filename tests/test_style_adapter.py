"""Style adapter and the 12-channel Specialists U-Net."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxedit.models import load, style_adapter, unet

CFG = unet.Config(in_channels=8, block_out_channels=(32, 64), layers_per_block=(1, 1),
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), num_attention_heads=(4, 4),
                  cross_attention_dim=(32, 32), norm_num_groups=8)
ADAPTER = style_adapter.Config(dim=16, heads=2, cross_attention_dim=32)


@pytest.fixture(scope="module")
def models():
    ip2p = unet.build(CFG)
    params = load.random_params(ip2p, seed=1)
    spec, spec_params = style_adapter.from_instruct_pix2pix(CFG, params, ADAPTER, key=jax.random.key(0))
    return ip2p, params, spec, spec_params


def _inputs(seed=0, b=2):
    k = jax.random.split(jax.random.key(seed), 4)
    z, img, sty = (jax.random.normal(k[i], (b, 16, 16, 4)) for i in range(3))
    return z, img, sty, jnp.array([5, 800][:b]), jax.random.normal(k[3], (b, 7, 32))


def test_fresh_specialist_equals_instruct_pix2pix(models):
    ip2p, params, spec, spec_params = models
    z, img, sty, t, ctx = _inputs()
    adapter_out = style_adapter.StyleAdapter(ADAPTER).apply({"params": spec_params["style_adapter"]}, img, sty, ctx)
    assert float(jnp.abs(adapter_out).max()) > 1e-3  # the adapter is live, its conv_in weights are zero
    ref = jax.jit(ip2p.apply)({"params": params}, jnp.concatenate([z, img], -1), t, ctx)
    out = jax.jit(spec.apply)({"params": spec_params}, z, img, sty, t, ctx)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=0, atol=1e-6 * float(jnp.abs(ref).max()))


def test_style_drop_zeroes_adapter_channels(models):
    _, params, spec, spec_params = models
    # Give the new conv_in channels weight so that the style matters.
    k = spec_params["unet"]["conv_in"]["kernel"]
    live = {**spec_params, "unet": {**spec_params["unet"], "conv_in": {
        **spec_params["unet"]["conv_in"], "kernel": k.at[:, :, 8:].set(0.3)}}}
    z, img, sty, t, ctx = _inputs()
    apply = jax.jit(spec.apply)
    kept = apply({"params": live}, z, img, sty, t, ctx, jnp.array([1.0, 1.0]))
    dropped = apply({"params": live}, z, img, sty, t, ctx, jnp.array([0.0, 1.0]))
    other_style = apply({"params": live}, z, img, sty * 3 + 1, t, ctx, jnp.array([0.0, 1.0]))
    np.testing.assert_array_equal(np.asarray(dropped[0]), np.asarray(other_style[0]))  # style ignored
    assert float(jnp.abs(kept[0] - dropped[0]).max()) > 1e-4
    np.testing.assert_allclose(np.asarray(kept[1]), np.asarray(dropped[1]), atol=1e-6)


def test_adapter_export_roundtrip(models, tmp_path):
    *_, spec_params = models
    load.export_model(spec_params["style_adapter"], ADAPTER, str(tmp_path))
    module, back = load.load_style_adapter(str(tmp_path))
    assert module.config == ADAPTER
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(spec_params["style_adapter"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_rejects_non_ip2p_unet():
    with pytest.raises(ValueError, match="8-channel"):
        style_adapter.from_instruct_pix2pix(unet.Config(in_channels=4), {}, key=jax.random.key(0))
