"""Run by test_train.py in a fresh process with 4 host CPU devices (XLA_FLAGS must be set before
JAX starts). Prints JSON comparing 1-device and 4-device data meshes:

* trainer: the first update's metrics (sampling, scores, D3PO) of test_train's tiny run on a
  4-device mesh (the test compares them with the 1-device run's);
* update: one D3PO update with SGD (no Adam normalisation, which turns rounding noise in
  near-zero gradients into full-size steps) on the same batch, replicated params and the batch
  split over the devices, vs one device.
"""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from test_train import tiny_config  # tests/ is on sys.path when run as a script

from jaxedit import train
from jaxedit.rl import d3po
from jaxedit.trainers import d3po as d3po_trainer


def trainer_metrics(workdir, devices):
    c = tiny_config(workdir, **{"mesh.data": devices, "train.updates": 1, "log.images_every": 0})
    r = train.train(c, log=lambda s: None)
    devs = {len(x.sharding.device_set) for x in jax.tree_util.tree_leaves(r["state"].params)}
    return r["metrics"], sorted(devs)


def update_delta(workdir):
    c = tiny_config(workdir)
    pipe = train.build_pipeline(c, workdir)
    policy = train.build_policy(c, pipe)
    mesh1 = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    loader = train.build_data(c, workdir, c.sample.batch_size // 2)
    text, uncond = pipe.encode_text([c.edit.instruction]), pipe.encode_text([""])
    ph = d3po_trainer.sampling_phase(d3po_trainer.make_sampler(pipe, c), pipe, policy.trainable, loader, 1, mesh1, text, uncond,
                              jax.random.key(0), train.build_scorer(c))
    pairs = ph["x_t"].shape[1] // 2
    win = jnp.asarray(np.arange(pairs) % 2, jnp.float32)
    batch = d3po.D3POBatch(ph["x_t"], ph["x_prev"], ph["t"], ph["cond"], win, jnp.ones(pairs))
    update = d3po.make_update(pipe.denoise, optax.sgd(1.0), pipe.schedule, cond_axes=d3po_trainer.cond_axes(pipe))
    out = {}
    for n in (1, 4):
        mesh = Mesh(np.asarray(jax.devices()[:n]), ("data",))
        rep, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
        steps = NamedSharding(mesh, P(None, "data"))
        b = jax.tree_util.tree_map(lambda x: jax.device_put(x, rep), batch)
        b = d3po.D3POBatch(jax.device_put(batch.x_t, steps), jax.device_put(batch.x_prev, steps), b.t,
                           d3po_trainer.map_pairs(lambda x: jax.device_put(x, split), d3po_trainer.cond_axes(pipe), b.cond),
                           jax.device_put(win, split), b.valid)
        state = jax.device_put(d3po.init_train_state(policy.trainable, optax.sgd(1.0)), rep)
        new, m = update(state, jax.device_put(policy.ref_params, rep), b, jax.random.key(1))
        jax.block_until_ready(new)
        out[n] = [np.asarray(a) - np.asarray(p) for a, p in zip(jax.tree_util.tree_leaves(new.params),
                                                             jax.tree_util.tree_leaves(policy.trainable))]
    scale = max(float(np.abs(d).max()) for d in out[1])
    return max(float(np.abs(a - b).max()) for a, b in zip(out[1], out[4])) / scale, scale


if __name__ == "__main__":
    assert jax.device_count() == 4, jax.devices()
    metrics, devices = trainer_metrics(sys.argv[1] + "/four", 4)
    rel, scale = update_delta(sys.argv[1] + "/update")
    print(json.dumps({"trainer_metrics": metrics, "param_devices": devices,
                      "update_rel_diff": rel, "update_max_delta": scale}))
