"""D3PO loss (vs float64 NumPy) and the jitted scan update (vs an unrolled reference) on a tiny U-Net."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from jaxedit.diffusion import IP2PCond, Schedule, ddim_step_with_logprob, ip2p_denoiser, sample
from jaxedit.models import load, lora, unet
from jaxedit.models.tiny import SCHEDULER_CONFIG
from jaxedit.rl import d3po

BETA, EPS = 0.1, 0.1
P, S, K, HW, L, D = 2, 3, 2, 8, 5, 8  # pairs, DDIM steps, trained steps, latent size, tokens, text dim
LR = 0.05
# The smallest U-Net with cross-attention (compile time dominates these tests).
CFG = unet.Config(in_channels=8, block_out_channels=(16,), layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D",), up_block_types=("UpBlock2D",),
                  mid_block_type=None, num_attention_heads=2, cross_attention_dim=D, norm_num_groups=4)
COND_AXES = IP2PCond(0, 0, None, None, None)


# ------------------------------------------------------------------------------ the pure loss
def _np_loss(lw, ll, rw, rl, valid, beta=BETA, eps=EPS):
    lw, ll, rw, rl = (np.asarray(a, np.float64) for a in (lw, ll, rw, rl))
    r_w = np.clip(np.exp(lw - rw), 1 - eps, 1 + eps)
    r_l = np.clip(np.exp(ll - rl), 1 - eps, 1 + eps)
    logits = beta * np.log(r_w) - beta * np.log(r_l)
    logits = np.where(np.asarray(valid) > 0, logits, 0.0)
    return np.mean(np.log1p(np.exp(-logits)))


def test_d3po_loss_matches_numpy_with_clipping_and_ties():
    rng = np.random.default_rng(0)
    n = 64
    ref_w, ref_l = rng.normal(-1, 0.5, (2, n))
    # Δ spread over [-0.4, 0.4]: many ratios clipped on both sides (ln 0.9 = -0.105, ln 1.1 = 0.095)
    lw, ll = ref_w + rng.uniform(-0.4, 0.4, n), ref_l + rng.uniform(-0.4, 0.4, n)
    valid = (rng.uniform(size=n) > 0.25).astype(np.float32)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    loss, m = jax.jit(lambda *a: d3po.d3po_loss(*a, beta=BETA, clip_eps=EPS))(
        f32(lw), f32(ll), f32(ref_w), f32(ref_l), f32(valid))
    want = _np_loss(f32(lw), f32(ll), f32(ref_w), f32(ref_l), valid)
    assert abs(float(loss) - want) < 1e-6, (float(loss), want)
    d = np.concatenate([np.float32(lw) - np.float32(ref_w), np.float32(ll) - np.float32(ref_l)]).astype(np.float64)
    clipped = (np.exp(d) < 1 - EPS) | (np.exp(d) > 1 + EPS)
    assert 0.3 < clipped.mean() < 0.9 and (d < math.log(0.9)).any() and (d > math.log(1.1)).any()
    assert abs(float(m["clip_frac"]) - clipped.mean()) < 1e-6
    assert abs(float(m["approx_kl"]) - 0.5 * np.mean(d ** 2)) < 1e-6
    assert abs(float(m["log_ratio"]) - d.mean()) < 1e-6
    assert abs(float(m["frac_valid"]) - valid.mean()) < 1e-6
    dw, dl = d[:n], d[n:]
    assert abs(float(m["win_rate"]) - ((dw > dl) & (valid > 0)).sum() / (valid > 0).sum()) < 1e-6
    # gradients: zero for ties, for clipped ratios and for the reference log-probs
    g = jax.grad(lambda *a: d3po.d3po_loss(*a, beta=BETA, clip_eps=EPS)[0], argnums=(0, 1, 2, 3))(
        f32(lw), f32(ll), f32(ref_w), f32(ref_l), f32(valid))
    g_w, g_l = np.asarray(g[0]), np.asarray(g[1])
    np.testing.assert_array_equal(np.asarray(g[2]), 0)
    np.testing.assert_array_equal(np.asarray(g[3]), 0)
    np.testing.assert_array_equal(g_w[valid == 0], 0)
    np.testing.assert_array_equal(g_w[clipped[:n]], 0)
    np.testing.assert_array_equal(g_l[clipped[n:]], 0)
    # float64 derivative where not clipped: dL/dlogp_w = -β σ(-z)/n, dL/dlogp_l = +β σ(-z)/n
    z = np.where(valid > 0, BETA * (np.clip(d[:n], math.log(0.9), math.log(1.1))
                                    - np.clip(d[n:], math.log(0.9), math.log(1.1))), 0)
    live = (valid > 0) & ~clipped[:n]
    np.testing.assert_allclose(g_w[live], (-BETA / (1 + np.exp(z)) / n)[live], rtol=1e-5)


def test_d3po_loss_at_reference_is_log2():
    lp = jnp.array([-1.3, 0.2, 4.0])
    loss, m = d3po.d3po_loss(lp, lp + 1, lp, lp + 1, jnp.array([1.0, 0.0, 1.0]))
    assert abs(float(loss) - math.log(2)) < 1e-7 and float(m["clip_frac"]) == 0 and float(m["approx_kl"]) == 0


# --------------------------------------------------------------------------------- the update
def _recording_sgd(lr):
    """SGD whose state is the last gradient (so tests can read the accumulated gradient)."""
    def init(params):
        return jax.tree_util.tree_map(jnp.zeros_like, params)

    def update(grads, state, params=None):
        return jax.tree_util.tree_map(lambda g: -lr * g, grads), grads
    return optax.GradientTransformation(init, update)


@pytest.fixture(scope="module")
def setup():
    module = unet.build(CFG)
    params = load.random_params(module, seed=1)
    denoise = ip2p_denoiser(lambda p, x, t, ctx: module.apply({"params": p}, x, t, ctx))
    schedule = Schedule.from_config(SCHEDULER_CONFIG)
    k = jax.random.split(jax.random.key(0), 5)
    image = jax.random.normal(k[0], (P, HW, HW, 4))
    text = jax.random.normal(k[1], (P, L, D))
    uncond = jax.random.normal(k[2], (L, D))
    z = jax.random.normal(k[3], (P, HW, HW, 4))
    tile = lambda a: jnp.concatenate([a, a])
    cond2 = IP2PCond(tile(image), tile(text), uncond, 7.5, 1.5)  # sampling: 2P rows, same x_T per pair
    _, traj = sample(denoise, params, cond2, schedule, tile(z), k[4], steps=S, eta=1.0, return_trajectory=True)
    cond = IP2PCond(image, text, uncond, 7.5, 1.5)                # update: per pair, shared "" and scales
    return dict(params=params, denoise=denoise, schedule=schedule, traj=traj, cond=cond,
                pair_loss=_make_pair_loss(denoise, schedule, uncond))


def _batch(s, winner, valid, x_prev=None):
    t = s["traj"]
    return d3po.D3POBatch(t.x_t, t.x_prev if x_prev is None else x_prev, t.t, s["cond"],
                          jnp.asarray(winner, jnp.float32), jnp.asarray(valid, jnp.float32))


def _make_pair_loss(denoise, schedule, uncond):
    """Loss of ONE pair at ONE step: one denoise call on its two members (jitted once)."""
    clip = lambda d: jnp.clip(d, math.log(1 - EPS), math.log(1 + EPS))

    @jax.jit
    def pair_loss(trainable, ref_params, x, xp, t, image, text, first, valid):
        cond = IP2PCond(jnp.stack([image] * 2), jnp.stack([text] * 2), uncond, 7.5, 1.5)

        def logp(p):
            eps = denoise(p, cond, x, t)
            return ddim_step_with_logprob(schedule, eps, t, x, eta=1.0, steps=S, prev_sample=xp)[1]
        da, db = logp(trainable) - jax.lax.stop_gradient(logp(ref_params))
        dw, dl = jnp.where(first > 0.5, da, db), jnp.where(first > 0.5, db, da)
        return -jax.nn.log_sigmoid(jnp.where(valid > 0, BETA * (clip(dw) - clip(dl)), 0.0))
    return jax.jit(jax.value_and_grad(pair_loss))


def _reference(s, params, ref_params, batch, key, trained=K):
    """Straightforward implementation: a Python loop over trained steps and pairs, each pair's two
    members evaluated at the pair's step, gradients summed on the host in float64."""
    order = np.asarray(d3po.timestep_order(key, S, P, trained))
    total, grads = 0.0, jax.tree_util.tree_map(np.zeros_like, _np(params))
    for j in range(trained):
        for p in range(P):
            st, rows = int(order[p, j]), np.array([p, P + p])
            loss, g = s["pair_loss"](
                params, ref_params, batch.x_t[st, rows], batch.x_prev[st, rows], batch.t[st],
                batch.cond.image_latents[p], batch.cond.text_emb[p], batch.winner_is_first[p], batch.valid[p])
            total += float(loss) / (trained * P)
            grads = jax.tree_util.tree_map(lambda a, b: a + np.asarray(b, np.float64) / (trained * P), grads, g)
    return total, grads


def _np(tree):
    return jax.tree_util.tree_map(lambda a: np.array(a, np.float64), tree)


def _max_rel(a, b):
    """max |a − b| / max |b| over all leaves."""
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    scale = max(float(np.abs(y).max()) for y in lb)
    return max(float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max())
               for x, y in zip(la, lb)) / scale


def test_update_matches_unrolled_reference_and_only_policy_moves(setup):
    """Full fine-tuning, K = 2 of S = 3 steps, 2 micro-batches of 1 pair (the default of one
    micro-batch runs in the LoRA test)."""
    s = setup
    ref_params = s["params"]
    ref_copy = _np(ref_params)
    opt = _recording_sgd(LR)
    update = d3po.make_update(s["denoise"], opt, s["schedule"], beta=BETA, clip_eps=EPS,
                              steps_per_update=K, cond_axes=COND_AXES, micro_batches=2)
    state = d3po.init_train_state(ref_params, opt)
    keys = jax.random.split(jax.random.key(7), 3)

    # update 0: policy == reference -> all ratios 1, loss log 2
    batch = _batch(s, [1.0, 0.0], [1.0, 1.0])
    p0 = _np(state.params)
    state, m = update(state, ref_params, batch, keys[0])
    assert abs(float(m["loss"]) - math.log(2)) < 1e-6
    assert abs(float(m["log_ratio"])) < 1e-6 and float(m["clip_frac"]) == 0 and float(m["skipped"]) == 0
    want_loss, want_g = _reference(s, p0, ref_params, batch, keys[0])
    rel0 = _max_rel(state.opt_state, want_g)
    assert rel0 < 2e-4, rel0  # fp32: the last step (σ ≈ 0.02) amplifies rounding of μ
    assert float(m["grad_norm"]) > 0 and int(state.step) == 1

    # update 1: policy != reference now (some ratios clipped), winner second, one tie
    batch = _batch(s, [0.0, 1.0], [1.0, 0.0])
    p1 = _np(state.params)
    state, m = update(state, ref_params, batch, keys[1])
    want_loss, want_g = _reference(s, p1, ref_params, batch, keys[1])
    loss_diff = abs(float(m["loss"]) - want_loss)
    assert loss_diff < 1e-6 and abs(float(m["log_ratio"])) > 1e-3 and 0 < float(m["clip_frac"]) < 1, m
    rel1 = _max_rel(state.opt_state, want_g)
    assert rel1 < 2e-4, rel1
    print(f"\nscan vs unrolled: max rel grad diff {rel0:.1e} (policy == ref), {rel1:.1e} "
          f"(after one step, clip_frac {float(m['clip_frac']):.2f}); loss diff {loss_diff:.1e}")

    # the reference params never change (not donated, not trained); the policy did
    for a, b in zip(jax.tree_util.tree_leaves(ref_params), jax.tree_util.tree_leaves(ref_copy)):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert _max_rel(state.params, ref_copy) > 0

    # a non-finite log-prob skips the update: params, optimizer state and step unchanged
    bad = s["traj"].x_prev.at[:, 0, 0, 0, 0].set(jnp.nan)
    before = _np((state.params, state.opt_state, state.step))
    state, m = update(state, ref_params, _batch(s, [1.0, 1.0], [1.0, 1.0], x_prev=bad), keys[2])
    assert float(m["skipped"]) == 1 and not np.isfinite(float(m["loss"]))
    for a, b in zip(jax.tree_util.tree_leaves((state.params, state.opt_state, state.step)),
                    jax.tree_util.tree_leaves(before)):
        np.testing.assert_array_equal(np.asarray(a), b)

    assert update._cache_size() == 1  # three calls, one compile


def test_lora_mode_trains_only_lora(setup):
    """LoRA: trainable = LoRA params, merge(trainable, base), reference = base (LoRA off); default
    options (all S steps, one micro-batch). At step 0 (B = 0) the LoRA gradient is the chain rule
    of the full gradient: dL/dB = scale·Aᵀ·dL/dW, dL/dA = 0."""
    s = setup
    base = s["params"]
    lo = lora.init_lora(base, rank=2, key=jax.random.key(1))
    scale = lora.lora_scale(2, 4.0)
    opt = _recording_sgd(LR)
    update = d3po.make_update(s["denoise"], opt, s["schedule"], cond_axes=COND_AXES,
                              merge=lambda tr, ref: lora.merge(ref, tr, scale))
    state = d3po.init_train_state(lo, opt)
    base_copy, lora0 = _np(base), traverse_util.flatten_dict(_np(lo))
    batch = _batch(s, [1.0, 0.0], [1.0, 1.0])
    key = jax.random.key(11)
    state, m = update(state, base, batch, key)
    assert abs(float(m["loss"]) - math.log(2)) < 1e-6 and abs(float(m["log_ratio"])) < 1e-6
    _, g_full = _reference(s, base, base, batch, key, trained=S)
    g_full, g_lora = traverse_util.flatten_dict(g_full), traverse_util.flatten_dict(_np(state.opt_state))
    want = {k: scale * lora0[k[:-1] + ("lora_A",)].T @ g_full[k[:-1] + ("kernel",)]
            for k in g_lora if k[-1] == "lora_B"}
    for k, g in g_lora.items():
        if k[-1] == "lora_A":
            np.testing.assert_array_equal(g, 0)
    rel = _max_rel({k: g_lora[k] for k in want}, want)
    assert rel < 2e-4, rel
    print(f"\nLoRA grads vs chain rule of the unrolled full gradient: max rel diff {rel:.1e}")

    state, m = update(state, base, batch, jax.random.key(12))
    assert float(m["skipped"]) == 0 and abs(float(m["log_ratio"])) > 0 and int(state.step) == 2
    lora1 = traverse_util.flatten_dict(_np(state.params))
    assert all(np.abs(lora1[k] - lora0[k]).max() > 0 for k in lora0 if k[-1] == "lora_B")
    for a, b in zip(jax.tree_util.tree_leaves(base), jax.tree_util.tree_leaves(base_copy)):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert update._cache_size() == 1


def test_timestep_order_is_per_pair_permutation():
    order = np.asarray(d3po.timestep_order(jax.random.key(3), 20, 8, 20))
    assert all(sorted(row) == list(range(20)) for row in order)
    assert len({tuple(r) for r in order}) > 1
    np.testing.assert_array_equal(np.asarray(d3po.timestep_order(jax.random.key(3), 20, 8, 5)), order[:, :5])


def test_rejects_deterministic_sampler(setup):
    with pytest.raises(ValueError, match="eta"):
        d3po.make_update(setup["denoise"], optax.sgd(1.0), setup["schedule"], eta=0.0)
