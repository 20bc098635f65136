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
from jaxedit.diffusion.schedules import Schedule


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


# ------------------------------------------------------------------------------- state, batch
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """params: the TRAINABLE tree (full U-Net params, or LoRA params); opt_state; step: () int32
    count of applied (non-skipped) updates."""
    params: Any
    opt_state: Any
    step: jax.Array


def init_train_state(params, optimizer: optax.GradientTransformation) -> TrainState:
    """TrainState with a COPY of ``params`` (the update donates the state: in full mode the
    reference params must not share buffers with it)."""
    params = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), params)
    return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))


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


def _map_axes(fn, axes, cond, shared=lambda leaf: leaf):
    """Apply ``fn`` to the leaves of ``cond`` whose axis (``axes``: a prefix tree of 0 / None) is 0,
    and ``shared`` to the others."""
    return jax.tree_util.tree_map(
        lambda ax, sub: jax.tree_util.tree_map(shared if ax is None else fn, sub),
        axes, cond, is_leaf=lambda x: x is None)


def _winner_loser(x, w):
    """(2P,) pair layout, w (P,) bool -> (x_winner (P,), x_loser (P,))."""
    a, b = jnp.split(x, 2)
    return jnp.where(w, a, b), jnp.where(w, b, a)


def _at_steps(x, i):
    """x (S, N, ...), i (N,) -> (N, ...): sample n at step i[n]."""
    return jnp.take_along_axis(x, i.reshape((1, -1) + (1,) * (x.ndim - 2)), axis=0)[0]


# ---------------------------------------------------------------------------------- the update
def make_update(denoise: Callable, optimizer: optax.GradientTransformation, schedule: Schedule, *,
                beta: float = 0.1, clip_eps: float = 0.1, eta: float = 1.0,
                steps_per_update: Optional[int] = None, merge: Optional[Callable] = None,
                cond_axes: Any = 0, micro_batches: int = 1) -> Callable:
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

    def eps_per_sample(params, cond2, x, t):
        """x (N,h,w,c), t (N,): one batched denoise call, each sample at its own timestep."""
        return denoise(params, cond2, x, t)

    def chunk_grads(acc, trainable, ref_params, t_table, chunk, grad_scale):
        """acc + the sums over the K trained steps of one chunk's (grads × grad_scale, metrics)."""
        x_t, x_prev, order, cond, win, valid = chunk
        steps = x_t.shape[0]
        cond2 = _map_axes(lambda l: jnp.concatenate([l, l]), cond_axes, cond)  # both members

        def log_prob(params, i):
            xt, t = _at_steps(x_t, i), t_table[i]
            eps = eps_per_sample(params, cond2, xt, t)
            return ddim_step_with_logprob(schedule, eps, t, xt, eta=eta, steps=steps,
                                          prev_sample=_at_steps(x_prev, i))[1]

        def step_loss(trainable, i, ref_lp):
            lp = log_prob(merge(trainable, ref_params), i)
            loss, m = d3po_loss(*_winner_loser(lp, win), *_winner_loser(ref_lp, win), valid,
                                beta=beta, clip_eps=clip_eps)
            return loss * grad_scale, m  # the accumulated gradient is then the mean over steps

        def body(carry, i):
            ref_lp = jax.lax.stop_gradient(log_prob(ref_params, i))
            (_, m), g = jax.value_and_grad(step_loss, has_aux=True)(trainable, i, ref_lp)
            return _add(carry, (g, m)), None

        idx = jnp.concatenate([order, order], axis=0).T  # (K, 2P/M): step of each sample
        return jax.lax.scan(body, acc, idx)[0]

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
            return jnp.reshape(leaf, (m, pairs // m) + jnp.shape(leaf)[1:])

        def samples(x):  # (S, 2P, ...) pair layout -> (M, S, 2P/M, ...) pair layout per chunk
            x = x.reshape((steps, 2, m, pairs // m) + x.shape[2:])
            return jnp.moveaxis(x, 2, 0).reshape((m, steps, n // m) + x.shape[4:])

        chunks = (samples(batch.x_t), samples(batch.x_prev),
                  per_pair(timestep_order(key, steps, pairs, trained)),
                  _map_axes(per_pair, cond_axes, batch.cond, lambda l: jnp.broadcast_to(l, (m,) + jnp.shape(l))),
                  per_pair(batch.winner_is_first > 0.5), per_pair(batch.valid))
        z = jnp.zeros((pairs // m,), jnp.float32)
        zeros = (jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params),
                 jax.tree_util.tree_map(jnp.zeros_like, d3po_loss(z, z, z, z, z)[1]))
        g_mean, m_sum = jax.lax.scan(
            lambda acc, c: (chunk_grads(acc, state.params, ref_params, batch.t, c, 1.0 / (trained * m)), None),
            zeros, chunks)[0]
        grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), g_mean, state.params)
        metrics = {k: v / (trained * m) for k, v in m_sum.items()}
        n_valid = metrics["frac_valid"] * pairs  # ties add exactly log 2 to the mean loss
        metrics["loss_valid"] = (metrics["loss"] * pairs - (pairs - n_valid) * math.log(2)) / jnp.maximum(n_valid, 1)
        grad_norm = optax.tree.norm(grads)  # non-finite iff some gradient entry is (or overflows)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)

        def apply(state):
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            return TrainState(optax.apply_updates(state.params, updates), opt_state, state.step + 1)
        # A cond, not a per-leaf select: a skipped update costs nothing and compiles to fewer kernels.
        new_state = jax.lax.cond(finite, apply, lambda state: state, state)
        metrics.update(grad_norm=grad_norm, skipped=1.0 - finite.astype(jnp.float32))
        return new_state, metrics

    return jax.jit(update, donate_argnums=0)


def _add(acc, x):
    """acc + x leafwise, x cast to acc's dtype (fp32 accumulators)."""
    return jax.tree_util.tree_map(lambda a, b: a + b.astype(a.dtype), acc, x)
