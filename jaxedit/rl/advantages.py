"""Per-batch advantages and pair preferences (Specialists 3.2; pure jnp, jittable), and the
per-prompt stat tracker of PPO (host-side NumPy).

Scores are losses: LOWER is better for every score here (DESIGN.md, Scores).

Pair layout (used by ``pair_preference``, ``pareto_preference`` and ``jaxedit.rl.d3po``): a
batch of 2P samples holds the two members of pair p at rows p and P + p,
``[a_0 .. a_{P-1}, b_0 .. b_{P-1}]``. That is what the trajectory sampler produces from
``x_T = concatenate([z, z])`` with the conditioning tiled the same way.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

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


class PromptStatTracker:
    """Per-prompt reward normalisation for PPO (DDPO's per-prompt stat tracker). Host-side NumPy.

    ``update(prompts, rewards)`` appends each prompt's rewards to its buffer (the last
    ``buffer_size`` kept), then normalises them by that buffer's mean and population std
    (+1e-6) when it holds at least ``min_count`` rewards, else by the whole batch's; returns
    float64 advantages (N,). ``get_state``/``set_state``: a JSON-serialisable dict for checkpoints.
    """

    def __init__(self, buffer_size: int = 16, min_count: int = 16):
        if buffer_size < 1 or min_count < 1:
            raise ValueError(f"buffer_size and min_count must be >= 1, got {buffer_size}, {min_count}")
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers: dict[str, list[float]] = {}

    def update(self, prompts, rewards) -> np.ndarray:
        prompts = [str(p) for p in prompts]
        rewards = np.asarray(rewards, np.float64)
        if rewards.shape != (len(prompts),):
            raise ValueError(f"rewards {rewards.shape} must be one per prompt ({len(prompts)})")
        batch_mean, batch_std = rewards.mean(), rewards.std() + 1e-6
        out = np.empty_like(rewards)
        for prompt in dict.fromkeys(prompts):  # first-seen order
            sel = np.array([p == prompt for p in prompts])
            buf = (self.buffers.get(prompt, []) + rewards[sel].tolist())[-self.buffer_size:]
            self.buffers[prompt] = buf
            mean, std = (np.mean(buf), np.std(buf) + 1e-6) if len(buf) >= self.min_count else (batch_mean, batch_std)
            out[sel] = (rewards[sel] - mean) / std
        return out

    def get_state(self) -> dict:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count,
                "buffers": {k: list(v) for k, v in self.buffers.items()}}

    def set_state(self, state: dict) -> None:
        if (state["buffer_size"], state["min_count"]) != (self.buffer_size, self.min_count):
            raise ValueError(f"stat tracker state has buffer_size/min_count {state['buffer_size']}/"
                             f"{state['min_count']}, this tracker {self.buffer_size}/{self.min_count}")
        self.buffers = {k: [float(x) for x in v] for k, v in state["buffers"].items()}
