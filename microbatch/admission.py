"""Which micro-batches may sample now: image slots handed out first come, first served.

Every request takes a `Ticket` when it arrives; its micro-batches then `acquire` image slots one after another.
Micro-batches queue in the order (request's arrival, micro-batch's order), and only the head of the queue is ever
admitted, so nothing passes a request that came earlier: no starvation.

Requests share UNet calls only when their micro-batches have the same *key* (image size, LoRA set...). The head
is admitted when its key is the current one and enough slots are free (at most `capacity` images in flight). A
head with another key waits until no slot is in use and no earlier request is still running (one that arrived
before it comes back with its next micro-batch ahead of it); then `prepare()` runs in the head's thread, with
nothing else admitted, to switch the model over (merge another LoRA set, measure what fits...) and return the new
key's capacity. `generation` counts those switches: a request whose micro-batches straddle one re-encodes its text.
"""
from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Optional

from microbatch.engine import Interrupted


@dataclass
class Grant:
    """Slots held by one micro-batch: `images` of them, admitted under `generation`. Release with `release()` (or
    use as a context manager)."""

    admission: "FairAdmission"
    images: int
    generation: int
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.admission._release(self.images)

    def __enter__(self) -> "Grant":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


class Ticket:
    """A request's place in the queue (its arrival order). `close()` when the request is done."""

    def __init__(self, admission: "FairAdmission", seq: int):
        self.admission = admission
        self.seq = seq
        self.started = False  # some micro-batch was admitted
        self.closed = False
        self._units = itertools.count()

    def acquire(self, key: Hashable, want: int, prepare: Callable[[], int], should_stop: Optional[Callable[[], bool]] = None) -> Grant:
        """Wait for slots for up to `want` images of `key`; the grant holds min(want, capacity). `prepare()`
        switches the model to `key` and returns its capacity (called only when the key changes). Raises
        Interrupted when `should_stop()` becomes true while waiting."""
        return self.admission._acquire(self, next(self._units), key, want, prepare, should_stop or (lambda: False))

    def close(self) -> None:
        self.admission._close(self)

    def __enter__(self) -> "Ticket":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class FairAdmission:
    """Image slots for micro-batches, first come first served, one key at a time. `poll_s`: how often a waiting
    thread asks its `should_stop`."""

    def __init__(self, poll_s: float = 0.1, on_admit: Optional[Callable[[Ticket], None]] = None):
        self.poll_s = poll_s
        self.on_admit = on_admit
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._queue: list[tuple[int, int]] = []  # (ticket seq, unit) waiting, kept sorted
        self._active: set[int] = set()  # tickets started and not closed
        self._in_use = 0
        self._key: Any = None
        self._capacity: Optional[int] = None
        self._switching = False
        self.generation = 0
        self.admitted: list[tuple[int, Any, int]] = []  # (ticket seq, key, images), the last few, for tests and logs

    def ticket(self) -> Ticket:
        with self._cond:
            return Ticket(self, next(self._seq))

    def state(self) -> dict[str, Any]:
        with self._cond:
            return {"in_use": self._in_use, "capacity": self._capacity, "waiting": len(self._queue), "running_requests": len(self._active)}

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._queue)

    def wake(self) -> None:
        """Let waiting threads look at their should_stop now."""
        with self._cond:
            self._cond.notify_all()

    def _acquire(self, ticket: Ticket, unit: int, key: Hashable, want: int, prepare: Callable[[], int], should_stop: Callable[[], bool]) -> Grant:
        if want < 1:
            raise ValueError(f"a micro-batch needs at least one image, got {want}")
        entry = (ticket.seq, unit)
        with self._cond:
            if ticket.closed:
                raise AssertionError("ticket already closed")
            self._queue.append(entry)
            self._queue.sort()
            try:
                while True:
                    if should_stop():
                        raise Interrupted()
                    if self._queue[0] == entry and not self._switching:
                        if self._capacity is not None and key == self._key:
                            n = min(want, self._capacity)
                            if self._capacity - self._in_use >= n:
                                return self._admit(ticket, entry, key, n)
                        elif self._in_use == 0 and not any(seq < ticket.seq for seq in self._active):
                            self._switch(key, prepare)
                            continue
                    self._cond.wait(self.poll_s)
            finally:
                if entry in self._queue:
                    self._queue.remove(entry)
                    self._cond.notify_all()

    def _switch(self, key: Hashable, prepare: Callable[[], int]) -> None:
        """Called with the lock held; runs prepare() without it (nothing else is admitted meanwhile)."""
        self._switching = True
        self._cond.release()
        try:
            capacity = int(prepare())
        finally:
            self._cond.acquire()
            self._switching = False
            self._cond.notify_all()
        if capacity < 1:
            raise AssertionError(f"prepare() gave capacity {capacity}")
        self._key, self._capacity = key, capacity
        self.generation += 1

    def _admit(self, ticket: Ticket, entry: tuple[int, int], key: Hashable, n: int) -> Grant:
        self._queue.remove(entry)
        self._in_use += n
        self._active.add(ticket.seq)
        self.admitted = (self.admitted + [(ticket.seq, key, n)])[-256:]
        first = not ticket.started
        ticket.started = True
        self._cond.notify_all()
        if first and self.on_admit is not None:
            self.on_admit(ticket)
        return Grant(self, n, self.generation)

    def _release(self, n: int) -> None:
        with self._cond:
            self._in_use -= n
            if self._in_use < 0:
                raise AssertionError("more slots released than held")
            self._cond.notify_all()

    def _close(self, ticket: Ticket) -> None:
        with self._cond:
            ticket.closed = True
            self._active.discard(ticket.seq)
            self._cond.notify_all()
