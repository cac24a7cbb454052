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
    of SD's ~1B parameters costs tens of seconds on a CPU and is thrown away, and untouched parameters take no
    resident memory until the load writes them. Buffers computed in constructors (schedules, position ids) are
    unaffected. transformers' models (the CLIP text encoder) check `weight_init_skipped()` and skip their own
    initialisation too.
    """
    global _SKIP_INIT
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS if hasattr(torch.nn.init, name)}

    def skip(tensor, *args, **kwargs):
        return tensor

    previous = _SKIP_INIT
    try:
        for name in saved:
            setattr(torch.nn.init, name, skip)
        _SKIP_INIT = True
        yield
    finally:
        _SKIP_INIT = previous
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


_SKIP_INIT = False


def weight_init_skipped() -> bool:
    """True inside `no_weight_init`."""
    return _SKIP_INIT


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


def build_model(
    config: Any,
    state_dict: Optional[dict[str, torch.Tensor]] = None,
    source: str = "checkpoint",
    use_ema: Optional[bool] = None,
    vae: Union[str, Path, None] = None,
) -> torch.nn.Module:
    """The one model builder: build `config.model` (an OmegaConf object, a mapping, or a yaml path), load
    `state_dict` (from `ldm.checkpoint_layouts.read_model_checkpoint`; None keeps random weights) with a strict key
    check, and with `vae` the VAE weights of that file (a VAE-only file or a full checkpoint) in place of the
    checkpoint's own. `use_ema` overrides the config's `use_ema`. Returns the model on the CPU, in eval mode,
    without gradients, in the file's floating dtype cast to the config's (float32)."""
    from ldm.checkpoint import PageReleaser, load_weights_into, read_checkpoint
    from ldm.checkpoint_layouts import check_vae_fits, vae_weights

    config = load_config(config)
    if "model" not in config:
        raise ValueError("the config has no `model` section")
    vae_sd = vae_weights(read_checkpoint(vae)[0], str(vae)) if vae is not None else None
    with no_weight_init() if state_dict is not None else contextlib.nullcontext():
        model = instantiate_from_config(config.model)
    if vae_sd is not None:
        check_vae_fits(model.first_stage_model, vae_sd, str(vae))
    if state_dict is not None:
        if vae_sd is not None:
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("first_stage_model.")}
            state_dict.update({"first_stage_model." + k: v for k, v in vae_sd.items()})
        release = PageReleaser([source if Path(source).is_file() else None, vae])
        load_weights_into(model, state_dict, use_ema=model.use_ema if use_ema is None else use_ema, source=source, release=release)
    elif vae_sd is not None:
        model.first_stage_model.load_state_dict(vae_sd, strict=True)
    if vae_sd is not None:
        logger.info("VAE weights from %s (%d tensors) in place of the checkpoint's", vae, len(vae_sd))
    return model.requires_grad_(False).eval()


def load_model_from_config(
    config: Any,
    ckpt: Union[str, Path, None],
    device: Union[str, torch.device] = "cpu",
    verbose: bool = False,
    use_ema: Optional[bool] = None,
    vae: Union[str, Path, None] = None,
) -> torch.nn.Module:
    """Build the model described by `config` (an OmegaConf object, a mapping, or a yaml path), load the weights of
    `ckpt` (.ckpt / .safetensors, any layout of `ldm.checkpoint_layouts`; None keeps random weights) with a strict
    key check, optionally the VAE of the file `vae`, and return it in eval mode on `device`. `use_ema` overrides
    the config's `use_ema` (EMA weights are used when the file has them). Same loader as the scripts'."""
    from ldm.checkpoint_layouts import read_model_checkpoint

    state_dict = read_model_checkpoint(ckpt) if ckpt is not None else None
    model = build_model(config, state_dict, source=str(ckpt), use_ema=use_ema, vae=vae)
    return model.to(device)
