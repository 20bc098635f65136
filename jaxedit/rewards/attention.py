"""InstructRL4Pix reward (Eqs. 4, 6): r = cos(a_1, a_2) + α·L_clip, α = −1.

a_2: the policy's cross-attention map (B, h, w), already averaged over heads, selected layers,
instruction tokens and sampling steps (inside the compiled sampler); a_1: the ground-truth edit
mask brought to the map's resolution by area averaging. All jnp, batched, jittable.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxedit.rewards.pixel import clipped_mae


def mask_to_map(masks, size: tuple[int, int]):
    """Masks (B, H, W) in [0, 1] -> (B, h, w): the mean of each cell when H, W are multiples of
    h, w (exact area average), else antialiased linear resizing."""
    masks = jnp.asarray(masks, jnp.float32)
    b, hh, ww = masks.shape
    h, w = size
    if hh % h == 0 and ww % w == 0:
        return masks.reshape(b, h, hh // h, w, ww // w).mean(axis=(2, 4))
    return jax.image.resize(masks, (b, h, w), method="linear", antialias=True)


def cosine(a, b, eps: float = 1e-8):
    """Cosine similarity of flattened maps, (B, ...) x2 -> (B,); 0 where either map is all zero."""
    a = jnp.asarray(a, jnp.float32).reshape(a.shape[0], -1)
    b = jnp.asarray(b, jnp.float32).reshape(b.shape[0], -1)
    return (a * b).sum(-1) / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), eps)


def attention_reward(maps, masks, inputs, generated, *, alpha: float = -1.0, tau: float = 0.1):
    """r = cos(mask_to_map(masks), maps) + α · clipped_mae(inputs, generated, τ), (B,).

    maps (B, h, w); masks (B, H, W) in [0, 1]; inputs/generated float (B, H, W, 3) in [-1, 1].
    """
    a1 = mask_to_map(masks, maps.shape[1:])
    return cosine(a1, maps) + alpha * clipped_mae(inputs, generated, tau)
