"""Depth Anything V2 relative depth and the depth structural score (Specialists Eq. 8).

    structural = mean_{h,w} |n(D(I_in)) − n(D(I_gen))|,   n(d) = (d − min d) / (max d − min d)

D: `transformers.DepthAnythingForDepthEstimation` (Depth Anything V2, relative depth: it
predicts inverse depth up to an unknown scale and shift per image, so each map is min–max
normalised to [0, 1] on its own before the L1 (a flat map becomes 0); the score is in [0, 1]). Pre-processing as the
model's image processor: RGB in [0, 1], resized (bicubic, antialiased) so that the shorter side
is ``size`` (518) and both sides are multiples of 14, ImageNet mean/std; the predicted map is
resized back to the image size (bilinear) before normalising.

Weights: a local folder in transformers' format (``config.json`` + ``model.safetensors``, e.g. a
download of ``depth-anything/Depth-Anything-V2-Small-hf``): ``DepthScorer.from_pretrained(dir)``.
``DepthScorer.tiny()`` builds a small random model for tests. PyTorch: imported only in the
scorer process.
"""
from __future__ import annotations

import collections
import hashlib

import numpy as np
import torch
import torch.nn.functional as F
from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

from jaxedit.scorers.base import check_batch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def tiny_config() -> DepthAnythingConfig:
    """A ~0.1 M-parameter Depth Anything (DINOv2 backbone of width 32, 4 layers)."""
    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                            patch_size=14, image_size=98, out_features=["stage1", "stage2", "stage3", "stage4"],
                            reshape_hidden_states=False, layerscale_value=1.0)
    return DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 32, 32],
                               fusion_hidden_size=16, head_hidden_size=8)


def _target_size(h: int, w: int, size: int, multiple: int = 14) -> tuple[int, int]:
    """Shorter side ≈ size, aspect kept, both sides rounded to a multiple of 14 (at least 14)."""
    scale = size / min(h, w)
    return (max(multiple, int(round(h * scale / multiple)) * multiple),
            max(multiple, int(round(w * scale / multiple)) * multiple))


class DepthScorer:
    """Structural score from relative depth: {"structural": float32 (B,)}, lower is better."""
    names = ("structural",)

    def __init__(self, model: DepthAnythingForDepthEstimation, *, size: int = 518, batch_size: int = 8,
                 device: str = "cpu", cache_size: int = 4096):
        self.model = model.to(device).eval()
        self.size, self.batch_size, self.device = size, batch_size, device
        self.cache_size = cache_size
        self._cache: collections.OrderedDict[bytes, np.ndarray] = collections.OrderedDict()

    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> "DepthScorer":
        return cls(DepthAnythingForDepthEstimation.from_pretrained(path), **kwargs)

    @classmethod
    def tiny(cls, seed: int = 0, **kwargs) -> "DepthScorer":
        torch.manual_seed(seed)
        return cls(DepthAnythingForDepthEstimation(tiny_config()), **{"size": 98, **kwargs})

    @torch.inference_mode()
    def depth(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W, 3) -> float32 (B, H, W) relative depth, each map min-max normalised to [0, 1]."""
        images = np.asarray(images)
        b, h, w, _ = images.shape
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        out = []
        for i in range(0, b, self.batch_size):
            x = torch.from_numpy(images[i:i + self.batch_size]).permute(0, 3, 1, 2).float() / 255.0
            x = F.interpolate(x, size=_target_size(h, w, self.size), mode="bicubic", align_corners=False,
                              antialias=True).clamp(0, 1)
            pred = self.model(pixel_values=((x - mean) / std).to(self.device)).predicted_depth  # (b, h', w')
            d = F.interpolate(pred[:, None].float().cpu(), size=(h, w), mode="bilinear", align_corners=False)[:, 0]
            lo = d.amin(dim=(1, 2), keepdim=True)
            hi = d.amax(dim=(1, 2), keepdim=True)
            out.append(torch.where(hi > lo, (d - lo) / torch.where(hi > lo, hi - lo, 1.0), 0.0).numpy())  # flat map: 0
        return np.concatenate(out).astype(np.float32)

    def depth_cached(self, images: np.ndarray) -> np.ndarray:
        """`depth` with an LRU cache keyed by image content (the training inputs repeat every
        epoch; ``cache_size`` maps, ~0.26 MB each at 256 px)."""
        keys = [hashlib.blake2b(np.ascontiguousarray(im).tobytes(), digest_size=16,
                                person=str(im.shape).encode()[:16]).digest() for im in images]
        missing: dict[bytes, int] = {}  # new key -> first index (a batch in pair layout repeats each input)
        for i, k in enumerate(keys):
            if k not in self._cache:
                missing.setdefault(k, i)
        if missing:
            for k, d in zip(missing, self.depth(np.asarray(images)[list(missing.values())])):
                self._cache[k] = d
        out = np.stack([self._cache[k] for k in keys])
        for k in keys:
            self._cache.move_to_end(k)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out

    def structural(self, inputs: np.ndarray, generated: np.ndarray) -> np.ndarray:
        """mean |n(D(I_in)) − n(D(I_gen))| per sample; the inputs' maps come from the cache."""
        return np.abs(self.depth_cached(inputs) - self.depth(generated)).mean(axis=(1, 2)).astype(np.float32)

    def __call__(self, inputs, generated, styles, masks) -> dict[str, np.ndarray]:
        inputs, generated, _, _ = check_batch(inputs, generated, styles, masks)
        return {"structural": self.structural(inputs, generated)}
