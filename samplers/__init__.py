"""Sampling math: samplers are functions of a denoiser and a sequence of noise levels.

    denoiser = Denoiser(GuidedModel(model.apply_model, cond, uncond, 7.5), model.alphas_cumprod)
    sigmas = get_sigmas("uniform", denoiser, 50)
    x0 = sample_ddim(denoiser, noise * (sigmas[0] ** 2 + 1) ** 0.5, sigmas)
"""
from samplers.compvis import DDIMSampler, PLMSSampler
from samplers.ddim import sample_ddim
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
    "sample_plms",
    "sampler_help",
    "to_vp",
]
