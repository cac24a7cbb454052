"""The AUTOMATIC1111 web UI's vocabulary: its sampler and scheduler names, its messages' field names.

The web UI names samplers for people ("Euler a", "DPM++ 2M") and, since its 1.9 release, gives the noise schedule
separately (`scheduler`: "Automatic", "Karras", "Exponential"...). Older clients still send the two together
("DPM++ 2M Karras"). Both forms map here to one of our samplers (`samplers/registry.py`) and one of our schedules;
"Automatic" (or no scheduler) means the sampler's own default schedule, as in the scripts.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from microbatch.request import UsageError
from samplers import SAMPLERS, SCHEDULES


@dataclass(frozen=True)
class WebuiSampler:
    """A sampler as the web UI lists it: its display name, the k-diffusion style aliases clients send, ours."""

    name: str
    ours: str
    aliases: tuple[str, ...] = ()


WEBUI_SAMPLERS: tuple[WebuiSampler, ...] = (
    WebuiSampler("DPM++ 2M", "dpmpp_2m", ("k_dpmpp_2m",)),
    WebuiSampler("DPM++ SDE", "dpmpp_sde", ("k_dpmpp_sde",)),
    WebuiSampler("DPM++ 2M SDE", "dpmpp_2m_sde", ("k_dpmpp_2m_sde",)),
    WebuiSampler("DPM++ 2S a", "dpmpp_2s_a", ("k_dpmpp_2s_a",)),
    WebuiSampler("DPM++ 3M SDE", "dpmpp_3m_sde", ("k_dpmpp_3m_sde",)),
    WebuiSampler("Euler a", "euler_a", ("k_euler_a", "k_euler_ancestral")),
    WebuiSampler("Euler", "euler", ("k_euler",)),
    WebuiSampler("LMS", "lms", ("k_lms",)),
    WebuiSampler("Heun", "heun", ("k_heun",)),
    WebuiSampler("DPM2", "dpm2", ("k_dpm_2",)),
    WebuiSampler("DDIM", "ddim", ()),
    WebuiSampler("PLMS", "plms", ()),
    WebuiSampler("UniPC", "unipc", ()),
    WebuiSampler("DDPM", "ddpm", ()),
)

# The web UI's scheduler names (and labels) whose schedule is ours by the same definition; "automatic" is the
# sampler's own default. Our other schedules are accepted by their own names.
WEBUI_SCHEDULERS: dict[str, Optional[str]] = {"automatic": None, "karras": "karras", "exponential": "exponential"}
SCHEDULE_LABELS = {
    "uniform": "Uniform (CompVis DDIM grid)", "leading": "Leading", "linspace": "Linspace", "trailing": "Trailing",
    "karras": "Karras", "exponential": "Exponential",
}

_BY_NAME: dict[str, WebuiSampler] = {}
for _s in WEBUI_SAMPLERS:
    for _key in (_s.name, _s.ours, *_s.aliases):
        _BY_NAME[_key.lower()] = _s
_SUFFIX = re.compile(r"^(.*\S)\s+(karras|exponential)$", re.IGNORECASE)


def resolve_sampler(sampler_name: Optional[str], scheduler: Optional[str]) -> tuple[str, Optional[str]]:
    """(our sampler, our schedule or None for the sampler's own) for the web UI's `sampler_name` and
    `scheduler`. Names are matched without regard to case; "DPM++ 2M Karras" is "DPM++ 2M" + scheduler Karras
    (an explicit scheduler other than Automatic wins). Unknown names raise a one-line UsageError."""
    name = (sampler_name or "Euler").strip()
    implied: Optional[str] = None
    sampler = _BY_NAME.get(name.lower())
    if sampler is None:
        m = _SUFFIX.match(name)
        if m and m.group(1).lower() in _BY_NAME:
            sampler, implied = _BY_NAME[m.group(1).lower()], m.group(2).lower()
    if sampler is None or sampler.ours not in SAMPLERS:
        known = ", ".join(s.name for s in WEBUI_SAMPLERS)
        raise UsageError(f"unknown sampler_name {sampler_name!r}; choose one of {known} (see /sdapi/v1/samplers)")
    schedule = resolve_scheduler(scheduler)
    if schedule is None and implied is not None:
        schedule = implied
    return sampler.ours, schedule


def resolve_scheduler(scheduler: Optional[str]) -> Optional[str]:
    """Our schedule for the web UI's `scheduler` (None or "Automatic": the sampler's own)."""
    if scheduler is None or not scheduler.strip():
        return None
    key = scheduler.strip().lower()
    if key in WEBUI_SCHEDULERS:
        return WEBUI_SCHEDULERS[key]
    if key in SCHEDULES:
        return key
    known = ", ".join(["Automatic", *SCHEDULES])
    raise UsageError(f"unknown scheduler {scheduler!r}; choose one of {known} (see /sdapi/v1/schedulers)")


def webui_sampler_name(ours: str) -> str:
    """The web UI's display name of one of our samplers (ours when it has none)."""
    for s in WEBUI_SAMPLERS:
        if s.ours == ours:
            return s.name
    return ours


def samplers_list() -> list[dict]:
    """GET /sdapi/v1/samplers: name, aliases, options (ours: our name, default schedule, whether eta applies)."""
    out = []
    for s in WEBUI_SAMPLERS:
        info = SAMPLERS.get(s.ours)
        if info is None:
            continue
        aliases = [a for a in (s.ours, *s.aliases) if a != s.name]
        options = {"microbatch_name": info.name, "scheduler": info.default_schedule, "uses_eta": str(info.uses_eta).lower()}
        out.append({"name": s.name, "aliases": aliases, "options": options})
    return out


def schedulers_list() -> list[dict]:
    """GET /sdapi/v1/schedulers, in the web UI's shape (name, label, aliases, default_rho, need_inner_model)."""
    out = [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1.0, "need_inner_model": False}]
    for name in SCHEDULES:
        rho = 7.0 if name == "karras" else -1.0
        out.append({"name": name, "label": SCHEDULE_LABELS.get(name, name.title()), "aliases": None, "default_rho": rho, "need_inner_model": False})
    return out


# The scripts' flags in UsageError messages, and the API fields that carry them.
_FIELD_OF_FLAG = {
    "--ddim_steps": "steps", "--n_samples": "batch_size", "--n_iter": "n_iter", "--scale": "cfg_scale", "--H": "height",
    "--W": "width", "--strength": "denoising_strength", "--ddim_eta": "eta", "--seed": "seed", "--prompt": "prompt",
    "--negative_prompt": "negative_prompt", "--init-img PATH (the image to repaint)": "init_images",
    "--init-img PATH": "init_images", "--mask PATH (white = repaint)": "mask", "--max_batch_size": "max_batch_size",
    "--sampler": "sampler_name", "--schedule": "scheduler", "--hr_scale": "hr_scale", "--hr_resize_x": "hr_resize_x",
    "--hr_resize_y": "hr_resize_y", "--hr_upscaler": "hr_upscaler", "--hr_steps": "hr_second_pass_steps",
    "--hr_denoising_strength": "denoising_strength",
}
_FLAG = re.compile("|".join(re.escape(flag) + (r"\b" if flag[-1].isalnum() else "") for flag in sorted(_FIELD_OF_FLAG, key=len, reverse=True)))


def api_message(message: str) -> str:
    """A UsageError message with the scripts' flag names replaced by the API's field names, on one line."""
    text = _FLAG.sub(lambda m: _FIELD_OF_FLAG[m.group(0)], message)
    return " ".join(text.split())
