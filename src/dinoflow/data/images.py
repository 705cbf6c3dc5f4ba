"""Decoding and validating image bytes: a bad input is a reason, never a crash.

Every reader of stored images decodes through ``decode_image``, which brings high bit-depth
grayscale (16-bit PNG/TIFF) to 8 bits by scaling, never by clipping, and refuses floating-point
images; ``image_ext`` names the format the bytes really have.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

# Refuse decompression bombs early (PIL warns at ~89 Mpx; we refuse above this).
MAX_PIXELS = 64_000_000
# An input file (or tar member) larger than this is refused unread: tars stream member by member,
# and no image within MAX_PIXELS needs more.
MAX_IMAGE_BYTES = 128 << 20

_HIGH_DEPTH = {"I;16", "I;16L", "I;16B", "I;16N", "I"}  # integer grayscale wider than 8 bits
_COMMON_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}


class BadImage(ValueError):
    """The bytes are not a usable image; ``reason`` says why (for the quarantine list)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit (or 32-bit integer holding 16-bit values) grayscale -> 8-bit "L", scaled 0..65535 -> 0..255."""
    a = np.asarray(img)
    if a.size and (int(a.min()) < 0 or int(a.max()) > 65535):
        raise BadImage(f"{img.mode} image with values outside 0..65535: bit depth not supported")
    scaled = (a.astype(np.uint32) * 255 + 32767) // 65535
    return Image.fromarray(scaled.astype(np.uint8), mode="L")


def decode_image(data: bytes | BadImage) -> Image.Image:
    """Decode fully (so truncation is caught here, not later in a DataLoader worker). A reader
    that already found the input unusable passes its ``BadImage``, which is raised here."""
    if isinstance(data, BadImage):
        raise data
    if not data:
        raise BadImage("empty file (0 bytes)")
    if len(data) > MAX_IMAGE_BYTES:
        raise BadImage(f"file too large ({len(data)} bytes > {MAX_IMAGE_BYTES})")
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
    if img.mode == "F":
        raise BadImage("floating-point image (mode F): convert it to 8 or 16 bits first")
    if img.mode in _HIGH_DEPTH:
        fmt = img.format
        img = _to_8bit(img)
        img.format = fmt  # the stored bytes keep their format; only the pixels are brought to 8 bits
    return img


def encode_png(array: np.ndarray) -> bytes:
    """uint8 [H, W] or [H, W, 3] -> PNG bytes (lossless; pixels round-trip exactly)."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()


def image_ext(img: Image.Image) -> str:
    """The file extension of the format the image was decoded from (``jpg``, ``png``, ``ppm``, ...)."""
    fmt = (img.format or "PNG").upper()
    if fmt in _COMMON_EXT:
        return _COMMON_EXT[fmt]
    exts = [e.lstrip(".") for e, f in Image.registered_extensions().items() if f == fmt]
    if fmt.lower() in exts:
        return fmt.lower()
    return exts[0] if exts else "".join(c for c in fmt.lower() if c.isalnum()) or "bin"


def is_image_ext(ext: str) -> bool:
    """Whether ``ext`` (no dot) names an image format PIL reads (what a tar member's suffix says)."""
    return f".{ext.lower()}" in Image.registered_extensions()
