"""D3PO trainer: end-to-end run, SIGKILL + resume equals an uninterrupted run, learning, errors."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import base  # noqa: E402

from jaxedit import train  # noqa: E402

OVERRIDES = {"data.generate": 8, "data.resolution": 64, "sample.steps": 3, "sample.batch_size": 8,
             "train.samples_per_update": 8, "train.micro_batch": 4, "train.updates": 4, "checkpoint.every": 2,
             "log.images_every": 2}


def tiny_config(workdir, **extra):
    c = base.edit_config("add snow on the road", "snow", variant="tiny")
    c.workdir = str(workdir)
    for k, v in {**OVERRIDES, **extra}.items():
        *group, name = k.split(".")
        (c[group[0]] if group else c)[name] = v
    return c


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run_a")
    return workdir, train.train(tiny_config(workdir), log=lambda s: None)


def test_run_writes_everything(uninterrupted):
    workdir, result = uninterrupted
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
    assert (workdir / "model" / "style_adapter" / "config.json").exists()
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]  # held-out scores before training, then each update
    assert "heldout/total_mean" in rows[0] and "d3po/loss" not in rows[0]
    assert {"d3po/loss", "score/semantic_mean", "d3po/grad_norm"} <= set(rows[1])
    assert "heldout/total_mean" in rows[4] and "heldout/total_mean" not in rows[3]  # eval.every=5, and at the end
    assert os.listdir(workdir / "tb") and sorted(os.listdir(workdir / "images"))[0].startswith("input_style")
    m = result["metrics"]
    assert np.isfinite(m["d3po/loss"]) and m["d3po/skipped"] == 0
    # The trained model loads as an editing pipeline.
    from jaxedit.pipeline import EditPipeline
    pipe = EditPipeline.from_pretrained(str(workdir / "model"))
    assert pipe.style


def test_sigkill_then_resume_equals_uninterrupted(uninterrupted, tmp_path):
    _, reference = uninterrupted
    cmd = [sys.executable, "-m", "jaxedit.train", f"--config={ROOT}/configs/d3po_snow.py:tiny",
           f"--config.workdir={tmp_path}"] + [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir}  # reuse compiles
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    while not (tmp_path / "checkpoints" / "2").exists():  # kill it mid-run, after its update-2 checkpoint
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "model").exists()  # it did not finish
    resumed = train.train(tiny_config(tmp_path), log=lambda s: None)
    assert int(resumed["state"].step) == int(reference["state"].step)
    for a, b in zip(_leaves(resumed["state"]), _leaves(reference["state"])):
        np.testing.assert_array_equal(a, b)


def test_scorer_process_run_equals_in_process_run(uninterrupted, tmp_path):
    """The same run with the weight-free scorer in the scorer process (shared memory): same scores,
    so bit-identical parameters; the process is gone afterwards."""
    _, reference = uninterrupted
    result = train.train(tiny_config(tmp_path, **{"score.process": True, "eval.every": 0}), log=lambda s: None)
    for a, b in zip(_leaves(result["state"]), _leaves(reference["state"])):
        np.testing.assert_array_equal(a, b)
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"jaxedit-{os.getpid()}-")]


def test_four_device_mesh_equals_one_device(uninterrupted, tmp_path):
    """Data-parallel on 4 CPU devices (fresh process: the device count is fixed at JAX start-up)."""
    workdir, _ = uninterrupted
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir}
    out = subprocess.run([sys.executable, "multidevice_train.py", str(tmp_path)], cwd=os.path.dirname(__file__),
                         capture_output=True, text=True, env=env, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["param_devices"] == [4]  # the trained state is replicated over the 4 devices
    one = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[1])  # update 1 of the 1-device run
    for k in ("d3po/loss", "d3po/grad_norm", "d3po/approx_kl", "score/structural_mean", "score/semantic_mean",
              "pairs/valid_fraction"):
        np.testing.assert_allclose(got["trainer_metrics"][k], one[k], rtol=2e-5, atol=1e-7, err_msg=k)
    # One SGD update on the same batch: max |Δθ_4 − Δθ_1| / max |Δθ_1| (measured 3.3e-6).
    assert got["update_max_delta"] > 1e-3 and got["update_rel_diff"] < 1e-4


def test_bad_config_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="train.mode='half'"):
        train.train(tiny_config(tmp_path, **{"train.mode": "half"}), log=lambda s: None)
    with pytest.raises(ValueError, match="set --config.data.images"):
        train.train(tiny_config(tmp_path, **{"data.generate": 0}), log=lambda s: None)
    with pytest.raises(ValueError, match=r"mesh.data=8: expected -1 \(all\) or 1..1 devices"):
        train.train(tiny_config(tmp_path, **{"mesh.data": 8}), log=lambda s: None)
    with pytest.raises(ValueError, match=r"train.samples_per_update/2 \(pairs\) = 4 is not a positive multiple of 3"):
        train.train(tiny_config(tmp_path, **{"sample.batch_size": 6}), log=lambda s: None)
    with pytest.raises(ValueError, match="method='dpo': expected one of"):
        train.train(tiny_config(tmp_path, **{"method": "dpo"}), log=lambda s: None)
    with pytest.raises(ValueError, match="score.models=.*missing .*depth-anything-v2-small"):
        train.train(tiny_config(tmp_path, **{"score.models": str(tmp_path)}), log=lambda s: None)
