"""Decoding and validating image bytes: a bad input is a reason, never a crash."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

# Refuse decompression bombs early (PIL warns at ~89 Mpx; we refuse above this).
MAX_PIXELS = 64_000_000


class BadImage(ValueError):
    """The bytes are not a usable image; ``reason`` says why (for the quarantine list)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def decode_image(data: bytes) -> Image.Image:
    """Decode fully (so truncation is caught here, not later in a DataLoader worker)."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > MAX_PIXELS:
            raise BadImage(f"image too large ({img.width}x{img.height} px)")
        img.load()
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImage(f"corrupt or truncated image: {str(e).splitlines()[0][:120]}") from None
    if img.width == 0 or img.height == 0:
        raise BadImage("image has zero width or height")
    return img


def encode_png(array: np.ndarray) -> bytes:
    """uint8 [H, W] or [H, W, 3] -> PNG bytes (lossless; pixels round-trip exactly)."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()


def image_ext(img: Image.Image) -> str:
    fmt = (img.format or "PNG").upper()
    return {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}.get(
        fmt, "png"
    )
