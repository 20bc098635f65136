"""LoRA as a params transform: no module changes, ``apply(merge(base, lora), ...)``.

For every targeted Dense kernel W (in, out): ``W' = W + scale · A @ B`` with A (in, r), B (r, out),
``scale = alpha / rank``. B starts at zero, so the merged model equals the base model exactly.

Names follow diffusers / PEFT. A Flax path ``down_blocks_0/attentions_0/transformer_blocks_0/
attn1/to_q`` is the PyTorch module ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``
(``to_out_0`` <-> ``to_out.0``; ``jaxedit.models.convert.path_to_torch_key``), and targets match
those dotted names with PEFT's rule: a list of names matches a module whose name equals one or
ends with ``"." + name`` (default ``("to_q", "to_k", "to_v", "to_out.0")``, the diffusers LoRA
training scripts' targets); a single string is a regex that must match the whole name.
LoRA params mirror the params tree: ``lora[...]["to_q"] = {"lora_A": (in, r), "lora_B": (r, out)}``,
the transposes of PEFT's ``<name>.lora_A.weight`` (r, in) and ``<name>.lora_B.weight`` (out, r).
"""
from __future__ import annotations

import re
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxedit.models.convert import path_to_torch_key

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def module_name(path: Sequence[str]) -> str:
    """Flax module path (without the leaf) -> diffusers/PEFT dotted module name."""
    return path_to_torch_key(tuple(path))


def _matches(name: str, targets) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_paths(params, targets=DEFAULT_TARGETS) -> list[tuple[str, ...]]:
    """Module paths (tuples of Flax names, sorted) whose 2-D ``kernel`` is targeted.

    Raises ValueError if a target matches a non-Dense (e.g. conv) kernel, or nothing matches.
    """
    out = []
    for path, leaf in traverse_util.flatten_dict(params).items():
        if path[-1] != "kernel" or not _matches(module_name(path[:-1]), targets):
            continue
        if leaf.ndim != 2:
            raise ValueError(f"LoRA target {module_name(path[:-1])} has a {leaf.ndim}-D kernel; "
                             "only Dense (2-D) kernels are supported")
        out.append(path[:-1])
    if not out:
        raise ValueError(f"LoRA targets {targets!r} match no kernel")
    return sorted(out)


def init_lora(params, *, rank: int, targets=DEFAULT_TARGETS, key, dtype=jnp.float32) -> dict:
    """LoRA params for every targeted kernel: A ~ U(−1/√in, 1/√in) (PEFT's default, Kaiming-uniform
    a=√5), B = 0. ``alpha`` only enters through ``merge``'s scale (alpha / rank)."""
    if rank < 1:
        raise ValueError(f"rank={rank} must be >= 1")
    flat = traverse_util.flatten_dict(params)
    paths = lora_paths(params, targets)
    out = {}
    for path, k in zip(paths, jax.random.split(key, len(paths))):
        d_in, d_out = flat[path + ("kernel",)].shape
        bound = d_in ** -0.5
        out[path + ("lora_A",)] = jax.random.uniform(k, (d_in, rank), dtype, -bound, bound)
        out[path + ("lora_B",)] = jnp.zeros((rank, d_out), dtype)
    return traverse_util.unflatten_dict(out)


def lora_scale(rank: int, alpha: float) -> float:
    """PEFT's scaling alpha / rank."""
    return alpha / rank


def merge(base_params, lora_params, scale: float):
    """Params with ``kernel + scale · lora_A @ lora_B`` at every LoRA path; other leaves are the
    base's. Pure, jittable, differentiable w.r.t. ``lora_params`` (and ``base_params``)."""
    flat = dict(traverse_util.flatten_dict(base_params))
    lora = traverse_util.flatten_dict(lora_params)
    for path in sorted({p[:-1] for p in lora}):  # sorted: a deterministic program (compile cache)
        kernel = flat[path + ("kernel",)]
        delta = lora[path + ("lora_A",)] @ lora[path + ("lora_B",)]
        flat[path + ("kernel",)] = kernel + (scale * delta).astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat)


def peft_state_dict(lora_params) -> dict:
    """{``<module>.lora_A.weight`` (r, in), ``<module>.lora_B.weight`` (out, r)}: PEFT's names/layout."""
    return {f"{module_name(path[:-1])}.{path[-1]}.weight": jnp.asarray(v).T
            for path, v in traverse_util.flatten_dict(lora_params).items()}
