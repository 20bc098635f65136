"""Evaluate editing checkpoints: edit a data set with each (and each sweep setting), score, report.

    python -m jaxedit.evaluate --checkpoints runs/a/model runs/b/model --data scenes/images \
        --masks scenes/masks --styles scenes/styles/snow --instruction "cover the road with snow" \
        --captions captions.json --out eval/ --sweep guidance_image=1.0:2.0:5 --scorer_weights /models/eval
    python -m jaxedit.evaluate --checkpoints ip2p --magicbrush --data MagicBrush/test --out eval_mb/ \
        --scorer_weights /models/eval          # L1, L2, CLIP-I, DINO, CLIP-T against the target images

Outputs under ``--out``: ``edits/<checkpoint>/<setting>/<image>.png`` (setting: ``default``, or
the swept values, e.g. ``guidance_image=1.5``; ``params.json`` beside them records how they were
made: a rerun with other parameters is refused), ``metrics/<checkpoint>/<setting>/<image>.json``
(per-edit metric cache), ``metrics.csv``, ``table.md``, ``report.html``, ``plots/`` (see
`jaxedit.metrics.report`). Everything is resumable: an existing edit (written atomically) is never
recomputed and a cached metric value never recomputed, so a killed run continues where it stopped.

Data (`jaxedit.metrics.dataset`): ``--data`` is a folder of images (names = file stems), with
``--masks`` / ``--styles`` folders and ``--captions`` (JSON / CSV: name -> output caption, input
caption, instruction); ``--magicbrush``: ``--data`` is a MagicBrush split folder (every turn from
its shipped input; CLIP-T captions from ``local_descriptions.json``) and the metrics compare the
edit with the TARGET image (InstructRL4Pix Table 1: L1, L2, CLIP-I, DINO, CLIP-T).

Metrics (`jaxedit.metrics.compute`): pixel ones run here (NumPy); Depth / CLIP / DINO / STY_in
run in a child process (``python -m jaxedit.metrics.compute``, PyTorch) that reads the edit files
from disk, with ``--scorer_weights`` = ``tiny`` (random models, tests) or a folder of local weights.
This process never imports torch. Noise: image i gets the same noise (``seed``, i) under every
checkpoint and setting, so differences between columns come from the models, not the noise.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import numpy as np

from jaxedit.metrics import compute
from jaxedit.metrics.dataset import Item, UsageError, load_items, read_captions

GUIDANCE = {"guidance_text": 7.5, "guidance_image": 1.5, "guidance_style": 3.0}
DEFAULT_ORDER = ("depth_out", "depth_all", "l2_out", "clip_t", "clip_dir", "sty_in", "l1", "l2", "psnr", "ssim",
                 "clip_i")
MAGICBRUSH = ("l1", "l2", "clip_i", "dino", "clip_t")


def parse_sweep(spec: str) -> tuple[str, list[float]]:
    """``param=lo:hi:n`` (n values, evenly spaced) or ``param=v1,v2,...``."""
    param, _, values = spec.partition("=")
    if param not in GUIDANCE or not values:
        raise UsageError(f"--sweep {spec!r}: expected PARAM=LO:HI:N or PARAM=V1,V2 with PARAM one of {list(GUIDANCE)}")
    try:
        if ":" in values:
            lo, hi, n = values.split(":")
            out = [float(v) for v in np.linspace(float(lo), float(hi), int(n))]
        else:
            out = [float(v) for v in values.split(",")]
    except ValueError as e:
        raise UsageError(f"--sweep {spec!r}: {e}") from e
    if not out:
        raise UsageError(f"--sweep {spec!r}: no values")
    return param, [round(v, 6) for v in out]


def settings(sweeps: dict[str, list[float]], base: dict[str, float]) -> list[tuple[str, dict]]:
    """(name, guidance values) of every combination of the swept values; ("default", base) without sweeps."""
    if not sweeps:
        return [("default", dict(base))]
    out = []
    for combo in itertools.product(*sweeps.values()):
        values = dict(base, **dict(zip(sweeps, combo)))
        out.append(("_".join(f"{p}={v:g}" for p, v in zip(sweeps, combo)), values))
    return out


def choose_metrics(requested, items: list[Item], *, magicbrush: bool, weights: str | None) -> list[str]:
    """The metrics to compute: `requested` (checked), or every one the data and weights allow."""
    have = {"mask": all(it.mask for it in items), "style": all(it.style for it in items),
            "caption": all(it.caption for it in items), "input_caption": all(it.input_caption for it in items)}
    usable = lambda m: all(have[n] for n in compute.NEEDS.get(m, ())) and (weights or m in compute.PIXEL)
    if requested:
        for m in requested:
            if m not in compute.METRICS:
                raise UsageError(f"unknown metric {m!r}; known: {', '.join(compute.METRICS)}")
            if m in compute.MODEL and not weights:
                raise UsageError(f"metric {m} needs --scorer_weights (tiny, or a folder of local weights)")
            missing = [n for n in compute.NEEDS.get(m, ()) if not have[n]]
            if missing:
                raise UsageError(f"metric {m} needs a {' and '.join(missing)} for every image")
        return list(requested)
    return [m for m in (MAGICBRUSH if magicbrush else DEFAULT_ORDER) if usable(m)]


def checkpoint_names(paths) -> dict[str, str]:
    """{unique name: path}: folder basenames, "-2", "-3" appended to repeats."""
    out: dict[str, str] = {}
    for p in paths:
        base = os.path.basename(os.path.normpath(p)) or "checkpoint"
        name, k = base, 2
        while name in out:
            name, k = f"{base}-{k}", k + 1
        out[name] = p
    return out


def _check_params(folder: str, params: dict) -> None:
    path = os.path.join(folder, "params.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        if old != params:
            diff = {k: (old.get(k), v) for k, v in params.items() if old.get(k) != v}
            raise UsageError(f"{folder} holds edits made with other parameters {diff} (old, new): use another "
                             "--out, or delete that folder")
        return
    os.makedirs(folder, exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(params, f, indent=1)
    os.replace(path + ".tmp", path)


def _pipeline(path: str, previous):
    """The checkpoint's EditPipeline; one of the same architecture as `previous` is `previous` with
    the new parameters swapped in, so its compiled programs are reused (no retracing per checkpoint)."""
    from jaxedit.pipeline import EditPipeline
    new = EditPipeline.from_pretrained(path)
    same = previous is not None and all(getattr(previous, k) == getattr(new, k) for k in (
        "unet", "vae", "text_encoder", "scheduler_config", "style"))
    if not same:
        return new
    for k in ("denoiser_params", "vae_params", "text_params", "tokenizer", "schedule"):
        setattr(previous, k, getattr(new, k))
    return previous


def make_edits(checkpoints: dict[str, str], items: list[Item], runs, out: str, *, steps: int, seed: int,
               sampler: str, resolution: int | None, batch_size: int, max_edits: int | None, log) -> dict:
    """Writes every missing ``edits/<checkpoint>/<setting>/<item>.png``; ``max_edits`` stops after
    that many new edits (a simulated kill). Returns {"computed", "cached", "stopped"}."""
    from jaxedit.data import images as imio
    counts, previous = {"computed": 0, "cached": 0, "stopped": False}, None
    for name, path in checkpoints.items():
        pipe = None
        for setting, guidance in runs:
            folder = os.path.join(out, "edits", name, setting)
            _check_params(folder, dict(checkpoint=os.path.abspath(path), steps=steps, seed=seed, sampler=sampler,
                                       resolution=resolution, **guidance))
            todo = [(i, it) for i, it in enumerate(items) if not os.path.exists(os.path.join(folder, it.name + ".png"))]
            counts["cached"] += len(items) - len(todo)
            if max_edits is not None and counts["computed"] + len(todo) > max_edits:
                todo, counts["stopped"] = todo[:max_edits - counts["computed"]], True
            if not todo:
                continue
            if pipe is None:
                pipe = previous = _pipeline(path, previous)
                if pipe.style and not all(it.style for it in items):
                    raise UsageError(f"{path} is style-conditioned: give --styles")
            log(f"{name} / {setting}: editing {len(todo)} image(s)")
            for start in range(0, len(todo), batch_size):
                chunk = todo[start:start + batch_size]
                styles = [imio.read_image(it.style) for _, it in chunk] if pipe.style else None
                edited = pipe.edit([imio.read_image(it.input) for _, it in chunk], [it.instruction for _, it in chunk],
                                   styles, steps=steps, sampler=sampler, seed=seed, resolution=resolution,
                                   batch_size=batch_size, image_ids=[i for i, _ in chunk], **guidance)
                for (_, it), im in zip(chunk, edited):
                    imio.write_image(np.asarray(im), os.path.join(folder, it.name + ".png"))
                    counts["computed"] += 1
        if counts["stopped"]:
            break
    return counts


def run(checkpoints, data: str, out: str, *, masks=None, styles=None, instruction=None, captions=None,
        magicbrush=False, sweeps=(), steps=100, seed=0, sampler="euler_ancestral", resolution=None, batch_size=4,
        guidance=None, metrics=None, scorer_weights=None, sty_embedders=compute.STY_EMBEDDERS, device="cpu",
        report_images=8, max_edits=None, log=print) -> dict:
    """The whole evaluation (see the module docstring); returns counts and output paths."""
    from jaxedit.metrics import report
    if not checkpoints:
        raise UsageError("give at least one checkpoint")
    sweep_map = dict(parse_sweep(s) if isinstance(s, str) else s for s in sweeps)
    items = load_items(data, masks=masks, styles=styles, instruction=instruction, magicbrush=magicbrush,
                       captions=read_captions(captions) if captions else None)
    chosen = choose_metrics(metrics, items, magicbrush=magicbrush, weights=scorer_weights)
    if scorer_weights and any(m in compute.MODEL for m in chosen):
        compute.weight_folders(scorer_weights, compute.models_for(chosen, sty_embedders))  # fail before editing
    log(f"metrics: {', '.join(chosen)}" + ("" if scorer_weights else " (--scorer_weights adds the model-based ones)"))
    names, runs = checkpoint_names(checkpoints), settings(sweep_map, dict(GUIDANCE, **(guidance or {})))
    edits = make_edits(names, items, runs, out, steps=steps, seed=seed, sampler=sampler, resolution=resolution,
                       batch_size=batch_size, max_edits=max_edits, log=log)
    result = {"edits": edits, "pixel_values": 0, "metric_jobs": 0, "metrics": chosen}
    if edits["stopped"]:
        return result
    jobs, rows = [], []
    for name, (setting, guidance), it in itertools.product(names, runs, items):
        edit = os.path.join(out, "edits", name, setting, it.name + ".png")
        jobs.append(dict(edit=edit, input=it.input, reference=it.target or it.input, mask=it.mask, style=it.style,
                         caption=it.caption, input_caption=it.input_caption,
                         cache=os.path.join(out, "metrics", name, setting, it.name + ".json")))
        rows.append(dict(checkpoint=name, setting=setting, **guidance, image=it.name))
    result["pixel_values"] = compute.compute_pixel(jobs, chosen)
    weights = os.path.abspath(scorer_weights) if scorer_weights and scorer_weights != "tiny" else scorer_weights
    result["metric_jobs"] = compute.compute_models(jobs, chosen, weights, sty_embedders, device=device,
                                                   workdir=out, log=log)
    for row, job in zip(rows, jobs):
        values = compute.cached_values(job)
        row.update({m: values.get(m, float("nan")) for m in chosen})
    grid = [dict(name=it.name, input=it.input, style=it.style, target=it.target,
                 edits=[(n if len(runs) == 1 else f"{n} {s}", os.path.join(out, "edits", n, s, it.name + ".png"))
                        for n in names for s, _ in runs]) for it in items[:report_images]]
    meta = dict(checkpoints=", ".join(f"{n} = {p}" for n, p in names.items()), data=data, images=len(items),
                steps=steps, seed=seed, sampler=sampler, scorer_weights=scorer_weights or "none",
                protocol="MagicBrush (vs target)" if magicbrush else "vs input")
    result["paths"] = report.write_report(out, rows, chosen, columns=["checkpoint", "setting", *GUIDANCE, "image"],
                                          sweeps=sweep_map, grid=grid, meta=meta)
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxedit.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", nargs="+", required=True, help="checkpoint folders (jaxedit.sample format)")
    p.add_argument("--data", required=True, help="folder of input images, or a MagicBrush split (--magicbrush)")
    p.add_argument("--out", required=True, help="output folder (reused: finished work is kept)")
    p.add_argument("--masks", help="folder of edit masks, same names as the images (white = edit region)")
    p.add_argument("--styles", help="folder of style images")
    p.add_argument("--instruction", help="the edit instruction for every image")
    p.add_argument("--captions", help="JSON or CSV: image name -> output caption (and input caption, instruction)")
    p.add_argument("--magicbrush", action="store_true", help="MagicBrush protocol: --data is a split folder")
    p.add_argument("--sweep", action="append", default=[], help="PARAM=LO:HI:N or PARAM=V1,V2 (guidance_*)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", default="euler_ancestral", choices=["euler_ancestral", "ddim"])
    p.add_argument("--resolution", type=int, help="resize the shorter side to this before editing")
    p.add_argument("--batch_size", type=int, default=4)
    for k, v in GUIDANCE.items():
        p.add_argument(f"--{k}", type=float, default=v, help=f"(default {v}; overridden by a --sweep of it)")
    p.add_argument("--metrics", nargs="+", help=f"subset of {', '.join(compute.METRICS)} (default: all usable)")
    p.add_argument("--scorer_weights", help="'tiny' (random models: tests) or a folder with sub-folders "
                   + ", ".join(compute.FOLDERS.values()))
    p.add_argument("--sty_embedders", nargs="+", default=list(compute.STY_EMBEDDERS), choices=compute.STY_EMBEDDERS)
    p.add_argument("--device", default="cpu", help="torch device of the metric process")
    p.add_argument("--report_images", type=int, default=8, help="images shown in report.html's grids")
    p.add_argument("--max_edits", type=int, help="stop after this many new edits (chunked runs)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from jaxedit.runtime import enable_compilation_cache
    enable_compilation_cache()
    try:
        result = run(args.checkpoints, args.data, args.out, masks=args.masks, styles=args.styles,
                     instruction=args.instruction, captions=args.captions, magicbrush=args.magicbrush,
                     sweeps=args.sweep, steps=args.steps, seed=args.seed, sampler=args.sampler,
                     resolution=args.resolution, batch_size=args.batch_size, metrics=args.metrics,
                     guidance={k: getattr(args, k) for k in GUIDANCE},
                     scorer_weights=args.scorer_weights, sty_embedders=args.sty_embedders, device=args.device,
                     report_images=args.report_images, max_edits=args.max_edits)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    e = result["edits"]
    print(f"edits: {e['computed']} computed, {e['cached']} cached" + (" (stopped: --max_edits)" if e["stopped"] else ""))
    if "paths" in result:
        print(f"-> {result['paths']['table']}, {result['paths']['html']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
