"""PPO's clipped surrogate over denoising steps (DDPO; InstructRL4Pix).

    A = clip(adv, −c, c),  ρ = exp(logπθ(a|s) − logπold(a|s))
    L = mean(max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)))          ε = 1e-4, c = 5 (DDPO defaults)

logπold are the log-probs recorded while sampling (same guidance as the update evaluates).
`make_update` builds the jitted update (one optimizer step per PPO inner epoch).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from jaxedit.diffusion.ddim import ddim_step_with_logprob
from jaxedit.diffusion.schedules import Schedule
from jaxedit.parallel import Layout
from jaxedit.rl.update import accumulate, apply_if_finite, at_steps, chunked, init_train_state, map_axes  # noqa: F401


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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PPOBatch:
    """One sampling phase's data for the PPO update, N samples.

    x_t, x_prev: (S, N, h, w, c) the sampler's ``Trajectory.x_t`` / ``.x_prev`` (DDIM, η > 0);
    t: (S,) int32 DDIM timesteps; log_prob: (S, N) the log-probs recorded while sampling (logπold);
    cond: the denoiser's conditioning of the N samples (per-sample leaves where ``cond_axes`` says 0);
    advantages: (N,) float32 (clipped to ±adv_clip in the loss).
    """
    x_t: jax.Array
    x_prev: jax.Array
    t: jax.Array
    log_prob: jax.Array
    cond: Any
    advantages: jax.Array


def make_update(denoise: Callable, optimizer: optax.GradientTransformation, schedule: Schedule, *,
                clip_range: float = 1e-4, adv_clip: float = 5.0, eta: float = 1.0,
                steps_per_update: Optional[int] = None, merge: Optional[Callable] = None,
                cond_axes: Any = 0, micro_batches: int = 1,
                layout: Layout = Layout()) -> Callable:
    """Build the jitted PPO update ``update(state, ref_params, batch, key) -> (state, metrics)``:
    ONE optimizer step (one PPO inner epoch; call it once per epoch with a new key).

    denoise: the sampler's denoiser (guidance included), taking per-sample timesteps, so the
      ratio is evaluated with the sampling guidance; merge(trainable, ref_params) -> its params
      (None: the trainable tree is the params; LoRA: the base params are ref_params); cond_axes:
      as ``jaxedit.rl.d3po.make_update`` (0 = per-sample leaf, None = shared); layout: where the
      weights, gradients and state live on the mesh (``jaxedit.parallel.Layout``; default: XLA chooses).
    Each sample trains the first ``steps_per_update`` (default all S) steps of its own random
    step order (DDPO); the N samples are split into ``micro_batches`` chunks evaluated one after
    the other; the gradient of ``ppo_loss`` is accumulated (mean over chunks and steps) in the
    compiled function. A non-finite loss or gradient skips the step (``metrics["skipped"] = 1``).
    Metrics (means): loss, approx_kl, clip_frac, ratio, grad_norm, skipped. State donated.
    """
    if not eta > 0:
        raise ValueError(f"PPO needs a stochastic sampler: eta={eta} must be > 0")
    merge = merge if merge is not None else (lambda trainable, ref: trainable)

    def update(state, ref_params, batch: PPOBatch, key):
        steps, n = batch.x_t.shape[:2]
        m = micro_batches
        trained = steps if steps_per_update is None else steps_per_update
        if batch.log_prob.shape != (steps, n) or batch.advantages.shape != (n,) or batch.t.shape != (steps,):
            raise ValueError(f"PPOBatch shapes: x_t {batch.x_t.shape}, log_prob {batch.log_prob.shape}, "
                             f"t {batch.t.shape}, advantages {batch.advantages.shape}; want (S,N,...), (S,N), (S,), (N,)")
        if not 1 <= trained <= steps:
            raise ValueError(f"steps_per_update={trained} must be in [1, {steps}]")
        if m < 1 or n % m:
            raise ValueError(f"micro_batches={m} must divide the number of samples {n}")

        def per_sample(leaf):
            if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != n:
                raise ValueError(f"cond leaf of shape {jnp.shape(leaf)} is marked per-sample by cond_axes "
                                 f"but has no leading axis of {n} samples")
            return chunked(leaf, m)

        def step_loss(trainable, chunk, i):
            x_t, x_prev, old_lp, cond, adv = chunk
            xt, t = at_steps(x_t, i), batch.t[i]
            eps = denoise(layout.gather(merge(trainable, ref_params)), cond, xt, t)
            lp = ddim_step_with_logprob(schedule, eps, t, xt, eta=eta, steps=steps, prev_sample=at_steps(x_prev, i))[1]
            return ppo_loss(lp, at_steps(old_lp, i), adv, clip_range=clip_range, adv_clip=adv_clip)

        along_n = lambda x: jnp.moveaxis(chunked(jnp.moveaxis(x, 1, 0), m), 1, 2)  # (S,N,..) -> (M,S,N/M,..)
        chunks = (along_n(batch.x_t), along_n(batch.x_prev), along_n(batch.log_prob),
                  map_axes(per_sample, cond_axes, batch.cond, lambda l: jnp.broadcast_to(l, (m,) + jnp.shape(l))),
                  per_sample(batch.advantages))
        order = jax.vmap(lambda k: jax.random.permutation(k, steps)[:trained])(jax.random.split(key, n))
        step_index = per_sample(order.astype(jnp.int32)).transpose(0, 2, 1)  # (M, K, N/M)
        z = jnp.zeros((n // m,), jnp.float32)
        grads, metrics = accumulate(step_loss, state.params, chunks, step_index, ppo_loss(z, z, z)[1], layout.fsdp)
        new_state, grad_norm, skipped = apply_if_finite(state, optimizer, grads, metrics["loss"])
        metrics.update(grad_norm=grad_norm, skipped=skipped)
        return layout.fsdp(new_state), metrics

    return jax.jit(update, donate_argnums=0)
