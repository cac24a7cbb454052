"""Sampling math: samplers are functions of a denoiser and a sequence of noise levels.

    denoiser = Denoiser(GuidedModel(model.apply_model, cond, uncond, 7.5), model.alphas_cumprod)
    sigmas = get_sigmas("uniform", denoiser, 50)
    x0 = sample_ddim(denoiser, noise * (sigmas[0] ** 2 + 1) ** 0.5, sigmas)
"""
from samplers.compvis import DDIMSampler, PLMSSampler
from samplers.ddim import sample_ddim
from samplers.ddpm import sample_ddpm
from samplers.dpm2 import sample_dpm2
from samplers.dpmpp_2m import sample_dpmpp_2m
from samplers.dpmpp_2m_sde import sample_dpmpp_2m_sde
from samplers.dpmpp_2s_ancestral import sample_dpmpp_2s_ancestral
from samplers.dpmpp_3m_sde import sample_dpmpp_3m_sde
from samplers.dpmpp_sde import sample_dpmpp_sde
from samplers.euler import sample_euler
from samplers.euler_ancestral import sample_euler_ancestral
from samplers.heun import sample_heun
from samplers.lms import sample_lms
from samplers.unipc import sample_unipc
from samplers.denoiser import Denoiser, from_vp, to_vp
from samplers.guidance import GuidedModel
from samplers.plms import sample_plms
from samplers.registry import SAMPLERS, SamplerInfo, get_sampler, sampler_help
from samplers.schedules import SCHEDULES, get_sigmas

__all__ = [
    "DDIMSampler",
    "PLMSSampler",
    "Denoiser",
    "GuidedModel",
    "SAMPLERS",
    "SCHEDULES",
    "SamplerInfo",
    "from_vp",
    "get_sampler",
    "get_sigmas",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpm2",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_3m_sde",
    "sample_dpmpp_sde",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_lms",
    "sample_plms",
    "sample_unipc",
    "sampler_help",
    "to_vp",
]
