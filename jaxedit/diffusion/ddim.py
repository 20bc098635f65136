"""DDIM step with the log-probability of the sampled transition (DDPO / D3PO).

x̂0 = (x_t − √(1−ᾱ_t)·ε)/√ᾱ_t,  σ_t = η·√((1−ᾱ_prev)/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_prev)),
μ = √ᾱ_prev·x̂0 + √(1−ᾱ_prev−σ_t²)·ε,  x_prev = μ + σ_t·z,
log p = mean over C,H,W of [−(x_prev−μ)²/(2σ_t²) − log σ_t − ½log 2π].
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxedit.diffusion.schedules import Schedule, ddim_prev_timestep

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _per_sample(v, x):
    """Scalar or (B,) -> broadcastable against x (B,...)."""
    v = jnp.asarray(v, jnp.float32)
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim)) if v.ndim else v


def gaussian_log_prob(x, mean, std):
    """log N(x; mean, std²) averaged over all non-batch axes -> (B,).

    x, mean: (B,...); std: (), (B,) or broadcastable to x (e.g. (B,1,1,1)).

    ``std`` must be > 0.
    """
    std = _per_sample(std, x)
    lp = -((x - mean) ** 2) / (2 * std ** 2) - jnp.log(std) - _HALF_LOG_2PI
    return lp.mean(axis=tuple(range(1, x.ndim)))


def gaussian_action(mean, std, *, key=None, noise=None, prev_sample=None, who: str = "step"):
    """The step's action: the recorded `prev_sample` (a constant), else mean + std·noise
    (noise given, or drawn from `key`)."""
    if prev_sample is not None:
        return jax.lax.stop_gradient(jnp.asarray(prev_sample, jnp.float32))
    if noise is None:
        if key is None:
            raise ValueError(f"{who} needs key, noise or prev_sample")
        noise = jax.random.normal(key, mean.shape, jnp.float32)
    return mean + std * noise


def ddim_step_with_logprob(schedule: Schedule, eps, t, x_t, *, eta: float, steps: int,
                           key=None, noise=None, prev_sample=None):
    """One DDIM step t -> t − T//steps, as diffusers ``DDIMScheduler.step`` (ε-prediction).

    eps, x_t: (B,h,w,c) float32. t: () or (B,) int timestep. eta: Python float (static).
    steps: number of inference steps (static; defines the previous timestep).
    The noise z comes from (first given wins) ``prev_sample`` (evaluate the log-prob of this
    recorded action: x_prev = stop_gradient(prev_sample)), ``noise`` (z (B,h,w,c)), or ``key``.
    Returns (x_prev (B,h,w,c), log_prob (B,)); log_prob is differentiable w.r.t. eps / x_t.
    eta = 0 is deterministic (no key needed) and log_prob is then undefined: zeros are returned.
    """
    eps = jnp.asarray(eps, jnp.float32)
    x_t = jnp.asarray(x_t, jnp.float32)
    t = jnp.asarray(t, jnp.int32)
    prev_t = ddim_prev_timestep(schedule, t, steps)
    acp = schedule.alphas_cumprod
    a_t = _per_sample(acp[t], x_t)
    a_prev = _per_sample(jnp.where(prev_t >= 0, acp[jnp.maximum(prev_t, 0)], schedule.final_alpha_cumprod), x_t)
    b_t = 1 - a_t
    x0 = (x_t - b_t ** 0.5 * eps) / a_t ** 0.5
    variance = ((1 - a_prev) / b_t) * (1 - a_t / a_prev)
    std = eta * variance ** 0.5
    mean = a_prev ** 0.5 * x0 + (1 - a_prev - std ** 2) ** 0.5 * eps
    batch = x_t.shape[0]
    if eta == 0:
        x_prev = mean if prev_sample is None else jax.lax.stop_gradient(jnp.asarray(prev_sample, jnp.float32))
        return x_prev, jnp.zeros((batch,), jnp.float32)
    if eta < 0:
        raise ValueError(f"eta={eta} must be >= 0")
    x_prev = gaussian_action(mean, std, key=key, noise=noise, prev_sample=prev_sample,
                             who="ddim_step_with_logprob: eta > 0")
    return x_prev, gaussian_log_prob(x_prev, mean, std)
