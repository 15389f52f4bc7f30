"""The report's pictures: person crops cut at their boxes, and full frames with the box drawn.

Why a module of its own: reading sources (folders, archives, URLs) once each and drawing are one
job; the page (indexers/report.py) only names the files it wants. Every picture is a JPEG written
beside the report, so the page stays one self-contained file plus a folder (no network, no data
URLs that make the HTML too large to open).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from reidx.pipeline.imaging import ImageDecodeError, decode_image
from reidx.pipeline.manifest import Source
from reidx.pipeline.sources import read_members

CROP_HEIGHT = 128
FRAME_WIDTH = 320
BOX_COLOUR = (255, 0, 200)  # magenta: visible on grey streets, green grass and skin alike


@dataclass(frozen=True)
class Wanted:
    """One picture to make: ``name`` in the thumbnail folder, from ``box`` of an image."""

    name: str
    box: tuple | None  # x1 y1 x2 y2 in frame pixels; None = the whole image
    kind: str = "crop"  # crop: the box cut out, CROP_HEIGHT high; frame: the whole image, box drawn


def split_path(path: str) -> tuple[str, str]:
    """``uri::member`` (archives, URLs) or a plain file path → (uri of a source, member)."""
    if "::" in path:
        uri, member = path.split("::", 1)
        return uri, member
    return str(Path(path).parent), Path(path).name


def is_whole_image(box: tuple | None, width: int, height: int) -> bool:
    """A crop source's box covers its image: there is no larger frame to show."""
    if box is None:
        return True
    x1, y1, x2, y2 = box
    return x1 <= 1 and y1 <= 1 and x2 >= width - 1 and y2 >= height - 1


def _crop(image: Image.Image, box: tuple | None) -> Image.Image | None:
    crop = image.crop(tuple(int(round(v)) for v in box)) if box is not None else image
    if crop.width < 1 or crop.height < 1:
        return None
    scale = CROP_HEIGHT / crop.height
    return crop.resize((max(1, round(crop.width * scale)), CROP_HEIGHT), Image.BILINEAR)


def _frame(image: Image.Image, box: tuple | None) -> Image.Image | None:
    if is_whole_image(box, image.width, image.height):
        return None
    scale = FRAME_WIDTH / image.width
    frame = image.resize((FRAME_WIDTH, max(1, round(image.height * scale))), Image.BILINEAR)
    x1, y1, x2, y2 = (v * scale for v in box)
    draw = ImageDraw.Draw(frame)
    draw.rectangle((x1 - 1, y1 - 1, x2 + 1, y2 + 1), outline=(255, 255, 255), width=1)
    draw.rectangle((x1, y1, x2, y2), outline=BOX_COLOUR, width=2)
    return frame


def make_pictures(wanted: dict[tuple[str, str], list[Wanted]],
                  max_pixels: int) -> tuple[dict[str, Image.Image], set[str]]:
    """{(uri, member): [Wanted]} → ({name: picture}, names of frames not made because the box is the
    whole image: a crop source has no larger frame). Each source is opened once (a .tar.gz is read
    in one pass); unreadable images are skipped (the page says so)."""
    by_uri: dict[str, list[str]] = defaultdict(list)
    for uri, member in wanted:
        by_uri[uri].append(member)
    pictures: dict[str, Image.Image] = {}
    whole: set[str] = set()
    for uri, members in by_uri.items():
        source = Source(name="report", uri=uri, kind="crops")
        for member, data, error in read_members(source, sorted(set(members))):
            if error is not None:
                continue
            try:
                image = decode_image(data, max_pixels=max_pixels)
            except ImageDecodeError:
                continue
            for item in wanted[(uri, member)]:
                picture = _frame(image, item.box) if item.kind == "frame" else _crop(image, item.box)
                if picture is not None:
                    pictures[item.name] = picture
                elif item.kind == "frame":
                    whole.add(item.name)
    return pictures, whole
