"""What the D3PO and PPO updates share: accumulate a gradient over micro-batches x trained
denoising steps inside one compiled function, then ONE optimizer step, skipped when non-finite.

    g = (1 / (M·K)) Σ_chunks Σ_steps ∇ loss(trainable, chunk, step indices)

The per-step loss is scaled by 1/(M·K) before differentiation, so the fp32 accumulator holds the
mean gradient (no per-leaf division afterwards), and finiteness comes from the global norm (one
reduction); a skipped update is a ``lax.cond``. Both keep the number of compiled kernels small,
which dominates XLA:CPU compile time.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """params: the TRAINABLE tree (full U-Net params, or LoRA params); opt_state; step: () int32
    count of applied (non-skipped) updates."""
    params: Any
    opt_state: Any
    step: jax.Array


def init_train_state(params, optimizer: optax.GradientTransformation) -> TrainState:
    """TrainState with a COPY of ``params`` (the updates donate the state: in full mode the
    reference params must not share buffers with it)."""
    params = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), params)
    return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))


def accumulate(loss_fn: Callable, trainable, chunks, step_index, metrics_zero: dict,
               pin: Callable = lambda tree: tree):
    """Mean gradient and mean metrics of ``loss_fn`` over M chunks x K trained steps.

    loss_fn(trainable, chunk, idx) -> (loss (), metrics {name: ()}): one step's loss on one chunk;
      idx (n,) int32 gives each of the chunk's n samples its trajectory step.
    chunks: pytree whose leaves have a leading M axis; step_index: (M, K, n) int32;
    metrics_zero: a pytree like loss_fn's metrics (shapes and dtypes); pin: pins the gradient
    accumulator's sharding (``jaxedit.parallel.Layout.fsdp``). Returns (grads (fp32, like
    trainable), metrics), both means over the M·K evaluations.
    """
    m, k = step_index.shape[:2]
    scale = 1.0 / (m * k)

    def scaled(params, chunk, idx):
        loss, metrics = loss_fn(params, chunk, idx)
        return loss * scale, metrics

    def step(acc, args):
        chunk, idx = args
        (_, metrics), g = jax.value_and_grad(scaled, has_aux=True)(trainable, chunk, idx)
        grads, metrics = _add(acc, (g, jax.tree_util.tree_map(lambda v: v * scale, metrics)))
        return (pin(grads), metrics), None

    def chunk_body(acc, args):
        chunk, idx = args
        return jax.lax.scan(lambda a, i: step(a, (chunk, i)), acc, idx)[0], None

    zeros = (pin(jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)),
             jax.tree_util.tree_map(lambda v: jnp.zeros(jnp.shape(v), jnp.float32), metrics_zero))
    return jax.lax.scan(chunk_body, zeros, (chunks, step_index))[0]


def apply_if_finite(state: TrainState, optimizer: optax.GradientTransformation, grads, loss):
    """One optimizer step with ``grads`` unless ``loss`` or the gradient is non-finite.

    Returns (new state, grad_norm (), skipped () float32: 1 = params, optimizer state and step
    unchanged)."""
    grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), grads, state.params)
    grad_norm = optax.tree.norm(grads)  # non-finite iff some gradient entry is (or overflows)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def apply(state):
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        return TrainState(optax.apply_updates(state.params, updates), opt_state, state.step + 1)
    new_state = jax.lax.cond(finite, apply, lambda state: state, state)
    return new_state, grad_norm, 1.0 - finite.astype(jnp.float32)


def map_axes(fn, axes, cond, shared=lambda leaf: leaf):
    """Apply ``fn`` to the leaves of ``cond`` whose axis (``axes``: a prefix tree of 0 / None) is 0,
    and ``shared`` to the others."""
    return jax.tree_util.tree_map(
        lambda ax, sub: jax.tree_util.tree_map(shared if ax is None else fn, sub),
        axes, cond, is_leaf=lambda x: x is None)


def at_steps(x, i):
    """x (S, N, ...), i (N,) -> (N, ...): sample n at step i[n]."""
    return jnp.take_along_axis(x, i.reshape((1, -1) + (1,) * (x.ndim - 2)), axis=0)[0]


def chunked(x, m: int):
    """(N, ...) -> (M, N/M, ...): M consecutive chunks along the leading axis."""
    return jnp.reshape(x, (m, x.shape[0] // m) + x.shape[1:])


def _add(acc, x):
    """acc + x leafwise, x cast to acc's dtype (fp32 accumulators)."""
    return jax.tree_util.tree_map(lambda a, b: a + b.astype(a.dtype), acc, x)
