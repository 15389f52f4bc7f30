"""Video throughput and what per-track indexing does, one JSON object.

    python benchmarks/video.py [--sections decode,pipeline,tracks] [--repeats 5] [--frames 48]
                               [--pipeline-repeats 3] [--pipeline-frames 24]

``decode``: decoding throughput with and without codec threads, same run. Two clips: the shared
1080p street clip (8 frames, MPEG-4 Part 2 in MP4) and a longer 1080p H.264 clip encoded here
from the shared scene frames (each held 6 frames with a slow pan; libx264 veryfast: B-frames, one
slice per frame, as cameras write it). For each: decode-only frames/s (demux + decode, no RGB)
under three codec thread settings, none (``thread_count=1``, the baseline), PyAV's default (slice
threads) and ``AUTO`` (frame + slice threads); reidx uses none; and end-to-end frames/s of
``iter_video_frames`` (decode + RGB) under the same three. Repeats are interleaved and medians
reported, because this machine is noisy; speedups are medians of per-repeat ratios (runs seconds
apart), so slow load drift cancels.

``pipeline``: frames/s of what a nightly worker does with a video, in one process with one
thread (as each of the default one-per-core workers): decode alone (``iter_video_frames``, the
baseline), decode + detect + embed + track (``persons_of_video_segment``, the whole clip as one
segment), and — the same frames as full-HD JPEGs (quality 95) of a ``frames`` source through
``persons_of_members`` — what the video saves against stills. Interleaved repeats, medians, and
the stage split of the video path.

``tracks``: what ``index = "tracks"`` (one quality-weighted mean vector per track and segment)
does to index size and accuracy. The street clip: vectors stored either way. Con-ReID (212
queries, 5,295 gallery crops, 6 cameras, Market-1501 protocol): the gallery as single crops
against the same crops averaged per *oracle* track — each (person, camera) group, whole or cut
into runs of k crops in name order — i.e. what a perfect tracker would store; tracker errors
(two people in one track) would cost more than this shows.
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


# --- pipeline: decode alone against decode + detect + embed + track, and against stills -------------


def _spec():
    from reidx.pipeline.persons import ModelSpec

    return ModelSpec("osnet_x0_25_msmt17", threads=1)  # one thread, as each one-per-core nightly worker


def _video_source(folder: Path, **extra):
    from reidx.pipeline.manifest import Source

    return Source(name="bench", uri=str(folder), kind="video", segment_s=1e9, **extra)


def pipeline_section(clip: bytes, encoded: bytes, repeats: int) -> dict:
    import tempfile

    from reidx.pipeline.manifest import Source
    from reidx.pipeline.persons import embedder_for, detector_for, persons_of_members
    from reidx.pipeline.video_persons import persons_of_video_segment

    spec = _spec()
    embedder_for(spec), detector_for(spec)  # loaded before any clock starts
    out = {"repeats": repeats, "statistic": "median frames/s", "threads": 1,
           "detector": f"{detector_for(spec).info.name} input {detector_for(spec).info.input_size}"}
    with tempfile.TemporaryDirectory() as tmp:
        for name, data, suffix in (("shared_clip", clip, ".mp4"), ("encoded_clip", encoded, ".mkv")):
            folder, stills = Path(tmp) / name, Path(tmp) / f"{name}-jpeg"
            folder.mkdir(), stills.mkdir()
            (folder / f"video{suffix}").write_bytes(data)
            frames = [f.image for f in iter_video_frames(data)]
            for i, image in enumerate(frames):
                Image.fromarray(image).save(stills / f"{i:04d}.jpg", quality=95)
            video, frames_source = _video_source(folder), Source(name="stills", uri=str(stills), kind="frames")
            members = sorted(p.name for p in stills.iterdir())
            runs: dict[str, list[float]] = {}
            stages: list[dict] = []
            for _ in range(repeats):
                start = time.perf_counter()
                count = sum(1 for _ in iter_video_frames(folder / f"video{suffix}"))
                runs.setdefault("decode_fps", []).append(count / (time.perf_counter() - start))
                start = time.perf_counter()
                persons = persons_of_video_segment(video, f"video{suffix}", 0, None, spec)
                seconds = time.perf_counter() - start
                runs.setdefault("decode_detect_embed_track_fps", []).append(persons.frames / seconds)
                stages.append(persons.seconds)
                start = time.perf_counter()
                persons_of_members(frames_source, members, spec)
                seconds = time.perf_counter() - start
                runs.setdefault("stills_read_decode_detect_embed_fps", []).append(len(members) / seconds)
            result = {"frames": len(frames), "size": f"{frames[0].shape[1]}x{frames[0].shape[0]}",
                      "persons": persons.table.num_rows if persons.table is not None else 0}
            result.update({k: round(statistics.median(v), 2) for k, v in runs.items()})
            total = {k: statistics.median(s[k] for s in stages) for k in stages[0]}
            result["video_stage_share"] = {k: round(v / sum(total.values()), 3) for k, v in total.items()}
            pairs = zip(runs["decode_detect_embed_track_fps"], runs["stills_read_decode_detect_embed_fps"])
            result["video_vs_stills"] = round(statistics.median(a / b for a, b in pairs), 2)
            out[name] = result
    return out


# --- tracks: index size and accuracy of one vector per track ----------------------------------------


def tracks_section(clip: bytes) -> dict:
    import tempfile

    from reidx.pipeline.video_persons import persons_of_video_segment

    spec = _spec()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "street.mp4").write_bytes(clip)
        counts = {}
        for mode in ("detections", "tracks"):
            persons = persons_of_video_segment(_video_source(Path(tmp), video_index=mode), "street.mp4", 0, None, spec)
            counts[mode] = persons.table.num_rows
        dim = persons.table.schema.field("embedding").type.list_size
        out["street_clip"] = {"vectors_detections": counts["detections"], "vectors_tracks": counts["tracks"],
                              "index_bytes_detections": counts["detections"] * dim * 4,
                              "index_bytes_tracks": counts["tracks"] * dim * 4}
    out["con_reid_oracle_tracks"] = con_reid_tracks()
    return out


def con_reid_tracks(run_lengths=(1, 4, 16, None)) -> dict:
    from reidx.indexers.metrics import evaluate_ranking
    from reidx.pipeline.embed import build_embedder
    from reidx.pipeline.labelled_split import embed_side
    from reidx.pipeline.tracking import track_embedding

    embedder = build_embedder("osnet_x0_25_msmt17")
    data = SHARED / "data" / "con-reid"
    query, gallery = (embed_side([str(data / side)], embedder) for side in ("query", "bounding_box_test"))
    q_pids, q_cams = query.table["person_id"].to_numpy(), np.array(query.table["camera"].to_pylist())
    names = [Path(p).name for p in gallery.table["path"].to_pylist()]
    pids, cams = gallery.table["person_id"].to_numpy(), np.array(gallery.table["camera"].to_pylist())
    groups: dict[tuple, list[int]] = {}
    for i in sorted(range(len(names)), key=names.__getitem__):  # name order: camera, sequence, frame
        groups.setdefault((pids[i], cams[i]), []).append(i)
    results = {}
    for k in run_lengths:
        vectors, g_pids, g_cams = [], [], []
        for (pid, cam), members in groups.items():
            step = k or len(members)
            for j in range(0, len(members), step):
                run = members[j:j + step]
                boxes = np.tile([0, 0, 64, 128], (len(run), 1))  # every crop alike: a plain mean
                vectors.append(track_embedding(gallery.features[run], np.ones(len(run)), boxes))
                g_pids.append(pid), g_cams.append(cam)
        metrics = evaluate_ranking(1 - query.features @ np.stack(vectors).T, q_pids, q_cams,
                                   np.array(g_pids), np.array(g_cams)).as_percent_dict()
        results["crops" if k == 1 else f"tracks_of_{k}" if k else "one_track_per_person_and_camera"] = {
            key: metrics[key] for key in ("mAP", "rank1", "rank5", "gallery_items")}
    return results


def decode_section(clip: bytes, args) -> dict:
    start = time.perf_counter()
    longer = encode_h264(args.frames)
    encode_s = time.perf_counter() - start
    for data in (clip, longer):  # warm-up: first open loads codecs, first decode warms caches
        decode_only(data, "auto")
    return {
        "repeats": args.repeats,
        "statistic": "median frames/s",
        "reidx_thread_type": video_module.THREAD_TYPE or "pyav_default",
        "shared_clip": {"file": "street-8f-3fps.mp4", "frames": 8, "size": "1920x1080", "codec": "mpeg4",
                        **measure(clip, args.repeats)},
        "encoded_clip": {"frames": args.frames, "size": "1920x1080", "codec": "h264 (libx264 veryfast, mkv)",
                         "bytes": len(longer), "encode_s": round(encode_s, 2), **measure(longer, args.repeats)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="decode,pipeline,tracks")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--frames", type=int, default=48, help="frames of the encoded H.264 clip (decode)")
    parser.add_argument("--pipeline-repeats", type=int, default=3)
    parser.add_argument("--pipeline-frames", type=int, default=24, help="frames of the encoded H.264 clip (pipeline)")
    args = parser.parse_args()
    sections = args.sections.split(",")

    clip = (SHARED / "data" / "video" / "street-8f-3fps.mp4").read_bytes()
    report = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "pyav": av.__version__,
                          "libavcodec": ".".join(map(str, av.library_versions["libavcodec"]))}}
    if "decode" in sections:
        report["decode"] = decode_section(clip, args)
    if "pipeline" in sections or "tracks" in sections:
        if "pipeline" in sections:
            report["pipeline"] = pipeline_section(clip, encode_h264(args.pipeline_frames), args.pipeline_repeats)
        if "tracks" in sections:
            report["tracks"] = tracks_section(clip)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
