"""jaxedit U-Net forward (jitted) vs diffusers PyTorch ``UNet2DConditionModel`` forward, same weights.

    python bench/unet_forward.py                       # tiny + sd15, batches 1 and 3, 5 timed runs
    python bench/unet_forward.py --configs tiny --batches 2 --repeats 10

Cases: ``tiny`` is the 8-input-channel U-Net of tests/test_unet.py (block_out 32/64, 16x16 latents);
``sd15`` is the SD-1.5 / InstructPix2Pix U-Net (8 input channels, block_out 320/640/1280/1280,
860 M params) at 32x32 latents. Both use a 77-token context.

Per config, a child process builds the diffusers model with every parameter random
(tests/torch_ref.py's ``randomize_``) and saves it with ``save_pretrained`` to a temp folder. Per
(config, batch), one child process times PyTorch (``torch.inference_mode()``, threads = cores)
and saves its output; then another child loads the same weights into jaxedit
(safetensors -> ``convert.torch_to_flax``), times ``jax.jit(...).lower(...).compile()`` and the
compiled forward, and compares its output with PyTorch's. Separate processes keep each
framework's peak RSS its own and every compile cold (no persistent compilation cache).

Writes ``bench/results/unet_forward.json`` (``--out``) and prints a table. ratio = torch_ms /
jax_ms (> 1: jaxedit faster). Timings are medians of ``--repeats`` runs after ``--warmup`` runs.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "bench", "results", "unet_forward.json")

TINY = dict(sample_size=16, in_channels=8, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
            attention_head_dim=4, norm_num_groups=8)
SD15 = dict(sample_size=64, in_channels=8, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
            attention_head_dim=8, norm_num_groups=32)
CONFIGS = {"tiny": dict(unet=TINY, latent=16, context=77), "sd15": dict(unet=SD15, latent=32, context=77)}


# ------------------------------------------------------------------------------------------ helpers
def _rss_gb() -> dict:
    """Peak (ru_maxrss) and current RSS of this process in GB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB
    try:
        import psutil
        cur = psutil.Process().memory_info().rss / 1e9
    except ImportError:
        cur = None
    return {"peak_rss_gb": round(peak, 3), "rss_gb": None if cur is None else round(cur, 3)}


def _inputs(name: str, batch: int):
    """Deterministic NCHW latents, timesteps and context (NumPy), identical in both children."""
    import numpy as np
    spec = CONFIGS[name]
    rng = np.random.default_rng(1234 + batch)
    c, s = spec["unet"]["in_channels"], spec["latent"]
    x = rng.standard_normal((batch, c, s, s), dtype=np.float32)
    t = np.array([981, 500, 21, 750, 250, 1, 999, 100][:batch] + [500] * max(0, batch - 8), np.int32)
    ctx = rng.standard_normal((batch, spec["context"], spec["unet"]["cross_attention_dim"]), dtype=np.float32)
    return x, t, ctx


def _time(fn, warmup: int, repeats: int) -> dict:
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    return {"median_ms": round(statistics.median(wall), 2), "min_ms": round(min(wall), 2),
            "times_ms": [round(v, 2) for v in wall], "cpu_ms_median": round(statistics.median(cpu), 2)}


def _emit(result: dict) -> None:
    print("@@RESULT " + json.dumps(result), flush=True)


class _LazySafetensors:
    """Read-once mapping over a safetensors file: `items()` reads one tensor at a time.

    Plain reads, not mmap: mapped file pages would count towards this process's RSS.
    """
    DTYPES = {"F32": "float32", "F16": "float16", "F64": "float64", "I64": "int64", "I32": "int32"}

    def __init__(self, path: str):
        self.path = path

    def items(self):
        import numpy as np
        with open(self.path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                if info["dtype"] == "BF16":
                    import ml_dtypes
                    dtype = np.dtype(ml_dtypes.bfloat16)
                else:
                    dtype = np.dtype(self.DTYPES[info["dtype"]])
                begin, end = info["data_offsets"]
                f.seek(8 + n + begin)
                arr = np.fromfile(f, dtype=dtype, count=(end - begin) // dtype.itemsize)
                yield key, arr.reshape(info["shape"])


# ------------------------------------------------------------------------------------------ children
def child_prepare(name: str, folder: str, seed: int) -> None:
    """Random-weight diffusers model saved to `folder` (safetensors)."""
    import torch
    from diffusers import UNet2DConditionModel
    sys.path.insert(0, ROOT)
    from tests.torch_ref import randomize_
    t0 = time.perf_counter()
    model = randomize_(UNet2DConditionModel(**CONFIGS[name]["unet"]), seed=seed)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    _emit({"params": n, "prepare_s": round(time.perf_counter() - t0, 2)})


def child_torch(name: str, folder: str, batch: int, warmup: int, repeats: int, threads: int, out_npy: str) -> None:
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = UNet2DConditionModel.from_pretrained(folder).eval()
    load_s = time.perf_counter() - t0
    x, t, ctx = (torch.from_numpy(a) for a in _inputs(name, batch))
    with torch.inference_mode():
        run = lambda: model(x, t, ctx).sample
        timing = _time(run, warmup, repeats)
        out = run().numpy()
    np.save(out_npy, out.transpose(0, 2, 3, 1))  # NHWC, like jaxedit
    _emit({**timing, "load_s": round(load_s, 2), "threads": torch.get_num_threads(), **_rss_gb()})


def child_jax(name: str, folder: str, batch: int, warmup: int, repeats: int, ref_npy: str) -> None:
    import jax
    jax.config.update("jax_enable_compilation_cache", False)  # compile time must be cold
    import jax.numpy as jnp
    import numpy as np
    from flax import traverse_util
    sys.path.insert(0, ROOT)
    from jaxedit.models import convert, state_dict, unet

    t0 = time.perf_counter()
    with open(os.path.join(folder, "config.json")) as f:
        config = unet.Config.from_dict(json.load(f))
    module = unet.build(config)
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), *module.dummy_inputs()))["params"]
    path = state_dict.find_weight_file(folder)
    # Tensors are read one at a time (safetensors) and dtype=None keeps them as transposed views;
    # each is then copied into a JAX buffer and dropped, so the host never holds more than one
    # copy of the weights (peak RSS measures the model, not the loader).
    state = _LazySafetensors(path) if path.endswith(".safetensors") else state_dict.load_state_dict(path)
    flat = traverse_util.flatten_dict(convert.torch_to_flax(state, abstract, dtype=None, what="U-Net"))
    del state
    flat = {k: jnp.asarray(flat.pop(k), jnp.float32) for k in list(flat)}
    params = traverse_util.unflatten_dict(flat)
    del flat
    gc.collect()
    load_s = time.perf_counter() - t0

    x, t, ctx = _inputs(name, batch)
    args = (params, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(ctx))
    fwd = jax.jit(lambda p, x, t, c: module.apply({"params": p}, x, t, c))
    t0 = time.perf_counter()
    lowered = fwd.lower(*args)
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float((cost or {}).get("flops", 0.0))

    timing = _time(lambda: compiled(*args).block_until_ready(), warmup, repeats)
    out = np.asarray(compiled(*args), np.float64)
    ref = np.load(ref_npy).astype(np.float64)
    diff, scale = float(np.abs(out - ref).max()), float(np.abs(ref).max())
    _emit({**timing, "load_s": round(load_s, 2), "lower_s": round(lower_s, 2), "compile_s": round(compile_s, 2),
           "gflop": round(flops / 1e9, 2), **_rss_gb(),
           "parity": {"max_abs_diff": diff, "max_abs_torch": scale, "rel": diff / scale if scale else None}})


# ------------------------------------------------------------------------------------------ parent
def _run_child(args: list[str], env: dict | None = None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise RuntimeError(f"child {' '.join(args[:3])} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("@@RESULT "):])


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_facts() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError):
        mem = None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": None if mem is None else round(mem, 1),
            "platform": platform.platform(), "python": platform.python_version(),
            "versions": {p: _version(p) for p in ("jax", "jaxlib", "flax", "torch", "diffusers", "numpy")},
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="tiny,sd15", help="comma-separated: " + ",".join(CONFIGS))
    ap.add_argument("--batches", default="1,3", help="comma-separated batch sizes")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per framework and case")
    ap.add_argument("--warmup", type=int, default=2, help="untimed runs before timing (after compile for JAX)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    ap.add_argument("--xla-flags", default=None,
                    help="XLA_FLAGS for the JAX children (default: inherit the environment's); "
                         "for experiments only: users do not get flags set here")
    ap.add_argument("--out", default=DEFAULT_OUT, help="JSON results path ('' to skip writing)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.child:
        kind, name, folder, *rest = a.child
        if kind == "prepare":
            return child_prepare(name, folder, a.seed)
        batch, npy = int(rest[0]), rest[1]
        if kind == "torch":
            return child_torch(name, folder, batch, a.warmup, a.repeats, a.threads, npy)
        return child_jax(name, folder, batch, a.warmup, a.repeats, npy)

    configs = [c for c in a.configs.split(",") if c]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown config(s) {unknown}; choose from {sorted(CONFIGS)}")
    batches = [int(b) for b in a.batches.split(",") if b]
    common = ["--warmup", str(a.warmup), "--repeats", str(a.repeats), "--threads", str(a.threads),
              "--seed", str(a.seed)]
    jax_env = dict(os.environ)
    if a.xla_flags is not None:
        jax_env["XLA_FLAGS"] = a.xla_flags
    machine = machine_facts()
    results = []
    t_start = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="unet_bench_")
    try:
        for name in configs:
            folder = os.path.join(tmp, name)
            prep = _run_child(["--child", "prepare", name, folder, *common])
            print(f"[{name}] {prep['params'] / 1e6:.1f} M params, random weights saved in {prep['prepare_s']:.0f} s",
                  flush=True)
            for b in batches:
                npy = os.path.join(tmp, f"{name}_b{b}.npy")
                load0 = os.getloadavg()[0]
                tr = _run_child(["--child", "torch", name, folder, str(b), npy, *common])
                jx = _run_child(["--child", "jax", name, folder, str(b), npy, *common], env=jax_env)
                row = {"config": name, "batch": b, "latent": CONFIGS[name]["latent"],
                       "context_len": CONFIGS[name]["context"], "params": prep["params"],
                       "torch": tr, "jax": {k: v for k, v in jx.items() if k != "parity"},
                       "ratio_torch_over_jax": round(tr["median_ms"] / jx["median_ms"], 3),
                       "parity": jx["parity"], "loadavg_1min": [round(load0, 2), round(os.getloadavg()[0], 2)]}
                results.append(row)
                print(f"[{name} b{b}] torch {tr['median_ms']:.1f} ms, jax {jx['median_ms']:.1f} ms "
                      f"(x{row['ratio_torch_over_jax']:.2f}), compile {jx['lower_s'] + jx['compile_s']:.1f} s, "
                      f"rel diff {jx['parity']['rel']:.1e}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    doc = {"benchmark": "unet_forward", "machine": machine,
           "settings": {"configs": configs, "batches": batches, "repeats": a.repeats, "warmup": a.warmup,
                        "torch_threads": a.threads, "seed": a.seed,
                        "xla_flags": jax_env.get("XLA_FLAGS"), "dtype": "float32",
                        "ratio": "torch_ms / jax_ms (> 1 means jaxedit is faster)",
                        "timing": "wall-clock median (min, cpu-time median also given) per forward incl. "
                                  "block_until_ready; compile = jit(...).lower(...) + .compile(), cold",
                        "rss": "peak_rss_gb = ru_maxrss of the framework's own child process (weights "
                               "loading included); rss_gb = RSS after the timed runs"},
           "total_s": round(time.perf_counter() - t_start, 1), "results": results}
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(doc, f, indent=2)
    print_table(doc)
    if a.out:
        print(f"wrote {a.out}")


def print_table(doc: dict) -> None:
    head = (f"{'config':7s} {'batch':>5s} {'torch ms':>10s} {'jax ms':>10s} {'ratio':>6s} {'compile s':>9s} "
            f"{'RSS torch':>9s} {'RSS jax':>8s} {'rel diff':>9s}")
    print(head)
    print("-" * len(head))
    for r in doc["results"]:
        jx, tr = r["jax"], r["torch"]
        print(f"{r['config']:7s} {r['batch']:5d} {tr['median_ms']:10.1f} {jx['median_ms']:10.1f} "
              f"{r['ratio_torch_over_jax']:6.2f} {jx['lower_s'] + jx['compile_s']:9.1f} "
              f"{tr['peak_rss_gb']:8.2f}G {jx['peak_rss_gb']:7.2f}G {r['parity']['rel']:9.1e}")
    m = doc["machine"]
    print(f"{m['cpu']}, {m['cores']} cores; jax {m['versions']['jax']}, torch {m['versions']['torch']}, "
          f"diffusers {m['versions']['diffusers']}; ratio = torch_ms / jax_ms (> 1: jaxedit faster)")


if __name__ == "__main__":
    main()
