"""PyTorch state-dict names <-> Flax parameter trees.

jaxedit's modules are named exactly like diffusers' / transformers' PyTorch modules, with list
indices joined by "_" (Flax's convention): ``down_blocks.0.resnets.1.conv1.weight`` <->
``params["down_blocks_0"]["resnets_1"]["conv1"]["kernel"]``. Leaves:
conv ``weight`` (O,I,kh,kw) <-> ``kernel`` (kh,kw,I,O); linear ``weight`` (O,I) <-> ``kernel``
(I,O); norm ``weight`` <-> ``scale``; embedding ``weight`` <-> ``embedding``; ``bias`` as is.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import numpy as np
from flax import traverse_util

from jaxedit.models.state_dict import CheckpointError

# Torch module lists whose numeric children become `name_<i>` in Flax.
LIST_NAMES = frozenset({
    "down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers",
    "transformer_blocks", "to_out", "net", "layers"})
_FLAX_LIST = re.compile(r"^(%s)_(\d+)$" % "|".join(sorted(LIST_NAMES)))


def torch_key_to_path(key: str) -> tuple[str, ...]:
    """``a.b.0.c.weight`` -> ``("a", "b_0", "c", "weight")`` (leaf name not yet mapped)."""
    out: list[str] = []
    for part in key.split("."):
        if part.isdigit() and out and out[-1] in LIST_NAMES:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def path_to_torch_key(path: tuple[str, ...]) -> str:
    """Inverse of `torch_key_to_path` for module names (leaf already in torch naming)."""
    return ".".join(_FLAX_LIST.sub(r"\1.\2", p) for p in path)


def _to_flax_leaf(value: np.ndarray, flax_name: str) -> np.ndarray:
    if flax_name == "kernel":
        if value.ndim == 4:
            return value.transpose(2, 3, 1, 0)
        if value.ndim == 2:
            return value.T
    return value


def _to_torch_leaf(value: np.ndarray, flax_name: str) -> np.ndarray:
    if flax_name == "kernel":
        if value.ndim == 4:
            return value.transpose(3, 2, 0, 1)
        if value.ndim == 2:
            return value.T
    return value


def _list_keys(keys, n=5) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def torch_to_flax(
    state: Mapping[str, np.ndarray],
    target: Mapping[str, Any],
    *,
    ignore: Callable[[str], bool] = lambda k: False,
    dtype: Any = np.float32,
    what: str = "model",
) -> dict:
    """Converts a torch state dict to a Flax params tree shaped like `target`.

    Args:
      state: {torch_name: array}.
      target: Flax params tree (arrays or `jax.ShapeDtypeStruct`s) giving names and shapes.
      ignore: torch keys to drop silently (buffers such as ``position_ids``).
      dtype: dtype of the returned arrays (None keeps the file's dtype).
    Raises:
      CheckpointError naming the first missing, unexpected or mis-shaped tensors.
    """
    flat_target = traverse_util.flatten_dict(target)
    # Index target by (module path, torch leaf name).
    by_torch: dict[tuple[str, ...], tuple[str, ...]] = {}
    for path in flat_target:
        leaf = path[-1]
        torch_leaf = "bias" if leaf == "bias" else "weight"
        by_torch[path[:-1] + (torch_leaf,)] = path
    out, unexpected, bad_shape = {}, [], []
    for key, value in state.items():
        if ignore(key):
            continue
        path = torch_key_to_path(key)
        flax_path = by_torch.get(path)
        if flax_path is None:
            unexpected.append(key)
            continue
        arr = _to_flax_leaf(np.asarray(value), flax_path[-1])
        want = tuple(flat_target[flax_path].shape)
        if arr.shape != want:
            bad_shape.append(f"{key}: file {tuple(value.shape)} vs model {want}")
            continue
        out[flax_path] = arr if dtype is None else arr.astype(dtype)
    missing = [path_to_torch_key(p[:-1]) + "." + ("bias" if p[-1] == "bias" else "weight")
               for p in flat_target if p not in out]
    problems = []
    if bad_shape:
        problems.append(f"{len(bad_shape)} mismatched shapes: {'; '.join(bad_shape[:5])}")
    if missing:
        problems.append(f"{len(missing)} missing tensors: {_list_keys(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors: {_list_keys(unexpected)}")
    if problems:
        raise CheckpointError(f"{what} weights do not fit its config: " + "; ".join(problems))
    return traverse_util.unflatten_dict(out)


def flax_to_torch(params: Mapping[str, Any], dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """Flax params tree -> {torch_name: np.ndarray} in PyTorch layouts."""
    out = {}
    for path, value in traverse_util.flatten_dict(params).items():
        leaf = path[-1]
        torch_leaf = "bias" if leaf == "bias" else "weight"
        arr = _to_torch_leaf(np.asarray(value), leaf)
        out[path_to_torch_key(path[:-1]) + "." + torch_leaf] = arr.astype(dtype)
    return out
