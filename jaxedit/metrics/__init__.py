"""Evaluation metrics of edited images.

``pixel`` (NumPy only, imported here): MagicBrush's L1 / L2 (MSE) / PSNR / SSIM and the
Image-Editing Specialists' masked L2_out, Depth_out, Depth_all. ``clip_metrics`` (PyTorch,
import it explicitly, in the scorer process only): CLIP-T, CLIP-I, directional CLIP similarity
and STY_in. ``compute`` runs the model-based metrics in a child process for `jaxedit.evaluate`
(``python -m jaxedit.metrics.compute``); ``dataset`` reads evaluation inputs (folders, captions,
MagicBrush); ``report`` writes metrics.csv / table.md / report.html; ``plot`` the trade-off
curves (SVG + PNG). This package's ``__init__`` imports neither jax nor torch.
"""
from jaxedit.metrics.pixel import depth_all, depth_out, l1, l2, l2_out, masked_mean, psnr, ssim

__all__ = ["depth_all", "depth_out", "l1", "l2", "l2_out", "masked_mean", "psnr", "ssim"]
