"""Text-to-image preference scores (HPSv2 / v2.1, ImageReward, PickScore) rebuilt from transformers
classes, with converters from their ORIGINAL checkpoints. Higher is better for all three.

What the original packages compute (file names are in the repositories named; read, not copied):

HPSv2 (tgxs002/HPSv2, ``hpsv2/img_score.py`` ``score``, ``hpsv2/evaluation.py``):
- Model: OpenCLIP ViT-H-14 (``create_model_and_transforms('ViT-H-14', 'laion2B-s32B-b79K',
  force_quick_gelu=False, light_augmentation=True, ...)``) with the weights of
  ``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt`` (``hpsv2/utils.py`` ``hps_version_map``),
  loaded by ``model.load_state_dict(torch.load(cp)['state_dict'])`` (strict): a dict
  ``{"state_dict": open_clip CLIP state dict}``. ViT-H-14 (open_clip
  ``model_configs/ViT-H-14.json``): embed 1024; vision 224 px, patch 14, width 1280, 32 layers,
  head_width 80 (16 heads); text context 77, vocab 49408, width 1024, 16 heads, 24 layers. Exact
  GELU (not QuickGELU), LayerNorm eps 1e-5, pre-LN blocks; image = ``ln_post(CLS) @ proj``, text =
  ``ln_final(x)[argmax(ids)] @ text_projection`` (causal mask; the end-of-text id is the largest).
- Score: ``outputs = model(image, text)`` gives L2-normalised ``image_features``/``text_features``;
  ``hps_score = diag(image_features @ text_features.T)`` = cos(image, text) — NO logit scale and no
  factor 100 (``evaluation.py`` prints benchmark means x 100; its ranking modes multiply by
  ``logit_scale``, which does not change an order). We return the cosine.
- Pre-processing (``hpsv2/src/open_clip/factory.py``: ``light_augmentation=True`` ->
  ``image_transform(..., is_train=False, resize_longest_max=True)``; ``transform.py``): RGB ->
  ``ToTensor`` ([0, 1] float) -> ``ResizeMaxSize(224)`` ON THE TENSOR: scale = 224 / max(h, w),
  new size ``round(h·scale), round(w·scale)``, torchvision bicubic tensor resize (= ``F.interpolate``
  bicubic, align_corners=False; antialias True since torchvision 0.17, False before), then zero
  padding to 224 x 224 (left/top ``pad // 2``, the rest right/bottom; zero BEFORE normalisation)
  -> OpenAI CLIP mean/std. No centre crop. (The original skips the padding when the longer side is
  already 224 and then fails on non-square inputs; we pad.)
- Tokens: open_clip's ``tokenize`` (BPE ``bpe_simple_vocab_16e6.txt.gz``, lower-cased, <sot> ...
  <eot>, truncated to 77 with <eot> last, zero padded): = transformers' ``CLIPTokenizer`` of any
  OpenAI/LAION CLIP folder (``clip_bpe_tokenizer`` builds it from the .gz) up to open_clip's ftfy
  clean-up; the padding id does not matter (causal mask, pooled at the first <eot>).

ImageReward (THUDM/ImageReward, ``ImageReward/ImageReward.py``, ``ImageReward/utils.py``):
- Checkpoint ``ImageReward.pt``: a FLAT state dict loaded with ``strict=False`` into
  ``ImageReward``: ``blip.visual_encoder.*`` (BLIP ``models/vit.py``, timm layout: ``cls_token``,
  ``pos_embed``, ``patch_embed.proj`` (with bias), ``blocks.N.{norm1, attn.qkv, attn.proj, norm2,
  mlp.fc1, mlp.fc2}``, ``norm``; ViT-L/16 ``create_vit('large')``: width 1024, 24 layers, 16 heads,
  qkv bias, GELU, LayerNorm eps 1e-6, output = ``norm`` of all tokens), ``blip.text_encoder.*`` (BLIP
  ``med.py`` ``BertModel(add_pooling_layer=False)`` from ``med_config.json``: BERT-base, 12 layers,
  12 heads, GELU, eps 1e-12, vocab 30524, word + position embeddings (no token types), post-LN
  layers with a cross-attention block between self-attention and feed-forward, key/value of width
  ``encoder_width`` = 1024), ``blip.vision_proj`` / ``blip.text_proj`` (unused; ignored here), the
  persistent ``embeddings.position_ids`` buffer (ignored), and ``mlp.layers.{0,2,4,6,7}``.
- Head (``MLP(768)``): Linear(768, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2),
  Linear(128, 64), Dropout(0.1), Linear(64, 16), Linear(16, 1) — the ReLUs are commented out: no
  activation at all (an affine map, kept layer by layer).
- Score (``ImageReward.score`` / ``inference_rank``): ``image_embeds = visual_encoder(image)``;
  ``text_encoder(ids, attention_mask, encoder_hidden_states=image_embeds,
  encoder_attention_mask=ones)`` (bidirectional, mode 'multimodal'); feature =
  ``last_hidden_state[:, 0]`` (the first token, [CLS]); ``reward = (mlp(feature) - 0.16717362830052426)
  / 1.0333394966054072``.
- Tokens: BLIP's ``init_tokenizer`` (``bert-base-uncased`` + bos ``[DEC]`` (30522) + additional
  special ``[ENC]`` (30523)); ``padding='max_length', truncation=True, max_length=35``. The first
  token is NOT replaced by ``enc_token_id`` (unlike BLIP's ITM): it stays [CLS], in inference and in
  ``train/src/ImageReward.py`` ``encode_data`` alike.
- Pre-processing (``_transform(224)``): torchvision ``Resize(224, BICUBIC)`` on the PIL image
  (shorter side 224, longer ``int(224·long/short)``, PIL bicubic), ``CenterCrop(224)`` (offset
  ``int(round((n - 224) / 2))``, Python rounding), RGB, ``ToTensor``, OpenAI CLIP mean/std — CLIP's
  pre-processing, not BLIP's squash to 224 x 224.

PickScore (yuvalkirstain/PickScore, ``README.md``): ``yuvalkirstain/PickScore_v1`` is a
transformers ``CLIPModel`` (ViT-H/14) with the processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``
(CLIP pre-processing: PIL bicubic shorter side 224, centre crop, OpenAI mean/std = ``clip_preprocess``
here, equal to transformers' ``CLIPImageProcessorPil``; tokens padded, truncated to 77). Score =
``logit_scale.exp() · cos(get_image_features, get_text_features)``. Nothing to convert.

Conversion: open_clip CLIP -> ``CLIPModel`` (fused ``in_proj`` split into q/k/v, ``proj``/
``text_projection`` transposed, eos id = vocab − 1 so transformers pools where open_clip's argmax
does); BLIP -> ``BlipVisionModel`` (its ``qkv`` is fused in the same (3, heads, head_dim) order) +
``BlipTextModel`` (``is_decoder=True`` only to build the cross-attention layers; run
bidirectionally) + an ``nn.Sequential`` head with the original indices. Head counts are not in a
checkpoint: ``*_head_dim`` (ViT-H vision 80, everything else 64) give them. Key/shape problems
raise ``CheckpointError`` naming the keys. PyTorch: scorer process only.
"""
from __future__ import annotations

import gzip
import json
import math
import os
import re
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import (BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel, CLIPConfig,
                          CLIPModel, CLIPTokenizer)

from jaxedit.metrics.clip_metrics import CLIP_MEAN, CLIP_STD, clip_preprocess
from jaxedit.scorers.dreamsim import CheckpointError, _first, _load_hf

__all__ = ["HPSv2", "IMAGE_REWARD_MEAN", "IMAGE_REWARD_STD", "ImageReward", "PickScore", "blip_tokenizer",
           "clip_bpe_tokenizer", "hps_preprocess", "image_reward_preprocess", "image_reward_to_transformers",
           "open_clip_to_transformers", "CheckpointError"]

IMAGE_REWARD_MEAN = 0.16717362830052426  # ImageReward.py: self.mean / self.std
IMAGE_REWARD_STD = 1.0333394966054072
IMAGE_REWARD_HEAD = (1024, 128, 64, 16)  # MLP(768) hidden widths; Linear at indices 0, 2, 4, 6, 7
IMAGE_REWARD_DROPOUT = (0.2, 0.2, 0.1)
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


# ---------------------------------------------------------------------------- inputs
def _images(images) -> list[np.ndarray]:
    if isinstance(images, np.ndarray) and images.ndim != 4:
        raise ValueError(f"images: expected (B, H, W, 3) or a sequence of (H, W, 3), got shape {images.shape}")
    out = [np.asarray(im) for im in images]
    for im in out:
        if im.dtype != np.uint8 or im.ndim != 3 or im.shape[-1] != 3:
            raise ValueError(f"images: expected uint8 (H, W, 3) RGB, got {im.dtype} {im.shape}")
    return out


def _prompts(prompts, n: int) -> list[str]:
    prompts = [prompts] * n if isinstance(prompts, str) else [str(p) for p in prompts]
    if len(prompts) != n:
        raise ValueError(f"prompts: expected one per image ({n}) or a single string, got {len(prompts)}")
    return prompts


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def hps_preprocess(images, size: int = 224, antialias: bool = True) -> torch.Tensor:
    """HPSv2's ``preprocess_val`` (``ResizeMaxSize``): uint8 RGB images -> float32 (B, 3, size, size):
    [0, 1] tensor, bicubic resize of the longer side to `size` (aspect kept), zero padding centred
    (left/top ``pad // 2``), then OpenAI CLIP mean/std. ``antialias``: torchvision >= 0.17 (True) or
    older (False)."""
    out = []
    for im in _images(images):
        x = torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1).float().div(255.0)
        h, w = x.shape[1:]
        scale = size / float(max(h, w))
        if scale != 1.0:
            nh, nw = round(h * scale), round(w * scale)
            x = F.interpolate(x[None], size=(nh, nw), mode="bicubic", align_corners=False, antialias=antialias)[0]
        ph, pw = size - x.shape[1], size - x.shape[2]
        if ph or pw:
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
        out.append(x)
    return _normalize(torch.stack(out))


def image_reward_preprocess(images, size: int = 224) -> torch.Tensor:
    """ImageReward's ``_transform``: torchvision ``Resize(size, BICUBIC)`` on PIL (shorter side),
    ``CenterCrop(size)`` (torchvision's rounding), ``ToTensor``, CLIP mean/std -> (B, 3, size, size)."""
    out = []
    for im in _images(images):
        h, w = im.shape[:2]
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(size * long / short)
        nw, nh = (size, new_long) if w <= h else (new_long, size)
        if (nh, nw) != (h, w):
            im = np.asarray(Image.fromarray(im).resize((nw, nh), Image.BICUBIC))
        top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
        out.append(im[top:top + size, left:left + size])
    x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float().div(255.0)
    return _normalize(x)


# ---------------------------------------------------------------------------- tokenizers
def _byte_alphabet() -> list[str]:
    """CLIP's ``bytes_to_unicode().values()`` in its dict order: printable bytes first, then the others."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = [chr(b) for b in bs]
    n = 0
    for b in range(256):
        if b not in bs:
            cs.append(chr(256 + n))
            n += 1
    return cs


def clip_bpe_tokenizer(path: str, model_max_length: int = 77) -> CLIPTokenizer:
    """open_clip's / OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` -> the equivalent ``CLIPTokenizer``
    (vocabulary built as ``SimpleTokenizer``: 256 bytes, the same with ``</w>``, the 48894 merges,
    <|startoftext|>, <|endoftext|> = 49406, 49407)."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1] if m.strip()]
    alphabet = _byte_alphabet()
    vocab = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges, model_max_length=model_max_length)


def _clip_tokenizer(tokenizer, near: str, max_length: int):
    if tokenizer is None:
        folder = os.path.dirname(os.path.abspath(near))
        for cand in (os.path.join(folder, BPE_FILE), os.path.join(folder, "tokenizer")):
            if os.path.exists(cand):
                tokenizer = cand
                break
        else:
            raise FileNotFoundError(f"HPSv2: no tokenizer given and neither {BPE_FILE} nor tokenizer/ next to {near}; "
                                    "pass tokenizer= (a CLIP tokenizer folder, e.g. a download of "
                                    f"laion/CLIP-ViT-H-14-laion2B-s32B-b79K, or open_clip's {BPE_FILE})")
    if isinstance(tokenizer, str):
        if tokenizer.endswith(".gz"):
            return clip_bpe_tokenizer(tokenizer, max_length)
        return CLIPTokenizer.from_pretrained(tokenizer, local_files_only=True)
    return tokenizer


def blip_tokenizer(tokenizer) -> BertTokenizer:
    """BLIP's ``init_tokenizer``: a bert-base-uncased tokenizer (folder or object) + bos ``[DEC]`` and
    additional special ``[ENC]`` (added only where missing: a BLIP folder already has them)."""
    tok = BertTokenizer.from_pretrained(tokenizer, local_files_only=True) if isinstance(tokenizer, str) else tokenizer
    unk = tok.unk_token_id
    if tok.convert_tokens_to_ids("[DEC]") in (None, unk):
        tok.add_special_tokens({"bos_token": "[DEC]"})
    if tok.convert_tokens_to_ids("[ENC]") in (None, unk):
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


# ---------------------------------------------------------------------------- key checks
def _unwrap(obj, what: str) -> dict:
    sd = obj
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{what}: expected a state dict of tensors (or {{'state_dict': ...}}), "
                              f"got {type(obj).__name__}")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _layers(sd: dict, prefix: str) -> int:
    idx = [int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))]
    return max(idx) + 1 if idx else 0


def _check_names(sd: dict, names: list[str], what: str, ignore: str | None = None, extra: list[str] = ()) -> None:
    names = set(names)
    missing = names - set(sd)
    unexpected = {k for k in sd if k not in names and not (ignore and re.fullmatch(ignore, k))}
    if missing or unexpected or extra:
        raise CheckpointError(f"{what}: " + "; ".join(
            ([f"missing keys: {_first(missing)}"] if missing else [])
            + ([f"unexpected keys: {_first(unexpected)}"] if unexpected else []) + list(extra)))


def _check_shapes(sd: dict, shapes: dict, what: str) -> None:
    bad = [f"{k}: {tuple(sd[k].shape)}, expected {tuple(s)}" for k, s in sorted(shapes.items())
           if tuple(sd[k].shape) != tuple(s)]
    if bad:
        raise CheckpointError(f"{what}: shape mismatch: " + "; ".join(bad[:5])
                              + (f"; ... ({len(bad)} in all)" if len(bad) > 5 else ""))


def _heads(width: int, head_dim: int, what: str) -> int:
    if width % head_dim:
        raise CheckpointError(f"{what}: width {width} is not a multiple of head_dim {head_dim}")
    return width // head_dim


def _grid(tokens: int, key: str, what: str) -> int:
    grid = math.isqrt(max(tokens - 1, 0))
    if tokens != grid * grid + 1:
        raise CheckpointError(f"{what}: {key} has {tokens} rows, not 1 + a square number of patches")
    return grid


# ---------------------------------------------------------------------------- open_clip -> CLIPModel
_RES = ("ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
        "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
        "mlp.c_proj.bias")


def _res_shapes(p: str, w: int, m: int) -> dict:
    return {p + "ln_1.weight": (w,), p + "ln_1.bias": (w,), p + "attn.in_proj_weight": (3 * w, w),
            p + "attn.in_proj_bias": (3 * w,), p + "attn.out_proj.weight": (w, w), p + "attn.out_proj.bias": (w,),
            p + "ln_2.weight": (w,), p + "ln_2.bias": (w,), p + "mlp.c_fc.weight": (m, w), p + "mlp.c_fc.bias": (m,),
            p + "mlp.c_proj.weight": (w, m), p + "mlp.c_proj.bias": (w,)}


def _res_to_clip(sd: dict, src: str, dst: str) -> dict:
    out = {}
    for pb, fused in (("weight", "attn.in_proj_weight"), ("bias", "attn.in_proj_bias")):
        for name, t in zip(("q_proj", "k_proj", "v_proj"), sd[src + fused].chunk(3, dim=0)):
            out[dst + f"self_attn.{name}.{pb}"] = t
        for ours, theirs in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                             ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            out[dst + f"{ours}.{pb}"] = sd[src + f"{theirs}.{pb}"]
    return out


def clip_config(*, width: int, layers: int, heads: int, mlp: int, patch: int, image: int, text_width: int,
                text_layers: int, text_heads: int, text_mlp: int, vocab: int, context: int, embed: int,
                act: str = "gelu") -> CLIPConfig:
    """An open_clip CLIP as a transformers ``CLIPConfig`` (eps 1e-5; eos = vocab − 1, bos = vocab − 2)."""
    text = dict(vocab_size=vocab, hidden_size=text_width, intermediate_size=text_mlp, num_hidden_layers=text_layers,
                num_attention_heads=text_heads, max_position_embeddings=context, hidden_act=act,
                layer_norm_eps=1e-5, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=0,
                projection_dim=embed)
    vision = dict(hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads,
                  image_size=image, patch_size=patch, hidden_act=act, layer_norm_eps=1e-5, projection_dim=embed)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=embed)


def open_clip_to_transformers(sd: dict, *, vision_head_dim: int = 80, text_head_dim: int = 64, act: str = "gelu",
                              what: str = "open_clip CLIP") -> CLIPModel:
    """A full open_clip ``CLIP`` state dict (``visual.*``, ``token_embedding``, ``positional_embedding``,
    ``transformer.resblocks.N.*``, ``ln_final``, ``text_projection``, ``logit_scale``; a stale
    ``attn_mask`` buffer ignored) -> ``CLIPModel``. Defaults: ViT-H-14 heads (80 / 64 per head)."""
    sd = _unwrap(sd, what)
    lv, lt = _layers(sd, "visual.transformer.resblocks."), _layers(sd, "transformer.resblocks.")
    names = ["visual." + k for k in ("conv1.weight", "class_embedding", "positional_embedding", "ln_pre.weight",
                                     "ln_pre.bias", "ln_post.weight", "ln_post.bias", "proj")]
    names += [f"visual.transformer.resblocks.{i}.{k}" for i in range(lv) for k in _RES]
    names += ["token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
              "text_projection", "logit_scale"]
    names += [f"transformer.resblocks.{i}.{k}" for i in range(lt) for k in _RES]
    _check_names(sd, names, what, ignore=r"(visual\.)?attn_mask",
                 extra=(["no visual.transformer.resblocks.N.*"] if lv == 0 else [])
                 + (["no transformer.resblocks.N.* (text)"] if lt == 0 else []))
    conv = sd["visual.conv1.weight"]
    w, patch = conv.shape[0], conv.shape[-1]
    tokens = sd["visual.positional_embedding"].shape[0]
    grid = _grid(tokens, "visual.positional_embedding", what)
    m = sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    embed = sd["visual.proj"].shape[-1]
    vocab, wt = sd["token_embedding.weight"].shape
    context = sd["positional_embedding"].shape[0]
    mt = sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    shapes = {"visual.conv1.weight": (w, 3, patch, patch), "visual.class_embedding": (w,),
              "visual.positional_embedding": (tokens, w), "visual.ln_pre.weight": (w,), "visual.ln_pre.bias": (w,),
              "visual.ln_post.weight": (w,), "visual.ln_post.bias": (w,), "visual.proj": (w, embed),
              "positional_embedding": (context, wt), "ln_final.weight": (wt,), "ln_final.bias": (wt,),
              "text_projection": (wt, embed), "logit_scale": ()}
    for i in range(lv):
        shapes.update(_res_shapes(f"visual.transformer.resblocks.{i}.", w, m))
    for i in range(lt):
        shapes.update(_res_shapes(f"transformer.resblocks.{i}.", wt, mt))
    _check_shapes(sd, shapes, what)

    v, t = "vision_model.", "text_model."
    new = {v + "embeddings.class_embedding": sd["visual.class_embedding"],
           v + "embeddings.patch_embedding.weight": conv,
           v + "embeddings.position_embedding.weight": sd["visual.positional_embedding"],
           v + "pre_layrnorm.weight": sd["visual.ln_pre.weight"], v + "pre_layrnorm.bias": sd["visual.ln_pre.bias"],
           v + "post_layernorm.weight": sd["visual.ln_post.weight"],
           v + "post_layernorm.bias": sd["visual.ln_post.bias"],
           "visual_projection.weight": sd["visual.proj"].t().contiguous(),
           t + "embeddings.token_embedding.weight": sd["token_embedding.weight"],
           t + "embeddings.position_embedding.weight": sd["positional_embedding"],
           t + "final_layer_norm.weight": sd["ln_final.weight"], t + "final_layer_norm.bias": sd["ln_final.bias"],
           "text_projection.weight": sd["text_projection"].t().contiguous(), "logit_scale": sd["logit_scale"]}
    for i in range(lv):
        new.update(_res_to_clip(sd, f"visual.transformer.resblocks.{i}.", v + f"encoder.layers.{i}."))
    for i in range(lt):
        new.update(_res_to_clip(sd, f"transformer.resblocks.{i}.", t + f"encoder.layers.{i}."))
    cfg = clip_config(width=w, layers=lv, heads=_heads(w, vision_head_dim, what), mlp=m, patch=patch,
                      image=grid * patch, text_width=wt, text_layers=lt, text_heads=_heads(wt, text_head_dim, what),
                      text_mlp=mt, vocab=vocab, context=context, embed=embed, act=act)
    return _load_hf(CLIPModel(cfg), new, what)


# ---------------------------------------------------------------------------- BLIP (ImageReward) -> transformers
_VB = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
       "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")
_ATT = ("self.query", "self.key", "self.value", "output.dense", "output.LayerNorm")
_TL = tuple(f"{a}.{n}.{pb}" for a in ("attention", "crossattention") for n in _ATT for pb in ("weight", "bias")) + \
    ("intermediate.dense.weight", "intermediate.dense.bias", "output.dense.weight", "output.dense.bias",
     "output.LayerNorm.weight", "output.LayerNorm.bias")
_HEAD_IDX = (0, 2, 4, 6, 7)
_IR_IGNORE = r"blip\.text_encoder\.embeddings\.position_ids|blip\.(vision|text)_proj\.(weight|bias)"


def image_reward_head(dims: Sequence[int], dropout: Sequence[float] = IMAGE_REWARD_DROPOUT) -> nn.Sequential:
    """ImageReward's ``MLP.layers``: Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear
    (no activations); dims = (in, h1, h2, h3, h4) and a final Linear(h4, 1)."""
    d = list(dims) + [1]
    mods: list[nn.Module] = []
    for i in range(5):
        mods.append(nn.Linear(d[i], d[i + 1]))
        if i < 3:
            mods.append(nn.Dropout(dropout[i]))
    return nn.Sequential(*mods)


def blip_configs(*, width: int, layers: int, heads: int, mlp: int, patch: int, image: int, text_width: int,
                 text_layers: int, text_heads: int, text_mlp: int, vocab: int, positions: int,
                 text_eps: float = 1e-12, act: str = "gelu") -> tuple[BlipVisionConfig, BlipTextConfig]:
    vision = BlipVisionConfig(hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers,
                              num_attention_heads=heads, image_size=image, patch_size=patch, hidden_act="gelu",
                              layer_norm_eps=1e-6)
    text = BlipTextConfig(vocab_size=vocab, hidden_size=text_width, encoder_hidden_size=width,
                          intermediate_size=text_mlp, num_hidden_layers=text_layers, num_attention_heads=text_heads,
                          max_position_embeddings=positions, hidden_act=act, layer_norm_eps=text_eps, pad_token_id=0,
                          bos_token_id=vocab - 2)  # BLIP: [DEC] = 30522 of 30524
    text.is_decoder = True  # builds the cross-attention layers; BlipTextModel still runs bidirectionally
    return vision, text


def image_reward_to_transformers(sd: dict, *, vision_head_dim: int = 64, text_head_dim: int = 64,
                                 text_eps: float = 1e-12, text_act: str = "gelu", what: str = "ImageReward"
                                 ) -> tuple[BlipVisionModel, BlipTextModel, nn.Sequential]:
    """ImageReward's flat state dict (``blip.visual_encoder.*``, ``blip.text_encoder.*``, ``mlp.layers.*``;
    ``blip.vision_proj``/``text_proj`` and ``position_ids`` ignored) -> (BlipVisionModel,
    BlipTextModel with cross-attention, head)."""
    sd = _unwrap(sd, what)
    ve, te = "blip.visual_encoder.", "blip.text_encoder."
    lv, lt = _layers(sd, ve + "blocks."), _layers(sd, te + "encoder.layer.")
    names = [ve + k for k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
                              "norm.weight", "norm.bias")]
    names += [f"{ve}blocks.{i}.{k}" for i in range(lv) for k in _VB]
    names += [te + "embeddings." + k for k in ("word_embeddings.weight", "position_embeddings.weight",
                                               "LayerNorm.weight", "LayerNorm.bias")]
    names += [f"{te}encoder.layer.{i}.{k}" for i in range(lt) for k in _TL]
    names += [f"mlp.layers.{i}.{pb}" for i in _HEAD_IDX for pb in ("weight", "bias")]
    _check_names(sd, names, what, ignore=_IR_IGNORE,
                 extra=(["no blip.visual_encoder.blocks.N.*"] if lv == 0 else [])
                 + (["no blip.text_encoder.encoder.layer.N.*"] if lt == 0 else []))
    pw = sd[ve + "patch_embed.proj.weight"]
    w, patch = pw.shape[0], pw.shape[-1]
    tokens = sd[ve + "pos_embed"].shape[-2]
    grid = _grid(tokens, ve + "pos_embed", what)
    m = sd[ve + "blocks.0.mlp.fc1.weight"].shape[0]
    vocab, wt = sd[te + "embeddings.word_embeddings.weight"].shape
    positions = sd[te + "embeddings.position_embeddings.weight"].shape[0]
    mt = sd[te + "encoder.layer.0.intermediate.dense.weight"].shape[0]
    head = [sd[f"mlp.layers.{i}.weight"].shape[0] for i in _HEAD_IDX[:4]]
    shapes = {ve + "cls_token": (1, 1, w), ve + "pos_embed": (1, tokens, w), ve + "patch_embed.proj.weight":
              (w, 3, patch, patch), ve + "patch_embed.proj.bias": (w,), ve + "norm.weight": (w,),
              ve + "norm.bias": (w,), te + "embeddings.position_embeddings.weight": (positions, wt),
              te + "embeddings.LayerNorm.weight": (wt,), te + "embeddings.LayerNorm.bias": (wt,)}
    for i in range(lv):
        p = f"{ve}blocks.{i}."
        shapes.update({p + "norm1.weight": (w,), p + "norm1.bias": (w,), p + "attn.qkv.weight": (3 * w, w),
                       p + "attn.qkv.bias": (3 * w,), p + "attn.proj.weight": (w, w), p + "attn.proj.bias": (w,),
                       p + "norm2.weight": (w,), p + "norm2.bias": (w,), p + "mlp.fc1.weight": (m, w),
                       p + "mlp.fc1.bias": (m,), p + "mlp.fc2.weight": (w, m), p + "mlp.fc2.bias": (w,)})
    for i in range(lt):
        p = f"{te}encoder.layer.{i}."
        for a in ("attention", "crossattention"):
            kv = w if a == "crossattention" else wt
            shapes.update({p + f"{a}.self.query.weight": (wt, wt), p + f"{a}.self.key.weight": (wt, kv),
                           p + f"{a}.self.value.weight": (wt, kv), p + f"{a}.output.dense.weight": (wt, wt)})
            shapes.update({p + f"{a}.{n}.bias": (wt,) for n in _ATT})
            shapes[p + f"{a}.output.LayerNorm.weight"] = (wt,)
        shapes.update({p + "intermediate.dense.weight": (mt, wt), p + "intermediate.dense.bias": (mt,),
                       p + "output.dense.weight": (wt, mt), p + "output.dense.bias": (wt,),
                       p + "output.LayerNorm.weight": (wt,), p + "output.LayerNorm.bias": (wt,)})
    dims = [wt] + head + [1]
    for j, i in enumerate(_HEAD_IDX):
        shapes.update({f"mlp.layers.{i}.weight": (dims[j + 1], dims[j]), f"mlp.layers.{i}.bias": (dims[j + 1],)})
    _check_shapes(sd, shapes, what)

    vnew = {"embeddings.class_embedding": sd[ve + "cls_token"], "embeddings.position_embedding": sd[ve + "pos_embed"],
            "embeddings.patch_embedding.weight": pw,
            "embeddings.patch_embedding.bias": sd[ve + "patch_embed.proj.bias"],
            "post_layernorm.weight": sd[ve + "norm.weight"], "post_layernorm.bias": sd[ve + "norm.bias"]}
    for i in range(lv):
        p, q = f"{ve}blocks.{i}.", f"encoder.layers.{i}."
        for ours, theirs in (("self_attn.qkv", "attn.qkv"), ("self_attn.projection", "attn.proj"),
                             ("layer_norm1", "norm1"), ("layer_norm2", "norm2"), ("mlp.fc1", "mlp.fc1"),
                             ("mlp.fc2", "mlp.fc2")):
            for pb in ("weight", "bias"):
                vnew[q + f"{ours}.{pb}"] = sd[p + f"{theirs}.{pb}"]
    tnew = {k[len(te):]: v for k, v in sd.items() if k.startswith(te) and not k.endswith("position_ids")}
    hnew = {f"{i}.{pb}": sd[f"mlp.layers.{i}.{pb}"] for i in _HEAD_IDX for pb in ("weight", "bias")}
    vcfg, tcfg = blip_configs(width=w, layers=lv, heads=_heads(w, vision_head_dim, what), mlp=m, patch=patch,
                              image=grid * patch, text_width=wt, text_layers=lt,
                              text_heads=_heads(wt, text_head_dim, what), text_mlp=mt, vocab=vocab,
                              positions=positions, text_eps=text_eps, act=text_act)
    vision = _load_hf(BlipVisionModel(vcfg), vnew, what + " (visual_encoder)")
    text = _load_hf(BlipTextModel(tcfg, add_pooling_layer=False), tnew, what + " (text_encoder)")
    return vision, text, _load_hf(image_reward_head([wt] + head), hnew, what + " (mlp)")


# ---------------------------------------------------------------------------- the models
class _Preference(nn.Module):
    """score(images, prompts) -> float32 (B,), higher is better; batched, inference mode."""

    batch_size = 16

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _score(self, images: list[np.ndarray], prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def score(self, images, prompts: str | Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """images: uint8 (B, H, W, 3) or a sequence of uint8 (H, W, 3) of any sizes; prompts: one per
        image, or one string for all -> float32 (B,)."""
        images = _images(images)
        prompts = _prompts(prompts, len(images))
        bs = batch_size or self.batch_size
        was_training = self.training
        self.eval()
        out = [self._score(images[i:i + bs], prompts[i:i + bs]).float().cpu().numpy()
               for i in range(0, len(images), bs)]
        self.train(was_training)
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0,), np.float32)


class _ClipPreference(_Preference):
    def __init__(self, model: CLIPModel, tokenizer, batch_size: int = 16):
        super().__init__()
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
        self.image_size = int(model.config.vision_config.image_size)
        self.max_length = int(model.config.text_config.max_position_embeddings)
        eos = model.config.text_config.eos_token_id
        if eos != 2 and tokenizer.eos_token_id != eos:
            raise ValueError(f"tokenizer eos id {tokenizer.eos_token_id} != the text model's eos_token_id {eos}")
        if len(tokenizer) > model.config.text_config.vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens, the text model "
                             f"{model.config.text_config.vocab_size}")

    def embeddings(self, pixel_values: torch.Tensor, prompts: list[str], padding) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit-norm projected (image, text) embeddings."""
        dev = self.device
        tok = self.tokenizer(prompts, padding=padding, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        img = self.model.get_image_features(pixel_values=pixel_values.to(dev)).pooler_output.float()
        txt = self.model.get_text_features(input_ids=tok["input_ids"].to(dev),
                                           attention_mask=tok["attention_mask"].to(dev)).pooler_output.float()
        return F.normalize(img, dim=-1), F.normalize(txt, dim=-1)


class HPSv2(_ClipPreference):
    """HPSv2 / v2.1: cos(image, prompt) of the fine-tuned OpenCLIP ViT-H-14 (see the module docstring).
    ``antialias``: the bicubic resize of ``ResizeMaxSize`` (torchvision >= 0.17: True)."""

    def __init__(self, model: CLIPModel, tokenizer, *, antialias: bool = True, batch_size: int = 16):
        super().__init__(model, tokenizer, batch_size)
        self.antialias = antialias

    def preprocess(self, images) -> torch.Tensor:
        return hps_preprocess(images, self.image_size, self.antialias)

    def _score(self, images, prompts):
        img, txt = self.embeddings(self.preprocess(images), prompts, "max_length")
        return (img * txt).sum(-1)

    @classmethod
    def from_original(cls, path: str, tokenizer=None, *, vision_head_dim: int = 80, text_head_dim: int = 64,
                      **kwargs) -> "HPSv2":
        """From ``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt`` (or a folder holding one: v2.1
        preferred). tokenizer: a CLIP tokenizer (object or folder) or open_clip's ``bpe_simple_vocab_16e6
        .txt.gz``; default: that file or a ``tokenizer/`` folder next to the checkpoint."""
        if os.path.isdir(path):
            found = [os.path.join(path, f) for f in (HPS_FILES["v2.1"], HPS_FILES["v2.0"])
                     if os.path.isfile(os.path.join(path, f))]
            if not found:
                raise FileNotFoundError(f"HPSv2: none of {sorted(HPS_FILES.values())} in {path}")
            path = found[0]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"HPSv2: no file {path}")
        model = open_clip_to_transformers(torch.load(path, map_location="cpu", weights_only=True),
                                          vision_head_dim=vision_head_dim, text_head_dim=text_head_dim, what=path)
        tok = _clip_tokenizer(tokenizer, path, model.config.text_config.max_position_embeddings)
        return cls(model, tok, **kwargs)

    @classmethod
    def tiny(cls, seed: int = 0, **kwargs) -> "HPSv2":
        """Random: vision 2 layers of 160 (2 heads of 80), 56 px, patch 14; text 2 layers of 128 (2 heads
        of 64), 77 positions; embed 32; ``clip_metrics.tiny_tokenizer``."""
        from jaxedit.metrics.clip_metrics import tiny_tokenizer
        tok = tiny_tokenizer()
        torch.manual_seed(seed)
        cfg = clip_config(width=160, layers=2, heads=2, mlp=320, patch=14, image=56, text_width=128, text_layers=2,
                          text_heads=2, text_mlp=256, vocab=len(tok), context=77, embed=32)
        return cls(CLIPModel(cfg).eval(), tok, **kwargs)


class PickScore(_ClipPreference):
    """PickScore v1: logit_scale.exp() · cos(image, prompt) of ``yuvalkirstain/PickScore_v1``."""

    def preprocess(self, images) -> torch.Tensor:
        return torch.from_numpy(clip_preprocess(images, self.image_size))

    def _score(self, images, prompts):
        img, txt = self.embeddings(self.preprocess(images), prompts, True)
        return self.model.logit_scale.exp().float() * (img * txt).sum(-1)

    @classmethod
    def from_pretrained(cls, path: str, processor_path: str | None = None, **kwargs) -> "PickScore":
        """A local download of yuvalkirstain/PickScore_v1; tokenizer from `processor_path` (a download of
        laion/CLIP-ViT-H-14-laion2B-s32B-b79K, as PickScore's README) or `path`."""
        model = CLIPModel.from_pretrained(path, local_files_only=True)
        return cls(model, CLIPTokenizer.from_pretrained(processor_path or path, local_files_only=True), **kwargs)

    @classmethod
    def tiny(cls, seed: int = 0, **kwargs) -> "PickScore":
        from jaxedit.metrics.clip_metrics import tiny_model, tiny_tokenizer
        tok = tiny_tokenizer()
        return cls(tiny_model(tok, seed).eval(), tok, **kwargs)


class ImageReward(_Preference):
    """ImageReward v1.0: (mlp(text_encoder([CLS] prompt | image tokens)[0]) − mean) / std."""

    def __init__(self, vision: BlipVisionModel, text: BlipTextModel, head: nn.Sequential, tokenizer, *,
                 max_text_len: int = 35, mean: float = IMAGE_REWARD_MEAN, std: float = IMAGE_REWARD_STD,
                 batch_size: int = 16):
        super().__init__()
        if text.config.encoder_hidden_size != vision.config.hidden_size:
            raise ValueError(f"text encoder_hidden_size {text.config.encoder_hidden_size} != vision hidden_size "
                             f"{vision.config.hidden_size}")
        if len(tokenizer) > text.config.vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens, the text encoder {text.config.vocab_size}")
        self.vision, self.text, self.head = vision.eval(), text.eval(), head.eval()
        self.tokenizer, self.max_text_len, self.batch_size = tokenizer, max_text_len, batch_size
        self.mean, self.std = float(mean), float(std)
        self.image_size = int(vision.config.image_size)

    def preprocess(self, images) -> torch.Tensor:
        return image_reward_preprocess(images, self.image_size)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        dev = self.device
        img = self.vision(pixel_values=pixel_values.to(dev)).last_hidden_state
        ones = torch.ones(img.shape[:2], dtype=torch.long, device=dev)
        h = self.text(input_ids=input_ids.to(dev), attention_mask=attention_mask.to(dev),
                      encoder_hidden_states=img, encoder_attention_mask=ones).last_hidden_state[:, 0].float()
        return (self.head(h).squeeze(-1) - self.mean) / self.std

    def _score(self, images, prompts):
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_text_len,
                             return_tensors="pt")
        return self(self.preprocess(images), tok["input_ids"], tok["attention_mask"])

    @classmethod
    def from_original(cls, path: str, tokenizer, *, med_config: str | dict | None = None,
                      vision_head_dim: int = 64, **kwargs) -> "ImageReward":
        """From ``ImageReward.pt`` (or a folder holding it). tokenizer: a bert-base-uncased tokenizer
        (folder or object; [DEC]/[ENC] added as BLIP). ``med_config`` (default: ``med_config.json`` next to
        the checkpoint, if any) gives the text heads, eps and activation; else BERT-base's."""
        if os.path.isdir(path):
            path = os.path.join(path, "ImageReward.pt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"ImageReward: no file {path}")
        if med_config is None and os.path.isfile(os.path.join(os.path.dirname(path), "med_config.json")):
            med_config = os.path.join(os.path.dirname(path), "med_config.json")
        if isinstance(med_config, str):
            with open(med_config) as f:
                med_config = json.load(f)
        med = med_config or {}
        sd = torch.load(path, map_location="cpu", weights_only=True)
        width = _unwrap(sd, path).get("blip.text_encoder.embeddings.word_embeddings.weight")
        text_head_dim = 64
        if "num_attention_heads" in med and width is not None:
            text_head_dim = width.shape[1] // int(med["num_attention_heads"])
        vision, text, head = image_reward_to_transformers(
            sd, vision_head_dim=vision_head_dim, text_head_dim=text_head_dim,
            text_eps=float(med.get("layer_norm_eps", 1e-12)), text_act=med.get("hidden_act", "gelu"), what=path)
        return cls(vision, text, head, blip_tokenizer(tokenizer), **kwargs)

    @classmethod
    def tiny(cls, seed: int = 0, **kwargs) -> "ImageReward":
        """Random: vision 2 layers of 128 (2 heads), 32 px, patch 8; text 2 layers of 128 (2 heads), 40
        positions; head 128 -> 64 -> 32 -> 16 -> 8 -> 1; ``reward_model.tiny_tokenizer`` + [DEC]/[ENC]."""
        from jaxedit.scorers.reward_model import tiny_tokenizer
        tok = blip_tokenizer(tiny_tokenizer())
        torch.manual_seed(seed)
        vcfg, tcfg = blip_configs(width=128, layers=2, heads=2, mlp=256, patch=8, image=32, text_width=128,
                                  text_layers=2, text_heads=2, text_mlp=256, vocab=len(tok), positions=40)
        return cls(BlipVisionModel(vcfg), BlipTextModel(tcfg, add_pooling_layer=False),
                   image_reward_head((128, 64, 32, 16, 8)), tok, **kwargs)
