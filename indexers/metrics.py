"""ReID retrieval metrics under the Market-1501 protocol: mAP, CMC rank-k, mINP.

Protocol (as in torchreid's ``eval_market1501`` and the Market-1501 paper):

- for each query, gallery items with the same person id *and* the same camera are ignored
  (they are trivially easy views from the same moment);
- junk gallery items (person id -1) are removed by the caller before ranking; distractors
  (id 0) stay and simply never match;
- a query with no valid match left is skipped and not counted;
- AP is non-interpolated: the mean over true matches of precision at each match's rank;
- CMC is cumulative: rank-k is the share of queries with a true match in the top k;
- INP (Ye et al., TPAMI 2021) is (number of true matches) / (rank of the last true match);
  mINP is its mean, which tells how far down the hardest match of each query sits.

Inputs are a distance matrix (smaller is closer) and label arrays; metrics are fractions in
[0, 1] (the CLI prints percent).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RankingMetrics:
    mAP: float
    mINP: float
    cmc: np.ndarray  # cmc[k-1] = rank-k accuracy, up to max_rank
    num_query: int  # queries evaluated (those with at least one valid match)
    num_query_skipped: int
    num_gallery: int

    def rank(self, k: int) -> float:
        return float(self.cmc[min(k, len(self.cmc)) - 1])

    def as_percent_dict(self) -> dict:
        """The report the CLI prints: metrics in percent, rounded to 2 decimals."""
        return {
            "mAP": round(100 * self.mAP, 2),
            "rank1": round(100 * self.rank(1), 2),
            "rank5": round(100 * self.rank(5), 2),
            "rank10": round(100 * self.rank(10), 2),
            "mINP": round(100 * self.mINP, 2),
            "queries": self.num_query,
            "queries_skipped": self.num_query_skipped,
            "gallery_items": self.num_gallery,
        }


def query_matches(order: np.ndarray, q_pid: int, q_cam: int, g_pids: np.ndarray, g_cams: np.ndarray) -> np.ndarray:
    """For one query's gallery ranking, the 0/1 match vector with same-id-same-camera removed."""
    ranked_pids, ranked_cams = g_pids[order], g_cams[order]
    keep = ~((ranked_pids == q_pid) & (ranked_cams == q_cam))
    return (ranked_pids[keep] == q_pid).astype(np.int64)


def average_precision(matches: np.ndarray) -> float:
    """Non-interpolated AP of a 0/1 relevance vector in rank order (0 if it has no match)."""
    hits = np.flatnonzero(matches)
    if hits.size == 0:
        return 0.0
    precision_at_hits = np.arange(1, hits.size + 1) / (hits + 1)
    return float(precision_at_hits.mean())


def inverse_negative_penalty(matches: np.ndarray) -> float:
    """INP: number of true matches divided by the rank of the last one."""
    hits = np.flatnonzero(matches)
    return float(hits.size / (hits[-1] + 1)) if hits.size else 0.0


def evaluate_ranking(distances: np.ndarray, q_pids, q_cams, g_pids, g_cams, max_rank: int = 50) -> RankingMetrics:
    """Market-1501 protocol metrics for a (num_query, num_gallery) distance matrix."""
    distances = np.asarray(distances)
    q_pids, q_cams = np.asarray(q_pids), np.asarray(q_cams)
    g_pids, g_cams = np.asarray(g_pids), np.asarray(g_cams)
    num_q, num_g = distances.shape
    if (len(q_pids), len(g_pids)) != (num_q, num_g):
        raise ValueError(f"labels ({len(q_pids)} query, {len(g_pids)} gallery) do not fit distances {distances.shape}")
    # A stable sort makes ties deterministic (gallery order), unlike the default quicksort.
    orders = np.argsort(distances, axis=1, kind="stable")
    match_lists = [query_matches(orders[qi], q_pids[qi], q_cams[qi], g_pids, g_cams) for qi in range(num_q)]
    return evaluate_top_k(match_lists, [int(m.sum()) for m in match_lists], num_g, min(max_rank, num_g))


def evaluate_top_k(match_lists: list[np.ndarray], num_relevant: list[int], num_gallery: int,
                   max_rank: int = 50) -> RankingMetrics:
    """The same metrics from ranked lists cut at top-k (what ``reidx query`` writes).

    ``match_lists[i]``: query i's 0/1 matches in rank order, same-id-same-camera items already
    removed; ``num_relevant[i]``: its valid matches in the whole gallery. A match beyond the cut
    counts as never retrieved: AP divides by ``num_relevant``, and INP is 0 unless every match is
    in the list. With lists covering the gallery this equals :func:`evaluate_ranking`.
    """
    aps, inps, cmcs = [], [], []
    for matches, relevant in zip(match_lists, num_relevant):
        if relevant == 0:
            continue
        hits = np.flatnonzero(matches)
        aps.append(average_precision(matches) * hits.size / relevant)  # misses beyond the cut count
        inps.append(inverse_negative_penalty(matches) if hits.size == relevant else 0.0)
        cmc = np.zeros(max_rank)
        if hits.size and hits[0] < max_rank:
            cmc[hits[0]:] = 1.0
        cmcs.append(cmc)
    if not aps:
        raise ValueError("no query has a valid match in the gallery; check the labels")
    return RankingMetrics(mAP=float(np.mean(aps)), mINP=float(np.mean(inps)), cmc=np.mean(cmcs, axis=0),
                          num_query=len(aps), num_query_skipped=len(match_lists) - len(aps), num_gallery=num_gallery)


__all__ = [
    "RankingMetrics",
    "average_precision",
    "evaluate_ranking",
    "evaluate_top_k",
    "inverse_negative_penalty",
    "query_matches",
]
