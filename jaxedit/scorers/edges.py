"""Canny edge maps (OpenCV) and the edge structural score, for scenes where depth is meaningless.

    structural = mean_{h,w} |C(I_in) − C(I_gen)|,   C = Canny edge map in {0, 1}

C: grayscale ``cv2.cvtColor(RGB2GRAY)`` (BT.601), ``cv2.Canny(gray, low, high)`` with the
3x3 Sobel aperture and the L1 gradient norm (OpenCV's defaults), thresholds (100, 200) as
ControlNet's Canny conditioning. Canny implementations differ (edge density on one photo:
OpenCV 0.079, scikit-image 0.044, kornia 0.104), so this one is fixed. The score is the
fraction of pixels that are an edge in exactly one of the two images, in [0, 1].
NumPy + OpenCV only (no torch, no jax): usable in either process.
"""
from __future__ import annotations

import numpy as np

from jaxedit.scorers.base import check_batch


def canny(images: np.ndarray, low: float = 100, high: float = 200) -> np.ndarray:
    """uint8 (B, H, W, 3) RGB -> float32 (B, H, W) edge maps in {0, 1}."""
    import cv2
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 (B, H, W, 3), got {images.dtype} {images.shape}")
    return np.stack([cv2.Canny(cv2.cvtColor(np.ascontiguousarray(im), cv2.COLOR_RGB2GRAY), low, high) > 0
                     for im in images]).astype(np.float32)


class EdgeScorer:
    """Structural score from Canny edges: {"structural": float32 (B,)}, lower is better."""
    names = ("structural",)

    def __init__(self, low: float = 100, high: float = 200):
        if not 0 <= low <= high:
            raise ValueError(f"Canny thresholds need 0 <= low <= high, got ({low}, {high})")
        self.low, self.high = low, high

    def structural(self, inputs: np.ndarray, generated: np.ndarray) -> np.ndarray:
        diff = np.abs(canny(inputs, self.low, self.high) - canny(generated, self.low, self.high))
        return diff.mean(axis=(1, 2)).astype(np.float32)

    def __call__(self, inputs, generated, styles, masks) -> dict[str, np.ndarray]:
        inputs, generated, _, _ = check_batch(inputs, generated, styles, masks)
        return {"structural": self.structural(inputs, generated)}
