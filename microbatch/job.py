"""A generation job: its work items, their files, the manifest of finished items, and resuming.

A job is a `GenerationRequest` expanded to work items (`request.jobs()`: global index, prompt, negative prompt,
seed + index) in a fixed order. An item's image depends only on the item and the job's settings, never on which
process made it or in which micro-batch, and its file name depends on the item alone:

    OUTDIR/samples/{index:05d}.png          (00000.png, 00001.png, ..., 123456.png)

`OUTDIR/job.json` holds the job's settings (the request, the model hash, precision); `OUTDIR/manifest.jsonl` gets
one JSON line per finished image, appended only after the image file is in place (under an exclusive file lock, so
many processes, also on several machines sharing the folder, may append). `--resume` skips the items whose file is
present with the sha256 its manifest line records, and redoes the rest; a run without `--resume` refuses an outdir
that already holds a job.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from microbatch.engine import ImageJob
from microbatch.images import PARTIAL_PREFIX
from microbatch.loading import file_sha256
from microbatch.request import GenerationRequest, UsageError

logger = logging.getLogger(__name__)

SAMPLE_NAME = "{:05d}.png"
MANIFEST = "manifest.jsonl"
JOB_FILE = "job.json"
# Request fields that change how the work is spread, not what an image is.
NOT_IDENTITY = ("max_batch_size", "max_memory")


def remove_partials(outdir: Path) -> None:
    """Delete the temporary files (`.partial-*.png`) that writers killed while saving left in OUTDIR/samples; call
    it when no writer of the job runs (before the ranks start, after they all finished)."""
    for path in (outdir / "samples").glob(f"{PARTIAL_PREFIX}*.png"):
        path.unlink(missing_ok=True)


def item_path(outdir: Path, index: int) -> Path:
    return outdir / "samples" / SAMPLE_NAME.format(index)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    raise UsageError(f"a job's request must hold paths, not {type(value).__name__} objects (init image or mask)")


def job_settings(request: GenerationRequest, model_hash: str, precision: str, vae_hash: Optional[str] = None) -> dict[str, Any]:
    """What makes a job's images what they are: every request field but batching, the model, VAE and precision."""
    fields = {k: v for k, v in _plain(request).items() if k not in NOT_IDENTITY}
    return {"request": fields, "model_hash": model_hash, "vae_hash": vae_hash, "precision": precision}


def _differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} there, {vb!r} now")
    return out


@dataclass
class ManifestLine:
    index: int
    prompt: str
    negative_prompt: str
    seed: int
    file: str
    sha256: str
    rank: str
    seconds: float


class Manifest:
    """OUTDIR/manifest.jsonl: appended line by line under an exclusive lock; read tolerating a torn last line."""

    def __init__(self, outdir: Path):
        self.outdir = outdir
        self.path = outdir / MANIFEST

    @contextlib.contextmanager
    def _locked(self) -> Iterator[int]:
        """The manifest's file descriptor (opened for appending), held under its exclusive lock."""
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield fd
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def append(self, line: ManifestLine, revoked: Optional[Path] = None) -> bool:
        """Append `line`; False (nothing written) when the file `revoked` exists: the writer's micro-batch was given to
        another (see `revoke`)."""
        data = (json.dumps(dataclasses.asdict(line), ensure_ascii=False) + "\n").encode("utf-8")
        with self._locked() as fd:
            if revoked is not None and revoked.exists():
                return False
            # A writer killed mid-line leaves a torn line; start ours on a line of its own.
            size = os.fstat(fd).st_size
            if size:
                with open(self.path, "rb") as f:
                    f.seek(size - 1)
                    if f.read(1) != b"\n":
                        data = b"\n" + data
            os.write(fd, data)
            os.fsync(fd)
            return True

    def revoke(self, revoked: Path, items: Iterable[ImageJob]) -> list[ImageJob]:
        """Fence a writer that may still be alive (a Ray actor reported dead, its process not yet gone): under the
        lock, create `revoked` (the writer's later appends are refused) and return the `items` it has not recorded.
        Each item is then recorded once: by that writer before the fence, or by whoever redoes it after."""
        with self._locked():
            revoked.parent.mkdir(parents=True, exist_ok=True)
            revoked.touch()
            return items_to_do(self.outdir, items)[0]

    def lines(self) -> list[ManifestLine]:
        if not self.path.is_file():
            return []
        out = []
        for raw in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                out.append(ManifestLine(**json.loads(raw)))
            except (ValueError, TypeError):
                continue  # a torn line of a killed writer
        return out


def check_job_folder(outdir: Path, settings: dict[str, Any], resume: bool) -> None:
    """Refuse an outdir that holds another job, or this one without --resume; record the job's settings."""
    job_file = outdir / JOB_FILE
    if job_file.is_file():
        try:
            stored = json.loads(job_file.read_text(encoding="utf-8"))
        except ValueError:
            raise UsageError(f"{job_file} is not readable JSON: use another --outdir") from None
        diff = _differences(stored, settings)
        if diff:
            raise UsageError(f"{outdir} holds another job ({'; '.join(diff[:3])}{' ...' if len(diff) > 3 else ''}): use another --outdir")
        if not resume:
            raise UsageError(f"{outdir} already holds this job's images: pass --resume to complete it, or use another --outdir")
        return
    if (outdir / MANIFEST).is_file():
        raise UsageError(f"{outdir} has a manifest but no {JOB_FILE}: use another --outdir")
    outdir.mkdir(parents=True, exist_ok=True)
    tmp = job_file.with_name(job_file.name + f".{os.getpid()}.partial")
    tmp.write_text(json.dumps(settings, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, job_file)


def items_to_do(outdir: Path, items: Iterable[ImageJob], verify: bool = True) -> tuple[list[ImageJob], int, int]:
    """(items still to make, items done, files found damaged or unrecorded). An item is done when its file exists and
    its sha256 equals the one its manifest line records."""
    recorded: dict[int, str] = {}
    for line in Manifest(outdir).lines():
        recorded[line.index] = line.sha256
    todo, done, damaged = [], 0, 0
    for item in items:
        path = item_path(outdir, item.index)
        digest = recorded.get(item.index)
        if digest is not None and path.is_file() and (not verify or file_sha256(path) == digest):
            done += 1
            continue
        if path.exists():
            damaged += 1  # redone: the new file replaces it
        todo.append(item)
    return todo, done, damaged
