"""PPO's clipped surrogate over denoising steps (DDPO; InstructRL4Pix).

    A = clip(adv, −c, c),  ρ = exp(logπθ(a|s) − logπold(a|s))
    L = mean(max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)))          ε = 1e-4, c = 5 (DDPO defaults)

logπold are the log-probs recorded while sampling (same guidance as the update evaluates).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def ppo_loss(logp, old_logp, advantages, *, clip_range: float = 1e-4, adv_clip: float = 5.0):
    """Clipped PPO loss: mean over all entries of (N,) or (K, N) arrays.

    logp: policy log-probs; old_logp: the sampling-time log-probs (constants); advantages: per
    sample, broadcast against logp. Returns (loss (), metrics) with ``loss``, ``approx_kl``
    (½·mean(Δ²), Δ = logp − old_logp), ``clip_frac`` (mean |ρ − 1| > ε), ``ratio`` (mean ρ).
    """
    old_logp = jax.lax.stop_gradient(old_logp)
    a = jnp.clip(jax.lax.stop_gradient(jnp.asarray(advantages, jnp.float32)), -adv_clip, adv_clip)
    d = logp - old_logp
    ratio = jnp.exp(d)
    loss = jnp.maximum(-a * ratio, -a * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)).mean()
    return loss, dict(loss=loss, approx_kl=0.5 * (d ** 2).mean(),
                      clip_frac=(jnp.abs(ratio - 1.0) > clip_range).mean(dtype=jnp.float32), ratio=ratio.mean())
