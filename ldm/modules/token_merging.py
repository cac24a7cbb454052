"""Token merging for the UNet's transformer blocks (ToMe for SD: Bolya & Hoffman 2023, "Token Merging for Fast
Stable Diffusion"), an opt-in approximation.

Before a block's self-attention, `ratio` of its H*W tokens are merged into others by bipartite soft matching; the
attention runs on the N - r tokens left, and its output is copied back to every merged token ("unmerge"), so the
block's output has all N tokens again. The destination set is one token of every sy x sx cell of the token grid,
chosen at random per cell; every other token is a source. Each source is matched to its most similar destination
(cosine similarity of the block's input tokens), and the r sources with the most similar match are averaged into
their destinations. Self-attention has no positional encoding, so the order of the merged tokens does not matter.

The published defaults (the `tomesd` package): ratio 0.5 at most, only the blocks at the highest resolution
(max_downsample 1), sx = sy = 2, random destinations, merging for self-attention only (not for cross-attention or
the MLP, which cost quality for little time).

Randomness: the destination of each cell comes from a CPU generator seeded with (seed, denoiser call, block), and
every row of a call shares it, whatever the rows are (images, their unconditional halves, a split guidance call):
so an image does not depend on its micro-batch, and the two halves of guidance merge the same way. (`tomesd` draws
from one running generator per block and turns the randomness off for odd batch sizes for that reason.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

Merge = Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass(frozen=True)
class TokenMergeSettings:
    """ratio: the fraction of a block's tokens merged away (0 <= ratio <= 1 - 1 / (sx * sy)); max_downsample: merge
    in blocks whose feature map is at most this many times smaller than the latent; use_rand: a random destination
    per cell (else the top-left one); merge_*: which of the block's three parts run on merged tokens."""

    ratio: float = 0.5
    max_downsample: int = 1
    sx: int = 2
    sy: int = 2
    use_rand: bool = True
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        limit = 1.0 - 1.0 / (self.sx * self.sy)
        if not 0.0 <= self.ratio <= limit:
            raise ValueError(f"token merging ratio must be in [0, {limit:g}] for a {self.sx}x{self.sy} stride, got {self.ratio}")


def destination_offsets(h: int, w: int, sx: int, sy: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """The position of the destination token inside each full sy x sx cell: [h // sy, w // sx] in [0, sx * sy)
    (all 0 without a generator: the top-left token)."""
    shape = (h // sy, w // sx)
    if generator is None:
        return torch.zeros(shape, dtype=torch.int64)
    return torch.randint(sx * sy, shape, generator=generator)


def split_indices(h: int, w: int, sx: int, sy: int, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(src [N - D], dst [D]) token indices (row-major over the h x w grid, N = h * w) for destination `offsets`
    [h // sy, w // sx]: one destination per full cell; tokens outside full cells (a remainder row or column) are
    sources."""
    hc, wc = offsets.shape
    cy, cx = torch.meshgrid(torch.arange(hc), torch.arange(wc), indexing="ij")
    rows = cy * sy + offsets // sx
    cols = cx * sx + offsets % sx
    dst = (rows * w + cols).flatten().sort().values
    is_dst = torch.zeros(h * w, dtype=torch.bool)
    is_dst[dst] = True
    src = torch.nonzero(~is_dst).flatten()
    return src, dst


def bipartite_soft_matching(metric: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, r: int) -> tuple[Merge, Merge]:
    """(merge, unmerge) for tokens metric [B, N, C] split into sources and destinations (index tensors): merge
    [B, N, C'] -> [B, N - r, C'] averages the r sources most similar to their best destination into it;
    unmerge [B, N - r, C'] -> [B, N, C'] gives every merged source its destination's value back.

    Each row (image) is matched on its own metric."""
    b, n, _ = metric.shape
    r = min(r, src.numel())
    if r <= 0:
        return _identity, _identity
    device = metric.device
    src, dst = src.to(device), dst.to(device)
    with torch.no_grad():
        unit = metric / metric.norm(dim=-1, keepdim=True)
        # cosine similarity of every source to every destination: [B, Ns, Nd]
        scores = unit[:, src] @ unit[:, dst].transpose(-1, -2)
        best, best_dst = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True, stable=True)
        merged = order[:, :r]  # [B, r] positions in src, most similar first
        kept = order[:, r:]  # [B, Ns - r]
        target = best_dst.gather(-1, merged)  # [B, r] positions in dst
    n_kept = kept.shape[1]

    def merge(x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1]
        x_src, x_dst = x[:, src], x[:, dst]
        unm = x_src.gather(1, kept[..., None].expand(b, n_kept, c))
        moving = x_src.gather(1, merged[..., None].expand(b, r, c))
        # the mean of each destination and the sources merged into it
        x_dst = x_dst.scatter_reduce(1, target[..., None].expand(b, r, c), moving, reduce="mean", include_self=True)
        return torch.cat([unm, x_dst], dim=1)

    def unmerge(y: torch.Tensor) -> torch.Tensor:
        c = y.shape[-1]
        unm, y_dst = y[:, :n_kept], y[:, n_kept:]
        out = y.new_empty(b, n, c)
        out[:, dst] = y_dst
        src_of = src.expand(b, -1)
        out.scatter_(1, src_of.gather(1, kept)[..., None].expand(b, n_kept, c), unm)
        out.scatter_(1, src_of.gather(1, merged)[..., None].expand(b, r, c), y_dst.gather(1, target[..., None].expand(b, r, c)))
        return out

    return merge, unmerge


class TokenMerge:
    """The strategy a BasicTransformerBlock runs with while it is set as its `token_merge` (for one run).

    `step()` returns the current denoiser call (0-based); `block` numbers the block in the UNet, so that every block
    and call draws its own destinations."""

    def __init__(self, settings: TokenMergeSettings, step: Callable[[], int], block: int):
        self.settings = settings
        self.step = step
        self.block = block
        self._cache: Optional[tuple] = None

    def _indices(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.settings
        key = (self.step(), h, w)
        if self._cache is None or self._cache[0] != key:
            generator = None
            if s.use_rand:
                # a stream per (seed, call, block): the same for every row and micro-batch of a call
                generator = torch.Generator().manual_seed((s.seed * 1_000_003 + key[0]) * 1_009 + self.block)
            offsets = destination_offsets(h, w, s.sx, s.sy, generator)
            self._cache = (key, split_indices(h, w, s.sx, s.sy, offsets))
        return self._cache[1]

    def plan(self, x: torch.Tensor, grid: tuple[int, int]) -> tuple[Merge, Merge]:
        """(merge, unmerge) for the block input x [B, N = h * w, C] on the token grid (h, w)."""
        h, w = grid
        s = self.settings
        r = int(x.shape[1] * s.ratio)
        if r <= 0 or h < s.sy or w < s.sx:
            return _identity, _identity
        src, dst = self._indices(h, w)
        return bipartite_soft_matching(x, src, dst, r)
