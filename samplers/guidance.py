"""The one wrapper that owns classifier-free guidance.

Guidance is applied to the raw model output (eps for eps models, v for v models), where the original applies
it: out = out_uncond + scale * (out_cond - out_uncond). Unconditional and conditional inputs go through the
UNet as one batch ordered [uncond, cond] (the original's order), or as two calls when `split` is set to bound
the UNet batch to the number of images.

Conditioning that changes during sampling (the web UI's prompt editing and alternation), prompts of different
lengths (77 k tokens) and composable prompts (`a AND b:0.5`) come as a `ConditioningSchedule`: a function of the
0-based denoiser call that returns each row's context. Rows whose contexts have the same length share one UNet
call; rows of different lengths go in separate calls, never padded, so that an image's output does not depend on
the other images of its batch. Composable guidance (Liu et al. 2022, "Compositional Visual Generation with
Composable Diffusion Models") is out_u + sum_k w_k scale (out_k - out_u) over an image's parts; it is applied to the
raw output like ordinary guidance, which equals the web UI's combination of denoised estimates because the map from
raw output to denoised estimate is affine and the combination's coefficients sum to 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

# apply_model(x_t [B, C, h, w], t [B], cond) -> raw output [B, C, h, w]
ApplyModel = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def _cat_cond(a: Any, b: Any) -> Any:
    """Concatenate two conditionings along the batch: tensors, lists of tensors, or dicts of lists."""
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    if isinstance(a, dict):
        return {k: _cat_cond(a[k], b[k]) for k in a}
    if isinstance(a, (list, tuple)):
        return [_cat_cond(x, y) for x, y in zip(a, b)]
    raise ValueError(f"cannot batch conditioning of type {type(a).__name__}")


def _length_key(context: Any) -> tuple:
    """Rows that may share a UNet call have equal keys: the context's shape (SDXL: the shape of its crossattn)."""
    if isinstance(context, dict):
        return tuple(context["crossattn"].shape)
    return tuple(context.shape)


def _stack(contexts: Sequence[Any]) -> Any:
    """Context rows -> a batch: tensors stacked, or (SDXL) dicts of rows -> a dict of stacked rows."""
    if isinstance(contexts[0], dict):
        return {k: torch.stack([c[k] for c in contexts]) for k in contexts[0]}
    return torch.stack(list(contexts))


@dataclass(frozen=True)
class StepConditioning:
    """The contexts of one denoiser call for a batch of B images.

    cond: R >= B context rows, each [L_r, C] (L_r a multiple of 77 for CLIP prompts), or for SDXL each a dict
        {"crossattn": [77, C], "vector": [adm]} (the UNet then receives the dict of stacked rows).
    parts: for each image, [(index into cond, weight), ...]: its composable parts (one part of weight 1 is an
        ordinary prompt).
    uncond: B context rows [L_b, C], one per image, or None (no guidance and no composable parts).
    """

    cond: Sequence[torch.Tensor]
    parts: Sequence[Sequence[tuple[int, float]]]
    uncond: Optional[Sequence[torch.Tensor]] = None

    @property
    def plain(self) -> bool:
        """Every image has one part of weight 1 (no composable guidance)."""
        return all(len(p) == 1 and p[0][1] == 1.0 for p in self.parts)


# step (0-based denoiser call) -> the contexts of that call
ConditioningSchedule = Callable[[int], StepConditioning]


def combine_parts(out_cond: torch.Tensor, parts: Sequence[Sequence[tuple[int, float]]], out_uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Composable guidance: row i = out_uncond[i] + sum over image i's parts of (out_cond[row] - out_uncond[i]) *
    (weight * guidance_scale). out_cond [R, ...], out_uncond [B, ...] -> [B, ...]."""
    out = out_uncond.clone()
    for i, image_parts in enumerate(parts):
        for row, weight in image_parts:
            out[i] += (out_cond[row] - out_uncond[i]) * (weight * guidance_scale)
    return out


def _per_image(out_cond: torch.Tensor, parts: Sequence[Sequence[tuple[int, float]]]) -> torch.Tensor:
    """The rows of plain images (one part each), in image order."""
    rows = [p[0][0] for p in parts]
    return out_cond if rows == list(range(out_cond.shape[0])) else out_cond[rows]


class GuidedModel:
    """model_fn(x_t, t) for a batch of B images with per-image cond / uncond of batch B.

    Args:
        apply_model: the model's `apply_model`. With a ConditioningSchedule it receives a context tensor
            [N, L, C] as its cond (wrap it to add other inputs, such as an inpainting model's c_concat).
        cond: conditioning for the batch (context tensor [B, 77, D] or a dict of lists for hybrid models), or a
            ConditioningSchedule (then `uncond` must be None: the schedule gives both).
        uncond: unconditional conditioning of the same structure, or None for no guidance.
        guidance_scale: s in out_u + s (out_c - out_u); 1 disables guidance (one call, cond only).
        split: run uncond and cond as two UNet calls of B instead of one of 2B.

    `calls` counts the calls so far: with a schedule, call k uses the schedule's step k (the web UI counts prompt
    steps in denoiser calls, so a second-order sampler's two calls per step are two steps).

    `t_interval` (t_lo, t_hi): guidance only where the timestep lies in it (Kynkaanniemi et al. 2024, "Applying
    guidance in a limited interval"); elsewhere a plain prompt's unconditional rows are not computed at all and the
    output is the conditional one (as scale 1). Set from a sigma interval by the engine. `unguided_calls` counts
    the calls that skipped them.
    """

    def __init__(self, apply_model: ApplyModel, cond: Any, uncond: Optional[Any] = None, guidance_scale: float = 1.0, split: bool = False):
        self.apply_model = apply_model
        self.schedule: Optional[ConditioningSchedule] = cond if callable(cond) else None
        if self.schedule is not None and uncond is not None:
            raise ValueError("a ConditioningSchedule gives the unconditional rows itself: uncond must be None")
        self.cond = None if self.schedule is not None else cond
        self.uncond = uncond
        self.guidance_scale = float(guidance_scale)
        self.split = split
        self.calls = 0  # UNet evaluations, for metrics and tests
        self.t_interval: Optional[tuple[float, float]] = None
        self.unguided_calls = 0

    def _outside_interval(self, t: torch.Tensor) -> bool:
        """True when every row's timestep lies outside `t_interval` (rows of one run share their timestep)."""
        if self.t_interval is None:
            return False
        lo, hi = self.t_interval
        outside = not bool(((t >= lo) & (t <= hi)).any())
        self.unguided_calls += outside
        return outside

    @property
    def guided(self) -> bool:
        """Static conditioning: whether uncond is used. A schedule may still give no uncond rows (scale 1)."""
        if self.schedule is not None:
            return self.guidance_scale != 1.0
        return self.uncond is not None and self.guidance_scale != 1.0

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        step = self.calls
        self.calls += 1
        if self.schedule is not None:
            return self._scheduled(x_t, t, self.schedule(step))
        if self.uncond is None or self.guidance_scale == 1.0 or self._outside_interval(t):
            return self.apply_model(x_t, t, self.cond)
        if self.split:
            out_uncond = self.apply_model(x_t, t, self.uncond)
            out_cond = self.apply_model(x_t, t, self.cond)
        else:
            out = self.apply_model(torch.cat([x_t, x_t]), torch.cat([t, t]), _cat_cond(self.uncond, self.cond))
            out_uncond, out_cond = out.chunk(2)
        return out_uncond + self.guidance_scale * (out_cond - out_uncond)

    def _scheduled(self, x_t: torch.Tensor, t: torch.Tensor, step: StepConditioning) -> torch.Tensor:
        b = x_t.shape[0]
        if len(step.parts) != b or (step.uncond is not None and len(step.uncond) != b):
            raise AssertionError(f"step conditioning for {len(step.parts)} images, the batch has {b}")
        plain = step.plain
        guided = step.uncond is not None and (not plain or (self.guidance_scale != 1.0 and not self._outside_interval(t)))
        if not plain and step.uncond is None:
            raise ValueError("composable prompts (AND, or a prompt ending in :weight) need the unconditional rows")
        cond_rows = list(step.cond)
        # the x row of every context row: cond row r belongs to the image whose parts name it
        owner = [0] * len(cond_rows)
        for i, image_parts in enumerate(step.parts):
            for row, _ in image_parts:
                owner[row] = i
        if not guided:
            return _per_image(self._rows(x_t, t, cond_rows, owner), step.parts)
        uncond_rows = list(step.uncond)
        images = list(range(b))
        if self.split:
            out_uncond = self._rows(x_t, t, uncond_rows, images)
            out_cond = self._rows(x_t, t, cond_rows, owner)
        else:
            out = self._rows(x_t, t, uncond_rows + cond_rows, images + owner)
            out_uncond, out_cond = out[:b], out[b:]
        if plain:
            out_cond = _per_image(out_cond, step.parts)
            return out_uncond + self.guidance_scale * (out_cond - out_uncond)
        return combine_parts(out_cond, step.parts, out_uncond, self.guidance_scale)

    def _rows(self, x_t: torch.Tensor, t: torch.Tensor, contexts: list[torch.Tensor], owner: list[int]) -> torch.Tensor:
        """UNet outputs [N, ...] for N context rows, row n evaluated at x_t[owner[n]]: one call per context length
        (in order of first appearance), rows of equal length batched in their original order."""
        groups: dict[tuple, list[int]] = {}
        for n, context in enumerate(contexts):
            groups.setdefault(_length_key(context), []).append(n)
        if len(groups) == 1 and owner == list(range(x_t.shape[0])):
            return self.apply_model(x_t, t, _stack(contexts))
        if len(groups) == 1:
            index = torch.tensor(owner, device=x_t.device)
            return self.apply_model(x_t[index], t[index], _stack(contexts))
        out: Optional[torch.Tensor] = None
        for rows in groups.values():
            index = torch.tensor([owner[n] for n in rows], device=x_t.device)
            part = self.apply_model(x_t[index], t[index], _stack([contexts[n] for n in rows]))
            if out is None:
                out = part.new_empty((len(contexts), *part.shape[1:]))
            out[torch.tensor(rows, device=part.device)] = part
        return out
