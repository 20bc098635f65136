"""Device mesh and parameter sharding: data parallelism × FSDP, by logical axis names.

    mesh = make_mesh(data=-1, fsdp=4)                  # ("data", "fsdp") over all devices
    state = shard(state, mesh)                         # params / optimizer state over "fsdp"
    batch = jax.device_put(x, batch_sharding(mesh))    # samples over data × fsdp

Every parameter gets **logical axis names** from its kind alone (never from its layer), in
diffusers' parameter layout as Flax holds it:

    conv kernel   (kh, kw, in, out)  -> ("kernel_h", "kernel_w", "conv_in", "conv_out")
    Dense kernel  (in, out)          -> ("dense_in", "dense_out")
    LoRA lora_A   (in, r)            -> ("dense_in", "lora_rank")
    LoRA lora_B   (r, out)           -> ("lora_rank", "dense_out")
    embedding     (vocab, dim)       -> ("vocab", "embed")
    bias, scale   (n,)               -> ("channels",)

and ``RULES`` map logical names to mesh axes in order of preference: a leaf is sharded over
``fsdp`` along its first preferred dimension that the axis size divides; leaves smaller than
``min_size`` elements (norms, biases, LoRA factors) and leaves with no divisible dimension are
replicated. Optimizer states (Adam's mu/nu, the EMA) mirror the params tree, so their leaves get
the same names and the same specs; scalars are replicated. Inside ``jit`` a ``Layout`` gathers
the weights where a forward pass needs them (XLA reduce-scatters their gradients) and pins the
fp32 gradient accumulator and the new state to these specs, so nothing is silently replicated:
parameters, gradients and optimizer state are stored 1/fsdp per device, whole weights exist
only while an update or a sampling call runs.
The batch is split over both axes (``BATCH``): every device computes on its own samples.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp")
BATCH = ("data", "fsdp")  # the leading (sample) axis of every batch is split over both

#: (logical axis, mesh axis) in order of preference: the first listed dimension of a leaf that
#: the mesh axis divides is sharded. Unlisted logical axes are never sharded.
RULES = (("conv_out", "fsdp"), ("dense_out", "fsdp"), ("embed", "fsdp"),
         ("conv_in", "fsdp"), ("dense_in", "fsdp"), ("vocab", "fsdp"))

#: Leaves with fewer elements than this are replicated (gathering them costs more than they save).
MIN_SIZE = 2 ** 14


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    """A ("data", "fsdp") mesh; -1 on one axis = all remaining devices.

    Single host: the first data·fsdp devices (a subset is allowed). Multi-host runs must use every
    device; there the layout comes from ``mesh_utils.create_device_mesh`` (TPU topology aware,
    ``fsdp`` innermost so parameter gathers stay on the fastest links).
    """
    devices = jax.devices() if devices is None else list(devices)
    n = len(devices)
    if (data == -1) + (fsdp == -1) > 1 or 0 in (data, fsdp) or min(data, fsdp) < -1:
        raise ValueError(f"mesh.data={data}, mesh.fsdp={fsdp}: expected positive sizes, at most one -1")
    if data == -1 or fsdp == -1:
        known = fsdp if data == -1 else data
        if n % known:
            raise ValueError(f"mesh.data={data}, mesh.fsdp={fsdp}: {n} devices are not a multiple of {known}")
        data, fsdp = (n // known, fsdp) if data == -1 else (data, n // known)
    size = data * fsdp
    multihost = jax.process_count() > 1
    if size > n or (multihost and size != n):
        raise ValueError(f"mesh.data={data} x mesh.fsdp={fsdp} = {size} devices, but there are {n}"
                         + (" (multi-host runs use all devices)" if multihost else ""))
    if size == n and devices == jax.devices():
        grid = mesh_utils.create_device_mesh((data, fsdp), devices)
    else:
        grid = np.asarray(devices[:size]).reshape(data, fsdp)
    return Mesh(grid, AXES)


def mesh_from_config(config) -> Mesh:
    """``make_mesh(config.mesh.data, config.mesh.fsdp)``."""
    return make_mesh(config.mesh.data, config.mesh.fsdp)


# ------------------------------------------------------------------------------ logical names
def logical_axes(names: tuple[str, ...], shape: tuple[int, ...]) -> tuple[str | None, ...]:
    """Logical axis names of one leaf from its path's names (last = the leaf's) and shape."""
    leaf, ndim = (names[-1] if names else ""), len(shape)
    if leaf == "lora_A" and ndim == 2:
        return ("dense_in", "lora_rank")
    if leaf == "lora_B" and ndim == 2:
        return ("lora_rank", "dense_out")
    if leaf == "kernel" and ndim == 4:
        return ("kernel_h", "kernel_w", "conv_in", "conv_out")
    if leaf == "kernel" and ndim == 2:
        return ("dense_in", "dense_out")
    if leaf == "embedding" and ndim == 2:
        return ("vocab", "embed")
    if ndim == 1:
        return ("channels",)
    return (None,) * ndim


def partition_spec(logical: tuple[str | None, ...], shape: tuple[int, ...], axis_sizes: dict[str, int],
                   rules=RULES, min_size: int = MIN_SIZE) -> PartitionSpec:
    """The PartitionSpec of one leaf: each mesh axis (size > 1) on the first dimension, in ``rules``
    order, that it divides; replicated when the leaf is smaller than ``min_size`` elements."""
    spec = [None] * len(shape)
    if int(np.prod(shape, dtype=np.int64)) < min_size:
        return PartitionSpec(*spec)
    used = set()
    for name, axis in rules:
        size = axis_sizes.get(axis, 1)
        if size <= 1 or axis in used or name not in logical:
            continue
        d = logical.index(name)
        if spec[d] is None and shape[d] % size == 0:
            spec[d] = axis
            used.add(axis)
    return PartitionSpec(*spec)


def _names(path) -> tuple[str, ...]:
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def param_specs(tree, mesh: Mesh, rules=RULES, min_size: int = MIN_SIZE):
    """PartitionSpecs for every leaf of ``tree`` (params, a TrainState, optimizer state; arrays,
    tracers or ShapeDtypeStructs): the tree's structure with a spec per leaf."""
    sizes = dict(mesh.shape)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: partition_spec(logical_axes(_names(path), np.shape(x)), np.shape(x), sizes, rules, min_size),
        tree)


def shardings(tree, mesh: Mesh, rules=RULES, min_size: int = MIN_SIZE):
    """``param_specs`` as NamedShardings on ``mesh``."""
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), param_specs(tree, mesh, rules, min_size),
                                  is_leaf=lambda x: isinstance(x, PartitionSpec))


def shard(tree, mesh: Mesh, rules=RULES, min_size: int = MIN_SIZE):
    """Puts ``tree`` on ``mesh`` with its ``shardings`` (a copy; host arrays or global arrays)."""
    return jax.device_put(tree, shardings(tree, mesh, rules, min_size))


def abstract(tree, mesh: Mesh, rules=RULES, min_size: int = MIN_SIZE):
    """ShapeDtypeStructs carrying the ``shardings``: what a checkpoint restores into, or what an
    ahead-of-time compile (``jit(...).lower``) sees."""
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                                  tree, shardings(tree, mesh, rules, min_size))


@dataclasses.dataclass(frozen=True)
class Layout:
    """How the compiled updates and samplers place trees on ``mesh`` (None: XLA decides, as on one
    device): ``fsdp`` pins stored trees (the state, the gradient accumulator) to their FSDP specs,
    ``gather`` makes weights whole where a forward pass uses them, so activations stay split by
    sample only (GSPMD would otherwise follow the weights' split into the activations and reshard
    them back and forth). The gather's transpose reduce-scatters the gradients."""
    mesh: Mesh | None = None
    rules: tuple = RULES
    min_size: int = MIN_SIZE

    def fsdp(self, tree):
        if self.mesh is None:
            return tree
        return jax.lax.with_sharding_constraint(tree, shardings(tree, self.mesh, self.rules, self.min_size))

    def gather(self, tree):
        if self.mesh is None:
            return tree
        return jax.lax.with_sharding_constraint(tree, replicated(self.mesh))


def layout(config, mesh: Mesh | None) -> Layout:
    """The Layout of a training config (``mesh.min_shard_size``) on ``mesh``."""
    return Layout(mesh, min_size=config.mesh.min_shard_size)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, axis: int = 0) -> NamedSharding:
    """Samples along ``axis`` split over data × fsdp (every device its own samples)."""
    return NamedSharding(mesh, PartitionSpec(*([None] * axis), BATCH))


def replicate(tree, mesh: Mesh):
    return jax.device_put(tree, replicated(mesh))


def describe(tree, mesh: Mesh, rules=RULES, min_size: int = MIN_SIZE) -> dict:
    """Bytes of ``tree`` per device when sharded vs replicated, and the sharded fraction."""
    specs = jax.tree_util.tree_leaves(param_specs(tree, mesh, rules, min_size),
                                      is_leaf=lambda x: isinstance(x, PartitionSpec))
    leaves = jax.tree_util.tree_leaves(tree)
    sizes = dict(mesh.shape)
    total = per_device = 0
    for x, s in zip(leaves, specs):
        b = int(np.prod(np.shape(x), dtype=np.int64)) * np.dtype(x.dtype).itemsize
        div = int(np.prod([sizes[a] for a in s if a is not None], dtype=np.int64))
        total, per_device = total + b, per_device + b // div
    return {"bytes": total, "bytes_per_device": per_device,
            "sharded_fraction": 1.0 - per_device / total if total else 0.0}
