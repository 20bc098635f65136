"""Per-batch advantages and pair preferences (Specialists 3.2). Pure jnp, jittable.

Scores are losses: LOWER is better for every score here (DESIGN.md, Scores).

Pair layout (used by ``pair_preference``, ``pareto_preference`` and ``jaxedit.rl.d3po``): a
batch of 2P samples holds the two members of pair p at rows p and P + p,
``[a_0 .. a_{P-1}, b_0 .. b_{P-1}]``. That is what the trajectory sampler produces from
``x_T = concatenate([z, z])`` with the conditioning tiled the same way.
"""
from __future__ import annotations

import jax.numpy as jnp

EPS = 1e-8


def normalize(scores):
    """(L − mean) / sqrt(var + 1e-8) over the batch, population variance. (N,) -> (N,) float32."""
    x = jnp.asarray(scores, jnp.float32)
    return (x - x.mean()) / jnp.sqrt(x.var() + EPS)


def combined(struct, sem, alpha=1.0):
    """L_total = Â_struct + α·Â_sem, each score normalised over the batch. (N,), (N,) -> (N,)."""
    return normalize(struct) + alpha * normalize(sem)


def _split_pairs(x):
    """(2P,) in pair layout -> (a (P,), b (P,))."""
    x = jnp.asarray(x, jnp.float32)
    if x.ndim != 1 or x.shape[0] % 2:
        raise ValueError(f"expected a (2P,) array in pair layout [a_0..a_P-1, b_0..b_P-1], got {x.shape}")
    p = x.shape[0] // 2
    return x[:p], x[p:]


def pair_preference(total):
    """Preference within each pair by a total loss (lower is better).

    total: (2P,) in pair layout ``[a_0..a_{P-1}, b_0..b_{P-1}]``.
    Returns (winner_is_first (P,) float32: 1 where a_p is preferred, valid (P,) float32: 0 for
    exact ties and for pairs with a non-finite total — such pairs give no gradient).
    """
    a, b = _split_pairs(total)
    valid = (a != b) & jnp.isfinite(a) & jnp.isfinite(b)
    return (a < b).astype(jnp.float32), valid.astype(jnp.float32)


def pareto_preference(*scores):
    """Pareto preference: a member wins only if it DOMINATES the other.

    scores: k >= 1 arrays (2P,) in pair layout (e.g. ``pareto_preference(struct, sem)``), lower
    is better. a dominates b when a is no worse in every score and strictly better in at least
    one. Pairs where neither dominates (a trade-off, or all scores tied) or with any non-finite
    score are invalid (no gradient). This is the reference D3PO code's multi-reward ``compare``.
    Dominance does not change under per-batch normalisation (a positive affine map per score),
    so raw scores are compared. Returns (winner_is_first (P,), valid (P,)) float32.
    """
    if not scores:
        raise ValueError("pareto_preference needs at least one score")
    ab = [_split_pairs(s) for s in scores]
    a = jnp.stack([x for x, _ in ab])  # (k, P)
    b = jnp.stack([y for _, y in ab])
    finite = jnp.isfinite(a).all(0) & jnp.isfinite(b).all(0)
    a_dom = (a <= b).all(0) & (a < b).any(0)
    b_dom = (b <= a).all(0) & (b < a).any(0)
    return a_dom.astype(jnp.float32), ((a_dom | b_dom) & finite).astype(jnp.float32)
