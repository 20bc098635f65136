"""Image embeddings (CLIP, DINOv2, DreamSim) and the embedding semantic score (Specialists Eq. 9).

    semantic = cosdist(f(m ⊙ I_gen), f(I_sty)) + λ · mean_{h,w,c}((1 − m) ⊙ (I_in − I_gen)²)

cosdist = 1 − cos, in [0, 2]; m ⊙ I sets the pixels outside the edit mask to black (by default
the style image is a texture and is used whole, the paper's m_sty = 1; with ``style_masks`` it is
f(m_sty ⊙ I_sty)); pixels in [0, 1]; a mask of zero area (edit or style) counts as the whole frame. f:

- "clip": `CLIPVisionModelWithProjection` image embeddings (projected), CLIP mean/std;
- "dinov2": `Dinov2Model` CLS token after the final layer norm (``pooler_output``), ImageNet mean/std;
- "dreamsim": `dreamsim.DreamSim` (DINO + CLIP + OpenCLIP ViT-B/16, LoRA merged), its own
  pre-processing (224, PIL bicubic, per-backbone mean/std); weights: DreamSim's checkpoint folder.

Pre-processing: the whole image resized to ``size`` x ``size`` (224; bicubic, antialiased; no
crop, so nothing of the masked region is cut away), normalised. Weights: a local transformers
folder (``from_pretrained``; for "dreamsim" the original checkpoint folder, see
`dreamsim.DreamSim.from_original`); ``tiny(kind)`` builds a small random model for tests.
PyTorch: imported only in the scorer process.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, Dinov2Config, Dinov2Model

from jaxedit.scorers.base import check_batch

NORMALISATION = {"clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
                 "dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}
KINDS = ("clip", "dinov2", "dreamsim")  # "dreamsim" normalises per backbone, inside DreamSim


def tiny_model(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "clip":
        return CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56,
            patch_size=14, projection_dim=16))
    if kind == "dinov2":
        return Dinov2Model(Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=56, patch_size=14))
    if kind == "dreamsim":
        from jaxedit.scorers.dreamsim import DreamSim
        return DreamSim.tiny(seed)
    raise ValueError(f"embedding kind {kind!r}: expected one of {KINDS}")


class EmbeddingScorer:
    """Semantic score from image embeddings: {"semantic": float32 (B,)}, lower is better."""
    names = ("semantic",)

    def __init__(self, model, kind: str, *, lam: float = 0.05, size: int = 224, batch_size: int = 16,
                 device: str = "cpu"):
        if kind not in KINDS:
            raise ValueError(f"embedding kind {kind!r}: expected one of {KINDS}")
        self.model, self.kind = model.to(device).eval(), kind
        size = model.image_size if kind == "dreamsim" else size  # DreamSim resizes to its own input
        self.lam, self.size, self.batch_size, self.device = float(lam), size, batch_size, device

    @classmethod
    def from_pretrained(cls, path: str, kind: str, **kwargs) -> "EmbeddingScorer":
        if kind == "dreamsim":
            from jaxedit.scorers.dreamsim import DreamSim
            return cls(DreamSim.from_original(path), kind, **kwargs)
        model_cls = {"clip": CLIPVisionModelWithProjection, "dinov2": Dinov2Model}[kind]
        return cls(model_cls.from_pretrained(path), kind, **kwargs)

    @classmethod
    def tiny(cls, kind: str, seed: int = 0, **kwargs) -> "EmbeddingScorer":
        return cls(tiny_model(kind, seed), kind, **{"size": 56, **kwargs})

    @torch.inference_mode()
    def embed(self, images: np.ndarray) -> np.ndarray:
        """uint8 or float-in-[0,255] (B, H, W, 3) -> float32 (B, D) unit-norm embeddings."""
        if self.kind == "dreamsim":
            return self.model.embed(images, batch_size=self.batch_size)
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALISATION[self.kind])
        out = []
        for i in range(0, len(images), self.batch_size):
            x = torch.from_numpy(np.asarray(images[i:i + self.batch_size], np.float32)).permute(0, 3, 1, 2) / 255.0
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False,
                              antialias=True).clamp(0, 1)
            o = self.model(pixel_values=((x - mean) / std).to(self.device))
            e = o.image_embeds if self.kind == "clip" else o.pooler_output
            out.append(F.normalize(e.float(), dim=-1).cpu().numpy())
        return np.concatenate(out)

    def style_distance(self, generated, styles, masks, style_masks=None) -> np.ndarray:
        """cosdist(f(m ⊙ I_gen), f(I_sty)), float32 (B,); with ``style_masks`` (B, Hs, Ws) in [0, 1]:
        cosdist(f(m ⊙ I_gen), f(m_sty ⊙ I_sty))."""
        m = np.asarray(masks, np.float32)
        m = np.where(m.sum(axis=(1, 2), keepdims=True) > 0, m, 1.0)
        e_gen = self.embed(generated.astype(np.float32) * m[..., None])
        if style_masks is None:
            e_sty = self.embed(styles)
        else:
            ms = np.asarray(style_masks, np.float32)
            if ms.shape != styles.shape[:3]:
                raise ValueError(f"style_masks must be (B, Hs, Ws) = {styles.shape[:3]}, got {ms.shape}")
            ms = np.where(ms.sum(axis=(1, 2), keepdims=True) > 0, ms, 1.0)
            e_sty = self.embed(styles.astype(np.float32) * ms[..., None])
        return (1.0 - (e_gen * e_sty).sum(-1)).astype(np.float32)

    def __call__(self, inputs, generated, styles, masks, style_masks=None) -> dict[str, np.ndarray]:
        inputs, generated, styles, masks = check_batch(inputs, generated, styles, masks)
        m = np.asarray(masks, np.float64)
        m = np.where(m.sum(axis=(1, 2), keepdims=True) > 0, m, 1.0)
        x_in, x_gen = inputs.astype(np.float64) / 255.0, generated.astype(np.float64) / 255.0
        pixel = self.lam * ((1.0 - m)[..., None] * (x_in - x_gen) ** 2).mean(axis=(1, 2, 3))
        style = self.style_distance(generated, styles, masks, style_masks)
        return {"semantic": (style + pixel).astype(np.float32)}
