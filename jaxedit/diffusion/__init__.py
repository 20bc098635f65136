"""Diffusion: noise schedules, DDIM (with log-prob) and Euler ancestral steps, CFG, the sampler.

Knows nothing of the models: the sampler takes the denoiser as a function.
"""
from jaxedit.diffusion.ddim import ddim_step_with_logprob, gaussian_log_prob
from jaxedit.diffusion.euler import EulerPlan, euler_ancestral_step, euler_plan, scale_model_input
from jaxedit.diffusion.guidance import (IP2PCond, SpecialistCond, SpecialistRows, ip2p_combine,
                                        ip2p_denoiser, ip2p_rows, specialist_combine,
                                        specialist_denoiser, specialist_rows)
from jaxedit.diffusion.sampler import DDIMPlan, Trajectory, make_plan, sample, sample_scan
from jaxedit.diffusion.schedules import (Schedule, ddim_timesteps, init_noise_sigma, karras_sigmas,
                                         spaced_timesteps)
