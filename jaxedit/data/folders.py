"""Training-example sources on disk: input images, optional masks, style images.

One job: find the files, validate them once, and read/resize one example's arrays.

- Inputs come from a folder (image files directly inside it, sorted by name) or a list file
  (one path per line, relative to the list file's folder unless absolute; blank lines and
  lines starting with `#` are ignored). Accepted extensions: `images.EXTENSIONS`.
- Masks (optional) live in one folder, matched to inputs by file stem (`road/0001.png` is the
  mask of `frames/0001.jpg`). A missing mask is an error naming the image; `masks=None` means
  a whole-frame mask (global edits such as "night").
- Styles: a folder of style images ("visual style prompts"), sorted by name; example `i` of
  the validated index gets style `i mod n_styles` (the paper cycles 5 style images). Indices
  count readable inputs only, so a skipped file shifts the pairing of the examples after it.

Validation (`build_index`) decodes every input, mask and style file once, in threads. An
unreadable file (corrupt, truncated, missing from a list) is skipped with a count and one
summary warning; more than `max_bad_files` of them is an error. Because skipping happens
here, before any shuffling, the example index -- and so every batch -- is deterministic and
resumable. A mask whose size differs from its image's ORIGINAL size is an error naming both.

Resize convention (`load_square`): the shorter side is resized to `resolution` (Lanczos,
aspect kept, longer side rounded), then the centre `resolution x resolution` square is cropped
(offset `(long - resolution) // 2`). Masks: binarised at their original size
(`mean(RGB) / 255 >= 0.5`, white = edit region; grayscale or RGB files, alpha ignored), resized the same way with bilinear
interpolation and binarised again at 0.5 -> float32 (H, W) in {0, 1}.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from jaxedit.data.images import EXTENSIONS, ImageError, list_images, read_image


class DataError(ValueError):
    """The training data cannot be used as given (empty folder, missing mask, wrong size, ...)."""


@dataclasses.dataclass(frozen=True)
class ExampleIndex:
    """Validated training examples. `masks[i]` is None for a whole-frame mask; `sizes[i]` is
    input i's original (width, height); `styles` may be empty (no style image); `instructions[i]`
    is example i's own instruction (instruction datasets, `jaxedit.data.instructions`; empty
    otherwise); `outputs[i]` its edited image and `rewards[i]` its reward (supervised / HIVE
    training; empty otherwise); `skipped` lists (path, reason) of unreadable files."""
    images: tuple[str, ...]
    masks: tuple[str | None, ...]
    sizes: tuple[tuple[int, int], ...]
    styles: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...] = ()
    instructions: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    rewards: tuple[float, ...] = ()

    def __len__(self) -> int:
        return len(self.images)

    def style_of(self, i: int) -> int:
        """Index into `styles` of example i: style images are cycled, `i mod n_styles`."""
        return i % len(self.styles)


def _accepted() -> str:
    return ", ".join(EXTENSIONS)


def list_inputs(source: str) -> list[str]:
    """Input image paths from a folder (sorted) or a list file (in file order)."""
    if os.path.isdir(source):
        paths = list_images(source)
        if not paths:
            raise DataError(f"no images in folder {source} (accepted extensions: {_accepted()})")
        return paths
    if not os.path.isfile(source):
        raise DataError(f"input images: {source} is neither a folder nor a list file")
    base = os.path.dirname(os.path.abspath(source))
    with open(source, encoding="utf-8") as f:
        lines = [ln.strip() for ln in f]
    paths = [p if os.path.isabs(p) else os.path.join(base, p)
             for p in lines if p and not p.startswith("#")]
    if not paths:
        raise DataError(f"list file {source} names no images (one path per line, relative to its folder)")
    return paths


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _mask_table(folder: str) -> dict[str, str]:
    paths = list_images(folder) if os.path.isdir(folder) else None
    if paths is None:
        raise DataError(f"mask folder not found: {folder}")
    if not paths:
        raise DataError(f"no masks in folder {folder} (accepted extensions: {_accepted()})")
    table: dict[str, str] = {}
    for p in paths:
        if _stem(p) in table:
            raise DataError(f"two masks with stem {_stem(p)!r} in {folder}: {table[_stem(p)]}, {p}")
        table[_stem(p)] = p
    return table


def _size(path: str) -> tuple[int, int]:
    """(width, height) after a full decode; raises ImageError for unreadable files."""
    arr = read_image(path)
    return arr.shape[1], arr.shape[0]


def _sizes(paths: list[str], threads: int) -> list[tuple[int, int] | str]:
    """Each path's size, or the error message when it cannot be read."""
    def one(p):
        try:
            return _size(p)
        except ImageError as e:
            return str(e)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        return list(pool.map(one, paths))


def build_index(images: str, styles: str, masks: str | None = None, *, max_bad_files: int = 10,
                threads: int = 4) -> ExampleIndex:
    """Finds and validates the training files (see the module docstring for the rules).

    images: folder or list file; styles: folder; masks: folder or None (whole-frame masks).
    Raises DataError for empty folders, a missing mask, a mask of the wrong size, more than
    `max_bad_files` unreadable files, or when no readable input or style image is left.
    """
    inputs = list_inputs(images)
    if not os.path.isdir(styles):
        raise DataError(f"style folder not found: {styles}")
    style_paths = list_images(styles)
    if not style_paths:
        raise DataError(f"no style images in folder {styles} (accepted extensions: {_accepted()})")
    mask_paths: list[str | None] = [None] * len(inputs)
    if masks is not None:
        table = _mask_table(masks)
        seen: dict[str, str] = {}
        for i, p in enumerate(inputs):
            s = _stem(p)
            if s in seen:
                raise DataError(f"two input images with stem {s!r} ({seen[s]}, {p}): masks are matched by stem")
            seen[s] = p
            if s not in table:
                raise DataError(f"no mask for image {p}: expected {os.path.join(masks, s)}.<ext> "
                                f"(ext one of {_accepted()}); pass masks=None for whole-frame masks")
            mask_paths[i] = table[s]

    return validate(inputs, mask_paths, style_paths, max_bad_files=max_bad_files, threads=threads,
                    what=images, styles_what=styles)


def validate(inputs: list[str], mask_paths: list[str | None], style_paths: list[str], *,
             instructions: list[str] | None = None, max_bad_files: int = 10, threads: int = 4,
             what: str = "the inputs", styles_what: str = "the styles", outputs: list[str] | None = None,
             rewards: list[float] | None = None) -> ExampleIndex:
    """Decodes every file once and builds the index (rules in the module docstring); examples whose
    input, mask or output (edited image) is unreadable are skipped together with their
    instruction and reward. ``style_paths`` may be empty (methods without a style image)."""
    masks_given = [m for m in mask_paths if m]
    outs = list(outputs) if outputs is not None else []
    checked = _sizes(inputs + masks_given + outs + style_paths, threads)
    in_sizes = checked[:len(inputs)]
    mask_sizes = iter(checked[len(inputs):len(inputs) + len(masks_given)])
    out_checks = checked[len(inputs) + len(masks_given):len(inputs) + len(masks_given) + len(outs)]
    style_checks = checked[len(inputs) + len(masks_given) + len(outs):]

    skipped: list[tuple[str, str]] = []
    keep: list[int] = []
    sizes = []
    for i, (p, m, size) in enumerate(zip(inputs, mask_paths, in_sizes)):
        msize = next(mask_sizes) if m else None
        if isinstance(size, str):
            skipped.append((p, size))
            continue
        if isinstance(msize, str):
            skipped.append((m, msize))
            continue
        if outs and isinstance(out_checks[i], str):
            skipped.append((outs[i], out_checks[i]))
            continue
        if msize is not None and msize != size:
            raise DataError(f"mask {m} is {msize[0]}x{msize[1]} (WxH) but its image {p} is "
                            f"{size[0]}x{size[1]}: masks must have their image's original size")
        keep.append(i), sizes.append(size)
    keep_styles = []
    for p, c in zip(style_paths, style_checks):
        (skipped.append((p, c)) if isinstance(c, str) else keep_styles.append(p))

    if skipped:
        listed = "; ".join(f"{p} ({r})" for p, r in skipped[:5]) + (" ..." if len(skipped) > 5 else "")
        if len(skipped) > max_bad_files:
            raise DataError(f"{len(skipped)} unreadable files, more than max_bad_files={max_bad_files}: {listed}")
        warnings.warn(f"skipped {len(skipped)} unreadable file(s) (max_bad_files={max_bad_files}): {listed}",
                      stacklevel=3)
    if not keep:
        raise DataError(f"no readable input images in {what}")
    if style_paths and not keep_styles:
        raise DataError(f"no readable style images in {styles_what}")
    return ExampleIndex(tuple(inputs[i] for i in keep), tuple(mask_paths[i] for i in keep), tuple(sizes),
                        tuple(keep_styles), tuple(skipped),
                        tuple(instructions[i] for i in keep) if instructions is not None else (),
                        tuple(outs[i] for i in keep) if outputs is not None else (),
                        tuple(float(rewards[i]) for i in keep) if rewards is not None else ())


def _square(im: Image.Image, resolution: int, resample) -> Image.Image:
    w, h = im.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), resample)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    return im.crop((left, top, left + resolution, top + resolution))


def load_square(path: str, resolution: int) -> np.ndarray:
    """uint8 (resolution, resolution, 3): shorter side resized (Lanczos), centre crop."""
    arr = read_image(path)
    if arr.shape[:2] == (resolution, resolution):
        return arr
    return np.asarray(_square(Image.fromarray(arr), resolution, Image.LANCZOS), dtype=np.uint8)


def load_mask(path: str | None, resolution: int, image_size: tuple[int, int] | None = None) -> np.ndarray:
    """float32 (resolution, resolution) in {0, 1}; None -> ones (whole frame).

    `image_size` (width, height) is the image's original size; a different mask size raises.
    """
    if path is None:
        return np.ones((resolution, resolution), np.float32)
    arr = read_image(path)
    if image_size is not None and (arr.shape[1], arr.shape[0]) != tuple(image_size):
        raise DataError(f"mask {path} is {arr.shape[1]}x{arr.shape[0]} (WxH) but its image is "
                        f"{image_size[0]}x{image_size[1]}")
    binary = (arr.astype(np.float32).mean(-1) / 255.0 >= 0.5).astype(np.float32)
    if binary.shape != (resolution, resolution):
        binary = np.asarray(_square(Image.fromarray(binary), resolution, Image.BILINEAR))
        binary = (binary >= 0.5).astype(np.float32)
    return binary
