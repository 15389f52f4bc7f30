"""``reidx detect``'s outputs: the detections table, and crops and drawn frames for people to look at.

Detections table (``reidx detect``, :func:`detections_table`), schema version 1, one row per person:

============  =======  ==========================================================
column        type     meaning
============  =======  ==========================================================
path          string   absolute path of the frame
detection     int32    index of the box within its frame, best score first
frame_width   int32    decoded (EXIF-upright) frame width
frame_height  int32    decoded frame height
x1 y1 x2 y2   float32  box in frame pixels, clipped to the frame
score         float32  objectness × person probability
============  =======  ==========================================================

Parquet metadata: ``reidx.schema=detections``, ``reidx.schema_version``, ``reidx.detector``,
``reidx.weights_sha256``, ``reidx.backend``, ``reidx.input_size``, ``reidx.precision``,
``reidx.antialias``, ``reidx.tiles`` (``2x1`` or ``off``), ``reidx.postprocess`` (JSON options),
``reidx.num_frames`` and ``reidx.failed`` (JSON: path →
why the frame could not be decoded; such frames have no rows).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw, ImageFont

from reidx.pipeline.atomic import write_parquet_atomic
from reidx.pipeline.boxes import crop_boxes
from reidx.pipeline.detect import Detector, DetectorInfo, FrameDetections, PostProcess, iter_detections
from reidx.pipeline.imaging import DEFAULT_MAX_PIXELS

DETECTIONS_SCHEMA_VERSION = "1"


def detections_table(frames: Sequence[FrameDetections], info: DetectorInfo, options: PostProcess) -> pa.Table:
    """One row per detected person (schema in docs: ``path``, ``detection``, ``frame_width``,
    ``frame_height``, ``x1 y1 x2 y2``, ``score``); frames that failed are named in the metadata."""
    rows = [(f, k, box) for f in frames if f.error is None for k, box in enumerate(f.boxes)]
    boxes = np.array([box for _, _, box in rows], np.float32).reshape(-1, 5)
    columns = {
        "path": pa.array([str(f.path) for f, _, _ in rows], pa.string()),
        "detection": pa.array([k for _, k, _ in rows], pa.int32()),
        "frame_width": pa.array([f.width for f, _, _ in rows], pa.int32()),
        "frame_height": pa.array([f.height for f, _, _ in rows], pa.int32()),
    }
    columns.update({name: pa.array(boxes[:, i]) for i, name in enumerate(("x1", "y1", "x2", "y2", "score"))})
    metadata = {
        "reidx.schema": "detections", "reidx.schema_version": DETECTIONS_SCHEMA_VERSION,
        "reidx.detector": info.name, "reidx.weights_sha256": info.weights_sha256, "reidx.backend": info.backend,
        "reidx.input_size": str(info.input_size), "reidx.precision": info.precision,
        "reidx.antialias": str(info.antialias).lower(), "reidx.tiles": "x".join(map(str, info.tiles or ())) or "off",
        "reidx.postprocess": json.dumps(asdict(options)), "reidx.num_frames": str(len(frames)),
        "reidx.failed": json.dumps({str(f.path): f.error for f in frames if f.error is not None}),
    }
    return pa.table(columns).replace_schema_metadata(metadata)


def output_stems(paths: Sequence) -> list[str]:
    """File stems for crops and drawings, made unique when two inputs share a name."""
    stems = [Path(p).stem for p in paths]
    repeated = {s for s in stems if stems.count(s) > 1}
    return [f"{s}_{i}" if s in repeated else s for i, s in enumerate(stems)]


def draw_boxes(image: np.ndarray, boxes: np.ndarray) -> Image.Image:
    """The frame with each box and its score drawn, for a person to check."""
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    line = max(2, round(max(image.shape[:2]) / 600))
    font = ImageFont.load_default(size=max(12, 8 * line))
    for k, (x1, y1, x2, y2, score) in enumerate(boxes):
        draw.rectangle([x1, y1, x2, y2], outline=(0, 255, 0), width=line)
        draw.text((x1 + line + 1, y1 + line), f"{k}: {score:.2f}", fill=(255, 255, 0), font=font,
                  stroke_width=1, stroke_fill=(0, 0, 0))
    return canvas


def detect_to_parquet(detector: Detector, paths: Sequence, out: str | os.PathLike, crops_dir=None, draw_dir=None,
                      batch_size: int = 8, progress: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """What ``reidx detect`` does: detect, write the table atomically, optionally save crops and
    drawn frames (``<stem>_<k>.jpg`` and ``<stem>.jpg``); returns the report it prints."""
    from tqdm import tqdm

    keep = crops_dir is not None or draw_dir is not None
    for folder in (crops_dir, draw_dir):
        if folder is not None:
            Path(folder).mkdir(parents=True, exist_ok=True)
    frames = []
    stems = output_stems(paths)
    for stem, frame in zip(stems, tqdm(iter_detections(detector, paths, batch_size, keep_images=keep, max_pixels=max_pixels),
                                       total=len(paths), unit="frame", desc="detect", disable=not progress)):
        if frame.image is not None:
            if crops_dir is not None:
                for k, crop in enumerate(crop_boxes(frame.image, frame.boxes)):
                    Image.fromarray(crop).save(Path(crops_dir) / f"{stem}_{k:03d}.jpg", quality=95)
            if draw_dir is not None:
                draw_boxes(frame.image, frame.boxes).save(Path(draw_dir) / f"{stem}.jpg", quality=90)
            frame.image = None
        frames.append(frame)
    write_parquet_atomic(detections_table(frames, detector.info, detector.options), out)
    failures = [{"path": str(f.path), "reason": f.error} for f in frames if f.error is not None]
    return {"out": str(out), "images": len(frames), "images_failed": len(failures), "failures": failures,
            "persons": int(sum(len(f.boxes) for f in frames)), "detector": detector.info.id,
            "backend": detector.info.backend, "input_size": detector.info.input_size,
            "tiles": "x".join(map(str, detector.info.tiles or ())) or "off"}
