"""Textual-inversion embeddings: the AUTOMATIC1111 web UI's and diffusers' files, loaded into a model's text encoder.

    from microbatch.embeddings import load_embeddings
    load_embeddings(model, "embeddings/")          # a folder (searched recursively) or one file
    # -> ["my-style", ...]; a prompt that says "a cat, my-style" now gets my-style's vectors

Files (the format is read from the content; the suffix only selects candidates in a folder, as the web UI does):
- `.pt` / `.bin` of the web UI (and the original textual-inversion code): {"string_to_param": {"*": [n, C]}, "name",
  "step", "sd_checkpoint", "sd_checkpoint_name", ...}; an old `torch.nn.ParameterDict` there is read as its dict.
- diffusers' `learned_embeds.bin` / `.safetensors`: {token: [C] or [n, C]}; the web UI's `.safetensors`
  {"emb_params": [n, C]}; also a file holding one bare tensor.
An embedding's name is its file's stem; a prompt (or negative prompt) uses it where the name's tokens appear, as in
the web UI, with the weight of the text around it (`(my-style:1.2)`). Its width must be the text encoder's (768 for
SD 1.x, 1024 for SD 2.x's OpenCLIP): another width is skipped with a warning naming the file (the web UI's
"skipped" list). SDXL models take the web UI's SDXL files ({"clip_l": [n, 768], "clip_g": [n, 1280]}): each part
goes into its own text encoder (the refiner's bigG takes clip_g); SD 1.x / 2.x files are skipped on SDXL and SDXL
files on SD 1.x / 2.x, with the same warning.

In a folder, a file that cannot be read (not an embedding, several terms, truncated, pickled code) is a warning and
is skipped, as the web UI skips it; a prompt that then names it is a one-line error (`EmbeddingFileError`), since
the image would silently differ from what was asked. A file given alone to `load_embeddings` raises at once.
.pt / .bin files are unpickled with `torch.load(weights_only=True)`: tensors and plain containers only.

`TI hashes` (the parameters text): `name: first 12 hex digits of the file's sha256` for each embedding an image
used, as the web UI writes it.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from ldm.modules.encoders.embeddings import MAX_VECTORS, EmbeddingTable
from ldm.modules.encoders.modules import LongPromptEncoder

logger = logging.getLogger(__name__)

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")
DEFAULT_EMBEDDINGS_DIR = "embeddings"


class EmbeddingFileError(ValueError):
    """An embedding file that cannot be used, or a prompt naming one; the message is one line."""


@dataclass(frozen=True)
class EmbeddingFile:
    """What one file holds. `vectors` [n, C] float32 (None for an SDXL clip_g/clip_l file, whose `parts` hold
    {"clip_l": [n, 768], "clip_g": [n, 1280]}); `width` is C (for SDXL clip_g's plus clip_l's, as the web UI counts
    it); step and checkpoint fields as the web UI saves them."""

    name: str
    path: Path
    vectors: Optional[torch.Tensor]
    width: int
    count: int
    step: Optional[int] = None
    sd_checkpoint: Optional[str] = None
    sd_checkpoint_name: Optional[str] = None
    from_folder: bool = False
    parts: Optional[dict[str, torch.Tensor]] = None

    def api(self) -> dict[str, Any]:
        """The web UI's /sdapi/v1/embeddings record."""
        return {
            "step": self.step, "sd_checkpoint": self.sd_checkpoint, "sd_checkpoint_name": self.sd_checkpoint_name,
            "shape": self.width, "vectors": self.count,
        }


# ----------------------------------------------------------------------------------------------------------------
# Reading one file


class _ParameterDictState:
    """Stands in for torch.nn.ParameterDict while unpickling old embedding files: keeps its `_parameters` dict and
    executes nothing."""

    def __setstate__(self, state: Any) -> None:
        params = state.get("_parameters", {}) if isinstance(state, dict) else {}
        self._parameters = dict(params)


def _unpickle(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals([(_ParameterDictState, "torch.nn.modules.container.ParameterDict")]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "GLOBAL" in text or "Unsupported global" in text:
            raise EmbeddingFileError(f"refusing to read embedding {path}: unpickling it would run code from the file") from None
        detail = text.split("WeightsUnpickler error:", 1)[-1].strip() if "WeightsUnpickler error:" in text else text
        raise EmbeddingFileError(f"embedding file is truncated or corrupted: {path} ({_first_line(Exception(detail))})") from None
    except Exception as e:  # noqa: BLE001 - damaged pickles fail in many ways (IndexError, EOFError, zip errors...)
        raise EmbeddingFileError(f"embedding file is truncated or corrupted: {path} ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _plain(value: Any, kind: type) -> Any:
    return value if isinstance(value, kind) and not isinstance(value, bool) else None


def read_embedding(path: Union[str, Path], name: Optional[str] = None) -> EmbeddingFile:
    """One embedding file -> EmbeddingFile named `name` (default: the file's stem). EmbeddingFileError (one line)
    when it is no embedding: several terms, no tensor, a tensor of more than 2 dimensions or MAX_VECTORS rows, not
    floating point or not finite."""
    from ldm.checkpoint import CheckpointError, check_readable, sniff_format

    path = Path(path)
    name = path.stem if name is None else name
    try:
        check_readable(path)
        fmt = sniff_format(path)
    except CheckpointError as e:
        raise EmbeddingFileError(f"embedding {path}: {str(e).replace('checkpoint', 'embedding file')}") from None
    if fmt == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            data: Any = load_file(str(path))
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise EmbeddingFileError(f"embedding file is truncated or corrupted: {path} ({_first_line(e)})") from None
    else:
        data = _unpickle(path)

    def fail(why: str) -> EmbeddingFileError:
        return EmbeddingFileError(f"{path} is not a textual-inversion embedding: {why}")

    meta = data if isinstance(data, dict) else {}
    if isinstance(data, torch.Tensor):
        tensor = data
    elif isinstance(data, dict) and "string_to_param" in data:
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)  # an old nn.ParameterDict
        if not isinstance(params, dict) or len(params) != 1:
            count = len(params) if isinstance(params, dict) else type(params).__name__
            raise fail(f"its string_to_param holds {count} terms (an embedding has exactly one)")
        tensor = next(iter(params.values()))
    elif isinstance(data, dict) and "clip_g" in data and "clip_l" in data:
        parts = {}
        for key in ("clip_l", "clip_g"):
            part = data[key]
            if not isinstance(part, torch.Tensor):
                raise fail("its clip_g / clip_l are not tensors")
            parts[key] = _checked_vectors(part, fail)
        if parts["clip_l"].shape[0] != parts["clip_g"].shape[0]:
            raise fail(f"its clip_l has {parts['clip_l'].shape[0]} vectors and its clip_g {parts['clip_g'].shape[0]}")
        g, l = parts["clip_g"], parts["clip_l"]
        return EmbeddingFile(name, path, None, int(g.shape[1] + l.shape[1]), int(g.shape[0]), parts=parts)
    elif isinstance(data, dict) and data and all(isinstance(v, torch.Tensor) for v in data.values()):
        if len(data) != 1:
            raise fail(f"it holds {len(data)} tensors ({', '.join(list(data)[:4])}...); an embedding file holds one")
        tensor = next(iter(data.values()))
    else:
        raise fail("no string_to_param (web UI), clip_g / clip_l (SDXL) or single tensor (diffusers)")
    if not isinstance(tensor, torch.Tensor):
        raise fail(f"its vectors are a {type(tensor).__name__}, not a tensor")
    vectors = _checked_vectors(tensor, fail)
    return EmbeddingFile(
        name, path, vectors, int(vectors.shape[1]), int(vectors.shape[0]), _plain(meta.get("step"), int),
        _plain(meta.get("sd_checkpoint"), str), _plain(meta.get("sd_checkpoint_name"), str),
    )


def _checked_vectors(tensor: torch.Tensor, fail: Any) -> torch.Tensor:
    """[n, C] float32 vectors of a tensor ([C] is one vector); `fail(why)` makes the error for anything else."""
    vectors = tensor.detach().to("cpu")
    if vectors.ndim == 1:
        vectors = vectors.unsqueeze(0)
    if vectors.ndim != 2 or not vectors.is_floating_point():
        raise fail(f"its tensor is {vectors.dtype} {tuple(tensor.shape)}, not [vectors, width] floats")
    if not 1 <= vectors.shape[0] <= MAX_VECTORS:
        raise fail(f"it has {vectors.shape[0]} vectors; 1 to {MAX_VECTORS} fit in a prompt chunk")
    vectors = vectors.float()
    if not bool(torch.isfinite(vectors).all()):
        raise fail("its vectors hold values that are not finite")
    return vectors


def find_embedding_files(folder: Union[str, Path]) -> list[Path]:
    """The candidate files under `folder`, recursively (links followed), sorted: .pt, .bin, .safetensors (any
    case), empty files left out as the web UI leaves them out. [] when the folder does not exist."""
    root = Path(folder)
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in EMBEDDING_SUFFIXES and path.is_file() and path.stat().st_size > 0:
            found.append(path)
    return found


def embedding_hash(path: Union[str, Path]) -> str:
    """sha256 hex of the whole file (the web UI's embedding hash), remembered per (file, size, mtime)."""
    path = Path(path)
    stat = path.stat()
    return _sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _sha256(name: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(name, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Loading into a model


def text_encoders(model: Any) -> list[tuple[LongPromptEncoder, Optional[str]]]:
    """The model's text encoders that take embeddings, each with the part of an SDXL file it takes: SD 1.x / 2.x
    [(encoder, None)]; SDXL base [(CLIP ViT-L, "clip_l"), (OpenCLIP bigG, "clip_g")], the refiner [(bigG,
    "clip_g")], as the web UI. One-line ValueError for other encoders."""
    from microbatch.prompts import is_sdxl

    if is_sdxl(model):
        found = []
        for embedder in model.conditioner.embedders:
            if isinstance(embedder, LongPromptEncoder):
                found.append((embedder, "clip_g" if hasattr(embedder, "model") else "clip_l"))
        if not found:
            raise ValueError("this SDXL model has no CLIP text encoder to take textual-inversion embeddings")
        return found
    encoder = getattr(model, "cond_stage_model", model)
    if not isinstance(encoder, LongPromptEncoder):
        raise ValueError(f"this model's text encoder ({type(encoder).__name__}) takes no textual-inversion embeddings (needs CLIP / OpenCLIP)")
    return [(encoder, None)]


def text_encoder(model: Any) -> LongPromptEncoder:
    """The first of `text_encoders(model)`: the one whose table names and lists the loaded embeddings (every
    encoder of an SDXL model loads the same names)."""
    return text_encoders(model)[0][0]


@dataclass
class LoadReport:
    """What loading files did: names loaded, names skipped for their width (-> message), unreadable files
    (name -> one-line message)."""

    loaded: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)

    def messages(self) -> list[str]:
        return [f"warning: {m}" for m in self.skipped.values()] + [f"warning: {m}; skipped" for m in self.broken.values()]


def _add(encoders: list[tuple[LongPromptEncoder, Optional[str]]], record: EmbeddingFile, report: LoadReport) -> None:
    """Load `record` into every encoder (its vectors, or for SDXL its clip_l / clip_g part), or into none: a
    file that does not fit one of them is skipped whole."""
    chosen = []
    for encoder, part in encoders:
        table = encoder.embeddings()
        if part is None:
            vectors = record.vectors
            fits = vectors is not None and record.width == table.width
            kind = "an SDXL embedding (clip_g / clip_l)" if vectors is None else f"width {record.width}"
            wanted = f"this model's text encoder takes width {table.width}"
        else:
            vectors = None if record.parts is None else record.parts[part]
            fits = vectors is not None and vectors.shape[1] == table.width
            kind = f"an SD 1.x / 2.x embedding (width {record.width})" if record.parts is None else f"of {part} width {vectors.shape[1]}"
            wanted = f"this SDXL model takes clip_l / clip_g files ({part} width {table.width})"
        if not fits:
            report.skipped[record.name] = f"embedding {record.path} is {kind}; {wanted}: skipped"
            for other, _ in encoders:
                other.embeddings().remove(record.name)
                other.embeddings().skipped[record.name] = record
            return
        chosen.append((encoder, table, vectors))
    for encoder, table, vectors in chosen:
        table.skipped.pop(record.name, None)
        table.add(record.name, encoder.tokenizer.encode(record.name), vectors, info=record)
    report.loaded.append(record.name)


def _load_files(encoders: list[tuple[LongPromptEncoder, Optional[str]]], files: Sequence[Path], from_folder: bool) -> LoadReport:
    encoder = encoders[0][0]
    report = LoadReport()
    for path in files:
        try:
            record = read_embedding(path)
            if not encoder.tokenizer.encode(record.name):
                raise EmbeddingFileError(f"embedding {path}: its name {record.name!r} has no tokens a prompt could use")
        except EmbeddingFileError as e:
            report.broken[path.stem] = str(e)
            continue
        if from_folder:
            record = EmbeddingFile(**{**record.__dict__, "from_folder": True})
        _add(encoders, record, report)
    report.loaded = sorted(dict.fromkeys(report.loaded), key=str.lower)
    return report


def load_embeddings(model: Any, path: Union[str, Path]) -> list[str]:
    """Load an embedding file, or every .pt / .bin / .safetensors file under a folder, into `model`'s text encoder
    (a LatentDiffusion model or the encoder itself). Returns the names loaded, sorted as the web UI lists them.

    A name already loaded is replaced. A wrong width is a warning naming the file (and the name is listed as
    skipped). A file given alone that cannot be read raises EmbeddingFileError; in a folder such a file is a
    warning and is skipped."""
    encoders = text_encoders(model)
    path = Path(path)
    if path.is_dir():
        report = _load_files(encoders, find_embedding_files(path), from_folder=False)
    elif path.exists():
        report = _load_files(encoders, [path], from_folder=False)
        if report.broken:
            raise EmbeddingFileError(next(iter(report.broken.values())))
    else:
        raise EmbeddingFileError(f"no embedding file or folder at {path}")
    for message in report.messages():
        logger.warning("%s", message.removeprefix("warning: "))
    return report.loaded


@dataclass(frozen=True)
class _FolderState:
    signature: tuple
    broken: dict[str, str]


def sync_embeddings_dir(model: Any, folder: Union[str, Path]) -> list[str]:
    """Make the embeddings loaded from a folder those of `folder` now (a run's `--embeddings_dir`): nothing to do
    when its files are the ones last loaded (same paths, sizes and modification times); otherwise what the previous
    folder loaded is dropped and the folder is loaded again. Embeddings loaded by `load_embeddings` stay. Returns
    warnings for the user (wrong widths, unreadable files), only when the folder was (re)loaded."""
    encoders = text_encoders(model)
    files = find_embedding_files(folder)
    signature = (str(Path(folder).resolve()), tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    table = encoders[0][0].embeddings()
    if isinstance(table.source, _FolderState) and table.source.signature == signature:
        return []
    for encoder, _ in encoders:
        each = encoder.embeddings()
        for name, entry in list(each.entries.items()):
            if getattr(entry.info, "from_folder", False):
                each.remove(name)
        for name, record in list(each.skipped.items()):
            if getattr(record, "from_folder", False):
                del each.skipped[name]
    report = _load_files(encoders, files, from_folder=True)
    table.source = _FolderState(signature, dict(report.broken))
    if report.loaded:
        logger.info("textual-inversion embeddings loaded from %s (%d): %s", folder, len(report.loaded), ", ".join(report.loaded))
    return report.messages()


def loaded_embeddings(model: Any) -> tuple[dict[str, EmbeddingFile], dict[str, EmbeddingFile]]:
    """(loaded, skipped): name -> EmbeddingFile, loaded sorted as the web UI lists them. Both empty for a model
    that takes no embeddings."""
    try:
        encoder = text_encoder(model)
    except ValueError:
        return {}, {}
    table = encoder.embedding_table
    if table is None:
        return {}, {}
    loaded = {name: entry.info for name, entry in sorted(table.entries.items(), key=lambda kv: kv[0].lower())}
    return loaded, dict(table.skipped)


# ----------------------------------------------------------------------------------------------------------------
# Prompts


def _prompt_texts(prompt: str, steps: int) -> list[str]:
    """Every text a prompt's conditioning encodes: its AND parts at each of their scheduled steps."""
    from microbatch.prompts import get_learned_conditioning_prompt_schedules, get_multicond_prompt_list

    _, parts, _ = get_multicond_prompt_list([prompt])
    texts: dict[str, None] = {}
    for schedule in get_learned_conditioning_prompt_schedules(parts, steps):
        for _, text in schedule:
            texts.setdefault(text, None)
    return list(texts)


def _fragments(text: str) -> list[list]:
    from microbatch.prompts import parse_prompt_attention

    return parse_prompt_attention(text)


def embeddings_used(model: Any, prompts: Sequence[str], steps: int) -> list[str]:
    """Names of the loaded embeddings that `prompts` use (in the web UI's prompt language, `steps` prompt steps for
    its scheduling), in order of first use. [] when the model has none."""
    try:
        encoder = text_encoder(model)
    except ValueError:
        return []
    table = encoder.embedding_table
    if not table:
        return []
    names: dict[str, None] = {}
    for prompt in prompts:
        for text in _prompt_texts(prompt, steps):
            chunks = encoder.tokenize_weighted(_fragments(text))
            for name in table.names_in(chunks.tokens):
                names.setdefault(name, None)
    return list(names)


def check_prompts_for_broken(model: Any, prompts: Sequence[str], steps: int) -> None:
    """EmbeddingFileError naming the file when a prompt uses the name of a file in the embeddings folder that could
    not be read (and was skipped with a warning)."""
    try:
        encoder = text_encoder(model)
    except ValueError:
        return
    table = encoder.embedding_table
    if table is None or not isinstance(table.source, _FolderState):
        return
    broken = {n: m for n, m in table.source.broken.items() if n not in table.entries}
    if not broken:
        return
    probe = EmbeddingTable(table.vocab_size, 1)
    for name in broken:
        ids = encoder.tokenizer.encode(name)
        if ids:
            probe.add(name, ids, torch.zeros(1, 1))
    for prompt in prompts:
        for text in _prompt_texts(prompt, steps):
            for fragment, _ in _fragments(text):
                for item in probe.substitute(encoder.tokenizer.encode(fragment)):
                    if isinstance(item, tuple):
                        name = probe.names_in([item])[0]
                        raise EmbeddingFileError(f"the prompt uses embedding {name!r}, whose file cannot be used: {broken[name]}")


def ti_hashes(model: Any, names: Sequence[str]) -> str:
    """The web UI's `TI hashes` value for embeddings used: `name: first 12 hex of the file's sha256, ...`, names
    without ':' and ',', each once."""
    loaded, _ = loaded_embeddings(model)
    parts = []
    for name in dict.fromkeys(names):
        record = loaded.get(name)
        clean = name.replace(":", "").replace(",", "")
        if record is not None and clean:
            parts.append(f"{clean}: {embedding_hash(record.path)[:12]}")
    return ", ".join(parts)
