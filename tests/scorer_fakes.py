"""Scorers for the transport tests, loaded by the server as "tests.scorer_fakes:<Name>"."""
import os
import time

import numpy as np

from jaxedit.scorers.base import check_batch


class Sums:
    """structural = per-sample sum of `generated` (exact in float32 for small images), semantic =
    sum of `masks`; `delay` seconds per request."""
    names = ("structural", "semantic")

    def __init__(self, delay: float = 0.0):
        self.delay = delay

    def __call__(self, inputs, generated, styles, masks):
        inputs, generated, styles, masks = check_batch(inputs, generated, styles, masks)
        time.sleep(self.delay)
        return {"structural": generated.reshape(len(generated), -1).sum(1).astype(np.float32),
                "semantic": masks.reshape(len(masks), -1).sum(1).astype(np.float32)}


class DiesOnce(Sums):
    """Exits with code 3 in the middle of its first request, if `marker` does not exist yet
    (it creates it first: a restarted server then works)."""

    def __init__(self, marker: str, delay: float = 0.0):
        super().__init__(delay)
        self.marker = marker

    def __call__(self, *args):
        if not os.path.exists(self.marker):
            open(self.marker, "w").close()
            print("DiesOnce: dying now", flush=True)
            os._exit(3)
        return super().__call__(*args)
