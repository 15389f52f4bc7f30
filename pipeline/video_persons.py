"""The persons of one video segment: decode → sample → detect → crop → embed → track.

The video counterpart of :mod:`reidx.pipeline.persons` (whose models, :func:`person_boxes` rule,
crop rule and :func:`shard_table` it reuses, so a frame of a video and the same frame as a still
give the same boxes and vectors). One call handles one *segment*: the sampled frames from
``first_frame`` until the first one at least ``source.segment_s`` seconds (presentation time)
after the segment's first frame, or the video's end. A segment is one ledger entry and one
resume point (docs/video.md); its tracker starts from the state its predecessor committed, so
track ids run on across segments.

Reading: a video in a folder is streamed from its path and one behind a URL from its fsspec file
(both never held whole; ``max_member_bytes`` does not apply), a video inside a tar/zip archive is
read into memory whole first (capped by ``max_member_bytes``, like an image member). Memory is
then bounded by the decoder (a few frames), :data:`FRAME_BATCH` frames being detected, and the
segment's rows (≈ 2 KB per detection), however long the video.

Decoding without seeking means segment k of a fresh reader decodes (and drops) every frame
before it. So a worker process keeps the reader of a segment it just finished open, positioned
where the next segment starts (:data:`MAX_OPEN_READERS` at most, least recently used closed), and
the driver sends the next segment to the same worker: a whole video is decoded once. A resumed
or moved segment decodes from the start; the frames it yields are the same (pipeline/video.py).

A break (truncated or corrupt video) ends the video where it happened: the frames before it are
kept in an ``ok`` entry, the break itself is a ``failed`` entry at the frame that broke.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from PIL import Image

from reidx.pipeline.atomic import write_text_atomic
from reidx.pipeline.boxes import crop_region, resize_crop
from reidx.pipeline.ledger import tracks_dir
from reidx.pipeline.manifest import Source
from reidx.pipeline.persons import STAGES, ModelSpec, detector_for, embedder_for, shard_table
from reidx.pipeline.shards import detection_id, image_key
from reidx.pipeline.sources import open_video
from reidx.pipeline.tracking import Tracker, track_embedding
from reidx.pipeline.video import VideoDecodeError, iter_video_frames

FRAME_BATCH = 4  # sampled frames whose crops share embedder batches (detected one by one)
MAX_OPEN_READERS = 2  # open videos a worker keeps for the next segment (each: a decoder, an archive member's bytes)
_READERS: "OrderedDict[tuple, _Reader]" = OrderedDict()  # per process


def segment_key(video_key: str, first_frame: int) -> str:
    """The ledger key of a video segment: ``<source>/<member>@<first frame>``."""
    return f"{video_key}@{first_frame}"


def track_id(video_key: str, number: int) -> str:
    """Globally unique: a tracker's ids are unique within its video, and run on across segments."""
    return f"{video_key}#{number}"


class _Reader:
    """A video's sampled frames from ``position`` on; ``peeked`` is a frame read but not yet used."""

    def __init__(self, frames, closer, position: int):
        self.frames, self.closer, self.position, self.peeked = frames, closer, position, None
        self.fresh = True  # opened for this segment, not kept from the previous one

    def next(self):
        if self.peeked is not None:
            frame, self.peeked = self.peeked, None
            return frame
        return next(self.frames)

    def close(self) -> None:
        self.frames.close()  # the generator's exit closes the container and a file it opened
        if self.closer is not None:
            self.closer()


def _open(source: Source, member: str, first_frame: int, max_pixels: int) -> _Reader:
    """A reader at ``first_frame``, or :class:`VideoDecodeError` with why the video cannot be read."""
    video, closer = open_video(source, member)  # found and refused as an image would be
    frames = iter_video_frames(video, fps=source.fps, every=source.every, start_time=source.timestamp_of(member),
                               max_pixels=max_pixels, first_frame=first_frame)
    return _Reader(frames, closer, first_frame)


def _reader(source: Source, member: str, first_frame: int, spec: ModelSpec, fingerprint: str | None) -> _Reader:
    key = (source, member, fingerprint, spec.max_pixels)
    reader = _READERS.pop(key, None)
    if reader is not None and reader.position == first_frame:
        reader.fresh = False
        return reader
    if reader is not None:
        reader.close()
    return _open(source, member, first_frame, spec.max_pixels)


def _keep(source: Source, member: str, spec: ModelSpec, fingerprint: str | None, reader: _Reader) -> None:
    """Keep a reader open for the video's next segment, closing the least recently used beyond the limit."""
    _READERS[(source, member, fingerprint, spec.max_pixels)] = reader
    while len(_READERS) > MAX_OPEN_READERS:
        _READERS.popitem(last=False)[1].close()


@dataclass
class VideoPersons:
    """One segment's outcome: its ledger records (an ``ok`` one, then a ``failed`` one where the video
    broke), its rows in the gallery-shard schema, and the tracker state after its good frames."""

    records: list[dict]
    table: pa.Table | None = None
    tracker_state: dict | None = None  # None when nothing was decoded (nothing to carry on)
    frames: int = 0  # sampled frames that went through the detector
    seconds: dict = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    reopened: bool = False  # a later segment whose video had to be opened (and decoded) from its start again


class _Segment:
    """Accumulates a segment's frames: detect, embed a few frames' crops together, track, keep rows."""

    def __init__(self, source: Source, member: str, spec: ModelSpec, tracker: Tracker, seconds: dict):
        self.source, self.member, self.spec, self.tracker, self.seconds = source, member, spec, tracker, seconds
        self.key = image_key(source.name, member)
        self.rows, self.vectors, self.times, self.indices, self.tracks = [], [], [], [], []
        self.batch = []

    def add(self, frame) -> None:
        self.batch.append(frame)
        if len(self.batch) >= FRAME_BATCH:
            self.flush()

    def flush(self) -> None:
        frames, self.batch = self.batch, []
        if not frames:
            return
        clock = time.perf_counter()
        # one frame per detector call: batches of 4 full-HD frames ran ~15% slower on one CPU thread
        # (7.4-7.8 against 8.7-9.7 frames/s), and a frame then gets the boxes it gets as a still
        boxes = [detector_for(self.spec).detect([f.image])[0] for f in frames]
        now = time.perf_counter()
        self.seconds["detect"] += now - clock
        crops = []
        for frame, frame_boxes in zip(frames, boxes):
            image = Image.fromarray(frame.image)
            crops += [resize_crop(image.crop(crop_region(box, image.width, image.height))) for box in frame_boxes]
        clock = time.perf_counter()
        self.seconds["decode"] += clock - now  # cropping and resizing count as decode, as for images
        vectors = embedder_for(self.spec).embed_batches(crops)
        self.seconds["embed"] += time.perf_counter() - clock
        start = 0
        for frame, frame_boxes in zip(frames, boxes):
            frame_vectors = vectors[start:start + len(frame_boxes)]
            start += len(frame_boxes)
            # time never runs backwards for the tracker, even where a damaged stream's timestamps do
            when = max(frame.pts_s, self.tracker.last_time if self.tracker.last_time is not None else frame.pts_s)
            ids = self.tracker.update(frame_boxes, frame_vectors, when)
            height, width = frame.image.shape[:2]
            frame_key = f"{self.key}@{frame.index}"
            for k, (box, number) in enumerate(zip(frame_boxes, ids)):
                x1, y1, x2, y2, score = (float(v) for v in box[:5])
                self.rows.append((detection_id(frame_key, k), self.key, self.member, width, height,
                                  x1, y1, x2, y2, score))
                self.times.append(frame.timestamp)
                self.indices.append(frame.index)
                self.tracks.append(track_id(self.key, int(number)))
            self.vectors.append(frame_vectors)

    def table(self, first_frame: int) -> pa.Table | None:
        self.flush()
        if not self.rows:
            return None
        vectors = np.concatenate(self.vectors)
        rows, times, indices, tracks = self.rows, self.times, self.indices, self.tracks
        if self.source.video_index == "tracks":
            rows, vectors, times, indices, tracks = per_track(rows, vectors, times, indices, tracks, first_frame)
        detector = detector_for(self.spec).info
        return shard_table(self.source, rows, vectors, embedder_for(self.spec).info, detector,
                           timestamps=times, frame_indices=indices, track_ids=tracks)


def per_track(rows, vectors, times, indices, tracks, first_frame: int):
    """One row per track of the segment: the quality-weighted mean embedding (:func:`track_embedding`)
    with the box, frame and time of the track's best detection (highest score × size weight)."""
    order: dict[str, list[int]] = {}
    for i, track in enumerate(tracks):
        order.setdefault(track, []).append(i)
    out = ([], [], [], [], [])
    for track, members in order.items():
        boxes = np.array([rows[i][5:9] for i in members], np.float64)
        scores = np.array([rows[i][9] for i in members], np.float64)
        weights = scores * np.minimum(1.0, (boxes[:, 3] - boxes[:, 1]) / 256.0)
        best = members[int(np.argmax(weights))]
        row = (detection_id(f"{track}@{first_frame}", 0),) + tuple(rows[best][1:])
        for column, value in zip(out, (row, track_embedding(vectors[members], scores, boxes), times[best],
                                       indices[best], track)):
            column.append(value)
    return out[0], np.stack(out[1]), out[2], out[3], out[4]


def persons_of_video_segment(source: Source, member: str, first_frame: int, tracker_state: dict | None,
                             spec: ModelSpec, fingerprint: str | None = None) -> VideoPersons:
    """Decode, detect, embed and track one segment of a video; failures become records, never exceptions."""
    key = image_key(source.name, member)
    base = {"source": source.name, "member": member, "fingerprint": fingerprint, "video": True}
    seconds = dict.fromkeys(STAGES, 0.0)
    embedder_for(spec)  # first, as for images: it sets this process's torch threads, which the detector takes
    clock = time.perf_counter()
    failure, reader = source.label_error(member), None
    if failure is None:
        try:
            reader = _reader(source, member, first_frame, spec, fingerprint)
        except VideoDecodeError as exc:
            failure = str(exc)
    reopened = reader is not None and reader.fresh and first_frame > 0
    if failure is not None:
        return VideoPersons([{**base, "image_key": segment_key(key, first_frame), "status": "failed",
                              "reason": failure, "frame_start": first_frame, "frame_stop": first_frame,
                              "video_end": True}], seconds=seconds)
    seconds["read"] += time.perf_counter() - clock
    tracker = Tracker.from_state(tracker_state) if tracker_state else Tracker()
    segment = _Segment(source, member, spec, tracker, seconds)
    start_s = stop = None
    last = first_frame - 1
    broke: tuple[int, str] | None = None
    frames = 0
    while True:
        clock = time.perf_counter()
        try:
            frame = reader.next()
        except StopIteration:
            break
        except VideoDecodeError as exc:
            broke = (max(exc.frame_index, first_frame), str(exc))
            break
        except OSError as exc:  # a URL's read timed out or the file vanished: the video breaks here
            broke = (last + 1, f"read error at frame {last + 1}: {exc}")
            break
        finally:
            seconds["decode"] += time.perf_counter() - clock
        if start_s is None:
            start_s = frame.pts_s
        elif frame.pts_s >= start_s + source.segment_s:
            reader.peeked, reader.position, stop = frame, frame.index, frame.index
            break
        segment.add(frame)
        last, frames = frame.index, frames + 1
    table = segment.table(first_frame)
    if stop is not None:
        _keep(source, member, spec, fingerprint, reader)
    else:
        reader.close()
    records = []
    if broke is None or broke[0] > first_frame or frames:
        end = stop if stop is not None else broke[0] if broke else last + 1
        records.append({**base, "image_key": segment_key(key, first_frame), "status": "ok",
                        "num_persons": table.num_rows if table is not None else 0, "frame_start": first_frame,
                        "frame_stop": end, "video_end": stop is None and broke is None})
    if broke is not None:
        records.append({**base, "image_key": segment_key(key, broke[0]), "status": "failed", "reason": broke[1],
                        "frame_start": broke[0], "frame_stop": broke[0], "video_end": True})
    state = tracker.state() if records[0]["status"] == "ok" else None
    return VideoPersons(records, table, state, frames, seconds, reopened=reopened)


def write_tracks_state(gallery: str | os.PathLike, video_key: str, record: dict, state: dict) -> str:
    """The tracker state after a segment, written atomically under a fresh name; the file name.

    A new name each time: a rerun of a segment never overwrites the state a committed one names."""
    name = f"{uuid.uuid4().hex}.json"
    document = {"version": 1, "video": video_key, "frame_start": record["frame_start"],
                "frame_stop": record["frame_stop"], "tracker": state}
    write_text_atomic(tracks_dir(gallery) / name, json.dumps(document))
    return name


def read_tracks_state(gallery: str | os.PathLike, name: str) -> dict:
    """The tracker state a committed segment names (``Tracker.from_state`` input)."""
    return json.loads((tracks_dir(gallery) / name).read_text())["tracker"]
