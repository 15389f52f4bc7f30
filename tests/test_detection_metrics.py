"""Detection AP@0.5 on cases small enough to work out by hand (numbers in the comments)."""

import math

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
