"""Pixel and depth-map metrics of edited images (NumPy only; float64 inside).

Images: (B, H, W, 3), either uint8 (divided by 255) or float in [0, 1] (anything outside [0, 1]
is refused: a [-1, 1] or [0, 255] float image would silently give wrong numbers). The two images
of a pair must have the same shape: resize first (MagicBrush resizes the generated image to the
ground truth's size). Every function returns float64 (B,), one value per pair.

MagicBrush protocol (also InstructRL4Pix Table 1 and its appendix A.3), reference
``OSU-NLP-Group/MagicBrush: evaluation/image_eval.py`` (``eval_distance``: ``nn.L1Loss`` /
``nn.MSELoss`` on ``ToTensor()`` images, per pair, then averaged over pairs):

- ``l1``  = mean_{h,w,c} |a − b|           (mean absolute error, pixels in [0, 1]);
- ``l2``  = mean_{h,w,c} (a − b)²          (the mean SQUARED error, not the Euclidean distance);
- ``psnr`` = 10·log10(1 / l2)               (data range 1; identical images give ``inf``, without a
  warning: the caller may cap it, e.g. at 100 dB, before averaging);
- ``ssim``: Wang et al. 2004 with one convention, that of scikit-image's
  ``structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=1, channel_axis=-1)``: Gaussian window σ = 1.5 truncated at 3.5σ (11 taps),
  K1 = 0.01, K2 = 0.03, population (co)variances, the SSIM map averaged over the pixels whose
  window lies inside the image (5 pixels cropped from each border), then over the channels.
  Images smaller than 11x11 are refused. (Implemented here with a separable 'valid'
  convolution: the border that scikit-image's 'reflect' padding touches is exactly the part it
  crops, so no padding is needed.)

Image-Editing Specialists (Tables 1-2). Masks: (B, H, W), 1 (True) inside the edit region, 0
outside; fractional values act as weights (the "outside" weight is 1 − m). A metric restricted
to a region with no pixels is NaN (e.g. ``*_out`` of a whole-frame edit); nanmean over a set.

- ``l2_out`` = Σ (1−m)·(a − b)² / (3·Σ (1−m)): the MSE of ``l2`` over the pixels outside the edit.
  The paper does not give the normalisation or the pixel range; this is the mean over the
  outside region in [0, 1] (the training regulariser of Eq. 9 instead divides by the whole frame:
  it equals ``l2_out · mean(1 − m)``).
- ``depth_all`` = mean_{h,w} |d_in − d_gen| (Eq. 8 on the whole frame);
  ``depth_out`` = the same mean over the pixels outside the edit mask. Depth maps (B, H, W) come
  from ``jaxedit.scorers.depth.DepthScorer.depth`` (Depth Anything V2, each map min-max
  normalised to [0, 1]), so both are in [0, 1]; the paper reports values of 15-60, on a scale it
  does not state (raw predicted disparity, or ×100): compare runs of this code with each other,
  not with the paper's absolute numbers.
"""
from __future__ import annotations

import numpy as np

__all__ = ["l1", "l2", "psnr", "ssim", "l2_out", "depth_all", "depth_out", "masked_mean",
           "SSIM_SIGMA", "SSIM_TRUNCATE", "SSIM_K1", "SSIM_K2"]

SSIM_SIGMA, SSIM_TRUNCATE, SSIM_K1, SSIM_K2 = 1.5, 3.5, 0.01, 0.03
_TOL = 1e-6  # float images may overshoot [0, 1] by rounding only


def _unit(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x.astype(np.float64) / 255.0
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{name}: expected uint8 or float images in [0, 1], got dtype {x.dtype}")
    x = x.astype(np.float64)
    if x.size and (x.min() < -_TOL or x.max() > 1 + _TOL):
        raise ValueError(f"{name}: float images must be in [0, 1], got range [{x.min():.4g}, {x.max():.4g}]")
    return x


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = _unit(a, "a"), _unit(b, "b")
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"expected (B, H, W, 3) images, got {a.shape}")
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {a.shape} vs {b.shape} (resize one to the other first)")
    return a, b


def _outside_weights(masks, shape: tuple[int, ...]) -> np.ndarray:
    m = np.asarray(masks)
    if m.shape != tuple(shape):
        raise ValueError(f"masks: expected shape {tuple(shape)} (B, H, W), got {m.shape}")
    m = m.astype(np.float64)
    if m.size and (m.min() < 0 or m.max() > 1):
        raise ValueError("masks must be in [0, 1] (1 = edit region)")
    return 1.0 - m


def masked_mean(values, weights) -> np.ndarray:
    """Σ w·v / Σ w over all but the batch axis (weights broadcast to values); NaN where Σ w = 0."""
    v = np.asarray(values, np.float64)
    w = np.broadcast_to(np.asarray(weights, np.float64), v.shape)
    axes = tuple(range(1, v.ndim))
    num, den = (w * v).sum(axis=axes), w.sum(axis=axes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def l1(a, b) -> np.ndarray:
    """Mean absolute error per pair, pixels in [0, 1] (MagicBrush L1)."""
    a, b = _pair(a, b)
    return np.abs(a - b).mean(axis=(1, 2, 3))


def l2(a, b) -> np.ndarray:
    """Mean squared error per pair, pixels in [0, 1] (MagicBrush "L2" = ``nn.MSELoss``)."""
    a, b = _pair(a, b)
    return ((a - b) ** 2).mean(axis=(1, 2, 3))


def psnr(a, b) -> np.ndarray:
    """10·log10(1 / MSE), data range 1; ``inf`` for identical images."""
    mse = l2(a, b)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(1.0 / mse)


def _gaussian_taps(sigma: float = SSIM_SIGMA, truncate: float = SSIM_TRUNCATE) -> np.ndarray:
    r = int(truncate * sigma + 0.5)  # as scipy.ndimage: radius 5, 11 taps for σ = 1.5
    x = np.arange(-r, r + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _valid_filter(x: np.ndarray, taps: np.ndarray, axis: int) -> np.ndarray:
    """Correlation with `taps` along `axis`, 'valid' part only (length n − len(taps) + 1)."""
    n, k = x.shape[axis], len(taps)
    out = None
    for i, w in enumerate(taps):
        sl = [slice(None)] * x.ndim
        sl[axis] = slice(i, n - k + 1 + i)
        term = w * x[tuple(sl)]
        out = term if out is None else out + term
    return out


def ssim(a, b) -> np.ndarray:
    """Mean SSIM per pair (scikit-image's Gaussian convention; see the module docstring)."""
    a, b = _pair(a, b)
    taps = _gaussian_taps()
    if min(a.shape[1:3]) < len(taps):
        raise ValueError(f"ssim needs images of at least {len(taps)}x{len(taps)}, got {a.shape[1:3]}")
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2  # data range 1
    out = np.empty(len(a))
    for i in range(len(a)):  # one pair at a time bounds the memory to a few image-sized maps
        x, y = a[i], b[i]
        stats = np.stack([x, y, x * x, y * y, x * y])          # (5, H, W, 3)
        ux, uy, uxx, uyy, uxy = _valid_filter(_valid_filter(stats, taps, 1), taps, 2)
        vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
        s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
        out[i] = s.mean(axis=(0, 1)).mean()                    # per channel, then over channels
    return out


def l2_out(a, b, masks) -> np.ndarray:
    """MSE over the pixels outside the edit mask (Specialists L2_out); NaN if there are none."""
    a, b = _pair(a, b)
    w = _outside_weights(masks, a.shape[:3])
    return masked_mean((a - b) ** 2, w[..., None])


def _depths(d_in, d_gen) -> tuple[np.ndarray, np.ndarray]:
    d_in, d_gen = np.asarray(d_in, np.float64), np.asarray(d_gen, np.float64)
    if d_in.ndim != 3 or d_in.shape != d_gen.shape:
        raise ValueError(f"expected two (B, H, W) depth maps of one shape, got {d_in.shape} and {d_gen.shape}")
    return d_in, d_gen


def depth_all(d_in, d_gen) -> np.ndarray:
    """mean_{h,w} |d_in − d_gen| over the whole frame (Specialists Depth_all, Eq. 8)."""
    d_in, d_gen = _depths(d_in, d_gen)
    return np.abs(d_in - d_gen).mean(axis=(1, 2))


def depth_out(d_in, d_gen, masks) -> np.ndarray:
    """mean |d_in − d_gen| over the pixels outside the edit mask (Specialists Depth_out)."""
    d_in, d_gen = _depths(d_in, d_gen)
    return masked_mean(np.abs(d_in - d_gen), _outside_weights(masks, d_in.shape))
