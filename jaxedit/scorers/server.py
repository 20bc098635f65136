"""The scorer process: loads a scorer once and answers requests over shared memory.

    python -m jaxedit.scorers.server --scorer=simple --address=/tmp/scorer.sock   # standalone
    # normally started by the trainer (jaxedit.scorers.shm_queue.ScorerClient) with --address

``--scorer`` is a registered name (`jaxedit.scorers.available_scorers()`) or "module:attribute";
``--kwargs`` a JSON object passed to its factory. Each request holds ``inputs``, ``generated``,
``styles`` (uint8 (B,H,W,3)) and ``masks`` (float32 (B,H,W)); the answer is the scorer's
{name: float32 (B,)}. A malformed request is answered with an error and the server goes on.
``--threads`` sets torch's intra-op threads when the scorer uses torch (inference mode on).
The client passes the connection's authkey in $JAXEDIT_SCORER_AUTHKEY; set it by hand for a
standalone server and its client. This process never imports jax.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time

from jaxedit.scorers.base import make_scorer
from jaxedit.scorers.shm_queue import serve

FIELDS = ("inputs", "generated", "styles", "masks")


def make_handler(scorer):
    def handle(arrays: dict):
        missing = [k for k in FIELDS if k not in arrays]
        if missing:
            raise ValueError(f"request lacks {missing}; it must hold {list(FIELDS)}")
        return scorer(*(arrays[k] for k in FIELDS))
    return handle


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scorer", default="simple", help="registered scorer name or module:attribute")
    ap.add_argument("--kwargs", default="{}", help="JSON object of keyword arguments for the scorer")
    ap.add_argument("--address", required=True, help="Unix socket path to listen on")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--exit-with-parent", action="store_true", help="exit when the starting process dies "
                    "(set by the client that starts it: even a SIGKILLed trainer leaves no scorer behind)")
    a = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # unwinds: the connection closes cleanly
    if a.exit_with_parent:
        parent = os.getppid()
        threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
    scorer = make_scorer(a.scorer, **json.loads(a.kwargs))
    context = contextlib.nullcontext()
    if "torch" in sys.modules:
        import torch
        if a.threads:
            torch.set_num_threads(a.threads)
        context = torch.inference_mode()
    print(f"scorer server: {a.scorer} ready, scores {scorer.names}, listening on {a.address}", flush=True)
    with context:
        serve(a.address, make_handler(scorer), scorer.names, log=lambda s: print(s, flush=True))


def _exit_with(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)  # orphaned mid-request too; nothing of ours to clean up (the client owns the segments)


if __name__ == "__main__":
    main()
