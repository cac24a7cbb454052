"""Images in and out: numbered, atomically written PNGs with generation metadata; grids; init images."""
from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from microbatch.files import honour_umask

logger = logging.getLogger(__name__)

_NUMBERED = re.compile(r"^(\d+)\.png$")
_GRID = re.compile(r"^grid-(\d+)\.png$")


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[3, H, W] float in [0, 1] -> [H, W, 3] uint8 by truncation (uint8(255 x)), as the original scripts."""
    return (255.0 * image.permute(1, 2, 0).numpy()).astype(np.uint8)


def next_number(folder: Path, pattern: re.Pattern = _NUMBERED) -> int:
    """One past the highest number used by files matching pattern in folder (0 when none): numbering continues
    after existing files and never reuses a name, even when earlier files were deleted."""
    highest = -1
    if folder.is_dir():
        for name in os.listdir(folder):
            m = pattern.match(name)
            if m:
                highest = max(highest, int(m.group(1)))
    return highest + 1


# The temporary files of save_png_atomic: a writer killed while saving leaves one (see job.remove_partials).
PARTIAL_PREFIX = ".partial-"


def save_png_atomic(
    array: np.ndarray, folder: Path, number: int, fmt: str = "{:05}.png", text: Optional[dict[str, str]] = None, replace: bool = False
) -> Path:
    """Write array as folder/fmt.format(n) for the first n >= number that is free, never overwriting a file; with
    `replace`, as exactly folder/fmt.format(number), atomically replacing a file of that name (a job's item file).

    The PNG is written to a temporary file in the same folder and then linked (or renamed) into place, so a reader
    never sees a partial image.
    """
    folder.mkdir(parents=True, exist_ok=True)
    info = None
    if text:
        info = PngImagePlugin.PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
    fd, tmp = tempfile.mkstemp(prefix=PARTIAL_PREFIX, suffix=".png", dir=folder)
    try:
        honour_umask(tmp)  # mkstemp creates 0600; saved images get the umask's mode, 0644 under 0022
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(array).save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            target = folder / fmt.format(number)
            os.replace(tmp, target)
            return target
        n = number
        while True:
            target = folder / fmt.format(n)
            try:
                os.link(tmp, target)  # fails if target exists: no overwrite
                return target
            except FileExistsError:
                n += 1
            except OSError:
                # File systems without hard links: a rename that first checks the name is free.
                if target.exists():
                    n += 1
                    continue
                os.replace(tmp, target)
                return target
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def make_grid(images: Sequence[np.ndarray], nrow: int, padding: int = 2) -> np.ndarray:
    """Tile [H, W, 3] uint8 images, nrow per row, with black padding (torchvision make_grid's layout)."""
    if not images:
        raise ValueError("no images for a grid")
    n = len(images)
    h, w = images[0].shape[:2]
    cols = min(max(1, nrow), n)
    rows = (n + cols - 1) // cols
    grid = np.zeros((padding + rows * (h + padding), padding + cols * (w + padding), 3), dtype=np.uint8)
    for k, img in enumerate(images):
        r, c = divmod(k, cols)
        y, x = padding + r * (h + padding), padding + c * (w + padding)
        grid[y : y + h, x : x + w] = img
    return grid


def save_grid(images: Sequence[np.ndarray], outdir: Path, nrow: int, text: Optional[dict[str, str]] = None) -> Path:
    return save_png_atomic(make_grid(images, nrow), outdir, next_number(outdir, _GRID), "grid-{:04}.png", text)


def load_init_image(path: "Path | Image.Image", multiple: int) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Read an image as [1, 3, H, W] in [-1, 1], resized (LANCZOS) so that H and W are multiples of `multiple`
    (rounded down, at least one multiple). `path` may be a PIL image. Returns (tensor, original (w, h), new (w, h))."""
    try:
        if isinstance(path, Image.Image):
            image = path.convert("RGB")
        else:
            with Image.open(path) as im:
                image = im.convert("RGB")
    except FileNotFoundError:
        raise ValueError(f"init image not found: {path}") from None
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"init image {path} could not be read as an image ({e})") from None
    w, h = image.size
    new_w, new_h = max(multiple, w - w % multiple), max(multiple, h - h % multiple)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), resample=Image.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array).permute(2, 0, 1)[None]
    return 2.0 * tensor - 1.0, (w, h), (new_w, new_h)


def save_image(image: Image.Image, path: "str | Path") -> Path:
    """Save a PIL image from the Python API as PNG with its info["parameters"] text chunk (PIL alone drops it)."""
    info = PngImagePlugin.PngInfo()
    if "parameters" in image.info:
        info.add_text("parameters", image.info["parameters"])
    path = Path(path)
    image.save(path, format="PNG", pnginfo=info)
    return path
