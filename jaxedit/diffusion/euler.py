"""Euler ancestral sampling on Karras σ (the papers' inference sampler), as diffusers.

Matches ``EulerAncestralDiscreteScheduler.step`` run on the σ/timestep table of
``EulerDiscreteScheduler(use_karras_sigmas=True)`` (diffusers 0.42's ancestral class itself has no
Karras option), including ``scale_model_input`` (x/√(σ²+1)) and ``init_noise_sigma``.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxedit.diffusion.ddim import gaussian_action, gaussian_log_prob
from jaxedit.diffusion.schedules import Schedule, init_noise_sigma, karras_sigmas


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EulerPlan:
    """Per-run tables (all traced leaves).

    sigmas: (S+1,) float32, last is 0. timesteps: (S,) float32 fractional model timesteps.
    init_noise_sigma: () float32; initial latent = standard normal × this.
    """
    sigmas: jax.Array
    timesteps: jax.Array
    init_noise_sigma: jax.Array


def euler_plan(schedule: Schedule, steps: int) -> EulerPlan:
    """Karras σ table for ``steps`` steps (host NumPy; needs a concrete schedule)."""
    sigmas, timesteps = karras_sigmas(schedule, steps)
    return EulerPlan(jnp.asarray(sigmas), jnp.asarray(timesteps),
                     jnp.asarray(init_noise_sigma(schedule, sigmas)))


def scale_model_input(x, sigma):
    """x (B,h,w,c) / √(σ²+1): what the ε-model sees at noise level σ."""
    return x / ((sigma ** 2 + 1) ** 0.5)


def euler_ancestral_step(eps, x, sigma, sigma_next, *, key=None, noise=None, prev_sample=None):
    """One Euler ancestral step σ -> σ_next (ε-prediction).

    eps, x: (B,h,w,c) float32 (x unscaled); sigma, sigma_next: () float32.
    Noise from ``prev_sample`` (evaluate a recorded action; stop-gradient), ``noise`` or ``key``.
    Returns (x_prev (B,h,w,c), log_prob (B,)): log N(x_prev; mean, σ_up²) averaged over C,H,W,
    zeros where σ_up = 0 (the last step).
    """
    pred_x0 = x - sigma * eps
    sigma_up = (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5
    sigma_down = (sigma_next ** 2 - sigma_up ** 2) ** 0.5
    derivative = (x - pred_x0) / sigma
    mean = x + derivative * (sigma_down - sigma)
    x_prev = gaussian_action(mean, sigma_up, key=key, noise=noise, prev_sample=prev_sample,
                             who="euler_ancestral_step")
    positive = sigma_up > 0
    lp = gaussian_log_prob(x_prev, mean, jnp.where(positive, sigma_up, 1.0))
    return x_prev, jnp.where(positive, lp, 0.0)
