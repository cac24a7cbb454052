"""Running a job in one process or many: torchrun ranks take micro-batches from a shared queue.

One process: the items still to do are taken in order, `batch` at a time. Under torchrun (WORLD_SIZE > 1), every
rank loads the model once (on `cuda:LOCAL_RANK`, or the CPU with its own thread count) and claims the next
`batch` items from a counter in torch.distributed's key-value store (the rendezvous store: `store.add` is atomic),
so a faster rank takes more micro-batches and the job ends with its last item. Ranks coordinate only through
torch.distributed (a gloo process group for the start and the end, the store for the queue).

Files and manifest: `microbatch.job`. Rank 0 checks the outdir, records the job and works out what is left; it
broadcasts that list so every rank claims from the same one. A rank that cannot see rank 0's files (an outdir
that is not shared between machines) stops the job at the start.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional

import torch

from microbatch.engine import ImageJob
from microbatch.images import save_png_atomic
from microbatch.job import Manifest, ManifestLine, SAMPLE_NAME, check_job_folder, items_to_do, remove_partials
from microbatch.loading import file_sha256
from microbatch.metrics import RunMetrics
from microbatch.pipeline import GeneratedImage, Pipeline
from microbatch.request import GenerationRequest, UsageError

logger = logging.getLogger(__name__)


class JobStopped(Exception):
    """This rank must stop with `code` (another rank reported the error)."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


@dataclass
class Rank:
    """Where this process stands in the job: rank, world size, local rank, and the store when distributed."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    store: Any = None
    restart: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def name(self) -> str:
        return f"rank{self.rank}"


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def leave_rank_process(code: int) -> NoReturn:
    """End a torchrun rank's process with `code` once its work is recorded and its process group destroyed, without
    the interpreter's teardown: there, torch's process-group objects (threads included) are destroyed with the
    interpreter, which once aborted a rank whose job had finished (SIGABRT, "terminate called without an active
    exception", seen in CI after a restarted job), and torchrun then reports the finished job as failed."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(code)


def init_rank(timeout_s: float = 1800.0) -> Rank:
    """Join the torchrun group (gloo) when WORLD_SIZE > 1; else a single-process Rank."""
    if not launched_by_torchrun():
        return Rank()
    import datetime

    import torch.distributed as dist

    env = os.environ
    restart = int(env.get("TORCHELASTIC_RESTART_COUNT", 0))
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # The agent's store outlives a restart of the ranks, and the process group's keys do not name the
            # attempt: a restarted rank could read a dead rank's address and fail to connect. Each attempt gets
            # its own prefix.
            base = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world, is_master=False, timeout=timeout)
            store = dist.PrefixStore(f"microbatch/{env.get('TORCHELASTIC_RUN_ID', 'run')}/attempt{restart}/", base)
            dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
        else:
            dist.init_process_group("gloo", timeout=timeout)
    # The process group's store is the rendezvous store torchrun set up (torch has no public getter for it).
    store = dist.distributed_c10d._get_default_store()
    return Rank(dist.get_rank(), dist.get_world_size(), int(env.get("LOCAL_RANK", 0)), int(env.get("LOCAL_WORLD_SIZE", 1)), store, restart)


def rank_device(rank: Rank, requested: str) -> str:
    """cuda:LOCAL_RANK for a distributed run on a GPU machine with --device auto / cuda; else what was asked."""
    if rank.distributed and requested in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{rank.local_rank % torch.cuda.device_count()}"
    if rank.distributed and requested == "auto":
        return "cpu"
    return requested


def set_cpu_threads(rank: Rank) -> int:
    """Each CPU rank gets its share of the cores unless OMP_NUM_THREADS says otherwise."""
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    threads = max(1, (os.cpu_count() or 1) // max(1, rank.local_world_size))
    torch.set_num_threads(threads)
    return threads


class Queue:
    """Item positions in the list of items to do: claim(n) -> (start, stop) or None when all are taken."""

    def __init__(self, total: int, store: Any = None, key: str = "queue"):
        self.total = total
        self.store = store
        self.key = key
        self._next = 0

    def claim(self, n: int) -> Optional[tuple[int, int]]:
        if self.store is not None:
            start = int(self.store.add(self.key, n)) - n
        else:
            start, self._next = self._next, self._next + n
        if start >= self.total:
            return None
        return start, min(self.total, start + n)


@dataclass
class RankReport:
    """One rank's share of the job, for the totals rank 0 prints."""

    name: str
    images: int = 0
    wall_s: float = 0.0
    busy_s: float = 0.0
    first_image_s: Optional[float] = None
    peak_memory_mb: float = 0.0
    peak_memory_kind: str = ""
    peak_memory_load_mb: Optional[float] = None
    per_image_s: list = field(default_factory=list)
    interrupted: bool = False

    @property
    def idle_fraction(self) -> float:
        return max(0.0, 1.0 - self.busy_s / self.wall_s) if self.wall_s > 0 else 0.0


def _broadcast(rank: Rank, value: Any) -> Any:
    if not rank.distributed:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(rank: Rank, value: Any) -> list:
    if not rank.distributed:
        return [value]
    import torch.distributed as dist

    out: list = [None] * rank.world_size
    dist.all_gather_object(out, value)
    return out


def prepare_job(rank: Rank, outdir: Path, request: GenerationRequest, settings: dict[str, Any], resume: bool, on_note: Callable[[str], None]) -> list[ImageJob]:
    """Rank 0 checks and records the job and lists what is left; every rank gets the same list (or the error)."""
    token = uuid.uuid4().hex
    message: Any = None
    if rank.rank == 0:
        try:
            check_job_folder(outdir, settings, resume or rank.restart > 0)
            remove_partials(outdir)  # of writers killed in an earlier run; no rank writes before the broadcast below
            items = request.jobs()
            todo, done, damaged = items_to_do(outdir, items)
            if done or damaged:
                on_note(f"resuming: {done} of {len(items)} images done, {len(todo)} to make" + (f" ({damaged} damaged or unrecorded files redone)" if damaged else ""))
            (outdir / f".rank0-{token}").write_text(token)
            message = ("ok", [item.index for item in todo], token)
        except UsageError as e:
            message = ("error", str(e), token)
    status, payload, token = _broadcast(rank, message)
    if status == "error":
        if rank.rank == 0:
            raise UsageError(payload)
        raise JobStopped(2)
    # Every rank must see rank 0's files: the outdir is shared, or the job would be scattered over machines.
    visible = (outdir / f".rank0-{token}").is_file()
    views = gather(rank, (rank.name, visible, os.uname().nodename))
    if rank.rank == 0:
        (outdir / f".rank0-{token}").unlink(missing_ok=True)
    blind = [f"{name} on {host}" for name, ok, host in views if not ok]
    if blind:
        if rank.rank == 0:
            raise UsageError(f"--outdir {outdir} is not shared between the ranks: {', '.join(blind)} cannot see rank 0's files; use a shared file system")
        raise JobStopped(2)
    by_index = {item.index: item for item in request.jobs()} if payload else {}
    return [by_index[i] for i in payload]


def run_job(
    pipeline: Pipeline,
    rank: Rank,
    request: GenerationRequest,
    outdir: Path,
    todo: list[ImageJob],
    callback: Optional[Callable] = None,
    save_images: bool = True,
    should_stop: Optional[Callable[[], bool]] = None,
    revoked: Optional[Path] = None,
) -> RankReport:
    """Claim micro-batches of `todo` until none is left (or the pipeline is cancelled), saving each image under its
    item's name and appending its manifest line (`save_images` False: neither, for speed measurements).
    `should_stop()` is asked before each claim: a stop request (a signal) that arrives between two micro-batches,
    when no `generate` call is running to cancel, still ends the job. Once the file `revoked` exists (the driver
    gave this call's items to another worker) no more manifest lines are appended."""
    samples = outdir / "samples"
    manifest = Manifest(outdir)
    batch = request.max_batch_size
    if batch == "auto":
        batch = pipeline.measure_batch_size(request)
    elif batch is None:
        batch = pipeline.plan(request, jobs=todo[:1]).settings.max_batch_size
    run_request = dataclasses.replace(request, max_batch_size=batch)
    queue = Queue(len(todo), rank.store, key=f"microbatch/queue/{rank.restart}")
    report = RankReport(rank.name)
    start = time.perf_counter()
    last = start

    def save(image: GeneratedImage) -> None:
        nonlocal last
        if save_images:
            path = save_png_atomic(image.array, samples, image.job.index, SAMPLE_NAME, text={"parameters": image.parameters}, replace=True)
            job = image.job
            line = ManifestLine(job.index, job.prompt, job.negative_prompt, job.seed, f"samples/{path.name}", file_sha256(path), rank.name, round(time.perf_counter() - last, 4))
            manifest.append(line, revoked)
        now = time.perf_counter()
        last = now
        if report.first_image_s is None:
            report.first_image_s = now - start

    while True:
        if should_stop is not None and should_stop():
            report.interrupted = True
            break
        claim = queue.claim(batch)
        if claim is None:
            break
        t0 = time.perf_counter()
        last = t0
        result = pipeline.generate(run_request, on_image=save, callback=callback, jobs=todo[claim[0] : claim[1]])
        report.busy_s += time.perf_counter() - t0
        report.images += len(result.images)
        report.per_image_s += result.metrics.per_image_s
        report.peak_memory_mb = max(report.peak_memory_mb, result.metrics.peak_memory_mb)
        report.peak_memory_kind = result.metrics.peak_memory_kind
        report.peak_memory_load_mb = result.metrics.peak_memory_load_mb
        if result.interrupted:
            report.interrupted = True
            break
    report.wall_s = time.perf_counter() - start
    return report


def job_metrics(reports: list[RankReport], load_s: float, settings: dict[str, Any], wall_s: float) -> RunMetrics:
    """The job's totals as RunMetrics (the scripts' report and JSON), with a per-rank table in `ranks`."""
    images = sum(r.images for r in reports)
    metrics = RunMetrics(device=settings.get("device", ""), model_load_s=load_s, images=images, sampling_s=wall_s)
    firsts = [r.first_image_s for r in reports if r.first_image_s is not None]
    metrics.first_image_s = min(firsts) if firsts else None
    metrics.per_image_s = [t for r in reports for t in r.per_image_s]
    metrics.peak_memory_mb = max((r.peak_memory_mb for r in reports), default=0.0)
    metrics.peak_memory_kind = next((r.peak_memory_kind for r in reports if r.peak_memory_kind), "")
    metrics.peak_memory_sampling_mb = metrics.peak_memory_mb
    loads = [r.peak_memory_load_mb for r in reports if r.peak_memory_load_mb is not None]
    metrics.peak_memory_load_mb = max(loads) if loads else None
    metrics.interrupted = any(r.interrupted for r in reports)
    metrics.settings = settings
    metrics.ranks = [
        {"rank": r.name, "images": r.images, "wall_s": round(r.wall_s, 3), "busy_s": round(r.busy_s, 3),
         "images_per_s": round(r.images / r.wall_s, 4) if r.wall_s > 0 else None, "idle_fraction": round(r.idle_fraction, 4),
         "first_image_s": r.first_image_s, "peak_memory_mb": r.peak_memory_mb}
        for r in reports
    ]
    return metrics
