"""Detection average precision at one IoU threshold (0.5 by default), so annotated frames can be scored.

Protocol (PASCAL VOC 2010+ all-point interpolation; matching as COCO does it):

- per image, detections are taken best score first; each is matched to the unmatched
  ground-truth box it overlaps most, if that IoU is ≥ ``iou_threshold`` (a true positive);
  otherwise it is a false positive (this includes a second detection of an already-found person);
- ground truth marked ``ignore`` (VOC "difficult", COCO "crowd", people too small to count) is not
  counted in the recall, and a detection matching only such a box is neither true nor false;
- all images' detections are then ranked together by score; AP is the area under the
  precision–recall curve after making precision monotone (each recall level gets the best
  precision at that recall or beyond), summed at every recall step ("all-point"), not sampled
  at 11 or 101 points.

Boxes are x1, y1, x2, y2 in pixels. AP is a fraction in [0, 1]; NaN when there is no ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from reidx.pipeline.boxes import box_iou


def match_image(boxes: np.ndarray, scores: np.ndarray, gt_boxes: np.ndarray, gt_ignore: np.ndarray | None = None,
                iou_threshold: float = 0.5) -> np.ndarray:
    """Label one image's detections: 1 true positive, 0 false positive, -1 ignored (matched an ignored box)."""
    scores = np.asarray(scores, np.float64).reshape(-1)
    gt_boxes = np.asarray(gt_boxes, np.float64).reshape(-1, 4)
    ignore = np.zeros(len(gt_boxes), bool) if gt_ignore is None else np.asarray(gt_ignore, bool).reshape(-1)
    labels = np.zeros(len(scores), np.int8)
    if len(gt_boxes) == 0 or len(scores) == 0:
        return labels
    ious = box_iou(boxes, gt_boxes)
    taken = np.zeros(len(gt_boxes), bool)
    for i in np.argsort(-scores, kind="stable"):
        for candidates, label in ((~ignore & ~taken, 1), (ignore, -1)):  # counted people first
            overlap = np.where(candidates, ious[i], -1.0)
            j = int(np.argmax(overlap))
            if overlap[j] >= iou_threshold:
                labels[i] = label
                taken[j] |= label == 1
                break
    return labels


def average_precision(scores: np.ndarray, labels: np.ndarray, num_gt: int) -> float:
    """All-point interpolated AP of ranked detections (labels 1 TP / 0 FP; -1 are dropped)."""
    if num_gt <= 0:
        return float("nan")
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels)
    keep = labels >= 0
    order = np.argsort(-scores[keep], kind="stable")
    tp = labels[keep][order].astype(np.float64)
    if tp.size == 0:
        return 0.0
    true_pos = np.cumsum(tp)
    precision = true_pos / np.arange(1, len(tp) + 1)
    recall = true_pos / num_gt
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.diff(np.concatenate([[0.0], recall]))
    return float(np.sum(steps * envelope))


@dataclass(frozen=True)
class DetectionMetrics:
    ap: float  # average precision at iou_threshold
    iou_threshold: float
    num_gt: int  # counted (not ignored) ground-truth boxes
    num_detections: int
    true_positives: int
    false_positives: int

    @property
    def recall(self) -> float:
        return self.true_positives / self.num_gt if self.num_gt else float("nan")

    def as_percent_dict(self) -> dict:
        return {"AP": round(100 * self.ap, 2), "recall": round(100 * self.recall, 2),
                "iou_threshold": self.iou_threshold, "num_gt": self.num_gt, "num_detections": self.num_detections,
                "true_positives": self.true_positives, "false_positives": self.false_positives}


def evaluate_detections(detections: Sequence[np.ndarray], ground_truth: Sequence[np.ndarray],
                        ignore: Sequence[np.ndarray] | None = None, iou_threshold: float = 0.5) -> DetectionMetrics:
    """Score per-image detections, each (K, 5) x1 y1 x2 y2 score (as :meth:`Detector.detect` returns),
    against per-image ground truth (G, 4), optionally with per-image ``ignore`` flags (G,)."""
    if len(detections) != len(ground_truth):
        raise ValueError(f"{len(detections)} images of detections but {len(ground_truth)} of ground truth")
    all_scores, all_labels, num_gt = [], [], 0
    for i, (dets, gts) in enumerate(zip(detections, ground_truth)):
        dets = np.asarray(dets, np.float64).reshape(-1, 5)
        flags = None if ignore is None else np.asarray(ignore[i], bool)
        all_labels.append(match_image(dets[:, :4], dets[:, 4], gts, flags, iou_threshold))
        all_scores.append(dets[:, 4])
        num_gt += int(len(np.asarray(gts).reshape(-1, 4)) - (0 if flags is None else flags.sum()))
    scores = np.concatenate(all_scores) if all_scores else np.zeros(0)
    labels = np.concatenate(all_labels) if all_labels else np.zeros(0, np.int8)
    return DetectionMetrics(average_precision(scores, labels, num_gt), iou_threshold, num_gt, len(scores),
                            int((labels == 1).sum()), int((labels == 0).sum()))
