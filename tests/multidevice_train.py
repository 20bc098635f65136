"""Run by test_train.py in a fresh process with 4 host CPU devices (XLA_FLAGS must be set before
JAX starts). Prints JSON:

* trainer: the first update's metrics (sampling, scores, D3PO) of test_train's tiny run on a
  mixed 2 (data) x 2 (fsdp) mesh (the test compares them with the 1-device run's), and which
  state leaves came out sharded over "fsdp";
* restore: that run's checkpoint (saved on 4 devices) restored onto a 2-device fsdp mesh;
* updates: one D3PO and one PPO update with SGD (no Adam normalisation, which turns rounding noise
  in near-zero gradients into full-size steps) on the same batch on 1-, 2- and 4-device meshes
  (data-only, fsdp-only, mixed; a subset unless JAXEDIT_SLOW_TESTS): max |Δθ_mesh − Δθ_1| /
  max |Δθ_1|, and whether the new state kept its FSDP shardings.
"""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from test_train import tiny_config  # tests/ is on sys.path when run as a script

from jaxedit import parallel, train
from jaxedit.checkpoint import Checkpointer
from jaxedit.diffusion import guidance
from jaxedit.diffusion.sampler import sample
from jaxedit.pipeline import EditPipeline
from jaxedit.rl import d3po, ppo
from jaxedit.rl.update import init_train_state

MIN = 256  # shard every leaf of the tiny model with >= 256 entries
# (data, fsdp). Every mesh costs one compile (~30 s on 2 cores); the default run checks fsdp-only
# and mixed against one device (the trainer run above is mixed D3PO too), `make test-slow` all six.
SLOW = bool(os.environ.get("JAXEDIT_SLOW_TESTS"))
MESHES = [(1, 1), (2, 1), (1, 2), (4, 1), (1, 4), (2, 2)] if SLOW else [(1, 1), (1, 4)]
PPO_MESHES = [(1, 1), (1, 4), (2, 2)] if SLOW else [(1, 1), (2, 2)]


def fsdp_leaves(tree) -> list[bool]:
    return ["fsdp" in tuple(x.sharding.spec) for x in jax.tree_util.tree_leaves(tree)]


def trainer_run(workdir):
    c = tiny_config(workdir, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.min_shard_size": MIN,
                                "train.updates": 1, "log.images_every": 0})
    r = train.train(c, log=lambda s: None)
    state = r["state"]
    sharded = fsdp_leaves(state.params)
    leaves = jax.tree_util.tree_leaves(state)
    per_device = sum(x.addressable_shards[0].data.nbytes for x in leaves) / sum(x.nbytes for x in leaves)
    # Restore the 4-device checkpoint on 2 devices (fsdp only), as a resumed run would.
    mesh2 = parallel.make_mesh(1, 2, jax.devices()[:2])
    restored, meta = Checkpointer(f"{workdir}/checkpoints").restore(
        parallel.abstract(state, mesh2, min_size=MIN))
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(restored),
                                                     jax.tree_util.tree_leaves(state)))
    return {"trainer_metrics": r["metrics"], "fsdp_param_leaves": [sum(sharded), len(sharded)],
            "state_bytes_per_device": per_device,
            "restored_equal": same, "restored_update": meta["update"],
            "restored_devices": sorted({len(x.sharding.device_set) for x in jax.tree_util.tree_leaves(restored)}),
            "restored_fsdp_leaves": sum(fsdp_leaves(restored.params))}


def place(batch, mesh, axes):
    """batch leaves -> the mesh: axes[i] = the sample axis of leaf i (None = replicated)."""
    leaves, tree = jax.tree_util.tree_flatten(batch)
    return jax.tree_util.tree_unflatten(tree, [
        jax.device_put(x, parallel.replicated(mesh) if a is None else parallel.batch_sharding(mesh, a))
        for x, a in zip(leaves, axes)])


def compare(make, state0, ref, batch, axes, meshes) -> dict:
    """One update on every mesh -> {mesh: (rel diff vs 1 device, state kept its shardings)}."""
    out, deltas = {}, {}
    state0 = jax.device_get(state0)  # host copies: the updates donate (delete) their device state
    for data, fsdp in meshes:
        mesh = parallel.make_mesh(data, fsdp, jax.devices()[:data * fsdp])
        step = make(parallel.Layout(mesh, min_size=MIN))
        state = parallel.shard(state0, mesh, min_size=MIN)
        before = [x.sharding for x in jax.tree_util.tree_leaves(state)]
        new, m = step(state, parallel.shard(ref, mesh, min_size=MIN), place(batch, mesh, axes), jax.random.key(1))
        jax.block_until_ready(new)
        kept = all(a.is_equivalent_to(x.sharding, x.ndim) for a, x in zip(before, jax.tree_util.tree_leaves(new)))
        deltas[(data, fsdp)] = [np.asarray(a) - np.asarray(p) for a, p in zip(jax.tree_util.tree_leaves(new.params),
                                                                         jax.tree_util.tree_leaves(state0.params))]
        out[f"{data}x{fsdp}"] = {"kept_shardings": kept, "loss": float(m["loss"])}
    scale = max(float(np.abs(d).max()) for d in deltas[(1, 1)])
    for (data, fsdp), d in deltas.items():
        out[f"{data}x{fsdp}"]["rel_diff"] = max(float(np.abs(a - b).max()) for a, b in zip(d, deltas[(1, 1)])) / scale
    return {"meshes": out, "max_delta": scale}


def updates(workdir, ip2p_folder):
    """D3PO and PPO (full fine-tuning) of the tiny InstructPix2Pix model on trajectories it sampled."""
    pipe = EditPipeline.from_pretrained(ip2p_folder)
    pairs, steps = 4, 3
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (pairs, 64, 64, 3)).astype(np.float32)
    lat = jnp.concatenate([pipe.encode_images(jnp.asarray(image))] * 2)  # pair layout: both members alike
    txt = jnp.broadcast_to(pipe.encode_text(["add snow"]), (2 * pairs,) + pipe.encode_text([""]).shape[1:])
    cond = guidance.IP2PCond(lat, txt, pipe.encode_text([""])[0], 7.5, 1.5)
    z = jnp.concatenate([jax.random.normal(jax.random.key(2), (pairs,) + lat.shape[1:])] * 2)  # x_T per pair
    traj = jax.jit(lambda p, c, z, k: sample(pipe.denoise, p, c, pipe.schedule, z, k, steps=steps, sampler="ddim",
                                             eta=1.0, return_trajectory=True)[1])(pipe.denoiser_params, cond, z,
                                                                                  jax.random.key(3))
    sgd = optax.sgd(1.0)
    state0 = init_train_state(pipe.denoiser_params, sgd)
    shared = guidance.IP2PCond(0, 0, None, None, None)
    flat = lambda t: jax.tree_util.tree_leaves(t, is_leaf=lambda x: x is None)
    half = guidance.IP2PCond(lat[:pairs], txt[:pairs], *cond[2:])  # D3PO's cond: one row per pair
    win = jnp.asarray(np.arange(pairs) % 2, jnp.float32)
    batch = d3po.D3POBatch(traj.x_t, traj.x_prev, traj.t, half, win, jnp.ones(pairs))
    d = compare(lambda layout: d3po.make_update(pipe.denoise, sgd, pipe.schedule, cond_axes=shared, layout=layout),
                state0, pipe.denoiser_params, batch, flat(d3po.D3POBatch(1, 1, None, shared, 0, 0)), MESHES)
    pbatch = ppo.PPOBatch(traj.x_t, traj.x_prev, traj.t, traj.log_prob, cond, jnp.linspace(-1.0, 1.0, 2 * pairs))
    p = compare(lambda layout: ppo.make_update(pipe.denoise, sgd, pipe.schedule, cond_axes=shared, clip_range=1.0,
                                               layout=layout),
                state0, pipe.denoiser_params, pbatch, flat(ppo.PPOBatch(1, 1, None, 1, shared, 0)), PPO_MESHES)
    return {"d3po": d, "ppo": p}


if __name__ == "__main__":
    import time
    assert jax.device_count() == 4, jax.devices()
    t0 = time.perf_counter()
    result = trainer_run(sys.argv[1] + "/mixed")
    t1 = time.perf_counter()
    result["updates"] = updates(sys.argv[1] + "/update", sys.argv[1] + "/mixed/tiny-ip2p")
    result["seconds"] = {"trainer": t1 - t0, "updates": time.perf_counter() - t1}
    print(json.dumps(result))
