"""Deterministic judge of a shapes image: which colour, shape and background does it show?

Used to measure the demo model's prompt adherence (see `microbatch.demo.shapes` for the data it is trained on).
Plain image statistics, no learned parts:
- background: median RGB of the outer ring of pixels; its luminance picks the nearest of white / black / gray.
- foreground: pixels far from that background colour. The cut is half of the foreground's contrast, so the mask
  edge sits where an anti-aliased or blurred edge is half covered, whatever the colour pair. Only the largest
  4-connected component is kept, so specks of noise do not stretch the bounding box.
- colour: circular median hue of the foreground's chromatic pixels -> the palette colour of nearest hue.
- shape: fill ratio of the mask in its bounding box (square 1, circle pi/4, triangle 1/2), with the taper of the
  mask (width of the top quarter of rows over the bottom quarter; about 1/7 for an upright triangle) as a second
  cue for soft, generated triangles. A cross (the shape the base model does not know, see shapes.EXTRA_SHAPES) is
  told by the box's 3 x 3 grid: its four corner cells empty, its four edge-middle cells (the arms) full. Every other
  shape has corners at least 0.38 covered (a triangle's top corners are empty, its bottom ones 3/4 full), so the
  rule changes no circle, square or triangle.
Anything with less than MIN_FOREGROUND_FRACTION of the image in the foreground is "none" for colour and shape.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

import numpy as np

from .shapes import BACKGROUNDS, COLORS

BORDER_WIDTH = 2
# Euclidean RGB distance from the background below which a pixel is background whatever the contrast;
# Gaussian noise of std 8 per channel exceeds 40 with probability ~1e-5.
MIN_DISTANCE = 40.0
MIN_FOREGROUND_FRACTION = 0.01
# A pixel counts for the hue only if max - min of its channels (HSV chroma, grey levels) is at least this.
MIN_CHROMA = 40.0
# Fill-ratio cuts near the midpoints of 1/2, pi/4 and 1. Ranges measured over 1,800 random renders per shape,
# clean / after GaussianBlur(1) + noise std 8:
#   64 px: circle 0.74..0.83 / 0.74..0.83, square 0.996..1 / 0.97..1, triangle 0.50..0.57 / 0.52..0.60;
#   32 px: circle 0.70..0.87 / 0.69..0.86 (a small digitised circle is boxy), square 0.98..1 / 0.93..1,
#          triangle 0.50..0.65 / 0.52..0.70 (a blurred apex is cut off; the taper, at most 0.37, still says
#          triangle, where circles measure 0.58 and more).
SQUARE_MIN_FILL = 0.9
CIRCLE_MIN_FILL = 0.64  # between 1/2 and pi/4
TRIANGLE_MAX_TAPER = 0.5
TAPER_CUE_MAX_FILL = 0.8  # the taper overrides the fill ratio only between triangle and circle
# See _bounding_box: an outer line under half as long as the straight edge inside it is noise.
# Cross: mean coverage of the bounding box's four corner cells (of a 3 x 3 grid) at most CROSS_MAX_CORNER, of its
# four edge-middle cells at least CROSS_MIN_ARMS. Measured over 96 random renders per shape at 64 px, clean /
# GaussianBlur(1) + noise std 8 / through the demo model's autoencoder, and at 32 px: corners of circles 0.42..0.72,
# triangles 0.38..0.48, squares 0.94..1, crosses 0.00..0.16 (autoencoder reconstructions: 0.00..0.46, 97% under
# 0.3); arms of crosses 0.75..1.
CROSS_MAX_CORNER = 0.3
CROSS_MIN_ARMS = 0.7
SPECKLE_FRACTION = 0.5
STRAIGHT_EDGE_RATIO = 0.85

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)  # Rec. 601


def rgb_hue(rgb: np.ndarray) -> np.ndarray:
    """HSV hue in degrees [0, 360) of RGB values [..., 3] (any scale); 0 where the colour is grey."""
    rgb = np.asarray(rgb, dtype=np.float64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    top, bottom = rgb.max(axis=-1), rgb.min(axis=-1)
    chroma = top - bottom
    safe = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(
        top == r, ((g - b) / safe) % 6.0, np.where(top == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0)
    )
    return np.where(chroma > 0, hue * 60.0, 0.0) % 360.0


PALETTE_HUES: Dict[str, float] = {name: float(rgb_hue(np.array(rgb))) for name, rgb in COLORS.items()}


def hue_distance(a: np.ndarray, b: float) -> np.ndarray:
    """Circular distance between hues in degrees, in [0, 180]."""
    d = np.abs(np.asarray(a, dtype=np.float64) - b) % 360.0
    return np.minimum(d, 360.0 - d)


def circular_median(hues: np.ndarray) -> float:
    """Median of hues in degrees, taken on deviations from their circular mean so that red's wrap at 0 is harmless."""
    angles = np.deg2rad(hues)
    mean = math.atan2(float(np.sin(angles).mean()), float(np.cos(angles).mean()))
    deviations = (angles - mean + math.pi) % (2 * math.pi) - math.pi
    return float(np.rad2deg(mean + np.median(deviations)) % 360.0)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask [H, W] (all False if the mask is empty)."""
    h, w = mask.shape
    if not mask.any():
        return mask.copy()
    big = np.iinfo(np.int64).max
    # Each pixel's label is the smallest flat index reachable so far; labels[label] is in the same component and
    # no larger, so pointer jumping (labels = labels[labels]) shortcuts long chains.
    index = np.arange(h * w, dtype=np.int64).reshape(h, w)
    labels = np.where(mask, index, big)
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        smallest = np.minimum.reduce(
            [labels, padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
        )
        new = np.where(mask, smallest, big)
        flat = new.ravel()
        inside = flat != big
        flat[inside] = flat[flat[inside]]
        if np.array_equal(new, labels):
            break
        labels = new
    ids, counts = np.unique(labels[mask], return_counts=True)
    return labels == ids[np.argmax(counts)]


@dataclass(frozen=True)
class Analysis:
    """What `analyze` saw. color / shape are "none" when no foreground was found.

    Diagnostics: fill_ratio (mask area / bounding-box area), taper (mean width of the top quarter of the mask's
    rows / the bottom quarter's), hue (degrees, NaN without chromatic foreground), border_luminance (0..255),
    foreground_fraction (mask area / image area), corner_fill (mean coverage of the four corner cells of the bounding
    box's 3 x 3 grid).
    """

    color: str
    shape: str
    background: str
    fill_ratio: float
    taper: float
    hue: float
    border_luminance: float
    foreground_fraction: float
    corner_fill: float = float("nan")


def _border_pixels(image: np.ndarray, width: int) -> np.ndarray:
    ring = np.ones(image.shape[:2], dtype=bool)
    ring[width:-width, width:-width] = False
    return image[ring]


def _trim_speckle(counts: np.ndarray, first: int, last: int) -> Tuple[int, int]:
    """Drop the outer line at either end of [first, last] if it is a speckle on a straight edge."""

    def speckle(outer: int, inner: int, next_inner: int) -> bool:
        straight = counts[inner] >= STRAIGHT_EDGE_RATIO * counts[next_inner]
        return straight and counts[outer] < SPECKLE_FRACTION * counts[inner]

    if last - first > 3 and speckle(first, first + 1, first + 2):
        first += 1
    if last - first > 3 and speckle(last, last - 1, last - 2):
        last -= 1
    return first, last


def _bounding_box(mask: np.ndarray) -> np.ndarray:
    """The mask cropped to its bounding box, less one speckled outer row / column per side.

    Noise along a straight edge that is about half covered switches a few pixels of the next row on. A boundary
    row (column) with under SPECKLE_FRACTION of its inner neighbour's pixels, where that neighbour is about as
    long as the line after it (a straight edge), is taken for such a speckle. The outer rows of a circle or a
    triangle's apex grow from line to line and are kept.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    r0, r1 = _trim_speckle(mask.sum(axis=1), rows[0], rows[-1])
    c0, c1 = _trim_speckle(mask.sum(axis=0), cols[0], cols[-1])
    return mask[r0 : r1 + 1, c0 : c1 + 1]


def grid_coverage(box: np.ndarray) -> np.ndarray:
    """Mean of a boolean box [H, W] in each cell of its 3 x 3 grid (cut at the nearest pixel to each third):
    float [3, 3], row-major from the top left; an empty cell (a box under 3 pixels across) counts 0."""
    h, w = box.shape
    r = [0, round(h / 3), round(2 * h / 3), h]
    c = [0, round(w / 3), round(2 * w / 3), w]
    cells = np.zeros((3, 3))
    for i in range(3):
        for j in range(3):
            cell = box[r[i] : r[i + 1], c[j] : c[j + 1]]
            cells[i, j] = cell.mean() if cell.size else 0.0
    return cells


def _classify_shape(mask: np.ndarray) -> Tuple[str, float, float, float]:
    """(shape, fill_ratio, taper, corner_fill) of a non-empty boolean mask [H, W]."""
    box = _bounding_box(mask)
    fill = float(box.mean())
    widths = box.sum(axis=1).astype(np.float64)
    quarter = max(1, len(widths) // 4)
    taper = float(widths[:quarter].mean() / max(widths[-quarter:].mean(), 1.0))
    cells = grid_coverage(box)
    corners = float(cells[[0, 0, 2, 2], [0, 2, 0, 2]].mean())
    arms = float(cells[[0, 1, 1, 2], [1, 0, 2, 1]].mean())
    if corners <= CROSS_MAX_CORNER and arms >= CROSS_MIN_ARMS:
        shape = "cross"
    elif fill >= SQUARE_MIN_FILL:
        shape = "square"
    elif fill < CIRCLE_MIN_FILL or (fill < TAPER_CUE_MAX_FILL and taper < TRIANGLE_MAX_TAPER):
        shape = "triangle"
    else:
        shape = "circle"
    return shape, fill, taper, corners


def analyze(image: np.ndarray) -> Analysis:
    """Classify a uint8 RGB image [H, W, 3] (H, W >= 8) into (color, shape, background)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 4 * BORDER_WIDTH:
        raise ValueError(f"expected an RGB image [H, W, 3] with H, W >= {4 * BORDER_WIDTH}, got {image.shape}")
    pixels = image.astype(np.float64)

    # The shape may touch the border (its box can reach the edge), so take a median, not a mean.
    bg_rgb = np.median(_border_pixels(pixels, BORDER_WIDTH), axis=0)
    border_luminance = float(bg_rgb @ LUMA)
    background = min(BACKGROUNDS, key=lambda name: abs(BACKGROUNDS[name] - border_luminance))

    distance = np.linalg.norm(pixels - bg_rgb, axis=-1)
    candidate = distance > MIN_DISTANCE
    none = Analysis("none", "none", background, 0.0, float("nan"), float("nan"), border_luminance, 0.0)
    if candidate.mean() < MIN_FOREGROUND_FRACTION:
        return none
    # The 90th percentile is a solid-interior pixel: the foreground's full contrast against the background.
    contrast = float(np.percentile(distance[candidate], 90))
    mask = largest_component(distance > max(MIN_DISTANCE, 0.5 * contrast))
    foreground_fraction = float(mask.mean())
    if foreground_fraction < MIN_FOREGROUND_FRACTION:
        return none

    shape, fill, taper, corners = _classify_shape(mask)
    fg = pixels[mask]
    chromatic = fg[fg.max(axis=1) - fg.min(axis=1) >= MIN_CHROMA]
    if len(chromatic) < max(1, 0.1 * len(fg)):
        color, hue = "none", float("nan")
    else:
        hue = circular_median(rgb_hue(chromatic))
        color = min(PALETTE_HUES, key=lambda name: float(hue_distance(hue, PALETTE_HUES[name])))
    return Analysis(color, shape, background, fill, taper, hue, border_luminance, foreground_fraction, corners)


def score(image: np.ndarray, expected: Sequence[str]) -> Dict[str, bool]:
    """Does `image` show the expected (color, shape, background)? Keys color, shape, background, all."""
    if len(expected) != 3:
        raise ValueError(f"expected a (color, shape, background) triple, got {expected!r}")
    color, shape, background = expected
    a = analyze(image)
    result = {"color": a.color == color, "shape": a.shape == shape, "background": a.background == background}
    result["all"] = all(result.values())
    return result
