"""Reading checkpoint files safely and loading them with a strict, explained key check.

The format is recognised from the first bytes (safetensors, torch zip, legacy pickle), whatever the suffix;
anything else (an image, a web page, a Git LFS pointer) is "not a checkpoint", said before any unpickling.

.ckpt files are unpickled with `torch.load(weights_only=True)`: only tensors and plain containers. Lightning
checkpoints also pickle training objects (callbacks, loop states); those are replaced by inert placeholders that
execute nothing, so the weights still load. Anything else that needs arbitrary code to unpickle is refused.

Streaming loads: tensors are read memory-mapped (safetensors through its header, torch zip files through
`torch.load(mmap=True)`), so reading a file allocates nothing; `load_weights_into` copies them one at a time into
the model's parameters (converting the dtype on the way) and `PageReleaser` drops each copied tensor's file pages
from the process's resident set, so a load peaks at about the model's own bytes, not model + file.
"""
from __future__ import annotations

import ctypes
import json
import logging
import math
import mmap
import pickle
import re
import sys
import zipfile
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch

logger = logging.getLogger(__name__)

# Globals in training checkpoints that only carry bookkeeping. They are rebuilt as inert placeholders.
_PLACEHOLDER_PREFIXES = ("pytorch_lightning.", "lightning.", "lightning_fabric.", "omegaconf.", "numpy.", "_codecs.encode", "collections.")
_MAX_PLACEHOLDERS = 64


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with a message that says why and what to do."""


class _Placeholder:
    """Stands in for a training object in a checkpoint; accepts any construction and state, does nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> "_Placeholder":
        return self


def _placeholder_for(name: str) -> tuple[type, str]:
    module, _, qual = name.rpartition(".")
    cls = type(qual or name, (_Placeholder,), {"__module__": module})
    return cls, name


def _offending_global(message: str) -> Optional[str]:
    m = re.search(r"GLOBAL ([A-Za-z_][\w.]*)", message)
    return m.group(1) if m else None


def _torch_load_restricted(path: Path) -> Any:
    placeholders: list[tuple[type, str]] = []
    # Zip files (torch.save's format since 1.6) are memory-mapped; legacy pickles are read whole.
    use_mmap = zipfile.is_zipfile(path)
    while True:
        try:
            with torch.serialization.safe_globals(placeholders):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
        except pickle.UnpicklingError as e:
            name = _offending_global(str(e))
            if name is None or not name.startswith(_PLACEHOLDER_PREFIXES) or len(placeholders) >= _MAX_PLACEHOLDERS:
                what = f" (it references {name})" if name else ""
                raise CheckpointError(
                    f"refusing to load {path}: unpickling it would run code from the file{what}. Only tensors and "
                    f"plain containers are loaded from .ckpt files. If you trust the file, convert it once with "
                    f"`python scripts/convert_checkpoint.py --trust-pickle {path} OUT.safetensors` and use the output."
                ) from None
            placeholders.append(_placeholder_for(name))


# File signatures of things people mistake for checkpoints, checked before any unpickling (a PNG renamed to .ckpt
# is not a pickle that "would run code").
_NOT_CHECKPOINTS = (
    (b"\x89PNG\r\n\x1a\n", "it is a PNG image"),
    (b"\xff\xd8\xff", "it is a JPEG image"),
    (b"GIF87a", "it is a GIF image"),
    (b"GIF89a", "it is a GIF image"),
    (b"%PDF", "it is a PDF document"),
    (b"\x1f\x8b", "it is a gzip archive"),
    (b"7z\xbc\xaf\x27\x1c", "it is a 7-Zip archive"),
    (b"Rar!", "it is a RAR archive"),
    (b"GGUF", "it is a GGUF file"),
    (b"version https://git-lfs", "it is a Git LFS pointer: the real file was never downloaded (`git lfs pull`)"),
)
FileFormat = Literal["safetensors", "torch-zip", "pickle"]


def _not_a_checkpoint(head: bytes) -> str:
    for magic, what in _NOT_CHECKPOINTS:
        if head.startswith(magic):
            return what
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "it is a WebP image"
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        text = head.decode("ascii").strip()
        first = text.splitlines()[0][:40] if text else ""
        if first.lower().startswith(("<!doctype html", "<html")):
            return "it is an HTML page, perhaps a failed download"
        return f"it is a text file starting {first!r}"
    return f"unrecognised content starting with bytes {head[:8].hex(' ')}"


def sniff_format(path: Union[str, Path]) -> FileFormat:
    """The checkpoint format of `path` from its first bytes, whatever its suffix: "safetensors" (8-byte header
    length, then a JSON header), "torch-zip" (torch.save's zip archive) or "pickle" (legacy torch.save).

    Raises CheckpointError "X is not a checkpoint (it is a PNG image)" for anything else, before unpickling."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return "torch-zip"  # a truncated archive: torch.load says it is corrupted
        if not any(name.endswith("data.pkl") for name in names):
            raise CheckpointError(f"{path} is not a checkpoint (it is a zip archive without PyTorch's data.pkl, holding e.g. {', '.join(names[:3])})")
        return "torch-zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    raise CheckpointError(f"{path} is not a checkpoint ({_not_a_checkpoint(head)})")


def check_readable(path: Union[str, Path]) -> Path:
    """`path` as a Path when it names a non-empty file, else CheckpointError."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint path is not a file: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint file is empty: {path}")
    return path


def _embedding_error(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path} is a textual-inversion embedding ({what}), not a checkpoint")


def read_checkpoint(path: Union[str, Path]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return (state_dict, metadata) of a .ckpt / .pt / .pth / .bin (torch zip or legacy pickle) or .safetensors
    file; the format is recognised from the content, not the suffix. The state dict may be wrapped as
    {"state_dict": ...}; metadata holds `global_step` when present. Files that are no checkpoint at all (an image,
    a text page, an embedding) raise CheckpointError saying what they are."""
    path = check_readable(path)
    fmt = sniff_format(path)
    if fmt == "safetensors":
        try:
            return read_safetensors_mapped(path), {}
        except (OSError, RuntimeError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint file is truncated or corrupted: {path} ({e})") from None
    try:
        obj = _torch_load_restricted(path)
    except CheckpointError:
        raise
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, pickle.UnpicklingError, KeyError) as e:
        raise CheckpointError(f"checkpoint file is truncated or corrupted: {path} ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if isinstance(obj, torch.Tensor):
        raise _embedding_error(path, f"a single tensor of shape {tuple(obj.shape)}")
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    if isinstance(obj.get("string_to_param"), dict):
        raise _embedding_error(path, "string_to_param")
    meta = {k: obj[k] for k in ("global_step", "epoch") if k in obj and isinstance(obj[k], (int, float))}
    state_dict = obj.get("state_dict", obj)
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{path}: 'state_dict' is not a mapping")
    tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors")
    return tensors, meta


# ----------------------------------------------------------------------------------------------------------------
# Memory-mapped reading

# The dtype names of the safetensors format.
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None), "F8_E5M2": getattr(torch, "float8_e5m2", None),
}
_MAX_HEADER = 100 * 2**20


def read_safetensors_mapped(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file as views of a private memory map of it: nothing is read until used.
    ValueError when the header or an offset does not fit the file (truncated or corrupted)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("no header")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _MAX_HEADER):
            raise ValueError(f"header length {n} does not fit the file's {size} bytes")
        header = json.loads(f.read(n))
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else None
    if not isinstance(header, dict):
        raise ValueError("the header is not a mapping")
    base, tensors = 8 + n, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{name}: unknown dtype {info['dtype']}")
        shape, (start, end) = [int(d) for d in info["shape"]], info["data_offsets"]
        numel = math.prod(shape)
        itemsize = torch.empty((), dtype=dtype).element_size()
        if end - start != numel * itemsize or start < 0 or base + end > size:
            raise ValueError(f"{name}: bytes {start}..{end} do not hold {shape} {info['dtype']} in a file of {size} bytes")
        if numel == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
        elif (base + start) % itemsize:  # unaligned (old writers): a copy
            tensors[name] = torch.frombuffer(bytearray(mapped[base + start : base + end]), dtype=dtype).reshape(shape)
        else:
            tensors[name] = torch.frombuffer(mapped, dtype=dtype, count=numel, offset=base + start).reshape(shape)
    return tensors


class PageReleaser:
    """Drops the pages of memory-mapped file tensors from the resident set once they were copied (Linux:
    madvise(MADV_DONTNEED) on the pages of the tensor that lie in a mapping of one of `paths`; the page cache keeps
    them, and a later read maps them again). A no-op for tensors in ordinary memory and on other systems."""

    def __init__(self, paths: list[Union[str, Path, None]]):
        self.ranges: list[tuple[int, int]] = []
        self._madvise = None
        names = {str(Path(p).resolve()) for p in paths if p is not None}
        if not names or not sys.platform.startswith("linux"):
            return
        try:
            self._madvise = ctypes.CDLL(None, use_errno=True).madvise
            with open("/proc/self/maps") as maps:
                for line in maps:
                    fields = line.split(maxsplit=5)
                    if len(fields) == 6 and fields[5].strip() in names:
                        lo, hi = (int(x, 16) for x in fields[0].split("-"))
                        self.ranges.append((lo, hi))
        except (OSError, AttributeError):
            self.ranges = []

    def __call__(self, tensor: torch.Tensor) -> None:
        if not self.ranges or tensor.device.type != "cpu" or tensor.numel() == 0:
            return
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        page = mmap.PAGESIZE
        lo, hi = -(-start // page) * page, end // page * page
        if hi > lo and any(a <= lo and hi <= b for a, b in self.ranges):
            self._madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4)  # MADV_DONTNEED


# ----------------------------------------------------------------------------------------------------------------
# Key checks

_COMPONENTS = {
    "model.diffusion_model.": "UNet",
    "first_stage_model.": "VAE",
    "cond_stage_model.": "text encoder",
}
_BENIGN_UNEXPECTED = (
    re.compile(r".*position_ids$"),
    re.compile(r"^first_stage_model\.loss\."),
    re.compile(r"^model_ema\."),
    re.compile(r"^cond_stage_model\.model\.visual\."),
    re.compile(r"^lvlb_weights$"),
    re.compile(r"^logvar$"),
    re.compile(r"^cond_stage_model\.model\.logit_scale$"),
)


def _component(key: str) -> str:
    for prefix, name in _COMPONENTS.items():
        if key.startswith(prefix):
            return name
    return "other"


def ema_key(key: str) -> str:
    """`model.diffusion_model.input_blocks.0.0.weight` -> `model_ema.diffusion_modelinput_blocks00weight`."""
    return "model_ema." + key[len("model."):].replace(".", "")


def describe_family(state_dict: dict[str, torch.Tensor]) -> Optional[str]:
    """Name the model family that the checkpoint's shapes identify, or None."""
    ctx = state_dict.get("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    conv_in = state_dict.get("model.diffusion_model.input_blocks.0.0.weight")
    parts = []
    if ctx is not None:
        width = ctx.shape[1]
        if width == 768:
            parts.append("Stable Diffusion v1.x (768-wide text context)")
        elif width == 1024:
            parts.append("Stable Diffusion 2.x (1024-wide OpenCLIP text context)")
        elif width == 2048:
            parts.append("Stable Diffusion XL (2048-wide context)")
        else:
            parts.append(f"a model with {width}-wide text context")
    elif any(k.startswith("model.diffusion_model.label_emb") for k in state_dict) or any(k.startswith("conditioner.") for k in state_dict):
        parts.append("Stable Diffusion XL")
    if conv_in is not None and conv_in.shape[1] == 9:
        parts.append("inpainting (9 input channels)")
    if any(k.startswith("cond_stage_model.model.") for k in state_dict) and not parts:
        parts.append("Stable Diffusion 2.x (OpenCLIP text encoder)")
    return ", ".join(parts) if parts else None


def _select_ema(own: dict[str, torch.Tensor], state_dict: dict[str, torch.Tensor], use_ema: bool, source: str) -> None:
    """Put the file's EMA UNet weights (`model_ema.*`) in place of its training weights, in `state_dict`: when
    `use_ema` asks for them, or when the file has no other UNet weights (an EMA-only file)."""
    unet = [k for k in own if k.startswith("model.diffusion_model.")]
    with_ema = [k for k in unet if ema_key(k) in state_dict]
    ema_only = bool(with_ema) and not any(k in state_dict for k in unet)
    if not (use_ema or ema_only):
        return
    if not with_ema:
        logger.info("use_ema is set but %s holds no EMA weights; using its UNet weights", source)
        return
    for key in with_ema:
        state_dict[key] = state_dict.pop(ema_key(key))
    if ema_only and not use_ema:
        logger.info("%s holds its UNet only as EMA weights (model_ema.*): loaded them into %d UNet tensors", source, len(with_ema))
    else:
        logger.info("loaded EMA weights into %d UNet tensors", len(with_ema))


def _take_scale_factor(model: torch.nn.Module, value: float, source: str) -> None:
    """A `scale_factor` tensor in the file (the demo model's measured latent scale; the original's scale_by_std
    buffer) replaces the config's value: it is used, not ignored."""
    config_value = float(model.scale_factor)
    if abs(value - config_value) > 1e-5 * max(abs(config_value), 1e-12):
        logger.info("scale_factor %.6g from %s replaces the config's %.6g", value, source, config_value)
    model.scale_factor = value


def _keep_precise_schedule(model: torch.nn.Module, own: dict[str, torch.Tensor], state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Drop from `state_dict` the model-level schedule buffers (`alphas_cumprod`, ...) that a pruned file stores in
    float16 / bfloat16 when they equal the model's float32 ones (computed from the config) up to that rounding:
    fp16 keeps 3 digits, so a rounded alphas_cumprod would move sigma_max = sqrt((1 - a) / a) by about 0.1%."""
    buffers = {name for name, _ in model.named_buffers() if "." not in name}
    kept = []
    for key in sorted(buffers & set(state_dict)):
        value, mine = state_dict[key], own[key]
        if not (value.is_floating_point() and mine.is_floating_point()) or torch.finfo(value.dtype).bits >= torch.finfo(mine.dtype).bits:
            continue
        if value.shape == mine.shape and torch.allclose(value.float(), mine.float(), rtol=2 * torch.finfo(value.dtype).eps, atol=0):
            del state_dict[key]
            kept.append(key)
    if kept:
        logger.info("%s stores %d schedule buffers in reduced precision; using the float32 values computed from the config", source, len(kept))


def load_weights_into(
    model: torch.nn.Module,
    state_dict: dict[str, torch.Tensor],
    use_ema: bool = False,
    source: str = "checkpoint",
    release: Optional[Any] = None,
) -> None:
    """Load `state_dict` into `model` with a strict check on the UNet, VAE and text-encoder weights.

    Benign differences are logged: extra `position_ids`, VAE `loss.*`, unused `model_ema.*`; schedule buffers
    missing from the file are recomputed from the config. With `use_ema` and EMA keys present, or when the file
    holds its UNet only as `model_ema.*`, the EMA weights are loaded into the UNet. Tensors are cast to the
    model's dtypes (fp16 / bf16 files load into a float32 model), one at a time; `release(tensor)` is called
    after each copy (a `PageReleaser`: memory-mapped sources leave the resident set as they are copied).
    """
    state_dict = dict(state_dict)
    own = model.state_dict()
    _select_ema(own, state_dict, use_ema, source)
    _keep_precise_schedule(model, own, state_dict, source)
    file_scale = state_dict.pop("scale_factor", None) if "scale_factor" not in own and hasattr(model, "scale_factor") else None

    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    # Buffers that the model computes itself (schedule, position ids) may be absent.
    computed = {name for name, _ in model.named_buffers()}
    hard_missing = [k for k in missing if k not in computed]
    hard_unexpected = [k for k in unexpected if not any(p.match(k) for p in _BENIGN_UNEXPECTED)]

    problems = []
    if hard_missing:
        by_part: dict[str, int] = {}
        for k in hard_missing:
            by_part[_component(k)] = by_part.get(_component(k), 0) + 1
        parts = ", ".join(f"{n} {name}" for name, n in sorted(by_part.items()))
        problems.append(f"{len(hard_missing)} weights missing ({parts}), e.g. {', '.join(hard_missing[:3])}")
    if mismatched:
        problems.append(f"{len(mismatched)} weights have the wrong shape, e.g. {'; '.join(mismatched[:3])}")
    if hard_unexpected:
        problems.append(f"{len(hard_unexpected)} unexpected weights, e.g. {', '.join(hard_unexpected[:3])}")
    if problems:
        family = describe_family(state_dict)
        hint = f" The file looks like {family}; pass the matching --config." if family else ""
        if hard_missing and not mismatched and not hard_unexpected and all(_component(k) == "VAE" for k in hard_missing):
            hint = " The file holds no VAE: pass one with --vae."
        raise CheckpointError(f"{source} does not fit the model config: {'; '.join(problems)}.{hint}")

    benign = [k for k in unexpected if k not in hard_unexpected]
    if benign:
        logger.info("ignoring %d extra keys of %s (e.g. %s)", len(benign), source, ", ".join(benign[:3]))
    if missing:
        logger.info("%d buffers absent from %s are computed from the config", len(missing), source)
    if file_scale is not None:
        _take_scale_factor(model, float(file_scale), source)
    # What load_state_dict does (param.copy_ under no_grad), one tensor at a time so each source can be released.
    with torch.no_grad():
        for key, value in state_dict.items():
            if key in own:
                own[key].copy_(value)
                if release is not None:
                    release(value)
