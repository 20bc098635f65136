"""Image files <-> arrays at jaxedit's boundary.

Files and queues hold uint8 HWC RGB; JAX code takes float32 NHWC in [-1, 1]. Reading converts
grayscale / RGBA / palette / 16-bit images to 8-bit RGB and says so; a missing, corrupt or
unsupported file raises `ImageError` naming it.
"""
from __future__ import annotations

import os
import tempfile
from typing import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


class ImageError(ValueError):
    """An image file is missing, unreadable or unsupported."""


def read_image(path: str, notice: Callable[[str], None] | None = None) -> np.ndarray:
    """Reads an image file as uint8 (H, W, 3) RGB; conversions are reported through `notice`."""
    if not os.path.isfile(path):
        raise ImageError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                arr = arr / (65535.0 if arr.max() > 255 else 255.0) * 255.0
                im = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8)).convert("RGB")
            elif mode != "RGB":
                im = im.convert("RGBA").convert("RGB") if mode == "P" else im.convert("RGB")
            out = np.asarray(im, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ImageError(f"cannot read image {path}: {e}") from e
    if mode != "RGB" and notice:
        notice(f"{path}: converted {mode} image to 8-bit RGB")
    return out


def resize_to_multiple(image: np.ndarray, multiple: int = 8, size: int | None = None,
                       notice: Callable[[str], None] | None = None, name: str = "image") -> np.ndarray:
    """Resizes uint8 HWC so both sides are multiples of `multiple` (Lanczos).

    With `size`, the shorter side becomes `size` first (aspect kept), as InstructPix2Pix does.
    """
    h, w = image.shape[:2]
    if size:
        scale = size / min(h, w)
        h, w = max(1, round(h * scale)), max(1, round(w * scale))
    th, tw = max(multiple, h // multiple * multiple), max(multiple, w // multiple * multiple)
    if (th, tw) == image.shape[:2]:
        return image
    if notice and not size:
        notice(f"{name}: {image.shape[1]}x{image.shape[0]} is not a multiple of {multiple}; resized to {tw}x{th}")
    return np.asarray(Image.fromarray(image).resize((tw, th), Image.LANCZOS))


def to_model(images: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W, 3) -> float32 in [-1, 1]."""
    return images.astype(np.float32) / 127.5 - 1.0


def from_model(images) -> np.ndarray:
    """float (..., H, W, 3) in [-1, 1] -> uint8, rounded and clipped."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def write_image(image: np.ndarray, path: str) -> None:
    """Writes uint8 HWC atomically (temporary name in the same folder, then rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    ext = os.path.splitext(path)[1].lower() or ".png"
    fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=ext, dir=folder)
    os.close(fd)
    try:
        Image.fromarray(image).save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def list_images(folder: str) -> list[str]:
    """Sorted image files (by extension) directly inside `folder`."""
    if not os.path.isdir(folder):
        raise ImageError(f"image folder not found: {folder}")
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.lower().endswith(EXTENSIONS) and not f.startswith("."))
