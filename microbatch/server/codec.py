"""Images over HTTP: base64 PNGs out (with their `parameters` chunk), base64 images in, decoded safely.

Incoming images are checked before their pixels are decoded: the header's size must be within `max_pixels`
(a small compressed file can claim a huge image, a "decompression bomb"), and anything that is not a readable
image is a one-line UsageError. A string is always image data, never a file path or a URL: the server reads no
file and fetches nothing on a request's behalf.
"""
from __future__ import annotations

import base64
import binascii
import io
from typing import Optional

import numpy as np
from PIL import Image, PngImagePlugin

from microbatch.request import UsageError


def encode_png(array: np.ndarray, text: Optional[dict[str, str]] = None) -> str:
    """[H, W, 3] uint8 -> base64 PNG text, with `text` as PNG text chunks (the web UI's `parameters`)."""
    info = None
    if text:
        info = PngImagePlugin.PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_image(data: str, what: str, max_pixels: int) -> Image.Image:
    """A base64 image (optionally a `data:image/...;base64,` URL) -> a loaded PIL image, at most `max_pixels`
    pixels. Raises UsageError naming `what` (the request field) on anything else."""
    if not isinstance(data, str) or not data.strip():
        raise UsageError(f"{what} must be a base64-encoded image, got an empty value")
    text = data.strip()
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or ";base64" not in header:
            raise UsageError(f"{what}: a data URL must be base64 (data:image/png;base64,...)")
    elif text.startswith(("http://", "https://", "file:", "/", "./", "../")):
        raise UsageError(f"{what} must be base64 image data; this server reads no URLs or file paths")
    try:
        raw = base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError) as e:
        raise UsageError(f"{what} is not valid base64 ({e})") from None
    try:
        image = Image.open(io.BytesIO(raw))
        w, h = image.size
        if w * h > max_pixels:
            raise UsageError(f"{what} is {w}x{h} = {w * h} pixels; this server accepts at most {max_pixels}")
        image.load()
    except UsageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UsageError(f"{what} is not a readable image ({type(e).__name__}: {' '.join(str(e).split())})") from None
    return image


def png_text(image: Image.Image) -> tuple[Optional[str], dict[str, str]]:
    """(the `parameters` text or None, the image's other text items) of a decoded image."""
    items = {str(k): v for k, v in image.info.items() if isinstance(v, str)}
    return items.pop("parameters", None), items
