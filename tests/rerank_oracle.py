"""Naive, loop-by-loop re-ranking: the published steps written for clarity, never for speed.

This is the reference the fast code in ``indexers.rerank`` is tested and benchmarked against.
It follows the papers' definitions one item at a time (k-reciprocal: Zhong et al., CVPR 2017;
SIM: Jia et al., IJCAI 2020) with plain NumPy and Python loops, so a reader can check each
step against the paper. Ties between equal distances are broken by item index (stable sort),
the same rule the fast code uses. Cost is roughly cubic: use it on small inputs only.
"""

from __future__ import annotations

import numpy as np


def normalised_squared(distances: np.ndarray) -> np.ndarray:
    """Square, divide each column by its maximum, transpose (the published normalisation)."""
    squared = np.asarray(distances, np.float32) ** 2
    maxima = squared.max(axis=0)
    return (squared / np.where(maxima > 0, maxima, np.float32(1))).T  # an all-zero column stays 0


def rank_lists(distances: np.ndarray) -> list[np.ndarray]:
    """For every row, all column indices from nearest to farthest (ties by index)."""
    return [np.argsort(row, kind="stable") for row in distances]


def k_reciprocal_set(ranks: list[np.ndarray], item: int, k: int) -> list[int]:
    """R(item, k): item's k+1 nearest whose own k+1 nearest include item."""
    return [int(c) for c in ranks[item][: k + 1] if item in ranks[c][: k + 1]]


def expanded_k_reciprocal_set(ranks: list[np.ndarray], item: int, k1: int) -> list[int]:
    """R(item, k1) plus every R(c, round(k1/2)) of a member c that mostly lies inside it (> 2/3)."""
    reciprocal = k_reciprocal_set(ranks, item, k1)
    expanded = set(reciprocal)
    for candidate in reciprocal:
        half_set = k_reciprocal_set(ranks, candidate, int(round(k1 / 2)))
        if len(set(half_set) & set(reciprocal)) > 2.0 / 3.0 * len(half_set):
            expanded |= set(half_set)
    return sorted(expanded)


def gaussian_row(distance_row: np.ndarray, members: list[int], width: int) -> np.ndarray:
    """V(i, ·): exp(−distance) on the members, zero elsewhere, normalised to sum 1."""
    row = np.zeros(width, np.float64)
    for member in members:
        row[member] = np.exp(-float(distance_row[member]))
    return row / row.sum() if row.sum() > 0 else row  # an empty set (only with many exact duplicates)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """1 − Σ min(a, b) / Σ max(a, b), the paper's definition."""
    union = np.maximum(a, b).sum()
    return 1.0 - np.minimum(a, b).sum() / union if union > 0 else 1.0


def naive_k_reciprocal_rerank(q_g, q_q, g_g, k1: int = 20, k2: int = 6, lambda_value: float = 0.3) -> np.ndarray:
    """Zhong et al.'s k-reciprocal re-ranking of a (Q, G) Euclidean distance matrix."""
    q_g, q_q, g_g = (np.asarray(d, np.float32) for d in (q_g, q_q, g_g))
    num_query, num_all = q_g.shape[0], q_g.shape[0] + q_g.shape[1]
    original = normalised_squared(np.block([[q_q, q_g], [q_g.T, g_g]]))
    ranks = rank_lists(original)

    vectors = np.zeros((num_all, num_all))
    for item in range(num_all):
        members = expanded_k_reciprocal_set(ranks, item, k1)
        vectors[item] = gaussian_row(original[item], members, num_all)

    if k2 != 1:  # local query expansion: average over the k2 nearest (the published code skips k2 = 1)
        expanded = np.zeros_like(vectors)
        for item in range(num_all):
            expanded[item] = np.mean([vectors[n] for n in ranks[item][:k2]], axis=0)
        vectors = expanded

    final = np.zeros(q_g.shape)
    for qi in range(num_query):
        for gi in range(q_g.shape[1]):
            jaccard_distance = jaccard(vectors[qi], vectors[num_query + gi])
            final[qi, gi] = (1 - lambda_value) * jaccard_distance + lambda_value * original[qi, num_query + gi]
    return final


GRAPH_TIE = 1e-4  # reidx's tie rule for SIM's graph distance: + GRAPH_TIE·d(q, j)


def naive_sim_graph_distance(q_g, g_g, lam: float = 0.01, k_graph: int = 20, k_mean: int = 9,
                             reciprocal: bool = False) -> np.ndarray:
    """SIM similarity-graph reasoning: d_S(q, j) = mean of the k_mean smallest d(q, t) + lam·d(t, j)
    over j's k_graph nearest gallery items t; every entry reads the original q-g distances; then
    + GRAPH_TIE·d(q, j), reidx's rule ordering exact ties by the plain distance. ``reciprocal``
    (reidx's variant): a t whose own k_graph nearest leave out j gives the path d(q, j) instead."""
    q_g = np.asarray(q_g, np.float32)
    scaled_g_g = np.asarray(g_g, np.float32) * np.float32(lam)
    graph = np.zeros(q_g.shape, np.float32)
    lists = [np.argsort(scaled_g_g[gj], kind="stable")[:k_graph] for gj in range(q_g.shape[1])]
    for gj in range(q_g.shape[1]):
        neighbours = lists[gj]
        for qi in range(q_g.shape[0]):
            paths = sorted(float(q_g[qi, t] + scaled_g_g[gj, t]) if not reciprocal or gj in lists[t]
                           else float(q_g[qi, gj]) for t in neighbours)
            graph[qi, gj] = np.mean(paths[:k_mean])
    return graph + np.float32(GRAPH_TIE) * q_g


def naive_sim_rerank(q_g, g_g, lam: float = 0.01, k_graph: int = 20, k_mean: int = 9,
                     k0: int = 12, k1: int = 20, lambda_value: float = 0.3, reciprocal: bool = False) -> np.ndarray:
    """Full SIM: graph reasoning, then mutual-nearest-neighbour reasoning on its output."""
    graph = naive_sim_graph_distance(q_g, g_g, lam, k_graph, k_mean, reciprocal)
    num_query, num_gallery = graph.shape
    # The joint matrix has only gallery columns: [d_S; g_g] over the query and gallery rows.
    original = normalised_squared(np.concatenate([graph.T, np.asarray(g_g, np.float32)], axis=1))
    query_original, gallery_original = original[:num_query], original[num_query:]

    query_vectors = np.zeros((num_query, num_gallery))
    for qi in range(num_query):  # query side: the plain k0+1 nearest gallery items
        nearest = np.argsort(query_original[qi], kind="stable")[: k0 + 1]
        query_vectors[qi] = gaussian_row(query_original[qi], list(nearest), num_gallery)

    gallery_ranks = rank_lists(gallery_original)
    gallery_vectors = np.zeros((num_gallery, num_gallery))
    for gi in range(num_gallery):  # gallery side: expanded k-reciprocal sets, no query expansion
        members = expanded_k_reciprocal_set(gallery_ranks, gi, k1)
        gallery_vectors[gi] = gaussian_row(gallery_original[gi], members, num_gallery)

    final = np.zeros(graph.shape)
    for qi in range(num_query):
        for gi in range(num_gallery):
            jaccard_distance = jaccard(query_vectors[qi], gallery_vectors[gi])
            final[qi, gi] = (1 - lambda_value) * jaccard_distance + lambda_value * query_original[qi, gi]
    return final
