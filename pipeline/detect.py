"""Full frames → person boxes with YOLOX: official letterbox and decoding, plus what measured better.

Preprocessing: BGR channel order; the frame is resized keeping its aspect ratio into the
top-left corner of a square canvas filled with 114; pixel values 0–255, no mean/std; rounded to
8 bits. Unlike the official demo (``cv2.resize(INTER_LINEAR)``, no antialiasing) the resize is
antialiased by default: at 416 it separates a man and a woman the plain resize merges into one
box (c1s1_009451) and drops a box on her upper half (c1s1_009526); AP50 on the 16 hand-labelled
frames (``docs/detection.md``): 95.8 → 96.9 at the default, 91.8 → 94.5 at 832, but 69.9 → 68.8
at 416 (one person of 75). Frames of any size share a batch: each gets its own scale.

Tiles (default ``(2, 1)``, for frames at least twice the canvas): the frame is also cut into
overlapping windows, each letterboxed like a frame, so people 50–110 px tall in full HD are seen
1.8× larger; boxes touching a window's inner edge are dropped (a person cut there is whole in the
frame pass or the other window) and all boxes of a frame go through one NMS. AP50 at 576: 85.9
without tiles → 96.9 with (recall 86.7 → 97.3 %), for 3 network passes instead of 1.

Decoding: grids and strides 8/16/32 (:func:`pipeline.models.yolox.decode_boxes`), score =
objectness × person probability (COCO class 0), boxes scaled back to frame pixels and clipped,
boxes shorter than ``min_height`` frame pixels dropped, greedy NMS (ours) at IoU ``nms_iou``, then
containment suppression (:func:`pipeline.boxes.suppress_contained`: a box mostly inside a better
one of similar width is a part of the same person), at most ``max_detections`` per frame.

Backends share that code and the ``Detector`` interface: ``torch`` (our YOLOX, from an official
``.pth`` checkpoint or the weights of an ONNX export; CUDA when present), ``onnx``
(onnxruntime running an ONNX export with batch and size made symbolic) and ``auto``, the default
as for the embedder (onnxruntime for ONNX weights on CPU, else torch). Both give the same boxes
(tested on the 16 scene frames); speeds and AP are in ``benchmarks/detect.py``.

Output of :meth:`Detector.detect`: per frame a float32 array (K, 5) of x1, y1, x2, y2, score.

The detections table of ``reidx detect`` is written by :mod:`reidx.pipeline.detect_output`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from reidx.pipeline.batching import prefetch_batches
from reidx.pipeline.boxes import nms, suppress_contained
from reidx.pipeline.imaging import DEFAULT_MAX_PIXELS, load_image_or_reason
from reidx.pipeline.models.registry import load_model
from reidx.pipeline.models.weights import resolve_weights
from reidx.pipeline.models.yolox import STRIDES, decode_boxes, fuse_conv_silu
from reidx.pipeline.runtime import onnxruntime_available, resolve_device

DEFAULT_WEIGHTS = "yolox_nano.onnx"
PAD_VALUE = 114
PERSON = 0
PRE_NMS_TOP_K = 3000  # bounds the IoU matrix when a very low threshold is asked for
# Canvas sides. Official test sizes are 416 for Nano and Tiny, 640 for the others; Nano on full-HD
# frames measured best at 576 with tiles (docs/detection.md). Tiny is not measured: official.
DEFAULT_INPUT_SIZE = {"yolox_nano": 576, "yolox_tiny": 416}
DEFAULT_TILES = (2, 1)  # columns, rows of a landscape frame (swapped for portrait ones)
TILE_OVERLAP = 0.2  # of a tile's side
TILE_MIN_SCALE = 2.0  # tile only frames whose long side is at least this many canvas sides
EDGE_MARGIN = 2.0  # canvas pixels: a tile box this close to a cut edge is a cut person


def letterbox(frames: Sequence[np.ndarray], size: int, device: torch.device | str = "cpu",
              antialias: bool = True) -> tuple[torch.Tensor, list[float]]:
    """RGB uint8 frames (H, W, 3) → BGR float32 batch (N, 3, size, size) and each frame's scale.

    ``antialias``: downscale with a bilinear filter widened to the scale (PIL's ``BILINEAR``),
    so every source pixel counts; off, 2 of every ~4.6 columns of a full-HD frame are all that
    reach a 416 canvas (cv2 ``INTER_LINEAR``, the official demo). Measured on the shared frames:
    see ``docs/detection.md``."""
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
            x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False,
                              antialias=antialias).round_().clamp_(0, 255)
        batch[i, :, :new_h, :new_w] = x[0].flip(0)  # RGB → BGR
        ratios.append(ratio)
    return batch, ratios


@dataclass(frozen=True)
class PostProcess:
    """Decoding options; the defaults suit people in surveillance frames with YOLOX-Nano.

    ``containment``: after NMS, a box with more than this share of its area inside a better kept
    box at most twice as wide is dropped (a part of the same person, which IoU misses); 1 turns it
    off. Measured AP50: ±0 at the default, +3.5 with 3×2 tiles (they cut people into parts), −1.3
    at 416 (a person inside a box over two people)."""

    score_threshold: float = 0.3  # best AP with precision ≥ 85 % on the 11 frames that chose it
    nms_iou: float = 0.45
    min_height: float = 0.0  # in frame pixels
    max_detections: int = 100
    containment: float = 0.8


def decode_candidates(raw: torch.Tensor, input_hw: tuple[int, int], ratios: Sequence[float],
                      score_threshold: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """Raw head output (N, A, 5 + C) → per image the boxes (K, 4) x1 y1 x2 y2 in that image's
    pixels (not clipped) and scores (K,) of at least ``score_threshold``, float32, at most
    ``PRE_NMS_TOP_K``. Score = objectness × person probability."""
    raw = raw.float()
    cxcywh = decode_boxes(raw, input_hw, STRIDES)
    scores_all = raw[..., 4] * raw[..., 5 + PERSON]
    out = []
    for i, ratio in enumerate(ratios):
        scores = scores_all[i]
        candidates = torch.nonzero(scores >= score_threshold).flatten()
        if len(candidates) > PRE_NMS_TOP_K:
            candidates = candidates[scores[candidates].topk(PRE_NMS_TOP_K).indices]
        c = cxcywh[i, candidates]
        boxes = torch.cat([c[:, :2] - c[:, 2:] / 2, c[:, :2] + c[:, 2:] / 2], dim=1) / ratio
        out.append((boxes.cpu().numpy().astype(np.float32), scores[candidates].cpu().numpy().astype(np.float32)))
    return out


def select_boxes(boxes: np.ndarray, scores: np.ndarray, frame_hw: tuple[int, int],
                 options: PostProcess = PostProcess()) -> np.ndarray:
    """One frame's candidates (unclipped, frame pixels) → (K, 5) float32 x1 y1 x2 y2 score, best
    first: clipped to the frame, ``min_height``, NMS (on unclipped boxes, as official), then
    containment suppression (on clipped boxes: what is visible) and ``max_detections``."""
    height, width = frame_hw
    boxes, scores = np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(scores, np.float32).reshape(-1)
    clipped = np.minimum(np.maximum(boxes, 0), np.array([width, height, width, height], np.float32))
    tall = (clipped[:, 3] - clipped[:, 1]) >= options.min_height
    boxes, clipped, scores = boxes[tall], clipped[tall], scores[tall]
    limit = options.max_detections if options.containment >= 1 else None
    keep = nms(boxes, scores, options.nms_iou, limit)
    if options.containment < 1:
        keep = keep[suppress_contained(clipped[keep], scores[keep], options.containment)][:options.max_detections]
    return np.concatenate([clipped[keep], scores[keep, None]], axis=1).astype(np.float32)


def postprocess(raw: torch.Tensor, input_hw: tuple[int, int], ratios: Sequence[float],
                frame_sizes: Sequence[tuple[int, int]], options: PostProcess = PostProcess()) -> list[np.ndarray]:
    """Raw head output (N, A, 5 + C) → per frame (K, 5) float32 x1, y1, x2, y2, score in frame pixels."""
    return [select_boxes(boxes, scores, size, options) for (boxes, scores), size
            in zip(decode_candidates(raw, input_hw, ratios, options.score_threshold), frame_sizes)]


def tile_windows(height: int, width: int, tiles: tuple[int, int], overlap: float = TILE_OVERLAP
                 ) -> list[tuple[int, int, int, int]]:
    """``(columns, rows)`` overlapping windows (x0, y0, x1, y1) covering a frame; neighbours share
    ``overlap`` of a window's side, so a person cut by one window's edge is whole in another."""
    def spans(length: int, count: int) -> list[tuple[int, int]]:
        if count <= 1:
            return [(0, length)]
        side = math.ceil(length / (count - (count - 1) * overlap))
        starts = np.linspace(0, length - side, count).round().astype(int)
        return [(int(s), int(s) + side) for s in starts]
    return [(x0, y0, x1, y1) for y0, y1 in spans(height, tiles[1]) for x0, x1 in spans(width, tiles[0])]


@dataclass(frozen=True)
class DetectorInfo:
    """What produced a detection; stored in every detections table."""

    name: str  # e.g. "yolox_nano"
    weights_sha256: str
    backend: str  # "torch" or "onnx"
    input_size: int
    precision: str
    antialias: bool = True
    tiles: tuple[int, int] | None = None  # (columns, rows) of extra windows, or None

    @property
    def id(self) -> str:
        return f"{self.name}@{self.weights_sha256[:12]}"


class Detector:
    """YOLOX person detector: ``detect(frames)`` with RGB uint8 frames of any sizes.

    ``weights``: a known name (``yolox_nano.onnx`` default, ``yolox_nano`` … ``yolox_x`` for the
    official checkpoints) or a path. ``input_size``: canvas side, a multiple of 32 (default 576
    for Nano, measured; the official test size for the others, 416 Tiny, 640 larger; else the size
    an ONNX export was traced at); larger finds smaller people at a higher cost. ``antialias``:
    antialiased resize (default; off = the official demo's). ``tiles``: (columns, rows) of extra
    windows for large frames, ``None`` for the frame pass alone (module docstring). CPU fast
    path (torch): BatchNorm folded, channels-last, convolution + SiLU fused where checked equal;
    bf16 autocast (``precision="bf16"``, torch only) is opt-in: it changed boxes, see
    ``benchmarks/detect.py``. CUDA when present (``device="auto"``).
    """

    def __init__(self, weights: str = DEFAULT_WEIGHTS, backend: str = "auto", device: str = "auto",
                 input_size: int | None = None, options: PostProcess = PostProcess(), precision: str = "fp32",
                 channels_last: bool | None = None, fuse: bool = True, antialias: bool = True,
                 tiles: tuple[int, int] | None = DEFAULT_TILES):
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
        size = input_size or DEFAULT_INPUT_SIZE.get(size_name) or traced_size or 640
        if tiles is not None and (len(tiles) != 2 or min(tiles) < 1 or tuple(tiles) == (1, 1)):
            raise ValueError(f"tiles are (columns, rows), at least one of them above 1, not {tiles!r}")
        self.tiles = None if tiles is None else (int(tiles[0]), int(tiles[1]))
        self.backend, self.precision, self.input_size, self.options = backend, precision, size, options
        self.antialias = antialias
        self.info = DetectorInfo(size_name, resolved.sha256, backend, size, precision, antialias, self.tiles)

    @torch.inference_mode()
    def raw(self, batch: torch.Tensor) -> torch.Tensor:
        """Letterboxed BGR batch → raw head output (N, A, 85), float32."""
        if self.backend == "onnx":
            return torch.from_numpy(self.model(batch))
        batch = batch.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            return self.model(batch).float()

    def windows(self, frame: np.ndarray) -> list[tuple[int, int, int, int]]:
        """The frame itself, then its tiles when tiling is on and the frame is large enough:
        (x0, y0, x1, y1) each. Tiles are (columns, rows) for a landscape frame, (rows, columns)
        for a portrait one."""
        height, width = frame.shape[:2]
        if not self.tiles or max(height, width) < TILE_MIN_SCALE * self.input_size:
            return [(0, 0, width, height)]
        tiles = self.tiles if width >= height else self.tiles[::-1]
        return [(0, 0, width, height)] + tile_windows(height, width, tiles)

    @torch.inference_mode()
    def detect(self, frames: Sequence[np.ndarray]) -> list[np.ndarray]:
        if len(frames) == 0:
            return []
        windows = [self.windows(frame) for frame in frames]
        views = [frame[y0:y1, x0:x1] for frame, ws in zip(frames, windows) for x0, y0, x1, y1 in ws]
        batch, ratios = letterbox(views, self.input_size, self.device, self.antialias)
        candidates = iter(zip(ratios, decode_candidates(self.raw(batch), (self.input_size, self.input_size), ratios,
                                                        self.options.score_threshold)))
        results = []
        for frame, ws in zip(frames, windows):
            height, width = frame.shape[:2]
            boxes, scores = [], []
            for (x0, y0, x1, y1), (ratio, (b, s)) in zip(ws, candidates):  # ws first: zip stops before taking more
                if (x0, y0, x1, y1) != (0, 0, width, height):
                    # a box touching a window edge that is not the frame's is a person cut by the window
                    margin = EDGE_MARGIN / ratio
                    cut = (((b[:, 0] < margin) & (x0 > 0)) | ((b[:, 1] < margin) & (y0 > 0))
                           | ((b[:, 2] > x1 - x0 - margin) & (x1 < width)) | ((b[:, 3] > y1 - y0 - margin) & (y1 < height)))
                    b, s = b[~cut] + np.array([x0, y0, x0, y0], np.float32), s[~cut]
                boxes.append(b)
                scores.append(s)
            results.append(select_boxes(np.concatenate(boxes), np.concatenate(scores), (height, width), self.options))
        return results


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


def parse_tiles(text: str | None) -> tuple[int, int] | None:
    """``"2x1"`` → (2, 1); ``"off"`` (or None) → None: the CLI's ``--tiles``."""
    if text is None or text.strip().lower() in ("off", "none", "0"):
        return None
    try:
        columns, rows = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--tiles {text!r}: give COLUMNSxROWS, e.g. 2x1, or off") from None
    if columns < 1 or rows < 1 or columns * rows < 2:
        raise ValueError(f"--tiles {text!r}: at least two tiles, e.g. 2x1, or off")
    return columns, rows


def build_detector(detector: str = DEFAULT_WEIGHTS, backend: str = "auto", input_size: int | None = None,
                   tiles: str | None = "2x1", antialias: bool = True, score_threshold: float = 0.3,
                   nms_iou: float = 0.45, containment: float = 0.8, min_height: float = 0.0,
                   max_detections: int = 100, device: str = "auto", precision: str = "fp32") -> Detector:
    """A :class:`Detector` from the CLI's detector options (``reidx detect``, ``reidx evaluate-detections``)."""
    options = PostProcess(score_threshold, nms_iou, min_height, max_detections, containment)
    return Detector(detector, backend=backend, device=device, input_size=input_size, options=options,
                    precision=precision, antialias=antialias, tiles=parse_tiles(tiles))
