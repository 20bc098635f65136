"""Per-edit evaluation metrics, cached in one JSON file per edit; model-based ones in a child process.

    python -m jaxedit.metrics.compute JOBS.json      # written and started by `jaxedit.evaluate`

A job is one edit: ``{"edit", "input", "reference", "mask", "style", "caption", "input_caption",
"cache"}`` (paths; ``reference`` is the input, or MagicBrush's target image; ``mask``: white =
edit region, on the input's grid; ``caption``: the output caption). Metrics (``METRICS``):

- pixel, NumPy, run in the calling process (`pixel_values`): ``l1 l2 psnr ssim`` edit vs
  reference (edit resized to the reference's size, bicubic, as MagicBrush), ``l2_out`` edit vs
  input outside the mask; PSNR capped at ``PSNR_CAP`` dB (identical images);
- model-based, PyTorch, run here as a child process (`main`): ``depth_all depth_out`` (Depth
  Anything V2 maps of input and edit), ``clip_t`` (edit vs output caption), ``clip_dir``
  (directional: needs the input caption too), ``clip_i`` and ``dino`` (edit vs reference),
  ``sty_in`` (masked edit vs style image, averaged over ``sty_embedders``).

Weights (``weights``): "tiny" (small RANDOM models: tests) or a folder with sub-folders ``FOLDERS``:
``clip/`` (a transformers CLIPModel with its tokenizer), ``depth-anything-v2-small/``,
``dinov2/``, ``dreamsim/`` (DreamSim's checkpoint folder) and optionally ``dino/`` for
MagicBrush's DINO (a transformers ViTModel of DINO ViT-S/16, its final CLS token; else
``dinov2/``). DINO's input is the whole image squashed to the model's size (MagicBrush resizes to
256 and centre-crops 224: the same up to the cropped border).

Cache: ``job["cache"]`` holds ``{"edit": size-mtime of the edit file, "values": {metric: value},
"weights": {model metric: weights}}``; a value is recomputed only if missing, its edit file
changed, or (model metrics) it came from other weights. The child rewrites the caches after
every chunk, so a killed run keeps what it finished. NaN (empty region) is stored as null.
Importing this module imports neither jax nor torch.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np

from jaxedit.metrics import plot

PIXEL = ("l1", "l2", "psnr", "ssim", "l2_out")
MODEL = ("depth_all", "depth_out", "clip_t", "clip_dir", "clip_i", "dino", "sty_in")
METRICS = PIXEL + MODEL
HIGHER_IS_BETTER = frozenset({"psnr", "ssim", "clip_t", "clip_dir", "clip_i", "dino", "sty_in"})
LABELS = {"l1": "L1", "l2": "L2", "psnr": "PSNR", "ssim": "SSIM", "l2_out": "L2_out", "depth_all": "Depth_all",
          "depth_out": "Depth_out", "clip_t": "CLIP-T", "clip_dir": "CLIP-dir", "clip_i": "CLIP-I", "dino": "DINO",
          "sty_in": "STY_in"}
NEEDS = {"l2_out": ("mask",), "depth_out": ("mask",), "clip_t": ("caption",),
         "clip_dir": ("caption", "input_caption"), "sty_in": ("style",)}
FOLDERS = {"clip": "clip", "depth": "depth-anything-v2-small", "dinov2": "dinov2", "dreamsim": "dreamsim",
           "dino": "dino"}
STY_EMBEDDERS = ("dinov2", "clip", "dreamsim")
PSNR_CAP = 100.0
CHUNK = 16


def models_for(metrics, sty_embedders=STY_EMBEDDERS) -> set[str]:
    """Model keys (``FOLDERS``) the metrics need."""
    need = set()
    for m in metrics:
        need |= {"depth_all": {"depth"}, "depth_out": {"depth"}, "clip_t": {"clip"}, "clip_dir": {"clip"},
                 "clip_i": {"clip"}, "dino": {"dino"}, "sty_in": set(sty_embedders)}.get(m, set())
    return need


def weight_folders(weights: str, models) -> dict[str, str]:
    """{model key: folder} under `weights` ("tiny": {}); raises FileNotFoundError naming what is missing."""
    if weights == "tiny":
        return {}
    out, missing = {}, []
    for key in sorted(models):
        path = os.path.join(weights, FOLDERS[key])
        if key == "dino" and not os.path.isdir(path):
            path = os.path.join(weights, FOLDERS["dinov2"])
        (out.__setitem__(key, path) if os.path.isdir(path) else missing.append(path))
    if missing:
        raise FileNotFoundError(f"scorer weights: missing {', '.join(missing)} (sub-folders of {weights}: "
                                f"{', '.join(FOLDERS.values())})")
    return out


# ---------------------------------------------------------------- cache

def signature(path: str) -> str:
    st = os.stat(path)
    return f"{st.st_size}-{st.st_mtime_ns}"


def read_cache(job) -> dict:
    try:
        with open(job["cache"], encoding="utf-8") as f:
            c = json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}
    return c if c.get("edit") == signature(job["edit"]) else {}


def missing(job, metrics, weights: str) -> list[str]:
    c = read_cache(job)
    vals, w = c.get("values", {}), c.get("weights", {})
    return [m for m in metrics if m not in vals or (m in MODEL and w.get(m) != weights)]


def cached_values(job) -> dict[str, float]:
    return {k: (math.nan if v is None else float(v)) for k, v in read_cache(job).get("values", {}).items()}


def update_cache(job, values: dict, weights: str | None = None) -> None:
    c = read_cache(job) or {"edit": signature(job["edit"]), "values": {}, "weights": {}}
    for k, v in values.items():
        c["values"][k] = None if v is None or not math.isfinite(float(v)) else float(v)
        if k in MODEL:
            c["weights"][k] = weights
    folder = os.path.dirname(os.path.abspath(job["cache"]))
    os.makedirs(folder, exist_ok=True)
    plot.write_text(job["cache"], json.dumps(c))


# ---------------------------------------------------------------- images

def _read(path: str) -> np.ndarray:
    from jaxedit.data.images import read_image
    return read_image(path)


def _resize(image: np.ndarray, shape) -> np.ndarray:
    from PIL import Image
    if image.shape[:2] == tuple(shape[:2]):
        return image
    return np.asarray(Image.fromarray(image).resize((shape[1], shape[0]), Image.BICUBIC))


def _mask(path: str | None, shape) -> np.ndarray | None:
    if not path:
        return None
    from PIL import Image
    m = _read(path)
    if m.shape[:2] != tuple(shape[:2]):
        m = np.asarray(Image.fromarray(m).resize((shape[1], shape[0]), Image.NEAREST))
    return (m.astype(np.float32).mean(-1) / 255.0 >= 0.5).astype(np.float32)


def load_job(job) -> dict:
    """The job's arrays: edit, input, reference, edit_in / edit_ref (edit at their sizes), mask, style."""
    edit, inp = _read(job["edit"]), _read(job["input"])
    ref = inp if job["reference"] == job["input"] else _read(job["reference"])
    return dict(edit=edit, input=inp, reference=ref, edit_in=_resize(edit, inp.shape),
                edit_ref=_resize(edit, ref.shape), mask=_mask(job.get("mask"), inp.shape),
                style=_read(job["style"]) if job.get("style") else None)


def pixel_values(job, metrics) -> dict[str, float]:
    from jaxedit.metrics import pixel
    d = load_job(job)
    a, b = d["reference"][None], d["edit_ref"][None]
    fns = {"l1": lambda: pixel.l1(a, b), "l2": lambda: pixel.l2(a, b),
           "psnr": lambda: np.minimum(pixel.psnr(a, b), PSNR_CAP), "ssim": lambda: pixel.ssim(a, b),
           "l2_out": lambda: pixel.l2_out(d["input"][None], d["edit_in"][None], d["mask"][None])}
    return {m: float(fns[m]()[0]) for m in metrics if m in fns}


def compute_pixel(jobs, metrics) -> int:
    """Pixel metrics of every job that lacks them (in this process); returns the values computed."""
    n = 0
    for job in jobs:
        todo = [m for m in missing(job, metrics, "") if m in PIXEL]
        if todo:
            update_cache(job, pixel_values(job, todo))
            n += len(todo)
    return n


def compute_models(jobs, metrics, weights: str, sty_embedders=STY_EMBEDDERS, *, device: str = "cpu",
                   workdir: str, log=print) -> int:
    """Runs this module as a child process for the model-based metrics some jobs lack; returns the
    number of jobs sent (0: nothing to do, no process started)."""
    metrics = [m for m in metrics if m in MODEL]
    todo = [j for j in jobs if missing(j, metrics, weights)]
    if not todo:
        return 0
    os.makedirs(workdir, exist_ok=True)
    spec = os.path.join(workdir, "metric_jobs.json")
    with open(spec, "w", encoding="utf-8") as f:
        json.dump({"metrics": metrics, "weights": weights, "sty_embedders": list(sty_embedders), "device": device,
                   "jobs": todo}, f)
    log(f"computing {', '.join(metrics)} for {len(todo)} edit(s) in a scorer process")
    proc = subprocess.run([sys.executable, "-m", "jaxedit.metrics.compute", spec])  # its output: ours
    if proc.returncode:
        raise RuntimeError(f"the metric process failed (exit {proc.returncode}, its error above); jobs: {spec}")
    os.remove(spec)
    return len(todo)


# ---------------------------------------------------------------- child process (torch)

def _load_models(keys, weights: str, device: str) -> dict:
    import types
    import torch
    from jaxedit.metrics.clip_metrics import ClipMetrics
    from jaxedit.scorers.depth import DepthScorer
    from jaxedit.scorers.embed import EmbeddingScorer

    class ClipImage(torch.nn.Module):  # CLIPModel -> EmbeddingScorer("clip") interface
        def __init__(self, clip):
            super().__init__()
            self.clip = clip

        def forward(self, pixel_values):
            e = self.clip.get_image_features(pixel_values=pixel_values)
            return types.SimpleNamespace(image_embeds=getattr(e, "pooler_output", e))

    class ClsToken(torch.nn.Module):  # DINO v1 ViTModel: the final CLS token
        def __init__(self, vit):
            super().__init__()
            self.vit = vit

        def forward(self, pixel_values):
            return types.SimpleNamespace(pooler_output=self.vit(pixel_values=pixel_values).last_hidden_state[:, 0])

    dirs, models = weight_folders(weights, keys), {}
    tiny = weights == "tiny"
    if "clip" in keys:
        models["clip"] = ClipMetrics.tiny(device=device) if tiny else ClipMetrics.from_pretrained(dirs["clip"],
                                                                                                  device=device)
        size = int(models["clip"].model.config.vision_config.image_size)
        models["clip_image"] = EmbeddingScorer(ClipImage(models["clip"].model), "clip", size=size, device=device)
    if "depth" in keys:
        models["depth"] = DepthScorer.tiny(device=device) if tiny else DepthScorer.from_pretrained(dirs["depth"],
                                                                                                   device=device)
    for key in ("dinov2", "dreamsim"):
        if key in keys:
            models[key] = (EmbeddingScorer.tiny(key, device=device) if tiny
                           else EmbeddingScorer.from_pretrained(dirs[key], key, device=device))
    if "dino" in keys:
        if tiny:
            models["dino"] = EmbeddingScorer.tiny("dinov2", seed=1, device=device)
        else:
            from transformers import AutoConfig, ViTModel
            if AutoConfig.from_pretrained(dirs["dino"]).model_type == "vit":
                vit = ViTModel.from_pretrained(dirs["dino"], add_pooling_layer=False)
                models["dino"] = EmbeddingScorer(ClsToken(vit), "dinov2", size=vit.config.image_size, device=device)
            else:
                models["dino"] = EmbeddingScorer.from_pretrained(dirs["dino"], "dinov2", device=device)
    return models


def _per_shape(fn, *columns) -> list:
    """fn over groups of same-shaped rows (each column stacked), results back in row order."""
    groups: dict[tuple, list[int]] = {}
    for i in range(len(columns[0])):
        groups.setdefault(tuple(c[i].shape for c in columns), []).append(i)
    out = [None] * len(columns[0])
    for idx in groups.values():
        for i, r in zip(idx, fn(*[np.stack([c[i] for i in idx]) for c in columns])):
            out[i] = r
    return out


def model_values(models, rows, todo, sty_embedders) -> list[dict]:
    """Model metrics of loaded rows (`load_job` dicts + the job); todo[i]: row i's metrics."""
    from jaxedit.metrics import clip_metrics, pixel
    out = [dict() for _ in rows]

    def run(metric, fn):
        idx = [i for i, t in enumerate(todo) if metric in t]
        if idx:
            for i, v in zip(idx, fn([rows[i] for i in idx])):
                out[i][metric] = float(v)


    def embed_cos(model, a, b):
        ea, eb = _per_shape(model.embed, a), _per_shape(model.embed, b)
        return [float(np.dot(x, y)) for x, y in zip(ea, eb)]

    def sty(rs):
        embedders = [models["clip_image"] if k == "clip" else models[k] for k in sty_embedders]
        masks = [r["mask"] if r["mask"] is not None else np.ones(r["input"].shape[:2], np.float32) for r in rs]
        return _per_shape(lambda g, s, m: clip_metrics.sty_in(embedders, g, s, m),
                          [r["edit_in"] for r in rs], [r["style"] for r in rs], masks)

    idx = [i for i, t in enumerate(todo) if {"depth_all", "depth_out"} & set(t)]
    if idx:  # one depth map per image for both depth metrics
        d_in = _per_shape(models["depth"].depth_cached, [rows[i]["input"] for i in idx])
        d_gen = _per_shape(models["depth"].depth, [rows[i]["edit_in"] for i in idx])
        for i, a, b in zip(idx, d_in, d_gen):
            if "depth_all" in todo[i]:
                out[i]["depth_all"] = float(pixel.depth_all(a[None], b[None])[0])
            if "depth_out" in todo[i]:
                out[i]["depth_out"] = float(pixel.depth_out(a[None], b[None], rows[i]["mask"][None])[0])
    run("clip_t", lambda rs: models["clip"].clip_t([r["edit"] for r in rs], [r["job"]["caption"] for r in rs]))
    run("clip_dir", lambda rs: models["clip"].directional([r["input"] for r in rs], [r["edit_in"] for r in rs],
                                                          [r["job"]["input_caption"] for r in rs],
                                                          [r["job"]["caption"] for r in rs]))
    run("clip_i", lambda rs: models["clip"].clip_i([r["edit_ref"] for r in rs], [r["reference"] for r in rs]))
    run("dino", lambda rs: embed_cos(models["dino"], [r["edit_ref"] for r in rs], [r["reference"] for r in rs]))
    run("sty_in", sty)
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m jaxedit.metrics.compute JOBS.json", file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as f:
        spec = json.load(f)
    weights, sty_embedders = spec["weights"], spec.get("sty_embedders", STY_EMBEDDERS)
    todo = [(job, missing(job, spec["metrics"], weights)) for job in spec["jobs"]]
    todo = [(j, t) for j, t in todo if t]
    if not todo:
        return 0
    models = _load_models(models_for({m for _, t in todo for m in t}, sty_embedders), weights,
                          spec.get("device", "cpu"))
    done = 0
    for start in range(0, len(todo), CHUNK):
        chunk = todo[start:start + CHUNK]
        rows = [dict(load_job(j), job=j) for j, _ in chunk]
        for (job, _), values in zip(chunk, model_values(models, rows, [t for _, t in chunk], sty_embedders)):
            update_cache(job, values, weights)
        done += len(chunk)
        print(f"metrics: {done}/{len(todo)} edits", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
