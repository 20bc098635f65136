"""The sampling loop: one ``lax.scan`` over steps, optionally recording the trajectory (for RL).

The denoiser is a function ``denoise(params, cond, x (B,h,w,c), t ()) -> eps (B,h,w,c)`` whose
weights and conditioning (guidance rows, scales) come in as the traced pytrees ``params`` and
``cond``; ``t`` is the int32 timestep for DDIM and the float32 (fractional) timestep for Euler.
``sample_scan`` is jitted with static ``denoise`` (hashed by identity: build it once),
``eta`` and ``return_trajectory``; everything else is traced, and the sampler kind and the number
of steps are fixed by the plan's pytree type and shapes. So a compile happens once per
(denoise, shapes/dtypes of params, cond, x_T, steps, sampler, eta, return_trajectory) and
new params after an RL update, new guidance scales or new keys reuse it.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxedit.diffusion.ddim import ddim_step_with_logprob
from jaxedit.diffusion.euler import EulerPlan, euler_ancestral_step, euler_plan, scale_model_input
from jaxedit.diffusion.schedules import Schedule, ddim_timesteps

SAMPLERS = ("ddim", "euler_ancestral")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DDIMPlan:
    """timesteps: (S,) int32 descending DDIM timesteps."""
    timesteps: jax.Array


class Trajectory(NamedTuple):
    """Per-step record: x_t, x_prev (S,B,h,w,c), log_prob (S,B), t (S,) (int32 DDIM / float32 Euler).

    For Euler, x_t is the unscaled latent and log_prob is the ancestral Gaussian's (0 on the
    last step, where it adds no noise)."""
    x_t: jax.Array
    x_prev: jax.Array
    log_prob: jax.Array
    t: jax.Array


def make_plan(schedule: Schedule, steps: int, sampler: str = "ddim"):
    """Host-side per-run tables: ``DDIMPlan`` or ``EulerPlan`` for ``steps`` steps."""
    if sampler == "ddim":
        return DDIMPlan(jnp.asarray(ddim_timesteps(schedule, steps)))
    if sampler == "euler_ancestral":
        return euler_plan(schedule, steps)
    raise ValueError(f"sampler={sampler!r}: expected one of {SAMPLERS}")


@functools.partial(jax.jit, static_argnames=("denoise", "eta", "return_trajectory", "aux"))
def sample_scan(denoise: Callable, params, cond, schedule: Schedule, plan, x_T, key, noises=None, *,
                eta: float = 1.0, return_trajectory: bool = False, aux: bool = False):
    """Run the sampler described by ``plan`` from standard-normal ``x_T`` (B,h,w,c).

    Static: denoise, eta, return_trajectory, aux. Traced: params, cond, schedule, plan, x_T, key,
    noises. Per-step keys are ``jax.random.split(key, S)``; ``noises`` (S,B,h,w,c), if given,
    replaces the random draws (tests). Euler scales x_T by ``plan.init_noise_sigma``; ``eta`` is
    DDIM's. With ``aux`` the denoiser returns ``(eps, aux_tree)`` and the mean of aux_tree over
    the steps is returned last (e.g. cross-attention maps). Returns x_0 (B,h,w,c), plus the
    Trajectory with ``return_trajectory``, plus the aux mean with ``aux``.
    """
    x = jnp.asarray(x_T, jnp.float32)
    steps = plan.timesteps.shape[0]
    keys = jax.random.split(key, steps)
    euler = isinstance(plan, EulerPlan)
    if not euler and not isinstance(plan, DDIMPlan):
        raise TypeError(f"unknown plan type {type(plan).__name__}")

    def eps_and_aux(x, t, sigma=None):
        out = denoise(params, cond, x if sigma is None else scale_model_input(x, sigma), t)
        return out if aux else (out, None)

    def body(carry, inp):
        x, acc = carry
        if euler:
            t, sigma, sigma_next, k, n = inp
            eps, a = eps_and_aux(x, t, sigma)
            x_prev, lp = euler_ancestral_step(eps, x, sigma, sigma_next, key=k, noise=n)
        else:
            t, k, n = inp
            eps, a = eps_and_aux(x, t)
            x_prev, lp = ddim_step_with_logprob(schedule, eps, t, x, eta=eta, steps=steps, key=k, noise=n)
        acc = jax.tree_util.tree_map(lambda s, v: s + v / steps, acc, a) if aux else None
        return (x_prev, acc), ((x, x_prev, lp, t) if return_trajectory else None)

    if euler:
        x = x * plan.init_noise_sigma
        xs = (plan.timesteps, plan.sigmas[:-1], plan.sigmas[1:], keys, noises)
    else:
        xs = (plan.timesteps, keys, noises)
    acc = None
    if aux:  # zeros shaped like the denoiser's aux output
        shapes = jax.eval_shape(lambda: eps_and_aux(x, plan.timesteps[0], plan.sigmas[0] if euler else None)[1])
        acc = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    (x, acc), traj = jax.lax.scan(body, (x, acc), xs)
    out = (x,) + ((Trajectory(*traj),) if return_trajectory else ()) + ((acc,) if aux else ())
    return out if len(out) > 1 else x


def sample(denoise: Callable, params, cond, schedule: Schedule, x_T, key, *, steps: int,
           sampler: str = "ddim", eta: float = 1.0, return_trajectory: bool = False, noises=None,
           aux: bool = False):
    """Sample with ``steps`` steps of ``sampler`` ("ddim" | "euler_ancestral").

    denoise(params, cond, x (B,h,w,c), t ()) -> eps (B,h,w,c); x_T: (B,h,w,c) standard normal;
    key: PRNG key; eta: DDIM's η (static; 0 = deterministic, log_prob 0); noises: optional
    (S,B,h,w,c) injected step noise; aux: the denoiser returns (eps, aux) and the step mean of aux
    is returned too. Builds the plan on the host (Euler needs a concrete ``schedule``) and calls
    the jitted ``sample_scan``. Returns x_0 (B,h,w,c), or a tuple (x_0, [Trajectory], [aux mean]).
    """
    plan = make_plan(schedule, steps, sampler)
    if noises is not None and noises.shape != (steps, *x_T.shape):
        raise ValueError(f"noises has shape {noises.shape}, want {(steps, *x_T.shape)}")
    eta = float(eta) if sampler == "ddim" else 1.0  # Euler ignores eta: don't recompile for it
    return sample_scan(denoise, params, cond, schedule, plan, x_T, key, noises,
                       eta=eta, return_trajectory=bool(return_trajectory), aux=bool(aux))
