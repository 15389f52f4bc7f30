"""Market-1501 protocol metrics on hand-computable cases."""

import numpy as np
import pytest

from reidx.indexers.metrics import average_precision, evaluate_ranking, inverse_negative_penalty, query_matches


def ranking_with_matches_at(ranks, length=12):
    """Distances for one query whose true matches (person 1) sit at the given 1-based ranks."""
    pids = np.array([1 if r in ranks else 2 for r in range(1, length + 1)])
    distances = np.arange(length, dtype=np.float64)[None, :]
    return distances, pids


def test_ap_of_matches_at_ranks_1_3_6_9_10():
    distances, pids = ranking_with_matches_at({1, 3, 6, 9, 10})
    metrics = evaluate_ranking(distances, [1], [1], pids, np.full(len(pids), 2))
    expected = (1 + 2 / 3 + 3 / 6 + 4 / 9 + 5 / 10) / 5
    assert metrics.mAP == pytest.approx(expected)
    assert expected == pytest.approx(0.622, abs=1e-3)
    assert metrics.rank(1) == 1.0
    assert metrics.mINP == pytest.approx(5 / 10)  # 5 true matches, the last one at rank 10


def test_first_match_at_rank_3_sets_cmc_from_rank_3():
    distances, pids = ranking_with_matches_at({3, 7})
    metrics = evaluate_ranking(distances, [1], [1], pids, np.full(len(pids), 2), max_rank=10)
    assert list(metrics.cmc[:4]) == [0, 0, 1, 1]
    assert metrics.mAP == pytest.approx((1 / 3 + 2 / 7) / 2)
    assert metrics.mINP == pytest.approx(2 / 7)


def test_same_id_same_camera_is_ignored_not_counted_as_wrong():
    # gallery ranked: [same id, same cam] [other id] [same id, other cam]
    distances = np.array([[0.1, 0.2, 0.3]])
    g_pids, g_cams = np.array([1, 2, 1]), np.array([1, 1, 2])
    metrics = evaluate_ranking(distances, [1], [1], g_pids, g_cams)
    # after removing the same-camera view the true match is at rank 2 of 2
    assert metrics.mAP == pytest.approx(0.5)
    assert metrics.rank(1) == 0.0 and metrics.rank(2) == 1.0
    assert list(query_matches(np.array([0, 1, 2]), 1, 1, g_pids, g_cams)) == [0, 1]


def test_same_id_other_camera_is_a_match_and_other_id_same_camera_stays():
    distances = np.array([[0.1, 0.2]])
    metrics = evaluate_ranking(distances, [5], [3], np.array([7, 5]), np.array([3, 1]))
    assert metrics.mAP == pytest.approx(0.5)


def test_query_without_valid_match_is_skipped():
    distances = np.array([[0.1, 0.2], [0.2, 0.1]])
    # query 0 (id 1, cam 1) only has its own-camera view; query 1 (id 2) has a valid match
    metrics = evaluate_ranking(distances, [1, 2], [1, 1], np.array([1, 2]), np.array([1, 2]))
    assert metrics.num_query == 1 and metrics.num_query_skipped == 1
    assert metrics.mAP == pytest.approx(1.0)


def test_all_queries_without_match_is_an_error():
    with pytest.raises(ValueError, match="no query has a valid match"):
        evaluate_ranking(np.array([[0.1]]), [1], [1], np.array([1]), np.array([1]))


def test_distractors_never_match():
    distances = np.array([[0.1, 0.2, 0.3]])
    metrics = evaluate_ranking(distances, [3], [1], np.array([0, 0, 3]), np.array([2, 2, 2]))
    assert metrics.mAP == pytest.approx(1 / 3)


def test_ties_resolve_in_gallery_order():
    distances = np.array([[0.5, 0.5, 0.5]])
    metrics = evaluate_ranking(distances, [1], [1], np.array([2, 1, 2]), np.array([2, 2, 2]))
    assert metrics.mAP == pytest.approx(0.5)


def test_helpers_without_matches_are_zero():
    assert average_precision(np.zeros(4)) == 0.0
    assert inverse_negative_penalty(np.zeros(4)) == 0.0


def test_label_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="do not fit"):
        evaluate_ranking(np.zeros((2, 3)), [1], [1], [1, 2, 3], [1, 1, 1])


def test_percent_report_keys():
    distances, pids = ranking_with_matches_at({2})
    report = evaluate_ranking(distances, [1], [1], pids, np.full(len(pids), 2)).as_percent_dict()
    assert {"mAP", "rank1", "rank5", "rank10", "mINP", "queries", "gallery_items"} <= set(report)
    assert report["mAP"] == 50.0 and report["rank1"] == 0.0 and report["rank5"] == 100.0
