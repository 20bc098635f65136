"""Cross-attention maps of the instruction, reduced while sampling (InstructRL4Pix's a_2).

    a_2 = mean over steps, layers at one resolution, heads, instruction tokens of P(pixel -> token)

The U-Net sows each cross-attention layer's head-averaged probabilities (R, N, L) when the
``attention_probs`` collection is mutable (`jaxedit.models.attention`). `reduce_maps` keeps the
layers whose N pixels are the latent downsampled by ``downsample`` (Prompt-to-Prompt averages the
16x16 layers of SD's 64x64 latent: ``downsample=4``), takes the fully conditioned guidance rows
(the last B of the R rows, see `jaxedit.diffusion.guidance`), weights the L tokens by
``token_weights`` and averages the layers. The sampler averages the result over steps
(`sampler.sample(..., aux=True)`), so only one (B, h, w) map per image leaves the device.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def instruction_token_weights(token_counts, length: int) -> np.ndarray:
    """(B, length) float32: 1/n at positions 1..n of each prompt's n instruction tokens, 0 at the
    start, end and padding tokens; an empty prompt gets all zeros (its map is 0).

    token_counts: (B,) number of tokens of each prompt without start/end (truncated to length − 2).
    """
    n = np.minimum(np.asarray(token_counts, np.int64), length - 2)
    pos = np.arange(length)[None, :]
    keep = (pos >= 1) & (pos <= n[:, None])
    return (keep / np.maximum(n, 1)[:, None]).astype(np.float32)


def reduce_maps(sown, token_weights, latent_hw: tuple[int, int], downsample: int):
    """Sown probabilities -> (B, h/downsample, w/downsample) token-weighted mean over the layers at
    that resolution. sown: the ``attention_probs`` collection (leaves (R, N, L), R = guidance rows
    x B); token_weights: (B, L)."""
    h, w = latent_hw
    if h % downsample or w % downsample:
        raise ValueError(f"latent {h}x{w} is not a multiple of attention downsample {downsample}")
    hh, ww = h // downsample, w // downsample
    leaves = jax.tree_util.tree_leaves(sown)
    picked = [p for p in leaves if p.shape[1] == hh * ww]
    if not picked:
        sizes = sorted({int(p.shape[1]) for p in leaves})
        raise ValueError(f"no cross-attention layer at {hh}x{ww} (latent {h}x{w} / {downsample}); "
                         f"layers have {sizes} pixels")
    b = token_weights.shape[0]
    maps = [jnp.einsum("bnl,bl->bn", p[-b:].astype(jnp.float32), token_weights) for p in picked]
    return jnp.mean(jnp.stack(maps), axis=0).reshape(b, hh, ww)
