"""jaxedit.diffusion schedules, DDIM (+log-prob) and Euler ancestral steps against diffusers PyTorch."""
import functools
import math
import subprocess
import sys

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

from jaxedit.diffusion import (Schedule, ddim_step_with_logprob, ddim_timesteps, euler_ancestral_step,
                               euler_plan, karras_sigmas, scale_model_input)

#: SD-1 / InstructPix2Pix ``scheduler_config.json`` (the real checkpoint's values).
SD1 = {
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.42.1",
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "steps_offset": 1,
    "timestep_spacing": "leading", "set_alpha_to_one": False, "clip_sample": False,
    "skip_prk_steps": True, "trained_betas": None,
}
SHAPE = (2, 8, 8, 4)
SPACINGS = ("leading", "trailing", "linspace")


def _ddim(**kw):
    return DDIMScheduler.from_config({**SD1, **kw})


def _euler_karras_reference(steps, **kw):
    """diffusers' Euler ancestral step on diffusers' Karras σ/timestep table.

    diffusers 0.42's ``EulerAncestralDiscreteScheduler`` has no ``use_karras_sigmas`` (its
    constructor rejects it, ``from_config`` drops it), so the Karras table comes from
    ``EulerDiscreteScheduler(use_karras_sigmas=True)``, the class that defines it.
    """
    karras = EulerDiscreteScheduler.from_config({**SD1, **kw, "use_karras_sigmas": True})
    karras.set_timesteps(steps)
    anc = EulerAncestralDiscreteScheduler.from_config({**SD1, **kw})
    anc.set_timesteps(steps)
    anc.sigmas, anc.timesteps = karras.sigmas.clone(), karras.timesteps.clone()
    return anc, karras


def _rng(seed=0):
    return np.random.default_rng(seed)


# ------------------------------------------------------------------------------------ schedules
def test_schedule_matches_diffusers_alphas():
    s = Schedule.from_config(SD1)
    ref = _ddim()
    np.testing.assert_allclose(np.asarray(s.alphas_cumprod), ref.alphas_cumprod.numpy(), rtol=2e-6, atol=0)
    assert float(s.final_alpha_cumprod) == pytest.approx(float(ref.final_alpha_cumprod), rel=1e-6)
    assert float(Schedule.from_config({**SD1, "set_alpha_to_one": True}).final_alpha_cumprod) == 1.0
    lin = Schedule.from_config({**SD1, "beta_schedule": "linear"})
    np.testing.assert_allclose(np.asarray(lin.alphas_cumprod),
                               _ddim(beta_schedule="linear").alphas_cumprod.numpy(), rtol=2e-6)
    assert (s.num_train_timesteps, s.steps_offset, s.timestep_spacing) == (1000, 1, "leading")


def test_schedule_config_errors():
    with pytest.raises(ValueError, match="squaredcos_cap_v2"):
        Schedule.from_config({**SD1, "beta_schedule": "squaredcos_cap_v2"})
    with pytest.raises(ValueError, match="v_prediction"):
        Schedule.from_config({**SD1, "prediction_type": "v_prediction"})
    with pytest.raises(ValueError, match="timestep_spacing"):
        Schedule.from_config({**SD1, "timestep_spacing": "karras"})
    with pytest.raises(ValueError, match="clip_sample"):
        Schedule.from_config({**SD1, "clip_sample": True})
    Schedule.from_config({**SD1, "_anything": object(), "_class_name": "EulerAncestralDiscreteScheduler"})


def test_schedule_is_a_pytree_with_static_settings():
    s = Schedule.from_config(SD1)
    leaves, tree = jax.tree_util.tree_flatten(s)
    assert len(leaves) == 2
    assert jax.tree_util.tree_unflatten(tree, leaves).timestep_spacing == "leading"


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [1, 7, 20, 30, 50, 100])
def test_ddim_timesteps_match_diffusers(spacing, steps):
    ref = _ddim(timestep_spacing=spacing)
    ref.set_timesteps(steps)
    got = ddim_timesteps(Schedule.from_config({**SD1, "timestep_spacing": spacing}), steps)
    np.testing.assert_array_equal(got, ref.timesteps.numpy())


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [5, 20, 100])
def test_karras_sigmas_match_diffusers(spacing, steps):
    anc, karras = _euler_karras_reference(steps, timestep_spacing=spacing)
    sched = Schedule.from_config({**SD1, "timestep_spacing": spacing})
    sigmas, timesteps = karras_sigmas(sched, steps)
    # the schedules' ᾱ differ by <1e-6 relative (float64 here vs torch float32 cumprod)
    np.testing.assert_allclose(sigmas, karras.sigmas.numpy(), rtol=1e-5, atol=0)
    np.testing.assert_allclose(timesteps, karras.timesteps.numpy(), rtol=0, atol=1e-3)  # of 0..999
    plan = euler_plan(sched, steps)
    assert float(plan.init_noise_sigma) == pytest.approx(float(anc.init_noise_sigma), rel=2e-6)
    assert float(plan.init_noise_sigma) == pytest.approx(float(karras.init_noise_sigma), rel=2e-6)


# ----------------------------------------------------------------------------------------- DDIM
@functools.partial(jax.jit, static_argnames=("eta", "steps"))
def _ddim_step(schedule, eps, t, x, noise, *, eta, steps):
    return ddim_step_with_logprob(schedule, eps, t, x, eta=eta, steps=steps, noise=noise)


@functools.partial(jax.jit, static_argnames=("eta", "steps"))
def _ddim_eval(schedule, eps, t, x, prev, *, eta, steps):
    return ddim_step_with_logprob(schedule, eps, t, x, eta=eta, steps=steps, prev_sample=prev)


def _ddim_logprob_f64(acp, final, eps, t, x, x_prev, eta, steps):
    """Float64 NumPy transcription of DESIGN.md's DDIM log-prob."""
    acp, eps, x, x_prev = (np.asarray(a, np.float64) for a in (acp, eps, x, x_prev))
    prev_t = t - len(acp) // steps
    a_t, a_prev = acp[t], (acp[prev_t] if prev_t >= 0 else float(final))
    x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    std = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    mu = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - std ** 2) * eps
    lp = -(x_prev - mu) ** 2 / (2 * std ** 2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.reshape(lp.shape[0], -1).mean(axis=1)


def test_ddim_step_matches_diffusers_every_step():
    steps, rng = 50, _rng(1)
    sched, ref = Schedule.from_config(SD1), _ddim()
    ref.set_timesteps(steps)
    worst_x = worst_lp = worst_ref_lp = 0.0
    for t in ref.timesteps.tolist():
        x, eps, z = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(3))
        want = ref.step(torch.from_numpy(eps), t, torch.from_numpy(x), eta=1.0,
                        variance_noise=torch.from_numpy(z)).prev_sample.numpy()
        got, lp = _ddim_step(sched, eps, jnp.int32(t), x, z, eta=1.0, steps=steps)
        worst_x = max(worst_x, float(np.abs(np.asarray(got) - want).max()))
        lp64 = _ddim_logprob_f64(sched.alphas_cumprod, sched.final_alpha_cumprod, eps, t, x, got, 1.0, steps)
        worst_lp = max(worst_lp, float(np.abs(np.asarray(lp) - lp64).max()))
        # same formula on diffusers' float32 schedule and diffusers' own sample
        lp_ref = _ddim_logprob_f64(ref.alphas_cumprod.numpy(), ref.final_alpha_cumprod, eps, t, x, want, 1.0, steps)
        worst_ref_lp = max(worst_ref_lp, float(np.abs(np.asarray(lp) - lp_ref).max()))
        # re-evaluating the recorded action gives the recorded log-prob (and the action itself)
        again, lp2 = _ddim_eval(sched, eps, jnp.int32(t), x, got, eta=1.0, steps=steps)
        np.testing.assert_array_equal(np.asarray(again), np.asarray(got))
        np.testing.assert_allclose(np.asarray(lp2), np.asarray(lp), rtol=0, atol=1e-6)
    print(f"DDIM vs diffusers max|dx|={worst_x:.2e}  log-prob vs f64 {worst_lp:.2e} "
          f"(vs f64 on diffusers' schedule/sample {worst_ref_lp:.2e})")
    assert worst_x <= 1e-5
    assert worst_lp <= 1e-4
    assert worst_ref_lp <= 1e-3


def test_ddim_per_sample_timesteps_equal_scalar():
    sched, rng = Schedule.from_config(SD1), _rng(2)
    x, eps, z = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(3))
    ts = np.array([981, 1], np.int32)
    both, lp = _ddim_step(sched, eps, ts, x, z, eta=1.0, steps=50)
    for i, t in enumerate(ts):
        one, lp1 = _ddim_step(sched, eps[i:i + 1], jnp.int32(t), x[i:i + 1], z[i:i + 1], eta=1.0, steps=50)
        np.testing.assert_allclose(np.asarray(both)[i:i + 1], np.asarray(one), rtol=0, atol=1e-6)
        np.testing.assert_allclose(np.asarray(lp)[i], np.asarray(lp1)[0], rtol=0, atol=1e-6)


def test_ddim_eta0_deterministic_and_errors():
    sched, ref, rng = Schedule.from_config(SD1), _ddim(), _rng(3)
    ref.set_timesteps(20)
    x, eps = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2))
    t = int(ref.timesteps[3])
    want = ref.step(torch.from_numpy(eps), t, torch.from_numpy(x), eta=0.0).prev_sample.numpy()
    got, lp = ddim_step_with_logprob(sched, eps, t, x, eta=0.0, steps=20)
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(lp), np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="key"):
        ddim_step_with_logprob(sched, eps, t, x, eta=1.0, steps=20)
    a, _ = ddim_step_with_logprob(sched, eps, t, x, eta=1.0, steps=20, key=jax.random.key(0))
    b, _ = ddim_step_with_logprob(sched, eps, t, x, eta=1.0, steps=20, key=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_ddim_logprob_gradients():
    """log-prob is differentiable in eps (the policy) and constant in the recorded action."""
    sched, rng = Schedule.from_config(SD1), _rng(4)
    x, eps, z = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(3))
    prev, _ = _ddim_step(sched, eps, jnp.int32(501), x, z, eta=1.0, steps=50)

    def f(eps, prev):
        x_prev, lp = ddim_step_with_logprob(sched, eps, 501, x, eta=1.0, steps=50, prev_sample=prev)
        return lp.sum() + x_prev.sum()

    g_eps, g_prev = jax.grad(f, argnums=(0, 1))(jnp.asarray(eps) * 1.1, prev)
    assert np.all(np.isfinite(np.asarray(g_eps))) and float(jnp.abs(g_eps).max()) > 0
    np.testing.assert_array_equal(np.asarray(g_prev), np.zeros(SHAPE, np.float32))


# ---------------------------------------------------------------------------------------- Euler
@jax.jit
def _euler_step(eps, x, sigma, sigma_next, noise):
    return euler_ancestral_step(eps, x, sigma, sigma_next, noise=noise)


def _run_reference_euler(anc, steps, x, eps_list, noise_list, monkeypatch):
    """One diffusers step per (x, eps, noise), each from the given x: returns (scaled x, x_prev) lists."""
    module = diffusers.schedulers.scheduling_euler_ancestral_discrete
    out = []
    for i, t in enumerate(anc.timesteps):
        monkeypatch.setattr(module, "randn_tensor", lambda *a, _n=noise_list[i], **k: torch.from_numpy(_n))
        anc._step_index = i
        scaled = anc.scale_model_input(torch.from_numpy(x[i]), t).numpy()
        prev = anc.step(torch.from_numpy(eps_list[i]), t, torch.from_numpy(x[i])).prev_sample.numpy()
        out.append((scaled, prev))
    return out


@pytest.mark.parametrize("karras", [True, False])
def test_euler_ancestral_matches_diffusers_every_step(karras, monkeypatch):
    steps, rng = 100, _rng(5)
    sched = Schedule.from_config(SD1)
    if karras:
        anc, _ = _euler_karras_reference(steps)
        plan = euler_plan(sched, steps)
        np.testing.assert_allclose(np.asarray(plan.sigmas), anc.sigmas.numpy(), rtol=1e-5)
        sigmas = anc.sigmas.numpy()  # identical inputs: compare the step itself
    else:  # the native (non-Karras) table: the step is table-agnostic
        anc = EulerAncestralDiscreteScheduler.from_config(SD1)
        anc.set_timesteps(steps)
        sigmas = anc.sigmas.numpy()
    scale = float(anc.init_noise_sigma)
    x = [rng.standard_normal(SHAPE).astype(np.float32) * np.float32(max(sigmas[i], 1.0) if i else scale)
         for i in range(steps)]
    eps = [rng.standard_normal(SHAPE).astype(np.float32) for _ in range(steps)]
    noise = [rng.standard_normal(SHAPE).astype(np.float32) for _ in range(steps)]
    ref = _run_reference_euler(anc, steps, x, eps, noise, monkeypatch)
    worst, worst_in = 0.0, 0.0
    for i in range(steps):
        s, s_next = jnp.float32(sigmas[i]), jnp.float32(sigmas[i + 1])
        got, lp = _euler_step(eps[i], x[i], s, s_next, noise[i])
        worst = max(worst, float(np.abs(np.asarray(got) - ref[i][1]).max()))
        worst_in = max(worst_in, float(np.abs(np.asarray(scale_model_input(x[i], s)) - ref[i][0]).max()))
        assert np.all(np.isfinite(np.asarray(lp)))
    print(f"Euler ancestral (karras={karras}) vs diffusers max|dx|={worst:.2e}, scale_model_input {worst_in:.2e}")
    assert worst <= 1e-5 and worst_in <= 1e-6


def test_euler_logprob_reevaluates_and_last_step_is_zero():
    rng = _rng(6)
    x, eps, n = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(3))
    prev, lp = _euler_step(eps, x, jnp.float32(2.0), jnp.float32(1.0), n)
    again, lp2 = euler_ancestral_step(eps, x, 2.0, 1.0, prev_sample=prev)
    np.testing.assert_allclose(np.asarray(lp2), np.asarray(lp), atol=1e-6)
    last, lp_last = euler_ancestral_step(eps, x, jnp.float32(0.03), jnp.float32(0.0), noise=n)
    np.testing.assert_array_equal(np.asarray(lp_last), np.zeros(2, np.float32))
    np.testing.assert_allclose(np.asarray(last), x - np.float32(0.03) * eps, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------- layering
def test_diffusion_imports_no_models_and_no_torch():
    code = ("import sys, jaxedit.diffusion; bad = [m for m in sys.modules "
            "if m.startswith('jaxedit.models') or m == 'torch' or m.startswith('jaxedit.rl')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
