"""The server's cross-request batching: admission of micro-batches and one UNet batcher for all of them.

Each request runs in a thread of its own (`microbatch.server.worker`) through `Pipeline.run`, with this
scheduler's `sampling` in place of the pipeline's own micro-batched loop. Its images (one LoRA set at a time) go
in micro-batches that take image slots from a `FairAdmission` (first come, first served; at most
`max_batch_size` images in flight) and sample with their engine's UNet calls going through one
`ContinuousBatcher`: the rows of every request in flight share each UNet call, whatever their prompts, seeds,
samplers, step counts and guidance scales. Micro-batches share calls when their key matches (image size and LoRA
set, the model being one); a request with another key waits at the head of the queue until the running ones have
finished, then the model is switched (LoRA set merged) with nothing else sampling.

Text encoding and VAE decoding happen in the request threads while other rows sample; both only read the model,
which changes only in `_prepare`, when no micro-batch holds a slot.

`batching=False` serves one request at a time (every request has a key of its own), for comparison.
`max_batch_size`: an int, "auto" (measured once per image size, as the scripts' auto, when the first request of
that size is admitted) or None (the scripts' default for the size, `microbatch.memory.default_max_batch_size`,
counting two UNet rows per image). A UNet call holds at most 2 x max_batch_size rows (cond and uncond of each
image); an out-of-memory error halves the call and keeps the smaller size.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path
from typing import Any, Callable, Optional, Union

from microbatch.admission import FairAdmission, Ticket
from microbatch.batcher import ContinuousBatcher
from microbatch.engine import Engine, FinishedImage, SamplingSettings
from microbatch.lora import applied_loras, check_lora, set_loras
from microbatch.lora_jobs import LoraSet, group_by_set
from microbatch.memory import DEFAULT_MAX_IMAGES, choose_batch_size, default_max_batch_size, measure_memory_model, memory_budget
from microbatch.pipeline import Pipeline, Plan
from microbatch.request import UsageError

logger = logging.getLogger(__name__)

# "auto": the most images in flight it may choose (the measured memory line decides below that).
AUTO_MAX_IMAGES = 32


class Scheduler:
    """Admission and continuous batching for all requests on one `Pipeline` (see the module's docstring)."""

    def __init__(self, pipeline: Pipeline, max_batch_size: Union[int, str, None] = None, batching: bool = True):
        if not (max_batch_size is None or max_batch_size == "auto" or (isinstance(max_batch_size, int) and max_batch_size >= 1)):
            raise UsageError(f"--max_batch_size must be a positive integer or auto, got {max_batch_size!r}")
        self.pipeline = pipeline
        self.max_batch_size = max_batch_size
        self.batching = batching
        self.batcher = ContinuousBatcher(pipeline.model.apply_model, device=pipeline.device)
        self.admission = FairAdmission()
        self._base = [(h.path, h.weight, h.te_weight) for h in applied_loras(pipeline.model)]
        self._applied: LoraSet = ()
        self._auto: dict[tuple[int, int], int] = {}
        self._lock = threading.Lock()

    def ticket(self) -> Ticket:
        """A request's place in the queue; close it when the request is done."""
        return self.admission.ticket()

    def stats(self) -> dict[str, Any]:
        """UNet calls, rows, calls shared by requests (see BatcherStats), and the queue's state."""
        return {"batching": self.batching, "max_batch_size": self.max_batch_size, **self.batcher.snapshot(), **self.admission.state()}

    def sampling(
        self, ticket: Ticket, should_stop: Callable[[], bool], on_admitted: Optional[Callable[[], None]] = None
    ) -> Callable[[Engine, Plan, Callable[[list[FinishedImage]], None]], int]:
        """The `sampling` argument of `Pipeline.run` for the request holding `ticket`. `should_stop()` is asked
        while waiting for slots and at every UNet submission (Interrupted there); `on_admitted()` is called after
        each admission."""

        def run(engine: Engine, plan: Plan, on_batch: Callable[[list[FinishedImage]], None]) -> int:
            return self._run_plan(ticket, should_stop, on_admitted, engine, plan, on_batch)

        return run

    def _run_plan(self, ticket: Ticket, should_stop: Callable[[], bool], on_admitted: Optional[Callable[[], None]], engine: Engine,
                  plan: Plan, on_batch: Callable[[list[FinishedImage]], None]) -> int:
        settings = plan.settings
        if any(item.loras for item in plan.loras):
            try:
                for path in sorted({spec[0] for item in plan.loras for spec in item.loras}):
                    check_lora(self.pipeline.model, path)
            except ValueError as e:
                raise UsageError(str(e)) from None
            groups = [(loras, [plan.loras[i].job for i in positions]) for loras, positions in group_by_set(plan.loras, self._applied)]
        else:
            groups = [((), plan.engine_jobs)]
        engine.shared_unet = lambda: self.batcher.participant(ticket, should_stop)
        generation: Optional[int] = None
        batch_index = 0
        size = 1
        for loras, jobs in groups:
            key: tuple = (settings.height, settings.width, settings.channels, loras)
            if not self.batching:
                key += (ticket.seq,)
            pos = 0
            while pos < len(jobs):
                prepare = _Prepare(self, engine, settings, jobs, loras)
                with ticket.acquire(key, len(jobs) - pos, prepare, should_stop) as grant:
                    if on_admitted is not None:
                        on_admitted()
                    if generation is not None and grant.generation != generation:
                        engine.clear_conditioning()  # the model was switched since this request encoded its text
                    generation = grant.generation
                    batch = list(jobs[pos : pos + grant.images])
                    latents = engine.sample_images(batch, settings, batch_index)
                    images = engine.decode(latents)
                on_batch([FinishedImage(job, image, latent.float().cpu()) for job, image, latent in zip(batch, images, latents)])
                pos += len(batch)
                batch_index += 1
                size = grant.images
        return size

    # -- switching the model (nothing else holds a slot) --
    def _switch_to(self, engine: Engine, settings: SamplingSettings, jobs: list, loras: LoraSet) -> int:
        with self._lock:
            if loras != self._applied:
                set_loras(self.pipeline.model, self._base + list(loras))
                self._applied = loras
                logger.info("LoRA set: %s", ", ".join(f"{Path(p).name} (unet {u:g}, te {t:g})" for p, u, t in loras) or "none")
            capacity = self._capacity(engine, settings, jobs)
            self.batcher.set_max_rows(2 * capacity)
            return capacity

    def _capacity(self, engine: Engine, settings: SamplingSettings, jobs: list) -> int:
        if isinstance(self.max_batch_size, int):
            return self.max_batch_size
        if self.max_batch_size is None:
            guided = dataclasses.replace(settings, guidance_scale=7.5, split_guidance=False)  # two rows per image
            return default_max_batch_size(self.pipeline.device, guided, DEFAULT_MAX_IMAGES)
        size = (settings.height, settings.width)
        if size not in self._auto:
            shared, engine.shared_unet = engine.shared_unet, None  # measured alone, on the model itself
            try:
                model = measure_memory_model(engine, settings, jobs[:2])
            finally:
                engine.shared_unet = shared
            budget = memory_budget(self.pipeline.device, self.pipeline.model)
            self._auto[size] = choose_batch_size(model, budget, AUTO_MAX_IMAGES)
            logger.info("--max_batch_size auto: %d images in flight at %dx%d for a budget of %.2f GB (%s)",
                        self._auto[size], size[1], size[0], budget / 2**30, model.describe())
        return self._auto[size]


@dataclasses.dataclass
class _Prepare:
    scheduler: Scheduler
    engine: Engine
    settings: SamplingSettings
    jobs: list
    loras: LoraSet

    def __call__(self) -> int:
        return self.scheduler._switch_to(self.engine, self.settings, self.jobs, self.loras)
