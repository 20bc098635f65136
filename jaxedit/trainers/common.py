"""Helpers shared by the training methods: host transfers and sharded batches."""
from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def to_host(x) -> np.ndarray:
    """A global array -> the whole array as NumPy on every host."""
    return np.asarray(x) if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True)


def gather_examples(local: dict) -> dict:
    """This host's loader batch -> the global batch (all hosts' examples, host order) on every host."""
    return local if jax.process_count() == 1 else multihost_utils.process_allgather(local, tiled=True)


def shard_batch(mesh: Mesh, *arrays):
    """Per-host NumPy arrays -> global arrays split along the mesh's ``data`` axis."""
    split = NamedSharding(mesh, PartitionSpec("data"))
    return tuple(jax.make_array_from_process_local_data(split, a) for a in arrays)


def check_multiple(name: str, value: int, unit: int, context: str) -> None:
    if value < 1 or value % unit:
        raise ValueError(f"{name} = {value} is not a positive multiple of {unit} ({context})")
