"""The report's pictures: person crops cut at their boxes, and full frames with the box drawn.

Why a module of its own: reading sources (folders, archives, URLs) once each and drawing are one
job; the page (indexers/report.py) only names the files it wants. Every picture is a JPEG written
beside the report, so the page stays one self-contained file plus a folder (no network, no data
URLs that make the HTML too large to open).

A sighting from a video source names its video and the decoded frame (``frame_index``) its box is
on. Each video is opened once, however many sightings it has (an archive member is read whole,
as the nightly job reads it; files and URLs are streamed), and its wanted frames are found by a
packet index and keyframe seeks (pipeline/video_seek.py), checked by presentation time; where
that cannot be trusted (AVI, MPEG-TS/PS, odd timestamps) the video is decoded in one forward
pass up to its last wanted frame instead (pipeline/video.py). Only the wanted frames are
converted to pictures; either way a few frames are in memory. Crops use the nightly job's crop rule (pipeline/boxes.py
``crop_region``), so a crop shows exactly the pixels that were embedded. A picture that cannot be
made gets a reason instead (shown on the page), never an exception.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from reidx.pipeline.boxes import crop_region
from reidx.pipeline.imaging import ImageDecodeError, decode_image
from reidx.pipeline.manifest import Source
from reidx.pipeline.sources import archive_type, open_video, read_members
from reidx.pipeline.video import VideoDecodeError, iter_video_frames
from reidx.pipeline.video_seek import SeekUnsafe, frames_by_seeking

CROP_HEIGHT = 128
FRAME_WIDTH = 320
BOX_COLOUR = (255, 0, 200)  # magenta: visible on grey streets, green grass and skin alike


@dataclass(frozen=True)
class Wanted:
    """One picture to make: ``name`` in the thumbnail folder, from ``box`` of an image."""

    name: str
    box: tuple | None  # x1 y1 x2 y2 in frame pixels; None = the whole image
    kind: str = "crop"  # crop: the box cut out, CROP_HEIGHT high; frame: the whole image, box drawn
    frame_index: int | None = None  # a video's decoded frame the box is on; None for an image


@dataclass
class Pictures:
    """What :func:`make_pictures` made: ``made`` {name: picture}; ``whole``: frames not made because the
    box is the whole image (a crop source has no larger frame); ``reasons`` {name: why it is missing}."""

    made: dict[str, Image.Image] = field(default_factory=dict)
    whole: set[str] = field(default_factory=set)
    reasons: dict[str, str] = field(default_factory=dict)

    def add(self, item: Wanted, image: Image.Image) -> None:
        picture = _frame(image, item.box) if item.kind == "frame" else _crop(image, item.box)
        if picture is not None:
            self.made[item.name] = picture
        elif item.kind == "frame":
            self.whole.add(item.name)
        else:
            self.reasons[item.name] = "empty box"

    def fail(self, items, reason: str) -> None:
        for item in items:
            self.reasons[item.name] = reason


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
    crop = image.crop(crop_region(box, image.width, image.height)) if box is not None else image
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


def make_pictures(wanted: dict[tuple[str, str], list[Wanted]], max_pixels: int) -> Pictures:
    """{(uri, member): [Wanted]} → :class:`Pictures`. Each source is opened once (a .tar.gz is read
    in one pass), each video once; what cannot be read or decoded gets its reason."""
    by_uri: dict[str, list[str]] = defaultdict(list)
    for uri, member in wanted:
        by_uri[uri].append(member)
    pictures = Pictures()
    for uri, members in by_uri.items():
        videos = sorted(m for m in set(members) if any(w.frame_index is not None for w in wanted[(uri, m)]))
        stills = sorted(set(members) - set(videos))
        for member, data, error in read_members(Source(name="report", uri=uri, kind="crops"), stills) if stills else ():
            if error is None:
                try:
                    image = decode_image(data, max_pixels=max_pixels)
                except ImageDecodeError as exc:
                    error = str(exc)
            if error is not None:
                pictures.fail(wanted[(uri, member)], f"image unreadable: {error}")
                continue
            for item in wanted[(uri, member)]:
                pictures.add(item, image)
        if videos:
            _video_pictures(Source(name="report", uri=uri, kind="video"), videos, wanted, max_pixels, pictures)
    return pictures


def _opened_videos(source: Source, members: list[str]):
    """(member, video input or None, closer or None, reason or None) per video; an archive in one pass."""
    if archive_type(source.uri):
        for member, data, reason in read_members(source, members):
            yield member, data, None, reason
        return
    for member in members:
        try:
            video, closer = open_video(source, member)
        except VideoDecodeError as exc:
            yield member, None, None, str(exc)
            continue
        yield member, video, closer, None


def _video_pictures(source: Source, members: list[str], wanted: dict, max_pixels: int, pictures: Pictures) -> None:
    """Each video's wanted frames (by seeking, else decoding from the start); the pictures cut from them."""
    for member, video, closer, reason in _opened_videos(source, members):
        items = wanted[(source.uri, member)]
        if reason is not None:
            pictures.fail(items, f"video unreadable: {reason}")
            continue
        by_frame: dict[int, list[Wanted]] = defaultdict(list)
        for item in items:
            by_frame[item.frame_index].append(item)
        pictures.fail(by_frame.pop(None, []), "no frame index")

        def take(frames) -> None:
            for frame in frames:
                image = Image.fromarray(frame.image)
                for item in by_frame.pop(frame.index):
                    pictures.add(item, image)

        try:
            try:
                take(frames_by_seeking(video, list(by_frame), max_pixels=max_pixels))
            except SeekUnsafe:  # decode from the start instead: exact by construction
                if hasattr(video, "seek"):
                    video.seek(0)
                take(iter_video_frames(video, indices=list(by_frame), max_pixels=max_pixels))
        except VideoDecodeError as exc:
            reason = f"video unreadable: {exc}"
        except OSError as exc:  # a URL's read timed out, the file vanished
            reason = f"video unreadable: read error: {exc}"
        finally:
            if closer is not None:
                closer()
        for index, rest in by_frame.items():
            pictures.fail(rest, reason or f"frame {index} is past the video's end (changed since it was indexed?)")
