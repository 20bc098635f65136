"""PPO loss vs a float64 NumPy transcription; the per-prompt stat tracker vs plain Python."""
import collections
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxedit.rl.advantages import PromptStatTracker
from jaxedit.rl.ppo import ppo_loss

EPS, CLIP = 1e-4, 5.0


def _np_ppo(logp, old, adv):
    a = np.clip(adv, -CLIP, CLIP)
    r = np.exp(logp - old)
    return np.mean(np.maximum(-a * r, -a * np.clip(r, 1 - EPS, 1 + EPS)))


def test_ppo_loss_matches_numpy_with_clipping_on_both_sides():
    rng = np.random.default_rng(0)
    n = 256
    old = rng.normal(-2, 1, n)
    d = rng.uniform(-3e-4, 3e-4, n)                    # ratios inside and outside [1-ε, 1+ε], both sides
    adv = rng.normal(0, 4, n)                          # |adv| > 5 for some: advantage clipping
    logp = old + d
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    loss, m = jax.jit(lambda *a: ppo_loss(*a, clip_range=EPS, adv_clip=CLIP))(f32(logp), f32(old), f32(adv))
    lp32, old32 = np.float32(logp).astype(np.float64), np.float32(old).astype(np.float64)
    want = _np_ppo(lp32, old32, np.float32(adv).astype(np.float64))
    assert abs(float(loss) - want) < 1e-6 * max(1.0, abs(want))
    dd = lp32 - old32
    r = np.exp(dd)
    assert (r < 1 - EPS).any() and (r > 1 + EPS).any() and (np.abs(adv) > CLIP).any()
    assert abs(float(m["clip_frac"]) - np.mean(np.abs(r - 1) > EPS)) < 1e-6
    assert abs(float(m["approx_kl"]) - 0.5 * np.mean(dd ** 2)) < 1e-9
    # gradient: zero where the clipped term is the max (ratio outside the range on the advantage's side)
    g = np.asarray(jax.grad(lambda lp: ppo_loss(lp, f32(old), f32(adv), clip_range=EPS)[0])(f32(logp)))
    a = np.clip(adv, -CLIP, CLIP)
    clipped = ((a > 0) & (r > 1 + EPS)) | ((a < 0) & (r < 1 - EPS))
    np.testing.assert_array_equal(g[clipped], 0)
    np.testing.assert_allclose(g[~clipped], (-a * r / n)[~clipped], rtol=2e-3)


def _reference_tracker(batches, buffer_size, min_count):
    """Plain-Python transcription of DDPO's per-prompt stat tracker."""
    stats, outs = {}, []
    for prompts, rewards in batches:
        out = [0.0] * len(prompts)
        all_mean = sum(rewards) / len(rewards)
        all_std = (sum((x - all_mean) ** 2 for x in rewards) / len(rewards)) ** 0.5 + 1e-6
        for p in dict.fromkeys(prompts):
            idx = [i for i, q in enumerate(prompts) if q == p]
            buf = stats.setdefault(p, collections.deque(maxlen=buffer_size))
            buf.extend(rewards[i] for i in idx)
            if len(buf) < min_count:
                mean, std = all_mean, all_std
            else:
                mean = sum(buf) / len(buf)
                std = (sum((x - mean) ** 2 for x in buf) / len(buf)) ** 0.5 + 1e-6
            for i in idx:
                out[i] = (rewards[i] - mean) / std
        outs.append(out)
    return outs


def test_stat_tracker_matches_plain_python_and_round_trips():
    rng = np.random.default_rng(1)
    names = ["add snow", "make it night", "turn the car red"]
    batches = []
    for _ in range(12):
        prompts = list(rng.choice(names, size=8))
        batches.append((prompts, list(rng.normal(size=8) + [names.index(p) for p in prompts])))
    want = _reference_tracker(batches, 16, 16)
    tracker = PromptStatTracker(16, 16)
    for k, (prompts, rewards) in enumerate(batches):
        if k == 6:  # checkpoint and restore mid-way (JSON round trip)
            state = json.loads(json.dumps(tracker.get_state()))
            tracker = PromptStatTracker(16, 16)
            tracker.set_state(state)
        np.testing.assert_allclose(tracker.update(prompts, rewards), want[k], rtol=1e-12, atol=1e-12)
    assert all(len(b) == 16 for b in tracker.buffers.values())
    with pytest.raises(ValueError, match="buffer_size/min_count"):
        PromptStatTracker(8, 16).set_state(tracker.get_state())
    with pytest.raises(ValueError, match="one per prompt"):
        tracker.update(["a", "b"], [1.0])
