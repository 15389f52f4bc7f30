"""Video decoding throughput, with and without codec threads, same run.

    python benchmarks/video.py [--repeats 5] [--frames 48]

Two clips: the shared 1080p street clip (8 frames, MPEG-4 Part 2 in MP4) and a longer 1080p
H.264 clip encoded here from the shared scene frames (each held 6 frames with a slow pan;
libx264 veryfast: B-frames, one slice per frame, as cameras write it). For each: decode-only
frames/s (demux + decode, no RGB) under three codec thread settings, none (``thread_count=1``,
the baseline), PyAV's default (slice threads) and ``AUTO`` (frame + slice threads); reidx uses
none; and end-to-end frames/s of ``iter_video_frames`` (decode + RGB) under the same three.
Repeats are interleaved and medians reported, because this machine is noisy; speedups are
medians of per-repeat ratios (runs seconds apart), so slow load drift cancels. Prints one JSON
object.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import time
from pathlib import Path

import av
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("REIDX_SHARED", REPO.parent / "shared"))

from reidx.pipeline import video as video_module  # noqa: E402
from reidx.pipeline.video import iter_video_frames  # noqa: E402

SETTINGS = {"none": ("NONE", 1), "pyav_default": (None, None), "auto": ("AUTO", 0)}
READER_SETTING = {"none": "NONE", "pyav_default": None, "auto": "AUTO"}  # reidx.pipeline.video.THREAD_TYPE


def encode_h264(frames: int, rate: int = 12) -> bytes:
    scenes = sorted((SHARED / "data" / "scenes" / "frames").glob("*.jpg"))
    images = [np.asarray(Image.open(p).convert("RGB")) for p in scenes]
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="matroska") as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = images[0].shape[1], images[0].shape[0], "yuv420p"
        stream.options = {"preset": "veryfast"}
        for i in range(frames):
            # Each scene held for 6 frames with a slow pan, so frames predict from each other
            # as in real footage (a new scene every frame would make every frame a keyframe).
            image = np.roll(images[(i // 6) % len(images)], 8 * (i % 6), axis=1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buffer.getvalue()


def decode_only(data: bytes, setting: str) -> float:
    thread_type, thread_count = SETTINGS[setting]
    start = time.perf_counter()
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        if thread_type is not None:
            stream.thread_type = thread_type
            stream.codec_context.thread_count = thread_count
        count = sum(1 for _ in container.decode(stream))
    return count / (time.perf_counter() - start)


def end_to_end(data: bytes, setting: str) -> float:
    default = video_module.THREAD_TYPE
    video_module.THREAD_TYPE = READER_SETTING[setting]
    try:
        start = time.perf_counter()
        count = sum(1 for _ in iter_video_frames(data))
        return count / (time.perf_counter() - start)
    finally:
        video_module.THREAD_TYPE = default


def measure(data: bytes, repeats: int) -> dict:
    runs: dict[str, list[float]] = {}
    names = list(SETTINGS)
    for repeat in range(repeats):  # interleaved, order rotated: drift hits every setting alike
        order = names[repeat % len(names):] + names[:repeat % len(names)]
        for setting in order:
            runs.setdefault(f"decode_fps_threads_{setting}", []).append(decode_only(data, setting))
        for setting in order:
            runs.setdefault(f"iter_video_frames_fps_threads_{setting}", []).append(end_to_end(data, setting))
    result = {key: round(statistics.median(values), 1) for key, values in runs.items()}
    for setting in ("auto", "pyav_default"):
        ratios = [a / b for a, b in zip(runs[f"decode_fps_threads_{setting}"], runs["decode_fps_threads_none"])]
        result[f"decode_speedup_{setting}_vs_none"] = round(statistics.median(ratios), 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--frames", type=int, default=48, help="frames of the encoded H.264 clip")
    args = parser.parse_args()

    clip = (SHARED / "data" / "video" / "street-8f-3fps.mp4").read_bytes()
    start = time.perf_counter()
    longer = encode_h264(args.frames)
    encode_s = time.perf_counter() - start
    for data in (clip, longer):  # warm-up: first open loads codecs, first decode warms caches
        decode_only(data, "auto")

    report = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "pyav": av.__version__,
                    "libavcodec": ".".join(map(str, av.library_versions["libavcodec"]))},
        "repeats": args.repeats,
        "statistic": "median frames/s",
        "reidx_thread_type": video_module.THREAD_TYPE or "pyav_default",
        "shared_clip": {"file": "street-8f-3fps.mp4", "frames": 8, "size": "1920x1080", "codec": "mpeg4",
                        **measure(clip, args.repeats)},
        "encoded_clip": {"frames": args.frames, "size": "1920x1080", "codec": "h264 (libx264 veryfast, mkv)",
                         "bytes": len(longer), "encode_s": round(encode_s, 2), **measure(longer, args.repeats)},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
