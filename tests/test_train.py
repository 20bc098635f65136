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


def test_meshes_give_the_same_update_and_checkpoints_move_between_them(uninterrupted, tmp_path):
    """4 CPU devices (fresh process: the device count is fixed at JAX start-up): a 2x2 data x fsdp
    trainer run equals the 1-device run; its checkpoint restores on 2 devices; one D3PO and one PPO
    update agree on 1-, 2- and 4-device meshes (data-only, fsdp-only, mixed) and keep the FSDP
    shardings of the state (`tests/multidevice_train.py`)."""
    workdir, _ = uninterrupted
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir}
    out = subprocess.run([sys.executable, "multidevice_train.py", str(tmp_path)], cwd=os.path.dirname(__file__),
                         capture_output=True, text=True, env=env, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    sharded, leaves = got["fsdp_param_leaves"]  # measured 87 of 217 (the rest: biases, norms < 256 entries)
    assert sharded > 0 and got["state_bytes_per_device"] < 0.55, got  # params + Adam state split 2 ways
    one = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[1])  # update 1 of the 1-device run
    for k in ("d3po/loss", "d3po/grad_norm", "d3po/approx_kl", "score/structural_mean", "score/semantic_mean",
              "pairs/valid_fraction"):
        np.testing.assert_allclose(got["trainer_metrics"][k], one[k], rtol=2e-5, atol=1e-7, err_msg=k)
    assert got["restored_equal"] and got["restored_update"] == 1 and got["restored_devices"] == [2]
    assert got["restored_fsdp_leaves"] == sharded
    # One SGD update on the same batch: max |Δθ_mesh − Δθ_1| / max |Δθ_1|. Measured: 2 devices
    # 3.4e-6, 4 devices 6.8e-5 (D3PO) / 5.6e-5 (PPO), the same for data, fsdp and mixed meshes
    # of one size (the weights are gathered, so only the batch split changes the sums' order).
    for method in ("d3po", "ppo"):
        u = got["updates"][method]
        assert u["max_delta"] > 1e-2, (method, u)
        for mesh, r in u["meshes"].items():
            assert r["rel_diff"] < 2e-4 and r["kept_shardings"], (method, mesh, r)


@pytest.mark.skipif(not os.environ.get("JAXEDIT_SLOW_TESTS"), reason="~3 min on 2 cores: `make test-slow`")
def test_two_hosts(tmp_path):
    """A 2-process jax.distributed run (`tests/multihost_train.py`, one CPU device per host) of the
    tiny D3PO trainer on an fsdp mesh across the hosts: disjoint data shards, each host's scorer
    scores half of every update's samples, both hosts end with the same metrics and params, the
    state is split between them, checkpoints and the model are written."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir}
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, "multihost_train.py", str(h), port, str(tmp_path)],
                              cwd=os.path.dirname(__file__), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for h in (0, 1)]
    outs = [p.communicate(timeout=1200) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    got = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert [g["host"] for g in got] == [0, 1] and got[0]["hosts"] == 2
    samples_per_update = 8
    assert got[0]["scored"] == got[1]["scored"] == [samples_per_update // 2] * 2  # one scorer per host, half each
    assert not set(got[0]["examples"]) & set(got[1]["examples"])  # per-host data shards
    same = lambda m: {k: v for k, v in m.items() if not k.startswith("time/")}
    assert same(got[0]["metrics"]) == same(got[1]["metrics"]) and got[0]["checksum"] == got[1]["checksum"]
    assert np.isfinite(got[0]["metrics"]["d3po/loss"]) and got[0]["local_fraction"] < 0.55
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"] and (tmp_path / "model" / "unet").is_dir()


def test_bad_config_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="train.mode='half'"):
        train.train(tiny_config(tmp_path, **{"train.mode": "half"}), log=lambda s: None)
    with pytest.raises(ValueError, match="set --config.data.images"):
        train.train(tiny_config(tmp_path, **{"data.generate": 0}), log=lambda s: None)
    with pytest.raises(ValueError, match=r"mesh.data=8 x mesh.fsdp=1 = 8 devices, but there are 1"):
        train.train(tiny_config(tmp_path, **{"mesh.data": 8}), log=lambda s: None)
    with pytest.raises(ValueError, match=r"train.samples_per_update/2 \(pairs\) = 4 is not a positive multiple of 3"):
        train.train(tiny_config(tmp_path, **{"sample.batch_size": 6}), log=lambda s: None)
    with pytest.raises(ValueError, match="method='dpo': expected one of"):
        train.train(tiny_config(tmp_path, **{"method": "dpo"}), log=lambda s: None)
    with pytest.raises(ValueError, match="score.models=.*missing .*depth-anything-v2-small"):
        train.train(tiny_config(tmp_path, **{"score.models": str(tmp_path)}), log=lambda s: None)


def test_remat_and_bf16_reach_the_model(uninterrupted):
    """model.remat / model.dtype configure the trained U-Net (remat's gradients: test_unet.py)."""
    workdir, _ = uninterrupted
    pipe = train.build_pipeline(tiny_config(workdir, **{"model.remat": "dots", "model.dtype": "bfloat16"}), str(workdir))
    assert pipe.style and pipe.unet.remat == "dots" and pipe.unet.dtype == jax.numpy.bfloat16
    assert {x.dtype for x in jax.tree_util.tree_leaves(pipe.denoiser_params)} == {np.dtype("float32")}  # fp32 master
    assert train.build_pipeline(tiny_config(workdir), str(workdir)).unet.remat == "none"
