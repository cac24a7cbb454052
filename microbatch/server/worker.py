"""One worker thread that runs the server's generation tasks first come, first served.

HTTP handlers submit a task (a function of a `TaskControl`) and await its future; the queue is bounded
(`QueueFull` beyond `max_queue` waiting tasks, answered with HTTP 503). Only the worker thread calls
`Pipeline.generate`, so requests never interleave and run in the order they arrived.

A task runs a request one `n_iter` batch at a time: `skip()` stops the batch in progress (after its current
sampler step) and the task goes on with the next, as the web UI's Skip; `interrupt()` stops the batch in progress
and the task's remaining batches. Either way the images finished so far are answered.
"""
from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from microbatch.pipeline import Pipeline

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """More tasks are waiting than the server accepts."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new tasks."""


@dataclass
class TaskControl:
    """What the worker knows about the running task: its kind, batches, and whether it was told to stop."""

    job: str
    batches: int = 1
    batch_no: int = 0
    interrupted: bool = False
    skipped: bool = False
    started: float = 0.0
    timestamp: str = ""


class Worker:
    """A FIFO of tasks run by one thread against one `Pipeline`."""

    def __init__(self, pipeline: Pipeline, max_queue: int = 64) -> None:
        self.pipeline = pipeline
        self.max_queue = max_queue
        self._tasks: "queue.Queue[Optional[tuple[Callable[[TaskControl], Any], TaskControl, concurrent.futures.Future]]]" = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._current: Optional[TaskControl] = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="microbatch-worker", daemon=True)
        self._thread.start()

    # -- submitting (any thread) --
    def submit(self, task: Callable[[TaskControl], Any], job: str, batches: int = 1) -> "concurrent.futures.Future[Any]":
        """Queue `task(control)`; its result or exception arrives in the returned future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            if self._waiting >= self.max_queue:
                raise QueueFull(f"{self._waiting} requests are already waiting (--max_queue {self.max_queue})")
            self._waiting += 1
        self._tasks.put((task, TaskControl(job, batches), future))
        return future

    @property
    def waiting(self) -> int:
        with self._lock:
            return self._waiting

    def current(self) -> Optional[TaskControl]:
        with self._lock:
            return self._current

    # -- stopping the running task (any thread) --
    def interrupt(self) -> bool:
        """Stop the running task after its current sampler step; False when nothing runs."""
        with self._lock:
            if self._current is None:
                return False
            self._current.interrupted = True
        self.pipeline.cancel()
        return True

    def skip(self) -> bool:
        """Stop the running task's current batch after its current sampler step; it goes on with the next."""
        with self._lock:
            if self._current is None:
                return False
            self._current.skipped = True
        self.pipeline.cancel()
        return True

    def close(self, timeout: Optional[float] = None) -> None:
        """Take no new tasks, let the queued ones finish, stop the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._tasks.put(None)
        self._thread.join(timeout)

    # -- the worker thread --
    def _run(self) -> None:
        while True:
            item = self._tasks.get()
            if item is None:
                return
            task, control, future = item
            with self._lock:
                self._waiting -= 1
                self._current = control
            control.started = time.time()
            control.timestamp = time.strftime("%Y%m%d%H%M%S", time.localtime(control.started))
            if not future.set_running_or_notify_cancel():
                with self._lock:
                    self._current = None
                continue
            result: Any = None
            error: Optional[BaseException] = None
            try:
                result = task(control)
            except BaseException as e:  # noqa: BLE001 - handed to the waiting request, which answers it
                error = e
            with self._lock:  # idle before the answer goes out: a client polling /progress then sees it done
                self._current = None
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)
