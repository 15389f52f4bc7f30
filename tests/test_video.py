"""Video decoding on the shared street clip and on clips encoded here from the shared scene frames."""

from __future__ import annotations

import io
from datetime import datetime, timedelta, timezone
from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image

from conftest import SCENES, SHARED
from reidx.pipeline.video import (
    VIDEO_SUFFIXES,
    VideoDecodeError,
    VideoSegment,
    iter_video_frames,
    probe_video,
    segment_of,
    video_segments,
)

CLIP = SHARED / "data" / "video" / "street-8f-3fps.mp4"


@pytest.fixture(scope="module")
def scenes() -> list[np.ndarray]:
    """The 16 shared scene frames, scaled to 640×360 to keep encoding fast."""
    paths = sorted((SCENES / "frames").glob("*.jpg"))
    assert len(paths) == 16
    return [np.asarray(Image.open(p).convert("RGB").resize((640, 360), Image.BILINEAR)) for p in paths]


def encode(images, *, rate=4, fmt="mp4", codec="libx264", pts_ms=None) -> bytes:
    """Encode RGB frames with PyAV; ``pts_ms`` gives each frame's own time (variable rate)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = images[0].shape[1], images[0].shape[0], "yuv420p"
        if pts_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for i, image in enumerate(images):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buffer.getvalue()


def remux(data: bytes, path, fmt: str, options=None) -> bytes:
    """Copy the packets into another container (no re-encoding), written to ``path``."""
    with av.open(io.BytesIO(data)) as src, av.open(str(path), "w", format=fmt, options=options or {}) as out:
        stream = out.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    return path.read_bytes()


@pytest.fixture(scope="module")
def clip_frames():
    return list(iter_video_frames(CLIP))


@pytest.fixture(scope="module")
def h264(scenes) -> bytes:
    """16 frames at 4 frames/s, H.264 in MP4."""
    return encode(scenes)


def indices(frames):
    return [f.index for f in frames]


# --- the shared clip ---------------------------------------------------------------------------


def test_shared_clip_frames_and_timestamps(clip_frames):
    assert len(clip_frames) == 8 and indices(clip_frames) == list(range(8))
    for k, frame in enumerate(clip_frames):
        assert frame.image.shape == (1080, 1920, 3) and frame.image.dtype == np.uint8
        assert frame.pts_s == pytest.approx(k / 3, abs=1e-3)
        assert frame.timestamp is None
    assert np.all(np.diff([f.pts_s for f in clip_frames]) > 0)


def test_start_time_offsets_timestamps(clip_frames):
    naive = datetime(2024, 5, 1, 7, 30)
    aware = datetime(2024, 5, 1, 7, 30, tzinfo=timezone.utc)
    for start in (naive, aware):
        frames = list(iter_video_frames(CLIP, start_time=start, every=3))
        for frame in frames:
            assert abs(frame.timestamp - (start + timedelta(seconds=frame.index / 3))) < timedelta(milliseconds=1)
            assert frame.timestamp.tzinfo is start.tzinfo


def test_bytes_file_object_and_path_decode_identically(clip_frames):
    data = CLIP.read_bytes()
    for source in (data, io.BytesIO(data), str(CLIP)):
        frames = list(iter_video_frames(source))
        assert [f.pts_s for f in frames] == [f.pts_s for f in clip_frames]
        assert all(np.array_equal(a.image, b.image) for a, b in zip(frames, clip_frames))


def test_sampling_on_shared_clip(clip_frames):
    assert indices(iter_video_frames(CLIP, every=2)) == [0, 2, 4, 6]
    by_rate = list(iter_video_frames(CLIP, fps=1))
    assert [f.pts_s for f in by_rate] == pytest.approx([0.0, 1.0, 2.0], abs=1e-3)
    assert np.array_equal(by_rate[1].image, clip_frames[3].image)
    assert indices(iter_video_frames(CLIP, max_frames=3)) == [0, 1, 2]


def test_probe_shared_clip():
    info = probe_video(CLIP)
    assert (info.width, info.height, info.fps, info.frame_count) == (1920, 1080, 3.0, 8)
    assert info.duration_s == pytest.approx(8 / 3, abs=1e-3)
    assert info.codec == "mpeg4"  # MPEG-4 Part 2, whatever the file name suggests
    assert info.container.startswith("mov,mp4")


def test_argument_errors():
    for kwargs in ({"fps": 1, "every": 2}, {"fps": 0}, {"every": 0}, {"first_frame": -1},
                   {"first_frame": 5, "stop_frame": 4}):
        with pytest.raises(ValueError):
            iter_video_frames(CLIP, **kwargs)  # raised at the call, before anything is read
    assert ".mp4" in VIDEO_SUFFIXES and ".webm" in VIDEO_SUFFIXES


# --- clips encoded here ------------------------------------------------------------------------


def test_encoded_frames_are_rgb_at_their_times(scenes, h264):
    frames = list(iter_video_frames(h264))
    assert [f.pts_s for f in frames] == pytest.approx([k / 4 for k in range(16)], abs=1e-3)
    for frame, source in zip(frames, scenes):  # channel order and content survive the codec
        assert np.abs(frame.image.astype(int) - source).mean() < 8
    info = probe_video(h264)
    assert (info.width, info.height, info.fps, info.frame_count, info.codec) == (640, 360, 4.0, 16, "h264")


def test_fps_sampling_uses_presentation_times_not_the_nominal_rate(scenes):
    # Variable rate: the container's nominal 4 frames/s says nothing about these gaps.
    pts_ms = [0, 400, 900, 1000, 1100, 2600, 2700, 3050]
    data = encode(scenes[:8], fmt="matroska", codec="mpeg4", pts_ms=pts_ms)
    assert [f.pts_s for f in iter_video_frames(data)] == pytest.approx([t / 1000 for t in pts_ms])
    kept = list(iter_video_frames(data, fps=1))
    assert indices(kept) == [0, 3, 5, 7]  # the first frame at or after 0, 1, 2 and 3 s
    assert [f.pts_s for f in kept] == pytest.approx([0.0, 1.0, 2.6, 3.05])


def test_sampling_rates_on_encoded_clip(h264):
    assert [f.pts_s for f in iter_video_frames(h264, fps=1)] == pytest.approx([0, 1, 2, 3])
    assert indices(iter_video_frames(h264, fps=2)) == list(range(0, 16, 2))
    assert indices(iter_video_frames(h264, fps=3)) == [0, 2, 3, 4, 6, 7, 8, 10, 11, 12, 14, 15]
    assert indices(iter_video_frames(h264, every=3)) == [0, 3, 6, 9, 12, 15]


def test_pts_relative_to_stream_start(scenes):
    data = encode(scenes[:6], fmt="mpegts")  # H.264 with B-frames in MPEG-TS: the stream starts at 0.5 s
    with av.open(io.BytesIO(data)) as container:
        assert container.streams.video[0].start_time > 0
    assert [f.pts_s for f in iter_video_frames(data)] == pytest.approx([k / 4 for k in range(6)], abs=1e-3)


def test_segments_resume_exactly(h264):
    segments = video_segments(16, 5)
    assert segments == [VideoSegment(0, 0, 5), VideoSegment(1, 5, 10), VideoSegment(2, 10, 15),
                        VideoSegment(3, 15, 16)]
    assert [segment_of(i, 5) for i in (0, 4, 5, 15)] == [0, 0, 1, 3]
    assert video_segments(0, 5) == []
    with pytest.raises(ValueError):
        video_segments(16, 0)
    for sampling in ({"fps": 3}, {"every": 3}, {}):
        full = list(iter_video_frames(h264, **sampling))
        resumed = [f for seg in segments
                   for f in iter_video_frames(h264, first_frame=seg.first_frame, stop_frame=seg.stop_frame, **sampling)]
        assert indices(resumed) == indices(full)
        assert [f.pts_s for f in resumed] == [f.pts_s for f in full]
        assert all(np.array_equal(a.image, b.image) for a, b in zip(resumed, full))
    assert indices(iter_video_frames(h264, first_frame=7, max_frames=2)) == [7, 8]


class CountingReader(io.RawIOBase):
    """A file object over bytes that counts what FFmpeg has read from it."""

    def __init__(self, data: bytes):
        self._data, self.bytes_read = io.BytesIO(data), 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def readinto(self, buffer):
        n = self._data.readinto(buffer)
        self.bytes_read += n
        return n

    def seek(self, offset, whence=io.SEEK_SET):
        return self._data.seek(offset, whence)

    def tell(self):
        return self._data.tell()


def test_frames_stream_lazily(scenes):
    # What is read before the first frame does not grow with the video: packets are read as
    # frames are asked for, never the whole file.
    small = [image[::2, ::2] for image in scenes]
    read_for_first = {}
    for repeats in (6, 24):  # 96 and 384 frames at 25 frames/s
        data = encode(small * repeats, fmt="mp4", codec="mpeg4", rate=25)
        reader = CountingReader(data)
        frames = iter_video_frames(reader)
        assert reader.bytes_read == 0  # nothing happens before the first next()
        next(frames)
        read_for_first[repeats] = reader.bytes_read
        for _ in range(47):
            next(frames)
        read_for_48 = reader.bytes_read
        assert sum(1 for _ in frames) == 16 * repeats - 48
    assert read_for_first[24] < read_for_48 < 0.5 * len(data)
    assert read_for_first[24] < read_for_first[6] + 32 * 1024


# --- damage ------------------------------------------------------------------------------------


def collect(source, **kwargs):
    """(frames yielded, the VideoDecodeError raised after them or None)."""
    frames = []
    try:
        for frame in iter_video_frames(source, **kwargs):
            frames.append(frame)
    except VideoDecodeError as exc:
        return frames, exc
    return frames, None


def test_truncated_mp4_with_index_at_the_end_fails_at_the_start(tmp_path):
    # The shared clip, like most camera MP4s, has its index (moov) after the frames: cut short,
    # nothing can be located. FFmpeg says "Invalid data"; the error says what it means, read from
    # bytes and from a file alike (a file's reason once said "empty file": it was closed first).
    data = CLIP.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: int(0.6 * len(data))])
    for video in (data[: int(0.6 * len(data))], tmp_path / "cut.mp4"):
        frames, error = collect(video)
        assert frames == [] and error.frame_index == 0
        assert "truncated" in str(error) and "moov" in str(error), str(error)
    with pytest.raises(VideoDecodeError):
        probe_video(data[: int(0.6 * len(data))])


def test_truncated_copy_keeps_first_frames_then_fails(tmp_path, clip_frames):
    # The same packets with the index first (as `-movflags faststart` writes it), cut at 60%:
    # FFmpeg raises nothing, it decodes the cut packet into a concealed frame flagged corrupt.
    data = remux(CLIP.read_bytes(), tmp_path / "faststart.mp4", "mp4", {"movflags": "faststart"})
    assert [f.pts_s for f in iter_video_frames(data)] == [f.pts_s for f in clip_frames]
    frames, error = collect(data[: int(0.6 * len(data))])
    assert indices(frames) == [0, 1, 2, 3]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(frames, clip_frames))
    assert isinstance(error, ValueError) and error.frame_index == 4
    assert "frame 4 (1.33 s)" in str(error) and "truncated" in str(error)
    # The last packet cut short: seven frames kept, the eighth reported.
    frames, error = collect(data[: int(0.99 * len(data))])
    assert len(frames) == 7 and error.frame_index == 7


def test_truncated_matroska_detected_by_declared_duration(h264, tmp_path):
    # Cut between packets, Matroska just ends early: no error, no corrupt flag, only the
    # duration in its header tells.
    data = remux(h264, tmp_path / "clip.mkv", "matroska")
    assert len(list(iter_video_frames(data))) == 16
    frames, error = collect(data[: int(0.6 * len(data))])
    assert 0 < len(frames) < 16 and error.frame_index == len(frames)
    assert "4.00 s the container declares" in str(error)


def test_corrupt_frame_stops_and_resume_skips_past_it(tmp_path, clip_frames):
    data = bytearray(remux(CLIP.read_bytes(), tmp_path / "faststart.mp4", "mp4", {"movflags": "faststart"}))
    with av.open(io.BytesIO(bytes(data))) as container:
        third = [p for p in container.demux(video=0) if p.size][2]
        start = third.pos + third.size // 4
    data[start:start + third.size // 4] = np.random.default_rng(0).integers(0, 256, third.size // 4, np.uint8).tobytes()
    frames, error = collect(bytes(data))
    assert indices(frames) == [0, 1] and error.frame_index == 2 and "frame 2 (0.67 s)" in str(error)
    frames, error = collect(bytes(data), first_frame=3)  # the next segment still decodes
    assert indices(frames) == [3, 4, 5, 6, 7] and error is None


def test_not_a_video_fails_clearly(scenes, tmp_path):
    jpeg = (SCENES / "frames" / "c1s1_001051.jpg").read_bytes()
    audio = io.BytesIO()
    with av.open(audio, "w", format="matroska") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            out.mux(packet)
    cases = {
        b"": "empty file",
        bytes(range(256)) * 40: "not a readable video",
        jpeg: "not a video container",
        audio.getvalue(): "no video stream",
        str(tmp_path / "missing.mp4"): "cannot read",
    }
    for source, reason in cases.items():
        frames, error = collect(source)
        assert frames == [] and error.frame_index == 0 and reason in str(error), (reason, error)
        with pytest.raises(VideoDecodeError, match=reason):
            probe_video(source)


def test_max_pixels_refused_before_decoding(h264):
    with pytest.raises(VideoDecodeError, match="640x360 exceeds the 100,000-pixel cap"):
        next(iter_video_frames(h264, max_pixels=100_000))
    with pytest.raises(VideoDecodeError, match="pixel cap"):
        next(iter_video_frames(CLIP, max_pixels=1_000_000))  # 1920×1080
    assert len(list(iter_video_frames(h264, max_pixels=640 * 360))) == 16


# --- frames by index for the report: packet index + keyframe seek, checked -------------------------


@pytest.fixture(scope="module")
def gops(scenes) -> bytes:
    """60 frames, H.264 with B-frames (reordered; MP4 writes an edit list) and a keyframe every 10."""
    images = [np.roll(scenes[i // 12 % len(scenes)], 3 * (i % 12), axis=1) for i in range(60)]
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=12,
                                options={"x264-params": "keyint=10:min-keyint=10:bframes=3:scenecut=0"})
        stream.width, stream.height, stream.pix_fmt = images[0].shape[1], images[0].shape[0], "yuv420p"
        for image in images:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(stream.encode())
    return buffer.getvalue()


def test_frames_by_seeking_are_the_frames_decoded_from_the_start(gops, tmp_path, monkeypatch):
    from reidx.pipeline import video_seek
    from reidx.pipeline.video_seek import SeekUnsafe, frames_by_seeking

    with av.open(io.BytesIO(gops)) as container:
        packets = [p for p in container.demux(container.streams.video[0]) if p.size]
    assert sum(p.is_keyframe for p in packets) == 6
    assert [p.pts for p in packets] != sorted(p.pts for p in packets)  # B-frames: decode order ≠ time order
    wanted = [0, 5, 9, 10, 11, 27, 33, 34, 58, 59, 70]  # across keyframes, both sides of one, past the end
    for name, video in (("mp4", gops), ("mkv", remux(gops, tmp_path / "c.mkv", "matroska")), ("clip", CLIP)):
        whole = {f.index: f.image for f in iter_video_frames(video)}
        for indices in (wanted, [59], [3, 4, 5, 6, 7]):
            found = list(frames_by_seeking(video, indices))
            expected = [i for i in indices if i in whole]
            assert [f.index for f in found] == expected, (name, indices)
            assert all(np.array_equal(f.image, whole[f.index]) for f in found), (name, indices)
            assert [f.index for f in iter_video_frames(video, indices=indices)] == expected
    # MPEG-TS seeks by bytes: it missed (checked by time) before it was refused by its container
    ts = remux(gops, tmp_path / "c.ts", "mpegts")
    monkeypatch.setattr(video_seek, "SEEKABLE_FORMATS", {"mpegts"})
    with pytest.raises(SeekUnsafe, match="not found after the seek|ended before"):
        list(frames_by_seeking(ts, wanted))
    monkeypatch.undo()
    with pytest.raises(SeekUnsafe, match="mpegts is decoded from the start"):
        list(frames_by_seeking(ts, wanted))


def test_report_pictures_by_seeking_and_from_the_start_are_the_same(gops, tmp_path):
    """The report's pictures from MP4 (found by seeking) and from the same packets in MPEG-TS (decoded
    from the start): identical, and the crop is the crop rule's region of the right frame."""
    from reidx.indexers.report_images import Wanted, make_pictures
    from reidx.pipeline.video_seek import SeekUnsafe, frames_by_seeking

    for fmt in ("mp4", "ts"):
        (tmp_path / fmt).mkdir()
    (tmp_path / "mp4" / "c.mp4").write_bytes(gops)
    remux(gops, tmp_path / "ts" / "c.mp4", "mpegts")  # a TS named .mp4: opened by its content
    with pytest.raises(SeekUnsafe):  # so its pictures come from decoding from the start
        list(frames_by_seeking(tmp_path / "ts" / "c.mp4", [3, 27, 58]))
    box = (200.4, 90.2, 260.7, 300.9)
    items = [Wanted(f"{kind[0]}-{i}.jpg", box, kind, i) for i in (3, 27, 58) for kind in ("crop", "frame")]
    made = [make_pictures({(str(tmp_path / fmt), "c.mp4"): items}, 50_000_000) for fmt in ("mp4", "ts")]
    assert made[0].reasons == made[1].reasons == {} and len(made[0].made) == len(made[1].made) == 6
    for name, picture in made[0].made.items():
        assert np.array_equal(np.asarray(picture), np.asarray(made[1].made[name])), name
    frames = {f.index: f.image for f in iter_video_frames(gops)}
    crop = np.asarray(made[0].made["c-27.jpg"], np.float32)
    for index, same in ((27, True), (29, False)):  # frame 29: the scene has panned 6 pixels since
        region = Image.fromarray(frames[index]).crop((200, 90, 261, 301)).resize((crop.shape[1], 128), Image.BILINEAR)
        assert (np.abs(crop - np.asarray(region, np.float32)).max() == 0) == same, index
