"""Safe decoding of the image files archives really contain."""

import io

import numpy as np
import pytest
from PIL import Image

from reidx.pipeline.imaging import ImageDecodeError, decode_image
from conftest import CON_REID


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="module")
def real_crop() -> Image.Image:
    path = sorted((CON_REID / "query").iterdir())[0]
    return Image.open(path).convert("RGB")


def test_real_jpeg_decodes_to_rgb(real_crop):
    data = encode(real_crop, "JPEG")
    image = decode_image(data)
    assert image.mode == "RGB" and image.size == real_crop.size


@pytest.mark.parametrize("mode", ["CMYK", "L", "P", "RGBA", "LA", "1"])
def test_other_modes_become_rgb(real_crop, mode):
    fmt = "JPEG" if mode in ("CMYK", "L") else "PNG" if mode != "1" else "BMP"
    image = decode_image(encode(real_crop.convert(mode), fmt))
    assert image.mode == "RGB" and image.size == real_crop.size


def test_16_bit_greyscale_keeps_its_contrast():
    ramp = (np.arange(64 * 32, dtype=np.uint16).reshape(64, 32) * 30).astype(np.uint16)
    source = Image.fromarray(ramp)
    assert source.mode == "I;16"
    image = decode_image(encode(source, "PNG"))
    pixels = np.asarray(image)
    assert image.mode == "RGB"
    assert pixels.min() == 0 and pixels.max() >= 250  # scaled into 8 bits, not clipped to white


def test_palette_with_transparency_is_composited(real_crop):
    palette = real_crop.convert("P")
    palette.info["transparency"] = 0
    assert decode_image(encode(palette, "PNG", transparency=0)).mode == "RGB"


def test_exif_orientation_is_applied(real_crop):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90° clockwise
    image = decode_image(encode(real_crop, "JPEG", exif=exif.tobytes()))
    assert image.size == (real_crop.height, real_crop.width)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"this is a text file, not a picture", "not an image"),
    ],
)
def test_non_images_give_a_reason(data, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        decode_image(data)


def test_truncated_jpeg_is_a_decode_error(real_crop):
    data = encode(real_crop, "JPEG")
    with pytest.raises(ImageDecodeError, match="corrupt"):
        decode_image(data[: len(data) // 2])


def test_pixel_cap_refuses_before_decoding():
    big = encode(Image.new("RGB", (4000, 3000)), "PNG")
    with pytest.raises(ImageDecodeError, match="pixel cap"):
        decode_image(big, max_pixels=10_000_000)
    assert decode_image(big, max_pixels=12_000_000).size == (4000, 3000)
