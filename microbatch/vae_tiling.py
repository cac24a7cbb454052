"""Tiled VAE decoding and encoding: large images through the VAE in overlapping tiles, blended without seams.

The VAE decoder's activations at full resolution are what runs out of memory at large sizes: its last level holds
128-channel maps at the output resolution (SD v1: 128 x 2048 x 2048 x 4 bytes = 2 GiB per map in float32 at
2048x2048, several alive at once), and its mid-block attention is global over the latent. Decoding a tile of
`tile` x `tile` latents bounds those maps to the tile, so the peak no longer grows with the image: only the output
image and the running weight sum do (3 + 1 float32 planes per pixel).

Tiles overlap by at least `overlap` latents. In an overlap, the two tiles' outputs are mixed with complementary
ramps (cosine or linear) that sum to one, so each tile's least reliable pixels (its borders, where the convolutions
saw padding instead of the neighbouring content) get weights near zero and no hard edge is left. A tiled result is
not bit-identical to a whole decode: GroupNorm statistics and the mid-block attention see one tile, not the image.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from microbatch.loading import vae_factor_of

logger = logging.getLogger(__name__)

Blend = Literal["cosine", "linear"]
TilingMode = Literal["auto", "on", "off"]

DEFAULT_TILE = 64  # latents per tile side: 512 pixels at f = 8, the size the SD VAE was trained at
DEFAULT_OVERLAP = 16  # latents shared by neighbouring tiles: 128 pixels of blending
# The smallest tile and overlap TileSettings (the scripts' --vae_tile, --vae_tile_overlap) accept. A tile's pixels
# near its border saw zero padding instead of the neighbouring latents, and its GroupNorm statistics come from the
# tile alone. Measured on the demo VAE's decoder with GroupNorm made a fixed affine map and the mid attention removed
# (as in tests/test_vae_tiling.py), 96x96 latents, error in % of the largest output value: tile 16, overlap 0 / 2 / 4 / 8:
# max 66 / 33 / 7.7 / 2.0 %, tile 32 overlap 8: 1.3 %, tile 64 overlap 16: 0.1 %. With its real GroupNorm, tiles of
# 4 latents on a 64x64 demo image miss by up to 246 of 255 levels (mean 16): the garbage of `--vae_tile 4`.
MIN_TILE = 16
MIN_OVERLAP = 8


@dataclass(frozen=True)
class TileSettings:
    """When and how to tile. `mode` "auto" tiles latents with a side longer than `auto_above` (default 2 x tile:
    images above 1024 pixels at f = 8, where a whole decode needs several GiB); "on" tiles whenever the latent is
    larger than one tile; "off" never tiles. `tile` >= MIN_TILE and `overlap` >= MIN_OVERLAP (the low-level
    decode_tiled / encode_tiled accept any tile >= 2, for tests and measurements)."""

    mode: TilingMode = "auto"
    tile: int = DEFAULT_TILE
    overlap: int = DEFAULT_OVERLAP
    blend: Blend = "cosine"
    auto_above: int = 2 * DEFAULT_TILE

    def __post_init__(self) -> None:
        _check(self.tile, self.overlap, self.blend)
        if self.tile < MIN_TILE:
            raise ValueError(f"VAE tile must be at least {MIN_TILE} latents ({8 * MIN_TILE} pixels at f = 8), got {self.tile}")
        if self.overlap < MIN_OVERLAP:
            raise ValueError(f"VAE tile overlap must be at least {MIN_OVERLAP} latents ({8 * MIN_OVERLAP} pixels at f = 8), got {self.overlap}")
        if self.mode not in ("auto", "on", "off"):
            raise ValueError(f"VAE tiling mode must be auto, on or off, got {self.mode!r}")

    def applies(self, latent_h: int, latent_w: int) -> bool:
        if self.mode == "off":
            return False
        limit = self.tile if self.mode == "on" else self.auto_above
        return max(latent_h, latent_w) > limit


def _check(tile: int, overlap: int, blend: str) -> None:
    if tile < 2:
        raise ValueError(f"VAE tile must be at least 2 latents, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"VAE tile overlap must be in [0, tile={tile}), got {overlap}")
    if blend not in ("cosine", "linear"):
        raise ValueError(f"VAE tile blend must be cosine or linear, got {blend!r}")


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Offsets of the fewest tiles of size `tile` that cover [0, length) with neighbours sharing at least
    `overlap` positions, spread evenly (so every overlap is `overlap` or a little more). One tile at 0 when
    length <= tile."""
    if length <= tile:
        return [0]
    n = math.ceil((length - tile) / (tile - overlap)) + 1
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def ramp(n: int, blend: Blend = "cosine") -> torch.Tensor:
    """Rising weights [n] in (0, 1) at the centres of n cells, with ramp[i] + ramp[n - 1 - i] = 1, so a rising and
    a falling ramp over the same overlap sum to one: linear (i + 1/2) / n, or cosine 1/2 - cos(pi (i + 1/2) / n) / 2
    (flatter at both ends, so a tile's border pixels get even less weight)."""
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    w = u if blend == "linear" else 0.5 - 0.5 * torch.cos(math.pi * u)
    return w.float()


def axis_weights(starts: list[int], size: int, scale: int, blend: Blend) -> list[torch.Tensor]:
    """Per tile, weights [size * scale] along one axis: 1 inside, rising over the overlap with the previous tile and
    falling over the overlap with the next one. `size` is the tile size in latents, `scale` the pixels per latent."""
    weights = []
    for i, start in enumerate(starts):
        w = torch.ones(size * scale)
        if i > 0:
            ov = (starts[i - 1] + size - start) * scale
            w[:ov] *= ramp(ov, blend)
        if i < len(starts) - 1:
            ov = (start + size - starts[i + 1]) * scale
            w[size * scale - ov :] *= ramp(ov, blend).flip(0)
        weights.append(w)
    return weights


def _blend_tiles(
    shape_hw: tuple[int, int], tile: int, overlap: int, blend: Blend, scale: int, run_tile
) -> torch.Tensor:
    """Run run_tile(r, c, th, tw) -> [B, K, th * scale, tw * scale] on every tile (r, c in latents) and blend."""
    h, w = shape_hw
    th, tw = min(tile, h), min(tile, w)
    rows, cols = tile_starts(h, th, min(overlap, th - 1)), tile_starts(w, tw, min(overlap, tw - 1))
    wy, wx = axis_weights(rows, th, scale, blend), axis_weights(cols, tw, scale, blend)
    out = total = None
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            part = run_tile(r, c, th, tw)
            if out is None:
                out = torch.zeros((*part.shape[:2], h * scale, w * scale), dtype=torch.float32, device=part.device)
                total = torch.zeros((h * scale, w * scale), dtype=torch.float32, device=part.device)
            weight = (wy[i][:, None] * wx[j][None, :]).to(part.device)
            ys, xs = slice(r * scale, (r + th) * scale), slice(c * scale, (c + tw) * scale)
            out[:, :, ys, xs] += part.float() * weight
            total[ys, xs] += weight
            del part
    assert out is not None and total is not None and bool((total > 0).all()), "tiles do not cover the image"
    return out / total


@torch.no_grad()
def decode_tiled(
    model: Any, z: torch.Tensor, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP, blend: Blend = "cosine"
) -> torch.Tensor:
    """Decode scaled latents tile by tile, as `model.decode_first_stage` does whole.

    Args:
        model: a LatentDiffusion.
        z: scaled latents [B, C, h, w], as passed to `decode_first_stage`.
        tile: tile side in latents (x f pixels); a latent no larger than one tile is decoded whole, unchanged.
        overlap: latents shared by neighbouring tiles (at least; tiles are spread evenly).
        blend: shape of the weight ramps across an overlap.
    Returns:
        images [B, 3, f h, f w] in the VAE's dtype, nominally in [-1, 1].
    """
    _check(tile, overlap, blend)
    h, w = z.shape[-2:]
    if h <= tile and w <= tile:
        return model.decode_first_stage(z)
    f = vae_factor_of(model)
    dtype = []

    def run_tile(r: int, c: int, th: int, tw: int) -> torch.Tensor:
        x = model.decode_first_stage(z[:, :, r : r + th, c : c + tw])
        dtype.append(x.dtype)
        return x

    out = _blend_tiles((h, w), tile, overlap, blend, f, run_tile)
    logger.debug("decoded latents %s in tiles of %d with overlap %d", tuple(z.shape), tile, overlap)
    return out.to(dtype[0])


@torch.no_grad()
def encode_tiled(
    model: Any, x: torch.Tensor, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP, blend: Blend = "cosine"
) -> DiagonalGaussianDistribution:
    """Encode images tile by tile, as `model.encode_first_stage` does whole; the posterior moments (mean and
    log-variance) of overlapping tiles are blended in latent space.

    Args:
        model: a LatentDiffusion.
        x: images [B, 3, H, W] in [-1, 1]; H and W multiples of the VAE factor f.
        tile, overlap: in latents (x f pixels), as for `decode_tiled`.
    Returns:
        the posterior over unscaled latents [B, C, H/f, W/f].
    """
    _check(tile, overlap, blend)
    f = vae_factor_of(model)
    if x.shape[-2] % f or x.shape[-1] % f:
        raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of the VAE factor {f}")
    h, w = x.shape[-2] // f, x.shape[-1] // f
    if h <= tile and w <= tile:
        return model.encode_first_stage(x)

    def run_tile(r: int, c: int, th: int, tw: int) -> torch.Tensor:
        return model.encode_first_stage(x[:, :, r * f : (r + th) * f, c * f : (c + tw) * f]).parameters

    moments = _blend_tiles((h, w), tile, overlap, blend, 1, run_tile)
    return DiagonalGaussianDistribution(moments)
