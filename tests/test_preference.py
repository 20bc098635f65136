"""Preference scores (HPSv2, ImageReward, PickScore) from transformers classes.

HPSv2 and ImageReward: a tiny RANDOM state dict in each ORIGINAL format (open_clip CLIP under
{"state_dict": ...}; ImageReward's flat ``blip.*`` / ``mlp.*`` dict), saved as the original loader
expects, converted, and scored against a plain-torch transcription of the original forward
(open_clip ViT + causal text transformer with argmax pooling; BLIP ViT + med.py BERT with
cross-attention and -10000 masks + the MLP head) run on the original-format dict, on real photos.
PickScore: equals a direct transformers computation on ``CLIPImageProcessorPil`` inputs.
Tolerance (fp32): rtol 1e-5 with atol 1e-5 (HPS cosines can be near 0).
"""
import gzip
import math
import re
from pathlib import Path

import numpy as np
import pytest
from skimage import data

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from jaxedit.metrics.clip_metrics import CLIP_MEAN, CLIP_STD, tiny_tokenizer  # noqa: E402
from jaxedit.scorers.preference import (HPSv2, IMAGE_REWARD_MEAN, IMAGE_REWARD_STD, CheckpointError,  # noqa: E402
                                        ImageReward, PickScore, blip_tokenizer, clip_bpe_tokenizer,
                                        image_reward_to_transformers, open_clip_to_transformers)
from jaxedit.scorers.reward_model import tiny_tokenizer as bert_tiny_tokenizer  # noqa: E402

RTOL, ATOL = 1e-5, 1e-5
PROMPTS = ["an astronaut in a white suit", "a cat", "a cup of coffee on a table, photographed from above", "rocket"]


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def photos():
    """Real photos of four sizes/aspects. 100x110 -> 32x35 in ImageReward's tiny resize: a crop margin
    of 3, where torchvision's round(1.5) = 2 differs from floor."""
    return [data.astronaut()[:400:4, :440:4], data.chelsea(), data.coffee()[:, 100:300], data.rocket()[::3, ::3][:141]]


def _rand(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g) * scale


def _ln(g, sd, name, w):
    sd[name + ".weight"], sd[name + ".bias"] = 1 + _rand(g, w, scale=0.1), _rand(g, w, scale=0.1)


def _lin(g, sd, name, n_out, n_in):
    sd[name + ".weight"], sd[name + ".bias"] = _rand(g, n_out, n_in, scale=n_in ** -0.5), _rand(g, n_out, scale=0.1)


def _norm(x):
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def _mha(x, src, wq, bq, wk, bk, wv, bv, heads, add_mask=None):
    """Plain multi-head attention: softmax(q kᵀ / sqrt(d) + mask) v."""
    b, n, c = x.shape
    q, k, v = F.linear(x, wq, bq), F.linear(src, wk, bk), F.linear(src, wv, bv)
    q, k, v = (t.reshape(b, t.shape[1], heads, c // heads).transpose(1, 2) for t in (q, k, v))
    s = q @ k.transpose(-1, -2) / math.sqrt(c // heads)
    if add_mask is not None:
        s = s + add_mask
    return (s.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)


# ====================================================================== HPSv2 (open_clip ViT-H-14 layout)
VW, VL, VMLP, P, S = 160, 2, 320, 14, 56        # vision: 2 heads of 80 (ViT-H's head width), 4x4 patches
TW, TL, TMLP, CTX, EMB = 128, 2, 256, 32, 24     # text: 2 heads of 64; 32 positions (prompts get truncated)


def open_clip_sd(seed, vocab):
    g = torch.Generator().manual_seed(seed)
    sd = {"visual.conv1.weight": _rand(g, VW, 3, P, P, scale=1 / math.sqrt(3 * P * P)),
          "visual.class_embedding": _rand(g, VW, scale=0.5),
          "visual.positional_embedding": _rand(g, (S // P) ** 2 + 1, VW, scale=0.5),
          "visual.proj": _rand(g, VW, EMB, scale=VW ** -0.5),
          "token_embedding.weight": _rand(g, vocab, TW, scale=0.5),
          "positional_embedding": _rand(g, CTX, TW, scale=0.3),
          "text_projection": _rand(g, TW, EMB, scale=TW ** -0.5), "logit_scale": torch.tensor(math.log(1 / 0.07))}
    _ln(g, sd, "visual.ln_pre", VW), _ln(g, sd, "visual.ln_post", VW), _ln(g, sd, "ln_final", TW)
    for prefix, w, m, layers in (("visual.transformer", VW, VMLP, VL), ("transformer", TW, TMLP, TL)):
        for i in range(layers):
            b = f"{prefix}.resblocks.{i}."
            _ln(g, sd, b + "ln_1", w), _ln(g, sd, b + "ln_2", w)
            sd[b + "attn.in_proj_weight"], sd[b + "attn.in_proj_bias"] = (_rand(g, 3 * w, w, scale=w ** -0.5),
                                                                            _rand(g, 3 * w, scale=0.1))
            _lin(g, sd, b + "attn.out_proj", w, w)
            _lin(g, sd, b + "mlp.c_fc", m, w)
            _lin(g, sd, b + "mlp.c_proj", w, m)
    return sd


def ref_resblocks(sd, prefix, x, layers, heads, mask=None):
    """open_clip Transformer: pre-LN residual blocks, nn.MultiheadAttention (fused in_proj), exact GELU."""
    c = x.shape[-1]
    for i in range(layers):
        b = f"{prefix}.resblocks.{i}."
        h = F.layer_norm(x, (c,), sd[b + "ln_1.weight"], sd[b + "ln_1.bias"], 1e-5)
        wq, wk, wv = sd[b + "attn.in_proj_weight"].chunk(3)
        bq, bk, bv = sd[b + "attn.in_proj_bias"].chunk(3)
        x = x + F.linear(_mha(h, h, wq, bq, wk, bk, wv, bv, heads, mask), sd[b + "attn.out_proj.weight"],
                         sd[b + "attn.out_proj.bias"])
        h = F.layer_norm(x, (c,), sd[b + "ln_2.weight"], sd[b + "ln_2.bias"], 1e-5)
        x = x + F.linear(F.gelu(F.linear(h, sd[b + "mlp.c_fc.weight"], sd[b + "mlp.c_fc.bias"])),
                         sd[b + "mlp.c_proj.weight"], sd[b + "mlp.c_proj.bias"])
    return x


def ref_encode_image(sd, x):
    """open_clip VisionTransformer: conv1 (no bias), [CLS] + pos, ln_pre, blocks, ln_post(CLS) @ proj."""
    t = F.conv2d(x, sd["visual.conv1.weight"], stride=P).flatten(2).transpose(1, 2)
    t = torch.cat([sd["visual.class_embedding"].expand(len(x), 1, -1), t], 1) + sd["visual.positional_embedding"]
    t = F.layer_norm(t, (VW,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"], 1e-5)
    t = ref_resblocks(sd, "visual.transformer", t, VL, VW // 80)
    pooled = F.layer_norm(t[:, 0], (VW,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"], 1e-5)
    return pooled @ sd["visual.proj"]


def ref_tokenize(tok, prompts):
    """open_clip ``tokenize``: [sot] + bpe + [eot], cut to CTX with eot last, ZERO padded."""
    out = torch.zeros(len(prompts), CTX, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids = [tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(ids) > CTX:
            ids = ids[:CTX]
            ids[-1] = tok.eos_token_id
        out[i, :len(ids)] = torch.tensor(ids)
    return out


def ref_encode_text(sd, ids):
    """open_clip CLIP.encode_text: token + pos, causal blocks, ln_final, [argmax(ids)] @ text_projection."""
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"]
    mask = torch.full((CTX, CTX), float("-inf")).triu(1)
    x = ref_resblocks(sd, "transformer", x, TL, TW // 64, mask)
    x = F.layer_norm(x, (TW,), sd["ln_final.weight"], sd["ln_final.bias"], 1e-5)
    return x[torch.arange(len(ids)), ids.argmax(-1)] @ sd["text_projection"]


def ref_hps_preprocess(img, size=S):
    """hpsv2 transform.py (val, resize_longest_max): ToTensor, ResizeMaxSize (tensor bicubic, antialias
    as torchvision >= 0.17, pad 0), Normalize."""
    x = torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 255
    height, width = x.shape[1:]
    scale = size / float(max(height, width))
    if scale != 1.0:
        new_size = tuple(round(d * scale) for d in (height, width))
        x = F.interpolate(x[None], size=new_size, mode="bicubic", align_corners=False, antialias=True)[0]
        pad_h, pad_w = size - new_size[0], size - new_size[1]
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])  # torchvision [l,t,r,b]
    return _norm(x[None])[0]


def ref_hps(sd, tok, imgs, prompts):
    """hpsv2 img_score.score: diag(normalised image_features @ normalised text_features.T)."""
    x = torch.stack([ref_hps_preprocess(im) for im in imgs])
    i = F.normalize(ref_encode_image(sd, x), dim=-1)
    t = F.normalize(ref_encode_text(sd, ref_tokenize(tok, prompts)), dim=-1)
    return torch.diagonal(i @ t.T).numpy()


@pytest.fixture(scope="module")
def hps_ckpt(tmp_path_factory):
    tok = tiny_tokenizer()
    sd = open_clip_sd(0, len(tok))
    path = tmp_path_factory.mktemp("hps") / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": sd}, path)                       # what hpsv2 reads: torch.load(cp)['state_dict']
    return str(path), sd, tok


def test_hpsv2_from_original_matches_reference(hps_ckpt):
    path, sd, tok = hps_ckpt
    m = HPSv2.from_original(path, tokenizer=tok)
    assert m.image_size == S and m.max_length == CTX
    assert m.model.config.vision_config.num_attention_heads == 2 and m.model.config.text_config.num_attention_heads == 2
    imgs = photos()
    assert len(tok(PROMPTS[2])["input_ids"]) > CTX              # one prompt is truncated
    for img in imgs:                                            # pre-processing alone: exact
        np.testing.assert_allclose(m.preprocess([img]).numpy(), ref_hps_preprocess(img)[None].numpy(), atol=1e-6)
    got = m.score(imgs, PROMPTS, batch_size=3)
    with torch.no_grad():
        ref = ref_hps(sd, tok, imgs, PROMPTS)
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)
    assert got.dtype == np.float32 and got.shape == (4,) and np.ptp(got) > 0.05
    # one prompt for all images, and a folder path
    one = m.score(np.stack([im[:50, :60] for im in imgs]), "a cat")
    with torch.no_grad():
        np.testing.assert_allclose(one, ref_hps(sd, tok, [im[:50, :60] for im in imgs], ["a cat"] * 4),
                                   rtol=RTOL, atol=ATOL)
    m2 = HPSv2.from_original(str(Path(path).parent), tokenizer=tok)
    np.testing.assert_array_equal(m2.score(imgs[:2], PROMPTS[:2]), got[:2])


def test_hpsv2_converter_layout(hps_ckpt):
    _, sd, _ = hps_ckpt
    m = open_clip_to_transformers({"module." + k: v for k, v in sd.items()} | {"module.attn_mask": torch.zeros(2)})
    st = m.state_dict()
    w = sd["visual.transformer.resblocks.1.attn.in_proj_weight"]
    np.testing.assert_array_equal(st["vision_model.encoder.layers.1.self_attn.k_proj.weight"], w[VW:2 * VW])
    np.testing.assert_array_equal(st["text_projection.weight"], sd["text_projection"].T)
    assert m.config.text_config.eos_token_id == len(tiny_tokenizer()) - 1
    assert m.config.vision_config.hidden_act == "gelu" and m.config.vision_config.image_size == S


def test_hpsv2_errors(hps_ckpt, tmp_path):
    _, sd, tok = hps_ckpt

    def conv(d):
        return open_clip_to_transformers(d)

    bad = dict(sd)
    bad.pop("transformer.resblocks.1.ln_2.bias")
    with pytest.raises(CheckpointError, match=r"missing keys: transformer\.resblocks\.1\.ln_2\.bias"):
        conv(bad)
    bad = dict(sd) | {"visual.transformer.resblocks.0.attn.foo": torch.zeros(1), "text.bar": torch.zeros(1)}
    with pytest.raises(CheckpointError,
                       match=r"unexpected keys: text\.bar, visual\.transformer\.resblocks\.0\.attn\.foo"):
        conv(bad)
    bad = dict(sd) | {"visual.transformer.resblocks.1.mlp.c_fc.weight": torch.zeros(7, VW)}
    with pytest.raises(CheckpointError,
                       match=rf"visual\.transformer\.resblocks\.1\.mlp\.c_fc\.weight: \(7, {VW}\), "
                             rf"expected \({VMLP}, {VW}\)"):
        conv(bad)
    bad = dict(sd) | {"text_projection": torch.zeros(TW, EMB + 1)}
    with pytest.raises(CheckpointError, match=rf"shape mismatch: .*text_projection: \({TW}, {EMB + 1}\), expected"):
        conv(bad)
    bad = dict(sd) | {"visual.positional_embedding": torch.zeros(18, VW)}
    with pytest.raises(CheckpointError, match="not 1 \\+ a square"):
        conv(bad)
    with pytest.raises(CheckpointError, match="width 160 is not a multiple of head_dim 64"):
        open_clip_to_transformers(sd, vision_head_dim=64)
    with pytest.raises(FileNotFoundError, match="HPS_v2"):
        HPSv2.from_original(str(tmp_path))
    torch.save({"state_dict": sd}, tmp_path / "HPS_v2_compressed.pt")
    with pytest.raises(FileNotFoundError, match="bpe_simple_vocab_16e6.txt.gz"):
        HPSv2.from_original(str(tmp_path / "HPS_v2_compressed.pt"))
    tok.save_pretrained(str(tmp_path / "tokenizer"))            # the default place for a tokenizer folder
    assert HPSv2.from_original(str(tmp_path)).score(photos()[:1], "x").shape == (1,)


def test_clip_bpe_tokenizer(tmp_path):
    merges = ["h e", "l o</w>", "he l", "hel lo</w>"]
    path = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(["#version: 0.2"] + merges) + "\n")
    tok = clip_bpe_tokenizer(str(path))
    assert len(tok) == 512 + 4 + 2 and (tok.bos_token_id, tok.eos_token_id) == (516, 517)
    ids = [0, 93, 94, 188, 256, 512, 515]      # CLIP's bytes_to_unicode order: printable bytes, then byte 0 ...
    assert tok.convert_ids_to_tokens(ids) == ["!", "~", "¡", "Ā", "!</w>", "he", "hello</w>"]
    assert tok("Hello")["input_ids"] == [516, 515, 517]


# ====================================================================== ImageReward (BLIP ViT + med.py BERT)
IW, IL, IMLP, IP, IS = 128, 2, 256, 8, 32        # vision: 2 heads of 64, 4x4 patches
BW, BL, BMLP, BPOS = 128, 2, 256, 40             # text: 2 heads of 64
HEAD = (BW, 48, 32, 16, 8)


def blip_tok():
    return blip_tokenizer(bert_tiny_tokenizer())


def image_reward_sd(seed, vocab):
    g = torch.Generator().manual_seed(seed)
    ve, te = "blip.visual_encoder.", "blip.text_encoder."
    sd = {ve + "cls_token": _rand(g, 1, 1, IW, scale=0.5),
          ve + "pos_embed": _rand(g, 1, (IS // IP) ** 2 + 1, IW, scale=0.5),
          ve + "patch_embed.proj.weight": _rand(g, IW, 3, IP, IP, scale=1 / math.sqrt(3 * IP * IP)),
          ve + "patch_embed.proj.bias": _rand(g, IW, scale=0.3),
          te + "embeddings.word_embeddings.weight": _rand(g, vocab, BW, scale=0.5),
          te + "embeddings.position_embeddings.weight": _rand(g, BPOS, BW, scale=0.3),
          te + "embeddings.position_ids": torch.arange(BPOS)[None],       # med.py's persistent buffer
          "blip.vision_proj.weight": _rand(g, 16, IW), "blip.vision_proj.bias": _rand(g, 16),
          "blip.text_proj.weight": _rand(g, 16, BW), "blip.text_proj.bias": _rand(g, 16)}
    _ln(g, sd, ve + "norm", IW), _ln(g, sd, te + "embeddings.LayerNorm", BW)
    for i in range(IL):
        b = f"{ve}blocks.{i}."
        _ln(g, sd, b + "norm1", IW), _ln(g, sd, b + "norm2", IW)
        _lin(g, sd, b + "attn.qkv", 3 * IW, IW), _lin(g, sd, b + "attn.proj", IW, IW)
        _lin(g, sd, b + "mlp.fc1", IMLP, IW), _lin(g, sd, b + "mlp.fc2", IW, IMLP)
    for i in range(BL):
        b = f"{te}encoder.layer.{i}."
        for a, kv in (("attention", BW), ("crossattention", IW)):
            _lin(g, sd, f"{b}{a}.self.query", BW, BW)
            _lin(g, sd, f"{b}{a}.self.key", BW, kv), _lin(g, sd, f"{b}{a}.self.value", BW, kv)
            _lin(g, sd, f"{b}{a}.output.dense", BW, BW), _ln(g, sd, f"{b}{a}.output.LayerNorm", BW)
        _lin(g, sd, b + "intermediate.dense", BMLP, BW), _lin(g, sd, b + "output.dense", BW, BMLP)
        _ln(g, sd, b + "output.LayerNorm", BW)
    dims = list(HEAD) + [1]
    for j, i in enumerate((0, 2, 4, 6, 7)):
        _lin(g, sd, f"mlp.layers.{i}", dims[j + 1], dims[j])
    return sd


def ref_blip_vit(sd, x):
    """BLIP models/vit.py VisionTransformer: patch conv (bias), [CLS] + pos_embed, pre-LN blocks
    (eps 1e-6, fused qkv, GELU), final norm on all tokens."""
    v = {k[len("blip.visual_encoder."):]: t for k, t in sd.items() if k.startswith("blip.visual_encoder.")}
    t = F.conv2d(x, v["patch_embed.proj.weight"], v["patch_embed.proj.bias"], stride=IP).flatten(2).transpose(1, 2)
    t = torch.cat([v["cls_token"].expand(len(x), -1, -1), t], 1)
    t = t + v["pos_embed"][:, :t.size(1)]
    for i in range(IL):
        b = f"blocks.{i}."
        h = F.layer_norm(t, (IW,), v[b + "norm1.weight"], v[b + "norm1.bias"], 1e-6)
        bsz, n, c = h.shape
        qkv = F.linear(h, v[b + "attn.qkv.weight"], v[b + "attn.qkv.bias"]).reshape(bsz, n, 3, IW // 64, 64)
        q, k, vv = qkv.permute(2, 0, 3, 1, 4)
        att = ((q @ k.transpose(-2, -1)) * 64 ** -0.5).softmax(-1)
        t = t + F.linear((att @ vv).transpose(1, 2).reshape(bsz, n, c), v[b + "attn.proj.weight"],
                         v[b + "attn.proj.bias"])
        h = F.layer_norm(t, (IW,), v[b + "norm2.weight"], v[b + "norm2.bias"], 1e-6)
        t = t + F.linear(F.gelu(F.linear(h, v[b + "mlp.fc1.weight"], v[b + "mlp.fc1.bias"])),
                         v[b + "mlp.fc2.weight"], v[b + "mlp.fc2.bias"])
    return F.layer_norm(t, (IW,), v["norm.weight"], v["norm.bias"], 1e-6)


def ref_med(sd, ids, mask, img):
    """BLIP med.py BertModel (mode 'multimodal'): word + position embeddings, LN; per layer post-LN
    self-attention (extended mask (1 - m) · -10000), cross-attention to the image tokens, feed-forward."""
    t = {k[len("blip.text_encoder."):]: x for k, x in sd.items() if k.startswith("blip.text_encoder.")}
    x = t["embeddings.word_embeddings.weight"][ids] + t["embeddings.position_embeddings.weight"][:ids.shape[1]]
    x = F.layer_norm(x, (BW,), t["embeddings.LayerNorm.weight"], t["embeddings.LayerNorm.bias"], 1e-12)
    ext = (1.0 - mask[:, None, None, :].float()) * -10000.0
    img_ext = torch.zeros(len(ids), 1, 1, img.shape[1])           # image_atts = ones
    for i in range(BL):
        b = f"encoder.layer.{i}."
        for a, src, m in (("attention", None, ext), ("crossattention", img, img_ext)):
            p = f"{b}{a}."
            ctx = _mha(x, x if src is None else src, t[p + "self.query.weight"], t[p + "self.query.bias"],
                       t[p + "self.key.weight"], t[p + "self.key.bias"], t[p + "self.value.weight"],
                       t[p + "self.value.bias"], BW // 64, m)
            x = F.layer_norm(F.linear(ctx, t[p + "output.dense.weight"], t[p + "output.dense.bias"]) + x, (BW,),
                             t[p + "output.LayerNorm.weight"], t[p + "output.LayerNorm.bias"], 1e-12)
        h = F.gelu(F.linear(x, t[b + "intermediate.dense.weight"], t[b + "intermediate.dense.bias"]))
        x = F.layer_norm(F.linear(h, t[b + "output.dense.weight"], t[b + "output.dense.bias"]) + x, (BW,),
                         t[b + "output.LayerNorm.weight"], t[b + "output.LayerNorm.bias"], 1e-12)
    return x


def ref_ir_preprocess(img, n_px=IS):
    """ImageReward _transform: Resize(n_px, BICUBIC) (PIL), CenterCrop(n_px) (torchvision), ToTensor, Normalize."""
    pil = Image.fromarray(img)
    w, h = pil.size
    if w <= h:
        size = (n_px, int(n_px * h / w))
    else:
        size = (int(n_px * w / h), n_px)
    pil = pil.resize(size, Image.BICUBIC)
    w, h = pil.size
    top, left = int(round((h - n_px) / 2.0)), int(round((w - n_px) / 2.0))
    pil = pil.crop((left, top, left + n_px, top + n_px)).convert("RGB")
    return _norm(torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float()[None] / 255)[0]


def ref_image_reward(sd, tok, imgs, prompts):
    """ImageReward.score, one image at a time: [CLS] feature -> mlp (no activations) -> (r - mean) / std."""
    out = []
    for img, prompt in zip(imgs, prompts):
        ti = tok(prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        emb = ref_blip_vit(sd, ref_ir_preprocess(img)[None])
        f = ref_med(sd, ti["input_ids"], ti["attention_mask"], emb)[:, 0, :]
        for i in (0, 2, 4, 6, 7):
            f = F.linear(f, sd[f"mlp.layers.{i}.weight"], sd[f"mlp.layers.{i}.bias"])
        out.append(((f - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD).item())
    return np.array(out)


@pytest.fixture(scope="module")
def ir_ckpt(tmp_path_factory):
    tok = blip_tok()
    sd = image_reward_sd(1, len(tok))
    path = tmp_path_factory.mktemp("ir") / "ImageReward.pt"
    torch.save(sd, path)                                        # utils.load: torch.load(model_path) -> flat dict
    return str(path), sd, tok


def test_image_reward_from_original_matches_reference(ir_ckpt):
    path, sd, tok = ir_ckpt
    assert tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [len(tok) - 2, len(tok) - 1]
    assert tok("a cat")["input_ids"][0] == tok.cls_token_id     # ImageReward keeps [CLS] first
    m = ImageReward.from_original(path, bert_tiny_tokenizer())
    assert m.image_size == IS and m.vision.config.num_attention_heads == 2
    assert m.vision.config.layer_norm_eps == 1e-6 and m.text.config.layer_norm_eps == 1e-12
    imgs = photos()
    for img in imgs:
        np.testing.assert_allclose(m.preprocess([img]).numpy(), ref_ir_preprocess(img)[None].numpy(), atol=1e-6)
    long_prompt = " ".join(["a very long prompt"] * 10)          # truncated at 35 tokens
    prompts = PROMPTS[:3] + [long_prompt]
    got = m.score(imgs, prompts, batch_size=3)
    with torch.no_grad():
        ref = ref_image_reward(sd, tok, imgs, prompts)
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)
    assert got.dtype == np.float32 and np.ptp(got) > 0.05
    # the image matters and the prompt matters
    same = m.score([imgs[0]] * 2, PROMPTS[:2])
    assert abs(same[0] - same[1]) > 1e-3 and abs(got[0] - m.score(imgs[1:2], PROMPTS[:1])[0]) > 1e-3


def test_image_reward_errors(ir_ckpt, tmp_path):
    _, sd, _ = ir_ckpt
    conv = image_reward_to_transformers
    bad = dict(sd)
    bad.pop("mlp.layers.7.bias")
    bad.pop("blip.visual_encoder.blocks.1.attn.qkv.bias")
    with pytest.raises(CheckpointError,
                       match=r"missing keys: blip\.visual_encoder\.blocks\.1\.attn\.qkv\.bias, mlp\.layers\.7\.bias"):
        conv(bad)
    bad = dict(sd) | {"blip.text_encoder.embeddings.token_type_embeddings.weight": torch.zeros(2, BW)}
    with pytest.raises(CheckpointError, match=r"unexpected keys: blip\.text_encoder\.embeddings\.token_type"):
        conv(bad)
    key = "blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"
    bad = dict(sd) | {key: torch.zeros(BW, BW + 1)}
    with pytest.raises(CheckpointError, match=rf"{re.escape(key)}: \({BW}, {BW + 1}\), expected \({BW}, {IW}\)"):
        conv(bad)
    bad = dict(sd) | {"mlp.layers.4.weight": torch.zeros(16, 33)}
    with pytest.raises(CheckpointError, match=r"mlp\.layers\.4\.weight: \(16, 33\), expected \(16, 32\)"):
        conv(bad)
    with pytest.raises(FileNotFoundError, match="ImageReward.pt"):
        ImageReward.from_original(str(tmp_path), bert_tiny_tokenizer())


# ====================================================================== PickScore
def test_pickscore_matches_transformers(tmp_path):
    from transformers import CLIPImageProcessorPil
    m = PickScore.tiny(0)
    with torch.no_grad():
        m.model.logit_scale.fill_(4.0)
    imgs, prompts = photos(), PROMPTS
    got = m.score(imgs, prompts, batch_size=3)
    proc = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    with torch.no_grad():
        pv = proc(images=imgs, return_tensors="pt")["pixel_values"]
        ti = m.tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        ie = m.model.get_image_features(pixel_values=pv).pooler_output
        te = m.model.get_text_features(**ti).pooler_output
        ie, te = ie / ie.norm(dim=-1, keepdim=True), te / te.norm(dim=-1, keepdim=True)
        ref = (m.model.logit_scale.exp() * (te * ie).sum(-1)).numpy()
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)
    assert np.ptp(got) > 0.05 and not np.allclose(got, (te * ie).sum(-1).numpy(), atol=1e-3)
    m.model.save_pretrained(str(tmp_path / "pick"))
    m.tokenizer.save_pretrained(str(tmp_path / "proc"))
    m2 = PickScore.from_pretrained(str(tmp_path / "pick"), str(tmp_path / "proc"))
    np.testing.assert_allclose(m2.score(imgs, prompts), got, rtol=1e-6, atol=1e-6)


def test_tiny_models_and_inputs():
    for cls in (HPSv2, ImageReward, PickScore):
        m = cls.tiny(0)
        imgs = np.stack([im[:64, :64] for im in photos()])
        a, b = m.score(imgs, "a photo"), m.score(list(imgs), ["a photo"] * 4, batch_size=1)
        assert a.shape == (4,) and a.dtype == np.float32 and np.isfinite(a).all()
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        assert m.score(imgs[:0], []).shape == (0,)
        with pytest.raises(ValueError, match="one per image"):
            m.score(imgs, ["a", "b"])
        with pytest.raises(ValueError, match="uint8"):
            m.score(imgs.astype(np.float32), "a")

