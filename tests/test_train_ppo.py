"""PPO (InstructRL4Pix) through the one training loop: the tiny default runs, checkpoints its
stat tracker with the rest of the state, and a killed run resumes to the same result."""
import json
import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
import ppo_instructrl4pix  # noqa: E402

from jaxedit import train  # noqa: E402


def tiny_config(workdir, **extra):
    c = ppo_instructrl4pix.get_config("tiny")
    c.workdir = str(workdir)
    over = {"train.updates": 2, "data.generate": 8, "sample.steps": 3, "eval.every": 2, "eval.generate": 8,
            "log.images_every": 2, "log.progress": False, "log.tensorboard": False, "checkpoint.every": 1,
            "train.inner_epochs": 2, "train.tracker_min_count": 2, **extra}
    for k, v in over.items():
        g, n = k.split(".")
        c[g][n] = v
    return c


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ppo_a")
    lines = []
    return train.train(tiny_config(workdir), log=lines.append), workdir, lines


def test_tiny_ppo_run_logs_rewards_and_saves_a_model(uninterrupted):
    r, workdir, lines = uninterrupted
    m = r["metrics"]
    for k in ("ppo/loss", "ppo/approx_kl", "ppo/clip_frac", "reward/reward_mean", "reward/attention_cos_mean",
              "reward/clipped_mae_mean", "heldout/reward_mean"):
        assert np.isfinite(m[k]), k
    assert 0 < m["reward/attention_cos_mean"] <= 1 and m["reward/prompts"] == 4 and m["ppo/skipped"] == 0
    assert int(r["state"].step) == 4  # 2 updates x 2 inner epochs x 1 minibatch
    assert any(line.startswith("step 0:") and "heldout/reward_mean" in line for line in lines)
    assert os.path.isfile(os.path.join(workdir, "model", "unet", "config.json"))
    assert any(f.startswith("events") for f in os.listdir(workdir)) or os.path.isdir(os.path.join(workdir, "images"))
    tracker = r["method"].get_state()["tracker"]
    assert sorted(tracker["buffers"]) == sorted(set(train.scenes.INSTRUCTIONS))
    assert sum(len(b) for b in tracker["buffers"].values()) == 16  # 2 updates x 8 samples


def test_killed_run_resumes_to_the_same_params_and_tracker(uninterrupted, tmp_path):
    r, _, _ = uninterrupted
    c = tiny_config(tmp_path)
    train.train(c, log=lambda s: None, stop_after=1)
    ckpt_meta = os.path.join(tmp_path, "checkpoints", "1", "meta", "metadata")
    if os.path.exists(ckpt_meta):  # the tracker is in the checkpoint's metadata
        assert "tracker" in json.load(open(ckpt_meta))["method"]
    resumed = train.train(c, log=lambda s: None)
    for a, b in zip(jax.tree_util.tree_leaves(resumed["state"]), jax.tree_util.tree_leaves(r["state"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert resumed["method"].get_state() == r["method"].get_state()


def test_ppo_config_errors(tmp_path):
    with pytest.raises(ValueError, match="set --config.model.style_adapter=False"):
        train.train(tiny_config(tmp_path, **{"model.style_adapter": True}), log=lambda s: None)
    with pytest.raises(ValueError, match="set --config.data.instructions"):
        train.train(tiny_config(tmp_path, **{"data.generate": 0}), log=lambda s: None)
    with pytest.raises(ValueError, match="no cross-attention layer at 2x2"):
        train.train(tiny_config(tmp_path, **{"reward.attention_downsample": 4}), log=lambda s: None)
