"""Safe image decoding: bytes → RGB ``PIL.Image`` or a clear reason why not.

Archives at night hold anything: zero-byte and truncated files, CMYK and 16-bit scans, palette
images with transparency, phone photos stored sideways with an EXIF orientation tag, and the
occasional decompression bomb. Every decode in reidx goes through :func:`decode_image`, which
caps the pixel count *before* decoding, applies the EXIF orientation (so boxes are in displayed
pixels) and returns 8-bit RGB.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# 50 megapixels covers 8K video frames and large stills; a bigger image is refused, not decoded.
DEFAULT_MAX_PIXELS = 50_000_000
# What camera archives hold ("JPEG" also opens MPO, the multi-picture JPEG many cameras write).
# Pillow would open dozens more, among them EPS, whose decoding runs Ghostscript: never for archive bytes.
ACCEPTED_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "TIFF", "GIF")


class ImageDecodeError(ValueError):
    """An image could not be decoded; ``str(err)`` is the reason recorded for it."""


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / 32-bit greyscale: scale the used range into 8 bits instead of clipping at 255.
        values = np.asarray(image, dtype=np.float32)
        top = float(values.max()) if values.size else 0.0
        scale = 255.0 / top if top > 255 else 1.0
        image = Image.fromarray(np.clip(values * scale, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite onto mid-grey: a transparent background should look like nothing in particular.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (128, 128, 128, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes to an upright 8-bit RGB image, or raise :class:`ImageDecodeError`."""
    if not data:
        raise ImageDecodeError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(f"{width}x{height} exceeds the {max_pixels:,}-pixel cap")
            image.load()
            image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(f"not an image in an accepted format ({', '.join(ACCEPTED_FORMATS)}); "
                               f"convert it to one of them to index it") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"decompression bomb refused: {exc}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageDecodeError(f"corrupt image: {exc}") from None


def load_image_or_reason(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS):
    """``(image, None)``, or ``(None, reason)`` when it cannot be decoded: for batch loops that go on."""
    try:
        return load_image(path, max_pixels=max_pixels), None
    except ImageDecodeError as exc:
        return None, str(exc)


def load_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read and decode an image file (see :func:`decode_image`)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ImageDecodeError(f"cannot read: {exc.strerror or exc}") from None
    return decode_image(data, max_pixels=max_pixels)
