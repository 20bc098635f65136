"""Edit images from the command line.

    python -m jaxedit.sample --checkpoint=/data/instruct-pix2pix --image=in.jpg \
        --instruction="make it snow" --out=out.png
    python -m jaxedit.sample --checkpoint=CKPT --image=frames/ --out=edited/ \
        --instruction="turn the sky into a sunset" --instruction="make the road wet"   # iterative

`--image` is a file or a folder; with a folder, `--out` is a folder, outputs keep the input
names, and images whose output already exists are skipped, so a killed run continues where it
stopped. Repeated `--instruction`s are applied in order, each to the previous result. Outputs
are written under a temporary name and renamed: nothing is ever half-written.
"""
from __future__ import annotations

import os
import sys
from typing import Sequence

from absl import app, flags

FLAGS = flags.FLAGS



class UsageError(ValueError):
    """Bad command-line input: reported as one line, exit code 2."""


def _outputs(image: str, out: str) -> list[tuple[str, str]]:
    from jaxedit.data import images as imio
    if os.path.isdir(image):
        if os.path.splitext(out)[1].lower() in imio.EXTENSIONS:
            raise UsageError(f"--image is a folder, so --out must be a folder, not {out}")
        files = imio.list_images(image)
        if not files:
            raise UsageError(f"no images ({', '.join(imio.EXTENSIONS)}) in {image}")
        return [(f, os.path.join(out, os.path.basename(f))) for f in files]
    if not os.path.exists(image):
        raise UsageError(f"image not found: {image}")
    if os.path.isdir(out) or not os.path.splitext(out)[1]:
        return [(image, os.path.join(out, os.path.basename(image)))]
    if os.path.splitext(out)[1].lower() not in imio.EXTENSIONS:
        raise UsageError(f"unsupported output extension: {out} (use one of {', '.join(imio.EXTENSIONS)})")
    return [(image, out)]


def _styles(style: Sequence[str] | None) -> list[str] | None:
    from jaxedit.data import images as imio
    if not style:
        return None
    if len(style) == 1 and os.path.isdir(style[0]):
        files = imio.list_images(style[0])
        if not files:
            raise UsageError(f"no style images in {style[0]}")
        return files
    return list(style)


def reward_suffix(checkpoint: str) -> str:
    """The text a HIVE condition-reward model was trained to edit best with (", image quality is
    five out of five", from ``hive_quantiles.json`` next to its weights); "" for other models."""
    import json
    path = os.path.join(checkpoint, "hive_quantiles.json")
    if not os.path.isfile(path):
        return ""
    with open(path, encoding="utf-8") as f:
        return json.load(f)["sample_suffix"]


def with_reward_suffix(instruction: str, suffix: str) -> str:
    """``instruction`` + ``suffix`` unless it already ends with it."""
    core = instruction.rstrip().rstrip(".")
    return core if not suffix or core.endswith(suffix) else core + suffix


def run(checkpoint: str, image: str, instructions: Sequence[str], out: str, *, style: Sequence[str] | None = None,
        sampler: str = "euler_ancestral", steps: int = 100, guidance_text: float = 7.5, guidance_image: float = 1.5,
        guidance_style: float = 3.0, seed: int = 0, resolution: int | None = None, batch_size: int = 4,
        dtype: str = "float32", log=print, progress_bar: bool = True) -> dict:
    """Edits `image` (file or folder) into `out`. Returns counts {"written", "skipped", "failed"}.

    Raises UsageError for bad arguments; unreadable images are reported and counted as failed.
    """
    import jax.numpy as jnp
    import numpy as np
    from tqdm import tqdm

    from jaxedit.data import images as imio
    from jaxedit.pipeline import SAMPLERS, EditPipeline

    if sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if not instructions or any(not i.strip() for i in instructions):
        raise UsageError("give at least one non-empty --instruction")
    if steps < 1:
        raise UsageError(f"--steps must be >= 1, got {steps}")
    pairs = _outputs(image, out)
    style_files = _styles(style)
    if style_files is not None and len(style_files) not in (1, len(pairs)):
        raise UsageError(f"{len(style_files)} style images for {len(pairs)} input images: give one, or one per image")
    todo = [(i, src, dst) for i, (src, dst) in enumerate(pairs) if not os.path.exists(dst)]
    counts = {"written": 0, "skipped": len(pairs) - len(todo), "failed": 0}
    if counts["skipped"]:
        log(f"skipping {counts['skipped']} image(s) whose output already exists")
    if not todo:
        return counts
    pipe = EditPipeline.from_pretrained(checkpoint, dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
    if style_files is None and pipe.style:
        raise UsageError("this checkpoint is style-conditioned: give --style image(s)")
    if style_files is not None and not pipe.style:
        raise UsageError("this checkpoint takes no style images (no style_adapter/ folder): drop --style")
    suffix = reward_suffix(checkpoint)
    if suffix:  # HIVE condition reward: edit with the best quality level, as trained
        log(f"HIVE condition-reward model: appending {suffix!r} to the instructions")
        instructions = [with_reward_suffix(i, suffix) for i in instructions]
    f = pipe.vae_scale_factor
    styles = None
    if style_files is not None:
        styles = [imio.read_image(s, notice=log) for s in style_files]
    bar = tqdm(total=len(todo) * len(instructions) * steps, unit="step", disable=not progress_bar)
    for start in range(0, len(todo), batch_size):
        batch, inputs = [], []
        for i, src, dst in todo[start:start + batch_size]:
            try:
                img = imio.read_image(src, notice=log)
            except imio.ImageError as e:
                log(f"error: {e}")
                counts["failed"] += 1
                bar.update(len(instructions) * steps)
                continue
            batch.append((i, dst))
            inputs.append(imio.resize_to_multiple(img, f, resolution, notice=log, name=src))
        if not batch:
            continue
        sty = None if styles is None else [styles[i] if len(styles) > 1 else styles[0] for i, _ in batch]
        current = inputs
        for k, instruction in enumerate(instructions):  # iterative edits
            current = [np.asarray(im) for im in pipe.edit(
                current, instruction, sty, steps=steps, sampler=sampler, guidance_text=guidance_text,
                guidance_image=guidance_image, guidance_style=guidance_style, seed=seed + 1000 * k,
                batch_size=batch_size, image_ids=[i for i, _ in batch], progress=lambda n: bar.update(n * steps))]
        for (i, dst), result in zip(batch, current):
            imio.write_image(result, dst)
            counts["written"] += 1
    bar.close()
    return counts


def define_flags() -> None:
    """The command-line flags (defined only when run as a program, so importing is side-effect free)."""
    flags.DEFINE_string("checkpoint", None, "diffusers-format checkpoint folder (unet/ vae/ text_encoder/ ...).")
    flags.DEFINE_string("image", None, "input image file, or a folder of images.")
    flags.DEFINE_multi_string("instruction", None, "edit instruction; repeat for iterative edits (applied in order).")
    flags.DEFINE_multi_string("style", None, "style image(s) for a style-conditioned model: one for all, or one per "
                              "input image; or one folder.")
    flags.DEFINE_string("out", None, "output file (single image) or folder.")
    flags.DEFINE_enum("sampler", "euler_ancestral", ["euler_ancestral", "ddim"], "sampler.")
    flags.DEFINE_integer("steps", 100, "sampling steps (the papers use 100 Euler ancestral steps).")
    flags.DEFINE_float("guidance_text", 7.5, "text guidance scale s_T.")
    flags.DEFINE_float("guidance_image", 1.5, "image guidance scale s_I.")
    flags.DEFINE_float("guidance_style", 3.0, "style guidance scale s_S (style-conditioned models).")
    flags.DEFINE_integer("seed", 0, "random seed.")
    flags.DEFINE_integer("resolution", None, "resize the shorter side to this (multiples of 8 kept); default: as is.")
    flags.DEFINE_integer("batch_size", 4, "images per batch.")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype (parameters stay float32).")


def main(argv):
    del argv
    from jaxedit.runtime import enable_compilation_cache
    enable_compilation_cache()
    try:
        for name in ("checkpoint", "image", "out"):
            if not getattr(FLAGS, name):
                raise UsageError(f"--{name} is required")
        counts = run(FLAGS.checkpoint, FLAGS.image, FLAGS.instruction or [], FLAGS.out, style=FLAGS.style,
                     sampler=FLAGS.sampler, steps=FLAGS.steps, guidance_text=FLAGS.guidance_text,
                     guidance_image=FLAGS.guidance_image, guidance_style=FLAGS.guidance_style, seed=FLAGS.seed,
                     resolution=FLAGS.resolution, batch_size=FLAGS.batch_size, dtype=FLAGS.dtype)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:  # CheckpointError, ImageError, ...
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{counts['written']} written, {counts['skipped']} skipped, {counts['failed']} failed -> {FLAGS.out}")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    define_flags()
    app.run(main)
