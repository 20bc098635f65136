"""DreamSim from transformers classes vs a plain-torch transcription of the ORIGINAL architectures run
directly on original-format state dicts (tiny random weights, LoRA un-merged), on real photos.

Tolerances (fp32): embeddings atol 2e-5 (unit vectors), raw features rtol 1e-4 / atol 1e-5.
"""
import json
import math
import os
import shutil

import numpy as np
import pytest
from skimage import data

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from jaxedit.scorers.dreamsim import CheckpointError, DreamSim, merge_lora  # noqa: E402
from jaxedit.scorers.embed import EmbeddingScorer  # noqa: E402

W, L, HD, MLP, P, S, PROJ, R, ALPHA = 128, 2, 64, 256, 16, 64, 24, 4, 2.0   # 2 heads of 64; 4x4 patches
HEADS = W // HD
IMNET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OPENAI = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


pytestmark = pytest.mark.usefixtures("torch_one_thread")


# ------------------------------------------------------------------ tiny ORIGINAL-format state dicts
def _rand(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g) * scale


def _ln(g, sd, name):
    sd[name + ".weight"] = 1 + _rand(g, W, scale=0.1)
    sd[name + ".bias"] = _rand(g, W, scale=0.1)


def _lin(g, sd, wname, bname, n_out, n_in):
    sd[wname], sd[bname] = _rand(g, n_out, n_in, scale=n_in ** -0.5), _rand(g, n_out, scale=0.1)


def timm_sd(seed, clip_like=False):
    """DINO's ViT layout; clip_like: DreamSim's converted CLIP tower (+ pos_drop LN, proj)."""
    g = torch.Generator().manual_seed(seed)
    sd = {"cls_token": _rand(g, 1, 1, W, scale=0.5), "pos_embed": _rand(g, 1, (S // P) ** 2 + 1, W, scale=0.5),
          "patch_embed.proj.weight": _rand(g, W, 3, P, P, scale=1 / math.sqrt(3 * P * P)),
          "patch_embed.proj.bias": _rand(g, W, scale=0.3)}
    for i in range(L):
        b = f"blocks.{i}."
        _ln(g, sd, b + "norm1"), _ln(g, sd, b + "norm2")
        _lin(g, sd, b + "attn.qkv.weight", b + "attn.qkv.bias", 3 * W, W)
        _lin(g, sd, b + "attn.proj.weight", b + "attn.proj.bias", W, W)
        _lin(g, sd, b + "mlp.fc1.weight", b + "mlp.fc1.bias", MLP, W)
        _lin(g, sd, b + "mlp.fc2.weight", b + "mlp.fc2.bias", W, MLP)
    _ln(g, sd, "norm")
    if clip_like:
        _ln(g, sd, "pos_drop")
        sd["proj"] = _rand(g, W, PROJ, scale=W ** -0.5)
    return sd


def openai_sd(seed):
    """OpenAI CLIP / OpenCLIP model state dict: visual tower + a few text-tower keys (ignored)."""
    g = torch.Generator().manual_seed(seed)
    v = {"conv1.weight": _rand(g, W, 3, P, P, scale=1 / math.sqrt(3 * P * P)),
         "class_embedding": _rand(g, W, scale=0.5), "positional_embedding": _rand(g, (S // P) ** 2 + 1, W, scale=0.5),
         "proj": _rand(g, W, PROJ, scale=W ** -0.5)}
    for name in ("ln_pre", "ln_post"):
        v[name + ".weight"], v[name + ".bias"] = 1 + _rand(g, W, scale=0.1), _rand(g, W, scale=0.1)
    for i in range(L):
        b = f"transformer.resblocks.{i}."
        for name in ("ln_1", "ln_2"):
            v[b + name + ".weight"], v[b + name + ".bias"] = 1 + _rand(g, W, scale=0.1), _rand(g, W, scale=0.1)
        _lin(g, v, b + "attn.in_proj_weight", b + "attn.in_proj_bias", 3 * W, W)
        _lin(g, v, b + "attn.out_proj.weight", b + "attn.out_proj.bias", W, W)
        _lin(g, v, b + "mlp.c_fc.weight", b + "mlp.c_fc.bias", MLP, W)
        _lin(g, v, b + "mlp.c_proj.weight", b + "mlp.c_proj.bias", W, MLP)
    sd = {"visual." + k: t for k, t in v.items()}
    sd.update({"token_embedding.weight": torch.zeros(10, 8), "logit_scale": torch.tensor(4.6)})
    return sd


def lora_weights(seed):
    """{block: (A (r, W), B (3W, r))}, all entries nonzero."""
    g = torch.Generator().manual_seed(seed)
    return {i: (_rand(g, R, W, scale=0.3), _rand(g, 3 * W, R, scale=0.3)) for i in range(L)}


# ------------------------------------------------------------------ reference forwards (original archs)
def _attention(x, w_qkv, b_qkv, w_o, b_o, lora):
    """Fused-qkv multi-head attention with an UN-merged LoRA: qkv = W x + b + (alpha/r) B (A x)."""
    b, n, c = x.shape
    qkv = F.linear(x, w_qkv, b_qkv)
    if lora is not None:
        a_, b_ = lora
        qkv = qkv + (ALPHA / R) * F.linear(F.linear(x, a_), b_)
    q, k, v = qkv.reshape(b, n, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4)
    att = ((q @ k.transpose(-2, -1)) * (c // HEADS) ** -0.5).softmax(-1)
    return F.linear((att @ v).transpose(1, 2).reshape(b, n, c), w_o, b_o)


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def ref_timm(sd, x, *, eps, act, ln_pre, loras):
    """DINO vision_transformer.VisionTransformer (DreamSim's copy): -> tokens after the last block."""
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd.get("patch_embed.proj.bias"), stride=P).flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(len(x), -1, -1), t], 1) + sd["pos_embed"]
    if ln_pre:  # DreamSim's CLIP-as-DINO: pos_drop = LayerNorm
        t = F.layer_norm(t, (W,), sd["pos_drop.weight"], sd["pos_drop.bias"], eps)
    for i in range(L):
        b = f"blocks.{i}."
        h = F.layer_norm(t, (W,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps)
        t = t + _attention(h, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"], sd[b + "attn.proj.weight"],
                           sd[b + "attn.proj.bias"], None if loras is None else loras[i])
        h = F.layer_norm(t, (W,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps)
        t = t + F.linear(act(F.linear(h, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])),
                         sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
    return t


def ref_openai(sd, x, *, act, loras):
    """OpenAI CLIP / OpenCLIP VisionTransformer: ln_post(CLS) @ proj."""
    v = {k[len("visual."):]: t for k, t in sd.items() if k.startswith("visual.")}
    t = F.conv2d(x, v["conv1.weight"], stride=P).flatten(2).transpose(1, 2)
    t = torch.cat([v["class_embedding"].expand(len(x), 1, -1), t], 1) + v["positional_embedding"]
    t = F.layer_norm(t, (W,), v["ln_pre.weight"], v["ln_pre.bias"], 1e-5)
    for i in range(L):
        b = f"transformer.resblocks.{i}."
        h = F.layer_norm(t, (W,), v[b + "ln_1.weight"], v[b + "ln_1.bias"], 1e-5)
        t = t + _attention(h, v[b + "attn.in_proj_weight"], v[b + "attn.in_proj_bias"], v[b + "attn.out_proj.weight"],
                           v[b + "attn.out_proj.bias"], None if loras is None else loras[i])
        h = F.layer_norm(t, (W,), v[b + "ln_2.weight"], v[b + "ln_2.bias"], 1e-5)
        t = t + F.linear(act(F.linear(h, v[b + "mlp.c_fc.weight"], v[b + "mlp.c_fc.bias"])),
                         v[b + "mlp.c_proj.weight"], v[b + "mlp.c_proj.bias"])
    return F.layer_norm(t[:, 0], (W,), v["ln_post.weight"], v["ln_post.bias"], 1e-5) @ v["proj"]


def ref_preprocess(img):
    """DreamSim's preprocess: PIL Resize((S, S), BICUBIC) + ToTensor."""
    return torch.from_numpy(np.array(Image.fromarray(img).resize((S, S), Image.BICUBIC))).permute(2, 0, 1).float() / 255


def _norm(x, mean_std):
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in mean_std)
    return (x - mean) / std


def ref_features(towers, x, with_lora=True):
    """towers: (dino_sd, (clip_sd, layout), (open_clip_sd, layout)), loras. -> raw (B, W + 2 PROJ)."""
    (dino, clip, oclip), loras = towers
    lo = (lambda i: loras[i]) if with_lora else (lambda i: None)
    xd, xc = _norm(x, IMNET), _norm(x, OPENAI)
    feats = [ref_timm(dino, xd, eps=1e-6, act=F.gelu, ln_pre=False, loras=lo(0))[:, 0]]   # block-11 CLS, no norm
    for j, ((sd, layout), act) in enumerate(((clip, quick_gelu), (oclip, F.gelu)), start=1):
        if layout == "openai":
            feats.append(ref_openai(sd, xc, act=act, loras=lo(j)))
        else:
            t = ref_timm(sd, xc, eps=1e-5, act=act, ln_pre=True, loras=lo(j))
            feats.append(F.layer_norm(t[:, 0], (W,), sd["norm.weight"], sd["norm.bias"], 1e-5) @ sd["proj"])
    return torch.cat(feats, -1)


def ref_embed(towers, x, with_lora=True):
    f = ref_features(towers, x, with_lora)
    f = f - f.mean(-1, keepdim=True)       # dreamsim normalize_embedding: centre, then unit norm
    return f / f.norm(dim=-1, keepdim=True)


# ------------------------------------------------------------------ folders in DreamSim's layout
def write_folder(root, layout="v02", clip_layout="dreamsim", seed=0):
    """v02: ensemble_lora/ (keys ...extractor_list.I.model.blocks.N...); v01: {backbone}_lora/ with the
    vit_wrapper double prefix and an alias copy of every key."""
    os.makedirs(os.path.join(root, "checkpoints"), exist_ok=True)
    dino = timm_sd(seed)
    torch.save(dino, os.path.join(root, "checkpoints", "dino_vitbase16_pretrain.pth"))
    towers = []
    for j, fname in enumerate(("clip_vitb16_pretrain.pth.tar", "open_clip_vitb16_pretrain.pth.tar"), start=1):
        sd = timm_sd(seed + j, clip_like=True) if clip_layout == "dreamsim" else openai_sd(seed + j)
        torch.save({"state_dict": sd} if clip_layout == "dreamsim" or j == 1 else sd, os.path.join(root, fname))
        towers.append((sd, clip_layout))
    loras = [lora_weights(seed + 10 + j) for j in range(3)]
    cfg = {"r": R, "lora_alpha": ALPHA, "lora_dropout": 0.3, "bias": "none", "target_modules": ["qkv"],
           "peft_type": "LORA"}
    if layout == "v02":
        folders = {"ensemble_lora": {f"base_model.model.extractor_list.{j}.model.blocks.{i}.attn.qkv.lora_{ab}.weight":
                                     loras[j][i][k] for j in range(3) for i in range(L) for k, ab in enumerate("AB")}}
    else:
        folders = {}
        for j, name in enumerate(("dino_vitb16", "clip_vitb16", "open_clip_vitb16")):
            d = {}
            for i in range(L):
                for k, ab in enumerate("AB"):
                    d[f"base_model.model.base_model.model.model.blocks.{i}.attn.qkv.lora_{ab}.weight"] = loras[j][i][k]
                    d[f"base_model.model.base_model.model.blocks.{i}.attn.qkv.lora_{ab}.weight"] = loras[j][i][k]
            folders[f"{name}_lora"] = d
    for name, d in folders.items():
        os.makedirs(os.path.join(root, name), exist_ok=True)
        with open(os.path.join(root, name, "adapter_config.json"), "w") as f:
            json.dump(cfg, f)
        torch.save(d, os.path.join(root, name, "adapter_model.bin"))
    return root, ((dino, *towers), loras)


def photos():
    return [data.astronaut()[::4, ::4], data.coffee()[:300:2, 100:500:2], data.chelsea()[::3, ::3]]  # 3 sizes


@pytest.fixture(scope="module")
def v02(tmp_path_factory):
    return write_folder(str(tmp_path_factory.mktemp("dreamsim") / "models"))


# ------------------------------------------------------------------ tests
def test_from_original_matches_reference_v02(v02):
    root, towers = v02
    m = DreamSim.from_original(root)
    assert m.dim == W + 2 * PROJ and m.image_size == S
    for img in photos():
        x = ref_preprocess(img)[None]
        np.testing.assert_allclose(m.preprocess(img[None]).numpy(), x.numpy(), atol=0)
        with torch.no_grad():
            np.testing.assert_allclose(m.features(x).numpy(), ref_features(towers, x).numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(m.embed(img[None]), ref_embed(towers, x).numpy(), atol=2e-5)
    batch = np.stack([p[:96, :96] for p in photos()])
    e = m.embed(batch, batch_size=2)
    ref = ref_embed(towers, torch.stack([ref_preprocess(b) for b in batch])).numpy()
    np.testing.assert_allclose(e, ref, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(e, axis=-1), 1, atol=1e-5)
    np.testing.assert_allclose(e.mean(-1), 0, atol=1e-6)
    d = m.distance(batch, batch[::-1])
    np.testing.assert_allclose(d, 1 - (ref * ref[::-1]).sum(-1), atol=5e-5)
    assert d[1] == pytest.approx(0, abs=1e-6) and (d[[0, 2]] > 1e-3).all()


def test_openai_layout_and_v01_lora_folders(tmp_path):
    root, towers = write_folder(str(tmp_path / "models"), layout="v01", clip_layout="openai", seed=3)
    m = DreamSim.from_original(root)
    img = photos()[1]
    x = ref_preprocess(img)[None]
    np.testing.assert_allclose(m.embed(img[None]), ref_embed(towers, x).numpy(), atol=2e-5)


def test_lora_merge(v02):
    root, towers = v02
    w, a, b = (torch.randn(*s, dtype=torch.float64) for s in ((3 * W, W), (R, W), (3 * W, R)))
    xs = torch.randn(5, W, dtype=torch.float64)
    np.testing.assert_allclose(xs @ merge_lora(w, a, b, ALPHA / R).T, xs @ w.T + (ALPHA / R) * (xs @ a.T) @ b.T,
                               rtol=1e-10, atol=1e-10)
    base = DreamSim.from_original(root, lora=False)
    tuned = DreamSim.from_original(root)
    img = photos()[0]
    x = ref_preprocess(img)[None]
    e0, e1 = base.embed(img[None]), tuned.embed(img[None])
    np.testing.assert_allclose(e0, ref_embed(towers, x, with_lora=False).numpy(), atol=2e-5)
    assert np.abs(e1 - e0).max() > 1e-2                         # the adapter matters at this scale
    # the merged q/k/v of the first DINO block: split of W + (alpha/r) B A
    dino_sd, (la, lb) = towers[0][0], towers[1][0][0]
    merged = dino_sd["blocks.0.attn.qkv.weight"] + (ALPHA / R) * lb @ la
    q = tuned.dino.state_dict()["layers.0.attention.q_proj.weight"]
    v = tuned.dino.state_dict()["layers.0.attention.v_proj.weight"]
    np.testing.assert_allclose(q.numpy(), merged[:W].numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(v.numpy(), merged[2 * W:].numpy(), rtol=1e-6, atol=1e-7)


def _edit(path, fn):
    obj = torch.load(path, weights_only=True)
    fn(obj["state_dict"] if "state_dict" in obj else obj)
    torch.save(obj, path)


def test_clear_errors(v02, tmp_path):
    src, _ = v02

    def fresh(name):
        dst = str(tmp_path / name)
        shutil.copytree(src, dst)
        return dst

    with pytest.raises(FileNotFoundError, match="does not exist"):
        DreamSim.from_original(str(tmp_path / "nowhere"))
    r = fresh("no_clip")
    os.remove(os.path.join(r, "clip_vitb16_pretrain.pth.tar"))
    with pytest.raises(FileNotFoundError, match="clip_vitb16_pretrain.pth.tar"):
        DreamSim.from_original(r)
    r = fresh("no_dino")
    shutil.rmtree(os.path.join(r, "checkpoints"))
    with pytest.raises(FileNotFoundError, match="dino_vitbase16_pretrain.pth"):
        DreamSim.from_original(r)
    r = fresh("no_lora")
    shutil.rmtree(os.path.join(r, "ensemble_lora"))
    with pytest.raises(FileNotFoundError, match="ensemble_lora"):
        DreamSim.from_original(r)
    DreamSim.from_original(r, lora=False)                       # fine without the adapter when asked
    r = fresh("no_cfg")
    os.remove(os.path.join(r, "ensemble_lora", "adapter_config.json"))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        DreamSim.from_original(r)

    r = fresh("missing_key")
    _edit(os.path.join(r, "checkpoints", "dino_vitbase16_pretrain.pth"), lambda sd: sd.pop("blocks.1.norm2.bias"))
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.1\.norm2\.bias"):
        DreamSim.from_original(r)
    r = fresh("unexpected_key")
    _edit(os.path.join(r, "open_clip_vitb16_pretrain.pth.tar"),
          lambda sd: sd.update({"blocks.0.attn.foo": torch.zeros(1), "head.weight": torch.zeros(1)}))
    with pytest.raises(CheckpointError,
                       match=r"open_clip_vitb16_pretrain.*unexpected keys: blocks\.0\.attn\.foo, head\.weight"):
        DreamSim.from_original(r)
    r = fresh("wrong_shape")
    _edit(os.path.join(r, "clip_vitb16_pretrain.pth.tar"),
          lambda sd: sd.update({"blocks.1.mlp.fc1.weight": torch.zeros(7, W)}))
    with pytest.raises(CheckpointError, match=rf"blocks\.1\.mlp\.fc1\.weight: \(7, {W}\), expected \({MLP}, {W}\)"):
        DreamSim.from_original(r)
    r = fresh("wrong_lora_shape")
    key = "base_model.model.extractor_list.1.model.blocks.0.attn.qkv.lora_A.weight"
    _edit(os.path.join(r, "ensemble_lora", "adapter_model.bin"), lambda sd: sd.update({key: torch.zeros(R, W + 1)}))
    with pytest.raises(CheckpointError, match=r"blocks\.0\.attn\.qkv\.lora_A/B: shapes"):
        DreamSim.from_original(r)
    r = fresh("missing_lora_key")
    _edit(os.path.join(r, "ensemble_lora", "adapter_model.bin"),
          lambda sd: sd.pop("base_model.model.extractor_list.2.model.blocks.1.attn.qkv.lora_B.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.1\.attn\.qkv\.lora_B\.weight"):
        DreamSim.from_original(r)
    r = fresh("unexpected_lora_key")
    _edit(os.path.join(r, "ensemble_lora", "adapter_model.bin"),
          lambda sd: sd.update({"base_model.model.extractor_list.0.model.blocks.0.mlp.fc1.lora_A.weight":
                                torch.zeros(R, W)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys.*mlp\.fc1\.lora_A"):
        DreamSim.from_original(r)


def test_tiny_and_embedding_scorer_semantic():
    m = DreamSim.tiny(0)
    assert m.dim == 32 + 16 + 16 and m.image_size == 32
    assert EmbeddingScorer.tiny("dreamsim").model.dim == m.dim
    s = EmbeddingScorer.tiny("dreamsim", lam=0.05)
    assert s.size == 32
    x = np.concatenate([data.astronaut()[None, ::4, ::4], data.coffee()[None, :384:3, 100:484:3]])  # 128x128
    sty = np.stack([data.rocket()[:200, :300]] * 2)
    msk = np.zeros((2, 128, 128), np.float32)
    msk[:, 40:100, 30:90] = 1
    gen = x.copy()
    gen[:, 60:80, 50:70] = 255 - gen[:, 60:80, 50:70]
    d0 = s.style_distance(gen, sty, msk)
    outside = gen.copy()
    outside[:, :20] = 0                                           # changes outside the mask only
    np.testing.assert_array_equal(s.style_distance(outside, sty, msk), d0)
    inside = gen.copy()
    inside[:, 45:95, 35:85] = 0
    assert (s.style_distance(inside, sty, msk) != d0).all()
    full = s(x, outside, sty, msk)["semantic"]
    pixel = 0.05 * ((1 - msk)[..., None] * (x / 255.0 - outside / 255.0) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(full, d0 + pixel, rtol=1e-6)
    assert np.all((0 <= d0) & (d0 <= 2)) and (d0 > 1e-4).all()
    np.testing.assert_allclose(s.style_distance(sty, sty, np.ones((2, 200, 300), np.float32)), 0, atol=1e-6)
    np.testing.assert_allclose(s.style_distance(sty, sty, np.zeros((2, 200, 300), np.float32)), 0, atol=1e-6)
    # embed = DreamSim's own embedding; torch resize is close to PIL's
    e = s.embed(x)
    np.testing.assert_allclose(e, m.embed(x), atol=1e-6)
    mt = DreamSim.tiny(0, resize="torch")
    assert np.abs(mt.embed(x) - e).max() < 0.05


def test_specialist_scorer_dreamsim(v02):
    from jaxedit.scorers.composite import SpecialistScorer
    x = np.stack([data.astronaut()[::8, ::8], data.chelsea()[:64, :64]])
    msk = np.ones((2, 64, 64), np.float32)
    for weights in ("tiny", v02[0]):
        sc = SpecialistScorer(structural="sobel", semantic="dreamsim", embed_weights=weights)
        out = sc(x, x[::-1], x, msk)
        assert out["semantic"].shape == (2,) and np.all((out["semantic"] >= 0) & (out["semantic"] <= 2.5))
        np.testing.assert_allclose(sc(x, x, x, msk)["semantic"], 0, atol=1e-6)
    with pytest.raises(ValueError, match="dreamsim"):
        SpecialistScorer(structural="sobel", semantic="nope")
