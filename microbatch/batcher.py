"""Continuous batching: the UNet rows of many concurrent sampler loops go through the model together.

Each micro-batch being sampled (one request's images, in its own thread, with its own sampler, step count and
guidance) is a *participant*. Its engine calls `participant.apply_model(x_t, t, cond)` where it would call the
model's; the call submits its rows and blocks. When every registered participant has submitted (a participant
registers just before its sampler loop and leaves after it, also on errors), the last one to arrive runs the round:
submissions whose inputs have the same shapes beyond the batch dimension (latent size, context length, SDXL's
vector, an inpainting model's c_concat) are concatenated row-wise and run as UNet calls of at most `max_rows` rows;
the outputs are split back and every participant goes on with its own sampler step. A participant that registers
while a round runs joins the next one (it enters at a step boundary).

Guidance, the sigma -> t map and the sampler's state stay in each participant's thread: rows only meet inside the
UNet, and each row carries its own timestep. On the CPU the UNet is batch-invariant (`RowwiseConv2d`,
`RowwiseLinear`: one image per convolution and per product; group norm and attention are row-independent), so an
image is the same bit for bit whichever rows shared its calls.

Faults: a call that runs out of memory is split in halves and retried (the smaller size is kept for later calls
of that shape), so no row is lost; any other error goes to the participants whose rows were in that call. A
participant whose `should_stop()` is true when it submits raises `Interrupted` there: its rows leave at the next
step (a client that went away, an interrupt).
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from microbatch.devices import empty_cache, is_out_of_memory
from microbatch.engine import Interrupted

logger = logging.getLogger(__name__)

# apply_model(x_t [B, C, h, w], t [B], cond) -> raw output [B, C, h, w]
ApplyModel = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def cond_signature(cond: Any, rows: int) -> Any:
    """What must be equal for two conditionings to be concatenated: structure, and each tensor's shape beyond the
    batch dimension, dtype and device. None when a tensor's batch is not `rows` (such a call runs alone)."""
    if cond is None:
        return ("none",)
    if isinstance(cond, torch.Tensor):
        if cond.dim() == 0 or cond.shape[0] != rows:
            return None
        return ("tensor", tuple(cond.shape[1:]), cond.dtype, str(cond.device))
    if isinstance(cond, dict):
        items = tuple((k, cond_signature(cond[k], rows)) for k in sorted(cond))
        return None if any(s is None for _, s in items) else ("dict", items)
    if isinstance(cond, (list, tuple)):
        items = tuple(cond_signature(c, rows) for c in cond)
        return None if any(s is None for s in items) else ("list", items)
    return None


def cat_conds(conds: list[Any]) -> Any:
    """Concatenate conditionings of one signature along the batch: tensors, lists of them, dicts of either."""
    first = conds[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        return conds[0] if len(conds) == 1 else torch.cat(conds)
    if isinstance(first, dict):
        return {k: cat_conds([c[k] for c in conds]) for k in first}
    return [cat_conds([c[i] for c in conds]) for i in range(len(first))]


def slice_cond(cond: Any, start: int, stop: int) -> Any:
    """Rows [start, stop) of a batched conditioning."""
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return cond[start:stop]
    if isinstance(cond, dict):
        return {k: slice_cond(v, start, stop) for k, v in cond.items()}
    return [slice_cond(c, start, stop) for c in cond]


@dataclass
class BatcherStats:
    """Counters since the batcher was built (UNet calls as the model saw them)."""

    unet_calls: int = 0
    rows: int = 0
    max_rows_per_call: int = 0
    shared_calls: int = 0  # calls holding rows of two or more owners (requests)
    rounds: int = 0  # rendezvous: every participant submitted once
    oom_halvings: int = 0
    dropped: int = 0  # participants stopped at a submission (interrupt, client gone)
    rows_histogram: dict[int, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "unet_calls": self.unet_calls, "rows": self.rows, "max_rows_per_call": self.max_rows_per_call,
            "mean_rows_per_call": round(self.rows / self.unet_calls, 3) if self.unet_calls else 0.0,
            "shared_calls": self.shared_calls, "rounds": self.rounds, "oom_halvings": self.oom_halvings,
            "dropped": self.dropped, "rows_histogram": {str(k): v for k, v in sorted(self.rows_histogram.items())},
        }


@dataclass
class _Submission:
    participant: "Participant"
    x: torch.Tensor
    t: torch.Tensor
    cond: Any
    signature: Any
    result: Optional[torch.Tensor] = None
    error: Optional[BaseException] = None
    done: bool = False

    @property
    def rows(self) -> int:
        return int(self.x.shape[0])


class Participant:
    """One sampler loop's seat at the batcher: `with participant:` around the loop, `participant.apply_model`
    as its model. `owner` (hashable) names whose rows these are (a request), for the shared-call count; `should_stop()` is
    asked at every submission."""

    def __init__(self, batcher: "ContinuousBatcher", owner: Any = None, should_stop: Optional[Callable[[], bool]] = None):
        self.batcher = batcher
        self.owner = owner
        self.should_stop = should_stop or (lambda: False)
        self.registered = False

    def __enter__(self) -> "Participant":
        self.batcher._register(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.batcher._unregister(self)

    def apply_model(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        if not self.registered:  # a call outside a sampler loop: a round of its own
            with self:
                return self.batcher._submit(self, x_t, t, cond)
        return self.batcher._submit(self, x_t, t, cond)


class ContinuousBatcher:
    """Runs the rows of all registered participants through `apply_model` together, one round per step.

    Args:
        apply_model: the real model call (the model's `apply_model`).
        max_rows: most rows per UNet call (None: no limit); `set_max_rows` changes it between rounds.
        device: where the model runs (its cache is emptied after an out-of-memory error).
    """

    def __init__(self, apply_model: ApplyModel, max_rows: Optional[int] = None, device: Any = "cpu"):
        self.apply_model = apply_model
        self.max_rows = max_rows
        self.device = torch.device(device)
        self.stats = BatcherStats()
        self._cond = threading.Condition()
        self._participants: set[Participant] = set()
        self._pending: list[_Submission] = []
        self._running = False
        self._oom_rows: dict[Any, int] = {}  # signature -> rows that fit after an out-of-memory error

    def participant(self, owner: Any = None, should_stop: Optional[Callable[[], bool]] = None) -> Participant:
        return Participant(self, owner, should_stop)

    def set_max_rows(self, max_rows: Optional[int]) -> None:
        with self._cond:
            self.max_rows = max_rows

    @property
    def active(self) -> int:
        """Participants registered now (sampler loops in progress)."""
        with self._cond:
            return len(self._participants)

    def snapshot(self) -> dict[str, Any]:
        with self._cond:
            out = self.stats.as_dict()
            out.update(participants=len(self._participants), max_rows=self.max_rows,
                       oom_row_limits=sorted(set(self._oom_rows.values())))
            return out

    # -- participants (their own threads) --
    def _register(self, p: Participant) -> None:
        with self._cond:
            if p.registered:
                raise AssertionError("participant registered twice")
            p.registered = True
            self._participants.add(p)

    def _unregister(self, p: Participant) -> None:
        with self._cond:
            if p.registered:
                p.registered = False
                self._participants.discard(p)
                self._cond.notify_all()  # the others may now be complete

    def _ready(self) -> bool:
        return not self._running and bool(self._pending) and len(self._pending) >= len(self._participants)

    def _submit(self, p: Participant, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        if p.should_stop():
            with self._cond:
                self.stats.dropped += 1
            raise Interrupted()
        rows = int(x_t.shape[0])
        signature = cond_signature(cond, rows)
        if signature is not None and tuple(t.shape) == (rows,):
            signature = (tuple(x_t.shape[1:]), x_t.dtype, str(x_t.device), t.dtype, signature)
        else:
            signature = ("alone", id(p))
        item = _Submission(p, x_t, t, cond, signature)
        with self._cond:
            self._pending.append(item)
            while not item.done and not self._ready():
                self._cond.wait()
            if item.done:
                return self._take(item)
            batch, self._pending, self._running = self._pending, [], True
            self.stats.rounds += 1
        try:
            self._run_round(batch)
        finally:
            with self._cond:
                self._running = False
                self._cond.notify_all()
        return self._take(item)

    @staticmethod
    def _take(item: _Submission) -> torch.Tensor:
        if item.error is not None:
            raise item.error
        assert item.result is not None
        return item.result

    # -- one round (the leader's thread, outside the lock) --
    def _run_round(self, batch: list[_Submission]) -> None:
        groups: dict[Any, list[_Submission]] = {}
        for item in batch:
            groups.setdefault(item.signature, []).append(item)
        for signature, items in groups.items():
            try:
                x = torch.cat([i.x for i in items]) if len(items) > 1 else items[0].x
                t = torch.cat([i.t for i in items]) if len(items) > 1 else items[0].t
                cond = cat_conds([i.cond for i in items])
                owners = [i.participant.owner for i in items for _ in range(i.rows)]
                out = self._call(signature, x, t, cond, owners)
                pos = 0
                for i in items:
                    i.result = out[pos : pos + i.rows]
                    pos += i.rows
            except BaseException as e:  # noqa: BLE001 - handed to each participant of the call, which raises it
                for i in items:
                    i.error = e
            for i in items:
                i.done = True

    def _call(self, signature: Any, x: torch.Tensor, t: torch.Tensor, cond: Any, owners: list[Any]) -> torch.Tensor:
        """apply_model over all rows in calls of at most the row limit; out of memory halves the limit and retries
        the same rows."""
        n = int(x.shape[0])
        with self._cond:
            limit = min(self.max_rows or n, self._oom_rows.get(signature, n))
        outs = []
        pos = 0
        while pos < n:
            size = min(limit, n - pos)
            try:
                if size == n:
                    out = self.apply_model(x, t, cond)
                else:
                    out = self.apply_model(x[pos : pos + size], t[pos : pos + size], slice_cond(cond, pos, pos + size))
            except Exception as e:  # noqa: BLE001 - only out-of-memory is handled, the rest re-raised
                if not is_out_of_memory(e) or size == 1:
                    raise
                empty_cache(self.device)
                limit = max(1, size // 2)
                logger.warning("out of memory in a UNet call of %d rows; retrying with at most %d rows per call", size, limit)
                with self._cond:
                    self._oom_rows[signature] = limit
                    self.stats.oom_halvings += 1
                continue
            outs.append(out)
            with self._cond:
                s = self.stats
                s.unet_calls += 1
                s.rows += size
                s.max_rows_per_call = max(s.max_rows_per_call, size)
                s.rows_histogram[size] = s.rows_histogram.get(size, 0) + 1
                if len(set(owners[pos : pos + size])) > 1:
                    s.shared_calls += 1
            pos += size
        return outs[0] if len(outs) == 1 else torch.cat(outs)
