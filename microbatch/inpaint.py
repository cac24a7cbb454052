"""Inpainting: repaint the white part of a mask in an image, guided by a prompt.

Two ways, chosen by the checkpoint:
- an inpainting model (SD 2 inpainting, `LatentInpaintDiffusion`, 9 UNet input channels): the UNet reads
  cat([x, mask, masked-image latent]) at every step, for the conditional and the unconditional half alike
  (`Engine.concat_latents`). The start is pure noise (--strength 1, the default); a lower strength starts from the
  noised image latent as img2img does.
- an ordinary 4-channel model: latent blending. Every denoised estimate keeps the init image's latent outside the
  mask (`Engine.keep_mask`, `BlendedDenoiser`), so the sampler only invents the masked region.

Image and mask are read at their own size; sides that are not multiples of the model's size multiple (64 for SD)
are padded by repeating the edge pixels (as the SD 2 inpainting demos do), and every output is cropped back, so
outputs align pixel for pixel with the input. Mask: luminance / 255, >= 0.5 means repaint. The masked image is
image * (mask < 0.5) (the hole is grey, 0 in [-1, 1]); its latent is the VAE posterior mean, scaled. The mask
reaches the latent grid by nearest-neighbour resizing.

Sampling, micro-batching, seeds, outputs and metrics are those of txt2img and img2img (`microbatch.pipeline`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.models.diffusion.ddpm import LatentInpaintDiffusion
from microbatch.engine import Engine
from microbatch.request import UsageError

logger = logging.getLogger(__name__)


def _open(path: Union[Path, Image.Image], mode: str, what: str) -> Image.Image:
    if isinstance(path, Image.Image):
        return path.convert(mode)
    try:
        with Image.open(path) as im:
            return im.convert(mode)
    except FileNotFoundError:
        raise ValueError(f"{what} not found: {path}") from None
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"{what} {path} could not be read as an image ({e})") from None


def load_image_and_mask(image_path: Union[Path, Image.Image], mask_path: Union[Path, Image.Image], multiple: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int], list[str]]:
    """Read (paths or PIL images), binarise and edge-pad an image and its mask.

    Returns image [1, 3, H, W] in [-1, 1], mask [1, 1, H, W] in {0, 1} (1 = repaint), the original (width,
    height), and notes for the user. H and W are the original sides rounded up to multiples of `multiple`. A mask
    of another size is resized to the image (nearest neighbour).
    """
    image = _open(image_path, "RGB", "init image")
    mask = _open(mask_path, "L", "mask")
    notes = []
    w, h = image.size
    if mask.size != image.size:
        notes.append(f"note: mask {mask.size[0]}x{mask.size[1]} resized to the image's {w}x{h} (nearest)")
        mask = mask.resize(image.size, resample=Image.NEAREST)
    pad_h, pad_w = -h % multiple, -w % multiple
    if pad_h or pad_w:
        notes.append(
            f"note: image {w}x{h} padded (edge pixels repeated) to {w + pad_w}x{h + pad_h}, a multiple of {multiple}; "
            f"outputs are cropped back to {w}x{h}"
        )
    pixels = np.pad(np.asarray(image, dtype=np.float32), ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    holes = np.pad(np.asarray(mask, dtype=np.float32) / 255.0, ((0, pad_h), (0, pad_w)), mode="edge")
    image_t = torch.from_numpy(pixels / 127.5 - 1.0).permute(2, 0, 1)[None]
    mask_t = torch.from_numpy((holes >= 0.5).astype(np.float32))[None, None]
    return image_t, mask_t, (w, h), notes


class CroppingEngine(Engine):
    """An Engine whose decoded images are cropped to `crop` = (height, width) (the unpadded input size)."""

    crop: Optional[tuple[int, int]] = None

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        images = super().decode(latents)
        if self.crop is None:
            return images
        return images[..., : self.crop[0], : self.crop[1]].contiguous()


def setup_inpainting(session: Any, engine: Engine, image: torch.Tensor, mask: torch.Tensor) -> str:
    """`session`: anything with the loaded `.model` and its `.device` (a Pipeline). Prepare `engine` to inpaint `image` [1, 3, H, W] where `mask` [1, 1, H, W] is 1. Returns "concat" (an
    inpainting model reads the mask and masked image) or "blend" (latent blending with an ordinary model)."""
    model = session.model
    device = session.device
    unet = model.model.diffusion_model
    image, mask = image.to(device), mask.to(device)
    with torch.no_grad():
        engine.init_posterior = model.encode_first_stage(image)
        if isinstance(model, LatentInpaintDiffusion):
            engine.concat_latents = model.get_concat_conditioning(image, mask)
            return "concat"
        if unet.in_channels != model.channels:
            raise UsageError(
                f"the model's UNet takes {unet.in_channels} input channels but it is not an inpainting model "
                f"({type(model).__name__}); pass --config with an inpainting yaml (LatentInpaintDiffusion)"
            )
        latent_size = engine.init_posterior.mean.shape[-2:]
        engine.keep_mask = 1.0 - F.interpolate(mask.float(), size=latent_size)
    return "blend"
