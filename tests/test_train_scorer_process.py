"""The trainer with the Specialists scorer in the scorer process (shared memory)."""
import json

import numpy as np

from jaxedit import train
from tests.test_train import tiny_config


def test_depth_scorer_process_run_resumes(tmp_path):
    """The tiny default with the paper's scorer set, tiny and random (Depth Anything, Grounding DINO ->
    SAM masks of the prompt "road", DreamSim) in the scorer process: a run stopped after one update
    resumes and finishes."""
    extra = {"score.process": True, "score.structural": "depth", "score.depth_weights": "tiny",
             "score.semantic": "dreamsim", "score.embed_weights": "tiny", "score.segment_weights": "tiny",
             "score.threads": 1, "eval.every": 0,
             "train.updates": 2, "checkpoint.every": 1}
    c = tiny_config(tmp_path, **extra)
    c.score.scorer = "specialist"
    first = train.train(c, log=lambda s: None, stop_after=1)
    assert int(first["state"].step) == 1 and not (tmp_path / "model").exists()
    second = train.train(c, log=lambda s: None)
    assert int(second["state"].step) == 2 and (tmp_path / "model").exists()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["d3po/loss"]) for r in rows)
    assert all(0 < r["score/structural_mean"] <= 1 for r in rows)
