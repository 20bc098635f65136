#!/usr/bin/env python3
"""Launchers for `python -m jaxedit.train`: Cloud TPU VM pods, one multi-GPU host, SLURM clusters.

    python launch/launch.py tpu   --name NAME --zone ZONE [--project P] [--setup] [--dry_run] -- TRAIN_ARGS
    python launch/launch.py gpu   [--gpus N] [--dry_run] -- TRAIN_ARGS
    python launch/launch.py slurm --nodes N --gpus_per_node G [--partition P] [--time T] [--dry_run] -- TRAIN_ARGS

Everything after `--` goes to `jaxedit.train` unchanged (each argument quoted with `shlex.quote`
where it passes through a shell); `tpu` and `slurm` append `--config.distributed=True` once.
`--dry_run` prints the commands (and the sbatch script) instead of running them.
Standard library only; see launch/README.md.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What `pip install -e .` and a training run need on a TPU VM (not .venv/, outputs/, tests/, caches).
SOURCES = ("pyproject.toml", "README.md", "Makefile", "configs", "jaxedit")
DISTRIBUTED = "--config.distributed=True"
CACHE = "~/.cache/jaxedit/xla"       # runtime.enable_compilation_cache's default, set explicitly
LOG_LEVEL = "1"                      # TF_CPP_MIN_LOG_LEVEL: XLA/libtpu C++ logs at WARNING and above
MEM_FRACTION = 0.9                   # share of each GPU's memory XLA preallocates (JAX default 0.75)
OLD_MEM_FRACTION = "XLA_PYTHON_CLIENT_MEM_FRACTION"  # deprecated name; jaxlib refuses both at once


class LaunchError(ValueError):
    """A bad launcher argument (printed as `launch.py: error: ...`, exit status 2)."""


# ---------------------------------------------------------------------------- arguments

def train_args(args: list[str], *, distributed: bool) -> list[str]:
    """Checks the train arguments; with `distributed`, appends `--config.distributed=True` once."""
    if not args:
        raise LaunchError("no train arguments after `--` (at least --config=configs/FILE.py)")
    if not any(a == "--config" or a.startswith("--config=") for a in args):
        raise LaunchError(f"no --config=configs/FILE.py among the train arguments {args}")
    if not distributed:
        return list(args)
    flags = [a for a in args if a == "--config.distributed" or a.startswith("--config.distributed=")]
    wrong = [a for a in flags if a.lower() not in ("--config.distributed", "--config.distributed=true",
                                                   "--config.distributed=1")]
    if wrong:
        raise LaunchError(f"{wrong[0]}: a multi-host launch needs --config.distributed=True "
                          "(the launcher adds it)")
    return list(args) if flags else [*args, DISTRIBUTED]


def env_pairs(pairs: list[str]) -> dict[str, str]:
    out = {}
    for p in pairs:
        key, eq, value = p.partition("=")
        if not eq or not key.isidentifier():
            raise LaunchError(f"--env {p!r}: expected KEY=VALUE")
        out[key] = value
    return out


def shell_path(path: str) -> str:
    """`path` for a remote shell: `~/x` becomes `"$HOME"/x` (expanded there, not here), the rest quoted."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def shell_env(env: dict[str, str], paths: tuple[str, ...] = ()) -> list[str]:
    """`KEY=value` words for a shell (values of the keys in `paths` through `shell_path`)."""
    return [f"{k}={shell_path(v) if k in paths else shlex.quote(v)}" for k, v in env.items()]


def device_ids(n: int) -> str:
    return ",".join(str(i) for i in range(n))


def check_fraction(f: float) -> float:
    if not 0.0 < f <= 1.0:
        raise LaunchError(f"--mem_fraction={f}: expected 0 < fraction <= 1")
    return f


# ---------------------------------------------------------------------------- tpu

def tpu_plan(a, train: list[str]) -> list[tuple]:
    train = train_args(train, distributed=True)
    where = [f"--zone={a.zone}"] + ([f"--project={a.project}"] if a.project else [])
    ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", a.name, *where, "--worker=all"]
    cd = f"cd {shell_path(a.workdir_on_vm)}"
    env = {"JAXEDIT_CACHE": a.cache_dir, "JAX_PLATFORMS": "tpu", "TF_CPP_MIN_LOG_LEVEL": LOG_LEVEL,
           **env_pairs(a.env)}
    run = " ".join([cd, "&&", *shell_env(env, paths=("JAXEDIT_CACHE",)),
                    ".venv/bin/python", "-m", "jaxedit.train", *map(shlex.quote, train)])
    plan = []
    if a.setup:
        dest = a.workdir_on_vm[2:] if a.workdir_on_vm.startswith("~/") else a.workdir_on_vm  # scp: relative to ~
        extras = shlex.quote(f".[{a.extras}]")
        install = (f"{cd} && (test -x .venv/bin/python || {shlex.quote(a.vm_python)} -m venv .venv)"
                   f" && .venv/bin/pip install --quiet --upgrade pip && .venv/bin/pip install --quiet -e {extras}")
        plan += [("run", [*ssh, f"--command=mkdir -p {shell_path(a.workdir_on_vm)}"]),
                 ("run", ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse",
                          *(os.path.join(ROOT, s) for s in SOURCES), f"{a.name}:{dest}", *where, "--worker=all"]),
                 ("run", [*ssh, f"--command={install}"])]
    return plan + [("run", [*ssh, f"--command={run}"])]


# ---------------------------------------------------------------------------- gpu

def gpu_plan(a, train: list[str]) -> list[tuple]:
    if a.gpus is not None and a.gpus < 1:
        raise LaunchError(f"gpu: --gpus={a.gpus}: expected at least 1")
    train = train_args(train, distributed=False)
    env = ({"CUDA_VISIBLE_DEVICES": device_ids(a.gpus)} if a.gpus else {})
    env.update({"XLA_CLIENT_MEM_FRACTION": str(check_fraction(a.mem_fraction)), "JAX_PLATFORMS": "cuda",
                "JAXEDIT_CACHE": os.path.expanduser(a.cache_dir), "TF_CPP_MIN_LOG_LEVEL": LOG_LEVEL,
                **env_pairs(a.env)})
    cmd = ["env", "-u", OLD_MEM_FRACTION, *(f"{k}={v}" for k, v in env.items()),
           a.python, "-m", "jaxedit.train", *train]
    return [("run", cmd)]


# ---------------------------------------------------------------------------- slurm

def slurm_script(a, train: list[str]) -> str:
    """sbatch script: one task (process) per node driving that node's G GPUs."""
    sbatch = [f"--job-name={a.job_name}", f"--nodes={a.nodes}", "--ntasks-per-node=1",
              f"--gpus-per-node={a.gpus_per_node}",
              f"--output={os.path.join(os.path.dirname(os.path.abspath(a.script_out)), '%x-%j.out')}"]
    sbatch += [f"--{k}={v}" for k, v in (("partition", a.partition), ("time", a.time), ("account", a.account)) if v]
    env = {"JAX_LOCAL_DEVICE_IDS": device_ids(a.gpus_per_node),
           "XLA_CLIENT_MEM_FRACTION": str(check_fraction(a.mem_fraction)), "JAX_PLATFORMS": "cuda",
           "JAXEDIT_CACHE": a.cache_dir, "TF_CPP_MIN_LOG_LEVEL": LOG_LEVEL, **env_pairs(a.env)}
    cmd = ["srun", "--ntasks-per-node=1", a.python, "-m", "jaxedit.train", *train]
    lines = ["#!/bin/bash", *(f"#SBATCH {s}" for s in sbatch),
             "# Written by launch/launch.py. One process per node sees all of the node's GPUs; JAX's SLURM",
             "# detection (jax.distributed.initialize) reads SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS,",
             "# SLURM_PROCID, SLURM_LOCALID from srun and would restrict each process to GPU SLURM_LOCALID:",
             "# JAX_LOCAL_DEVICE_IDS gives it all of them instead.",
             "set -euo pipefail",
             f"unset {OLD_MEM_FRACTION}",
             *(f"export {w}" for w in shell_env(env, paths=("JAXEDIT_CACHE",))),
             shlex.join(cmd), ""]
    return "\n".join(lines)


def slurm_plan(a, train: list[str]) -> list[tuple]:
    if a.nodes < 1:
        raise LaunchError(f"slurm: --nodes={a.nodes}: expected at least 1")
    if a.gpus_per_node < 1:
        raise LaunchError(f"slurm: --gpus_per_node={a.gpus_per_node}: expected at least 1")
    for k in ("job_name", "partition", "account"):
        if getattr(a, k) is not None and (not getattr(a, k) or any(c.isspace() for c in getattr(a, k))):
            raise LaunchError(f"slurm: --{k}={getattr(a, k)!r}: expected a non-empty word without spaces")
    if a.time and not all(p.isdigit() for p in a.time.replace("-", ":").split(":")):
        raise LaunchError(f"slurm: --time={a.time!r}: expected HH:MM:SS (or D-HH:MM:SS, MM)")
    train = train_args(train, distributed=True)
    return [("write", a.script_out, slurm_script(a, train)), ("run", ["sbatch", a.script_out])]


# ---------------------------------------------------------------------------- main

def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dry_run", action="store_true", help="print what would run, run nothing")
    common.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment variable of the training processes (repeatable)")
    p = argparse.ArgumentParser(prog="launch.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="kind", required=True)
    venv = os.path.join(ROOT, ".venv", "bin", "python")
    python = venv if os.path.exists(venv) else sys.executable

    t = sub.add_parser("tpu", parents=[common], help="every worker of a Cloud TPU VM (pod slice), over gcloud ssh")
    t.add_argument("--name", required=True, help="TPU VM name")
    t.add_argument("--zone", required=True, help="its zone, e.g. us-central2-b")
    t.add_argument("--project", help="Google Cloud project (default: gcloud's)")
    t.add_argument("--workdir_on_vm", default="~/jaxedit", help="project folder on every worker")
    t.add_argument("--cache_dir", default=CACHE, help="JAXEDIT_CACHE on the workers")
    t.add_argument("--setup", action="store_true",
                   help="first copy the sources to every worker and pip install -e '.[EXTRAS]' into .venv")
    t.add_argument("--extras", default="tpu", help="--setup: pip extras (e.g. tpu,scorers)")
    t.add_argument("--vm_python", default="python3.11", help="--setup: interpreter that creates .venv")

    g = sub.add_parser("gpu", parents=[common], help="one process on this host, over its first N GPUs")
    g.add_argument("--gpus", type=int, help="GPUs 0..N-1 (default: CUDA_VISIBLE_DEVICES as it is: all)")
    g.add_argument("--mem_fraction", type=float, default=MEM_FRACTION, help="XLA_CLIENT_MEM_FRACTION")
    g.add_argument("--cache_dir", default=CACHE, help="JAXEDIT_CACHE")
    g.add_argument("--python", default=python, help="interpreter with jaxedit and jax[cuda12]")

    s = sub.add_parser("slurm", parents=[common], help="sbatch: one process per node, G GPUs each")
    s.add_argument("--nodes", type=int, required=True)
    s.add_argument("--gpus_per_node", type=int, required=True)
    s.add_argument("--partition")
    s.add_argument("--time", help="time limit, HH:MM:SS")
    s.add_argument("--account")
    s.add_argument("--job_name", default="jaxedit")
    s.add_argument("--script_out", help="where the sbatch script goes (default outputs/slurm/JOB_NAME.sbatch)")
    s.add_argument("--mem_fraction", type=float, default=MEM_FRACTION, help="XLA_CLIENT_MEM_FRACTION")
    s.add_argument("--cache_dir", default=CACHE, help="JAXEDIT_CACHE on the nodes")
    s.add_argument("--python", default=python, help="interpreter on the nodes (shared filesystem)")
    return p


def plan(argv: list[str]) -> tuple[argparse.Namespace, list[tuple]]:
    """Parses `argv` (without the program name) into the steps: ("run", argv) | ("write", path, text)."""
    i = argv.index("--") if "--" in argv else len(argv)
    a = parser().parse_args(argv[:i])  # argparse: unknown subcommand, missing --nodes, ... (exit 2)
    if i == len(argv):
        raise LaunchError("no train arguments: put them after `--`, e.g. "
                          "`-- --config=configs/d3po_snow.py --config.workdir=runs/snow`")
    if a.kind == "slurm" and not a.script_out:
        a.script_out = os.path.join("outputs", "slurm", f"{a.job_name}.sbatch")
    return a, {"tpu": tpu_plan, "gpu": gpu_plan, "slurm": slurm_plan}[a.kind](a, argv[i + 1:])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        a, steps = plan(argv)
    except LaunchError as e:
        print(f"launch.py: error: {e}", file=sys.stderr)
        return 2
    for step in steps:
        if step[0] == "write":
            _, path, text = step
            if a.dry_run:
                print(f"# {path}\n{text}", end="")
            else:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                with open(path, "w") as f:
                    f.write(text)
                print(f"wrote {path}")
            continue
        cmd = step[1]
        print(shlex.join(cmd), flush=True)
        if not a.dry_run:
            done = subprocess.run(cmd)
            if done.returncode:
                print(f"launch.py: {cmd[0]} exited with status {done.returncode}", file=sys.stderr)
                return done.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
