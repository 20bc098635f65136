"""D3PO (Specialists Eq. 7): direct preference optimisation over DDIM denoising steps.

Per pair (same x_T, same conditioning, winner w / loser l) and per trained step t:
``log r = clip(logπθ(a|s) − logπref(a|s), log(1−ε), log(1+ε))``,
``L = −log σ(β·log r_w − β·log r_l)``, β = 0.1, ε = 0.1; pairs with ``valid = 0`` (ties) have
their logit set to 0, so they add the constant log 2 and no gradient.

Behaviour of the reference implementation (yk7333/d3po ``scripts/train_with_rm.py``), and what
this module does:

* **Reference log-probs are recomputed** at training time with a frozen copy of the initial U-Net
  (``ref = deepcopy(unet)`` taken before LoRA is attached, so in LoRA mode the reference is the
  base model with LoRA off), on the recorded (x_t, x_prev, t) with the same guidance as the
  policy. The log-probs recorded while sampling are not used by the loss. Same here: each trained
  step evaluates ``denoise(ref_params, ...)`` (forward only, under ``stop_gradient``) next to the
  policy's ``denoise(merge(trainable, ref_params), ...)``.
* **Clipping** is ``clamp(exp(Δ), 1−ε, 1+ε)`` on both members, so a clipped ratio has zero
  gradient on either side. Here the same clip is applied to Δ in log space (identical values and
  gradients, and no ``exp`` overflow: a huge Δ would give ``0·inf = nan`` in the backward pass).
* **Time order**: one random permutation of the S steps per pair, shared by its two members; the
  first ``steps_per_update`` (``int(S·timestep_fraction)`` there) are trained. With every step
  trained (the default) the order does not change the accumulated gradient.
* **Averaging**: the per-step loss is the mean over all P pairs, ties included (they count in the
  denominator, as the reference's ``.mean()`` over the batch with a zero preference does);
  gradients are accumulated over the trained steps and divided by their number (accelerate's
  gradient accumulation), then ONE optimizer step. The reference clips the accumulated gradient's
  global norm (``max_grad_norm = 1``): put ``optax.clip_by_global_norm`` in the optimizer chain.

Layouts: 2P samples in pair layout ``[a_0..a_{P-1}, b_0..b_{P-1}]`` (see ``advantages``), which is
what the trajectory sampler returns for ``x_T = concatenate([z, z])``; ``winner_is_first[p] = 1``
means a_p is the winner.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from jaxedit.diffusion.ddim import ddim_step_with_logprob
from jaxedit.parallel import Layout
from jaxedit.diffusion.schedules import Schedule
from jaxedit.rl.update import (TrainState, accumulate, apply_if_finite, at_steps, chunked,  # noqa: F401
                               init_train_state, map_axes)


# ------------------------------------------------------------------------------------ the loss
def d3po_loss(logp_w, logp_l, ref_logp_w, ref_logp_l, valid, *, beta: float = 0.1, clip_eps: float = 0.1):
    """D3PO loss of one step (or of any stack of steps): mean over all entries.

    logp_w, logp_l: policy log-probs of the winner's / loser's action, (P,) (or (K,P));
    ref_logp_w, ref_logp_l: the reference policy's, same shape (treated as constants);
    valid: (P,) or same shape, 0 marks a tie: its logit is 0 (loss log 2, no gradient).
    Returns (loss (), metrics): ``loss`` (= the returned loss), ``loss_valid`` (mean over valid
    pairs only), ``win_rate`` (fraction of valid pairs whose winner already has the larger
    log-ratio, DPO's "reward accuracy"), ``clip_frac`` (fraction of the 2P ratios outside [1−ε, 1+ε]), ``approx_kl``
    (½·mean(Δ²) over both members, Δ = logπθ − logπref), ``log_ratio`` (mean Δ), ``frac_valid``.
    """
    ref_w, ref_l = jax.lax.stop_gradient((ref_logp_w, ref_logp_l))
    lo, hi = math.log1p(-clip_eps), math.log1p(clip_eps)
    d_w, d_l = logp_w - ref_w, logp_l - ref_l
    ok = jnp.broadcast_to(jnp.asarray(valid) > 0, d_w.shape)
    logits = jnp.where(ok, beta * (jnp.clip(d_w, lo, hi) - jnp.clip(d_l, lo, hi)), 0.0)
    losses = -jax.nn.log_sigmoid(logits)
    d = jnp.stack([d_w, d_l])
    n_ok = ok.sum()
    metrics = dict(
        loss=losses.mean(),
        loss_valid=jnp.where(ok, losses, 0.0).sum() / jnp.maximum(n_ok, 1),
        win_rate=(ok & (d_w > d_l)).sum() / jnp.maximum(n_ok, 1),
        clip_frac=((d < lo) | (d > hi)).mean(dtype=jnp.float32),
        approx_kl=0.5 * (d ** 2).mean(),
        log_ratio=d.mean(),
        frac_valid=n_ok / ok.size)
    return metrics["loss"], metrics


# ---------------------------------------------------------------------------------- the batch
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class D3POBatch:
    """One update's data, 2P samples in pair layout.

    x_t, x_prev: (S, 2P, h, w, c) the sampler's ``Trajectory.x_t`` / ``.x_prev`` (DDIM, η > 0);
    t: (S,) int32 DDIM timesteps (``Trajectory.t``);
    cond: the denoiser's conditioning for the P pairs (leaves with a leading P axis where
      ``cond_axes`` says 0; shared leaves, e.g. the "" embedding or scalar scales, as they are);
    winner_is_first, valid: (P,) float32 from ``pair_preference`` / ``pareto_preference``.
    """
    x_t: jax.Array
    x_prev: jax.Array
    t: jax.Array
    cond: Any
    winner_is_first: jax.Array
    valid: jax.Array


def timestep_order(key, steps: int, pairs: int, trained: int):
    """(P, trained) int32: per pair, the first ``trained`` entries of a random permutation of the
    ``steps`` trajectory steps (shared by the pair's two members)."""
    perms = jax.vmap(lambda k: jax.random.permutation(k, steps))(jax.random.split(key, pairs))
    return perms[:, :trained].astype(jnp.int32)


def _winner_loser(x, w):
    """(2P,) pair layout, w (P,) bool -> (x_winner (P,), x_loser (P,))."""
    a, b = jnp.split(x, 2)
    return jnp.where(w, a, b), jnp.where(w, b, a)


# ---------------------------------------------------------------------------------- the update
def make_update(denoise: Callable, optimizer: optax.GradientTransformation, schedule: Schedule, *,
                beta: float = 0.1, clip_eps: float = 0.1, eta: float = 1.0,
                steps_per_update: Optional[int] = None, merge: Optional[Callable] = None,
                cond_axes: Any = 0, micro_batches: int = 1,
                layout: Layout = Layout()) -> Callable:
    """Build the jitted D3PO update ``update(state, ref_params, batch, key) -> (state, metrics)``.

    denoise(params, cond, x (B,h,w,c), t (B,)) -> eps (B,h,w,c): the SAME function the sampler used
      (guidance included, e.g. ``guidance.ip2p_denoiser``, which takes per-sample timesteps), so
      log-probs are evaluated with the sampling guidance.
    optimizer: optax transformation (chain ``clip_by_global_norm`` first to match the reference).
    schedule: the DDIM schedule of the sampler; eta: its η (> 0, static).
    steps_per_update: how many of the S trajectory steps are trained (default all).
    merge(trainable, ref_params) -> params for ``denoise``. Full fine-tuning: None (the trainable
      tree IS the params; ref_params = the frozen initial params). LoRA: e.g.
      ``lambda lora, base: lora_lib.merge(base, lora, scale)`` with ref_params = the base params
      (the reference is then exactly "LoRA off").
    cond_axes: prefix tree of ``batch.cond`` (``jax.vmap`` in_axes style): 0 = per-pair leaf
      (P, ...), None = shared leaf. Default 0: EVERY leaf per pair. For the guidance conds with a
      shared "" embedding and scalar scales: ``IP2PCond(0, 0, None, None, None)`` /
      ``SpecialistCond(0, 0, 0, None, None, None, None, None)``.
    micro_batches: M, split the P pairs into M chunks of P/M pairs evaluated one after the other
      (gradient accumulation when 2P samples' activations do not fit); same result up to rounding.
    layout: where the weights, gradients and state live on the mesh (``jaxedit.parallel.Layout``:
      FSDP; default: XLA chooses, as on one device).

    Each pair's two members get one shared random step order (``timestep_order(key, S, P, K)``);
    for each chunk, a ``lax.scan`` over the K trained steps evaluates the policy (forward +
    backward) and the reference (forward only) on the chunk's samples — each at its own pair's
    step, in one batched ``denoise`` call with per-sample timesteps — and accumulates the fp32 gradient in
    the compiled function; then ONE optimizer step on the mean over steps and pairs. A non-finite
    loss or gradient leaves params, optimizer state and step unchanged and sets
    ``metrics["skipped"] = 1``. Metrics (means over steps and pairs): those of ``d3po_loss`` plus
    ``grad_norm`` and ``skipped``. The state (argument 0) is donated; ref_params is not.
    One compile per input shapes.
    """
    if not eta > 0:
        raise ValueError(f"D3PO needs a stochastic sampler: eta={eta} must be > 0")
    merge = merge if merge is not None else (lambda trainable, ref: trainable)

    def log_prob(params, x_t, x_prev, t_table, cond2, i):
        """Log-probs of the recorded actions, each sample at its own step i[n]: one denoise call."""
        xt, t = at_steps(x_t, i), t_table[i]
        eps = denoise(params, cond2, xt, t)
        return ddim_step_with_logprob(schedule, eps, t, xt, eta=eta, steps=x_t.shape[0],
                                      prev_sample=at_steps(x_prev, i))[1]

    def update(state: TrainState, ref_params, batch: D3POBatch, key):
        steps, n = batch.x_t.shape[:2]
        pairs, m = n // 2, micro_batches
        trained = steps if steps_per_update is None else steps_per_update
        if n != 2 * pairs or batch.winner_is_first.shape != (pairs,) or batch.t.shape != (steps,):
            raise ValueError(f"D3POBatch shapes: x_t {batch.x_t.shape}, t {batch.t.shape}, "
                             f"winner_is_first {batch.winner_is_first.shape}; want (S,2P,...), (S,), (P,)")
        if not 1 <= trained <= steps:
            raise ValueError(f"steps_per_update={trained} must be in [1, {steps}]")
        if m < 1 or pairs % m:
            raise ValueError(f"micro_batches={m} must divide the number of pairs {pairs}")

        def per_pair(leaf):
            if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != pairs:
                raise ValueError(f"cond leaf of shape {jnp.shape(leaf)} is marked per-pair by cond_axes "
                                 f"but has no leading axis of {pairs} pairs")
            return chunked(leaf, m)

        def samples(x):  # (S, 2P, ...) pair layout -> (M, S, 2P/M, ...) pair layout per chunk
            x = x.reshape((steps, 2, m, pairs // m) + x.shape[2:])
            return jnp.moveaxis(x, 2, 0).reshape((m, steps, n // m) + x.shape[4:])

        def step_loss(trainable, chunk, i):
            x_t, x_prev, cond, win, valid = chunk
            cond2 = map_axes(lambda l: jnp.concatenate([l, l]), cond_axes, cond)  # both members
            ref_lp = jax.lax.stop_gradient(log_prob(layout.gather(ref_params), x_t, x_prev, batch.t, cond2, i))
            lp = log_prob(layout.gather(merge(trainable, ref_params)), x_t, x_prev, batch.t, cond2, i)
            return d3po_loss(*_winner_loser(lp, win), *_winner_loser(ref_lp, win), valid,
                             beta=beta, clip_eps=clip_eps)

        chunks = (samples(batch.x_t), samples(batch.x_prev),
                  map_axes(per_pair, cond_axes, batch.cond, lambda l: jnp.broadcast_to(l, (m,) + jnp.shape(l))),
                  per_pair(batch.winner_is_first > 0.5), per_pair(batch.valid))
        order = per_pair(timestep_order(key, steps, pairs, trained))        # (M, P/M, K)
        step_index = jnp.concatenate([order, order], axis=1).transpose(0, 2, 1)  # (M, K, 2P/M), both members
        z = jnp.zeros((pairs // m,), jnp.float32)
        grads, metrics = accumulate(step_loss, state.params, chunks, step_index, d3po_loss(z, z, z, z, z)[1],
                                    layout.fsdp)
        n_valid = metrics["frac_valid"] * pairs  # ties add exactly log 2 to the mean loss
        metrics["loss_valid"] = (metrics["loss"] * pairs - (pairs - n_valid) * math.log(2)) / jnp.maximum(n_valid, 1)
        new_state, grad_norm, skipped = apply_if_finite(state, optimizer, grads, metrics["loss"])
        metrics.update(grad_norm=grad_norm, skipped=skipped)
        return layout.fsdp(new_state), metrics

    return jax.jit(update, donate_argnums=0)
