"""Person boxes: overlap (IoU), non-maximum suppression and the crop rule — one definition each.

Boxes are ``x1, y1, x2, y2`` in frame pixels (float), optionally followed by a score column.
The detector's NMS, detection metrics, the tracker, the nightly job's crops, query crops and
``reidx detect --crops`` all use these functions, so a saved crop is exactly what was embedded.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from reidx.pipeline.models.registry import OSNET_INPUT_HW

INPUT_HEIGHT, INPUT_WIDTH = OSNET_INPUT_HW  # what the embedder takes (torch-free here: the job's driver imports it)


def _xyxy(boxes) -> np.ndarray:
    """(N, ≥4) boxes (a score column may follow) → (N, 4) float64."""
    boxes = np.asarray(boxes, np.float64)
    return boxes.reshape(-1, 4) if boxes.ndim < 2 else boxes[:, :4]


def box_iou(a, b) -> np.ndarray:
    """Pairwise IoU of (N, ≥4) and (M, ≥4) boxes → (N, M) float64; empty boxes overlap nothing."""
    a, b = _xyxy(a), _xyxy(b)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    wh = np.clip(np.minimum(a[:, None, 2:], b[None, :, 2:]) - np.maximum(a[:, None, :2], b[None, :, :2]), 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def nms(boxes, scores, iou_threshold: float, max_keep: int | None = None) -> np.ndarray:
    """Greedy NMS: indices of kept boxes, best score first; a box is dropped when its IoU with a
    better kept box exceeds ``iou_threshold``. Ties keep input order (stable sort)."""
    scores = np.asarray(scores, np.float64).reshape(-1)
    order = np.argsort(-scores, kind="stable")
    over = box_iou(np.asarray(boxes)[order], np.asarray(boxes)[order]) > iou_threshold
    suppressed = np.zeros(len(order), dtype=bool)
    keep: list[int] = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        if max_keep is not None and len(keep) >= max_keep:
            break
        suppressed |= over[i]
    return order[np.asarray(keep, dtype=np.int64)]


def crop_region(box, width: int, height: int) -> tuple[int, int, int, int]:
    """The pixel region of a box: rounded outward (the whole person is inside), clipped to the
    frame, at least one pixel each way. ``(left, top, right, bottom)``, right/bottom exclusive."""
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    left, top = min(max(math.floor(x1), 0), width - 1), min(max(math.floor(y1), 0), height - 1)
    right, bottom = min(math.ceil(x2), width), min(math.ceil(y2), height)
    return left, top, max(right, left + 1), max(bottom, top + 1)


def crop_boxes(image: np.ndarray, boxes: np.ndarray) -> list[np.ndarray]:
    """Pixel crops (views) of each box of an (H, W, 3) frame, by :func:`crop_region`."""
    height, width = image.shape[:2]
    crops = []
    for box in boxes:
        left, top, right, bottom = crop_region(box, width, height)
        crops.append(image[top:bottom, left:right])
    return crops


def box_ios(a, b) -> np.ndarray:
    """Pairwise intersection over the smaller box's area of (N, ≥4) and (M, ≥4) boxes → (N, M)
    float64: 1 when one box lies inside the other, whatever their sizes (IoU is then their area ratio)."""
    a, b = _xyxy(a), _xyxy(b)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    wh = np.clip(np.minimum(a[:, None, 2:], b[None, :, 2:]) - np.maximum(a[:, None, :2], b[None, :, :2]), 0, None)
    inter = wh[..., 0] * wh[..., 1]
    smaller = np.minimum(area_a[:, None], area_b[None, :])
    return np.divide(inter, smaller, out=np.zeros_like(inter), where=smaller > 0)


def suppress_contained(boxes, scores, threshold: float, min_width_ratio: float = 0.5) -> np.ndarray:
    """Indices of boxes kept, best score first: a box is dropped when more than ``threshold`` of its
    area lies inside a better kept box that is at most ``1 / min_width_ratio`` times as wide.

    Catches the nested duplicates NMS lets through (a half-body box inside the whole-body one has
    IoU ≈ 0.5). The width condition keeps other people: a far person seen through a near person's
    box is a fifth of its width or less, a neighbour half hidden behind someone about 0.4; the
    part boxes seen on the shared frames were 0.56–0.85 as wide as the whole (docs/detection.md)."""
    boxes = _xyxy(boxes)
    scores = np.asarray(scores, np.float64).reshape(-1)
    order = np.argsort(-scores, kind="stable")
    ordered = boxes[order]
    width = np.clip(ordered[:, 2] - ordered[:, 0], 0, None)
    area = width * np.clip(ordered[:, 3] - ordered[:, 1], 0, None)
    wh = np.clip(np.minimum(ordered[:, None, 2:], ordered[None, :, 2:])
                 - np.maximum(ordered[:, None, :2], ordered[None, :, :2]), 0, None)
    inside = np.divide(wh[..., 0] * wh[..., 1], area[:, None], out=np.zeros((len(area),) * 2),
                       where=area[:, None] > 0)  # share of row i's own area inside box j
    nested = (inside > threshold) & (width[:, None] >= min_width_ratio * width[None, :])
    kept: list[int] = []
    for i in range(len(order)):
        if not nested[i, kept].any():
            kept.append(i)
    return order[np.asarray(kept, dtype=np.int64)]


def resize_crop(image: Image.Image) -> np.ndarray:
    """An RGB crop resized as torchreid does (PIL bilinear) → uint8 array (256, 128, 3)."""
    if image.size != (INPUT_WIDTH, INPUT_HEIGHT):
        image = image.resize((INPUT_WIDTH, INPUT_HEIGHT), Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8)
