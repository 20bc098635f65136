"""Round trip of a scoring request: jaxedit's shared-memory queue vs a pickled multiprocessing.Queue.

    python bench/scorer_queue.py                # 8 x 512 x 512 x 3 uint8 images, 30 round trips each

Payload per request (as the trainer sends it): inputs, generated, styles uint8 (B,H,W,3) and
masks float32 (B,H,W), B = 8, H = W = 512 (25.2 MB). The server does no work (it returns B
float32 zeros), so the time is the transport alone:

- ``shm``: `jaxedit.scorers.shm_queue.ScorerClient` + the real server process
  (``python -m jaxedit.scorers.server`` with a no-op scorer): copy into a shared-memory slot,
  a small control message over a Unix socket, the server copies the arrays out, answers.
- ``mp_queue``: the same arrays pickled through a ``multiprocessing.Queue`` to a child process,
  which answers through a second queue.

Reports the median / min round-trip ms and GB/s (payload bytes / median round trip) and writes
``bench/results/scorer_queue.json``.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
from unet_forward import machine_facts  # noqa: E402

from jaxedit.scorers.shm_queue import ScorerClient  # noqa: E402

DEFAULT_OUT = os.path.join(ROOT, "bench", "results", "scorer_queue.json")


class Noop:
    """A scorer that does nothing (the server side of the benchmark)."""
    names = ("structural", "semantic")

    def __init__(self, **unused):
        pass

    def __call__(self, inputs, generated, styles, masks):
        z = np.zeros(len(inputs), np.float32)
        return {"structural": z, "semantic": z}


def _payload(b: int, size: int) -> dict:
    rng = np.random.default_rng(0)
    img = lambda: rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8)
    return {"inputs": img(), "generated": img(), "styles": img(),
            "masks": (rng.uniform(size=(b, size, size)) > 0.5).astype(np.float32)}


def _queue_server(requests, answers):
    scorer = Noop()
    while True:
        msg = requests.get()
        if msg is None:
            return
        rid, arrays = msg
        answers.put((rid, scorer(**arrays)))


def bench_shm(payload: dict, repeats: int) -> list[float]:
    command = [sys.executable, "-m", "jaxedit.scorers.server", "--scorer=bench.scorer_queue:Noop"]
    size = sum(a.nbytes for a in payload.values())
    times = []
    with ScorerClient(command, slots=2, slot_bytes=size + (2 << 20)) as client:
        client(**payload)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            client(**payload)
            times.append(time.perf_counter() - t0)
    return times


def bench_mp_queue(payload: dict, repeats: int) -> list[float]:
    ctx = mp.get_context("spawn")
    requests, answers = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_queue_server, args=(requests, answers), daemon=True)
    proc.start()
    times = []
    try:
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            requests.put((i, payload))
            rid, _ = answers.get(timeout=120)
            assert rid == i
            if i:  # the first is the warm-up
                times.append(time.perf_counter() - t0)
    finally:
        requests.put(None)
        proc.join(10)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", default=DEFAULT_OUT, help="JSON results path ('' to skip writing)")
    a = ap.parse_args()
    payload = _payload(a.batch, a.size)
    size = sum(x.nbytes for x in payload.values())
    results = []
    for name, fn in (("shm", bench_shm), ("mp_queue", bench_mp_queue)):
        times = fn(payload, a.repeats)
        med = statistics.median(times)
        results.append({"transport": name, "median_ms": round(1e3 * med, 2), "min_ms": round(1e3 * min(times), 2),
                        "gb_per_s": round(size / med / 1e9, 2), "load": round(os.getloadavg()[0], 2)})
        print(json.dumps(results[-1]), flush=True)
    doc = {"bench": "scorer_queue", "payload": {"batch": a.batch, "size": a.size, "bytes": size},
           "repeats": a.repeats, "machine": machine_facts(), "results": results}
    if a.out:
        os.makedirs(os.path.dirname(a.out), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
