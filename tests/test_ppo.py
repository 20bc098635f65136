"""PPO loss vs a float64 NumPy transcription; the per-prompt stat tracker vs plain Python; the
jitted PPO update vs an unrolled per-sample, per-step reference on a tiny U-Net."""
import collections
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxedit.diffusion import IP2PCond, Schedule, ddim_step_with_logprob, ip2p_denoiser, sample
from jaxedit.models import load, unet
from jaxedit.models.tiny import SCHEDULER_CONFIG
from jaxedit.rl import ppo
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


# ------------------------------------------------------------------------- the jitted update
N, S, K, HW, L, D = 4, 3, 2, 8, 5, 8  # samples, DDIM steps, trained steps, latent size, tokens, text dim
CFG = unet.Config(in_channels=8, block_out_channels=(16,), layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D",), up_block_types=("UpBlock2D",),
                  mid_block_type=None, num_attention_heads=2, cross_attention_dim=D, norm_num_groups=4)
COND_AXES = IP2PCond(0, 0, None, None, None)
RANGE = 0.02  # a wide clip range, so that the second update has ratios inside and outside it


def _recording_sgd(lr):
    """SGD whose state is the last gradient (so the test reads the accumulated gradient)."""
    return optax.GradientTransformation(lambda p: jax.tree_util.tree_map(jnp.zeros_like, p),
                                        lambda g, s, p=None: (jax.tree_util.tree_map(lambda x: -lr * x, g), g))


@pytest.fixture(scope="module")
def setup():
    module = unet.build(CFG)
    params = load.random_params(module, seed=1)
    denoise = ip2p_denoiser(lambda p, x, t, ctx: module.apply({"params": p}, x, t, ctx))
    schedule = Schedule.from_config(SCHEDULER_CONFIG)
    k = jax.random.split(jax.random.key(0), 4)
    cond = IP2PCond(jax.random.normal(k[0], (N, HW, HW, 4)), jax.random.normal(k[1], (N, L, D)),
                    jax.random.normal(k[2], (L, D)), 7.5, 1.5)
    _, traj = sample(denoise, params, cond, schedule, jax.random.normal(k[3], (N, HW, HW, 4)), k[3], steps=S,
                     eta=1.0, return_trajectory=True)

    @jax.jit
    @jax.value_and_grad
    def one(p, x, xp, t, old, adv, image, text):
        """PPO loss of ONE sample at ONE step, float32 (the reference sums these in float64)."""
        c = IP2PCond(image[None], text[None], cond.uncond_emb, 7.5, 1.5)
        lp = ddim_step_with_logprob(schedule, denoise(p, c, x[None], t), t, x[None], eta=1.0, steps=S,
                                    prev_sample=xp[None])[1][0]
        a = jnp.clip(adv, -5.0, 5.0)
        r = jnp.exp(lp - old)
        return jnp.maximum(-a * r, -a * jnp.clip(r, 1 - RANGE, 1 + RANGE))
    return dict(params=params, denoise=denoise, schedule=schedule, traj=traj, cond=cond, one=one)


def _reference(s, params, batch, key, trained):
    """A Python loop over samples and their trained steps (DDPO's per-sample step order)."""
    order = np.asarray(jax.vmap(lambda k: jax.random.permutation(k, S)[:trained])(jax.random.split(key, N)))
    grads = jax.tree_util.tree_map(lambda a: np.zeros(a.shape), params)
    total = 0.0
    for n in range(N):
        for j in range(trained):
            st = int(order[n, j])
            loss, g = s["one"](params, batch.x_t[st, n], batch.x_prev[st, n], batch.t[st], batch.log_prob[st, n],
                               batch.advantages[n], batch.cond.image_latents[n], batch.cond.text_emb[n])
            total += float(loss) / (N * trained)
            grads = jax.tree_util.tree_map(lambda a, b: a + np.asarray(b, np.float64) / (N * trained), grads, g)
    return total, grads


def _max_rel(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    scale = max(float(np.abs(y).max()) for y in lb)
    return max(float(np.abs(np.asarray(x, np.float64) - y).max()) for x, y in zip(la, lb)) / scale


def test_ppo_update_matches_unrolled_reference(setup):
    """K = 2 of S = 3 steps per sample, 2 micro-batches; first update at the sampling policy
    (ratios 1: the PPO gradient is −mean(A·∇logπ)), second after a step (some ratios clipped)."""
    s = setup
    t = s["traj"]
    adv = jnp.asarray([1.5, -0.7, 7.0, -2.0], jnp.float32)  # 7 is clipped to 5
    batch = ppo.PPOBatch(t.x_t, t.x_prev, t.t, t.log_prob, s["cond"], adv)
    opt = _recording_sgd(7e-5)
    update = ppo.make_update(s["denoise"], opt, s["schedule"], clip_range=RANGE, steps_per_update=K,
                             cond_axes=COND_AXES, micro_batches=2)
    state = ppo.init_train_state(s["params"], opt)
    for u, key in enumerate(jax.random.split(jax.random.key(5), 2)):
        before = jax.tree_util.tree_map(np.asarray, state.params)
        state, m = update(state, None, batch, key)
        want_loss, want_g = _reference(s, before, batch, key, K)
        rel = _max_rel(state.opt_state, want_g)
        # fp32 log-probs of a batched vs a single-sample call differ by ~1e-6, so the ratios by as much
        assert abs(float(m["loss"]) - want_loss) < 1e-5 and rel < 2e-4, (u, float(m["loss"]), want_loss, rel)
        if u == 0:  # at the sampling policy: ratio 1 up to the batched-vs-single rounding
            assert abs(float(m["ratio"]) - 1) < 1e-5 and float(m["clip_frac"]) == 0
        else:
            assert 0 < float(m["clip_frac"]) < 1, m
        print(f"\nPPO update {u}: loss {float(m['loss']):.6f} vs {want_loss:.6f}, max rel grad diff {rel:.1e}, "
              f"clip_frac {float(m['clip_frac']):.2f}")
    assert int(state.step) == 2 and update._cache_size() == 1
