"""Detection AP@0.5 on cases small enough to work out by hand (numbers in the comments), the shared
hand-drawn ground truth, and the detector's acceptance figure on it (``reidx evaluate-detections``)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from reidx.indexers.detection_metrics import average_precision, evaluate_detections, match_image
from reidx.pipeline.boxes import box_iou as iou_matrix

PERSON_A = [0, 0, 10, 20]
PERSON_B = [100, 0, 110, 20]
PERSON_C = [200, 0, 210, 20]


def det(box, score):
    return [*box, score]


def test_iou_by_hand():
    # 10×20 boxes shifted by 5 px horizontally: intersection 5×20 = 100, union 300
    assert iou_matrix([PERSON_A], [[5, 0, 15, 20]])[0, 0] == pytest.approx(1 / 3)
    assert iou_matrix([PERSON_A], [PERSON_B])[0, 0] == 0.0
    assert iou_matrix([[0, 0, 0, 0]], [[0, 0, 0, 0]])[0, 0] == 0.0  # empty boxes, no division by zero


def test_perfect_detections_give_ap_1():
    dets = np.array([det(PERSON_A, 0.9), det(PERSON_B, 0.8)])
    metrics = evaluate_detections([dets], [np.array([PERSON_A, PERSON_B])])
    assert metrics.ap == 1.0 and metrics.true_positives == 2 and metrics.false_positives == 0


def test_tp_fp_tp_with_a_missed_person():
    # ranked: TP (0.9), FP (0.8), TP (0.7); 3 people → precision 1, 1/2, 2/3 at recall 1/3, 1/3, 2/3.
    # Monotone envelope: 1 at recall 1/3, 2/3 at recall 2/3 → AP = 1/3·1 + 1/3·2/3 = 5/9.
    dets = np.array([det(PERSON_A, 0.9), det([300, 0, 310, 20], 0.8), det(PERSON_B, 0.7)])
    metrics = evaluate_detections([dets], [np.array([PERSON_A, PERSON_B, PERSON_C])])
    assert metrics.ap == pytest.approx(5 / 9)
    assert metrics.recall == pytest.approx(2 / 3)


def test_envelope_lifts_earlier_precision():
    # FP (0.9) then TP (0.8), one person: precision 0 then 1/2 at recall 1 → AP = 1/2
    dets = np.array([det([50, 50, 60, 70], 0.9), det(PERSON_A, 0.8)])
    assert evaluate_detections([dets], [np.array([PERSON_A])]).ap == pytest.approx(0.5)
    # TP (0.9) FP (0.8) TP (0.7) FP (0.6), 2 people: precision 1, 1/2, 2/3, 1/2 → AP = 1/2·1 + 1/2·2/3 = 5/6
    dets = np.array([det(PERSON_A, 0.9), det([300, 0, 310, 20], 0.8), det(PERSON_B, 0.7), det([400, 0, 410, 20], 0.6)])
    assert evaluate_detections([dets], [np.array([PERSON_A, PERSON_B])]).ap == pytest.approx(5 / 6)


def test_duplicate_detection_is_a_false_positive():
    dets = np.array([det(PERSON_A, 0.9), det([0, 1, 10, 21], 0.8)])  # both overlap A (IoU 19/21)
    labels = match_image(dets[:, :4], dets[:, 4], np.array([PERSON_A]))
    assert labels.tolist() == [1, 0]
    assert evaluate_detections([dets], [np.array([PERSON_A])]).ap == 1.0  # the FP ranks after full recall


def test_iou_threshold_is_inclusive_at_one_half():
    half = [0, 0, 10, 10]  # IoU with A (10×20): 100 / 200 = 0.5 exactly
    assert match_image(np.array([half]), np.array([0.5]), np.array([PERSON_A])).tolist() == [1]
    assert match_image(np.array([[0, 0, 10, 9.9]]), np.array([0.5]), np.array([PERSON_A])).tolist() == [0]


def test_a_detection_takes_the_best_unmatched_person():
    # Two overlapping people. Both detections overlap A most (IoU 0.82 and 0.74); the first takes A,
    # the second falls back to B (IoU 150/250 = 0.6), COCO's rule (VOC's would call it a FP).
    a, b = [0, 0, 10, 20], [4, 0, 14, 20]
    dets = np.array([det([1, 0, 11, 20], 0.9), det([1.5, 0, 11.5, 20], 0.8)])
    assert np.argmax(iou_matrix(dets[1:, :4], [a, b])[0]) == 0
    assert match_image(dets[:, :4], dets[:, 4], np.array([a, b])).tolist() == [1, 1]


def test_ranking_is_global_across_images():
    # image 1: FP 0.95; image 2: TP 0.9 → ranked FP, TP with 1 person → AP 1/2.
    metrics = evaluate_detections([np.array([det([50, 50, 60, 70], 0.95)]), np.array([det(PERSON_A, 0.9)])],
                                  [np.zeros((0, 4)), np.array([PERSON_A])])
    assert metrics.ap == pytest.approx(0.5) and metrics.num_gt == 1


def test_ignored_people_count_neither_way():
    dets = np.array([det(PERSON_A, 0.9), det(PERSON_B, 0.95)])
    metrics = evaluate_detections([dets], [np.array([PERSON_A, PERSON_B])], ignore=[np.array([False, True])])
    assert metrics.num_gt == 1 and metrics.ap == 1.0 and metrics.false_positives == 0
    # without the flag B is a counted, found person
    assert evaluate_detections([dets], [np.array([PERSON_A, PERSON_B])]).num_gt == 2


def test_edge_cases():
    assert evaluate_detections([np.zeros((0, 5))], [np.array([PERSON_A])]).ap == 0.0
    assert math.isnan(evaluate_detections([np.array([det(PERSON_A, 0.9)])], [np.zeros((0, 4))]).ap)
    assert average_precision(np.array([0.9]), np.array([1]), 2) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        evaluate_detections([np.zeros((0, 5))], [])


def test_people_under_min_height_count_neither_way():
    tall, short = [0, 0, 20, 100], [200, 0, 210, 40]  # 100 px and 40 px tall
    dets = np.array([det(tall, 0.9), det(short, 0.8), det([400, 0, 410, 30], 0.95)])  # the last matches nobody
    metrics = evaluate_detections([dets], [np.array([tall, short])], min_height=50)
    # the short person is ignored, so is the short unmatched box: 1 person, 1 TP, no FP
    assert metrics.num_gt == 1 and metrics.true_positives == 1 and metrics.false_positives == 0 and metrics.ap == 1.0
    # without it: FP (0.95), TP, TP over 2 people → precision 0, 1/2, 2/3; envelope 2/3 at both steps
    plain = evaluate_detections([dets], [np.array([tall, short])])
    assert plain.num_gt == 2 and plain.false_positives == 1 and plain.ap == pytest.approx(2 / 3)
    # a tall unmatched box is still false
    assert evaluate_detections([np.array([det([400, 0, 410, 90], 0.95)])], [np.array([tall])],
                               min_height=50).false_positives == 1


def test_ignored_boxes_match_by_area_inside_them():
    """COCO's crowd rule: a box on the visible half of a half-hidden person (IoU 0.45 with the
    box of where that person may be) is ignored, not false, when matching by area."""
    hidden = [0, 0, 20, 100]  # ignored: where a half-hidden person may be
    upper = [0, 0, 20, 45]  # a detection of the visible upper part: IoU 0.45, all of it inside
    by_iou = match_image(np.array([upper]), np.array([0.9]), np.array([hidden]), np.array([True]))
    by_area = match_image(np.array([upper]), np.array([0.9]), np.array([hidden]), np.array([True]), ignore_by_area=True)
    assert by_iou.tolist() == [0] and by_area.tolist() == [-1]
    # counted people still need IoU: the same box on a counted person is a false positive
    assert match_image(np.array([upper]), np.array([0.9]), np.array([hidden]), np.array([False]),
                       ignore_by_area=True).tolist() == [0]


def test_the_shared_ground_truth_file(shared_dir):
    """tests/data/scene_person_boxes.json: every shared frame, boxes inside the frames, splits that
    partition the frames, person 0001 boxed once in each frame, the labelling notes present."""
    from reidx.indexers.detection_metrics import load_ground_truth
    from conftest import REPO

    path = REPO / "tests" / "data" / "scene_person_boxes.json"
    truth = load_ground_truth(path)
    names = {p.name for p in (shared_dir / "data" / "scenes" / "frames").glob("*.jpg")}
    assert set(truth.frames()) == names and truth.min_height == 50
    splits = [set(truth.frames(s)) for s in ("tune", "confirm", "heldout")]
    assert set.union(*splits) == names and sum(map(len, splits)) == len(names)
    boxes = np.concatenate(list(truth.boxes.values()))
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 1920).all() and (boxes[:, 3] <= 1080).all()
    doc = json.loads(path.read_text())
    assert len(doc["labelling"]) >= 5
    for name, people in doc["frames"].items():
        assert sum("query person 0001" in p["note"] for p in people) == 1, name
    with pytest.raises(ValueError, match="split"):
        truth.frames("nope")


def test_default_detector_meets_the_issue_15_acceptance(tmp_path):
    """AP50 ≥ 0.92 at the default settings on the shared frames, by ``reidx evaluate-detections``
    (measured 96.94 on all 16, 100.0 on the 5 held-out ones); scoring the table ``reidx detect``
    writes gives the same figures as running the detector inside the command."""
    from conftest import REPO, SCENES

    truth = REPO / "tests" / "data" / "scene_person_boxes.json"
    env = {**os.environ, "REIDX_MODEL_DIR": str(REPO.parent / "shared" / "models")}

    def reidx(*args):
        result = subprocess.run([sys.executable, "-m", "reidx.cli", *args, "--json"], capture_output=True, text=True,
                                env=env, cwd=REPO)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    report = reidx("evaluate-detections", str(truth), "--images", str(SCENES / "frames"))
    assert report["images"] == 16 and report["num_gt"] >= 70 and report["images_failed"] == 0
    assert report["AP"] >= 92 and report["recall"] >= 95 and report["precision"] >= 80
    assert report["input_size"] == 576 and report["tiles"] == "2x1" and report["antialias"] is True
    table = tmp_path / "d.parquet"
    reidx("detect", str(SCENES / "frames"), "--out", str(table))
    from_table = reidx("evaluate-detections", str(truth), "--detections", str(table))
    assert {k: from_table[k] for k in ("AP", "recall", "precision", "num_gt")} == \
        {k: report[k] for k in ("AP", "recall", "precision", "num_gt")}
    assert from_table["frames_without_rows"] == 0
