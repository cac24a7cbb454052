"""The server's generation tasks: each in a thread of its own, admitted first come, first served.

HTTP handlers submit a task (a function of a `TaskControl`) and await its future. A task waits in the
scheduler's queue until its first micro-batch is admitted (`microbatch.server.scheduler`); the number of tasks
waiting so is bounded (`QueueFull` beyond `max_queue`, answered with HTTP 503). Admitted tasks run at the same
time, their rows sharing UNet calls.

A task runs a request one `n_iter` batch at a time. The web UI stops "the" running job; here several may run, so
`skip()` and `interrupt()` act on every running (admitted) task: skip stops each one's batch in progress (after its
current sampler step) and the task goes on with its next batch; interrupt also drops its remaining batches. Either
way the images finished so far are answered. Waiting tasks are not touched. `disconnect(control)` stops one task
whose client went away: its rows leave at their next UNet submission, or it leaves the queue.
"""
from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from microbatch.pipeline import Pipeline, Progress

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """More tasks are waiting than the server accepts."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new tasks."""


@dataclass
class TaskControl:
    """What the server knows about a task: its kind, batches, progress, and whether it was told to stop."""

    job: str
    batches: int = 1
    batch_no: int = 0
    interrupted: bool = False
    skipped: bool = False
    disconnected: bool = False
    admitted: bool = False
    started: float = 0.0
    timestamp: str = ""
    progress: Progress = field(default_factory=lambda: Progress("idle"))

    def should_stop(self) -> bool:
        """Whether the batch in progress must stop (skip, interrupt, or the client went away)."""
        return self.interrupted or self.skipped or self.disconnected

    def mark_admitted(self) -> None:
        if not self.admitted:
            self.started = time.time()
            self.timestamp = time.strftime("%Y%m%d%H%M%S", time.localtime(self.started))
            self.admitted = True

    def set_progress(self, progress: Progress) -> None:
        self.progress = progress


class Worker:
    """Tasks in threads of their own; counts the waiting ones, stops the running ones."""

    def __init__(self, pipeline: Optional[Pipeline] = None, max_queue: int = 64, on_stop: Optional[Callable[[], None]] = None) -> None:
        self.pipeline = pipeline
        self.max_queue = max_queue
        self.on_stop = on_stop or (lambda: None)  # wakes threads waiting for admission after a stop flag was set
        self._lock = threading.Lock()
        self._live: list[TaskControl] = []  # in arrival order
        self._threads: list[threading.Thread] = []
        self._closed = False

    # -- submitting (any thread) --
    def submit(self, task: Callable[[TaskControl], Any], job: str, batches: int = 1) -> "concurrent.futures.Future[Any]":
        """Start `task(control)` in a thread; its result or exception arrives in the returned future, whose
        `control` attribute is the task's TaskControl."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        control = TaskControl(job, batches)
        with self._lock:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            waiting = sum(not c.admitted for c in self._live)
            if waiting >= self.max_queue:
                raise QueueFull(f"{waiting} requests are already waiting (--max_queue {self.max_queue})")
            self._live.append(control)
            thread = threading.Thread(target=self._run, args=(task, control, future), name=f"microbatch-{job}", daemon=True)
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        future.control = control  # type: ignore[attr-defined]
        thread.start()
        return future

    @property
    def waiting(self) -> int:
        """Tasks not admitted yet."""
        with self._lock:
            return sum(not c.admitted for c in self._live)

    def running(self) -> list[TaskControl]:
        """Admitted tasks, the earliest admitted first."""
        with self._lock:
            return sorted((c for c in self._live if c.admitted), key=lambda c: c.started)

    def current(self) -> Optional[TaskControl]:
        """The earliest admitted task still running (the one /progress reports), or None."""
        running = self.running()
        return running[0] if running else None

    # -- stopping tasks (any thread) --
    def interrupt(self) -> bool:
        """Stop every running task after its current sampler step; False when nothing runs."""
        running = self.running()
        for control in running:
            control.interrupted = True
        return bool(running)

    def skip(self) -> bool:
        """Stop every running task's current batch after its current sampler step; each goes on with its next."""
        running = self.running()
        for control in running:
            control.skipped = True
        return bool(running)

    def disconnect(self, control: TaskControl) -> None:
        """The task's client went away: stop it at its next step, or take it out of the queue."""
        control.disconnected = True
        self.on_stop()

    def close(self, timeout: Optional[float] = None) -> None:
        """Take no new tasks, let the submitted ones finish, join their threads."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        end = None if timeout is None else time.monotonic() + timeout
        for thread in threads:
            thread.join(None if end is None else max(0.0, end - time.monotonic()))

    # -- a task's thread --
    def _run(self, task: Callable[[TaskControl], Any], control: TaskControl, future: concurrent.futures.Future) -> None:
        result: Any = None
        error: Optional[BaseException] = None
        if future.set_running_or_notify_cancel():
            try:
                result = task(control)
            except BaseException as e:  # noqa: BLE001 - handed to the waiting request, which answers it
                error = e
        with self._lock:  # gone before the answer goes out: a client polling /progress then sees it done
            self._live.remove(control)
        if error is not None:
            future.set_exception(error)
        elif not future.cancelled():
            future.set_result(result)
