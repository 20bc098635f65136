"""The weight-free scorer that runs in the trainer's process (NumPy only; no jax, no torch).

All computation is float64 on pixel values scaled to [0, 1]; scores are returned as float32 (B,).
Lower is better for every score.

Edges: grayscale `g = (0.299 R + 0.587 G + 0.114 B) / 255` (BT.601 luma), 3x3 Sobel kernels
(`[[-1,0,1],[-2,0,2],[-1,0,1]]` and its transpose) with edge-replicating borders (SciPy's
`mode="nearest"`), magnitude `E = sqrt(gx² + gy²) / (4·sqrt(2))`, which lies in [0, 1] (divided
by the largest attainable magnitude, not per image, so scores compare across images). Sobel
rather than Canny: no OpenCV dependency, no thresholds, and it varies smoothly with the image.

structural = mean_{h,w} |E(I_in) − E(I_gen)|                              in [0, 1]

semantic   = D_style + λ · mean_{h,w,c} ((1 − m) · (I_in − I_gen)²),       λ = 0.05
  D_style  = (w_mean·T_mean + w_std·T_std + w_tex·T_tex) / (w_mean + w_std + w_tex)   in [0, 1]
  T_mean   = mean_c |μ_c(I_gen; m) − μ_c(I_sty)|        per-channel colour mean, in [0, 1]
  T_std    = 2 · mean_c |σ_c(I_gen; m) − σ_c(I_sty)|    per-channel colour std (max 0.5, so ×2)
  T_tex    = |mean(E(I_gen); m) − mean(E(I_sty))|       mean edge magnitude (texture), in [0, 1]
where μ(·; m), σ(·; m) are the m-weighted mean and population std over the mask (soft masks
are weights) and the style statistics are over the WHOLE style image (the paper's m_sty is the
whole frame for texture style images), or m_sty-weighted when ``style_masks`` is given (a style
mask of zero area counts as the whole frame). The pixel term's mean is over all H·W·3 values (pixels
inside the mask contribute 0), as the paper's Eq. 9 with a mean instead of a sum.
Default weights w = (1, 1, 1): every term is scaled to [0, 1] by its largest possible value.

A mask of zero area (m.sum() == 0) is handled by `empty_mask`: "whole_frame" (default) treats
it as a whole-frame mask (statistics over the whole image, pixel term 0), as the paper does for
global edits; "no_style" sets D_style = 0, leaving the pixel term over the whole frame.
"""
from __future__ import annotations

import numpy as np

from jaxedit.scorers.base import check_batch

LUMA = np.array([0.299, 0.587, 0.114])
SOBEL_MAX = 4.0 * np.sqrt(2.0)


def grayscale(images: np.ndarray) -> np.ndarray:
    """uint8 (B, H, W, 3) -> float64 (B, H, W) in [0, 1] (BT.601 luma)."""
    return images.astype(np.float64) @ LUMA / 255.0


def sobel_edges(gray: np.ndarray) -> np.ndarray:
    """float (B, H, W) in [0, 1] -> Sobel gradient magnitude (B, H, W) in [0, 1], float64."""
    p = np.pad(np.asarray(gray, np.float64), ((0, 0), (1, 1), (1, 1)), mode="edge")
    rows = p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]               # [1, 2, 1] down the rows: (B, H, W+2)
    cols = p[:, :, :-2] + 2 * p[:, :, 1:-1] + p[:, :, 2:]      # [1, 2, 1] along the rows: (B, H+2, W)
    return np.hypot(rows[:, :, 2:] - rows[:, :, :-2], cols[:, 2:] - cols[:, :-2]) / SOBEL_MAX


def structural_score(inputs: np.ndarray, generated: np.ndarray) -> np.ndarray:
    """mean |E(I_in) − E(I_gen)| per sample: uint8 (B, H, W, 3) x2 -> float64 (B,)."""
    diff = sobel_edges(grayscale(inputs)) - sobel_edges(grayscale(generated))
    return np.abs(diff).mean(axis=(1, 2))


def _stats(x: np.ndarray, edges: np.ndarray, w: np.ndarray):
    """Weighted per-channel mean, std (B, 3) and mean edge magnitude (B,); w (B, H, W) sums > 0."""
    total = w.sum(axis=(1, 2))
    mean = np.einsum("bhw,bhwc->bc", w, x) / total[:, None]
    var = np.einsum("bhw,bhwc->bc", w, (x - mean[:, None, None, :]) ** 2) / total[:, None]
    tex = (w * edges).sum(axis=(1, 2)) / total
    return mean, np.sqrt(np.maximum(var, 0.0)), tex


def semantic_terms(inputs, generated, styles, masks, *, lam: float = 0.05,
                   weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
                   empty_mask: str = "whole_frame") -> tuple[np.ndarray, np.ndarray]:
    """(D_style, λ·pixel term), each float64 (B,); see the module docstring for the formula."""
    return _semantic(inputs, generated, styles, masks, sobel_edges(grayscale(generated)),
                     sobel_edges(grayscale(styles)), lam, weights, empty_mask)


def _semantic(inputs, generated, styles, masks, e_gen, e_sty, lam, weights, empty_mask, style_masks=None):
    if empty_mask not in ("whole_frame", "no_style"):
        raise ValueError(f"empty_mask must be 'whole_frame' or 'no_style', got {empty_mask!r}")
    x_in, x_gen = inputs.astype(np.float64) / 255.0, generated.astype(np.float64) / 255.0
    x_sty = styles.astype(np.float64) / 255.0
    m = np.asarray(masks, np.float64)
    empty = m.sum(axis=(1, 2)) <= 0
    if empty_mask == "whole_frame":
        m = np.where(empty[:, None, None], 1.0, m)
    m_stats = np.where(empty[:, None, None], 1.0, m)      # "no_style": any weights; D set to 0 below
    mean_g, std_g, tex_g = _stats(x_gen, e_gen, m_stats)
    if style_masks is None:
        m_sty = np.ones(x_sty.shape[:3])
    else:
        m_sty = np.asarray(style_masks, np.float64)
        m_sty = np.where(m_sty.sum(axis=(1, 2), keepdims=True) > 0, m_sty, 1.0)
    mean_s, std_s, tex_s = _stats(x_sty, e_sty, m_sty)
    t_mean = np.abs(mean_g - mean_s).mean(-1)
    t_std = 2.0 * np.abs(std_g - std_s).mean(-1)
    t_tex = np.abs(tex_g - tex_s)
    wm, ws, wt = weights
    d_style = (wm * t_mean + ws * t_std + wt * t_tex) / (wm + ws + wt)
    if empty_mask == "no_style":
        d_style = np.where(empty, 0.0, d_style)
    pixel = lam * ((1.0 - m)[..., None] * (x_in - x_gen) ** 2).mean(axis=(1, 2, 3))
    return d_style, pixel


class SimpleScorer:
    """Weight-free scorer: {"structural", "semantic"} per sample, float32 (B,), lower is better.

    lam: λ of the pixel term (0.05, paper). weights: (w_mean, w_std, w_tex) of D_style.
    empty_mask: "whole_frame" | "no_style" (zero-area masks). components: also return
    "semantic_style" (D_style) and "semantic_pixel" (λ·pixel term), e.g. for logging.
    chunk: samples processed at once (bounds the float64 temporaries, ~15 MB per 256² sample).
    """

    def __init__(self, lam: float = 0.05, weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
                 empty_mask: str = "whole_frame", components: bool = False, chunk: int = 4):
        if min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"weights must be >= 0 with a positive sum, got {weights}")
        if empty_mask not in ("whole_frame", "no_style"):
            raise ValueError(f"empty_mask must be 'whole_frame' or 'no_style', got {empty_mask!r}")
        self.lam, self.weights, self.empty_mask = float(lam), tuple(weights), empty_mask
        self.components, self.chunk = components, max(1, int(chunk))
        self.names = ("structural", "semantic") + (("semantic_style", "semantic_pixel") if components else ())

    def __call__(self, inputs, generated, styles, masks, style_masks=None) -> dict[str, np.ndarray]:
        """style_masks: optional (B, Hs, Ws) in [0, 1]; the style statistics are then m_sty-weighted."""
        inputs, generated, styles, masks = check_batch(inputs, generated, styles, masks)
        if style_masks is not None:
            style_masks = np.asarray(style_masks)
            if style_masks.shape != styles.shape[:3]:
                raise ValueError(f"style_masks must be (B, Hs, Ws) = {styles.shape[:3]}, got {style_masks.shape}")
        parts = {k: [] for k in ("structural", "semantic_style", "semantic_pixel")}
        for s in range(0, inputs.shape[0], self.chunk):
            sl = slice(s, s + self.chunk)
            e_gen = sobel_edges(grayscale(generated[sl]))
            parts["structural"].append(np.abs(sobel_edges(grayscale(inputs[sl])) - e_gen).mean(axis=(1, 2)))
            d, p = _semantic(inputs[sl], generated[sl], styles[sl], masks[sl], e_gen,
                             sobel_edges(grayscale(styles[sl])), self.lam, self.weights, self.empty_mask,
                             None if style_masks is None else style_masks[sl])
            parts["semantic_style"].append(d), parts["semantic_pixel"].append(p)
        cat = {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
        out = {"structural": cat["structural"], "semantic": cat["semantic_style"] + cat["semantic_pixel"]}
        if self.components:
            out.update(semantic_style=cat["semantic_style"], semantic_pixel=cat["semantic_pixel"])
        return {k: v.astype(np.float32) for k, v in out.items()}
