"""The generation parameters text that the popular web UIs write under the PNG key `parameters`, both ways.

Layout: the prompt (any number of lines), then optionally `Negative prompt: ...` (any number of lines), then one
line of `Key: value` fields separated by ", ". The web UIs strip the whole text, so an image made from an empty
prompt has the settings line alone.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from microbatch.engine import ImageJob, SamplingSettings
from microbatch.request import UsageError, check_image_file

_FIELD = re.compile(r"\s*([A-Za-z][A-Za-z ]*):\s*([^,]*)")


def png_parameters(
    job: ImageJob, settings: SamplingSettings, model_hash: str, precision: str, vae_hash: Optional[str] = None, vae_name: Optional[str] = None
) -> str:
    """The `parameters` text of one image (`VAE hash` and `VAE` only with a separate VAE file, as the web UI)."""
    fields = [
        f"Steps: {settings.steps}",
        f"Sampler: {settings.sampler}",
        f"Schedule: {settings.schedule_name()}",
        f"CFG scale: {settings.guidance_scale:g}",
        f"Seed: {job.seed}",
        f"Size: {settings.width}x{settings.height}",
        f"Model hash: {model_hash}",
    ]
    if vae_hash is not None:
        fields.append(f"VAE hash: {vae_hash}")
    if vae_name is not None:
        fields.append(f"VAE: {vae_name}")
    fields += [f"Eta: {settings.eta:g}", f"Precision: {precision}"]
    if settings.strength is not None:
        fields.append(f"Denoising strength: {settings.strength:g}")
    lines = [job.prompt]
    if job.negative_prompt:
        lines.append(f"Negative prompt: {job.negative_prompt}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def _settings_fields(line: str) -> dict[str, str]:
    return {m.group(1).strip(): m.group(2).strip() for m in _FIELD.finditer(line)}


def parse_png_parameters(text: str) -> dict[str, str]:
    """Inverse of png_parameters: {"prompt", "negative_prompt", and each "Key: value" field of the settings line}."""
    lines = text.rstrip("\n").split("\n")
    fields = _settings_fields(lines[-1])
    if "Seed" not in fields or "Steps" not in fields:
        if len(lines) < 2:
            raise ValueError("the parameters text has no settings line")
        raise ValueError("the parameters text has no Seed / Steps fields")
    body = lines[:-1]
    negative = ""
    for i, line in enumerate(body):
        if line.startswith("Negative prompt: "):
            negative = "\n".join([line[len("Negative prompt: "):], *body[i + 1 :]])
            body = body[:i]
            break
    fields["prompt"] = "\n".join(body)
    fields["negative_prompt"] = negative
    return fields


# The request (and model option) fields a PNG sets, and the flag that sets each on the command line.
FLAG_OF = {
    "prompt": "prompt", "negative_prompt": "negative_prompt", "steps": "ddim_steps", "seed": "seed", "width": "W",
    "height": "H", "scale": "scale", "eta": "ddim_eta", "sampler": "sampler", "schedule": "schedule",
    "strength": "strength", "precision": "precision",
}


@dataclass
class PngSettings:
    """What a PNG's parameters say: request fields, the model options it names, and the rest for notes."""

    path: str
    fields: dict[str, Any] = field(default_factory=dict)
    model_hash: Optional[str] = None
    made_by: str = "txt2img"  # "img2img" when the text has a Denoising strength (and no hires fix)
    hires: bool = False


def read_png_settings(path: Union[str, Path]) -> PngSettings:
    """Read a PNG written by these scripts or a web UI; one-line UsageError when it has no usable parameters."""
    from PIL import Image

    check_image_file(path, "--from_png")
    with Image.open(path) as im:
        text = im.info.get("parameters")
    if not text:
        raise UsageError(f"{path} has no `parameters` text chunk to regenerate from")
    out = PngSettings(str(path))
    try:
        f = parse_png_parameters(text)
        values: dict[str, Any] = {"prompt": f["prompt"], "negative_prompt": f["negative_prompt"], "steps": int(f["Steps"]), "seed": int(f["Seed"])}
        if "Size" in f:
            values["width"], values["height"] = (int(v) for v in f["Size"].split("x"))
        if "CFG scale" in f:
            values["scale"] = float(f["CFG scale"])
        values["eta"] = float(f["Eta"]) if "Eta" in f else None
        if "Denoising strength" in f:
            values["strength"] = float(f["Denoising strength"])
    except (KeyError, ValueError) as e:
        raise UsageError(f"{path}: cannot read its parameters ({e})") from None
    values["sampler"] = f.get("Sampler", "ddim").lower()
    if "Schedule" in f:
        values["schedule"] = f["Schedule"]
    if f.get("Precision") in ("full", "autocast"):
        values["precision"] = f["Precision"]
    out.fields = values
    out.model_hash = f.get("Model hash")
    out.hires = any(key.startswith("Hires") for key in f)
    if "strength" in values and not out.hires:
        out.made_by = "img2img"
    return out
