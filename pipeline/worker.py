"""What each Dask worker process does with a batch of images: read, decode, detect, crop, embed,
write one shard. Models are loaded once per process and cached here — never pickled into the
task graph — so a task carries only names and paths.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image

from reidx.pipeline.embed import BATCH_SIZE, build_embedder, resize_crop
from reidx.pipeline.embedding_table import embedding_array
from reidx.pipeline.imaging import ImageDecodeError, decode_image
from reidx.pipeline.manifest import Source
from reidx.pipeline.shards import detection_id, image_key, shard_schema, write_shard

_MODELS: dict = {}  # per worker process: ModelSpec -> loaded embedder
DEFAULT_DETECTOR = "yolox_nano.onnx"


@dataclass(frozen=True)
class ModelSpec:
    """Picklable description of the models a worker needs (the models themselves stay put)."""

    weights: str
    backend: str = "auto"
    device: str = "auto"
    threads: int | None = None
    max_pixels: int = 50_000_000
    detector: str = DEFAULT_DETECTOR
    detector_input_size: int | None = None


def embedder_for(spec: ModelSpec):
    if ("embedder", spec) not in _MODELS:
        _MODELS[("embedder", spec)] = build_embedder(spec.weights, backend=spec.backend, device=spec.device,
                                                     threads=spec.threads)
    return _MODELS[("embedder", spec)]


def detector_for(spec: ModelSpec):
    """The YOLOX person detector, loaded on first use (crop-only nights never load it)."""
    if ("detector", spec) not in _MODELS:
        from reidx.pipeline.detect import Detector

        _MODELS[("detector", spec)] = Detector(spec.detector, device=spec.device, input_size=spec.detector_input_size)
    return _MODELS[("detector", spec)]


def _person_boxes(source: Source, image: Image.Image, spec: ModelSpec) -> list[tuple[float, float, float, float, float]]:
    """(x1, y1, x2, y2, score) of each person: the whole image for crops, the detector's boxes for frames."""
    if source.kind == "crops":
        return [(0.0, 0.0, float(image.width), float(image.height), 1.0)]
    (boxes,) = detector_for(spec).detect([np.asarray(image)])
    return [tuple(float(v) for v in box) for box in boxes]


def process_batch(gallery: str, source: Source, members: list[str], spec: ModelSpec) -> dict:
    """Process images of one source (shard written durably first).

    Returns ``{"records": one ledger record per image, "seconds": time per stage}``.
    """
    persons = persons_of_members(source, members, spec)
    if persons.table is not None:
        clock = time.perf_counter()
        shard = write_shard(persons.table, gallery)
        persons.seconds["write"] += time.perf_counter() - clock
        for record in persons.records:
            if record.get("num_persons"):
                record["shard"] = shard
    return {"records": persons.records, "seconds": persons.seconds}


@dataclass
class Persons:
    """The persons found in a batch of images: one record per image, one shard-schema row per person."""

    records: list[dict]  # image_key, source, member, status ok|failed, reason, num_persons
    table: pa.Table | None  # gallery-shard schema (pipeline/shards.py); None when no person was found
    seconds: dict  # time per stage


def persons_of_members(source: Source, members: list[str], spec: ModelSpec) -> Persons:
    """Read, decode, detect (frames) or take whole (crops), crop and embed the members of one source.

    Shared by the nightly job (which writes the table as a shard) and ``reidx query`` (which searches it).
    """
    from reidx.pipeline.sources import read_members

    embedder = embedder_for(spec)
    records, crops, rows = [], [], []
    seconds = {"read": 0.0, "decode": 0.0, "detect": 0.0, "embed": 0.0, "write": 0.0}
    clock = time.perf_counter()
    for member, data, error in read_members(source, members):
        now = time.perf_counter()
        seconds["read"] += now - clock
        clock = now
        key = image_key(source.name, member)
        record = {"image_key": key, "source": source.name, "member": member}
        records.append(record)
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
        boxes = _person_boxes(source, image, spec)
        clock = time.perf_counter()
        seconds["detect"] += clock - now
        record.update(status="ok", num_persons=len(boxes))
        for index, (x1, y1, x2, y2, score) in enumerate(boxes):
            crops.append(resize_crop(image.crop((int(x1), int(y1), int(x2), int(y2)))))
            rows.append((detection_id(key, index), key, member, image.width, image.height, x1, y1, x2, y2, score))
        now = time.perf_counter()
        seconds["decode"] += now - clock  # cropping and resizing count as decode
        clock = now
    table = None
    if rows:
        embeddings = np.concatenate([embedder.embed(np.stack(crops[i:i + BATCH_SIZE]))
                                     for i in range(0, len(crops), BATCH_SIZE)])
        seconds["embed"] += time.perf_counter() - clock
        detector = detector_for(spec).info if source.kind == "frames" else None
        table = shard_table(source, rows, embeddings, embedder.info, detector)
    return Persons(records, table, seconds)


def shard_table(source: Source, rows: list[tuple], embeddings: np.ndarray, info, detector=None) -> pa.Table:
    n = len(rows)
    ids, keys, members, widths, heights, x1, y1, x2, y2, scores = (list(c) for c in zip(*rows))
    columns = {
        "detection_id": ids, "image_key": keys, "source": [source.name] * n, "source_uri": [source.uri] * n,
        "member": members, "camera": [source.camera_of(m) for m in members],
        "timestamp": [source.timestamp_of(m) for m in members], "frame_width": widths, "frame_height": heights,
        "x1": x1, "y1": y1, "x2": x2, "y2": y2, "score": scores, "embedding": embedding_array(embeddings),
        "embedder": [info.name] * n, "embedder_sha256": [info.weights_sha256] * n,
        "detector": [detector.name if detector else None] * n,
        "detector_sha256": [detector.weights_sha256 if detector else None] * n,
        "person_id": [source.person_id_of(m) for m in members],
    }
    return pa.table(columns, schema=shard_schema(info.dim))
