"""CLIP metrics of edited images (CLIP-T, CLIP-I, directional similarity) and STY_in.

All cosines are between unit-normalised *projected* embeddings (``CLIPModel.get_image_features``
/ ``get_text_features``, = OpenAI CLIP's ``encode_image`` / ``encode_text``), in float64 (B,):

- ``clip_t(images, captions)`` = cos(E_I(image), E_T(caption)): MagicBrush's CLIP-T
  (``OSU-NLP-Group/MagicBrush: evaluation/image_eval.py``, ``eval_clip_t``: generated image vs the
  target's local caption, ViT-B/32) and the Specialists' CLIP_txt as defined in their Table 1
  text ("CLIP similarity between the edited image and output caption");
- ``clip_i(a, b)`` = cos(E_I(a), E_I(b)) (MagicBrush CLIP-I; InstructPix2Pix's image consistency);
- ``directional(in_images, out_images, in_captions, out_captions)``
  = cos(E_I(out) − E_I(in), E_T(out_caption) − E_T(in_caption)), embeddings normalised before the
  differences, as ``timothybrooks/instruct-pix2pix: metrics/clip_similarity.py`` (Gal et al.'s
  directional similarity; the Specialists' Sec. 4.1 also calls their CLIP_txt this). A zero
  difference (unchanged image or identical captions) gives 0, as ``F.cosine_similarity``.

Pre-processing (CLIP's own, i.e. transformers' ``CLIPImageProcessor`` / OpenAI's ``preprocess``):
uint8 RGB -> PIL bicubic resize of the shorter side to S (the longer side ``int(S·long/short)``),
centre crop S x S (offset ``(n − S) // 2``, as transformers; torchvision rounds the half pixel the
other way on odd margins), /255, CLIP mean/std; S = the vision model's ``image_size`` (224 for
ViT-B/32, ViT-L/14). InstructPix2Pix's script instead squashes the image to 224x224 without
antialiasing: equal for its square images up to the resize filter, not for others. Captions are
tokenised to the text model's 77 positions, truncated (``clip.tokenize(..., truncate=True)``).

Images: uint8 (B, H, W, 3) arrays, or sequences of uint8 (H, W, 3) arrays of different sizes.
Weights: a local transformers ``CLIPModel`` folder with its tokenizer (``from_pretrained``), e.g.
a download of ``openai/clip-vit-base-patch32``; ``tiny(seed)`` builds a random model and a
character-level tokenizer for tests. PyTorch: imported only in the scorer process.

``sty_in(embedders, generated, styles, masks)``: the Specialists' STY_in, the cosine similarity
between the masked generated image and the style image, averaged over embedders
(``jaxedit.scorers.embed.EmbeddingScorer`` instances; the paper averages DINOv2, CLIP and DreamSim).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import PIL.Image
import torch
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

__all__ = ["CLIP_MEAN", "CLIP_STD", "ClipMetrics", "clip_preprocess", "sty_in", "tiny_tokenizer"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _images(images) -> list[np.ndarray]:
    out = list(images) if not isinstance(images, np.ndarray) or images.ndim == 4 else None
    if out is None:
        raise ValueError(f"expected (B, H, W, 3) images or a sequence of (H, W, 3), got shape {images.shape}")
    for im in out:
        im = np.asarray(im)
        if im.dtype != np.uint8 or im.ndim != 3 or im.shape[-1] != 3:
            raise ValueError(f"expected uint8 (H, W, 3) RGB images, got {im.dtype} {im.shape}")
    return [np.asarray(im) for im in out]


def clip_preprocess(images, size: int = 224) -> np.ndarray:
    """uint8 RGB images -> float32 (B, 3, size, size) CLIP pixel values (see the module docstring)."""
    mean = np.asarray(CLIP_MEAN, np.float32)[:, None, None]
    std = np.asarray(CLIP_STD, np.float32)[:, None, None]
    out = []
    for im in _images(images):
        h, w = im.shape[:2]
        short, long = min(h, w), max(h, w)
        new_long = int(size * long / short)
        nh, nw = (new_long, size) if w <= h else (size, new_long)
        x = np.asarray(PIL.Image.fromarray(im).resize((nw, nh), resample=PIL.Image.Resampling.BICUBIC))
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[top:top + size, left:left + size].transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
        out.append((x - mean) / std)
    return np.stack(out)


def _bytes_to_unicode() -> list[str]:
    """The GPT-2 / CLIP byte-level alphabet: the characters standing for bytes 0..255."""
    keep = (set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1))
            | set(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def tiny_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A character-level ``CLIPTokenizer`` (no merges): the 256 byte characters, each also with
    ``</w>``, then ``<|startoftext|>``, ``<|endoftext|>`` (514 ids). Any text tokenizes."""
    alphabet = _bytes_to_unicode()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=model_max_length)


def tiny_model(tokenizer: CLIPTokenizer, seed: int = 0) -> CLIPModel:
    torch.manual_seed(seed)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=56, patch_size=14)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))


def _cos(a: np.ndarray, b: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    na = np.maximum(np.linalg.norm(a, axis=-1), eps)
    nb = np.maximum(np.linalg.norm(b, axis=-1), eps)
    return (a * b).sum(-1) / (na * nb)


class ClipMetrics:
    """CLIP-T, CLIP-I and directional CLIP similarity, float64 (B,), higher is better."""

    def __init__(self, model: CLIPModel, tokenizer, *, batch_size: int = 16, device: str = "cpu"):
        self.model, self.tokenizer = model.to(device).eval(), tokenizer
        self.size = int(model.config.vision_config.image_size)
        self.max_length = int(model.config.text_config.max_position_embeddings)
        self.batch_size, self.device = batch_size, device

    @classmethod
    def from_pretrained(cls, path: str, tokenizer_path: str | None = None, **kwargs) -> "ClipMetrics":
        model = CLIPModel.from_pretrained(path, local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_path or path, local_files_only=True)
        return cls(model, tokenizer, **kwargs)

    @classmethod
    def tiny(cls, seed: int = 0, **kwargs) -> "ClipMetrics":
        tokenizer = tiny_tokenizer()
        return cls(tiny_model(tokenizer, seed), tokenizer, **kwargs)

    @torch.inference_mode()
    def image_embeds(self, images) -> np.ndarray:
        """uint8 RGB images -> float32 (B, D) unit-norm projected image embeddings."""
        images = _images(images)
        out = []
        for i in range(0, len(images), self.batch_size):
            pv = torch.from_numpy(clip_preprocess(images[i:i + self.batch_size], self.size)).to(self.device)
            e = self.model.get_image_features(pixel_values=pv).pooler_output.float()
            out.append(torch.nn.functional.normalize(e, dim=-1).cpu().numpy())
        return np.concatenate(out)

    @torch.inference_mode()
    def text_embeds(self, captions: str | Sequence[str]) -> np.ndarray:
        """Captions -> float32 (B, D) unit-norm projected text embeddings."""
        captions = [captions] if isinstance(captions, str) else list(captions)
        out = []
        for i in range(0, len(captions), self.batch_size):
            tok = self.tokenizer(captions[i:i + self.batch_size], padding="max_length", truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            e = self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                             attention_mask=tok["attention_mask"].to(self.device)).pooler_output
            out.append(torch.nn.functional.normalize(e.float(), dim=-1).cpu().numpy())
        return np.concatenate(out)

    @staticmethod
    def _check(n: int, **others) -> None:
        for name, v in others.items():
            if len(v) != n:
                raise ValueError(f"{name}: expected {n} items (one per image), got {len(v)}")

    def clip_t(self, images, captions: Sequence[str]) -> np.ndarray:
        """cos(E_I(image), E_T(caption)) per pair."""
        images = _images(images)
        captions = [captions] if isinstance(captions, str) else list(captions)
        self._check(len(images), captions=captions)
        return _cos(self.image_embeds(images), self.text_embeds(captions))

    def clip_i(self, a, b) -> np.ndarray:
        """cos(E_I(a), E_I(b)) per pair."""
        a, b = _images(a), _images(b)
        self._check(len(a), b=b)
        return _cos(self.image_embeds(a), self.image_embeds(b))

    def directional(self, in_images, out_images, in_captions: Sequence[str],
                    out_captions: Sequence[str]) -> np.ndarray:
        """cos(E_I(out) − E_I(in), E_T(out_caption) − E_T(in_caption)) per sample."""
        in_images, out_images = _images(in_images), _images(out_images)
        in_captions = [in_captions] if isinstance(in_captions, str) else list(in_captions)
        out_captions = [out_captions] if isinstance(out_captions, str) else list(out_captions)
        self._check(len(in_images), out_images=out_images, in_captions=in_captions, out_captions=out_captions)
        d_img = self.image_embeds(out_images).astype(np.float64) - self.image_embeds(in_images)
        d_txt = self.text_embeds(out_captions).astype(np.float64) - self.text_embeds(in_captions)
        return _cos(d_img, d_txt)


def sty_in(embedders, generated, styles, masks) -> np.ndarray:
    """Specialists STY_in: mean over `embedders` of cos(f(m ⊙ I_gen), f(I_sty)), float64 (B,).

    Each embedder is an ``EmbeddingScorer``; its ``style_distance`` (cosdist = 1 − cos) fixes the
    masking: pixels outside the edit mask set to black in the generated image, the style image
    used whole (m_sty = 1), an empty mask counting as the whole frame.
    """
    embedders = list(embedders)
    if not embedders:
        raise ValueError("sty_in needs at least one embedder")
    sims = [1.0 - np.asarray(e.style_distance(generated, styles, masks), np.float64) for e in embedders]
    return np.mean(sims, axis=0)
