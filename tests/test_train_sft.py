"""Supervised / HIVE training through the one loop (method "sft"): the tiny condition run
checkpoints, resumes bit-exactly (EMA in the optimizer state, quantile thresholds in the method
state), evaluates and saves the EMA weights and the quantiles file; the weighted mode weights;
config errors; and (JAXEDIT_SLOW_TESTS=1) the tiny model learns the "make the road white" edit.
"""
import copy
import dataclasses
import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
import hive_sft  # noqa: E402

from jaxedit import parallel, train  # noqa: E402
from jaxedit.rl import hive  # noqa: E402


def tiny_config(workdir, mode="condition", checkpoint="", **extra):
    c = hive_sft.build(mode, "tiny")
    c.workdir = str(workdir)
    c.model.checkpoint = checkpoint  # the session's tiny checkpoint: not rebuilt per run
    over = {"train.updates": 2, "data.generate": 16, "eval.every": 2, "eval.generate": 8, "checkpoint.every": 1,
            "log.images_every": 2, "log.progress": False, "log.tensorboard": False, **extra}
    for k, v in over.items():
        g, n = k.split(".")
        c[g][n] = v
    return c


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_checkpoint):
    workdir = tmp_path_factory.mktemp("sft_a")
    return train.train(tiny_config(workdir, checkpoint=tiny_checkpoint), log=lambda s: None), workdir


def test_condition_run_saves_ema_model_and_quantiles(uninterrupted):
    r, workdir = uninterrupted
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2"]
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1, 2]
    assert "heldout/latent_mse" in rows[0] and "heldout/edit_progress" in rows[2] and "sft/loss" in rows[1]
    m = r["metrics"]
    assert np.isfinite(m["sft/loss"]) and m["sft/skipped"] == 0 and m["sft/weight_max"] == 1.0  # unweighted
    assert sorted(os.listdir(workdir / "images"))[0].startswith("input_target")
    # the thresholds: quantiles of ALL training rewards, in the method state and next to the model
    from jaxedit.data.instructions import build_instruction_index
    ix = build_instruction_index(str(workdir / "data" / "triples.jsonl"), with_outputs=True, with_rewards=True)
    want = np.quantile(np.asarray(ix.rewards), [0.2, 0.4, 0.6, 0.8])
    assert len(set(ix.rewards)) == 16  # graded edits
    np.testing.assert_array_equal(r["method"].thresholds, want)
    saved = json.loads((workdir / "model" / "hive_quantiles.json").read_text())
    assert saved["thresholds"] == [float(x) for x in want]
    assert saved["sample_suffix"] == ", image quality is five out of five" and saved["levels"][2] == "three"
    from jaxedit.sample import reward_suffix, with_reward_suffix   # what `python -m jaxedit.sample` appends
    assert with_reward_suffix("make the road white.", reward_suffix(str(workdir / "model"))) == \
        "make the road white, image quality is five out of five"
    assert reward_suffix(str(workdir / "data")) == ""
    from jaxedit import export   # an export of the checkpoint writes the same quantiles file
    out = export.export(str(workdir), str(workdir / "exported"))
    assert (workdir / "exported" / "hive_quantiles.json").read_text() == \
        (workdir / "model" / "hive_quantiles.json").read_text() and out
    # the saved U-Net holds the EMA weights (not the last trained ones)
    from jaxedit.models import load
    _, saved_params = load.load_unet(str(workdir / "model" / "unet"))
    ema = hive.find_ema(r["state"].opt_state)
    assert int(ema.count) == 2
    for a, b in zip(_leaves(saved_params), _leaves(ema.ema)):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(_leaves(saved_params), _leaves(r["state"].params)))
    # the prompts: the training level of each example, "five" held out
    method = r["method"]
    levels = hive.reward_levels(ix.rewards, want)
    assert method.prompts(ix, [0, 1]) == [hive.with_quality("make the road white", k) for k in levels[:2]]
    assert method.prompts(ix, [0], heldout=True) == ["make the road white, image quality is five out of five"]


def test_resume_restores_ema_and_quantiles_exactly(uninterrupted, tmp_path, tiny_checkpoint):
    """A run left with only the update-1 checkpoint (as a run killed after it) resumes to the
    uninterrupted run's state: params, Adam, the EMA (in the optimizer state) and the thresholds."""
    r, workdir = uninterrupted
    shutil.copytree(workdir / "checkpoints" / "1", tmp_path / "checkpoints" / "1")
    meta = json.loads((tmp_path / "checkpoints" / "1" / "meta" / "metadata").read_text())
    assert meta["method"]["thresholds"] == [float(x) for x in r["method"].thresholds]
    lines = []
    resumed = train.train(tiny_config(tmp_path, checkpoint=tiny_checkpoint, **{"eval.every": 0}), log=lines.append)
    assert any(x.startswith("resumed from update 1") for x in lines)
    assert resumed["method"].get_state() == r["method"].get_state()
    ema_a, ema_b = hive.find_ema(resumed["state"].opt_state), hive.find_ema(r["state"].opt_state)
    assert int(ema_a.count) == 2
    for a, b in zip(_leaves(resumed["state"]), _leaves(r["state"])):  # params, Adam, EMA, step
        np.testing.assert_array_equal(a, b)
    for a, b in zip(_leaves(ema_a.ema), _leaves(ema_b.ema)):
        np.testing.assert_array_equal(a, b)
    assert (tmp_path / "model" / "hive_quantiles.json").read_text() == \
        (workdir / "model" / "hive_quantiles.json").read_text()


def test_restored_thresholds_are_kept_and_modes_must_match(uninterrupted, tmp_path):
    r, _ = uninterrupted
    method = copy.copy(r["method"])              # shares the compiled functions
    state = json.loads(json.dumps(method.get_state()))
    method.set_state(state)
    np.testing.assert_array_equal(method.thresholds, r["method"].thresholds)
    method.set_state({**state, "thresholds": [-9.0, -8.0, -7.0, -6.0]})   # restored: never recomputed
    loader = train.build_data(tiny_config(tmp_path), str(tmp_path), 8)
    ph = method.collect(None, loader, jax.random.key(0))
    assert method.thresholds.tolist() == [-9.0, -8.0, -7.0, -6.0] and ph["metrics"]["data/level_mean"] == 5.0
    with pytest.raises(ValueError, match="trained with hive.mode='weighted'"):
        method.set_state({**state, "mode": "weighted"})


def test_weighted_mode_weights_the_loss(uninterrupted, tmp_path):
    """The weighted mode's step (the same compiled update, η = hive.eta): w = 16·softmax(R/η)."""
    r, _ = uninterrupted
    method = copy.copy(r["method"])
    method.mode = "weighted"
    c = tiny_config(tmp_path, "weighted")
    loader = train.build_data(c, str(tmp_path), 8)
    ph = method.collect(None, loader, jax.random.key(0))
    rewards = ph["rewards"].astype(np.float64)
    assert rewards.std() > 0.05 and ph["metrics"]["data/reward_mean"] < 0
    w = np.exp(rewards / c.hive.eta) / np.exp(rewards / c.hive.eta).mean()
    state = jax.tree_util.tree_map(jnp.copy, r["state"])   # the update donates its state
    _, m, skipped = method.update(state, r["policy"].ref_params, ph, jax.random.key(1))
    assert not skipped and m["sft/weight_max"] == pytest.approx(w.max(), rel=1e-5) and w.max() > 1.5
    assert m["sft/loss"] != pytest.approx(m["sft/mse"], rel=1e-3)


def test_sft_config_errors(uninterrupted, tmp_path):
    r, _ = uninterrupted
    pipe, policy, mesh = r["pipeline"], r["policy"], parallel.mesh_from_config(tiny_config(tmp_path))
    make = lambda **kw: train.METHODS["sft"](tiny_config(tmp_path, **kw), pipe, policy, mesh, None)
    with pytest.raises(ValueError, match="hive.cycle: reversed triples have no reward"):
        make(**{"hive.cycle": True})
    with pytest.raises(ValueError, match="hive.mode='rl'"):
        make(**{"hive.mode": "rl"})
    with pytest.raises(ValueError, match="resize_min"):
        make(**{"hive.resize_min": 80})
    with pytest.raises(ValueError, match="train.samples_per_update = 12 is not a positive multiple of 8"):
        make(**{"hive.encode_batch": 8, "train.samples_per_update": 12, "train.micro_batch": 4})
    with pytest.raises(ValueError, match="set --config.model.style_adapter=False"):
        train.METHODS["sft"](tiny_config(tmp_path), dataclasses.replace(pipe, style=True), policy, mesh, None)
    with pytest.raises(ValueError, match="set --config.data.instructions"):
        train.build_data(tiny_config(tmp_path, "sft", **{"data.generate": 0}), str(tmp_path), 8)


@pytest.mark.skipif(not os.environ.get("JAXEDIT_SLOW_TESTS"), reason="~2 min: set JAXEDIT_SLOW_TESTS=1")
def test_tiny_sft_learns_to_edit_heldout_scenes(tmp_path):
    """200 updates of 16 generated "make the road white" triples (lr 1e-3, 64 px): the EMA model's
    held-out edits (16 unseen scenes, fixed noise, DDIM 10 steps, guidance 7.5/1.5) move from
    the random model's towards the target edit. Measured: latent MSE to the target (the unedited
    input's is 0.010) 99.2 -> 0.017 and edit progress (0 = input, 1 = target) -0.28 -> 0.68
    (seed 0; 300 updates: 0.0097, 0.75); seed 1: 98.6 -> 0.127, -0.33 -> 0.35. ~2.5 min."""
    c = tiny_config(tmp_path, "sft", **{"train.updates": 200, "data.generate": 64, "eval.every": 200,
                                        "eval.generate": 16, "checkpoint.every": 200, "log.images_every": 0})
    train.train(c, log=lambda s: None)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    before, after = [row for row in rows if "heldout/latent_mse" in row]
    assert (before["step"], after["step"]) == (0, 200)
    assert after["heldout/latent_mse"] < 0.01 * before["heldout/latent_mse"]
    assert after["heldout/edit_progress"] > max(0.2, before["heldout/edit_progress"] + 0.5)
