"""Detection average precision at one IoU threshold (0.5 by default), so annotated frames can be scored.

Protocol (PASCAL VOC 2010+ all-point interpolation; matching as COCO does it):

- per image, detections are taken best score first; each is matched to the unmatched
  ground-truth box it overlaps most, if that IoU is ≥ ``iou_threshold`` (a true positive);
  otherwise it is a false positive (this includes a second detection of an already-found person);
- ground truth marked ``ignore`` (VOC "difficult", COCO "crowd", people too small to count) is not
  counted in the recall, and a detection matching only such a box is neither true nor false
  (matching by IoU, or with ``ignore_by_area`` by the share of the detection inside the box, as
  COCO does for crowd regions);
- all images' detections are then ranked together by score; AP is the area under the
  precision–recall curve after making precision monotone (each recall level gets the best
  precision at that recall or beyond), summed at every recall step ("all-point"), not sampled
  at 11 or 101 points.

- ``min_height`` (COCO's area range, by height): ground truth shorter than this is ignored, and a
  detection shorter than this that matches no counted person is neither true nor false, so people
  too small to matter neither count as misses nor make a detector that finds them look worse.

Boxes are x1, y1, x2, y2 in pixels. AP is a fraction in [0, 1]; NaN when there is no ground truth.
Ground truth files (:func:`load_ground_truth`): ``tests/data/scene_person_boxes.json`` is the
hand-checked set for the shared scene frames; its ``labelling`` notes say what counts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from reidx.pipeline.boxes import box_iou


def match_image(boxes: np.ndarray, scores: np.ndarray, gt_boxes: np.ndarray, gt_ignore: np.ndarray | None = None,
                iou_threshold: float = 0.5, ignore_by_area: bool = False) -> np.ndarray:
    """Label one image's detections: 1 true positive, 0 false positive, -1 ignored (matched an ignored box).

    ``ignore_by_area``: a detection matches an ignored box when at least ``iou_threshold`` of its own
    area lies inside it (COCO's rule for crowd regions), not by IoU: a box on the visible half of a
    half-hidden person is then ignored rather than false."""
    scores = np.asarray(scores, np.float64).reshape(-1)
    gt_boxes = np.asarray(gt_boxes, np.float64).reshape(-1, 4)
    ignore = np.zeros(len(gt_boxes), bool) if gt_ignore is None else np.asarray(gt_ignore, bool).reshape(-1)
    labels = np.zeros(len(scores), np.int8)
    if len(gt_boxes) == 0 or len(scores) == 0:
        return labels
    ious = box_iou(boxes, gt_boxes)
    if ignore_by_area:
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        area = (boxes[:, 2] - boxes[:, 0]).clip(0) * (boxes[:, 3] - boxes[:, 1]).clip(0)
        wh = (np.minimum(boxes[:, None, 2:], gt_boxes[None, :, 2:]) - np.maximum(boxes[:, None, :2], gt_boxes[None, :, :2])).clip(0)
        inside = np.divide(wh[..., 0] * wh[..., 1], area[:, None], out=np.zeros(ious.shape), where=area[:, None] > 0)
    taken = np.zeros(len(gt_boxes), bool)
    for i in np.argsort(-scores, kind="stable"):
        for candidates, label in ((~ignore & ~taken, 1), (ignore, -1)):  # counted people first
            overlap = np.where(candidates, inside[i] if ignore_by_area and label == -1 else ious[i], -1.0)
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
        """Of all detections given: the most recall any threshold above theirs can reach."""
        return self.true_positives / self.num_gt if self.num_gt else float("nan")

    @property
    def precision(self) -> float:
        counted = self.true_positives + self.false_positives
        return self.true_positives / counted if counted else float("nan")

    def as_percent_dict(self) -> dict:
        return {"AP": round(100 * self.ap, 2), "recall": round(100 * self.recall, 2),
                "precision": round(100 * self.precision, 2),
                "iou_threshold": self.iou_threshold, "num_gt": self.num_gt, "num_detections": self.num_detections,
                "true_positives": self.true_positives, "false_positives": self.false_positives}


def evaluate_detections(detections: Sequence[np.ndarray], ground_truth: Sequence[np.ndarray],
                        ignore: Sequence[np.ndarray] | None = None, iou_threshold: float = 0.5,
                        min_height: float = 0.0, ignore_by_area: bool = False) -> DetectionMetrics:
    """Score per-image detections, each (K, 5) x1 y1 x2 y2 score (as :meth:`Detector.detect` returns),
    against per-image ground truth (G, 4), optionally with per-image ``ignore`` flags (G,), a
    ``min_height`` below which people are ignored both ways and ``ignore_by_area`` (module docstring)."""
    if len(detections) != len(ground_truth):
        raise ValueError(f"{len(detections)} images of detections but {len(ground_truth)} of ground truth")
    all_scores, all_labels, num_gt = [], [], 0
    for i, (dets, gts) in enumerate(zip(detections, ground_truth)):
        dets = np.asarray(dets, np.float64).reshape(-1, 5)
        gts = np.asarray(gts, np.float64).reshape(-1, 4)
        flags = np.zeros(len(gts), bool) if ignore is None else np.asarray(ignore[i], bool).reshape(-1).copy()
        flags |= (gts[:, 3] - gts[:, 1]) < min_height
        labels = match_image(dets[:, :4], dets[:, 4], gts, flags, iou_threshold, ignore_by_area)
        labels[(labels == 0) & ((dets[:, 3] - dets[:, 1]) < min_height)] = -1
        all_labels.append(labels)
        all_scores.append(dets[:, 4])
        num_gt += int((~flags).sum())
    scores = np.concatenate(all_scores) if all_scores else np.zeros(0)
    labels = np.concatenate(all_labels) if all_labels else np.zeros(0, np.int8)
    return DetectionMetrics(average_precision(scores, labels, num_gt), iou_threshold, num_gt, len(scores),
                            int((labels == 1).sum()), int((labels == 0).sum()))


@dataclass(frozen=True)
class GroundTruth:
    """Hand-drawn person boxes per frame file name: boxes (G, 4) and ignore flags (G,)."""

    boxes: dict[str, np.ndarray]
    ignore: dict[str, np.ndarray]
    min_height: float = 0.0
    split: dict[str, list[str]] | None = None  # e.g. {"tune": [...], "confirm": [...]}

    def frames(self, split: str = "all") -> list[str]:
        """Frame names of a split (``all``: every labelled frame), sorted."""
        if split == "all":
            return sorted(self.boxes)
        if not self.split or split not in self.split:
            raise ValueError(f"no split {split!r} in the ground truth (has: all, {', '.join(self.split or {})})")
        return sorted(self.split[split])


def load_ground_truth(path: str | os.PathLike) -> GroundTruth:
    """A JSON file ``{"frames": {name: [{"box": [x1, y1, x2, y2], "ignore": bool}, ...]}, "min_height": px,
    "split": {...}}`` (``min_height`` and ``split`` optional) → :class:`GroundTruth`."""
    doc = json.loads(Path(path).read_text())
    boxes, ignore = {}, {}
    for name, people in doc["frames"].items():
        boxes[name] = np.array([p["box"] for p in people], np.float64).reshape(-1, 4)
        ignore[name] = np.array([bool(p.get("ignore", False)) for p in people], bool)
        if ((boxes[name][:, 2:] - boxes[name][:, :2]) <= 0).any():
            raise ValueError(f"{path}: {name} has a box with x2 <= x1 or y2 <= y1")
    return GroundTruth(boxes, ignore, float(doc.get("min_height", 0.0)), doc.get("split"))


def evaluate_frames(detections: dict[str, np.ndarray], truth: GroundTruth, frames: Sequence[str] | None = None,
                    iou_threshold: float = 0.5) -> DetectionMetrics:
    """Detections by frame name (K, 5) against the ground truth of ``frames`` (default: all labelled);
    a labelled frame without detections counts its people as missed. Ignored people are matched by
    area (``ignore_by_area``): their boxes cover what might be them, e.g. a half-hidden person's
    possible extent, and a detection of any visible part of them is neither true nor false."""
    frames = truth.frames() if frames is None else list(frames)
    missing = [f for f in frames if f not in truth.boxes]
    if missing:
        raise ValueError(f"no ground truth for {', '.join(missing[:3])}")
    return evaluate_detections([detections.get(f, np.zeros((0, 5))) for f in frames],
                               [truth.boxes[f] for f in frames], [truth.ignore[f] for f in frames],
                               iou_threshold, truth.min_height, ignore_by_area=True)


def detections_by_frame(table) -> dict[str, np.ndarray]:
    """A detections table (``reidx detect``, schema in :mod:`reidx.pipeline.detect_output`) → (K, 5)
    boxes per frame file name. Frames without rows (nobody found) are simply absent."""
    columns = table.to_pydict()
    out: dict[str, list] = {}
    for i, path in enumerate(columns["path"]):
        out.setdefault(Path(path).name, []).append([columns[c][i] for c in ("x1", "y1", "x2", "y2", "score")])
    return {name: np.array(rows, np.float32).reshape(-1, 5) for name, rows in out.items()}


def detect_labelled_frames(detector, truth: GroundTruth, images: str | os.PathLike, split: str = "all",
                           batch_size: int = 8, max_pixels: int | None = None) -> tuple[dict, list[dict]]:
    """Run ``detector`` (a :class:`reidx.pipeline.detect.Detector`) on the labelled frames of ``split``
    found by file name in the folder ``images`` → (boxes per frame name, failures). A labelled frame
    that is not there is an error: scoring without it would silently change the benchmark."""
    from reidx.pipeline.detect import iter_detections
    from reidx.pipeline.imaging import DEFAULT_MAX_PIXELS

    names = truth.frames(split)
    paths = [Path(images) / name for name in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} labelled frames are not in {images}: {', '.join(missing[:3])}")
    boxes, failures = {}, []
    for frame in iter_detections(detector, paths, batch_size, max_pixels=max_pixels or DEFAULT_MAX_PIXELS):
        boxes[frame.path.name] = frame.boxes
        if frame.error is not None:
            failures.append({"path": str(frame.path), "reason": frame.error})
    return boxes, failures


def evaluation_report(ground_truth: str | os.PathLike, detections: str | os.PathLike | None = None,
                      images: str | os.PathLike | None = None, split: str = "all", iou_threshold: float = 0.5,
                      detector=None, batch_size: int = 8, max_pixels: int | None = None) -> dict:
    """What ``reidx evaluate-detections`` prints: score the table ``detections``, or run ``detector``
    on the labelled frames in the folder ``images``; AP, recall, precision in percent."""
    truth = load_ground_truth(ground_truth)
    frames = truth.frames(split)
    report: dict = {"ground_truth": str(ground_truth), "split": split, "images": len(frames)}
    if detections is not None:
        import pyarrow.parquet as pq

        table = pq.read_table(detections)
        boxes = detections_by_frame(table)
        failed = json.loads((table.schema.metadata or {}).get(b"reidx.failed", b"{}"))
        failures = [{"path": p, "reason": r} for p, r in failed.items() if Path(p).name in frames]
        report.update(detections=str(detections), frames_without_rows=sum(f not in boxes for f in frames))
    else:
        boxes, failures = detect_labelled_frames(detector, truth, images, split, batch_size, max_pixels)
        info, options = detector.info, detector.options
        report.update(detector=info.id, backend=info.backend, input_size=info.input_size,
                      tiles="x".join(map(str, info.tiles)) if info.tiles else "off", antialias=info.antialias,
                      score_threshold=options.score_threshold, containment=options.containment)
    metrics = evaluate_frames(boxes, truth, frames, iou_threshold)
    report.update(images_failed=len(failures), failures=failures, min_height=truth.min_height,
                  persons=int(sum(len(boxes.get(f, ())) for f in frames)), **metrics.as_percent_dict())
    return report
