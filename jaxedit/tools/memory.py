"""What an update step needs in device memory, from XLA's own analysis of the compiled program.

    python -m jaxedit.tools.memory --config=configs/d3po_snow.py --unet=sd15 --micro_batch=1,2 \\
        --mode=lora,full --remat=none,full,dots --dtype=float32,bfloat16

For each combination the configured method's update step (D3PO: ``micro_batch`` pairs, PPO:
``micro_batch`` samples, one micro-batch per step, ``sample.steps`` trajectory steps at
``data.resolution``) is built on ABSTRACT parameters (nothing allocated, no weights needed) and
compiled for the default backend without running; ``compiled.memory_analysis()`` gives the bytes
of the arguments (params, optimizer state, frozen reference, batch), outputs, aliased
(donated) buffers and temporaries, per device. ``peak = arguments + outputs − aliased +
temporaries`` is what one device needs: ``--mesh=DATAxFSDP`` (e.g. ``1x8``) compiles the step for
that mesh, params and optimizer state split over fsdp as in training (`jaxedit.parallel`), each
device with its ``micro_batch``; on a CPU host the tool starts that many host devices itself.
The sampling phase and the data pipeline come on top.
Temporaries grow about linearly with the micro-batch, so ``fit()`` extrapolates the largest
micro-batch under a memory budget from two compiled sizes.

``--unet``: ``config`` (the config's checkpoint, or the tiny one when it has none), ``tiny``,
``sd15`` (the InstructPix2Pix U-Net of ``third_party/checkpoints/instruct-pix2pix.json``), or a
path to a diffusers ``unet/config.json``. XLA's numbers are for the backend it compiles for
(compile on the target accelerator for exact figures; a CPU compile is an estimate: other
fusions and layouts).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import time

import jax
import jax.numpy as jnp

from jaxedit import parallel
from jaxedit.diffusion import guidance
from jaxedit.diffusion.schedules import Schedule
from jaxedit.models import load, style_adapter, unet
from jaxedit.models.tiny import SCHEDULER_CONFIG, tiny_configs
from jaxedit.pipeline import EditPipeline
from jaxedit.rl import d3po, ppo
from jaxedit.rl.update import init_train_state

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MANIFEST = os.path.join(ROOT, "third_party", "checkpoints", "instruct-pix2pix.json")
TEXT_LEN = 77


def unet_config(which: str, config) -> unet.Config:
    if which == "config":
        which = os.path.join(config.model.checkpoint, "unet", "config.json") if config.model.checkpoint else "tiny"
    if which == "tiny":
        return tiny_configs(vocab_size=64)[0]
    if which == "sd15":
        with open(MANIFEST) as f:
            return unet.Config.from_dict(json.load(f)["unet_config"])
    return unet.Config.from_dict(load.read_json(which))


def abstract_pipeline(config, ucfg: unet.Config, dtype, remat: bool | str) -> EditPipeline:
    """An EditPipeline whose denoiser params are ShapeDtypeStructs (no VAE / text encoder)."""
    if config.model.style_adapter:
        acfg = style_adapter.Config(dim=config.model.adapter_dim, heads=config.model.adapter_heads,
                                    cross_attention_dim=ucfg.cross_attention_dim[0])
        module = style_adapter.StyleConditionedUNet(dataclasses.replace(ucfg, in_channels=12), acfg, dtype, remat)
    else:
        module = unet.build(ucfg, dtype, remat)
    return EditPipeline(module, load.abstract_params(module), None, None, None, None, None,
                        Schedule.from_config(SCHEDULER_CONFIG), SCHEDULER_CONFIG, style=config.model.style_adapter)


def abstract_batch(config, pipe: EditPipeline, ucfg: unet.Config, n: int):
    """The update's batch for n pairs (D3PO) / n samples (PPO), as ShapeDtypeStructs."""
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    s, h = config.sample.steps, config.data.resolution // 8
    d = ucfg.cross_attention_dim[0]
    lat, text, uncond = f32(n, h, h, 4), f32(n, TEXT_LEN, d), f32(TEXT_LEN, d)
    t = jax.ShapeDtypeStruct((s,), jnp.int32)
    if config.method == "ppo":
        cond = guidance.IP2PCond(lat, text, uncond, 1.0, 1.0)
        return ppo.PPOBatch(f32(s, n, h, h, 4), f32(s, n, h, h, 4), t, f32(s, n), cond, f32(n))
    cond = (guidance.SpecialistCond(lat, lat, text, uncond, 1.0, 1.0, 1.0, 1.0) if pipe.style
            else guidance.IP2PCond(lat, text, uncond, 1.0, 1.0))
    return d3po.D3POBatch(f32(s, 2 * n, h, h, 4), f32(s, 2 * n, h, h, 4), t, cond, f32(n), f32(n))


def analyse(config, ucfg: unet.Config, *, micro_batch: int, mode: str, remat: bool | str, dtype: str,
            mesh: str = "1x1") -> dict:
    """Compile (not run) the update step for one setting -> per-device byte counts and compile time.

    ``mesh``: "DATAxFSDP" devices; ``micro_batch`` is per device (the compiled step takes
    micro_batch x devices pairs / samples in one chunk), params and optimizer state are split over
    fsdp as in training (`jaxedit.parallel`)."""
    from jaxedit import train
    from jaxedit.trainers import d3po as d3po_trainer, ppo as ppo_trainer
    data, fsdp = (int(v) for v in mesh.lower().split("x"))
    devices = data * fsdp
    config = config.copy_and_resolve_references()
    config.train.mode, config.train.micro_batch = mode, micro_batch * devices
    pipe = abstract_pipeline(config, ucfg, {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype], remat)
    policy = train.build_policy(config, pipe)
    optimizer = train.make_optimizer(config)
    m = parallel.make_mesh(data, fsdp, jax.devices()[:devices]) if devices > 1 else None
    make = ppo_trainer.make_step if config.method == "ppo" else d3po_trainer.make_step
    step = make(config, pipe, policy, optimizer, micro_batch * devices, m)
    state = jax.eval_shape(lambda p: init_train_state(p, optimizer), policy.trainable)
    ref, batch = policy.ref_params, abstract_batch(config, pipe, ucfg, micro_batch * devices)
    if m is not None:
        state, ref = (parallel.abstract(t, m, min_size=config.mesh.min_shard_size) for t in (state, ref))
        batch = _shard_batch(batch, m)
    key = jax.eval_shape(lambda: jax.random.key(0))
    t0 = time.perf_counter()
    compiled = step.lower(state, ref, batch, key).compile()
    ma = compiled.memory_analysis()
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))
    out = {"method": config.method, "mode": mode, "remat": unet.remat_policy(remat), "dtype": dtype, "micro_batch": micro_batch,
           "mesh": f"{data}x{fsdp}", "steps": config.sample.steps, "resolution": config.data.resolution,
           "trainable_gb": nbytes(policy.trainable) / 1e9, "frozen_gb": nbytes(ref) / 1e9,
           "arguments_gb": ma.argument_size_in_bytes / 1e9, "outputs_gb": ma.output_size_in_bytes / 1e9,
           "aliased_gb": ma.alias_size_in_bytes / 1e9, "temporaries_gb": ma.temp_size_in_bytes / 1e9,
           "compile_s": time.perf_counter() - t0, "backend": jax.default_backend()}
    out["peak_gb"] = out["arguments_gb"] + out["outputs_gb"] - out["aliased_gb"] + out["temporaries_gb"]
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def _shard_batch(batch, mesh):
    """The abstract update batch with the training shardings: samples (the trajectories' axis 1,
    the per-pair / per-sample leaves' axis 0) over data x fsdp, shared leaves replicated."""
    def put(x, axis):
        s = parallel.replicated(mesh) if axis is None else parallel.batch_sharding(mesh, axis)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    shared = lambda x: put(x, None) if isinstance(x, jax.ShapeDtypeStruct) else x
    per_row = lambda cond: jax.tree_util.tree_map(shared, cond._replace(**{
        k: put(getattr(cond, k), 0) for k in ("image_latents", "style_latents", "text_emb") if hasattr(cond, k)}))
    if isinstance(batch, ppo.PPOBatch):
        return ppo.PPOBatch(put(batch.x_t, 1), put(batch.x_prev, 1), shared(batch.t), put(batch.log_prob, 1),
                            per_row(batch.cond), put(batch.advantages, 0))
    return d3po.D3POBatch(put(batch.x_t, 1), put(batch.x_prev, 1), shared(batch.t), per_row(batch.cond),
                          put(batch.winner_is_first, 0), put(batch.valid, 0))


def fit(small: dict, large: dict, budget_gb: float) -> int:
    """Largest micro-batch whose extrapolated peak fits ``budget_gb`` (linear in the micro-batch
    between two analysed sizes; 0 if even the smaller does not fit)."""
    b0, b1 = small["micro_batch"], large["micro_batch"]
    per = (large["peak_gb"] - small["peak_gb"]) / (b1 - b0)
    if small["peak_gb"] > budget_gb:
        return 0
    return b0 if per <= 0 else b0 + int((budget_gb - small["peak_gb"]) // per)


def _bools(v: str) -> bool | str:
    """A --remat entry: true/false (full/none) or a policy name."""
    v = v.strip().lower()
    return {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}.get(v, v)


def main(argv):
    del argv
    from absl import flags
    f = flags.FLAGS
    config = f.config
    meshes = f.mesh.split(",")
    devices = max(int(a) * int(b) for a, b in (m.lower().split("x") for m in meshes))
    if devices > 1 and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        # Compiling for N devices on a CPU host needs N host devices (set before JAX's backend starts;
        # the flag only affects the CPU platform).
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={devices}").strip()
    ucfg = unet_config(f.unet, config)
    rows = []
    for mesh, mode, remat, dtype, mb in itertools.product(meshes, f.mode.split(","), [unet.remat_policy(_bools(r)) for r in f.remat.split(",")],
                                                          f.dtype.split(","), [int(b) for b in f.micro_batch.split(",")]):
        rows.append(analyse(config, ucfg, micro_batch=mb, mode=mode, remat=remat, dtype=dtype, mesh=mesh))
        print(json.dumps(rows[-1]), flush=True)
    budgets = [float(b) for b in f.budgets_gb.split(",")] if f.budgets_gb else []
    print(f"\n{'mesh':5} {'mode':5} {'remat':5} {'dtype':8} {'mb':>3} {'args GB':>8} {'temp GB':>8} {'peak GB':>8}")
    for r in rows:
        print(f"{r['mesh']:5} {r['mode']:5} {r['remat']:5} {r['dtype']:8} {r['micro_batch']:>3} "
              f"{r['arguments_gb']:>8.2f} {r['temporaries_gb']:>8.2f} {r['peak_gb']:>8.2f}")
    fits = []
    for key, group in itertools.groupby(rows, lambda r: (r["mesh"], r["mode"], r["remat"], r["dtype"])):
        group = sorted(group, key=lambda r: r["micro_batch"])
        if len(group) >= 2 and budgets:
            fits.append({"mesh": key[0], "mode": key[1], "remat": key[2], "dtype": key[3],
                         **{f"{b:g}GB": fit(group[0], group[-1], b) for b in budgets}})
            print("largest micro-batch", json.dumps(fits[-1]))
    if f.out:
        with open(f.out, "w") as fh:
            json.dump({"unet": f.unet, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       "rows": rows, "fits": fits}, fh, indent=1)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "training config, e.g. configs/d3po_snow.py")
    flags.DEFINE_string("unet", "config", "config | tiny | sd15 | path to a diffusers unet/config.json")
    flags.DEFINE_string("micro_batch", "1,2", "comma-separated micro-batch sizes (pairs for D3PO, samples for PPO)")
    flags.DEFINE_string("mode", "lora,full", "comma-separated: lora, full")
    flags.DEFINE_string("mesh", "1x1", "comma-separated DATAxFSDP device meshes, e.g. 1x1,1x8 (micro_batch is per device)")
    flags.DEFINE_string("remat", "none", "comma-separated per-block remat policies: none, full, dots (or false/true)")
    flags.DEFINE_string("dtype", "float32", "comma-separated compute dtypes: float32, bfloat16")
    flags.DEFINE_string("budgets_gb", "16,32,40,80", "device memory budgets for the largest-micro-batch table")
    flags.DEFINE_string("out", "", "write the rows as JSON here")
    flags.mark_flags_as_required(["config"])
    app.run(main)
