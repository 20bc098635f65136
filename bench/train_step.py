"""Trainer throughput (sampling samples/s, update s/update) and the tiny default's learning curve,
for D3PO (default) or PPO (``--method ppo``: InstructRL4Pix, results in ``train_step_ppo.json``).

    python bench/train_step.py                      # tiny (50 updates + held-out curve) and sd15
    python bench/train_step.py --cases tiny --updates 20
    python bench/train_step.py --method ppo --cases tiny,sd15 --sd-mode lora

Cases, each in its own child process running the real trainer (``jaxedit.train.train``; cold: no
persistent compilation cache, so update 1 includes every compile):

- ``tiny``: ``configs/d3po_snow.py:tiny`` as shipped (tiny RANDOM checkpoint, 64 px generated
  scenes, 16 samples = 8 pairs per update, 6 DDIM steps, full fine-tuning, weight-free scorer)
  for ``--updates`` updates (default 50) with held-out scores (16 generated held-out scenes,
  fixed noise) before training and every 5 updates: the learning curve of ``heldout/total_mean``
  = structural + alpha * semantic (lower is better).
- ``sd15``: the same config on an SD-1.5 / InstructPix2Pix-size checkpoint with random weights
  (``bench/sample.py``'s ``child_prepare``: U-Net/VAE/text encoder of
  ``third_party/checkpoints/instruct-pix2pix.json``, 12-channel U-Net + style adapter of width
  320 added by the trainer), 256 px (32x32 latents), the smallest batch: 1 pair (2 samples) per
  update, ``--sd-steps`` DDIM steps (default 2, all trained), ``--sd-mode`` (default ``lora``:
  full fine-tuning of 860 M params with AdamW, a frozen reference copy and fp32 gradient
  accumulators needs more than this machine's 23 GB).

Steady-state numbers are medians over updates 2..N: ``samples_per_s`` = 2P / sampling-phase
seconds, ``update_s`` = seconds of the jitted update (awaited; PPO: all its inner-epoch steps),
``updates_per_s`` = 1 / (sampling + scoring + update) wall time per update. Writes
``bench/results/train_step.json`` (``train_step_ppo.json`` for PPO).

PPO cases: ``configs/ppo_instructrl4pix.py:tiny`` (8 samples per update, 6 DDIM steps, LoRA as
shipped unless ``--tiny-mode``), and sd15 with the 8-channel InstructPix2Pix U-Net (no adapter),
256 px, 2 samples per update, ``--sd-steps`` steps, attention maps at latent/4 (8x8).
"""
from __future__ import annotations

import argparse
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
from unet_forward import _rss_gb, machine_facts  # noqa: E402

DEFAULT_OUT = os.path.join(ROOT, "bench", "results", "train_step.json")


def _emit(result: dict) -> None:
    print("@@RESULT " + json.dumps(result), flush=True)


def child_train(method: str, case: str, workdir: str, updates: int, checkpoint: str, steps: int, mode: str,
                tiny_mode: str) -> None:
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    import d3po_snow
    import ppo_instructrl4pix
    from jaxedit import train

    c = ppo_instructrl4pix.get_config("tiny") if method == "ppo" else d3po_snow.get_config("tiny")
    c.workdir, c.train.updates = workdir, updates
    if tiny_mode:
        c.train.mode = tiny_mode
    c.log.tensorboard, c.log.images_every, c.log.progress = False, 0, False
    c.checkpoint.every = 10 ** 6  # only the final checkpoint
    if case == "sd15":
        c.model.checkpoint = checkpoint
        c.model.adapter_dim, c.model.adapter_heads = 320, 8
        c.data.resolution, c.data.generate = 256, 4
        c.sample.steps, c.sample.batch_size = steps, 2
        c.train.samples_per_update, c.train.micro_batch, c.train.mode = 2, 1, mode
        c.eval.every = 0
        if method == "ppo":
            c.train.micro_batch, c.reward.attention_downsample = 2, 4
    t0 = time.perf_counter()
    train.train(c, log=lambda s: None)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    steps_ = [r for r in rows if "time/update_s" in r]
    curve = [{"update": r["step"], **{k.split("/")[1]: round(r[k], 5) for k in r if k.startswith("heldout/")}}
             for r in rows if any(k.startswith("heldout/") for k in r)]
    stamps = [r["time"] for r in steps_]
    steady = steps_[1:]
    med = lambda k: statistics.median(r[k] for r in steady) if steady else None
    _emit({"method": method, "case": case, "mode": c.train.mode, "updates": len(steps_), "samples_per_update": c.train.samples_per_update,
           "steps": c.sample.steps, "resolution": c.data.resolution, "wall_s": round(wall, 1),
           "first_update_s": round(steps_[0]["time/sample_s"] + steps_[0]["time/update_s"], 2),
           "first_update_phase_s": round(steps_[0]["time/update_s"], 2),
           "samples_per_s": round(med("time/samples_per_s"), 3) if steady else None,
           "sample_s": round(med("time/sample_s"), 3) if steady else None,
           "update_s": round(med("time/update_s"), 3) if steady else None,
           "update_s_per_trained_step": round(med("time/update_s") / c.sample.steps, 3) if steady else None,
           "updates_per_s": round(1 / statistics.median(b - a for a, b in zip(stamps[1:], stamps[2:])), 4)
           if len(stamps) > 2 else None,
           "heldout_curve": curve, **_rss_gb()})


def _run_child(args: list[str]) -> dict:
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": "", "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *args], capture_output=True,
                         text=True, env=env, cwd=ROOT)
    for line in out.stdout.splitlines():
        if line.startswith("@@RESULT "):
            return json.loads(line[len("@@RESULT "):])
    raise RuntimeError(f"child {args} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="tiny,sd15", help="comma-separated: tiny, sd15")
    ap.add_argument("--updates", type=int, default=50, help="updates of the tiny case")
    ap.add_argument("--sd-updates", type=int, default=3, help="updates of the sd15 case")
    ap.add_argument("--sd-steps", type=int, default=2, help="DDIM steps of the sd15 case (all trained)")
    ap.add_argument("--sd-mode", default="lora", choices=("lora", "full"))
    ap.add_argument("--tiny-mode", default="", choices=("", "lora", "full"), help="override the tiny config's mode")
    ap.add_argument("--method", default="d3po", choices=("d3po", "ppo"))
    ap.add_argument("--out", default=None, help="JSON results path ('' to skip writing)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        kind, *rest = a.child
        if kind == "prepare":
            from sample import child_prepare
            child_prepare("sd15", rest[0], 0)
        else:
            child_train(kind, rest[0], rest[1], int(rest[2]), rest[3], int(rest[4]), rest[5], rest[6])
        return
    if a.out is None:
        a.out = DEFAULT_OUT if a.method == "d3po" else DEFAULT_OUT.replace(".json", f"_{a.method}.json")

    t_start, results = time.time(), []
    tmp = tempfile.mkdtemp(prefix="jaxedit-bench-train-")
    try:
        for case in a.cases.split(","):
            ckpt = ""
            if case == "sd15":
                ckpt = os.path.join(tmp, "sd15")
                prep = _run_child(["prepare", ckpt])
            load0 = _load()
            updates = a.updates if case == "tiny" else a.sd_updates
            r = _run_child([a.method, case, os.path.join(tmp, f"run-{case}"), str(updates), ckpt, str(a.sd_steps),
                            a.sd_mode, a.tiny_mode])
            r.update(load_before=load0, load_after=_load(), **({"prepare": prep} if case == "sd15" else {}))
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "heldout_curve"}), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    import jax
    doc = {"bench": "train_step", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t_start)),
           "machine": machine_facts(), "jax_backend": jax.default_backend(), "results": results}
    if a.out:
        os.makedirs(os.path.dirname(a.out), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(doc, f, indent=1)
    print_table(doc)


def print_table(doc: dict) -> None:
    print(f"\n{'case':6} {'mode':5} {'samples/s':>10} {'update s':>9} {'updates/s':>10} {'first s':>8} {'peak GB':>8}")
    for r in doc["results"]:
        print(f"{r['case']:6} {r['mode']:5} {r['samples_per_s']!s:>10} {r['update_s']!s:>9} "
              f"{r['updates_per_s']!s:>10} {r['first_update_s']:>8} {r['peak_rss_gb']:>8}")
        for p in r["heldout_curve"]:
            print(f"   held-out after {p['update']:3d} updates: " + ", ".join(
                f"{k.removesuffix('_mean')} {v:.4f}" for k, v in p.items() if k != "update"))


if __name__ == "__main__":
    main()
