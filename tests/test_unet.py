"""U-Net: parity with diffusers PyTorch, loading formats, export, conv_in expansion, options."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from diffusers import UNet2DConditionModel as TorchUNet

from jaxedit.models import load, unet
from jaxedit.models.attention import ATTENTION_PROBS
from jaxedit.models.state_dict import CheckpointError
from tests.torch_ref import assert_close, nhwc, randomize_

TINY = dict(sample_size=16, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
            attention_head_dim=4, norm_num_groups=8)

VARIANTS = {
    # name: (extra config, save kwargs)
    "ip2p_conv_proj_safetensors": (dict(in_channels=8), dict()),
    "sd_linear_proj_bin": (dict(in_channels=4, use_linear_projection=True), dict(safe_serialization=False)),
    "cross_only_upcast_3blocks": (dict(in_channels=4, only_cross_attention=True, upcast_attention=True,
                                       block_out_channels=(32, 32, 64), layers_per_block=2,
                                       down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
                                       up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2,
                                       attention_head_dim=(2, 4, 8), flip_sin_to_cos=False, freq_shift=1), dict()),
}


_SAVED = {}


def _save_variant(name, tmp_path_factory):
    if name not in _SAVED:
        extra, save_kw = VARIANTS[name]
        model = randomize_(TorchUNet(**{**TINY, **extra}), seed=len(name))
        folder = str(tmp_path_factory.mktemp(name))
        model.save_pretrained(folder, **save_kw)
        _SAVED[name] = model, folder
    return _SAVED[name]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def saved(request, tmp_path_factory):
    """Each tiny U-Net variant, saved by diffusers."""
    return _save_variant(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def ip2p(tmp_path_factory):
    """The 8-channel InstructPix2Pix-style variant, for the slower option tests."""
    return _save_variant("ip2p_conv_proj_safetensors", tmp_path_factory)


def _inputs(model, size=(16, 16), batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.config.in_channels, *size, generator=g)
    t = torch.tensor([3, 917][:batch] + [500] * max(0, batch - 2))
    ctx = torch.randn(batch, 7, model.config.cross_attention_dim, generator=g)
    return x, t, ctx


def _run(module, params, x, t, ctx, mutable=False):
    apply = jax.jit(lambda p, *a: module.apply({"params": p}, *a, mutable=mutable))
    return apply(params, jnp.asarray(nhwc(x)), jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy()))


@pytest.mark.parametrize("size", [(16, 16), (15, 13)])
def test_matches_diffusers(saved, size):
    model, folder = saved
    module, params = load.load_unet(folder)
    x, t, ctx = _inputs(model, size)
    with torch.no_grad():
        ref = nhwc(model(x, t, ctx).sample)
    rel = assert_close(_run(module, params, x, t, ctx), ref)
    print(f"{os.path.basename(folder)} {size}: max|diff|/max|ref| = {rel:.2e}")


def test_export_reloads_in_diffusers(saved, tmp_path):
    model, folder = saved
    module, params = load.load_unet(folder)
    load.export_unet(params, module.config, str(tmp_path))
    reloaded = TorchUNet.from_pretrained(str(tmp_path)).eval()
    x, t, ctx = _inputs(model)
    with torch.no_grad():
        a, b = model(x, t, ctx).sample, reloaded(x, t, ctx).sample
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert json.load(open(tmp_path / "config.json"))["_class_name"] == "UNet2DConditionModel"


def test_fp16_variant_and_shards(tmp_path):
    model = randomize_(TorchUNet(**TINY, in_channels=4), seed=7)
    model.half().save_pretrained(tmp_path / "fp16", variant="fp16")
    model.float().save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert any(f.endswith(".index.json") for f in os.listdir(tmp_path / "sharded"))
    _, p16 = load.load_unet(str(tmp_path / "fp16"), variant="fp16")
    _, pshard = load.load_unet(str(tmp_path / "sharded"))
    ref = model.state_dict()
    w = ref["conv_in.weight"].numpy().transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(np.asarray(pshard["conv_in"]["kernel"]), w)
    np.testing.assert_array_equal(np.asarray(p16["conv_in"]["kernel"]), w.astype(np.float16).astype(np.float32))
    assert p16["conv_in"]["kernel"].dtype == jnp.float32
    with pytest.raises(CheckpointError, match="no weight file for variant 'fp16'"):
        load.load_unet(str(tmp_path / "sharded"), variant="fp16")


def test_expand_conv_in_keeps_outputs(ip2p):
    model, folder = ip2p
    module, params = load.load_unet(folder)
    c = module.config.in_channels
    wide = unet.build(unet.Config(**{**module.config.__dict__, "in_channels": c + 4}))
    wide_params = load.expand_conv_in(params, c + 4)
    x, t, ctx = _inputs(model)
    extra = torch.randn(2, 4, 16, 16) * 5
    narrow = _run(module, params, x, t, ctx)
    widened = _run(wide, wide_params, torch.cat([x, extra], 1), t, ctx)
    np.testing.assert_allclose(np.asarray(widened), np.asarray(narrow), rtol=0, atol=1e-6 * float(jnp.abs(narrow).max()))
    assert not np.any(np.asarray(wide_params["conv_in"]["kernel"][:, :, c:]))
    with pytest.raises(ValueError, match="cannot shrink"):
        load.expand_conv_in(params, c - 1)


def test_attention_probs_recorded_only_when_asked(ip2p):
    """Recording leaves the output bit-identical; each recorded map is the head-averaged
    softmax(q kᵀ/√d) recomputed here in float64 from the layer's own q and k (captured)."""
    model, folder = ip2p
    module, params = load.load_unet(folder)
    x, t, ctx = _inputs(model)
    plain = _run(module, params, x, t, ctx)
    apply = jax.jit(lambda p, *a: module.apply({"params": p}, *a, capture_intermediates=True,
                                               mutable=[ATTENTION_PROBS, "intermediates"]))
    out, state = apply(params, jnp.asarray(nhwc(x)), jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy()))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(plain))
    recorded = traverse_util.flatten_dict(state[ATTENTION_PROBS], sep="/")
    inter = traverse_util.flatten_dict(state["intermediates"], sep="/")
    assert recorded, "no cross-attention maps recorded"
    (heads,) = set(module.config.num_attention_heads)  # this variant: the same in every block
    for path, (p,) in recorded.items():  # (B, h*w, context_len)
        layer = path[: -len("/probs")]
        assert layer.endswith("attn2") and p.shape[0] == 2 and p.shape[-1] == 7
        q = np.asarray(inter[f"{layer}/to_q/__call__"][0], np.float64)
        k = np.asarray(inter[f"{layer}/to_k/__call__"][0], np.float64)
        qh, kh = q.reshape(*q.shape[:2], heads, -1), k.reshape(*k.shape[:2], heads, -1)
        logits = np.einsum("bnhd,bmhd->bhnm", qh, kh) / np.sqrt(qh.shape[-1])
        e = np.exp(logits - logits.max(-1, keepdims=True))
        want = (e / e.sum(-1, keepdims=True)).mean(axis=1)
        np.testing.assert_allclose(np.asarray(p), want, rtol=0, atol=2e-6)


def test_bf16_compute_and_remat_gradients(ip2p):
    model, folder = ip2p
    module, params = load.load_unet(folder)
    x, t, ctx = _inputs(model)
    ref = _run(module, params, x, t, ctx)
    low = _run(unet.build(module.config, dtype=jnp.bfloat16), params, x, t, ctx)
    assert low.dtype == jnp.float32
    assert float(jnp.abs(low - ref).max()) < 0.05 * float(jnp.abs(ref).max())

    args = jnp.asarray(nhwc(x)), jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy())

    def grad(m):
        return jax.jit(jax.grad(lambda p: jnp.mean(m.apply({"params": p}, *args) ** 2)))(params)
    g = grad(module)
    for policy in (True, "dots"):
        g_remat = grad(unet.build(module.config, remat=policy))
        for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_remat)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="remat='some': expected one of none, full, dots"):
        unet.build(module.config, remat="some").init(jax.random.key(0), *module.dummy_inputs())


def test_config_errors(ip2p, tmp_path):
    _, folder = ip2p
    cfg = json.load(open(os.path.join(folder, "config.json")))
    with pytest.raises(CheckpointError, match="unsupported down block type 'SimpleCrossAttnDownBlock2D'"):
        unet.Config.from_dict({**cfg, "down_block_types": ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]})
    with pytest.raises(CheckpointError, match="class_embed_type='timestep' is not supported"):
        unet.Config.from_dict({**cfg, "class_embed_type": "timestep"})
    with pytest.raises(CheckpointError, match=r"unknown field\(s\) \['block_out_chanels'\]"):
        unet.Config.from_dict({**cfg, "block_out_chanels": [1]})
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        load.load_unet(str(tmp_path / "nope"))
    # A config that does not fit the weights names the offending tensors.
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in os.listdir(folder):
        os.link(os.path.join(folder, f), bad / f) if f != "config.json" else None
    json.dump({**cfg, "cross_attention_dim": 16}, open(bad / "config.json", "w"))
    with pytest.raises(CheckpointError, match=r"mismatched shapes: .*attn2\.to_k\.weight"):
        load.load_unet(str(bad))


def test_corrupt_weight_file_is_named(tmp_path):
    folder = tmp_path / "u"
    folder.mkdir()
    json.dump(unet.Config().to_dict(), open(folder / "config.json", "w"))
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read weight file .*diffusion_pytorch_model.safetensors"):
        load.load_unet(str(folder))
