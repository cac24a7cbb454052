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

from microbatch.engine import DEFAULT_AESTHETIC_SCORE, DEFAULT_NEGATIVE_AESTHETIC_SCORE, ImageJob, SamplingSettings
from microbatch.request import UsageError, check_image_file
from samplers import SAMPLERS

# `Key: value` on the settings line; a value may be quoted ("...", with \" inside) to hold commas and colons, as
# the web UI writes `Lora hashes: "a: 123, b: 456"`.
_FIELD = re.compile(r'\s*(\w[\w \-/+]*):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def png_parameters(
    job: ImageJob, settings: SamplingSettings, model_hash: str, precision: str, vae_hash: Optional[str] = None, vae_name: Optional[str] = None,
    lora_hashes: str = "", ti_hashes: str = "", refiner: Optional[str] = None,
) -> str:
    """The `parameters` text of one image (`VAE hash` and `VAE` only with a separate VAE file, as the web UI;
    `Lora hashes`, quoted, when `lora_hashes` (microbatch.lora.lora_hashes) is not empty; `TI hashes` likewise for
    textual-inversion embeddings (microbatch.embeddings.ti_hashes); `Refiner: NAME [hash]` and `Refiner switch at`
    when `refiner` (microbatch.refiner.short_title) took steps, as the web UI). With the hires fix, as the web UI:
    `Size` is the first pass's, then `Denoising strength` (the second pass's), `Hires upscale` (or `Hires resize:
    WxH`), `Hires steps` (when given) and `Hires upscaler` by its web UI name."""
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
    if settings.clip_skip > 1:
        fields.append(f"Clip skip: {settings.clip_skip}")
    if settings.guidance_interval is not None:
        fields.append(f"Guidance interval: {settings.guidance_interval[0]:g} {settings.guidance_interval[1]:g}")
    if settings.tome is not None:
        # the web UI's key for its (tomesd) token merging; it writes none for ratio 0
        fields.append(f"Token merging ratio: {settings.tome:g}")
    if settings.deepcache is not None:
        fields.append(f"DeepCache: {settings.deepcache}")
    fields += [f"Eta: {settings.eta:g}", f"Precision: {precision}"]
    if settings.strength is not None:
        fields.append(f"Denoising strength: {settings.strength:g}")
    elif settings.hires is not None:
        fields.append(f"Denoising strength: {settings.hires.settings.strength:g}")
        fields += settings.hires.parameters_fields()
    fields += micro_conditioning_fields(settings)
    if refiner is not None and settings.refiner_switch is not None:
        fields += [f"Refiner: {refiner}", f"Refiner switch at: {settings.refiner_switch:g}"]
    if lora_hashes:
        fields.append('Lora hashes: "' + lora_hashes.replace("\\", "\\\\").replace('"', '\\"') + '"')
    if ti_hashes:
        fields.append('TI hashes: "' + ti_hashes.replace("\\", "\\\\").replace('"', '\\"') + '"')
    lines = [job.prompt]
    if job.negative_prompt:
        lines.append(f"Negative prompt: {job.negative_prompt}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def micro_conditioning_fields(settings: SamplingSettings) -> list[str]:
    """SDXL micro-conditioning that differs from the published defaults: `Original size` / `Target size` as WxH
    (like `Size`), `Crop coords` as "TOP LEFT", `Aesthetic score`, `Negative aesthetic score`."""
    pos, neg = settings.micro_conditioning(), settings.micro_conditioning(negative=True)
    size = (settings.height, settings.width)
    out = []
    if settings.original_size is not None and pos.original_size != size:
        out.append(f"Original size: {pos.original_size[1]}x{pos.original_size[0]}")
    if settings.crop_coords is not None and pos.crop_coords != (0, 0):
        out.append(f"Crop coords: {pos.crop_coords[0]} {pos.crop_coords[1]}")
    if settings.target_size is not None and pos.target_size != size:
        out.append(f"Target size: {pos.target_size[1]}x{pos.target_size[0]}")
    if settings.aesthetic_score is not None and pos.aesthetic_score != DEFAULT_AESTHETIC_SCORE:
        out.append(f"Aesthetic score: {pos.aesthetic_score:g}")
    if settings.negative_aesthetic_score is not None and neg.aesthetic_score != DEFAULT_NEGATIVE_AESTHETIC_SCORE:
        out.append(f"Negative aesthetic score: {neg.aesthetic_score:g}")
    return out


def _size_field(value: str) -> tuple[int, int]:
    """ "WxH" -> (height, width)."""
    w, h = (int(v) for v in value.split("x"))
    return h, w


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def _settings_fields(line: str) -> dict[str, str]:
    return {m.group(1).strip(): _unquote(m.group(2)) for m in _FIELD.finditer(line)}


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
    "strength": "strength", "precision": "precision", "clip_skip": "clip_skip", "guidance_interval": "guidance_interval",
    "tome": "tome", "deepcache": "deepcache",
    "original_size": "original_size",
    "crop_coords": "crop_coords", "target_size": "target_size", "aesthetic_score": "aesthetic_score",
    "negative_aesthetic_score": "negative_aesthetic_score", "hr_scale": "hr_scale", "hr_resize_x": "hr_resize_x",
    "hr_resize_y": "hr_resize_y", "hr_steps": "hr_steps", "hr_upscaler": "hr_upscaler", "hr_denoising_strength": "hr_denoising_strength",
}
HIRES_FIELDS = ("hr_scale", "hr_resize_x", "hr_resize_y", "hr_steps", "hr_upscaler", "hr_denoising_strength")

# The AUTOMATIC1111 web UI's sampler names -> (ours, what its schedule "Automatic" means for it). Since its 1.9 the
# schedule is a separate `Schedule type`; before, a name could end in " Karras" / " Exponential" and a name without
# one used k-diffusion's default grid, uniform in t (our closest: linspace), or the DDIM grid for DDIM, PLMS and UniPC.
WEBUI_SAMPLERS: dict[str, tuple[str, str]] = {
    "Euler a": ("euler_a", "linspace"),
    "Euler": ("euler", "linspace"),
    "LMS": ("lms", "linspace"),
    "Heun": ("heun", "linspace"),
    "DPM2": ("dpm2", "karras"),
    "DPM++ 2M": ("dpmpp_2m", "karras"),
    "DPM++ SDE": ("dpmpp_sde", "karras"),
    "DPM++ 2M SDE": ("dpmpp_2m_sde", "exponential"),
    "DPM++ 2S a": ("dpmpp_2s_a", "karras"),
    "DPM++ 3M SDE": ("dpmpp_3m_sde", "exponential"),
    "DDIM": ("ddim", "uniform"),
    "PLMS": ("plms", "uniform"),
    "UniPC": ("unipc", "uniform"),
    "DDPM": ("ddpm", "karras"),
}
_TIMESTEP_SAMPLERS = ("DDIM", "PLMS", "UniPC")
# The web UI's `Schedule type` labels we have; others are noted and replaced by the sampler's "Automatic".
WEBUI_SCHEDULES: dict[str, str] = {"Uniform": "linspace", "Karras": "karras", "Exponential": "exponential"}
_NAME_SUFFIXES = ("Karras", "Exponential")  # old combined names, "DPM++ 2M Karras"

# Keys this program reads (or knowingly ignores: names, hashes and versions that do not change the pixels).
KNOWN_KEYS = frozenset({
    "Steps", "Sampler", "Schedule", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model", "VAE hash",
    "VAE", "Eta", "Eta DDIM", "Precision", "Denoising strength", "Clip skip", "Version", "Original size", "Crop coords",
    "Target size", "Aesthetic score", "Negative aesthetic score", "Lora hashes", "TI hashes", "Hires upscale", "Hires resize",
    "Hires steps", "Hires upscaler", "Refiner", "Refiner switch at", "Guidance interval", "Token merging ratio", "DeepCache",
})
# The web UI's default hr_scale (its slider), for a PNG that names a hires upscaler but no scale or resize.
WEBUI_HR_SCALE = 2.0


def webui_sampler(name: str, schedule_type: Optional[str] = None) -> tuple[str, Optional[str], list[str]]:
    """A PNG's `Sampler` (and `Schedule type`) -> (our sampler name, schedule or None for the sampler's own, notes).

    Our own names pass through. A web UI name is mapped by WEBUI_SAMPLERS; one we do not have is returned as
    written (the request then rejects it, naming the nearest sampler, unless --sampler is given).
    """
    if name in SAMPLERS:
        return name, None, []
    base, label = name, schedule_type
    for suffix in _NAME_SUFFIXES:
        if name.endswith(" " + suffix):
            base, label = name[: -len(suffix) - 1], suffix
    if base not in WEBUI_SAMPLERS:
        return name, None, []
    ours, automatic = WEBUI_SAMPLERS[base]
    if label is None:  # before the web UI's 1.9: the name alone says it
        return ours, "uniform" if base in _TIMESTEP_SAMPLERS else "linspace", []
    if label == "Automatic":
        return ours, automatic, []
    if label in WEBUI_SCHEDULES:
        return ours, WEBUI_SCHEDULES[label], []
    return ours, automatic, [f"schedule type {label!r} is not available here: using {automatic} (the web UI's Automatic for {base})"]


@dataclass
class PngSettings:
    """What a PNG's parameters say: request fields, the model options it names, and the rest for notes."""

    path: str
    fields: dict[str, Any] = field(default_factory=dict)
    model_hash: Optional[str] = None
    made_by: str = "txt2img"  # "img2img" when the text has a Denoising strength and no hires fix
    hires: bool = False
    notes: list[str] = field(default_factory=list)  # for the user: settings not used, schedules replaced
    lora_hashes: dict[str, str] = field(default_factory=dict)  # `Lora hashes`: name in the prompt -> short hash
    ti_hashes: dict[str, str] = field(default_factory=dict)  # `TI hashes`: embedding name -> short hash
    refiner: Optional[str] = None  # `Refiner`: the web UI's "NAME [hash]" (microbatch.refiner.find_refiner)
    refiner_switch: Optional[float] = None  # `Refiner switch at`


def parse_lora_hashes(value: str) -> dict[str, str]:
    """`name: 0123456789ab, other: ...` (the web UI's `Lora hashes` value, unquoted) -> {name: hash}."""
    out = {}
    for part in value.split(","):
        name, sep, digest = part.rpartition(":")
        if sep and name.strip() and digest.strip():
            out[name.strip()] = digest.strip()
    return out


def lora_hash_notes(hashes: dict[str, str], lora_dir: Union[str, Path]) -> list[str]:
    """One note naming the LoRAs whose file in `lora_dir` is not the one a PNG was made with (its `Lora hashes`
    differ); missing files are noted by the pipeline when it meets their tags."""
    from microbatch.lora import find_lora, lora_hash

    differ = []
    for name, digest in hashes.items():
        path = find_lora(name, lora_dir)
        if path is not None and not lora_hash(path).startswith(digest.lower()):
            differ.append(f"{name} ({path}: {lora_hash(path)[:len(digest)]}, PNG: {digest})")
    return [f"note: LoRA files differ from those the PNG was made with, the image will too: {'; '.join(differ)}"] if differ else []


def ti_hash_notes(hashes: dict[str, str], embeddings_dir: Union[str, Path]) -> list[str]:
    """One note naming the PNG's embeddings (its `TI hashes`) that `embeddings_dir` lacks or holds in another file:
    the regenerated image will differ (a missing one is read as plain text, as the web UI reads it)."""
    from microbatch.embeddings import embedding_hash, find_embedding_files

    files = {path.stem: path for path in find_embedding_files(embeddings_dir)} if hashes else {}
    missing = [name for name in hashes if name not in files]
    differ = [
        f"{name} ({files[name]}: {embedding_hash(files[name])[:len(digest)]}, PNG: {digest})"
        for name, digest in hashes.items() if name in files and not embedding_hash(files[name]).startswith(digest.lower())
    ]
    notes = []
    if missing:
        notes.append(f"note: embeddings the PNG used are not in --embeddings_dir {embeddings_dir} (their names stay plain text): {', '.join(missing)}")
    if differ:
        notes.append(f"note: embedding files differ from those the PNG was made with, the image will too: {'; '.join(differ)}")
    return notes


def read_png_settings(path: Union[str, Path]) -> PngSettings:
    """Read a PNG written by these scripts or a web UI; one-line UsageError when it has no usable parameters."""
    from PIL import Image

    check_image_file(path, "--from_png")
    with Image.open(path) as im:
        text = im.info.get("parameters")
    if not text:
        raise UsageError(f"{path} has no `parameters` text chunk to regenerate from")
    return png_settings_from_text(text, str(path))


def _hires_values(f: dict[str, str], notes: list[str]) -> dict[str, Any]:
    """The hires fix's request fields from a PNG's `Denoising strength`, `Hires upscale` / `Hires resize: WxH`,
    `Hires steps` and `Hires upscaler` (an upscaler we do not have, e.g. an ESRGAN model, becomes lanczos with a
    note)."""
    from microbatch.hires import WEBUI_UPSCALERS, upscaler_name

    values: dict[str, Any] = {"hr_denoising_strength": float(f["Denoising strength"])}
    resize = (0, 0)
    if "Hires resize" in f:
        resize = tuple(int(v) for v in f["Hires resize"].split("x"))
        if len(resize) != 2:
            raise ValueError(f"Hires resize {f['Hires resize']!r} is not WxH")
    if resize != (0, 0):
        values["hr_resize_x"], values["hr_resize_y"] = resize
    else:
        values["hr_scale"] = float(f.get("Hires upscale", WEBUI_HR_SCALE))
    if "Hires steps" in f:
        values["hr_steps"] = int(f["Hires steps"])
    if "Hires upscaler" in f:
        name = f["Hires upscaler"]
        try:
            values["hr_upscaler"] = upscaler_name(name)
        except ValueError:
            values["hr_upscaler"] = "lanczos"
            notes.append(f"hires upscaler {name!r} is not available here: using Lanczos (we have {', '.join(WEBUI_UPSCALERS)})")
    return values


def png_settings_from_text(text: str, source: str = "the parameters text") -> PngSettings:
    """The request fields a `parameters` text (ours or the web UI's) sets; keys not used are listed in one note.
    `source` names the text in messages. One-line UsageError when it cannot be read."""
    out = PngSettings(source)
    try:
        f = parse_png_parameters(text)
        values: dict[str, Any] = {"prompt": f["prompt"], "negative_prompt": f["negative_prompt"], "steps": int(f["Steps"]), "seed": int(f["Seed"])}
        if "Size" in f:
            values["width"], values["height"] = (int(v) for v in f["Size"].split("x"))
        if "CFG scale" in f:
            values["scale"] = float(f["CFG scale"])
        # The web UI's rule for "Hires fix" when it pastes parameters: a Denoising strength with a hires key.
        hires = "Denoising strength" in f and any(k in f for k in ("Hires upscale", "Hires upscaler", "Hires resize"))
        hires_notes: list[str] = []
        if hires:
            values.update(_hires_values(f, hires_notes))
        elif "Denoising strength" in f:
            values["strength"] = float(f["Denoising strength"])
        if "Clip skip" in f:
            values["clip_skip"] = int(f["Clip skip"])
        if "Guidance interval" in f:
            lo, hi = (float(v) for v in f["Guidance interval"].split())
            values["guidance_interval"] = (lo, hi)
        if "Token merging ratio" in f:
            values["tome"] = float(f["Token merging ratio"])
        if "DeepCache" in f:
            values["deepcache"] = int(f["DeepCache"])
        for key, name in (("Original size", "original_size"), ("Target size", "target_size")):
            if key in f:
                values[name] = _size_field(f[key])
        if "Crop coords" in f:
            top, left = (int(v) for v in f["Crop coords"].split())
            values["crop_coords"] = (top, left)
        for key, name in (("Aesthetic score", "aesthetic_score"), ("Negative aesthetic score", "negative_aesthetic_score")):
            if key in f:
                values[name] = float(f[key])
        if "Refiner" in f:
            out.refiner = f["Refiner"]
            out.refiner_switch = float(f["Refiner switch at"]) if "Refiner switch at" in f else None
        sampler, schedule, notes = webui_sampler(f.get("Sampler", "ddim"), f.get("Schedule type"))
        notes += hires_notes
        eta = f.get("Eta DDIM") if sampler == "ddim" and "Eta DDIM" in f else f.get("Eta")
        values["eta"] = float(eta) if eta is not None else None
    except (KeyError, ValueError) as e:
        raise UsageError(f"{source}: cannot read its parameters ({e})") from None
    values["sampler"] = sampler
    if "Schedule" in f:
        values["schedule"] = f["Schedule"]
    elif schedule is not None:
        values["schedule"] = schedule
    if f.get("Precision") in ("full", "autocast"):
        values["precision"] = f["Precision"]
    out.fields = values
    out.model_hash = f.get("Model hash")
    out.lora_hashes = parse_lora_hashes(f.get("Lora hashes", ""))
    out.ti_hashes = parse_lora_hashes(f.get("TI hashes", ""))
    out.hires = hires
    if "strength" in values and not hires:
        out.made_by = "img2img"
    unused = [f"{key}: {value}" for key, value in f.items() if key not in KNOWN_KEYS and key not in ("prompt", "negative_prompt")]
    if unused:
        notes.append(f"settings not used here: {'; '.join(unused)}")
    out.notes = [f"note: {source}: {text}" for text in notes]
    return out
