"""Config instantiation and model loading (the original `ldm.util` entry points)."""
from __future__ import annotations

import contextlib
import importlib
import logging
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch

logger = logging.getLogger(__name__)


def exists(x: Any) -> bool:
    return x is not None


def default(val: Any, d: Any) -> Any:
    if exists(val):
        return val
    return d() if callable(d) else d


def count_params(model: torch.nn.Module, verbose: bool = False) -> int:
    total = sum(p.numel() for p in model.parameters())
    if verbose:
        logger.info("%s has %.2f M params.", model.__class__.__name__, total * 1e-6)
    return total


_INIT_FUNCTIONS = (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
    "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_",
)


@contextlib.contextmanager
def no_weight_init() -> Iterator[None]:
    """Build modules without random initialisation (parameters are allocated, not filled).

    Only for models whose every parameter is then loaded from a checkpoint under a strict key check: random init
    of SD's ~1B parameters costs tens of seconds on a CPU and is thrown away. Buffers computed in constructors
    (schedules, position ids) are unaffected.
    """
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS if hasattr(torch.nn.init, name)}

    def skip(tensor, *args, **kwargs):
        return tensor

    try:
        for name in saved:
            setattr(torch.nn.init, name, skip)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def get_obj_from_str(string: str, reload: bool = False) -> Any:
    module, cls = string.rsplit(".", 1)
    try:
        mod = importlib.import_module(module)
        if reload:
            mod = importlib.reload(mod)
        return getattr(mod, cls)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"config names {string!r}, which cannot be imported: {e}") from e


def instantiate_from_config(config: Any) -> Any:
    """Build `config.target` with `config.params`. The special strings of the original configs are returned
    unchanged for the caller to interpret."""
    if isinstance(config, str) and config in ("__is_first_stage__", "__is_unconditional__"):
        return None
    if not hasattr(config, "get") or "target" not in config:
        raise ValueError("Expected key `target` to instantiate.")
    params = config.get("params", None) or {}
    if hasattr(params, "items"):
        from omegaconf import OmegaConf

        params = OmegaConf.to_container(params, resolve=True) if OmegaConf.is_config(params) else dict(params)
    return get_obj_from_str(config["target"])(**params)


def load_config(config: Any) -> Any:
    """An OmegaConf object from a yaml path or an existing config/mapping."""
    from omegaconf import OmegaConf

    if isinstance(config, (str, Path)):
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        return OmegaConf.load(path)
    if OmegaConf.is_config(config):
        return config
    return OmegaConf.create(config)


def load_model_from_config(
    config: Any,
    ckpt: Union[str, Path, None],
    device: Union[str, torch.device] = "cpu",
    verbose: bool = False,
    use_ema: Optional[bool] = None,
) -> torch.nn.Module:
    """Build the model described by `config` (an OmegaConf object, a mapping, or a yaml path), load the weights of
    `ckpt` (.ckpt / .safetensors; None keeps random weights) with a strict key check, and return it in eval
    mode on `device`. `use_ema` overrides the config's `use_ema` (EMA weights are used when the file has them)."""
    from ldm.checkpoint import load_weights_into, read_checkpoint

    config = load_config(config)
    with no_weight_init() if ckpt is not None else contextlib.nullcontext():
        model = instantiate_from_config(config.model)
    if ckpt is not None:
        state_dict, meta = read_checkpoint(ckpt)
        if "global_step" in meta:
            logger.info("Global Step: %s", meta["global_step"])
        wants_ema = model.use_ema if use_ema is None else use_ema
        load_weights_into(model, state_dict, use_ema=wants_ema, source=str(ckpt))
    return model.requires_grad_(False).to(device).eval()
