"""The persons of a batch of images: read → decode → detect (frames) → crop → embed.

The one composition of the pipeline's stages for images, called by the nightly job's Dask workers
(:mod:`reidx.pipeline.worker`, which writes the result as a shard) and by ``reidx query`` (which
searches it), so a query crop and a gallery crop of the same image give the same vector. Videos:
:mod:`reidx.pipeline.video_persons`, which reuses the models, crop rule and :func:`shard_table`.
Models are loaded once per process and cached here — never pickled into a task graph — so a
Dask task carries only a :class:`ModelSpec` of names and paths.

Data passed between the stages::

    Source + member names ─read_members→ (member, bytes | reason) ─decode_image→ PIL RGB image
        ─detector (frames) / whole image (crops)→ boxes (K, 5) ─crop_region + resize_crop→ uint8 crops
        ─embedder→ unit vectors (K, D) ─shard_table→ Arrow table in the gallery-shard schema
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from reidx.pipeline.boxes import crop_region, resize_crop
from reidx.pipeline.embedding_table import embedding_array
from reidx.pipeline.gallery import DEFAULT_DETECTOR
from reidx.pipeline.imaging import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from reidx.pipeline.manifest import Source
from reidx.pipeline.shards import detection_id, image_key, shard_schema

STAGES = ("read", "decode", "detect", "embed", "write")
_MODELS: dict = {}  # per process: (kind, ModelSpec) -> loaded model


@dataclass(frozen=True)
class ModelSpec:
    """Picklable description of the models a worker needs (the models themselves stay put)."""

    weights: str
    backend: str = "auto"
    device: str = "auto"
    threads: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    detector: str = DEFAULT_DETECTOR
    detector_input_size: int | None = None


def embedder_for(spec: ModelSpec):
    """The ReID embedder, loaded on first use: torch is imported in the workers, never by the job's driver."""
    if ("embedder", spec) not in _MODELS:
        from reidx.pipeline.embed import build_embedder

        _MODELS[("embedder", spec)] = build_embedder(spec.weights, backend=spec.backend, device=spec.device,
                                                     threads=spec.threads)
    return _MODELS[("embedder", spec)]


def detector_for(spec: ModelSpec):
    """The YOLOX person detector, loaded on first use (crop-only nights never load it)."""
    if ("detector", spec) not in _MODELS:
        from reidx.pipeline.detect import Detector

        _MODELS[("detector", spec)] = Detector(spec.detector, device=spec.device, input_size=spec.detector_input_size)
    return _MODELS[("detector", spec)]


def person_boxes(source: Source, image, spec: ModelSpec) -> np.ndarray:
    """(K, 5) x1, y1, x2, y2, score: the whole image for crops, the detector's boxes for frames."""
    if source.kind == "crops":
        return np.array([[0.0, 0.0, image.width, image.height, 1.0]], np.float32)
    (boxes,) = detector_for(spec).detect([np.asarray(image)])
    return boxes


@dataclass
class Persons:
    """The persons found in a batch of images: one record per image, one shard-schema row per person."""

    records: list[dict]  # image_key, source, member, status ok|failed, reason, num_persons (ledger fields)
    table: pa.Table | None  # gallery-shard schema (pipeline/shards.py); None when no person was found
    seconds: dict = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))  # time per stage


def persons_of_members(source: Source, members: list[str], spec: ModelSpec) -> Persons:
    """Read, decode, detect, crop and embed the members of one source; failures become records, never exceptions."""
    from reidx.pipeline.sources import read_members

    embedder = embedder_for(spec)
    persons = Persons([], None)
    seconds = persons.seconds
    crops, rows = [], []
    clock = time.perf_counter()
    for member, data, error in read_members(source, members):
        now = time.perf_counter()
        seconds["read"] += now - clock
        clock = now
        key = image_key(source.name, member)
        record = {"image_key": key, "source": source.name, "member": member}
        persons.records.append(record)
        error = error or source.label_error(member)  # a label that is no int64 fails this image, not the night
        if error is None:
            try:
                image = decode_image(data, max_pixels=spec.max_pixels)
            except ImageDecodeError as exc:
                error = str(exc)
        if error is not None:
            record.update(status="failed", reason=error)
            continue
        now = time.perf_counter()
        seconds["decode"] += now - clock
        boxes = person_boxes(source, image, spec)
        clock = time.perf_counter()
        seconds["detect"] += clock - now
        record.update(status="ok", num_persons=len(boxes))
        for index, box in enumerate(boxes):
            crops.append(resize_crop(image.crop(crop_region(box, image.width, image.height))))
            x1, y1, x2, y2, score = (float(v) for v in box[:5])
            rows.append((detection_id(key, index), key, member, image.width, image.height, x1, y1, x2, y2, score))
        now = time.perf_counter()
        seconds["decode"] += now - clock  # cropping and resizing count as decode
        clock = now
    if rows:
        embeddings = embedder.embed_batches(crops)
        seconds["embed"] += time.perf_counter() - clock
        detector = detector_for(spec).info if source.kind != "crops" else None
        persons.table = shard_table(source, rows, embeddings, embedder.info, detector)
    return persons


def shard_table(source: Source, rows: list[tuple], embeddings: np.ndarray, info, detector=None, *,
                timestamps: list | None = None, frame_indices: list | None = None,
                track_ids: list | None = None) -> pa.Table:
    """Rows of (detection_id, image_key, member, frame w, h, x1, y1, x2, y2, score) + embeddings → shard schema.

    Video rows also give each row's ``timestamps`` (start time + presentation time; the source's
    ``timestamp_of(member)`` otherwise), ``frame_indices`` and ``track_ids``; null otherwise."""
    n = len(rows)
    ids, keys, members, widths, heights, x1, y1, x2, y2, scores = (list(c) for c in zip(*rows))
    columns = {
        "detection_id": ids, "image_key": keys, "source": [source.name] * n, "source_uri": [source.uri] * n,
        "member": members, "camera": [source.camera_of(m) for m in members],
        "timestamp": timestamps if timestamps is not None else [source.timestamp_of(m) for m in members],
        "frame_width": widths, "frame_height": heights,
        "x1": x1, "y1": y1, "x2": x2, "y2": y2, "score": scores, "embedding": embedding_array(embeddings),
        "embedder": [info.name] * n, "embedder_sha256": [info.weights_sha256] * n,
        "detector": [detector.name if detector else None] * n,
        "detector_sha256": [detector.weights_sha256 if detector else None] * n,
        "person_id": [source.person_id_of(m) for m in members],
        "frame_index": frame_indices if frame_indices is not None else [None] * n,
        "track_id": track_ids if track_ids is not None else [None] * n,
    }
    return pa.table(columns, schema=shard_schema(info.dim))
