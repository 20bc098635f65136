"""jaxedit.diffusion guidance (2-/3-way CFG) and the lax.scan sampler (vs diffusers loops, compiles)."""
import dataclasses

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from jaxedit.diffusion import (IP2PCond, Schedule, SpecialistCond, ddim_step_with_logprob, ip2p_combine,
                               ip2p_denoiser, ip2p_rows, make_plan, sample, sample_scan,
                               specialist_combine, specialist_denoiser, specialist_rows)
from tests.test_diffusion import SD1, SHAPE, _euler_karras_reference

B, H, W, C, L, D = 2, 8, 8, 4, 5, 6


def _normal(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)


# ------------------------------------------------------------------------------------- guidance
def _toy_weights(seed=0):
    r = np.random.default_rng(seed)
    return {k: jnp.asarray(_normal(r, (C,))) for k in ("w1", "w2", "w3", "w4", "w5")}


def _toy_core(p, z, image, adapter, t, context):
    """Per-row toy ε-model: elementwise in (z, image, adapter) plus a per-row text summary."""
    ctx = context.mean(axis=(1, 2))[:, None, None, None]
    return jnp.tanh(z * p["w1"] + image * p["w2"] + adapter * p["w3"] + ctx * p["w4"]
                    + jnp.asarray(t, jnp.float32)[:, None, None, None] * 1e-3)


def toy_specialist(p, z, image, style, t, context, style_keep):
    """12-channel toy: its 'adapter' is keep·tanh(style·w5), zero for zero style or keep = 0."""
    adapter = style_keep[:, None, None, None] * jnp.tanh(style * p["w5"])
    return _toy_core(p, z, image, adapter, t, context)


def toy_ip2p(p, sample8, t, context):
    """The same toy seen as an 8-channel InstructPix2Pix model (adapter channels zero)."""
    z, image = sample8[..., :C], sample8[..., C:]
    return _toy_core(p, z, image, jnp.zeros_like(z), t, context)


IP2P_DENOISE = ip2p_denoiser(toy_ip2p)
SPEC_DENOISE = specialist_denoiser(toy_specialist)


def _conds(seed=0):
    r = np.random.default_rng(seed)
    return dict(x=_normal(r, SHAPE), image=_normal(r, SHAPE), style=_normal(r, SHAPE),
                text=_normal(r, (B, L, D)), uncond=_normal(r, (L, D)))


def test_ip2p_rows_order_and_combine_matches_diffusers_formula():
    c = _conds()
    model_in, ctx = ip2p_rows(c["x"], c["image"], c["text"], c["uncond"])
    assert model_in.shape == (3 * B, H, W, 2 * C) and ctx.shape == (3 * B, L, D)
    for k in range(3):
        np.testing.assert_array_equal(model_in[k * B:(k + 1) * B, ..., :C], c["x"])
    np.testing.assert_array_equal(model_in[:B, ..., C:], 0)
    np.testing.assert_array_equal(model_in[B:2 * B, ..., C:], c["image"])
    np.testing.assert_array_equal(model_in[2 * B:, ..., C:], c["image"])
    np.testing.assert_array_equal(ctx[:2 * B], np.broadcast_to(c["uncond"], (2 * B, L, D)))
    np.testing.assert_array_equal(ctx[2 * B:], c["text"])
    # diffusers' pipeline: rows [text+image, image, none], e_u + s_T(e_t − e_i) + s_I(e_i − e_u)
    rows = _normal(np.random.default_rng(1), (3 * B, H, W, C))
    e_u, e_i, e_t = rows[:B], rows[B:2 * B], rows[2 * B:]
    want = e_u + 7.5 * (e_t - e_i) + 1.5 * (e_i - e_u)
    np.testing.assert_allclose(np.asarray(ip2p_combine(rows, 7.5, 1.5)), want, rtol=1e-6, atol=1e-6)
    # per-sample scales (B,)
    per = ip2p_combine(rows, jnp.array([7.5, 2.0]), jnp.array([1.5, 1.0]))
    np.testing.assert_allclose(np.asarray(per[1]), np.asarray(ip2p_combine(rows, 2.0, 1.0)[1]), atol=1e-6)


def test_specialist_rows_layout():
    c = _conds()
    r = specialist_rows(c["x"], c["image"], c["style"], c["text"], c["uncond"])
    assert r.z.shape == r.image.shape == r.style.shape == (4 * B, H, W, C)
    assert r.style_keep.shape == (4 * B,) and r.context.shape == (4 * B, L, D)
    np.testing.assert_array_equal(r.style_keep, np.repeat([0.0, 0.0, 1.0, 1.0], B))
    np.testing.assert_array_equal(r.image[:B], 0)
    np.testing.assert_array_equal(r.style[:2 * B], 0)
    np.testing.assert_array_equal(r.style[2 * B:3 * B], c["style"])
    np.testing.assert_array_equal(r.context[3 * B:], c["text"])
    np.testing.assert_array_equal(r.context[:3 * B], np.broadcast_to(c["uncond"], (3 * B, L, D)))
    dropped = specialist_rows(c["x"], c["image"], None, c["text"], c["uncond"])
    np.testing.assert_array_equal(dropped.style, 0)
    np.testing.assert_array_equal(dropped.style_keep, 0)
    rows = _normal(np.random.default_rng(2), (4 * B, H, W, C))
    e0, e1, e2, e3 = np.split(rows, 4)
    want = e0 + 1.5 * (e1 - e0) + 3.0 * (e2 - e1) + 7.5 * (e3 - e2)
    np.testing.assert_allclose(np.asarray(specialist_combine(rows, 7.5, 1.5, 3.0)), want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_three_way_with_dropped_style_equals_two_way_exactly(mode):
    """Style dropped (None, zero latent, or style_keep 0): 3-way == 2-way for any scales.

    Bit for bit op by op (eager). Jitted, the two are different XLA programs whose fused toy
    model may round a row differently by 1 ulp, so there it is checked to 1e-6 (the combine itself
    is exact under jit too: ``test_combines_reduce_exactly_under_jit``).
    """
    c, p = _conds(3), _toy_weights(3)
    t = jnp.int32(501)
    two = IP2P_DENOISE if mode == "eager" else jax.jit(IP2P_DENOISE)
    three = SPEC_DENOISE if mode == "eager" else jax.jit(SPEC_DENOISE)
    rng = np.random.default_rng(4)
    for s_t, s_i, s_s in [(7.5, 1.5, 3.0), (1.0, 1.0, 1.0), (0.0, 0.0, 5.0)] + \
            [tuple(rng.uniform(-2, 12, 3)) for _ in range(5)]:
        s_t, s_i, s_s = np.float32(s_t), np.float32(s_i), np.float32(s_s)
        want = two(p, IP2PCond(c["image"], c["text"], c["uncond"], s_t, s_i), c["x"], t)
        for style, keep in [(None, 1.0), (np.zeros(SHAPE, np.float32), 1.0), (c["style"], 0.0)]:
            got = three(p, SpecialistCond(c["image"], style, c["text"], c["uncond"], keep, s_t, s_i, s_s),
                        c["x"], t)
            if mode == "eager":
                np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
            else:
                np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
        # and with the style present it differs (the test is not vacuous)
        kept = three(p, SpecialistCond(c["image"], c["style"], c["text"], c["uncond"], 1.0, s_t, s_i, s_s),
                     c["x"], t)
        assert s_s == 0 or float(jnp.abs(kept - want).max()) > 1e-4


def test_combines_reduce_exactly_under_jit():
    """Given identical style rows (e2 == e1), the jitted 3-way combine is the 2-way one bit for bit."""
    rng = np.random.default_rng(6)
    e0, e1, e3 = (_normal(rng, SHAPE) for _ in range(3))
    two, three = jax.jit(ip2p_combine), jax.jit(specialist_combine)
    for s_t, s_i, s_s in rng.uniform(-2, 12, (6, 3)).astype(np.float32):
        np.testing.assert_array_equal(np.asarray(three(np.concatenate([e0, e1, e1, e3]), s_t, s_i, s_s)),
                                      np.asarray(two(np.concatenate([e0, e1, e3]), s_t, s_i)))


# -------------------------------------------------------------------------------------- sampler
def linear_denoise(params, cond, x, t):
    """ε = a·x + b·t + cond (reproducible in torch)."""
    return params["a"] * x + params["b"] * jnp.asarray(t, jnp.float32) + cond


def _torch_eps(x, t, a=0.1, b=1e-4, c=0.0):
    return a * x + b * t + c


PARAMS = {"a": jnp.float32(0.1), "b": jnp.float32(1e-4)}


def _diffusers_schedule():
    """SD-1 schedule holding diffusers' own float32 ᾱ (torch linspace/cumprod rounding).

    ``Schedule.from_config`` rounds a float64 ᾱ once (as CompVis' training code); the two differ
    by <1e-6 relative. Multi-step comparisons use diffusers' ᾱ so that they test the sampler."""
    ref = DDIMScheduler.from_config(SD1)
    return dataclasses.replace(Schedule.from_config(SD1), alphas_cumprod=jnp.asarray(ref.alphas_cumprod.numpy()),
                               final_alpha_cumprod=jnp.asarray(ref.final_alpha_cumprod.numpy()))


def test_ddim_sampler_matches_diffusers_loop_and_logprobs_reevaluate():
    steps, rng = 20, np.random.default_rng(10)
    sched = _diffusers_schedule()
    x_T, noises = _normal(rng, SHAPE), _normal(rng, (steps, *SHAPE))
    x0, traj = sample(linear_denoise, PARAMS, jnp.float32(0.0), sched, x_T, jax.random.key(0),
                      steps=steps, eta=1.0, return_trajectory=True, noises=noises)
    ref = DDIMScheduler.from_config(SD1)
    ref.set_timesteps(steps)
    x = torch.from_numpy(x_T)
    worst = big = 0.0
    for i, t in enumerate(ref.timesteps):
        worst = max(worst, float(np.abs(np.asarray(traj.x_t[i]) - x.numpy()).max()))
        big = max(big, float(x.abs().max()))
        z = torch.from_numpy(noises[i])
        x = ref.step(_torch_eps(x, float(t)), int(t), x, eta=1.0, variance_noise=z).prev_sample
    worst = max(worst, float(np.abs(np.asarray(x0) - x.numpy()).max()))
    print(f"DDIM sampler (20 steps) vs diffusers loop: max|dx| = {worst:.2e} (max|x| = {big:.1f})")
    assert worst <= 1e-6 * max(1.0, big)  # a few float32 ulps of the largest value, chained
    assert traj.x_t.shape == (steps, *SHAPE) and traj.log_prob.shape == (steps, B)
    np.testing.assert_array_equal(traj.t, ref.timesteps.numpy())
    np.testing.assert_array_equal(traj.x_prev[:-1], traj.x_t[1:])
    np.testing.assert_array_equal(traj.x_prev[-1], x0)

    def reeval(x_t, t, x_prev):
        eps = linear_denoise(PARAMS, 0.0, x_t, t)
        return ddim_step_with_logprob(sched, eps, t, x_t, eta=1.0, steps=steps, prev_sample=x_prev)[1]

    lp = jax.jit(jax.vmap(reeval))(traj.x_t, traj.t, traj.x_prev)
    np.testing.assert_allclose(np.asarray(lp), np.asarray(traj.log_prob), rtol=0, atol=2e-6)
    # log p of the actual draws is log N(z) averaged: −z²/2 − log σ − ½ log 2π
    assert np.all(np.isfinite(np.asarray(traj.log_prob)))


def test_euler_sampler_matches_diffusers_loop(monkeypatch):
    steps, rng = 100, np.random.default_rng(11)
    sched = _diffusers_schedule()
    x_T, noises = _normal(rng, SHAPE), _normal(rng, (steps, *SHAPE))
    x0, traj = sample(linear_denoise, PARAMS, jnp.float32(0.0), sched, x_T, jax.random.key(0),
                      steps=steps, sampler="euler_ancestral", return_trajectory=True, noises=noises)
    anc, _ = _euler_karras_reference(steps)
    plan = make_plan(sched, steps, "euler_ancestral")
    np.testing.assert_array_equal(np.asarray(plan.sigmas), anc.sigmas.numpy())  # same ᾱ: same σ bits
    assert float(plan.init_noise_sigma) == float(anc.init_noise_sigma)
    module = diffusers.schedulers.scheduling_euler_ancestral_discrete
    x = torch.from_numpy(x_T) * anc.init_noise_sigma
    worst = big = 0.0
    for i, t in enumerate(anc.timesteps):
        worst = max(worst, float(np.abs(np.asarray(traj.x_t[i]) - x.numpy()).max()))
        big = max(big, float(x.abs().max()))
        monkeypatch.setattr(module, "randn_tensor", lambda *a, _n=noises[i], **k: torch.from_numpy(_n))
        eps = _torch_eps(anc.scale_model_input(x, t), float(t))
        x = anc.step(eps, t, x).prev_sample
    final = float(np.abs(np.asarray(x0) - x.numpy()).max())
    print(f"Euler ancestral sampler (100 Karras steps) vs diffusers loop: max|dx| over trajectory "
          f"{worst:.2e} (max|x| = {big:.1f}), final {final:.2e}")
    assert max(worst, final) <= 1e-6 * big  # a few float32 ulps of the largest value, chained
    # σ equal bit for bit; fractional t within 1e-4 (torch and NumPy round √ differently in 1 ulp)
    np.testing.assert_allclose(np.asarray(traj.t), anc.timesteps.numpy(), rtol=0, atol=1e-4)
    assert np.all(np.asarray(traj.log_prob)[-1] == 0)


def test_sampler_compiles_once_per_shape_and_steps():
    traces = []

    def denoise(params, cond, x, t):
        traces.append(1)  # runs only while tracing
        return params["a"] * x + cond

    sched, rng = Schedule.from_config(SD1), np.random.default_rng(12)
    before = sample_scan._cache_size()
    for i in range(3):  # new params, cond, x_T and key each call
        params = {"a": jnp.float32(0.1 * (i + 1)), "b": jnp.float32(0.0)}
        out, traj = sample(denoise, params, jnp.float32(i), sched, _normal(rng, SHAPE), jax.random.key(i),
                           steps=4, return_trajectory=True)
        jax.block_until_ready(out)
    assert len(traces) == 1, len(traces)
    assert sample_scan._cache_size() - before == 1
    sample(denoise, params, jnp.float32(0.0), sched, _normal(rng, SHAPE), jax.random.key(0), steps=5,
           return_trajectory=True)
    assert len(traces) == 2 and sample_scan._cache_size() - before == 2  # new steps: one more compile


def test_guided_sampler_compiles_once_across_scales_and_params():
    """Guidance scales and weights are traced: changing them (RL updates) does not recompile."""
    c, sched = _conds(5), Schedule.from_config(SD1)
    before = sample_scan._cache_size()
    outs = []
    for i, (s_t, s_i, s_s) in enumerate([(7.5, 1.5, 3.0), (5.0, 1.2, 2.0), (7.5, 1.5, 3.0)]):
        p = _toy_weights(0 if i != 1 else 1)
        cond = SpecialistCond(c["image"], c["style"], c["text"], c["uncond"], 1.0,
                              jnp.float32(s_t), jnp.float32(s_i), jnp.float32(s_s))
        outs.append(sample(SPEC_DENOISE, p, cond, sched, c["x"], jax.random.key(7), steps=3))
    assert sample_scan._cache_size() - before == 1
    np.testing.assert_array_equal(outs[0], outs[2])  # same seed + inputs: bit-identical
    assert float(jnp.abs(outs[0] - outs[1]).max()) > 0


def test_sampler_keys_and_eta0():
    sched, rng = Schedule.from_config(SD1), np.random.default_rng(13)
    x_T = _normal(rng, SHAPE)
    run = lambda key, eta=1.0: sample(linear_denoise, PARAMS, jnp.float32(0.0), sched, x_T, key, steps=4, eta=eta)
    np.testing.assert_array_equal(run(jax.random.key(1)), run(jax.random.key(1)))
    assert float(jnp.abs(run(jax.random.key(1)) - run(jax.random.key(2))).max()) > 0
    np.testing.assert_array_equal(run(jax.random.key(1), 0.0), run(jax.random.key(2), 0.0))
    with pytest.raises(ValueError, match="sampler"):
        sample(linear_denoise, PARAMS, 0.0, sched, x_T, jax.random.key(0), steps=4, sampler="pndm")
    assert make_plan(sched, 4).timesteps.dtype == jnp.int32
