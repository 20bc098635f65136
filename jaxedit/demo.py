"""`make demo`: edit an image with the embedded tiny checkpoint, offline.

    python -m jaxedit.demo --out=outputs/demo

Builds the tiny InstructPix2Pix-format checkpoint (random weights!) once, draws a small street
scene, and edits it with two iterative instructions through the same code path as
`python -m jaxedit.sample` (load a diffusers folder, encode, guided Euler-ancestral sampling,
decode, write). The output is noise: the weights are random. Use `jaxedit.sample` with a real
checkpoint for real edits.
"""
from __future__ import annotations

import os

import numpy as np
from absl import app, flags

flags.DEFINE_string("out", "outputs/demo", "output folder.")
flags.DEFINE_integer("steps", 20, "sampling steps.")
flags.DEFINE_integer("size", 256, "image size in pixels (the papers train at 256).")
FLAGS = flags.FLAGS

WARNING = ("NOTE: the embedded demo checkpoint has RANDOM weights; its 'edit' is noise. It exercises the whole "
           "editing path offline. Point `python -m jaxedit.sample --checkpoint=DIR` at a real InstructPix2Pix "
           "folder for real edits.")


def street_scene(size: int) -> np.ndarray:
    """A synthetic uint8 (size, size, 3) picture: sky, sun, grass and a road in perspective."""
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.zeros((size, size, 3))
    img[:] = np.stack([0.35 + 0.3 * y, 0.55 + 0.3 * y, 0.95 - 0.2 * y], -1)  # sky
    ground = y > 0.55
    img[ground] = [0.25, 0.55, 0.2]
    half_width = 0.03 + 0.45 * np.clip((y - 0.55) / 0.45, 0, 1)
    img[ground & (np.abs(x - 0.5) < half_width)] = [0.3, 0.3, 0.32]  # road
    img[(x - 0.78) ** 2 + (y - 0.2) ** 2 < 0.006] = [1.0, 0.85, 0.3]  # sun
    return (img * 255).astype(np.uint8)


def main(argv):
    del argv
    from jaxedit import sample
    from jaxedit.data import images as imio
    from jaxedit.models.tiny import make_tiny_checkpoint

    print(WARNING)
    ckpt = make_tiny_checkpoint(os.path.join(os.path.dirname(os.path.abspath(FLAGS.out)), "tiny-ip2p"))
    src = os.path.join(FLAGS.out, "input", "street.png")
    imio.write_image(street_scene(FLAGS.size), src)
    dst = os.path.join(FLAGS.out, "edited")
    if os.path.exists(os.path.join(dst, "street.png")):
        os.remove(os.path.join(dst, "street.png"))
    counts = sample.run(ckpt, os.path.dirname(src), ["make it snow", "turn the road into gold"], dst,
                        steps=FLAGS.steps, sampler="euler_ancestral", seed=0)
    print(f"checkpoint: {ckpt}\ninput:  {src}\noutput: {os.path.join(dst, 'street.png')} "
          f"({counts['written']} written)\n{WARNING}")


if __name__ == "__main__":
    app.run(main)
