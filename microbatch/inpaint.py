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
reaches the latent grid by nearest-neighbour resizing. Decoded outputs are composited over the init image outside
the mask widened by a few pixels and feathered (`composite_outside_mask`), as the web UIs do: farther from the mask
the saved pixels are the input's, byte for byte.

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


# Compositing the init image back over the decoded outputs (`composite_outside_mask`): every pixel farther than
# COMPOSITE_DILATE + COMPOSITE_FEATHER pixels from the mask is the init image's, exactly; the repainted region is
# widened by COMPOSITE_DILATE pixels and fades into the init image over COMPOSITE_FEATHER more (one latent cell, 8
# pixels, in all: the mask reaches the latent grid by nearest resizing, so repainted latents may overhang it by up
# to 7 pixels). Without it, latent blending changed pixels everywhere: the VAE round trip alone misses a demo image
# by up to 193 of 255 levels, and decoding mixes the repainted latents into their neighbours.
COMPOSITE_DILATE = 2
COMPOSITE_FEATHER = 6


def repaint_weight(mask: torch.Tensor, dilate: int = COMPOSITE_DILATE, feather: int = COMPOSITE_FEATHER) -> torch.Tensor:
    """Per-pixel weight of the generated image: 1 on the mask and within `dilate` pixels of it, falling linearly
    to 0 over the next `feather` pixels ((dilate + feather + 1 - d) / (feather + 1) at distance d), 0 beyond.

    Distance is octagonal (alternating 3x3 square and plus-shaped dilations): at most 12% beyond Euclidean.
    mask: [1, 1, H, W] in {0, 1} (1 = repaint). Returns [1, 1, H, W] float32 in [0, 1].
    """
    if dilate < 0 or feather < 0:
        raise ValueError(f"dilate and feather must be >= 0 pixels, got {dilate} and {feather}")
    grown = (mask > 0.5).float()
    total = torch.zeros_like(grown)
    for r in range(dilate + feather + 1):
        if r > 0:
            if r % 2:
                grown = F.max_pool2d(grown, 3, stride=1, padding=1)
            else:
                grown = torch.maximum(F.max_pool2d(grown, (3, 1), stride=1, padding=(1, 0)), F.max_pool2d(grown, (1, 3), stride=1, padding=(0, 1)))
        if r >= dilate:
            total += grown
    return total / (feather + 1)


def composite_outside_mask(
    images: torch.Tensor, init_image: torch.Tensor, mask: torch.Tensor, dilate: int = COMPOSITE_DILATE, feather: int = COMPOSITE_FEATHER
) -> torch.Tensor:
    """Put the init image back outside the (dilated, feathered) mask, as the web UIs do after inpainting.

    Args:
        images: decoded outputs [B, 3, H, W] in [0, 1].
        init_image: the init image [1, 3, H, W] in [-1, 1] (as `load_image_and_mask` returns it, 8-bit levels).
        mask: [1, 1, H, W] in {0, 1}, 1 = repaint.
    Returns:
        [B, 3, H, W] in [0, 1]: w * images + (1 - w) * init with w = repaint_weight(mask, dilate, feather). The
        init image enters at the centres of its 8-bit levels ((level + 0.5) / 255), so where w = 0 the saved PNG
        (uint8(255 x), truncating) has exactly the init image's pixels.
    """
    levels = torch.round((init_image.float() + 1.0) * 127.5).clamp(0, 255)
    init01 = ((levels + 0.5) / 255.0).to(images.device)
    w = repaint_weight(mask.float(), dilate, feather).to(images.device)
    return w * images + (1.0 - w) * init01


class CroppingEngine(Engine):
    """An Engine whose decoded images are composited over the init image outside the mask (`overlay`, set by
    `enable_composite`) and cropped to `crop` = (height, width) (the unpadded input size)."""

    crop: Optional[tuple[int, int]] = None
    # (init image [1, 3, H, W] in [-1, 1], mask [1, 1, H, W], dilate, feather) at the padded size, or None.
    overlay: Optional[tuple[torch.Tensor, torch.Tensor, int, int]] = None

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        images = super().decode(latents)
        if self.overlay is not None:
            init_image, mask, dilate, feather = self.overlay
            images = composite_outside_mask(images, init_image, mask, dilate, feather)
        if self.crop is None:
            return images
        return images[..., : self.crop[0], : self.crop[1]].contiguous()


def enable_composite(engine: Engine, image: torch.Tensor, mask: torch.Tensor, dilate: int = COMPOSITE_DILATE, feather: int = COMPOSITE_FEATHER) -> None:
    """Make a CroppingEngine composite its outputs over `image` [1, 3, H, W] (in [-1, 1]) outside `mask`
    [1, 1, H, W] (1 = repaint), see `composite_outside_mask`. A plain Engine is left as it is."""
    repaint_weight(mask, dilate, feather)  # validates dilate and feather
    if isinstance(engine, CroppingEngine):
        engine.overlay = (image.detach().cpu(), mask.detach().cpu(), int(dilate), int(feather))


def setup_inpainting(session: Any, engine: Engine, image: torch.Tensor, mask: torch.Tensor) -> str:
    """`session`: anything with the loaded `.model` and its `.device` (a Pipeline). Prepare `engine` to inpaint `image` [1, 3, H, W] where `mask` [1, 1, H, W] is 1. Returns "concat" (an
    inpainting model reads the mask and masked image) or "blend" (latent blending with an ordinary model)."""
    model = session.model
    device = session.device
    unet = model.model.diffusion_model
    enable_composite(engine, image, mask)
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
