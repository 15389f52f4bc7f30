"""Full frames → person boxes with YOLOX, pre- and post-processing as the official demo does.

Preprocessing (official, non-legacy): BGR channel order; the frame is resized keeping its aspect
ratio with bilinear interpolation without antialiasing (what ``cv2.resize(INTER_LINEAR)`` does;
rounded to 8 bits like cv2's uint8 output) into the top-left corner of a square canvas filled
with 114; pixel values 0–255, no mean/std. Frames of any size share a batch: each gets its own
scale on the same canvas.

Decoding: grids and strides 8/16/32 (:func:`pipeline.models.yolox.decode_boxes`), score =
objectness × person probability (COCO class 0), boxes scaled back to frame pixels and clipped,
boxes shorter than ``min_height`` frame pixels dropped, greedy NMS (ours, in torch: torchvision
does not work here) at IoU ``nms_iou``, at most ``max_detections`` per frame, best first.

Backends share that code and the ``Detector`` interface: ``torch`` (our YOLOX, from an official
``.pth`` checkpoint or the weights of an ONNX export; CUDA when present; the default), ``onnx``
(onnxruntime running an ONNX export with batch and size made symbolic) and ``auto`` (onnxruntime
for ONNX weights on CPU, else torch). Both give the same boxes (tested on the 16 scene frames);
speeds are in ``benchmarks/detect.py``: at two threads torch matches onnxruntime at 416, at one
thread (one Dask worker per core) onnxruntime is ~1.2× faster.

Output of :meth:`Detector.detect`: per frame a float32 array (K, 5) of x1, y1, x2, y2, score.

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
``reidx.postprocess`` (JSON options), ``reidx.num_frames`` and ``reidx.failed`` (JSON: path →
why the frame could not be decoded; such frames have no rows).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from reidx.pipeline.embed import resolve_device
from reidx.pipeline.imaging import DEFAULT_MAX_PIXELS, load_image_or_reason
from reidx.pipeline.models.weights import load_state_dict, resolve_weights
from reidx.pipeline.models.yolox import (STRIDES, build_yolox, decode_boxes, fold_batchnorm, fuse_conv_silu, infer_yolox_size,
                                   load_yolox_state)

DEFAULT_WEIGHTS = "yolox_nano.onnx"
PAD_VALUE = 114
PERSON = 0
PRE_NMS_TOP_K = 3000  # bounds the IoU matrix when a very low threshold is asked for
# Official test sizes: Nano and Tiny were trained and evaluated at 416, the others at 640.
DEFAULT_INPUT_SIZE = {"yolox_nano": 416, "yolox_tiny": 416}


def letterbox(frames: Sequence[np.ndarray], size: int,
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, list[float]]:
    """RGB uint8 frames (H, W, 3) → BGR float32 batch (N, 3, size, size) and each frame's scale."""
    # channels-last storage (N, H, W, C) seen as (N, C, H, W): what the CPU convolutions want
    batch = torch.full((len(frames), size, size, 3), float(PAD_VALUE), device=device).permute(0, 3, 1, 2)
    ratios = []
    for i, frame in enumerate(frames):
        height, width = frame.shape[:2]
        ratio = min(size / height, size / width)
        # at least 1 pixel each side: a 1×5000 strip would otherwise resize to height 0 and kill the job
        new_h, new_w = max(1, int(height * ratio)), max(1, int(width * ratio))
        # (1, 3, H, W) view of the HWC array: channels-last strides, which interpolate runs fastest
        x = torch.from_numpy(np.require(frame, np.uint8, ["C", "W"])).to(device).permute(2, 0, 1)[None].float()
        if (new_h, new_w) != (height, width):
            x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False).round_().clamp_(0, 255)
        batch[i, :, :new_h, :new_w] = x[0].flip(0)  # RGB → BGR
        ratios.append(ratio)
    return batch, ratios


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of (N, 4) and (M, 4) x1y1x2y2 boxes → (N, M)."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    top_left = torch.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-9)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, max_keep: int | None = None) -> torch.Tensor:
    """Greedy NMS: indices of kept boxes, best score first; a box is dropped when its IoU with a
    better kept box exceeds ``iou_threshold``. Ties keep input order (stable sort)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    over = (box_iou(boxes[order], boxes[order]) > iou_threshold).cpu().numpy()
    suppressed = np.zeros(len(order), dtype=bool)
    keep: list[int] = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        if max_keep is not None and len(keep) >= max_keep:
            break
        suppressed |= over[i]
    return order[torch.as_tensor(keep, dtype=torch.long, device=order.device)]


@dataclass(frozen=True)
class PostProcess:
    """Decoding options; the defaults suit people in surveillance frames with YOLOX-Nano."""

    score_threshold: float = 0.3
    nms_iou: float = 0.45
    min_height: float = 0.0  # in frame pixels
    max_detections: int = 100


def postprocess(raw: torch.Tensor, input_hw: tuple[int, int], ratios: Sequence[float],
                frame_sizes: Sequence[tuple[int, int]], options: PostProcess = PostProcess()) -> list[np.ndarray]:
    """Raw head output (N, A, 5 + C) → per frame (K, 5) float32 x1, y1, x2, y2, score in frame pixels."""
    raw = raw.float()
    cxcywh = decode_boxes(raw, input_hw, STRIDES)
    scores_all = raw[..., 4] * raw[..., 5 + PERSON]
    results = []
    for i, (ratio, (height, width)) in enumerate(zip(ratios, frame_sizes)):
        scores = scores_all[i]
        candidates = torch.nonzero(scores >= options.score_threshold).flatten()
        if len(candidates) > PRE_NMS_TOP_K:
            candidates = candidates[scores[candidates].topk(PRE_NMS_TOP_K).indices]
        c = cxcywh[i, candidates]
        boxes = torch.cat([c[:, :2] - c[:, 2:] / 2, c[:, :2] + c[:, 2:] / 2], dim=1) / ratio
        limit = torch.tensor([width, height, width, height], dtype=boxes.dtype, device=boxes.device)
        clipped = torch.minimum(boxes.clamp(min=0), limit)
        tall = (clipped[:, 3] - clipped[:, 1]) >= options.min_height
        boxes, clipped, scores = boxes[tall], clipped[tall], scores[candidates][tall]
        keep = nms(boxes, scores, options.nms_iou, options.max_detections)  # on unclipped boxes, as official
        out = torch.cat([clipped[keep], scores[keep, None]], dim=1)
        results.append(out.cpu().numpy().astype(np.float32))
    return results


@dataclass(frozen=True)
class DetectorInfo:
    """What produced a detection; stored in every detections table."""

    name: str  # e.g. "yolox_nano"
    weights_sha256: str
    backend: str  # "torch" or "onnx"
    input_size: int
    precision: str

    @property
    def id(self) -> str:
        return f"{self.name}@{self.weights_sha256[:12]}"


class Detector:
    """YOLOX person detector: ``detect(frames)`` with RGB uint8 frames of any sizes.

    ``weights``: a known name (``yolox_nano.onnx`` default, ``yolox_nano`` … ``yolox_x`` for the
    official checkpoints) or a path. ``input_size``: canvas side, a multiple of 32 (default: the
    size an ONNX export was traced at, 416 for ``yolox_nano.onnx``; for checkpoints the official
    test size, 416 Nano/Tiny, 640 others); larger finds smaller people at a higher cost. CPU fast
    path (torch): BatchNorm folded, channels-last, convolution + SiLU fused where checked equal;
    bf16 autocast (``precision="bf16"``, torch only) is opt-in: it changed boxes, see
    ``benchmarks/detect.py``. CUDA when present (``device="auto"``).
    """

    def __init__(self, weights: str = DEFAULT_WEIGHTS, backend: str = "torch", device: str = "auto",
                 input_size: int | None = None, options: PostProcess = PostProcess(), precision: str = "fp32",
                 channels_last: bool | None = None, fuse: bool = True):
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, not {precision!r}")
        if input_size is not None and (input_size <= 0 or input_size % 32):
            raise ValueError(f"input size must be a positive multiple of 32, not {input_size}")
        resolved = resolve_weights(weights, ".pth")
        is_onnx = resolved.path.suffix == ".onnx"
        self.device = resolve_device(device)
        self.channels_last = self.fused = False
        traced_size = None
        if is_onnx:
            from reidx.pipeline.models.yolox_onnx import OnnxYOLOX, graph_input_size, infer_onnx_size, load_yolox_onnx

            size_name, traced_size = infer_onnx_size(resolved.path), (graph_input_size(resolved.path) or (None,))[0]
        if backend == "auto":  # onnxruntime where it can run the weights on CPU (faster at one thread), else torch
            from reidx.pipeline.embed import onnxruntime_available

            cpu_onnx = is_onnx and self.device.type == "cpu" and precision == "fp32"
            backend = "onnx" if cpu_onnx and onnxruntime_available() else "torch"
        if backend == "onnx":
            if not is_onnx:
                raise ValueError("the onnx backend runs ONNX exports; give a .onnx file or name")
            if precision != "fp32":
                raise ValueError("bf16 runs on the torch backend only")
            self.model = OnnxYOLOX(resolved.path, device=self.device.type)
            self.device = torch.device("cpu")  # inputs go in as NumPy arrays
        elif backend == "torch":
            if is_onnx:
                model = load_yolox_onnx(resolved.path, size_name)
            else:
                state = load_state_dict(resolved.path)
                size_name = resolved.known.arch if resolved.known else infer_yolox_size(state)
                model = build_yolox(size_name, state["head.cls_preds.0.weight"].shape[0])
                load_yolox_state(model, state)
                model = fold_batchnorm(model.eval())
            self.channels_last = True if channels_last is None else channels_last
            memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
            self.model = model.eval().to(self.device, memory_format=memory_format)
            if fuse and self.device.type == "cpu" and self.channels_last and precision == "fp32":
                example = (torch.rand(1, 3, 256, 256) * 255).contiguous(memory_format=memory_format)
                self.fused = fuse_conv_silu(self.model, example)
        else:
            raise ValueError(f"unknown backend {backend!r}; use torch, onnx or auto")
        size = input_size or traced_size or DEFAULT_INPUT_SIZE.get(size_name, 640)
        self.backend, self.precision, self.input_size, self.options = backend, precision, size, options
        self.info = DetectorInfo(size_name, resolved.sha256, backend, size, precision)

    @torch.inference_mode()
    def raw(self, batch: torch.Tensor) -> torch.Tensor:
        """Letterboxed BGR batch → raw head output (N, A, 85), float32."""
        if self.backend == "onnx":
            return torch.from_numpy(self.model(batch))
        batch = batch.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            return self.model(batch).float()

    @torch.inference_mode()
    def detect(self, frames: Sequence[np.ndarray]) -> list[np.ndarray]:
        if len(frames) == 0:
            return []
        batch, ratios = letterbox(frames, self.input_size, self.device)
        raw = self.raw(batch)
        sizes = [frame.shape[:2] for frame in frames]
        return postprocess(raw, (self.input_size, self.input_size), ratios, sizes, self.options)


@dataclass
class FrameDetections:
    """One input frame: its boxes (K, 5) or why it could not be read; ``image`` when kept."""

    path: Path
    width: int
    height: int
    boxes: np.ndarray
    error: str | None = None
    image: np.ndarray | None = None


def _decode(path) -> tuple[np.ndarray | None, str | None]:
    image, reason = load_image_or_reason(path, DEFAULT_MAX_PIXELS)
    return (None, reason) if image is None else (np.asarray(image), None)


def iter_detections(detector: Detector, paths: Sequence, batch_size: int = 8, keep_images: bool = False,
                    decode_workers: int = 2) -> Iterator[FrameDetections]:
    """Detect in image files, in input order; the next batch decodes in threads while one runs.
    A file that cannot be decoded yields its reason and no boxes; it never stops the run."""
    chunks = [list(paths[i:i + batch_size]) for i in range(0, len(paths), batch_size)]
    with ThreadPoolExecutor(max_workers=max(1, decode_workers)) as pool:
        pending = pool.map(_decode, chunks[0]) if chunks else iter(())
        for index, chunk in enumerate(chunks):
            decoded = list(pending)
            if index + 1 < len(chunks):
                pending = pool.map(_decode, chunks[index + 1])
            good = [i for i, (image, _) in enumerate(decoded) if image is not None]
            boxes = dict(zip(good, detector.detect([decoded[i][0] for i in good])))
            for i, (path, (image, error)) in enumerate(zip(chunk, decoded)):
                height, width = image.shape[:2] if image is not None else (0, 0)
                yield FrameDetections(Path(path), width, height, boxes.get(i, np.zeros((0, 5), np.float32)),
                                      error, image if keep_images else None)


# ---- detections table (schema version 1) and files for looking ----------------------------

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
        "reidx.postprocess": json.dumps(asdict(options)), "reidx.num_frames": str(len(frames)),
        "reidx.failed": json.dumps({str(f.path): f.error for f in frames if f.error is not None}),
    }
    return pa.table(columns).replace_schema_metadata(metadata)


def output_stems(paths: Sequence) -> list[str]:
    """File stems for crops and drawings, made unique when two inputs share a name."""
    stems = [Path(p).stem for p in paths]
    repeated = {s for s in stems if stems.count(s) > 1}
    return [f"{s}_{i}" if s in repeated else s for i, s in enumerate(stems)]


def crop_boxes(image: np.ndarray, boxes: np.ndarray) -> list[np.ndarray]:
    """Pixel crops of each box (outward-rounded, inside the frame), for the embedder."""
    height, width = image.shape[:2]
    crops = []
    for x1, y1, x2, y2, _ in boxes:
        left, top = max(int(np.floor(x1)), 0), max(int(np.floor(y1)), 0)
        right, bottom = min(int(np.ceil(x2)), width), min(int(np.ceil(y2)), height)
        crops.append(image[top:max(bottom, top + 1), left:max(right, left + 1)])
    return crops


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
                      batch_size: int = 8, progress: bool = False) -> dict:
    """What ``reidx detect`` does: detect, write the table atomically, optionally save crops and
    drawn frames (``<stem>_<k>.jpg`` and ``<stem>.jpg``); returns the report it prints."""
    from tqdm import tqdm

    from reidx.pipeline.embedding_table import write_parquet_atomic

    keep = crops_dir is not None or draw_dir is not None
    for folder in (crops_dir, draw_dir):
        if folder is not None:
            Path(folder).mkdir(parents=True, exist_ok=True)
    frames = []
    stems = output_stems(paths)
    for stem, frame in zip(stems, tqdm(iter_detections(detector, paths, batch_size, keep_images=keep),
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
    failed = {str(f.path): f.error for f in frames if f.error is not None}
    return {"out": str(out), "num_frames": len(frames), "num_failed": len(failed), "failed": failed,
            "num_detections": int(sum(len(f.boxes) for f in frames)), "detector": detector.info.id,
            "backend": detector.info.backend, "input_size": detector.info.input_size}
