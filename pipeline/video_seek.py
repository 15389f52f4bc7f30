"""Frames of a video by decoded-frame index without decoding from the start: for the report.

:func:`reidx.pipeline.video.iter_video_frames` numbers frames by decoding every one from the
start, because a keyframe seek by time loses the count. The count can be had without decoding:
each packet of a video stream decodes to one frame and frames come out in presentation order,
so frame *i* is the packet with the *i*-th smallest presentation time (pts). One demux pass
(packets read, nothing decoded: far cheaper than decoding) up to :data:`REORDER_MARGIN` packets
past the last wanted frame gives each wanted frame's pts and the keyframe before it; the decoder
then seeks to that keyframe and decodes forward to the frame with that pts, and on to the next
wanted frame (seeking again only when the next one's keyframe lies beyond the frames decoded).

Every step is checked, never assumed: a packet without a pts, two packets with one pts, a seek
that lands after its frame, a frame that does not appear or comes out damaged raise
:class:`SeekUnsafe`, and the caller decodes from the start instead (exact by construction).
``tests/test_video.py`` checks frame for frame against decoding from the start, on the shared
MPEG-4 clip and on H.264 with B-frames (reordered, with an MP4 edit list).
"""

from __future__ import annotations

from typing import Iterable, Iterator

import av

from reidx.pipeline.imaging import DEFAULT_MAX_PIXELS
from reidx.pipeline.video import VideoFrame, VideoInput, _Opened

# Containers whose packets carry their own presentation times (sample tables, block timestamps);
# AVI (times derived from packet order, DivX packed B-frames: two frames in one packet) and
# MPEG-TS/PS (byte seeks) are always decoded from the start.
SEEKABLE_FORMATS = {"mp4", "mov", "matroska", "webm"}

# Packets read past the last wanted one before its pts rank is trusted: B-frame reordering spans at
# most 16 frames in H.264/HEVC (their decoded picture buffer), fewer in MPEG-2/4.
REORDER_MARGIN = 64


class SeekUnsafe(Exception):
    """The packet index cannot be trusted for this video: decode it from the start instead."""


def _packet_index(container, stream, last: int) -> tuple[list[int], list[int]]:
    """Demux (no decoding) up to packet ``last + REORDER_MARGIN``: (pts in decode order, keyframe positions)."""
    times, keys = [], []
    for packet in container.demux(stream):
        if packet.size == 0:  # the flush packet at the end
            continue
        if packet.pts is None or getattr(packet, "is_discard", False) or packet.is_corrupt:
            raise SeekUnsafe("packet without a presentation time, discarded or corrupt")
        if packet.is_keyframe:
            keys.append(len(times))
        times.append(packet.pts)
        if len(times) > last + REORDER_MARGIN:
            break
    if len(set(times)) != len(times):
        raise SeekUnsafe("two packets share a presentation time")
    if not keys or keys[0] != 0:
        raise SeekUnsafe("the stream does not start with a keyframe")
    return times, keys


def frames_by_seeking(video: VideoInput, indices: Iterable[int], *,
                      max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[VideoFrame]:
    """The frames at these decoded-frame indices, in index order (as ``iter_video_frames(indices=…)``
    yields them; ``timestamp`` None). An index past the video's end is not yielded. Raises
    :class:`SeekUnsafe` (possibly after yielding some frames) where the result could be wrong, and
    :class:`reidx.pipeline.video.VideoDecodeError` where the video cannot be opened."""
    wanted = sorted(set(int(i) for i in indices))
    if not wanted:
        return
    with _Opened(video, max_pixels) as opened:
        try:
            yield from _seek_frames(opened.container, opened.stream, wanted, max_pixels)
        except av.FFmpegError as exc:  # a damaged packet or a failed seek: decoding from the start says which
            raise SeekUnsafe(f"decoder error after a seek: {exc}") from None


def _seek_frames(container, stream, wanted: list[int], max_pixels: int) -> Iterator[VideoFrame]:
    """Each wanted frame: seek to its keyframe unless the frames decoded so far lead there, then decode on."""
    if not SEEKABLE_FORMATS & set(container.format.name.split(",")):
        raise SeekUnsafe(f"{container.format.name} is decoded from the start")
    stream.thread_type = "NONE"
    times, keys = _packet_index(container, stream, wanted[-1])
    order = sorted(range(len(times)), key=times.__getitem__)  # frame index → packet position
    origin = times[order[0]]
    position = -1  # decode position (packet) of the last frame handed out; -1: nothing decoded
    frames = None
    for index in (i for i in wanted if i < len(order)):
        target, packet_at = times[order[index]], order[index]
        keyframe = max(k for k in keys if k <= packet_at)
        if frames is None or keyframe > position:
            container.seek(times[keyframe], stream=stream, backward=True, any_frame=False)
            frames = (f for p in container.demux(stream) for f in p.decode())
        for frame in frames:
            if frame.pts is None or frame.pts > target:
                raise SeekUnsafe(f"frame {index} (pts {target}) not found after the seek")
            if frame.pts == target:
                break
        else:
            raise SeekUnsafe(f"the stream ended before frame {index}")
        if frame.is_corrupt or frame.width * frame.height > max_pixels:
            raise SeekUnsafe(f"frame {index} decoded damaged or oversized after the seek")
        position = max(position, packet_at)
        yield VideoFrame(index=index, pts_s=float((target - origin) * stream.time_base), timestamp=None,
                         image=frame.to_ndarray(format="rgb24"))
