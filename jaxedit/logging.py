"""Run logging: console line, JSONL, TensorBoard event files and image grids under the workdir.

    log = RunLogger("runs/x")
    log.scalars(step, {"loss": 0.69, "score/struct_mean": 0.1})
    log.images(step, "samples", image_grid([[inp, sty, gen], ...]))

Only process 0 of a multi-host run writes (pass ``enabled=jax.process_index() == 0``).
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Mapping, Sequence

import numpy as np

from jaxedit.data import images as imio


def image_grid(rows: Sequence[Sequence[np.ndarray]], pad: int = 2) -> np.ndarray:
    """uint8 HWC images (same size) in rows -> one uint8 image with `pad` white pixels between."""
    h, w = rows[0][0].shape[:2]
    ncol = max(len(r) for r in rows)
    grid = np.full((len(rows) * (h + pad) - pad, ncol * (w + pad) - pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            grid[i * (h + pad):i * (h + pad) + h, j * (w + pad):j * (w + pad) + w] = im
    return grid


class RunLogger:
    """Writes ``metrics.jsonl``, TensorBoard events (``tb/``) and ``images/<name>_<step>.png``."""

    def __init__(self, workdir: str, *, tensorboard: bool = True, enabled: bool = True, echo=print):
        self.workdir, self.enabled, self.echo = workdir, enabled, echo
        self._tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            if tensorboard:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(os.path.join(workdir, "tb"))

    def scalars(self, step: int, metrics: Mapping[str, float], echo: bool = True) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **clean}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if math.isfinite(v):
                    self._tb.add_scalar(k, v, int(step))
            self._tb.flush()
        if echo and self.echo:
            self.echo(f"step {step}: " + "  ".join(f"{k}={v:.4g}" for k, v in clean.items()))

    def images(self, step: int, name: str, image: np.ndarray) -> str | None:
        """Writes a uint8 HWC image; returns its path."""
        if not self.enabled:
            return None
        path = os.path.join(self.workdir, "images", f"{name}_{int(step):06d}.png")
        imio.write_image(image, path)
        if self._tb is not None:
            self._tb.add_image(name, image, int(step), dataformats="HWC")
            self._tb.flush()
        return path

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()
