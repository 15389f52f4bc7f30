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
``.pth`` checkpoint or the weights of an ONNX export; CUDA when present), ``onnx``
(onnxruntime running an ONNX export with batch and size made symbolic) and ``auto``, the default
as for the embedder (onnxruntime for ONNX weights on CPU, else torch). Both give the same boxes (tested on the 16 scene frames);
speeds are in ``benchmarks/detect.py``: at two threads torch matches onnxruntime at 416, at one
thread (one Dask worker per core) onnxruntime is ~1.2× faster.

Output of :meth:`Detector.detect`: per frame a float32 array (K, 5) of x1, y1, x2, y2, score.

The detections table of ``reidx detect`` is written by :mod:`reidx.pipeline.detect_output`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from reidx.pipeline.batching import prefetch_batches
from reidx.pipeline.boxes import nms
from reidx.pipeline.imaging import DEFAULT_MAX_PIXELS, load_image_or_reason
from reidx.pipeline.models.registry import load_model
from reidx.pipeline.models.weights import resolve_weights
from reidx.pipeline.models.yolox import STRIDES, decode_boxes, fuse_conv_silu
from reidx.pipeline.runtime import onnxruntime_available, resolve_device

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
        # on unclipped boxes, as official
        keep = torch.from_numpy(nms(boxes.cpu().numpy(), scores.cpu().numpy(), options.nms_iou,
                                    options.max_detections)).to(boxes.device)
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

    def __init__(self, weights: str = DEFAULT_WEIGHTS, backend: str = "auto", device: str = "auto",
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
            from reidx.pipeline.models.yolox_onnx import OnnxYOLOX, graph_input_size, infer_onnx_size

            size_name, traced_size = infer_onnx_size(resolved.path), (graph_input_size(resolved.path) or (None,))[0]
        if backend == "auto":  # onnxruntime where it can run the weights on CPU (faster at one thread), else torch
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
            loaded = load_model(resolved, "yolox", fold=True)
            model, size_name = loaded.module, loaded.arch
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


def iter_detections(detector: Detector, paths: Sequence, batch_size: int = 8, keep_images: bool = False,
                    decode_workers: int = 2, max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[FrameDetections]:
    """Detect in image files, in input order; the next batch decodes in threads while one runs.
    A file that cannot be decoded yields its reason and no boxes; it never stops the run."""
    def load(path):
        image, reason = load_image_or_reason(path, max_pixels)
        return (None, reason) if image is None else (np.asarray(image), None)

    for start, decoded in prefetch_batches(paths, load, batch_size, workers=decode_workers, ahead=1):
        good = [i for i, (image, _) in enumerate(decoded) if image is not None]
        boxes = dict(zip(good, detector.detect([decoded[i][0] for i in good])))
        for i, (image, error) in enumerate(decoded):
            height, width = image.shape[:2] if image is not None else (0, 0)
            yield FrameDetections(Path(paths[start + i]), width, height, boxes.get(i, np.zeros((0, 5), np.float32)),
                                  error, image if keep_images else None)
