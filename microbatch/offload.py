"""Weights off the accelerator until they are needed: model offload and sequential (block) offload.

- "model": the text encoder, the UNet and the VAE are kept on the staging device (the CPU) and the one in use is
  copied onto the compute device when it is called (a forward pre-hook); the one that was there before goes back.
  At most one component's weights are on the device: the UNet's (SD v1: 1.7 GB in float16) instead of all three
  (2.1 GB). Costs one copy per component switch, i.e. per micro-batch, not per step.
- "sequential": the UNet is streamed block by block (time_embed, each input block, the middle block, each output
  block, out): a block is copied in by its pre-hook and dropped again by its post-hook, so the device holds one
  block's weights (at most ~0.1 GB for SD v1) plus the activations. The text encoder and the VAE are handled as in
  "model". Costs a copy of the whole UNet per UNet call: only for devices that could not run otherwise.

The staging copy is the source of truth: "moving back" only re-binds the parameters to it (nothing is copied back),
and on CUDA it is pinned so that the copies in are asynchronous. Outputs are bit-identical to no offload.
"""
from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import torch
from torch import nn

logger = logging.getLogger(__name__)

OffloadMode = Literal["none", "model", "sequential"]
OFFLOAD_MODES = ("none", "model", "sequential")
COMPONENTS = ("text_encoder", "unet", "vae")
_STATE_ATTR = "_offload_state"


class _Staged:
    """One module's parameters and buffers (not its children's), kept on the staging device."""

    def __init__(self, name: str, module: nn.Module, staging: torch.device, pin: bool):
        self.name = name
        self.module = module
        self.pin = pin
        self.staging = staging
        self.tensors: dict[tuple[nn.Module, str, bool], torch.Tensor] = {}
        self.loaded: dict[tuple[nn.Module, str, bool], torch.Tensor] = {}
        for owner in module.modules():
            for key, p in owner._parameters.items():
                if p is not None:
                    self.tensors[(owner, key, True)] = self._stage(p.data)
            for key, b in owner._buffers.items():
                if b is not None:
                    self.tensors[(owner, key, False)] = self._stage(b)
        self.nbytes = sum(t.numel() * t.element_size() for t in self.tensors.values())

    def _stage(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().to(self.staging)
        return t.pin_memory() if self.pin and not t.is_pinned() else t

    @staticmethod
    def _get(entry: tuple[nn.Module, str, bool]) -> torch.Tensor:
        owner, key, is_param = entry
        return owner._parameters[key].data if is_param else owner._buffers[key]

    @staticmethod
    def _set(entry: tuple[nn.Module, str, bool], t: torch.Tensor) -> None:
        owner, key, is_param = entry
        if is_param:
            owner._parameters[key].data = t
        else:
            owner._buffers[key] = t

    def load(self, device: torch.device) -> None:
        for entry, staged in self.tensors.items():
            current = self._get(entry)
            loaded = self.loaded.get(entry)
            if current.data_ptr() != staged.data_ptr() and (loaded is None or current.data_ptr() != loaded.data_ptr()):
                # Changed under us (e.g. `.float()` by the VAE fallback): that is the new truth.
                staged = self.tensors[entry] = self._stage(current)
            copy = torch.empty_like(staged, device=device)
            copy.copy_(staged, non_blocking=True)
            self.loaded[entry] = copy
            self._set(entry, copy)

    def unload(self) -> None:
        for entry, staged in self.tensors.items():
            current = self._get(entry)
            loaded = self.loaded.get(entry)
            if loaded is not None and current.data_ptr() != loaded.data_ptr() and current.data_ptr() != staged.data_ptr():
                staged = self.tensors[entry] = self._stage(current)
            self._set(entry, staged)
        self.loaded.clear()


@dataclass
class OffloadState:
    """Bookkeeping of an installed offload, kept on the model (see `offload_state`).

    `events` holds the latest ("load" | "unload", name) pairs in order; `resident` the names whose weights are on
    the compute device now; `peak_resident_bytes` the most weight bytes that were on it at once.
    """

    mode: OffloadMode
    compute: torch.device
    staging: torch.device
    staged: dict[str, _Staged] = field(default_factory=dict)
    events: collections.deque = field(default_factory=lambda: collections.deque(maxlen=100_000))
    resident: list[str] = field(default_factory=list)
    peak_resident_bytes: int = 0
    handles: list[Any] = field(default_factory=list)
    current_component: Optional[str] = None

    def resident_bytes(self) -> int:
        return sum(self.staged[n].nbytes for n in self.resident)

    def load(self, name: str) -> None:
        if name in self.resident:
            return
        self.staged[name].load(self.compute)
        self.resident.append(name)
        self.events.append(("load", name))
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes())

    def unload(self, name: str) -> None:
        if name not in self.resident:
            return
        self.staged[name].unload()
        self.resident.remove(name)
        self.events.append(("unload", name))

    def use_component(self, name: Optional[str]) -> None:
        """Make `name` the one component on the device (None: no component, before a streamed UNet block)."""
        if self.current_component == name:
            return
        if self.current_component is not None:
            self.unload(self.current_component)
        self.current_component = name
        if name is not None:
            self.load(name)


def offload_state(model: nn.Module) -> Optional[OffloadState]:
    return getattr(model, _STATE_ATTR, None)


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def components(model: nn.Module) -> dict[str, nn.Module]:
    """The three swappable parts of a LatentDiffusion: text encoder, UNet (with its wrapper) and VAE."""
    return {"text_encoder": model.cond_stage_model, "unet": model.model, "vae": model.first_stage_model}


def unet_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The UNet's streamable blocks, in call order: time_embed, input_blocks.i, middle_block, output_blocks.i, out."""
    unet = model.model.diffusion_model
    blocks: dict[str, nn.Module] = {"unet.time_embed": unet.time_embed}
    blocks.update({f"unet.input_blocks.{i}": b for i, b in enumerate(unet.input_blocks)})
    blocks["unet.middle_block"] = unet.middle_block
    blocks.update({f"unet.output_blocks.{i}": b for i, b in enumerate(unet.output_blocks)})
    blocks["unet.out"] = unet.out
    return blocks


def apply_offload(
    model: nn.Module,
    mode: OffloadMode,
    device: Union[str, torch.device],
    staging_device: Union[str, torch.device] = "cpu",
    force: bool = False,
) -> Optional[OffloadState]:
    """Install offloading on a LatentDiffusion (wherever its weights are now) and return its state.

    Args:
        model: the LatentDiffusion; after this, its weights live on `staging_device` and move to `device` on use.
        mode: "none" (no-op), "model" (one component on the device at a time) or "sequential" (UNet block by block).
        device: the compute device, where the engine runs.
        staging_device: where weights wait (the CPU).
        force: install the hooks even when both devices are the same (tests exercise the bookkeeping on the CPU;
            the copies are then real CPU-to-CPU copies). Without it, that case is a no-op.
    Returns:
        the OffloadState, or None when nothing was installed.
    """
    if mode not in OFFLOAD_MODES:
        raise ValueError(f"offload mode must be one of {', '.join(OFFLOAD_MODES)}, got {mode!r}")
    compute, staging = torch.device(device), torch.device(staging_device)
    if offload_state(model) is not None:
        raise ValueError("offload is already installed on this model; call remove_offload first")
    if mode == "none":
        return None
    if compute.type == staging.type and not force:
        logger.debug("offload %s: compute and staging device are both %s; nothing to do", mode, compute)
        return None
    pin = compute.type == "cuda" and staging.type == "cpu"
    state = OffloadState(mode, compute, staging)
    parts = components(model)
    managed_ids = {id(p) for part in parts.values() for p in part.parameters()} | {
        id(b) for part in parts.values() for b in part.buffers()
    }
    # The model's own tensors (schedule buffers) stay on the compute device: `model.device` follows them.
    for owner in model.modules():
        for key, b in owner._buffers.items():
            if b is not None and id(b) not in managed_ids:
                owner._buffers[key] = b.to(compute)
        for key, p in owner._parameters.items():
            if p is not None and id(p) not in managed_ids:
                p.data = p.data.to(compute)

    for name in ("text_encoder", "vae") + (("unet",) if mode == "model" else ()):
        state.staged[name] = _Staged(name, parts[name], staging, pin)
        state.staged[name].unload()
        _hook_component(state, name, parts[name])
    if mode == "sequential":
        blocks = unet_blocks(model)
        in_blocks = {id(p) for b in blocks.values() for p in b.parameters()}
        rest = [n for n, p in parts["unet"].named_parameters() if id(p) not in in_blocks]
        if rest:
            raise ValueError(f"sequential offload: UNet parameters outside the streamed blocks: {rest[:5]}")
        for name, block in blocks.items():
            state.staged[name] = _Staged(name, block, staging, pin)
            state.staged[name].unload()
            _hook_block(state, name, block)
    if compute.type == "cuda":
        torch.cuda.empty_cache()
    setattr(model, _STATE_ATTR, state)
    logger.info(
        "offload %s: weights on %s, computing on %s (%.0f MB staged)",
        mode, staging, compute, sum(s.nbytes for s in state.staged.values()) / 2**20,
    )
    return state


def _hook_component(state: OffloadState, name: str, module: nn.Module) -> None:
    """Load the component when it or any direct child is called: the VAE is entered through `decode` / `encode`,
    which call its children, not its forward."""

    def pre_hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple:
        state.use_component(name)
        return _to_device(args, state.compute), _to_device(kwargs, state.compute)

    for target in (module, *module.children()):
        state.handles.append(target.register_forward_pre_hook(pre_hook, with_kwargs=True))


def _hook_block(state: OffloadState, name: str, block: nn.Module) -> None:
    def pre_hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple:
        state.use_component(None)
        state.load(name)
        return _to_device(args, state.compute), _to_device(kwargs, state.compute)

    def post_hook(_module: nn.Module, _args: tuple, _output: Any) -> None:
        state.unload(name)

    state.handles.append(block.register_forward_pre_hook(pre_hook, with_kwargs=True))
    state.handles.append(block.register_forward_hook(post_hook))


def remove_offload(model: nn.Module, device: Union[str, torch.device, None] = None) -> None:
    """Remove the hooks and put every weight on `device` (default: the compute device) for plain use again."""
    state = offload_state(model)
    if state is None:
        return
    for handle in state.handles:
        handle.remove()
    target = torch.device(device) if device is not None else state.compute
    for name in list(state.resident):
        state.unload(name)
    for staged in state.staged.values():
        for entry, t in staged.tensors.items():
            _Staged._set(entry, t.to(target, copy=t.is_pinned()))
    delattr(model, _STATE_ATTR)
    logger.debug("offload removed; weights on %s", target)
