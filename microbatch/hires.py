"""The hires fix: a txt2img image made at its size, upscaled, then re-run as img2img at the larger size.

The second pass follows the AUTOMATIC1111 web UI (`StableDiffusionProcessingTxt2Img.sample_hr_pass`):

- **Target size** (`calculate_target_resolution`): with `hr_scale` S, (int(W * S), int(H * S)); with `hr_resize_x`
  / `hr_resize_y` and one of them 0, the other side follows the first pass's aspect ratio with integer division
  (`x * H // W`); with both, the image is upscaled to cover X x Y (aspect kept) and the latent is cropped to it,
  centred. Our UNets need sides that are multiples of the model's size multiple (64 for SD, see
  `LoadedModel.size_multiple`): a target that is not is rounded down to one, with a note, as `--W` / `--H` are (the
  web UI keeps multiples of 8 there; a web UI PNG of such a size regenerates at the rounded size).
- **Upscalers**: the latent ones interpolate the first pass's latent (`Latent` = bilinear without antialiasing,
  `Latent (nearest)` = nearest, and the web UI's other latent modes); the pixel ones (`Lanczos`, `Nearest`) decode
  the first pass to 8-bit pixels, resize them as the web UI's upscaler and `images.resize_image(0, ...)` do, and
  encode them again (the posterior sample drawn from the image's INIT_SEED_OFFSET stream, as img2img).
- **Steps**: the web UI calls `sample_img2img(..., steps=hr_second_pass_steps or steps)` with the steps given, so
  its `setup_img2img_steps` always takes the "exact steps" branch: the second pass runs exactly N = `hr_steps` (0:
  the first pass's steps) sampler steps, the last N of a schedule of int(N / min(strength, 0.999)) steps. (Its
  "img2img: do exact steps" option, off by default, only matters for img2img itself; `int(strength * steps)` is
  what img2img runs, never the hires pass.) We do the same.
- **Noise**: the web UI makes a fresh `ImageRNG` from the same seeds for the second pass; here each image's
  second pass draws its start noise, then its sampler noise, from a new generator seeded with its own seed (the
  same stream as its first pass, restarted), so the second pass is exactly an img2img of the upscaled latent with
  the image's seed (see `microbatch.engine`).
- **Prompt editing**: `[a:b:N]` counts from the end of the first pass in the second one (the web UI's hires
  scheduling, `microbatch.prompts`).

`Denoising strength` defaults to 0.7, the web UI's slider default (its HTTP API's default is 0.75, which the server
keeps).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

# Our upscaler names -> (the web UI's name, the latent interpolation (mode, antialias) or None for a pixel upscaler).
UPSCALERS: dict[str, tuple[str, Optional[tuple[str, bool]]]] = {
    "latent": ("Latent", ("bilinear", False)),
    "latent-antialiased": ("Latent (antialiased)", ("bilinear", True)),
    "latent-bicubic": ("Latent (bicubic)", ("bicubic", False)),
    "latent-bicubic-antialiased": ("Latent (bicubic antialiased)", ("bicubic", True)),
    "latent-nearest": ("Latent (nearest)", ("nearest", False)),
    "latent-nearest-exact": ("Latent (nearest-exact)", ("nearest-exact", False)),
    "lanczos": ("Lanczos", None),
    "nearest": ("Nearest", None),
}
WEBUI_UPSCALERS: dict[str, str] = {webui: ours for ours, (webui, _) in UPSCALERS.items()}
DEFAULT_UPSCALER = "latent"
# The web UI's "Denoising strength" slider default for the hires fix.
DEFAULT_HIRES_STRENGTH = 0.7


def upscaler_name(name: str) -> str:
    """Our name for an upscaler given by our name or the web UI's ("Latent (nearest)"); ValueError otherwise."""
    if name in UPSCALERS:
        return name
    if name in WEBUI_UPSCALERS:
        return WEBUI_UPSCALERS[name]
    raise ValueError(f"unknown hires upscaler {name!r}; choose one of {', '.join(UPSCALERS)} (or the web UI's names: {', '.join(WEBUI_UPSCALERS)})")


@dataclass(frozen=True)
class HiresSize:
    """Where the second pass runs: `width` x `height` pixels (its latent is [C, height // f, width // f]); the
    upscaler resizes to `upscale_to` (width, height) first, then `crop` (top, bottom, left, right) latent rows and
    columns are cut (non-zero only when both hr_resize_x and hr_resize_y are given)."""

    width: int
    height: int
    upscale_to: tuple[int, int]
    crop: tuple[int, int, int, int] = (0, 0, 0, 0)
    notes: tuple[str, ...] = ()


def _round_down(value: int, multiple: int, what: str, notes: list[str]) -> int:
    rounded = max(multiple, value - value % multiple)
    if rounded != value:
        notes.append(f"note: hires {what} {value} is not a multiple of {multiple}; using {rounded}")
    return rounded


def hires_size(
    width: int, height: int, scale: Optional[float], resize_x: Optional[int], resize_y: Optional[int], multiple: int, factor: int
) -> HiresSize:
    """The second pass's size for a first pass of width x height pixels, as the web UI computes it (module
    docstring), each side rounded down to `multiple` (a note says so). `factor`: pixels per latent."""
    notes: list[str] = []
    rx, ry = resize_x or 0, resize_y or 0
    if rx == 0 and ry == 0:
        if scale is None:
            raise ValueError("hires fix needs a scale or a resize target")
        w = _round_down(int(width * scale), multiple, "width", notes)
        h = _round_down(int(height * scale), multiple, "height", notes)
        return HiresSize(w, h, (w, h), notes=tuple(notes))
    if ry == 0:
        w = _round_down(rx, multiple, "width", notes)
        h = _round_down(rx * height // width, multiple, "height", notes)
        return HiresSize(w, h, (w, h), notes=tuple(notes))
    if rx == 0:
        w = _round_down(ry * width // height, multiple, "width", notes)
        h = _round_down(ry, multiple, "height", notes)
        return HiresSize(w, h, (w, h), notes=tuple(notes))
    # Both: cover rx x ry keeping the aspect, then crop the latent to it (the web UI's truncate_x / truncate_y).
    rx = _round_down(rx, multiple, "width", notes)
    ry = _round_down(ry, multiple, "height", notes)
    if width / height < rx / ry:
        ux, uy = rx, rx * height // width
    else:
        ux, uy = ry * width // height, ry
    tx, ty = (ux - rx) // factor, (uy - ry) // factor
    return HiresSize(rx, ry, (ux, uy), (ty // 2, (ty + 1) // 2, tx // 2, (tx + 1) // 2), tuple(notes))


def hires_steps(steps: int, hr_steps: Optional[int], strength: float) -> tuple[int, int]:
    """(schedule length, steps run) of the second pass: N = hr_steps or steps, run as the last N steps of a schedule
    of int(N / min(strength, 0.999)) steps (the web UI's `setup_img2img_steps` with the steps given)."""
    n = hr_steps or steps
    return max(n, int(n / min(strength, 0.999))), n


@dataclass(frozen=True)
class HiresPass:
    """What the engine needs for a run's second pass: the upscaler, the resize and crop, and the second pass's
    SamplingSettings (its size; strength; `exact_steps`; the first pass's prompt steps). `scale` / `resize` /
    `steps` are what the PNG parameters say (`Hires upscale` or `Hires resize`, `Hires steps` when given)."""

    upscaler: str
    size: HiresSize
    settings: Any  # microbatch.engine.SamplingSettings of the second pass (hires None)
    scale: Optional[float] = None
    resize: Optional[tuple[int, int]] = None
    steps: Optional[int] = None
    notes: list[str] = field(default_factory=list)

    @property
    def latent_mode(self) -> Optional[tuple[str, bool]]:
        return UPSCALERS[self.upscaler][1]

    def parameters_fields(self) -> list[str]:
        """The web UI's keys, in its order: `Hires upscale` (or `Hires resize`), `Hires steps` (when given),
        `Hires upscaler`. `Denoising strength` is written by the caller, where the web UI writes it."""
        out = []
        if self.resize is not None:
            out.append(f"Hires resize: {self.resize[0]}x{self.resize[1]}")
        else:
            out.append(f"Hires upscale: {self.scale:g}")
        if self.steps:
            out.append(f"Hires steps: {self.steps}")
        out.append(f"Hires upscaler: {UPSCALERS[self.upscaler][0]}")
        return out


def upscale_latents(latents: torch.Tensor, size: HiresSize, mode: tuple[str, bool], factor: int) -> torch.Tensor:
    """Latent upscalers: [B, C, h, w] -> [B, C, upscale_to_h // f, upscale_to_w // f] by
    torch.nn.functional.interpolate(mode, antialias) as the web UI, then the crop."""
    interp, antialias = mode
    w, h = size.upscale_to
    kwargs: dict[str, Any] = {"antialias": antialias} if interp in ("bilinear", "bicubic") else {}
    out = torch.nn.functional.interpolate(latents, size=(h // factor, w // factor), mode=interp, **kwargs)
    return crop_latents(out, size.crop)


def crop_latents(latents: torch.Tensor, crop: tuple[int, int, int, int]) -> torch.Tensor:
    top, bottom, left, right = crop
    return latents[:, :, top : latents.shape[2] - bottom, left : latents.shape[3] - right]


def upscale_image(image: Any, width: int, height: int, upscaler: str) -> Any:
    """A PIL image resized to width x height by the web UI's `resize_image(0, ..., upscaler_name)` with its Lanczos
    or Nearest upscaler: an enlargement first goes through the upscaler (x scale, then Lanczos to the multiple of 8
    below), and any size left over is made with Lanczos."""
    from PIL import Image

    lanczos = Image.Resampling.LANCZOS
    resample = {"lanczos": lanczos, "nearest": Image.Resampling.NEAREST}[upscaler]
    scale = max(width / image.width, height / image.height)
    if scale > 1.0:
        dest_w, dest_h = int((image.width * scale) // 8 * 8), int((image.height * scale) // 8 * 8)
        if image.width < dest_w or image.height < dest_h:
            image = image.resize((int(image.width * scale), int(image.height * scale)), resample=resample)
        if image.size != (dest_w, dest_h):
            image = image.resize((dest_w, dest_h), resample=lanczos)
    if image.size != (width, height):
        image = image.resize((width, height), resample=lanczos)
    return image


def upscale_pixels(images: torch.Tensor, size: HiresSize, upscaler: str) -> torch.Tensor:
    """Pixel upscalers: decoded images [B, 3, H, W] in [0, 1] -> 8-bit (truncated, as the web UI and our saved
    PNGs) -> resized (upscale_image) -> [B, 3, upscale_to_h, upscale_to_w] float32 in [0, 1]."""
    from PIL import Image

    w, h = size.upscale_to
    out = []
    for x in images:
        pixels = (255.0 * x.float().cpu().permute(1, 2, 0).numpy()).astype(np.uint8)
        resized = upscale_image(Image.fromarray(pixels), w, h, upscaler)
        out.append(torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return torch.stack(out)
