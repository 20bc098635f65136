"""Run by test_train.py as TWO processes (``python multihost_train.py HOST PORT WORKDIR``): a
2-host `jax.distributed` run (one CPU device per host, gloo collectives) of the tiny D3PO trainer
on a 1 x 2 fsdp mesh spanning both hosts. Each host loads its own data shard, runs its own scorer
(counted here) on its share of the samples, and takes part in the checkpoints. Prints JSON."""
import json
import sys

import jax
import numpy as np

from test_train import tiny_config  # tests/ is on sys.path when run as a script

host, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=host)

from jaxedit import train  # noqa: E402

scored, examples = [], []
build_scorer, build_data = train.build_scorer, train.build_data


class Counting:
    """The configured scorer, recording how many samples this host scored per request."""
    def __init__(self, inner):
        self.inner = inner

    def submit(self, **kw):
        scored.append(len(kw["generated"]))
        return self.inner.submit(**kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class Recording:
    """The loader, recording which examples this host loaded."""
    def __init__(self, inner):
        self.inner = inner

    def __next__(self):
        batch = next(self.inner)
        examples.extend(int(i) for i in batch["index"])
        return batch

    def __getattr__(self, name):
        return getattr(self.inner, name)


train.build_scorer = lambda config: Counting(build_scorer(config))
train.build_data = lambda *a, **k: Recording(build_data(*a, **k))
c = tiny_config(workdir, **{"mesh.data": 1, "mesh.fsdp": 2, "mesh.min_shard_size": 256, "train.updates": 2,
                            "checkpoint.every": 1, "eval.every": 0, "log.images_every": 0})
r = train.train(c, log=lambda s: None)
params = jax.tree_util.tree_leaves(r["state"].params)
print(json.dumps({"host": jax.process_index(), "hosts": jax.process_count(), "scored": scored,
                  "examples": examples, "metrics": r["metrics"],
                  "spans_hosts": sum(not x.is_fully_addressable for x in params),
                  "local_fraction": sum(x.addressable_shards[0].data.nbytes for x in params)
                  / sum(x.nbytes for x in params),
                  "checksum": float(sum(np.asarray(train.to_host(x), np.float64).sum() for x in params))}))
