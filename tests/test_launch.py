"""launch/launch.py: the printed (--dry_run) commands, the sbatch script, argument errors, and that a
real run hands the same argv to subprocess.run. Nothing here calls gcloud, sbatch or srun: the shell
quoting is checked by running the commands against a fake `python` that reports its argv and env."""
import importlib.util
import json
import os
import shlex
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "launch.py")
_spec = importlib.util.spec_from_file_location("jaxedit_launch", SCRIPT)
launch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(launch)

CONFIG = "--config=configs/d3po_snow.py"
INSTRUCTION = "--config.edit.instruction=add snow on the road"
TRAIN = ["--", CONFIG, INSTRUCTION]
ENV_KEYS = ("CUDA_VISIBLE_DEVICES", "XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION", "JAX_PLATFORMS",
            "JAXEDIT_CACHE", "TF_CPP_MIN_LOG_LEVEL", "JAX_LOCAL_DEVICE_IDS", "FOO")


def dry(capsys, *argv):
    i = argv.index("--")
    assert launch.main([*argv[:i], "--dry_run", *argv[i:]]) == 0
    return capsys.readouterr().out


def fake_python(path):
    """An executable that prints its arguments and the launcher's environment variables as JSON."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(f"#!{sys.executable}\nimport json, os, sys\n"
                f"print(json.dumps({{'argv': sys.argv[1:], 'env': {{k: os.environ.get(k) for k in {ENV_KEYS!r}}}}}))\n")
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)
    return path


def train_part(argv):
    i = argv.index("-m")
    assert argv[i + 1] == "jaxedit.train"
    return argv[i + 2:]


# ---------------------------------------------------------------------------- tpu

def test_tpu_dry_run(capsys, tmp_path):
    out = dry(capsys, "tpu", "--name", "pod", "--zone", "us-central2-b", "--project", "p1", *TRAIN)
    lines = out.strip().splitlines()
    assert len(lines) == 1
    argv = shlex.split(lines[0])
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"]
    assert {"--zone=us-central2-b", "--project=p1", "--worker=all"} <= set(argv)
    (command,) = [a for a in argv if a.startswith("--command=")]
    remote = command[len("--command="):]
    words = shlex.split(remote)
    assert words[:3] == ["cd", "$HOME/jaxedit", "&&"]
    assert {"JAX_PLATFORMS=tpu", "TF_CPP_MIN_LOG_LEVEL=1", "JAXEDIT_CACHE=$HOME/.cache/jaxedit/xla"} <= set(words)
    assert words[words.index("-m") - 1] == ".venv/bin/python"
    assert train_part(words) == [CONFIG, INSTRUCTION, "--config.distributed=True"]

    # the remote shell: cd to ~/jaxedit, run .venv/bin/python there with the arguments and variables intact
    fake_python(str(tmp_path / "jaxedit" / ".venv" / "bin" / "python"))
    done = subprocess.run(["bash", "-c", remote], env={"HOME": str(tmp_path), "PATH": os.environ["PATH"]},
                          capture_output=True, text=True, check=True)
    got = json.loads(done.stdout)
    assert got["argv"] == ["-m", "jaxedit.train", CONFIG, INSTRUCTION, "--config.distributed=True"]
    assert got["env"]["JAXEDIT_CACHE"] == str(tmp_path / ".cache" / "jaxedit" / "xla")
    assert got["env"]["JAX_PLATFORMS"] == "tpu"


def test_tpu_distributed_once_and_setup(capsys):
    out = dry(capsys, "tpu", "--name", "pod", "--zone", "z", "--setup", "--workdir_on_vm", "/opt/my project",
              "--", CONFIG, "--config.distributed=True")
    mkdir, scp, install, run = [shlex.split(line) for line in out.strip().splitlines()]
    assert mkdir[-1] == "--command=mkdir -p '/opt/my project'" and "--worker=all" in mkdir
    assert scp[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse"] and "--worker=all" in scp
    assert [os.path.basename(p) for p in scp[6:11]] == ["pyproject.toml", "README.md", "Makefile", "configs", "jaxedit"]
    assert scp[11] == "pod:/opt/my project"
    install_words = shlex.split(install[-1][len("--command="):])
    assert install_words[:3] == ["cd", "/opt/my project", "&&"]
    assert "python3.11" in install_words and install_words[-4:] == ["install", "--quiet", "-e", ".[tpu]"]
    words = shlex.split(run[-1][len("--command="):])
    assert train_part(words) == [CONFIG, "--config.distributed=True"]


# ---------------------------------------------------------------------------- gpu

def test_gpu_dry_run_runs_as_printed(capsys, tmp_path):
    python = fake_python(str(tmp_path / "python"))
    out = dry(capsys, "gpu", "--gpus", "4", "--python", python, "--env", "FOO=a b", *TRAIN)
    argv = shlex.split(out.strip())
    assert argv[:3] == ["env", "-u", "XLA_PYTHON_CLIENT_MEM_FRACTION"]
    assert train_part(argv) == [CONFIG, INSTRUCTION]  # one host: no distributed init
    env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION=".5")  # jaxlib refuses both names: dropped
    got = json.loads(subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout)
    assert got["argv"] == ["-m", "jaxedit.train", CONFIG, INSTRUCTION]
    assert got["env"]["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    assert got["env"]["XLA_CLIENT_MEM_FRACTION"] == "0.9" and got["env"]["XLA_PYTHON_CLIENT_MEM_FRACTION"] is None
    assert got["env"]["JAX_PLATFORMS"] == "cuda" and got["env"]["FOO"] == "a b"

    out = dry(capsys, "gpu", "--python", python, *TRAIN)  # no --gpus: CUDA_VISIBLE_DEVICES left alone
    assert not any(w.startswith("CUDA_VISIBLE_DEVICES=") for w in shlex.split(out))


# ---------------------------------------------------------------------------- slurm

def test_slurm_dry_run_script(capsys, tmp_path):
    path = str(tmp_path / "job.sbatch")
    out = dry(capsys, "slurm", "--nodes", "2", "--gpus_per_node", "8", "--partition", "gpu", "--time", "12:00:00",
              "--account", "acc", "--job_name", "snow", "--script_out", path, *TRAIN)
    assert not os.path.exists(path)  # dry run: printed, not written
    lines = out.rstrip("\n").splitlines()
    assert lines[0] == f"# {path}" and lines[1] == "#!/bin/bash"
    assert shlex.split(lines[-1]) == ["sbatch", path]
    sbatch = {line.split()[1] for line in lines if line.startswith("#SBATCH ")}
    assert {"--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=gpu", "--time=12:00:00",
            "--account=acc", "--job-name=snow", f"--output={tmp_path}/%x-%j.out"} == sbatch
    assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in lines
    (srun,) = [shlex.split(line) for line in lines if line.startswith("srun ")]
    assert srun[:2] == ["srun", "--ntasks-per-node=1"]
    assert train_part(srun) == [CONFIG, INSTRUCTION, "--config.distributed=True"]

    # the script under bash, with a fake srun that runs its command once
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/sh\nshift\nexec "$@"\n')
    (bin_dir / "srun").chmod(0o755)
    python = fake_python(str(tmp_path / "python"))
    script = "\n".join(lines[1:-1]).replace(srun[2], python)
    env = {"HOME": str(tmp_path), "PATH": f"{bin_dir}:{os.environ['PATH']}", "XLA_PYTHON_CLIENT_MEM_FRACTION": ".5"}
    got = json.loads(subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                                    check=True).stdout)
    assert got["argv"] == ["-m", "jaxedit.train", CONFIG, INSTRUCTION, "--config.distributed=True"]
    assert got["env"]["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3,4,5,6,7"
    assert got["env"]["XLA_PYTHON_CLIENT_MEM_FRACTION"] is None and got["env"]["XLA_CLIENT_MEM_FRACTION"] == "0.9"
    assert got["env"]["JAXEDIT_CACHE"] == f"{tmp_path}/.cache/jaxedit/xla"


# ---------------------------------------------------------------------------- errors

@pytest.mark.parametrize("argv, message", [
    (["tpu", "--zone", "z", "--", CONFIG], "required: --name"),
    (["tpu", "--name", "n", "--", CONFIG], "required: --zone"),
    (["tpu", "--name", "n", "--zone", "z"], "no train arguments"),
    (["tpu", "--name", "n", "--zone", "z", "--"], "no train arguments"),
    (["tpu", "--name", "n", "--zone", "z", "--", "--config.workdir=x"], "no --config="),
    (["tpu", "--name", "n", "--zone", "z", "--", CONFIG, "--config.distributed=False"], "needs --config.distributed=True"),
    (["slurm", "--nodes", "0", "--gpus_per_node", "8", "--", CONFIG], "--nodes=0: expected at least 1"),
    (["slurm", "--nodes", "1", "--gpus_per_node", "0", "--", CONFIG], "--gpus_per_node=0"),
    (["slurm", "--gpus_per_node", "8", "--", CONFIG], "required: --nodes"),
    (["slurm", "--nodes", "1", "--gpus_per_node", "8", "--time", "2h", "--", CONFIG], "--time='2h'"),
    (["slurm", "--nodes", "1", "--gpus_per_node", "8", "--job_name", "my job", "--", CONFIG], "--job_name='my job'"),
    (["gpu", "--gpus", "0", "--", CONFIG], "--gpus=0"),
    (["gpu", "--mem_fraction", "1.5", "--", CONFIG], "--mem_fraction=1.5"),
    (["gpu", "--env", "NOVALUE", "--", CONFIG], "expected KEY=VALUE"),
    (["cloud", "--", CONFIG], "invalid choice"),
])
def test_argument_errors(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("ran a command"))
    try:
        rc = launch.main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    assert rc == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------- real runs (subprocess.run faked)

class Recorder:
    def __init__(self, rc=0):
        self.calls, self.rc = [], rc

    def __call__(self, argv, *args, **kwargs):
        self.calls.append(list(argv))
        return subprocess.CompletedProcess(argv, self.rc)


@pytest.mark.parametrize("argv", [
    ["tpu", "--name", "pod", "--zone", "z", "--setup", *TRAIN],
    ["gpu", "--gpus", "2", *TRAIN],
])
def test_run_calls_subprocess_with_printed_argv(argv, capsys, monkeypatch):
    printed = [shlex.split(line) for line in dry(capsys, *argv).strip().splitlines()]
    rec = Recorder()
    monkeypatch.setattr(subprocess, "run", rec)
    assert launch.main(argv) == 0
    assert rec.calls == printed


def test_slurm_run_writes_script_then_sbatch(capsys, monkeypatch, tmp_path):
    path = str(tmp_path / "out" / "job.sbatch")
    argv = ["slurm", "--nodes", "2", "--gpus_per_node", "4", "--script_out", path, *TRAIN]
    printed = dry(capsys, *argv).rstrip("\n").splitlines()
    rec = Recorder()
    monkeypatch.setattr(subprocess, "run", rec)
    assert launch.main(argv) == 0
    assert rec.calls == [["sbatch", path]]
    assert open(path).read().splitlines() == printed[1:-1]


def test_failed_step_stops(capsys, monkeypatch):
    rec = Recorder(rc=3)
    monkeypatch.setattr(subprocess, "run", rec)
    assert launch.main(["tpu", "--name", "pod", "--zone", "z", "--setup", *TRAIN]) == 3
    assert len(rec.calls) == 1 and "exited with status 3" in capsys.readouterr().err


def test_runs_as_a_script():
    done = subprocess.run([sys.executable, SCRIPT, "gpu", "--gpus", "1", "--dry_run", "--", CONFIG],
                          capture_output=True, text=True, check=True)
    assert "CUDA_VISIBLE_DEVICES=0 " in done.stdout and done.stdout.rstrip().endswith(f"jaxedit.train {CONFIG}")
