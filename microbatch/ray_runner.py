"""Running a job on a Ray cluster: actors that load the model once and take micro-batches from the driver.

    python scripts/batch_gen.py --ray local --ray_workers 2 ...        # a Ray instance on this machine
    python scripts/batch_gen.py --ray auto --ray_workers 8 --ray_gpus_per_worker 1 ...   # the running cluster

The driver (the script's process) checks the outdir, records the job and lists what is left exactly as a torchrun
job does (`microbatch.runner.prepare_job`), then keeps one micro-batch in flight per actor and hands the next one
to whichever actor finishes first. Actors write the image files and manifest lines themselves (the outdir must be
shared with the cluster's machines), so the files, the manifest and `--resume` are those of every other run. An
actor that dies loses nothing: its micro-batch goes back to the queue and the driver starts a replacement.

Ray is an optional extra (`pip install -e ".[ray]"`).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any, Callable

from microbatch.engine import ImageJob
from microbatch.job import Manifest
from microbatch.request import GenerationRequest, ModelOptions, UsageError
from microbatch.runner import RankReport

logger = logging.getLogger(__name__)

INSTALL = 'pip install -e ".[ray]"'
# Replacement actors started for dead ones before the job gives up.
MAX_RESTARTS = 3
# Under the outdir while a Ray job runs: one empty file per micro-batch taken from a dead actor.
REVOKED_DIR = ".revoked"


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UsageError(f"--ray needs Ray, which is not installed: {INSTALL}") from None
    return ray


class Worker:
    """A Ray actor's state: a loaded pipeline that makes micro-batches of a job (see `microbatch.runner.run_job`)."""

    def __init__(self, options: ModelOptions, name: str):
        from microbatch.loading import load_model
        from microbatch.pipeline import Pipeline

        self.name = name
        self.pipeline = Pipeline.load(options, loader=load_model)

    def load_seconds(self) -> float:
        return self.pipeline.loaded.load_seconds

    def batch_size(self, request: GenerationRequest, jobs: list[ImageJob]) -> int:
        """The micro-batch size for `request` on this actor's device ("auto" measured, None the default)."""
        if request.max_batch_size == "auto":
            return self.pipeline.measure_batch_size(request)
        return self.pipeline.plan(request, jobs=jobs).settings.max_batch_size

    def make(self, request: GenerationRequest, outdir: str, jobs: list[ImageJob], lease: str) -> RankReport:
        from microbatch.runner import Rank, run_job

        rank = Rank()
        report = run_job(self.pipeline, rank, request, Path(outdir), jobs, revoked=revoked_path(Path(outdir), lease))
        report.name = self.name
        return report

    def cancel(self) -> None:
        self.pipeline.cancel()


def actor_name(worker: str) -> str:
    """The Ray actor name of a worker of this driver (`ray.get_actor(actor_name("worker0"))`): for monitoring tools."""
    return f"microbatch-{os.getpid()}-{worker}"


def revoked_path(outdir: Path, lease: str) -> Path:
    """The file whose existence tells the worker running micro-batch `lease` that its items went to another worker."""
    return outdir / REVOKED_DIR / lease


def connect(address: str, workers: int) -> Any:
    """ray.init: "local" starts a Ray instance on this machine with a CPU per worker; "auto" or an address joins a
    running cluster."""
    ray = import_ray()
    if not ray.is_initialized():
        if address == "local":
            # A local instance listens on the loopback address only.
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False, _node_ip_address="127.0.0.1")
        else:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    return ray


def run_ray_job(
    options: ModelOptions,
    request: GenerationRequest,
    outdir: Path,
    todo: list[ImageJob],
    workers: int,
    gpus_per_worker: float,
    stopped: Callable[[], bool],
    on_note: Callable[[str], None],
) -> tuple[list[RankReport], float]:
    """Make `todo` on `workers` actors; returns the per-actor reports and the longest model load. The micro-batch
    size is the request's, else the first actor's choice for its device. `stopped()` True: no new micro-batches;
    the running ones are cancelled after their current step."""
    ray = import_ray()
    actor_cls = ray.remote(num_cpus=1, num_gpus=gpus_per_worker, max_concurrency=2)(Worker)
    reports: dict[str, RankReport] = {}
    actors: dict[str, Any] = {}
    load_s = 0.0
    started = 0
    job_start = time.perf_counter()

    def start_actor() -> str:
        nonlocal started
        name = f"worker{started}"
        started += 1
        actors[name] = actor_cls.options(name=actor_name(name)).remote(options, name)
        return name

    for _ in range(min(workers, len(todo))):
        start_actor()
    # Every actor loads its model before the clock starts (the load time is reported on its own).
    load_s = max([_get(ray, actor.load_seconds.remote()) for actor in actors.values()], default=0.0)
    batch = request.max_batch_size
    if not isinstance(batch, int):
        batch = _get(ray, actors["worker0"].batch_size.remote(request, todo[:2]))
    job_start = time.perf_counter()
    run_request = dataclasses.replace(request, max_batch_size=batch)
    pending = deque(todo[i : i + batch] for i in range(0, len(todo), batch))
    in_flight: dict[Any, tuple[str, list[ImageJob], float, str]] = {}
    restarts = 0
    cancelled = False
    while pending or in_flight:
        if stopped() and not cancelled:
            cancelled = True
            pending.clear()
            for name, actor in actors.items():
                actor.cancel.remote()
        busy = {entry[0] for entry in in_flight.values()}
        for name in [n for n in actors if n not in busy]:
            if not pending:
                break
            jobs = pending.popleft()
            lease = uuid.uuid4().hex
            in_flight[actors[name].make.remote(run_request, str(outdir), jobs, lease)] = (name, jobs, time.perf_counter() - job_start, lease)
        if not in_flight:
            break
        done, _ = ray.wait(list(in_flight), num_returns=1, timeout=0.5)
        for ref in done:
            name, jobs, submitted, lease = in_flight.pop(ref)
            try:
                report = _get(ray, ref)
            except ray.exceptions.RayActorError as e:
                # The actor died: its micro-batch goes back to the queue, a replacement takes its place.
                restarts += 1
                if restarts > MAX_RESTARTS:
                    raise RuntimeError(f"Ray workers died {restarts} times (last: {name}: {e}); --resume completes the job") from None
                # What it finished before dying is in the manifest: only the rest goes back. Ray can report the
                # death before the process is gone; the fence keeps it from recording an item given to another.
                left = Manifest(outdir).revoke(revoked_path(outdir, lease), jobs)
                on_note(f"note: Ray {name} died; {len(left)} of its {len(jobs)} images go to another worker")
                actors.pop(name, None)
                if left:
                    pending.appendleft(left)
                start_actor()
                continue
            merged = reports.setdefault(name, RankReport(name))
            merged.images += report.images
            merged.busy_s += report.busy_s
            merged.per_image_s += report.per_image_s
            merged.peak_memory_mb = max(merged.peak_memory_mb, report.peak_memory_mb)
            merged.peak_memory_kind = report.peak_memory_kind
            merged.peak_memory_load_mb = max(merged.peak_memory_load_mb or 0.0, report.peak_memory_load_mb or 0.0) or None
            merged.interrupted |= report.interrupted
            if merged.first_image_s is None and report.first_image_s is not None:
                merged.first_image_s = submitted + report.first_image_s
    wall = time.perf_counter() - job_start
    # The fences outlive the dead actors' processes (Ray has long ended them by now).
    shutil.rmtree(outdir / REVOKED_DIR, ignore_errors=True)
    for report in reports.values():
        report.wall_s = wall
    return list(reports.values()), load_s


def _get(ray: Any, ref: Any) -> Any:
    """ray.get, with an actor's own error (bad checkpoint, bad input) raised here as it would be in one process."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, ValueError):
            raise UsageError(str(cause)) from None
        raise RuntimeError(str(cause or e)) from None
