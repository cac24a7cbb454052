"""Procedural shapes data set for the demo model: one coloured shape on a plain background, with its caption.

Caption: `a {color} {shape} on a {background} background`, e.g. "a red circle on a gray background".
Images are uint8 RGB [size, size, 3]. Each shape is sampled at `supersample` times the resolution and
box-filtered down, so edges are anti-aliased: an edge pixel is the exact mix
`background + alpha * (color - background)` with alpha the covered fraction of the pixel. Mixing with a grey level
keeps the colour's hue, which is what `microbatch.demo.analyze` reads.

Geometry, in pixel units (pixel i covers [i, i+1), so the image spans [0, size]):
- square: axis-aligned, [cx - h, cx + h] x [cy - h, cy + h];
- circle: radius h around (cx, cy);
- triangle: apex up at (cx, cy - h), base corners (cx -/+ h, cy + h): inscribed in the square's box;
- cross (an upright plus sign): the union of the bars [cx - h, cx + h] x [cy - h/3, cy + h/3] and
  [cx - h/3, cx + h/3] x [cy - h, cy + h], each arm as wide as the box's middle third.

The demo model is trained on SHAPES only. "cross" (EXTRA_SHAPES) is the shape it does not know, taught to it by the
LoRA of `microbatch.demo.concept` (whose embedding teaches a new word for red, trained on make_dataset's `colors`);
the data of SHAPES (make_dataset with its default `shapes` and `colors`, all_combinations) is what it always was.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

COLORS: Dict[str, Tuple[int, int, int]] = {
    # Hues (HSV degrees): red 0, orange 29, yellow 54, green 120, blue 231, purple 280.
    "red": (220, 30, 30),
    "green": (30, 180, 30),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 20),
    "purple": (140, 40, 190),
    "orange": (245, 130, 20),
}
SHAPES: Tuple[str, ...] = ("circle", "square", "triangle")  # what the demo model is trained on
EXTRA_SHAPES: Tuple[str, ...] = ("cross",)  # drawn and analysed, never in the base model's data
ALL_SHAPES: Tuple[str, ...] = SHAPES + EXTRA_SHAPES
BACKGROUNDS: Dict[str, int] = {"white": 255, "black": 0, "gray": 128}

# Half-size range as a fraction of the image side (the prototype's figures, see the demo-model notes).
HALF_SIZE_RANGE = (0.22, 0.36)

Label = Tuple[str, str, str]


@dataclass(frozen=True)
class ShapeParams:
    """One sample's description: what to draw and where (centre and half-size in pixels)."""

    color: str
    shape: str
    background: str
    center: Tuple[float, float]
    half_size: float

    @property
    def label(self) -> Label:
        return (self.color, self.shape, self.background)


def caption(color: str, shape: str, background: str) -> str:
    """The training caption for one (color, shape, background) triple."""
    _check_label(color, shape, background)
    return f"a {color} {shape} on a {background} background"


def all_combinations() -> List[Label]:
    """All 6 * 3 * 3 = 54 (color, shape, background) triples of the base model's data, in a fixed order."""
    return list(itertools.product(COLORS, SHAPES, BACKGROUNDS))


def shape_combinations(shape: str) -> List[Label]:
    """The 6 * 3 = 18 (color, shape, background) triples of one shape (of ALL_SHAPES), in a fixed order."""
    _check_label(next(iter(COLORS)), shape, next(iter(BACKGROUNDS)))
    return list(itertools.product(COLORS, (shape,), BACKGROUNDS))


def _check_label(color: str, shape: str, background: str) -> None:
    if color not in COLORS:
        raise ValueError(f"unknown color {color!r}; expected one of {list(COLORS)}")
    if shape not in ALL_SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {list(ALL_SHAPES)}")
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; expected one of {list(BACKGROUNDS)}")


def shape_alpha(
    shape: str, size: int, center: Tuple[float, float], half_size: float, supersample: int = 4
) -> np.ndarray:
    """Coverage of each pixel by the shape: float32 [size, size] in [0, 1].

    The shape is sampled at supersample x supersample points per pixel (their centres) and the samples are
    averaged (a box filter). The membership tests are the analytic shapes, so the covered area converges to
    the exact one; PIL's ImageDraw includes both end pixels of a span, which inflates every shape by one
    sample along its outline (about 2% of the area at 4x).
    """
    if shape not in ALL_SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {list(ALL_SHAPES)}")
    if supersample < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    cx, cy = center
    h = half_size
    alpha = np.zeros((size, size), dtype=np.float32)
    # Only the pixels of the shape's box can be covered.
    x0, x1 = max(0, math.floor(cx - h)), min(size, math.ceil(cx + h))
    y0, y1 = max(0, math.floor(cy - h)), min(size, math.ceil(cy + h))
    if x0 >= x1 or y0 >= y1:
        return alpha
    dx = x0 + (np.arange((x1 - x0) * supersample) + 0.5) / supersample - cx
    dy = y0 + (np.arange((y1 - y0) * supersample) + 0.5) / supersample - cy
    dx, dy = dx[None, :], dy[:, None]
    if shape == "circle":
        inside = dx * dx + dy * dy < h * h
    elif shape == "square":
        inside = (np.abs(dx) < h) & (np.abs(dy) < h)
    elif shape == "cross":
        horizontal = (np.abs(dx) < h) & (np.abs(dy) < h / 3)
        inside = horizontal | ((np.abs(dx) < h / 3) & (np.abs(dy) < h))
    else:
        # Apex (0, -h), base from (-h, h) to (h, h): the half-width grows from 0 to h over the height 2h.
        inside = (dy >= -h) & (dy < h) & (np.abs(dx) < (dy + h) / 2)
    blocks = inside.reshape(y1 - y0, supersample, x1 - x0, supersample)
    alpha[y0:y1, x0:x1] = blocks.mean(axis=(1, 3), dtype=np.float32)
    return alpha


def render(
    color: str,
    shape: str,
    background: str,
    size: int = 64,
    center: Optional[Tuple[float, float]] = None,
    half_size: Optional[float] = None,
    supersample: int = 4,
) -> np.ndarray:
    """Draw one anti-aliased shape. Returns uint8 RGB [size, size, 3].

    Args:
        center: (cx, cy) in pixels, x to the right and y down; default the image centre.
        half_size: half the side of the shape's bounding box (a circle's radius), in pixels; default 0.3 * size.
        supersample: drawing resolution factor before the box-filter downsampling (1 = aliased edges).
    """
    _check_label(color, shape, background)
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if center is None:
        center = (size / 2, size / 2)
    if half_size is None:
        half_size = 0.3 * size
    if half_size <= 0:
        raise ValueError(f"half_size must be > 0, got {half_size}")
    alpha = shape_alpha(shape, size, center, half_size, supersample)[..., None]
    bg = np.float32(BACKGROUNDS[background])
    fg = np.asarray(COLORS[color], dtype=np.float32)
    image = bg + alpha * (fg - bg)
    return np.rint(image).astype(np.uint8)


def sample_params(rng: np.random.Generator, size: int, shapes: Sequence[str] = SHAPES, colors: Optional[Sequence[str]] = None) -> ShapeParams:
    """Uniform color (of `colors`, default all), shape (of `shapes`) and background; half-size uniform in
    HALF_SIZE_RANGE * size; centre uniform such that the shape's bounding box lies fully inside the image. The
    defaults draw exactly what they always drew."""
    colors = list(COLORS) if colors is None else list(colors)
    color = colors[rng.integers(len(colors))]
    shape = shapes[rng.integers(len(shapes))]
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    half_size = float(rng.uniform(HALF_SIZE_RANGE[0] * size, HALF_SIZE_RANGE[1] * size))
    cx, cy = rng.uniform(half_size, size - half_size, size=2)
    return ShapeParams(color, shape, background, (float(cx), float(cy)), half_size)


def make_dataset(
    n: int, seed: int, size: int = 64, supersample: int = 4, shapes: Sequence[str] = SHAPES, colors: Optional[Sequence[str]] = None
) -> Tuple[np.ndarray, List[str], List[Label]]:
    """`n` random samples of `shapes` (default: the base model's) in `colors` (default: all), a pure function of
    `seed` (np.random.default_rng(seed)).

    Returns images uint8 [n, size, size, 3], captions (list of n str) and labels (list of n
    (color, shape, background) triples).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    unknown = [s for s in shapes if s not in ALL_SHAPES]
    if not shapes or unknown:
        raise ValueError(f"shapes must be some of {list(ALL_SHAPES)}, got {list(shapes)}")
    if colors is not None and (not colors or any(c not in COLORS for c in colors)):
        raise ValueError(f"colors must be some of {list(COLORS)}, got {list(colors)}")
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    captions: List[str] = []
    labels: List[Label] = []
    for i in range(n):
        p = sample_params(rng, size, shapes, colors)
        images[i] = render(p.color, p.shape, p.background, size, p.center, p.half_size, supersample)
        captions.append(caption(*p.label))
        labels.append(p.label)
    return images, captions, labels
