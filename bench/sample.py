"""Seconds per edit: jaxedit ``EditPipeline`` vs diffusers ``StableDiffusionInstructPix2PixPipeline``.

    python bench/sample.py                          # tiny (20 steps) + sd15 (5 steps), 256 px, batch 1
    python bench/sample.py --cases tiny --repeats 5

Cases (both 256x256 images -> 32x32 latents, batch 1, Euler ancestral, guidance text 7.5 / image
1.5, i.e. 3 U-Net rows per step in both frameworks):

- ``tiny``: ``jaxedit.models.tiny.make_tiny_checkpoint`` (0.8 M-param U-Net, tiny VAE and text
  encoder), ``--tiny-steps`` steps (default 20).
- ``sd15``: an SD-1.5 / InstructPix2Pix-size checkpoint with random weights (U-Net 8 in-channels,
  VAE and CLIP text encoder from ``third_party/checkpoints/instruct-pix2pix.json``; the text
  encoder's vocabulary is the tiny tokenizer's), built with jaxedit's ``load.random_params`` and
  ``load.export_model`` into a temporary diffusers folder (~3.9 GB, deleted at the end),
  ``--sd-steps`` steps (default 5).

Per case, one child process times diffusers (PyTorch, ``torch.inference_mode()``, threads = cores)
and another times jaxedit (cold: no persistent compilation cache), each loading the same folder.
Each child does ``--warmup`` untimed edits (the first of them is reported as the first-call time;
for jaxedit it includes every compile), then ``--repeats`` timed edits (jaxedit: ending with
``block_until_ready``), then times the fixed, per-edit, step-independent stages alone (text
encoder x2, VAE encode, VAE decode) so that ``per_step_s = (edit_s - fixed_s) / steps``.
Sampler: jaxedit ``sampler="euler_ancestral"`` (Karras sigmas); diffusers' checkpoint default
``EulerAncestralDiscreteScheduler`` (its own sigmas): the sigma table does not change the cost.

Writes ``bench/results/sample.json`` (``--out``) and prints a table. ratio = torch_s / jax_s
(> 1: jaxedit faster).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from unet_forward import _rss_gb, machine_facts  # noqa: E402  (same machine facts / RSS as unet_forward.py)

DEFAULT_OUT = os.path.join(ROOT, "bench", "results", "sample.json")
MANIFEST = os.path.join(ROOT, "third_party", "checkpoints", "instruct-pix2pix.json")
PROMPT = "make it snow"
GUIDANCE_TEXT, GUIDANCE_IMAGE = 7.5, 1.5


def _emit(result: dict) -> None:
    print("@@RESULT " + json.dumps(result), flush=True)


def _image(size: int):
    """Deterministic float image (1,H,W,3) in [-1,1] (NumPy), identical in both children."""
    import numpy as np
    return np.random.default_rng(1234).uniform(-1, 1, (1, size, size, 3)).astype(np.float32)


def _stats(times: list[float]) -> dict:
    return {"median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
            "times_s": [round(v, 3) for v in times]}


# ------------------------------------------------------------------------------------------ children
def child_prepare(case: str, folder: str, seed: int) -> None:
    """Writes the case's checkpoint to `folder` (diffusers layout, random weights)."""
    sys.path.insert(0, ROOT)
    from jaxedit.models import load, text, unet, vae
    from jaxedit.models.tiny import make_tiny_checkpoint

    t0 = time.perf_counter()
    if case == "tiny":
        make_tiny_checkpoint(folder, seed=seed)
    else:
        # Tokenizer, scheduler/ and model_index.json from a tiny checkpoint; the rest SD-1.5-size.
        tiny_dir = folder + "-tiny-src"
        make_tiny_checkpoint(tiny_dir, seed=seed)
        os.makedirs(folder)
        for sub in ("tokenizer", "scheduler"):
            shutil.copytree(os.path.join(tiny_dir, sub), os.path.join(folder, sub))
        shutil.copy(os.path.join(tiny_dir, "model_index.json"), folder)
        shutil.rmtree(tiny_dir)
        from transformers import CLIPTokenizer
        n_vocab = len(CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer")))
        with open(MANIFEST) as f:
            man = json.load(f)
        tcfg = dict(man["text_encoder_config"], vocab_size=n_vocab, bos_token_id=n_vocab - 2,
                    eos_token_id=n_vocab - 1, pad_token_id=n_vocab - 1)  # like tiny.tiny_configs
        for i, (sub, mod, cfg_dict) in enumerate((("unet", unet, man["unet_config"]), ("vae", vae, man["vae_config"]),
                                                  ("text_encoder", text, tcfg))):
            cfg = mod.Config.from_dict(cfg_dict)
            params = load.random_params(mod.build(cfg), seed=seed + i)
            load.export_model(params, cfg, os.path.join(folder, sub))
            del params
            gc.collect()
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)
    _emit({"prepare_s": round(time.perf_counter() - t0, 1), "checkpoint_gb": round(size / 1e9, 3), **_rss_gb()})


def child_torch(folder: str, size: int, steps: int, warmup: int, repeats: int, threads: int) -> None:
    import numpy as np
    import torch
    from diffusers import StableDiffusionInstructPix2PixPipeline
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - t0
    params = {k: sum(p.numel() for p in getattr(pipe, k).parameters()) for k in ("unet", "vae", "text_encoder")}
    image = torch.from_numpy(_image(size).transpose(0, 3, 1, 2).copy())  # NCHW in [-1,1]
    stamps: list[float] = []

    def on_step(_pipe, _i, _t, kwargs):
        stamps.append(time.perf_counter())
        return kwargs

    def edit():
        stamps.clear()
        t = time.perf_counter()
        out = pipe(PROMPT, image=image, num_inference_steps=steps, guidance_scale=GUIDANCE_TEXT,
                   image_guidance_scale=GUIDANCE_IMAGE, generator=torch.Generator().manual_seed(0),
                   output_type="pt", callback_on_step_end=on_step).images
        return time.perf_counter() - t, out

    with torch.inference_mode():
        first_s, out = edit()
        for _ in range(warmup - 1):
            edit()
        times, step_s = [], []
        for _ in range(repeats):
            dt, out = edit()
            times.append(dt)
            step_s += list(np.diff(stamps))  # steps 2..S (callback fires at each step's end)
        # Fixed stages alone: prompt + negative prompt encodes, VAE encode, VAE decode.
        ids = pipe.tokenizer([PROMPT, ""], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        lat = pipe.vae.encode(image).latent_dist.mode()
        fixed = []
        for _ in range(max(1, repeats)):
            t = time.perf_counter()
            pipe.text_encoder(ids[:1])
            pipe.text_encoder(ids[1:])
            pipe.vae.encode(image).latent_dist.mode()
            pipe.vae.decode(lat / pipe.vae.config.scaling_factor)
            fixed.append(time.perf_counter() - t)
    edit_s = statistics.median(times)
    fixed_s = statistics.median(fixed)
    _emit({**_stats(times), "first_call_s": round(first_s, 3), "load_s": round(load_s, 2),
           "fixed_s": round(fixed_s, 3), "per_step_s": round((edit_s - fixed_s) / steps, 4),
           "per_step_callback_s": round(statistics.median(step_s), 4) if step_s else None,
           "threads": torch.get_num_threads(), "params": params, "out_finite": bool(torch.isfinite(out).all()),
           **_rss_gb()})


def child_jax(folder: str, size: int, steps: int, warmup: int, repeats: int) -> None:
    import jax
    jax.config.update("jax_enable_compilation_cache", False)  # first call must compile cold
    import numpy as np
    sys.path.insert(0, ROOT)
    from jaxedit.pipeline import EditPipeline

    t0 = time.perf_counter()
    pipe = EditPipeline.from_pretrained(folder)
    jax.block_until_ready((pipe.denoiser_params, pipe.vae_params, pipe.text_params))
    load_s = time.perf_counter() - t0
    image = _image(size)

    def edit():
        t = time.perf_counter()
        out = pipe.edit_arrays(image, [PROMPT], steps=steps, sampler="euler_ancestral",
                               guidance_text=GUIDANCE_TEXT, guidance_image=GUIDANCE_IMAGE, seed=0)
        out.block_until_ready()
        return time.perf_counter() - t, out

    first_s, out = edit()
    for _ in range(warmup - 1):
        edit()
    times = []
    for _ in range(repeats):
        dt, out = edit()
        times.append(dt)
    lat = pipe.encode_images(image)
    fixed = []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        jax.block_until_ready((pipe.encode_text([PROMPT]), pipe.encode_text([""]), pipe.encode_images(image),
                               pipe.decode(lat * pipe.vae.config.scaling_factor)))
        fixed.append(time.perf_counter() - t)
    edit_s = statistics.median(times)
    fixed_s = statistics.median(fixed)
    _emit({**_stats(times), "first_call_s": round(first_s, 3), "load_s": round(load_s, 2),
           "fixed_s": round(fixed_s, 3), "per_step_s": round((edit_s - fixed_s) / steps, 4),
           "out_finite": bool(np.isfinite(np.asarray(out)).all()), **_rss_gb()})


# ------------------------------------------------------------------------------------------ parent
def _run_child(args: list[str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise RuntimeError(f"child {' '.join(args[:3])} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("@@RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="tiny,sd15", help="comma-separated: tiny, sd15")
    ap.add_argument("--size", type=int, default=256, help="image side in pixels (latents: size/8)")
    ap.add_argument("--tiny-steps", type=int, default=20)
    ap.add_argument("--sd-steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="timed edits per framework (tiny case)")
    ap.add_argument("--sd-repeats", type=int, default=2, help="timed edits per framework (sd15 case)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed edits first (the first = first-call time)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    ap.add_argument("--out", default=DEFAULT_OUT, help="JSON results path ('' to skip writing)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.child:
        kind, case, folder, *rest = a.child
        if kind == "prepare":
            return child_prepare(case, folder, a.seed)
        steps, repeats = int(rest[0]), int(rest[1])
        if kind == "torch":
            return child_torch(folder, a.size, steps, a.warmup, repeats, a.threads)
        return child_jax(folder, a.size, steps, a.warmup, repeats)

    if a.warmup < 1:
        ap.error("--warmup must be >= 1 (the first edit is the first-call time)")
    cases = [c for c in a.cases.split(",") if c]
    if any(c not in ("tiny", "sd15") for c in cases):
        ap.error(f"unknown case in {cases}; choose from tiny, sd15")
    machine = machine_facts()
    results = []
    t_start = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="sample_bench_")
    try:
        for case in cases:
            folder = os.path.join(tmp, case)
            prep = _run_child(["--child", "prepare", case, folder, "--seed", str(a.seed)])
            print(f"[{case}] checkpoint ({prep['checkpoint_gb']:.2f} GB) written in {prep['prepare_s']:.0f} s",
                  flush=True)
            steps = a.tiny_steps if case == "tiny" else a.sd_steps
            repeats = a.repeats if case == "tiny" else a.sd_repeats
            common = ["--size", str(a.size), "--warmup", str(a.warmup), "--threads", str(a.threads)]
            load0 = os.getloadavg()[0]
            tr = _run_child(["--child", "torch", case, folder, str(steps), str(repeats), *common])
            load_mid = os.getloadavg()[0]
            jx = _run_child(["--child", "jax", case, folder, str(steps), str(repeats), *common])
            shutil.rmtree(folder, ignore_errors=True)  # free the disk (sd15: ~3.9 GB) right away
            row = {"case": case, "image_px": a.size, "latent": a.size // 8, "batch": 1, "steps": steps,
                   "params": tr.pop("params"), "checkpoint_gb": prep["checkpoint_gb"], "prepare_s": prep["prepare_s"],
                   "torch": tr, "jax": jx, "ratio_torch_over_jax": round(tr["median_s"] / jx["median_s"], 3),
                   "loadavg_1min": [round(load0, 2), round(load_mid, 2), round(os.getloadavg()[0], 2)]}
            results.append(row)
            print(f"[{case}] torch {tr['median_s']:.2f} s/edit, jax {jx['median_s']:.2f} s/edit "
                  f"(x{row['ratio_torch_over_jax']:.2f}), jax first call {jx['first_call_s']:.1f} s", flush=True)
            _write(a.out, _document(a, machine, cases, results, t_start))  # an interrupted run keeps its cases
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    doc = _document(a, machine, cases, results, t_start)
    _write(a.out, doc)
    print_table(doc)
    if a.out:
        print(f"wrote {a.out}")


def _write(out: str, doc: dict) -> None:
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(doc, f, indent=2)


def _document(a, machine: dict, cases: list, results: list, t_start: float) -> dict:
    return {"benchmark": "sample", "machine": machine,
           "settings": {"cases": cases, "image_px": a.size, "batch": 1, "tiny_steps": a.tiny_steps,
                        "sd_steps": a.sd_steps, "repeats": a.repeats, "sd_repeats": a.sd_repeats,
                        "warmup": a.warmup, "torch_threads": a.threads, "seed": a.seed, "dtype": "float32",
                        "sampler": "jaxedit euler_ancestral (Karras sigmas) / diffusers "
                                   "EulerAncestralDiscreteScheduler (checkpoint default); same cost per step",
                        "guidance": {"text": GUIDANCE_TEXT, "image": GUIDANCE_IMAGE, "unet_rows_per_step": 3},
                        "xla_flags": os.environ.get("XLA_FLAGS"),
                        "ratio": "torch_s / jax_s (> 1 means jaxedit is faster)",
                        "timing": "wall-clock seconds per edit (text encode, VAE encode, sampling, VAE decode); "
                                  "median of the timed runs after `warmup` untimed ones; first_call_s = the first "
                                  "edit of a fresh process (jax: includes all compiles, cold cache)",
                        "per_step": "per_step_s = (median_s - fixed_s) / steps, fixed_s = text encoder x2 + VAE "
                                    "encode + VAE decode timed alone; torch also per_step_callback_s = median "
                                    "interval between diffusers' step-end callbacks",
                        "rss": "peak_rss_gb = ru_maxrss of the framework's own child process (weights loading "
                               "included); rss_gb = RSS at the end"},
           "total_s": round(time.perf_counter() - t_start, 1), "results": results}


def print_table(doc: dict) -> None:
    head = (f"{'case':5s} {'steps':>5s} {'torch s':>8s} {'jax s':>8s} {'ratio':>6s} {'torch s/step':>12s} "
            f"{'jax s/step':>10s} {'jax 1st s':>9s} {'RSS torch':>9s} {'RSS jax':>8s} {'load avg':>14s}")
    print(head)
    print("-" * len(head))
    for r in doc["results"]:
        jx, tr = r["jax"], r["torch"]
        print(f"{r['case']:5s} {r['steps']:5d} {tr['median_s']:8.2f} {jx['median_s']:8.2f} "
              f"{r['ratio_torch_over_jax']:6.2f} {tr['per_step_s']:12.3f} {jx['per_step_s']:10.3f} "
              f"{jx['first_call_s']:9.1f} {tr['peak_rss_gb']:8.2f}G {jx['peak_rss_gb']:7.2f}G "
              f"{'/'.join(f'{v:.1f}' for v in r['loadavg_1min']):>14s}")
    m = doc["machine"]
    print(f"{m['cpu']}, {m['cores']} cores; jax {m['versions']['jax']}, torch {m['versions']['torch']}, "
          f"diffusers {m['versions']['diffusers']}; 256 px, batch 1; ratio = torch_s / jax_s (> 1: jaxedit faster)")


if __name__ == "__main__":
    main()
