"""Adaptive re-ranking: how strongly to re-rank, decided from the gallery's and the query's own
unlabelled neighbour structure (issue 15). Pure NumPy functions on sorted neighbour distances.

Why: re-ranking reads each item's neighbourhood as "more images of the same person". Where the
gallery holds one or two images per person there is no such neighbourhood, and every method
loses mAP (cuhk03, two images per id in query and gallery: k-reciprocal −1.8 to −4.5, sim-graph
−1.7 to −3.0; docs/reranking.md), while galleries of about five per person gain +3 to +6. So the
number of same-identity neighbours is estimated from distances alone:

- each item's 29 nearest others (a kNN graph row, or exact mode's distance row) are divided by
  the 29th; ranks 10-29 are taken as background and fitted by a + b·log(rank); a neighbour at
  rank ≤ 9 lying more than ``RESIDUAL`` below that fit counts as same identity; an item whose
  nearest neighbour lies *above* the fit, and within ``WIDE_NEAREST`` of the 29th distance, sits
  in a group wider than the graph (count 29): without that second test the smooth profile of
  weak features (distance concentration) passed for one, on 34 % of a one-per-person cuhk03 gallery;
- per gallery (``gallery_rerank_profile``, stored in the index's meta.json): the median count;
- per query: the median count of its ``QUERY_NEIGHBOURS`` nearest gallery candidates.

Strength s ∈ [0, 1] ramps from 0 at a median count ``OFF`` to 1 at ``ON``; a query gets
min(gallery strength, its own); s = 0 is plain ranking, s = 1 the method unchanged
(``indexers.rerank`` applies it). Exact and scalable mode read the same 29 distances per item,
so they decide alike.
"""

from __future__ import annotations

import numpy as np

PROFILE_VERSION = 1
GRAPH_NEIGHBOURS = 29  # nearest others read per item: a 30-wide kNN graph row (itself first)
TAIL_START = 10  # ranks TAIL_START..29 fit the background
MAX_GROUP = 9  # ranks 1..MAX_GROUP may count as the same identity
RESIDUAL = 0.04  # below the background fit by this share of the 29th distance: same identity
WIDE_NEAREST = 0.7  # a group wider than the graph: nearest neighbour within this share of the 29th distance
OFF, ON = 1.0, 2.0  # median counts where the strength is 0 and reaches 1
DENSE = GRAPH_NEIGHBOURS  # median count from which identities outgrow the graph: k-reciprocal k1 = DENSE_K1
DENSE_K1 = 20
QUERY_NEIGHBOURS = 10  # a query's nearest candidates whose counts decide its own strength
# RESIDUAL, WIDE_NEAREST, OFF/ON and QUERY_NEIGHBOURS were chosen on Con-ReID's training identities
# only (`python benchmarks/rerank_adaptive.py --select`: 54 grid points, 28 tuning galleries, both
# weights; every point's worst gain rounded to 0.00, the largest mean gain +1.42 chose this one).


def neighbour_counts(distances: np.ndarray) -> np.ndarray:
    """(N,) estimated same-identity neighbours of each row of ascending distances to the nearest
    others (self excluded, ≥ GRAPH_NEIGHBOURS columns, Euclidean between unit vectors)."""
    d = np.asarray(distances, np.float64)[:, :GRAPH_NEIGHBOURS]
    if d.shape[1] < GRAPH_NEIGHBOURS:
        raise ValueError(f"adaptive re-ranking reads {GRAPH_NEIGHBOURS} neighbours per item, got {d.shape[1]}")
    profile = d / np.maximum(d[:, -1:], 1e-12)
    log_rank = np.log(np.arange(1, GRAPH_NEIGHBOURS + 1))
    tail = slice(TAIL_START - 1, GRAPH_NEIGHBOURS)
    centred = log_rank[tail] - log_rank[tail].mean()
    level = profile[:, tail].mean(axis=1, keepdims=True)
    slope = (profile[:, tail] - level) @ centred / (centred @ centred)
    background = level + slope[:, None] * (log_rank[None, :] - log_rank[tail].mean())
    below = background - profile
    counts = (below[:, :MAX_GROUP] > RESIDUAL).sum(axis=1).astype(np.float64)
    wide = (below[:, 0] < -RESIDUAL) & (profile[:, 0] < WIDE_NEAREST)
    return np.where(wide, float(GRAPH_NEIGHBOURS), counts)


def graph_counts(knn_dist: np.ndarray) -> np.ndarray:
    """neighbour_counts of kNN graph rows (itself first, Euclidean); rows with missing slots
    (inf: a gallery smaller than the graph) count 0."""
    others = np.asarray(knn_dist, np.float64)[:, 1:GRAPH_NEIGHBOURS + 1]
    if others.shape[1] < GRAPH_NEIGHBOURS:
        return np.zeros(len(others))
    complete = np.isfinite(others).all(axis=1)
    counts = np.zeros(len(others))
    if complete.any():
        counts[complete] = neighbour_counts(others[complete])
    return counts


def profile_of_counts(counts: np.ndarray) -> dict:
    """The gallery's profile (a small JSON-able dict) from its items' counts."""
    counts = np.asarray(counts, np.float64)
    if counts.size == 0:
        return {"version": PROFILE_VERSION, "items": 0, "group_size": 0.0, "strength": 0.0}
    median = float(np.median(counts))
    return {"version": PROFILE_VERSION, "items": int(counts.size), "group_size": median,
            "group_size_quartiles": [float(q) for q in np.quantile(counts, [0.25, 0.75])],
            "beyond_graph_share": round(float((counts >= GRAPH_NEIGHBOURS).mean()), 4),
            "strength": strength(median)}


def gallery_rerank_profile(knn_ids: np.ndarray, knn_dist: np.ndarray, metric: str = "cosine") -> dict:
    """Per gallery, at build time: the profile from its kNN graph (``indexers.knn_graph``: itself
    first, missing slots -1/inf; ``metric`` cosine as build-index stores it, or euclidean).
    ``group_size`` is the median estimated number of same-identity neighbours (29: more than
    the graph holds); ``strength`` what re-ranking may use at most on this gallery."""
    return gallery_rerank_profile_of([(knn_ids, knn_dist)], metric)


def gallery_rerank_profile_of(blocks, metric: str = "cosine") -> dict:
    """``gallery_rerank_profile`` of a graph given as row blocks (ids, distances), in any order."""
    counts = [graph_counts(_euclidean_rows(ids, dist, metric)) for ids, dist in blocks]
    return profile_of_counts(np.concatenate(counts) if counts else np.zeros(0))


def _euclidean_rows(knn_ids, knn_dist, metric: str) -> np.ndarray:
    knn_dist = np.asarray(knn_dist, np.float64)
    if metric == "cosine":
        knn_dist = np.sqrt(np.clip(2.0 * knn_dist, 0.0, None))
    elif metric != "euclidean":
        raise ValueError(f"metric must be cosine or euclidean, got {metric!r}")
    return np.where(np.asarray(knn_ids) < 0, np.inf, knn_dist)


def strength(group_size: float) -> float:
    """0 at or below OFF, 1 at or above ON, linear between."""
    return float(np.clip((group_size - OFF) / (ON - OFF), 0.0, 1.0))


def query_strengths(profile: dict, candidate_counts: np.ndarray) -> np.ndarray:
    """(Q,) strength per query: min(the gallery's, that of the median count of its
    QUERY_NEIGHBOURS nearest candidates); ``candidate_counts`` (Q, ≥ 1) in candidate order,
    nan where a candidate is padding."""
    counts = np.asarray(candidate_counts, np.float64)[:, :QUERY_NEIGHBOURS]
    local = np.nanmedian(np.where(np.isnan(counts).all(axis=1, keepdims=True), 0.0, counts), axis=1)
    own = np.clip((local - OFF) / (ON - OFF), 0.0, 1.0)
    return np.minimum(own, profile["strength"]).astype(np.float32)


def candidate_strengths(query_ids: np.ndarray, query_dist: np.ndarray, knn_dist: np.ndarray,
                        profile: dict | None = None) -> tuple[dict, np.ndarray]:
    """Scalable mode: the gallery's profile (given, or from the whole graph) and each query's
    strength, from the graph rows (Euclidean, itself first) of its QUERY_NEIGHBOURS nearest
    candidates, ordered by (distance, id) as exact mode orders them; -1 ids are padding."""
    knn_dist = np.asarray(knn_dist)[:, :GRAPH_NEIGHBOURS + 1]
    if knn_dist.shape[1] < min(GRAPH_NEIGHBOURS + 1, len(knn_dist)):
        raise ValueError(f"the gallery kNN graph lists {knn_dist.shape[1]} neighbours per item; adaptive re-ranking "
                         f"reads {GRAPH_NEIGHBOURS + 1}: rebuild the index with `reidx build-index GALLERY --knn 30`, "
                         f"or pick --rerank-preset safe")
    if profile is None:
        profile = profile_of_counts(graph_counts(knn_dist))
    ids, dist = np.asarray(query_ids), np.where(np.asarray(query_ids) < 0, np.inf, query_dist)
    order = np.lexsort((np.where(ids < 0, np.iinfo(np.int64).max, ids), dist), axis=1)[:, :QUERY_NEIGHBOURS]
    nearest = np.take_along_axis(ids, order, 1)
    listed = nearest >= 0
    counts = np.full(nearest.shape, np.nan)
    if listed.any():
        rows = np.unique(nearest[listed])
        counts[listed] = graph_counts(knn_dist[rows])[np.searchsorted(rows, nearest[listed])]
    return profile, query_strengths(profile, counts)


def adaptive_k1(profile: dict, k1: int, dense_k1: int | None) -> int:
    """k-reciprocal's k1 on this gallery: ``dense_k1`` where identities outgrow the graph (the
    published 20 gains +1.42 / +1.38 mAP on dense Con-ReID against +0.72 / +1.02 for 15)."""
    return dense_k1 if dense_k1 is not None and profile["group_size"] >= DENSE else k1


__all__ = ["DENSE", "GRAPH_NEIGHBOURS", "OFF", "ON", "QUERY_NEIGHBOURS", "adaptive_k1", "candidate_strengths",
           "gallery_rerank_profile", "gallery_rerank_profile_of", "graph_counts", "neighbour_counts",
           "profile_of_counts", "query_strengths", "strength"]
