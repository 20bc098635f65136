"""Pixel terms of InstructRL4Pix (Eq. 5). Images float (B, H, W, C) in [-1, 1] (the JAX-side
convention); the MAE is reported on the [0, 1] scale (half the [-1, 1] difference), so a
threshold τ reads as a fraction of the full pixel range."""
from __future__ import annotations

import jax.numpy as jnp


def mae(inputs, generated):
    """Mean |I_in − I_gen| per sample on the [0, 1] scale: (B, ...) x2 -> (B,)."""
    d = jnp.abs(jnp.asarray(inputs, jnp.float32) - jnp.asarray(generated, jnp.float32)) * 0.5
    return d.reshape(d.shape[0], -1).mean(-1)


def clipped_mae(inputs, generated, tau: float):
    """L_clip = MAE · [MAE > τ] (Eq. 5): no penalty until the output drifts more than τ. (B,)."""
    m = mae(inputs, generated)
    return jnp.where(m > tau, m, 0.0)
