"""Noise schedules: SD-1 betas from a diffusers ``scheduler_config.json``, timestep selection, Karras σ.

``Schedule`` is a small frozen pytree: its arrays (``alphas_cumprod`` (T,), ``final_alpha_cumprod``
()) are leaves, its settings (T, ``steps_offset``, ``timestep_spacing``) are static metadata, so a
schedule can be passed through ``jax.jit`` as an argument. The per-sampling-run tables
(``ddim_timesteps``, ``karras_sigmas``) are computed on the host with NumPy, transcribing diffusers'
``set_timesteps`` line by line so the step sequences match exactly.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

SPACINGS = ("leading", "trailing", "linspace")

# Settings that would change the math if not at these values; any other value is a ValueError.
_REQUIRED = {
    "prediction_type": "epsilon", "clip_sample": False, "thresholding": False,
    "rescale_betas_zero_snr": False, "interpolation_type": "linear", "timestep_type": "discrete",
    "final_sigmas_type": "zero", "use_exponential_sigmas": False, "use_beta_sigmas": False,
    "sigma_min": None, "sigma_max": None,
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Schedule:
    """Discrete DDPM noise schedule.

    alphas_cumprod: (T,) float32, ᾱ_t for t = 0..T-1.
    final_alpha_cumprod: () float32, ᾱ used as "previous" of the last DDIM step
        (1.0 if ``set_alpha_to_one`` else ᾱ_0).
    num_train_timesteps, steps_offset, timestep_spacing: static settings (pytree metadata).
    """
    alphas_cumprod: jax.Array
    final_alpha_cumprod: jax.Array
    num_train_timesteps: int = dataclasses.field(default=1000, metadata=dict(static=True))
    steps_offset: int = dataclasses.field(default=1, metadata=dict(static=True))
    timestep_spacing: str = dataclasses.field(default="leading", metadata=dict(static=True))

    @classmethod
    def from_config(cls, config: dict) -> "Schedule":
        """Build from a diffusers scheduler config dict (``scheduler/scheduler_config.json``).

        Missing keys take diffusers ``DDIMScheduler`` defaults (note: diffusers' Euler schedulers
        default to ``timestep_spacing="linspace"`` when the key is absent; SD-1 / InstructPix2Pix
        checkpoints should state it). ``_``-keys and keys of other schedulers are ignored
        (``use_karras_sigmas`` too: the Euler sampler here always uses Karras σ).
        Raises ValueError naming an unsupported ``beta_schedule``, ``timestep_spacing``,
        ``prediction_type`` (only "epsilon") or other setting that would change the math.
        """
        c = {k: v for k, v in config.items() if not k.startswith("_")}
        for key, want in _REQUIRED.items():
            if key in c and c[key] != want:
                raise ValueError(f"scheduler config: {key}={c[key]!r} is not supported (need {want!r})")
        n = int(c.get("num_train_timesteps", 1000))
        spacing = c.get("timestep_spacing", "leading")
        if spacing not in SPACINGS:
            raise ValueError(f"scheduler config: timestep_spacing={spacing!r} is not supported {SPACINGS}")
        betas = _betas(c.get("beta_schedule", "linear"), float(c.get("beta_start", 0.0001)),
                       float(c.get("beta_end", 0.02)), n, c.get("trained_betas"))
        acp = np.cumprod(1.0 - betas)  # float64, rounded once to float32
        final = 1.0 if c.get("set_alpha_to_one", True) else acp[0]
        return cls(jnp.asarray(acp, jnp.float32), jnp.asarray(final, jnp.float32), n,
                   int(c.get("steps_offset", 0)), spacing)


def _betas(kind: str, start: float, end: float, n: int, trained) -> np.ndarray:
    """(T,) float64 betas."""
    if trained is not None:
        betas = np.asarray(trained, np.float64)
        if betas.shape != (n,):
            raise ValueError(f"scheduler config: trained_betas has shape {betas.shape}, want ({n},)")
        return betas
    if kind == "linear":
        return np.linspace(start, end, n, dtype=np.float64)
    if kind == "scaled_linear":  # SD-1 / latent diffusion
        return np.linspace(start ** 0.5, end ** 0.5, n, dtype=np.float64) ** 2
    raise ValueError(f"scheduler config: beta_schedule={kind!r} is not supported "
                     "(supported: 'linear', 'scaled_linear', trained_betas)")


def _check_steps(schedule: Schedule, steps: int) -> None:
    if not 1 <= steps <= schedule.num_train_timesteps:
        raise ValueError(f"steps={steps} must be in [1, {schedule.num_train_timesteps}]")


def spaced_timesteps(schedule: Schedule, steps: int) -> np.ndarray:
    """(steps,) float64 descending timesteps per ``timestep_spacing`` (diffusers ``set_timesteps``)."""
    _check_steps(schedule, steps)
    n = schedule.num_train_timesteps
    if schedule.timestep_spacing == "linspace":
        return np.linspace(0, n - 1, steps).round()[::-1].copy()
    if schedule.timestep_spacing == "leading":
        ratio = n // steps
        return (np.arange(0, steps) * ratio).round()[::-1] + schedule.steps_offset
    ratio = n / steps  # trailing
    return np.round(np.arange(n, 0, -ratio)) - 1


def ddim_timesteps(schedule: Schedule, steps: int) -> np.ndarray:
    """(steps,) int32 DDIM timesteps, as ``DDIMScheduler.set_timesteps``."""
    return spaced_timesteps(schedule, steps).astype(np.int64).astype(np.int32)


def ddim_prev_timestep(schedule: Schedule, t, steps: int):
    """t − T // steps (diffusers' DDIM "previous" timestep; negative means "use final ᾱ")."""
    return t - schedule.num_train_timesteps // steps


def _sigma_to_t(sigma: float, log_sigmas: np.ndarray) -> float:
    """Fractional timestep of σ by interpolating log σ (diffusers ``_sigma_to_t``)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return float(((1 - w) * low + w * (low + 1)).reshape(()))


def karras_sigmas(schedule: Schedule, steps: int, rho: float = 7.0) -> tuple[np.ndarray, np.ndarray]:
    """Karras σ schedule as diffusers ``EulerDiscreteScheduler(use_karras_sigmas=True)``.

    σ_max/σ_min are the schedule's σ at the first/last spaced timestep. Returns
    (sigmas (steps+1,) float32 ending in 0, timesteps (steps,) float32 fractional).
    Needs a concrete (host-readable) schedule.
    """
    try:
        acp = np.asarray(schedule.alphas_cumprod, np.float32)
    except jax.errors.TracerArrayConversionError as e:
        raise TypeError("karras_sigmas needs a concrete Schedule (build the Euler plan outside jit)") from e
    base = np.array(((1 - acp) / acp) ** 0.5)  # float32, as diffusers
    log_sigmas = np.log(base)
    ts = spaced_timesteps(schedule, steps).astype(np.float32)
    in_sigmas = np.interp(ts, np.arange(0, len(base)), base)
    lo, hi = in_sigmas[-1].item(), in_sigmas[0].item()
    ramp = np.linspace(0, 1, steps)
    sigmas = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    timesteps = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas], np.float32)
    return np.concatenate([sigmas, [0.0]]).astype(np.float32), timesteps


def init_noise_sigma(schedule: Schedule, sigmas: np.ndarray) -> np.float32:
    """Std of the initial latent for an Euler σ table (diffusers' ``init_noise_sigma``)."""
    top = np.float32(np.max(sigmas))
    if schedule.timestep_spacing in ("linspace", "trailing"):
        return top
    return np.float32((top ** 2 + 1) ** 0.5)
