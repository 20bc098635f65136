"""LoRA params transform: targets and diffusers/PEFT names, zero-init merge, NumPy parity, gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxedit.models import load, lora, unet
from jaxedit.models.attention import Attention
from jaxedit.models.tiny import tiny_configs

CFG = tiny_configs(vocab_size=100)[0]  # the tiny checkpoint's 8-channel U-Net (2 blocks, mid block)


@pytest.fixture(scope="module")
def base():
    return load.random_params(unet.build(CFG), seed=3)


def _peft_targets(module, targets):
    """diffusers module names PEFT would wrap for a list of targets (its suffix rule), with shapes."""
    import torch
    return {name: tuple(m.weight.shape) for name, m in module.named_modules()
            if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)}


def test_default_targets_match_diffusers_peft_names(base):
    from diffusers import UNet2DConditionModel
    paths = lora.lora_paths(base)
    assert {p[-1] for p in paths} == {"to_q", "to_k", "to_v", "to_out_0"}
    assert len(paths) == 4 * 2 * 4  # 4 projections x (attn1, attn2) x 4 transformer blocks
    names = {lora.module_name(p): p for p in paths}
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0" in names
    assert "mid_block.attentions.0.transformer_blocks.0.attn2.to_k" in names
    torch_unet = UNet2DConditionModel.from_config(CFG.to_dict())
    want = _peft_targets(torch_unet, lora.DEFAULT_TARGETS)
    assert set(names) == set(want)
    flat = traverse_util.flatten_dict(base)
    for name, (out_f, in_f) in want.items():  # torch Linear weight (out, in) <-> Flax kernel (in, out)
        assert flat[names[name] + ("kernel",)].shape == (in_f, out_f)


def test_custom_targets(base):
    only_k = lora.lora_paths(base, ["attn2.to_k"])
    assert len(only_k) == 4 and all(p[-2:] == ("attn2", "to_k") for p in only_k)
    regex = lora.lora_paths(base, r"up_blocks\.1\..*attn1\.to_(q|v)")
    assert {lora.module_name(p) for p in regex} == {
        f"up_blocks.1.attentions.{i}.transformer_blocks.0.attn1.to_{x}" for i in (0, 1) for x in "qv"}
    with pytest.raises(ValueError, match="2-D"):
        lora.lora_paths(base, ["proj_in"])  # a 1x1 conv
    with pytest.raises(ValueError, match="match no kernel"):
        lora.lora_paths(base, ["to_nothing"])


def test_init_and_merge_at_init_is_bit_exact(base):
    lo = lora.init_lora(base, rank=4, key=jax.random.key(0))
    flat_lo, flat_base = traverse_util.flatten_dict(lo), traverse_util.flatten_dict(base)
    for path, v in flat_lo.items():
        d_in, d_out = flat_base[path[:-1] + ("kernel",)].shape
        if path[-1] == "lora_B":
            assert v.shape == (4, d_out) and not np.asarray(v).any()
        else:
            assert v.shape == (d_in, 4) and 0 < np.abs(v).max() <= d_in ** -0.5
    merged = jax.jit(lora.merge, static_argnums=2)(base, lo, lora.lora_scale(4, 8.0))
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(base)
    for a, b in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(base)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_merged_kernel_matches_numpy(base):
    lo = lora.init_lora(base, rank=3, targets=["to_q", "to_out.0"], key=jax.random.key(1))
    rng = np.random.default_rng(0)
    lo = jax.tree_util.tree_map(lambda v: jnp.asarray(rng.normal(0, 0.1, v.shape), jnp.float32), lo)
    scale = lora.lora_scale(3, 5.0)
    merged = traverse_util.flatten_dict(lora.merge(base, lo, scale))
    flat_lo, flat_base = traverse_util.flatten_dict(lo), traverse_util.flatten_dict(base)
    worst = 0.0
    for path, v in flat_base.items():
        a, b = path[:-1] + ("lora_A",), path[:-1] + ("lora_B",)
        if path[-1] == "kernel" and a in flat_lo:
            want = np.float64(v) + scale * np.float64(flat_lo[a]) @ np.float64(flat_lo[b])
            worst = max(worst, float(np.abs(np.asarray(merged[path], np.float64) - want).max()))
        else:  # untouched leaves are the base's, bit for bit
            np.testing.assert_array_equal(np.asarray(merged[path]), np.asarray(v))
    assert worst < 1e-6, worst


def test_gradients_reach_lora_B():
    """Through a real attention layer: at init dL/dA = 0 (B = 0) and dL/dB = scale·Aᵀ·dL/dW."""
    attn = Attention(heads=2, dim_head=8)
    k = jax.random.split(jax.random.key(0), 3)
    x, ctx = jax.random.normal(k[0], (2, 6, 16)), jax.random.normal(k[1], (2, 5, 12))
    shapes = jax.eval_shape(attn.init, k[2], x, ctx)["params"]  # random weights, no init compile
    rng = np.random.default_rng(0)
    params = {"attn2": jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), jnp.float32),
                                              shapes)}
    lo = lora.init_lora(params, rank=2, key=jax.random.key(1))
    scale = lora.lora_scale(2, 4.0)
    loss = lambda p: (attn.apply({"params": p["attn2"]}, x, ctx) ** 2).sum()
    g_lo = jax.jit(jax.grad(lambda l: loss(lora.merge(params, l, scale))))(lo)
    g_w = traverse_util.flatten_dict(jax.jit(jax.grad(loss))(params))
    for path, g in traverse_util.flatten_dict(g_lo).items():
        if path[-1] == "lora_A":
            np.testing.assert_array_equal(np.asarray(g), 0)
        else:
            a = np.asarray(traverse_util.flatten_dict(lo)[path[:-1] + ("lora_A",)], np.float64)
            want = scale * a.T @ np.asarray(g_w[path[:-1] + ("kernel",)], np.float64)
            assert np.abs(g).max() > 0
            np.testing.assert_allclose(np.asarray(g), want, rtol=1e-4, atol=1e-6 * np.abs(want).max())


def test_peft_state_dict_names_and_layout(base):
    lo = lora.init_lora(base, rank=4, targets=["attn1.to_out.0"], key=jax.random.key(2))
    sd = lora.peft_state_dict(lo)
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
    assert sd[key + ".lora_A.weight"].shape == (4, 32) and sd[key + ".lora_B.weight"].shape == (32, 4)
    assert len(sd) == 2 * 4
