"""Safe, streaming video decoding: a path or in-memory video → RGB frames with real timestamps.

Archives hold videos as well as stills, and they are read like images: members come as bytes
(never extracted), anything may be truncated or corrupt, and a bad file must cost one ledger
entry, not the night. Decoding goes through PyAV (FFmpeg inside its wheel, no system ffmpeg).

* **Streaming.** Packets are demuxed and decoded one at a time and each frame is converted to
  RGB only when it is kept, so memory is bounded by the demuxer's read buffer and the decoder's
  reference frames (a few frames; one more per thread if codec threads are turned on) plus the
  frames the caller still holds, however long the video. (A video passed as ``bytes`` is of
  course already in memory in full.)
* **Real timestamps.** ``pts_s`` is the container's presentation time, relative to the stream
  start; sampling by ``fps`` uses it, never the nominal frame rate, so variable-rate recordings
  and dropped frames keep their true times.
* **Failures are reported, not swallowed.** FFmpeg does not raise on most damage: a packet cut
  short by truncation is decoded with error concealment into a frame flagged corrupt, a file cut
  between packets just ends early, and an MP4 whose index (``moov``) was at the end cannot be
  opened at all. :func:`iter_video_frames` yields the intact frames, then raises
  :class:`VideoDecodeError` at the first damaged frame, at a decoder/demuxer error, or at the end
  when fewer frames (or less time) came out than the container declares.
* **Refusals before decoding.** Only plain video containers are opened (FFmpeg's playlist,
  concat and image demuxers could read other files), and a frame size above ``max_pixels`` is
  refused before any frame is decoded, as :func:`reidx.pipeline.imaging.decode_image` does.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from fractions import Fraction
from typing import BinaryIO, Iterable, Iterator, Union

import av
import numpy as np

from reidx.pipeline.imaging import DEFAULT_MAX_PIXELS

VIDEO_SUFFIXES = {".mp4", ".mkv", ".avi", ".ts", ".mpeg", ".mpg", ".mov", ".m4v", ".webm"}

# The FFmpeg demuxers allowed to open a file: MP4/MOV, Matroska/WebM, AVI, MPEG-TS, MPEG-PS and
# raw MPEG-1/2 video. Everything else is refused by content, whatever the file is called: HLS,
# DASH and concat playlists open further files or URLs, and the image demuxers would turn a
# JPEG into a "video".
FORMAT_WHITELIST = "mov,mp4,matroska,webm,avi,mpegts,mpeg,mpegvideo"

# Codec threads off: one decoder, one thread. "AUTO" (frame + slice threads) did not measurably
# help on H.264, what cameras write: decode-only frames/s against no threads on this 2-core
# machine shared with other jobs (benchmarks/video.py and longer paired runs, 9 measurements
# each), AUTO gave 0.92-1.33x, median 1.02x, on 1080p H.264 clips; 0.93-1.68x, median 1.21x,
# on the shared 1080p MPEG-4 Part 2 clip; PyAV's default (slice threads) was as noisy. The
# nightly job gets its parallelism from its workers, and frame threads hold one more frame per
# thread. A lone decoder with idle cores may set "AUTO" here.
THREAD_TYPE: str | None = "NONE"

VideoInput = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]


class VideoDecodeError(ValueError):
    """A video could not be (fully) decoded; ``str(err)`` is the reason recorded for it.

    ``frame_index`` is the stream index of the first frame that was not delivered (0 when the
    video could not be opened), so a caller knows which frames before it are good.
    """

    def __init__(self, message: str, frame_index: int = 0):
        super().__init__(message)
        self.frame_index = frame_index


@dataclass(frozen=True)
class VideoFrame:
    """One decoded frame.

    ``index``: 0-based index of the frame among all decoded frames of the stream (unaffected by
    sampling, so it is a stable key). ``pts_s``: presentation time in seconds from the stream
    start. ``timestamp``: ``start_time + pts_s`` (naive or aware as given), None without a
    ``start_time``. ``image``: H×W×3 uint8 RGB array.
    """

    index: int
    pts_s: float
    timestamp: datetime | None
    image: np.ndarray


@dataclass(frozen=True)
class VideoInfo:
    """What the container declares, read without decoding frames; None where it does not say.

    ``fps`` is the declared average frame rate; ``frame_count`` is known for MP4/MOV and AVI,
    usually not for Matroska or MPEG-TS; ``codec`` and ``container`` are FFmpeg's names.
    """

    width: int
    height: int
    fps: float | None
    duration_s: float | None
    frame_count: int | None
    codec: str
    container: str


@dataclass(frozen=True)
class VideoSegment:
    """Frames ``first_frame <= index < stop_frame`` of a video: one ledger entry, one resume point."""

    index: int
    first_frame: int
    stop_frame: int


def video_segments(num_frames: int, frames_per_segment: int) -> list[VideoSegment]:
    """Split a video's ``num_frames`` decoded frames into segments of ``frames_per_segment``.

    Segments are counted in decoded-frame indices, not sampled frames, so they do not change
    with ``fps``/``every`` and a run resumed with ``first_frame=seg.first_frame,
    stop_frame=seg.stop_frame`` yields exactly the frames a full run yields for that segment.
    For segments by time use ``frames_per_segment = round(seconds * info.fps)``. When the frame
    count is unknown (``VideoInfo.frame_count`` is None) a caller can number segments as it
    goes with :func:`segment_of`.
    """
    if frames_per_segment < 1:
        raise ValueError(f"frames_per_segment must be >= 1, got {frames_per_segment}")
    if num_frames < 0:
        raise ValueError(f"num_frames must be >= 0, got {num_frames}")
    return [
        VideoSegment(i, first, min(first + frames_per_segment, num_frames))
        for i, first in enumerate(range(0, num_frames, frames_per_segment))
    ]


def segment_of(frame_index: int, frames_per_segment: int) -> int:
    """The segment (as numbered by :func:`video_segments`) that holds a decoded frame index."""
    return frame_index // frames_per_segment


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc)


class _Opened:
    """An open container and its video stream; closes both (and a file it opened) on exit."""

    def __init__(self, video: VideoInput, max_pixels: int):
        self._own_file = None
        if isinstance(video, (bytes, bytearray, memoryview)):
            if not len(video):
                raise VideoDecodeError("empty file")
            source = io.BytesIO(video)
        elif isinstance(video, (str, os.PathLike)):
            # Opened here, not by FFmpeg, so a path is never read as a URL or protocol spec.
            try:
                source = self._own_file = open(video, "rb")
            except OSError as exc:
                raise VideoDecodeError(f"cannot read: {exc.strerror or exc}") from None
        elif hasattr(video, "read"):
            source = video
        else:
            raise TypeError(f"expected a path, bytes or a binary file object, got {type(video).__name__}")
        try:
            self.container = av.open(
                source,
                options={"format_whitelist": FORMAT_WHITELIST, "max_pixels": str(max_pixels)},
            )
        except av.FFmpegError as exc:
            reason = _open_failure(source, exc)  # before closing: it reads the file's first bytes
            self.close()
            raise VideoDecodeError(reason) from None
        except Exception:
            self.close()
            raise
        try:
            self.stream = self._video_stream(max_pixels)
        except BaseException:
            self.close()
            raise

    def _video_stream(self, max_pixels: int):
        if not self.container.streams.video:
            raise VideoDecodeError(f"no video stream ({self.container.format.name} container)")
        stream = self.container.streams.best("video")
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > max_pixels:
            raise VideoDecodeError(f"{width}x{height} exceeds the {max_pixels:,}-pixel cap")
        if not width or not height:
            # FFmpeg zeroes a frame size its probing decoder refused under the cap.
            raise VideoDecodeError(f"frame size unknown: above the {max_pixels:,}-pixel cap or unreadable")
        return stream

    def close(self) -> None:
        container = getattr(self, "container", None)
        if container is not None:
            container.close()
        if self._own_file is not None:
            self._own_file.close()

    def __enter__(self) -> "_Opened":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_failure(source, exc: BaseException) -> str:
    head = b""
    try:
        source.seek(0)
        head = source.read(12)
    except (OSError, ValueError, AttributeError):
        pass
    if not head:
        return "empty file"
    if head[4:8] == b"ftyp":
        # The MP4/MOV index (moov) is often written last; a file cut short loses it and with it
        # every frame, since FFmpeg cannot locate the samples without it.
        return f"MP4/MOV truncated or corrupt: cannot be opened ({_reason(exc)}; index 'moov' missing?)"
    if isinstance(exc, av.error.ArgumentError):
        return "not a video container reidx reads (MP4/MOV, Matroska/WebM, AVI, MPEG-TS/PS)"
    return f"not a readable video ({_reason(exc)})"


def probe_video(video: VideoInput, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> VideoInfo:
    """Read a video's declared size, rate, duration, frame count and codec without decoding frames.

    Raises :class:`VideoDecodeError` when it cannot be opened, has no video stream or its frame
    size is above ``max_pixels`` (the same checks as :func:`iter_video_frames`).
    """
    with _Opened(video, max_pixels) as opened:
        stream, container = opened.stream, opened.container
        rate = stream.average_rate or stream.guessed_rate
        return VideoInfo(
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            fps=float(rate) if rate else None,
            duration_s=_declared_duration(stream, container),
            frame_count=stream.frames or None,
            codec=stream.codec_context.name,
            container=container.format.name,
        )


def _declared_duration(stream, container) -> float | None:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    return None


def iter_video_frames(
    video: VideoInput,
    *,
    fps: float | None = None,
    every: int | None = None,
    start_time: datetime | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_frames: int | None = None,
    first_frame: int = 0,
    stop_frame: int | None = None,
    indices: Iterable[int] | None = None,
) -> Iterator[VideoFrame]:
    """Decode a video lazily into :class:`VideoFrame` s, sampled, with real timestamps.

    ``video``: a path, the file's bytes, or a binary file object (seekable for MP4/MOV; it is
    not closed). Sampling: ``fps=N`` keeps the first frame whose presentation time reaches each
    instant ``k/N`` s of the stream; ``every=k`` keeps frames whose index is a multiple of ``k``;
    neither keeps all. Both rules depend only on a frame's own index/time and its predecessor's,
    so a run resumed at ``first_frame`` keeps exactly the frames a full run keeps from there.
    ``first_frame``/``stop_frame`` restrict to decoded indices ``[first_frame, stop_frame)``
    (see :func:`video_segments`); ``max_frames`` caps the frames yielded. ``indices`` keeps exactly
    these decoded indices instead of sampling (the frames a gallery's rows name: the report), and
    decoding stops after the last; an index past the video's end is simply not yielded.

    No seeking: the frames before ``first_frame`` are decoded and dropped (without RGB
    conversion). Seeking lands on a keyframe by timestamp, after which the true frame index is
    unknowable without decoding from the start (and exact only for constant-rate video), so
    indices, segments and sampling would drift. Damage in frames before ``first_frame`` is
    ignored, so a caller can resume past a segment that failed.

    Frames are yielded until the first damaged one; then :class:`VideoDecodeError` is raised
    (``frame_index`` = index of the first frame not delivered), also when the stream ends more
    than two frame intervals (one second when only the container duration is known) before the
    declared duration, or with fewer frames than the container declares. Argument errors raise
    ``ValueError`` at the call; open errors at the first ``next()``.
    """
    if fps is not None and every is not None:
        raise ValueError("give fps or every, not both")
    if fps is not None and not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be a positive number, got {fps}")
    if every is not None and (not isinstance(every, int) or every < 1):
        raise ValueError(f"every must be an integer >= 1, got {every}")
    if first_frame < 0:
        raise ValueError(f"first_frame must be >= 0, got {first_frame}")
    if stop_frame is not None and stop_frame < first_frame:
        raise ValueError(f"stop_frame ({stop_frame}) is before first_frame ({first_frame})")
    if max_frames is not None and max_frames < 0:
        raise ValueError(f"max_frames must be >= 0, got {max_frames}")
    rate = Fraction(fps).limit_denominator(1_000_000) if fps is not None else None
    only = None
    if indices is not None:
        if fps is not None or every is not None:
            raise ValueError("give indices or a sampling rule (fps, every), not both")
        only = frozenset(int(i) for i in indices if i >= first_frame)
        last = max(only, default=-1) + 1
        first_frame, stop_frame = min(only, default=0), last if stop_frame is None else min(last, stop_frame)
    return _frames(video, rate, every, start_time, max_pixels, max_frames, first_frame, stop_frame, only)


def _frames(video, rate, every, start_time, max_pixels, max_frames, first_frame, stop_frame, only):
    if max_frames == 0 or stop_frame == first_frame:
        return
    with _Opened(video, max_pixels) as opened:
        container, stream = opened.container, opened.stream
        if THREAD_TYPE is not None:
            stream.thread_type = THREAD_TYPE
        # The decoder enforces the cap too: a stream may change frame size mid-way.
        stream.codec_context.options = {"max_pixels": str(max_pixels)}
        time_base = stream.time_base
        nominal = stream.average_rate or stream.guessed_rate
        origin = stream.start_time
        index = yielded = 0
        previous_bucket = None
        end = Fraction(0)  # where the next frame is due: last frame's time + its duration
        cut_packet = False

        def failure(why: str) -> VideoDecodeError:
            return VideoDecodeError(f"truncated or corrupt at frame {index} ({float(end):.2f} s): {why}", index)

        try:
            for packet in container.demux(stream):
                cut_packet = cut_packet or packet.is_corrupt
                try:
                    decoded = packet.decode()
                except av.FFmpegError as exc:
                    if index < first_frame:
                        continue  # damage before the resume point was reported by the earlier run
                    raise failure(f"decoder error: {_reason(exc)}") from None
                for frame in decoded:
                    if frame.pts is not None:
                        if origin is None:
                            origin = frame.pts
                        t = (frame.pts - origin) * time_base
                    else:  # no timestamp at all (rare raw streams): count at the nominal rate
                        t = Fraction(index) / nominal if nominal else end
                    if index >= first_frame:
                        if frame.is_corrupt:
                            end = t
                            raise failure(
                                "packet cut short (file truncated), decoded with errors"
                                if cut_packet
                                else "the decoder found errors in the frame"
                            )
                        if frame.width * frame.height > max_pixels:
                            raise failure(f"{frame.width}x{frame.height} exceeds the {max_pixels:,}-pixel cap")
                    duration = getattr(frame, "duration", None)  # not in older PyAV
                    step = duration * time_base if duration else (1 / nominal if nominal else 0)
                    end = t + step
                    if rate is not None:
                        bucket = math.floor(t * rate)
                        keep = previous_bucket is None or bucket > previous_bucket
                        previous_bucket = bucket
                    elif only is not None:
                        keep = index in only
                    else:
                        keep = every is None or index % every == 0
                    if keep and index >= first_frame:
                        yield VideoFrame(
                            index=index,
                            pts_s=float(t),
                            timestamp=start_time + timedelta(seconds=float(t)) if start_time is not None else None,
                            image=frame.to_ndarray(format="rgb24"),
                        )
                        yielded += 1
                        if max_frames is not None and yielded >= max_frames:
                            return
                    index += 1
                    if stop_frame is not None and index >= stop_frame:
                        return
        except av.FFmpegError as exc:
            raise failure(f"read error: {_reason(exc)}") from None

        if index == 0:
            raise VideoDecodeError("no frame could be decoded", 0)
        declared = stream.frames
        if declared and index < declared:
            raise failure(f"decoded {index} of the {declared} frames the container declares")
        interval = step if step else Fraction(0)
        if stream.duration and time_base:
            declared_end, tolerance = stream.duration * time_base, 2 * interval
        elif container.duration:
            declared_end, tolerance = Fraction(container.duration, av.time_base), max(Fraction(1), 2 * interval)
        else:
            return
        if end < declared_end - tolerance:
            raise failure(
                f"stream ends at {float(end):.2f} s of the {float(declared_end):.2f} s the container declares")
