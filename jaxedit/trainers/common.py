"""Helpers shared by the training methods: host transfers and sharded batches."""
from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxedit.parallel import batch_sharding


def to_host(x) -> np.ndarray:
    """A global array -> the whole array as NumPy on every host."""
    return np.asarray(x) if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True)


def gather_examples(local: dict) -> dict:
    """This host's loader batch (or scores) -> the global batch (all hosts' rows, host order) on every host."""
    return local if jax.process_count() == 1 else multihost_utils.process_allgather(local, tiled=True)


def host_slice(n: int, host: int | None = None, hosts: int | None = None) -> slice:
    """This host's contiguous share of ``n`` items (``n`` must be a multiple of the host count)."""
    host = jax.process_index() if host is None else host
    hosts = jax.process_count() if hosts is None else hosts
    if n % hosts:
        raise ValueError(f"{n} items cannot be split evenly over {hosts} hosts")
    return slice(host * n // hosts, (host + 1) * n // hosts)


def shard_batch(mesh: Mesh, *arrays):
    """Per-host NumPy arrays -> global arrays split over all the mesh's devices (data × fsdp)."""
    split = batch_sharding(mesh)
    return tuple(jax.make_array_from_process_local_data(split, a) for a in arrays)


def check_multiple(name: str, value: int, unit: int, context: str) -> None:
    if value < 1 or value % unit:
        raise ValueError(f"{name} = {value} is not a positive multiple of {unit} ({context})")
