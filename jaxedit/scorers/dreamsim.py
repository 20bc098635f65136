"""DreamSim (Fu et al. 2023) rebuilt from transformers classes, with converters from its checkpoints.

DreamSim embeds an image with three ViT-B/16 backbones, concatenates their features and compares
two images by cosine distance. What the original package computes (read in ssundaram21/dreamsim;
file names below are in that repository, ``dreamsim/`` unless said otherwise):

- Backbones and features (``config.py``: ``model_type "dino_vitb16,clip_vitb16,open_clip_vitb16"``,
  ``feat_type "cls,embedding,embedding"``, stride 16 = patch size; ``model.py`` ``EMBED_DIMS``):
  * DINO ViT-B/16 ("cls", 768): the CLS token of the OUTPUT OF BLOCK 11 (the last one), taken by a
    forward hook (``model.py`` ``_extract_cls`` -> ``feature_extraction/extractor.py``
    ``extract_descriptors(img, layer=11)[..., 0, :]``): BEFORE the final LayerNorm, no head.
    DINO's ViT (``feature_extraction/vision_transformer.py``): qkv bias, LayerNorm eps 1e-6, GELU.
  * OpenAI CLIP ViT-B/16 and OpenCLIP ViT-B/16 ("embedding", 512 each): ``model(x) @ proj``
    (``extractor.py`` ``forward(is_proj=True)``), i.e. ``ln_post(CLS) @ proj``, the usual CLIP
    image embedding, NOT normalised per backbone. Both towers are stored converted to DINO's
    ViT layout (``feature_extraction/load_clip_as_dino.py``, ``load_open_clip_as_dino.py``):
    ``pos_drop`` replaced by a LayerNorm (= CLIP's ``ln_pre``), every LayerNorm eps 1e-5, the
    MLP activation QuickGELU for OpenAI CLIP and GELU (unchanged) for OpenCLIP, ``proj`` popped
    from the state dict. (Which OpenCLIP weights: whatever ``open_clip_vitb16_pretrain.pth.tar``
    holds; the sanity check in ``load_open_clip_as_dino.py`` compares against
    ``laion400m_e31``; the brief's laion2b_s34b_b88k is not stated in the code read.)
- Pre-processing (``model.py`` ``dreamsim()`` ``preprocess``): PIL image -> RGB ->
  ``transforms.Resize((224, 224), BICUBIC)`` (PIL's bicubic on the uint8 image, no crop) ->
  ``ToTensor`` ([0, 1]); then per backbone (``model.py`` ``_get_mean``/``_get_std``) DINO:
  ImageNet mean/std (0.485, 0.456, 0.406)/(0.229, 0.224, 0.225); CLIP and OpenCLIP: OpenAI
  CLIP mean/std (0.48145466, 0.4578275, 0.40821073)/(0.26862954, 0.26130258, 0.27577711).
- Embedding: ``torch.cat([dino_cls, clip_emb, open_clip_emb], -1)`` (1792) -> MLP = identity
  (``lora=True``) -> ``normalize_embedding`` (``normalize_embeds=True`` is the default of
  ``dreamsim()``). Current ``model.py``: subtract the mean over the 1792 features of each row,
  then divide by the row's L2 norm (over the whole concatenation, not per backbone). The v0.1
  ``model.py`` (commit 5541f87) divided by the norm first, then subtracted the mean: the same
  direction, another length, so identical cosine distances. We return the current form
  (unit norm).
- Distance (``model.py`` ``PerceptualModel.forward``): ``1 - F.cosine_similarity(e_a, e_b)``.
- LoRA (``config.py`` v0.1 ``lora_config`` and ``configs/train_ensemble_model_lora.yaml``:
  r=16, lora_alpha=0.5, dropout 0.3, bias "none", target_modules ["qkv"]; the current
  ``model.py`` reads these from ``<tag>lora/adapter_config.json``): PEFT LoRA on every block's
  fused ``attn.qkv`` Linear of all three towers, ``qkv(x) = W x + b + (alpha/r) B A x`` (A: r x
  768, B: 2304 x r; ``use_rslora`` would make it alpha/sqrt(r)). We merge ``W + (alpha/r) B A``
  before splitting qkv into q/k/v. Adapter key names (PEFT drops the adapter name ``default``):
  current ``ensemble_lora/adapter_model.bin``: get_peft_model wraps the whole PerceptualModel, so
  ``base_model.model.extractor_list.{0,1,2}.model.blocks.N.attn.qkv.lora_{A,B}.weight``
  (0 = DINO, 1 = CLIP, 2 = OpenCLIP, the ``model_type`` order); v0.1 ``{backbone}_lora/``: one
  adapter per tower wrapping ``feature_extraction/vit_wrapper.py`` ``ViTModel`` (which holds the
  ViT as ``model`` and again as ``blocks``), so ``...model.blocks.N.attn.qkv.lora_A.weight``
  and possibly an alias ``...blocks.N...`` (``training/train.py`` re-prefixes keys with
  ``base_model.model.``). We match any key ending in ``blocks.N.attn.qkv.lora_{A,B}[.name].weight``
  (duplicates must agree) and read ``extractor_list.I`` where present.

Checkpoint folder (``DreamSim.from_original``), laid out like DreamSim's ``cache_dir``
(``./models``; ``model.py`` ``download_weights`` and ``config.py`` ``dreamsim_weights``: the
v0.2.0 ``dreamsim_ensemble_checkpoint.zip`` unzipped there)::

    clip_vitb16_pretrain.pth.tar        {"state_dict": DINO-layout CLIP tower + "proj"}
    open_clip_vitb16_pretrain.pth.tar   same for OpenCLIP
    ensemble_lora/adapter_config.json   + adapter_model.bin (or .safetensors)
    checkpoints/dino_vitbase16_pretrain.pth   the DINO backbone (timm layout)

The DINO backbone is NOT in the zip: DreamSim builds it with ``torch.hub.load(
'facebookresearch/dino:main', 'dino_vitb16')`` after ``torch.hub.set_dir(cache_dir)``
(``extractor.py``), which stores dl.fbaipublicfiles.com's ``dino_vitbase16_pretrain.pth`` as
``<cache_dir>/checkpoints/dino_vitbase16_pretrain.pth``; we also accept it at the top level.
The zip's ``dino_vitb16_pretrain.pth`` is DINO's training checkpoint, read by DreamSim only for
its projection head (unused by the "cls" feature) and not needed here. Also accepted: the v0.1
folders ``dino_vitb16_lora/``, ``clip_vitb16_lora/``, ``open_clip_vitb16_lora/`` instead of
``ensemble_lora/``; and, in the two ``.pth.tar`` files, an OpenAI/OpenCLIP visual state dict
(``visual.conv1.weight``, ``visual.class_embedding``, ..., ``visual.proj``; with or without the
``visual.`` prefix, other towers' keys ignored; optionally under "state_dict").

Conversion notes: DINO -> ``transformers.ViTModel`` (add_pooling_layer=False, eps 1e-6, GELU);
CLIP/OpenCLIP -> ``CLIPVisionModelWithProjection`` (eps 1e-5, quick_gelu/gelu; projection
weight = ``proj``.T). The DINO-layout CLIP files carry a ``patch_embed.proj.bias`` (OpenAI's
``conv1`` has none; transformers' CLIP patch conv has none): it is added to the patch
positions' position embeddings, which is exact. Heads are not stored in a checkpoint:
``head_dim`` (64 for every ViT-B/L/H and CLIP tower) gives ``heads = width / head_dim``.
Embedding width 768 + 512 + 512 = 1792 at full size. PyTorch: scorer process only.
"""
from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, ViTConfig, ViTModel

IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP_MEAN_STD = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
BACKBONES = ("dino_vitb16", "clip_vitb16", "open_clip_vitb16")  # DreamSim's model_type order
CLIP_ACT = {"clip_vitb16": "quick_gelu", "open_clip_vitb16": "gelu"}
DINO_FILES = ("checkpoints/dino_vitbase16_pretrain.pth", "dino_vitbase16_pretrain.pth")
CLIP_FILES = {"clip_vitb16": "clip_vitb16_pretrain.pth.tar", "open_clip_vitb16": "open_clip_vitb16_pretrain.pth.tar"}
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")


class CheckpointError(ValueError):
    """A state dict that does not fit the expected layout (keys or shapes)."""


def _first(names, n: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def _load(path: str, what: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no file {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------- timm / DINO layout
def _block_keys(i: int) -> list[str]:
    p = f"blocks.{i}."
    return [p + k for k in ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                            "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                            "mlp.fc2.weight", "mlp.fc2.bias")]


def _num_blocks(sd, prefix: str = "blocks.") -> int:
    idx = [int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))]
    return max(idx) + 1 if idx else 0


def check_timm(sd: dict, what: str, *, ln_pre: bool, proj: bool, patch_bias: bool = True) -> dict:
    """Validate a DINO-layout ViT state dict (keys, then shapes); -> its dimensions."""
    sd = {k: v for k, v in sd.items()}
    layers = _num_blocks(sd)
    expected = ["cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight", "norm.bias"]
    expected += ["pos_drop.weight", "pos_drop.bias"] if ln_pre else []
    expected += ["proj"] if proj else []
    expected += [k for i in range(layers) for k in _block_keys(i)]
    optional = set() if patch_bias else {"patch_embed.proj.bias"}
    if patch_bias:
        expected.append("patch_embed.proj.bias")
    missing = set(expected) - set(sd)
    unexpected = set(sd) - set(expected) - optional
    if missing or unexpected or layers == 0:
        raise CheckpointError(f"{what}: " + "; ".join(
            ([f"missing keys: {_first(missing)}"] if missing else [])
            + ([f"unexpected keys: {_first(unexpected)}"] if unexpected else [])
            + (["no transformer blocks (blocks.N.*)"] if layers == 0 else [])))
    width = sd["cls_token"].shape[-1]
    patch = sd["patch_embed.proj.weight"].shape[-1]
    mlp = sd["blocks.0.mlp.fc1.weight"].shape[0]
    tokens = sd["pos_embed"].shape[-2]
    grid = math.isqrt(max(tokens - 1, 0))
    shapes = {"cls_token": (1, 1, width), "pos_embed": (1, grid * grid + 1, width),
              "patch_embed.proj.weight": (width, 3, patch, patch), "patch_embed.proj.bias": (width,),
              "norm.weight": (width,), "norm.bias": (width,), "pos_drop.weight": (width,), "pos_drop.bias": (width,)}
    for i in range(layers):
        p = f"blocks.{i}."
        shapes.update({p + "norm1.weight": (width,), p + "norm1.bias": (width,), p + "norm2.weight": (width,),
                       p + "norm2.bias": (width,), p + "attn.qkv.weight": (3 * width, width),
                       p + "attn.qkv.bias": (3 * width,), p + "attn.proj.weight": (width, width),
                       p + "attn.proj.bias": (width,), p + "mlp.fc1.weight": (mlp, width), p + "mlp.fc1.bias": (mlp,),
                       p + "mlp.fc2.weight": (width, mlp), p + "mlp.fc2.bias": (width,)})
    if proj:
        shapes["proj"] = (width, sd["proj"].shape[-1])
    bad = [f"{k}: {tuple(sd[k].shape)}, expected {shapes[k]}" for k in sorted(shapes)
           if k in sd and tuple(sd[k].shape) != shapes[k]]
    if tokens != grid * grid + 1 and "pos_embed: " not in " ".join(bad):
        bad.append(f"pos_embed: {tuple(sd['pos_embed'].shape)} is not 1 + a square number of patches")
    if bad:
        raise CheckpointError(f"{what}: shape mismatch: " + "; ".join(bad[:5])
                              + (f"; ... ({len(bad)} in all)" if len(bad) > 5 else ""))
    return {"width": width, "layers": layers, "mlp": mlp, "patch": patch, "image": grid * patch,
            "proj_dim": sd["proj"].shape[-1] if proj else None}


def openai_visual_to_timm(sd: dict, what: str = "OpenAI/OpenCLIP visual state dict") -> dict:
    """OpenAI CLIP / OpenCLIP visual tower (``conv1``, ``class_embedding``, ``transformer.resblocks``,
    ``in_proj``, ``ln_post``, ``proj``; a ``visual.`` prefix and other towers' keys allowed) -> the
    DINO layout DreamSim stores (``pos_drop`` = ln_pre, ``norm`` = ln_post, ``proj`` kept, no
    patch bias) — what DreamSim's ``*_pretrain.pth.tar`` were converted to."""
    if any(k.startswith("visual.") for k in sd):
        sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    layers = _num_blocks(sd, "transformer.resblocks.")
    names = {"cls_token": "class_embedding", "pos_embed": "positional_embedding",
             "patch_embed.proj.weight": "conv1.weight", "pos_drop.weight": "ln_pre.weight",
             "pos_drop.bias": "ln_pre.bias", "norm.weight": "ln_post.weight", "norm.bias": "ln_post.bias",
             "proj": "proj"}
    for i in range(layers):
        o, t = f"transformer.resblocks.{i}.", f"blocks.{i}."
        names.update({t + "norm1.weight": o + "ln_1.weight", t + "norm1.bias": o + "ln_1.bias",
                      t + "attn.qkv.weight": o + "attn.in_proj_weight", t + "attn.qkv.bias": o + "attn.in_proj_bias",
                      t + "attn.proj.weight": o + "attn.out_proj.weight",
                      t + "attn.proj.bias": o + "attn.out_proj.bias",
                      t + "norm2.weight": o + "ln_2.weight", t + "norm2.bias": o + "ln_2.bias",
                      t + "mlp.fc1.weight": o + "mlp.c_fc.weight", t + "mlp.fc1.bias": o + "mlp.c_fc.bias",
                      t + "mlp.fc2.weight": o + "mlp.c_proj.weight", t + "mlp.fc2.bias": o + "mlp.c_proj.bias"})
    missing = set(names.values()) - set(sd)
    unexpected = set(sd) - set(names.values())
    if missing or unexpected or layers == 0:
        raise CheckpointError(f"{what}: " + "; ".join(
            ([f"missing keys: {_first(missing)}"] if missing else [])
            + ([f"unexpected keys: {_first(unexpected)}"] if unexpected else [])
            + (["no transformer.resblocks.N.*"] if layers == 0 else [])))
    out = {t: sd[o] for t, o in names.items()}
    out["cls_token"] = out["cls_token"].reshape(1, 1, -1)
    out["pos_embed"] = out["pos_embed"][None]
    return out


def _tower_state_dict(obj, what: str) -> tuple[dict, bool]:
    """A loaded CLIP file -> (DINO-layout state dict, whether it came in OpenAI layout)."""
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{what}: expected a state dict (or {{'state_dict': ...}}), got {type(obj).__name__}")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if any(k.startswith("visual.") for k in sd) or "conv1.weight" in sd:
        return openai_visual_to_timm(sd, what), True
    return sd, False


# ---------------------------------------------------------------------------- LoRA
_LORA_RE = re.compile(r"(?:^|\.)blocks\.(\d+)\.attn\.qkv\.lora_([AB])(?:\.[A-Za-z_]\w*)?\.weight$")
_EXTRACTOR_RE = re.compile(r"(?:^|\.)extractor_list\.(\d+)\.")


def read_lora(folder: str, *, ensemble: bool) -> tuple[float, dict]:
    """A PEFT adapter folder -> (scale alpha/r, {backbone index or None: {block: {"A": A, "B": B}}})."""
    cfg_path = os.path.join(folder, "adapter_config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"LoRA adapter: no file {cfg_path}")
    with open(cfg_path) as f:
        cfg = json.load(f)
    for k in ("r", "lora_alpha"):
        if k not in cfg:
            raise CheckpointError(f"{cfg_path}: no {k!r}")
    targets = cfg.get("target_modules", ["qkv"])
    targets = [targets] if isinstance(targets, str) else list(targets)
    if targets != ["qkv"] or cfg.get("fan_in_fan_out", False) or cfg.get("bias", "none") != "none":
        raise CheckpointError(f"{cfg_path}: only LoRA on 'qkv' without bias or fan_in_fan_out is supported "
                              f"(target_modules={targets}, bias={cfg.get('bias')!r})")
    r = int(cfg["r"])
    scale = float(cfg["lora_alpha"]) / (math.sqrt(r) if cfg.get("use_rslora", False) else r)
    path = next((os.path.join(folder, n) for n in ADAPTER_FILES if os.path.isfile(os.path.join(folder, n))), None)
    if path is None:
        raise FileNotFoundError(f"LoRA adapter: none of {ADAPTER_FILES} in {folder}")
    sd = _load(path, "LoRA adapter")
    out: dict = {}
    unexpected = []
    for k, v in sd.items():
        m, e = _LORA_RE.search(k), _EXTRACTOR_RE.search(k)
        if m is None or (ensemble and e is None):
            unexpected.append(k)
            continue
        slot = out.setdefault(int(e.group(1)) if ensemble else None, {}).setdefault(int(m.group(1)), {})
        ab = m.group(2)
        if ab in slot and not torch.equal(slot[ab], v):
            raise CheckpointError(f"{path}: two different tensors for the same LoRA weight ({k})")
        slot[ab] = v
        if v.ndim != 2 or v.shape[0 if ab == "A" else 1] != r:
            raise CheckpointError(f"{path}: {k}: shape {tuple(v.shape)}, expected r={r} on its "
                                  f"{'first' if ab == 'A' else 'second'} axis")
    if unexpected:
        raise CheckpointError(f"{path}: unexpected keys (expected ...{'extractor_list.I...' if ensemble else ''}"
                              f"blocks.N.attn.qkv.lora_A/B.weight): {_first(unexpected)}")
    return scale, out


def merge_lora(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale · B A: the Linear that computes W x + scale · B (A x)."""
    return weight + scale * (lora_b.to(weight.dtype) @ lora_a.to(weight.dtype))


def apply_lora(sd: dict, lora: dict | None, scale: float, what: str) -> dict:
    """Merge {block: {"A", "B"}} into ``blocks.N.attn.qkv.weight`` of a DINO-layout state dict."""
    if lora is None:
        return sd
    layers = _num_blocks(sd)
    names = lambda i, ab: f"blocks.{i}.attn.qkv.lora_{ab}.weight"  # noqa: E731
    missing = [names(i, ab) for i in range(layers) for ab in "AB" if ab not in lora.get(i, {})]
    extra = [names(i, ab) for i in lora for ab in lora[i] if i >= layers]
    if missing or extra:
        raise CheckpointError(f"{what} LoRA: " + "; ".join(
            ([f"missing keys: {_first(missing)}"] if missing else [])
            + ([f"unexpected keys (the tower has {layers} blocks): {_first(extra)}"] if extra else [])))
    sd = dict(sd)
    for i in range(layers):
        w, a, b = sd[f"blocks.{i}.attn.qkv.weight"], lora[i]["A"], lora[i]["B"]
        if a.shape[1] != w.shape[1] or b.shape[0] != w.shape[0] or a.shape[0] != b.shape[1]:
            raise CheckpointError(f"{what} LoRA: blocks.{i}.attn.qkv.lora_A/B: shapes {tuple(a.shape)}, "
                                  f"{tuple(b.shape)} do not fit qkv weight {tuple(w.shape)}")
        sd[f"blocks.{i}.attn.qkv.weight"] = merge_lora(w.float(), a.float(), b.float(), scale)
    return sd


# ---------------------------------------------------------------------------- -> transformers
def _heads(width: int, head_dim: int, what: str) -> int:
    if width % head_dim:
        raise CheckpointError(f"{what}: width {width} is not a multiple of head_dim {head_dim}")
    return width // head_dim


def _load_hf(model, new: dict, what: str):
    ref = model.state_dict()
    missing, unexpected = set(ref) - set(new), set(new) - set(ref)
    if missing or unexpected:  # the key map vs this transformers version
        raise CheckpointError(f"{what}: converted keys do not match {type(model).__name__}: "
                              f"missing {_first(missing)}; unexpected {_first(unexpected)}")
    bad = [f"{k}: {tuple(new[k].shape)} vs {tuple(ref[k].shape)}" for k in ref if new[k].shape != ref[k].shape]
    if bad:
        raise CheckpointError(f"{what}: shape mismatch: " + "; ".join(bad[:5]))
    model.load_state_dict({k: v.to(ref[k].dtype) for k, v in new.items()}, strict=True)
    return model.eval()


def _split_blocks(sd: dict, layers: int, names: dict) -> dict:
    out = {}
    for i in range(layers):
        p, q = f"blocks.{i}.", names["layer"].format(i)
        for pb in ("weight", "bias"):
            for name, t in zip(names["qkv"], sd[p + f"attn.qkv.{pb}"].chunk(3, dim=0)):
                out[q + f"{name}.{pb}"] = t
            for ours, theirs in (("attn.proj", names["o"]), ("norm1", names["ln1"]), ("norm2", names["ln2"]),
                                 ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                out[q + f"{theirs}.{pb}"] = sd[p + f"{ours}.{pb}"]
    return out


def vit_config(width: int, layers: int, heads: int, mlp: int, patch: int, image: int) -> ViTConfig:
    """DINO's ViT (vision_transformer.py ``vit_base``): qkv bias, LayerNorm eps 1e-6, exact GELU."""
    return ViTConfig(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=mlp,
                     patch_size=patch, image_size=image, hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True)


def clip_config(width: int, layers: int, heads: int, mlp: int, patch: int, image: int, proj_dim: int,
                act: str) -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=mlp, patch_size=patch, image_size=image, projection_dim=proj_dim,
                            hidden_act=act, layer_norm_eps=1e-5)


def dino_to_transformers(sd: dict, *, lora: dict | None = None, lora_scale: float = 0.0, head_dim: int = 64,
                         what: str = "DINO") -> ViTModel:
    """DINO ViT state dict (``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.N.*``, ``norm``)
    [+ LoRA on qkv, merged] -> ``ViTModel`` (no pooler)."""
    d = check_timm(sd, what, ln_pre=False, proj=False)
    sd = apply_lora(sd, lora, lora_scale, what)
    new = {"embeddings.cls_token": sd["cls_token"], "embeddings.position_embeddings": sd["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
           "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"]}
    new.update(_split_blocks(sd, d["layers"], {"layer": "layers.{}.", "qkv": ("attention.q_proj", "attention.k_proj",
                                                                             "attention.v_proj"),
                                               "o": "attention.o_proj", "ln1": "layernorm_before",
                                               "ln2": "layernorm_after"}))
    cfg = vit_config(d["width"], d["layers"], _heads(d["width"], head_dim, what), d["mlp"], d["patch"], d["image"])
    return _load_hf(ViTModel(cfg, add_pooling_layer=False), new, what)


def clip_to_transformers(sd: dict, act: str, *, lora: dict | None = None, lora_scale: float = 0.0,
                         head_dim: int = 64, what: str = "CLIP") -> CLIPVisionModelWithProjection:
    """CLIP tower in DreamSim's DINO layout (``pos_drop`` = ln_pre, ``norm`` = ln_post, ``proj``) or in
    OpenAI/OpenCLIP layout (``visual.conv1``, ...) [+ LoRA on qkv / in_proj, merged] ->
    ``CLIPVisionModelWithProjection``; ``act`` "quick_gelu" (OpenAI) or "gelu" (OpenCLIP)."""
    sd, _ = _tower_state_dict(sd, what)
    d = check_timm(sd, what, ln_pre=True, proj=True, patch_bias=False)
    sd = apply_lora(sd, lora, lora_scale, what)
    pos = sd["pos_embed"][0].clone()
    if "patch_embed.proj.bias" in sd:  # conv bias -> every patch token: fold into their positions
        pos[1:] += sd["patch_embed.proj.bias"]
    v = "vision_model."
    new = {v + "embeddings.class_embedding": sd["cls_token"].reshape(-1),
           v + "embeddings.patch_embedding.weight": sd["patch_embed.proj.weight"],
           v + "embeddings.position_embedding.weight": pos,
           v + "pre_layrnorm.weight": sd["pos_drop.weight"], v + "pre_layrnorm.bias": sd["pos_drop.bias"],
           v + "post_layernorm.weight": sd["norm.weight"], v + "post_layernorm.bias": sd["norm.bias"],
           "visual_projection.weight": sd["proj"].t().contiguous()}
    new.update(_split_blocks(sd, d["layers"], {"layer": v + "encoder.layers.{}.",
                                               "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                                               "o": "self_attn.out_proj", "ln1": "layer_norm1", "ln2": "layer_norm2"}))
    cfg = clip_config(d["width"], d["layers"], _heads(d["width"], head_dim, what), d["mlp"], d["patch"], d["image"],
                      d["proj_dim"], act)
    return _load_hf(CLIPVisionModelWithProjection(cfg), new, what)


# ---------------------------------------------------------------------------- the model
class DreamSim(torch.nn.Module):
    """DreamSim's embedding from transformers models: DINO (``ViTModel``), OpenAI CLIP and OpenCLIP
    (``CLIPVisionModelWithProjection``). ``embed`` -> unit-norm (B, 1792); ``distance`` = 1 − cos.

    resize: "pil" (DreamSim's own pre-processing: PIL bicubic on the uint8 image, float inputs
    rounded first) or "torch" (antialiased bicubic on floats, batched, no rounding)."""

    def __init__(self, dino: ViTModel, clip: CLIPVisionModelWithProjection, open_clip: CLIPVisionModelWithProjection,
                 resize: str = "pil"):
        super().__init__()
        sizes = {dino.config.image_size, clip.config.image_size, open_clip.config.image_size}
        if len(sizes) != 1:
            raise ValueError(f"the three backbones must share one input size, got {sorted(sizes)}")
        if resize not in ("pil", "torch"):
            raise ValueError(f"resize={resize!r}: expected 'pil' or 'torch'")
        self.dino, self.clip, self.open_clip = dino.eval(), clip.eval(), open_clip.eval()
        self.image_size, self.resize = sizes.pop(), resize
        for name, (mean, std) in (("dino", IMAGENET_MEAN_STD), ("clip", CLIP_MEAN_STD)):
            self.register_buffer(f"{name}_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
            self.register_buffer(f"{name}_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def dim(self) -> int:
        return (self.dino.config.hidden_size + self.clip.config.projection_dim
                + self.open_clip.config.projection_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> raw concatenated features (B, dim): DINO last-block CLS (no final
        norm), CLIP and OpenCLIP projected CLS embeddings."""
        xd = (x - self.dino_mean) / self.dino_std
        xc = (x - self.clip_mean) / self.clip_std
        dino = self.dino(pixel_values=xd, output_hidden_states=True).hidden_states[-1][:, 0]
        return torch.cat([dino, self.clip(pixel_values=xc).image_embeds,
                          self.open_clip(pixel_values=xc).image_embeds], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> DreamSim embedding: features minus their mean, unit norm."""
        f = self.features(x).float()
        return F.normalize(f - f.mean(dim=-1, keepdim=True), dim=-1)

    def preprocess(self, images) -> torch.Tensor:
        """uint8 or float-in-[0,255] (B, H, W, 3) -> (B, 3, S, S) float32 in [0, 1]."""
        images, s = np.asarray(images), self.image_size
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images: expected (B, H, W, 3), got {images.shape}")
        if self.resize == "pil":
            from PIL import Image
            u8 = images if images.dtype == np.uint8 else np.clip(np.rint(images), 0, 255).astype(np.uint8)
            out = np.stack([np.array(Image.fromarray(im).resize((s, s), Image.BICUBIC)) for im in u8])
            return torch.from_numpy(out).permute(0, 3, 1, 2).float() / 255.0
        x = torch.from_numpy(images.astype(np.float32)).permute(0, 3, 1, 2) / 255.0
        return F.interpolate(x, size=(s, s), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)

    @torch.inference_mode()
    def embed(self, images, batch_size: int = 16) -> np.ndarray:
        """uint8 or float-in-[0,255] (B, H, W, 3) -> float32 (B, dim) unit-norm embeddings."""
        device = self.dino_mean.device
        out = [self(self.preprocess(images[i:i + batch_size]).to(device)).float().cpu().numpy()
               for i in range(0, len(images), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def distance(self, images_a, images_b, batch_size: int = 16) -> np.ndarray:
        """DreamSim distance 1 − cos(e_a, e_b), float32 (B,)."""
        ea, eb = self.embed(images_a, batch_size), self.embed(images_b, batch_size)
        return (1.0 - (ea * eb).sum(-1)).astype(np.float32)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_original(cls, path: str, *, lora: bool = True, head_dim: int = 64, resize: str = "pil") -> "DreamSim":
        """From a folder laid out like DreamSim's ``cache_dir`` (see the module docstring);
        ``lora=False``: the un-fine-tuned ensemble."""
        if not os.path.isdir(path):
            raise FileNotFoundError(f"DreamSim folder {path} does not exist")
        dino_path = next((os.path.join(path, f) for f in DINO_FILES if os.path.isfile(os.path.join(path, f))), None)
        if dino_path is None:
            raise FileNotFoundError(f"DreamSim: no DINO ViT-B/16 backbone in {path}: expected one of {DINO_FILES} "
                                    "(torch.hub's download of dino_vitbase16_pretrain.pth)")
        loras = {name: (0.0, None) for name in BACKBONES}
        if lora:
            if os.path.isdir(os.path.join(path, "ensemble_lora")):
                scale, per = read_lora(os.path.join(path, "ensemble_lora"), ensemble=True)
                if set(per) - {0, 1, 2}:
                    raise CheckpointError(f"{path}/ensemble_lora: extractor_list indices {sorted(per)}, expected 0-2")
                loras = {name: (scale, per.get(i, {})) for i, name in enumerate(BACKBONES)}
            elif all(os.path.isdir(os.path.join(path, f"{n}_lora")) for n in BACKBONES):
                for name in BACKBONES:
                    scale, per = read_lora(os.path.join(path, f"{name}_lora"), ensemble=False)
                    loras[name] = (scale, per.get(None, {}))
            else:
                raise FileNotFoundError(f"DreamSim: no LoRA adapter in {path}: expected ensemble_lora/ (v0.2) or "
                                        f"{', '.join(n + '_lora/' for n in BACKBONES)} (v0.1); lora=False skips it")
        dino = dino_to_transformers(_load(dino_path, "DINO backbone"), lora=loras["dino_vitb16"][1],
                                    lora_scale=loras["dino_vitb16"][0], head_dim=head_dim, what=dino_path)
        towers = {}
        for name, fname in CLIP_FILES.items():
            p = os.path.join(path, fname)
            towers[name] = clip_to_transformers(_load(p, name), CLIP_ACT[name], lora=loras[name][1],
                                                lora_scale=loras[name][0], head_dim=head_dim, what=p)
        return cls(dino, towers["clip_vitb16"], towers["open_clip_vitb16"], resize=resize)

    @classmethod
    def random(cls, width: int = 768, layers: int = 12, heads: int = 12, mlp: int = 3072, patch: int = 16,
               image: int = 224, proj_dim: int = 512, seed: int = 0, resize: str = "pil") -> "DreamSim":
        """Random weights; the defaults are DreamSim's real ViT-B/16 configs (for benchmarks)."""
        torch.manual_seed(seed)
        dino = ViTModel(vit_config(width, layers, heads, mlp, patch, image), add_pooling_layer=False)
        clip, open_clip = (CLIPVisionModelWithProjection(clip_config(width, layers, heads, mlp, patch, image, proj_dim,
                                                                     CLIP_ACT[n])) for n in BACKBONES[1:])
        return cls(dino, clip, open_clip, resize=resize)

    @classmethod
    def tiny(cls, seed: int = 0, **kwargs) -> "DreamSim":
        """A small RANDOM DreamSim for tests: width 32, 2 layers, 2 heads, patch 8, 32x32 input (dim 64)."""
        return cls.random(**{"width": 32, "layers": 2, "heads": 2, "mlp": 64, "patch": 8, "image": 32,
                             "proj_dim": 16, "seed": seed, **kwargs})
