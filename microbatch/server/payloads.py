"""The bodies of the web UI's `/sdapi/v1` requests, with its field names and defaults.

Fields this server does not use are accepted and ignored (clients send the web UI's whole payload), except those
whose silent omission would give other images than the client asked for (variation seeds, face restoration,
tiling, styles, scripts, a hires pass with its own sampler, prompt or checkpoint): those are refused with a one-line
message. The hires fix (`enable_hr`) is the web UI's, on txt2img only; its `denoising_strength` defaults to the web
UI API's 0.75. Defaults follow the web UI
except `width` / `height` (None: the model's native size, 512 for SD 1.x) and `cfg_scale` (None: the model's
default, 7.5 for SD as the original scripts; the demo model's 2).
"""
from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from microbatch.server.security import path_problem

SEED_LIMIT = 2**63  # seeds are torch.Generator seeds: image i uses seed + i, which must stay below 2^64


class Txt2ImgRequest(BaseModel):
    """POST /sdapi/v1/txt2img."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] = Field(default_factory=list)
    seed: int = Field(-1, ge=-1, lt=SEED_LIMIT, description="-1: a random seed; image i of the request uses seed + i")
    subseed: int = -1
    subseed_strength: float = 0.0
    sampler_name: Optional[str] = Field(None, description="the web UI's name (Euler a, DPM++ 2M, DDIM...) or ours (euler_a...)")
    sampler_index: str = "Euler"
    scheduler: Optional[str] = Field(None, description="Automatic (the sampler's own), Karras, Exponential, or one of ours")
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: Optional[float] = Field(None, description="guidance scale; None: the model's default")
    width: Optional[int] = Field(None, description="pixels; None: the model's native size")
    height: Optional[int] = Field(None, description="pixels; None: the model's native size")
    eta: Optional[float] = Field(None, description="noise of DDIM / ancestral / SDE samplers; None: the eta_ddim / eta_ancestral option")
    restore_faces: Optional[bool] = None
    tiling: Optional[bool] = None
    enable_hr: bool = False
    denoising_strength: float = Field(0.75, description="img2img: the share of the schedule re-run; txt2img with enable_hr: the hires pass's")
    hr_scale: float = Field(2.0, description="enable_hr: the second pass is this many times the size (unless hr_resize_x / hr_resize_y)")
    hr_upscaler: Optional[str] = Field(None, description="Latent (default), Latent (nearest), Lanczos, ... (GET /upscalers, /latent-upscale-modes)")
    hr_second_pass_steps: int = Field(0, ge=0, description="0: the first pass's steps")
    hr_resize_x: int = Field(0, ge=0, description="the second pass's width; 0 with hr_resize_y: keep the aspect ratio")
    hr_resize_y: int = Field(0, ge=0, description="the second pass's height; 0 with hr_resize_x: keep the aspect ratio")
    hr_checkpoint_name: Optional[str] = None
    hr_sampler_name: Optional[str] = None
    hr_scheduler: Optional[str] = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    override_settings: dict[str, Any] = Field(default_factory=dict)
    override_settings_restore_afterwards: bool = True
    script_name: Optional[str] = None
    script_args: list[Any] = Field(default_factory=list)
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    send_images: bool = True
    save_images: bool = False


class Img2ImgRequest(Txt2ImgRequest):
    """POST /sdapi/v1/img2img: `init_images[0]` re-run for `denoising_strength`; with `mask`, inpainting."""

    init_images: Optional[list[str]] = Field(None, description="base64 images; one per request")
    mask: Optional[str] = Field(None, description="base64 mask, white = repaint (inpainting)")
    inpainting_mask_invert: int = Field(0, ge=0, le=1, description="1: black = repaint")
    resize_mode: int = Field(0, ge=0, le=3, description="0 (just resize) when width / height differ from the init image")
    include_init_images: bool = False


class OptionsUpdate(BaseModel):
    """POST /sdapi/v1/options: the options this server applies; other keys are ignored, as the web UI does."""

    model_config = ConfigDict(extra="allow")

    sd_model_checkpoint: Optional[str] = None
    sd_vae: Optional[str] = None
    eta_ddim: Optional[float] = None
    eta_ancestral: Optional[float] = None
    CLIP_stop_at_last_layers: Optional[int] = None
    samples_format: Optional[str] = None


class PngInfoRequest(BaseModel):
    """POST /sdapi/v1/png-info."""

    image: str = Field(..., description="a base64-encoded PNG")


def refused_fields(payload: Txt2ImgRequest) -> Optional[str]:
    """A one-line reason when the payload asks for something this server does not do, else None."""
    if payload.enable_hr:
        if isinstance(payload, Img2ImgRequest):
            return "enable_hr (hires fix) applies to txt2img only"
        if payload.hr_checkpoint_name not in (None, "", "Use same checkpoint"):
            return f"hr_checkpoint_name {payload.hr_checkpoint_name!r}: a hires pass with another checkpoint is not supported"
        if payload.hr_sampler_name not in (None, "", "Use same sampler", payload.sampler_name):
            return f"hr_sampler_name {payload.hr_sampler_name!r}: a hires pass with another sampler is not supported"
        if payload.hr_scheduler not in (None, "", "Use same scheduler", payload.scheduler):
            return f"hr_scheduler {payload.hr_scheduler!r}: a hires pass with another scheduler is not supported"
        if payload.hr_prompt not in ("", payload.prompt) or payload.hr_negative_prompt not in ("", payload.negative_prompt):
            return "hr_prompt / hr_negative_prompt: a hires pass with other prompts is not supported"
    if payload.subseed_strength not in (0, 0.0):
        return f"variation seeds (subseed_strength {payload.subseed_strength}) are not supported yet"
    if payload.restore_faces:
        return "restore_faces is not supported by this server"
    if payload.tiling:
        return "tiling is not supported by this server"
    if payload.styles:
        return f"styles are not supported by this server (got {payload.styles})"
    if payload.script_name:
        return f"scripts are not supported by this server (script_name {payload.script_name!r})"
    if payload.alwayson_scripts:
        return f"always-on scripts are not supported by this server (got {', '.join(map(str, payload.alwayson_scripts))})"
    return path_problem(payload)  # a file named with a path (a LoRA tag, override_settings.sd_vae...)
