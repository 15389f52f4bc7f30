"""Candidate lists by brute force, and the scalable re-ranking as `reidx query` ranks with it:
for evaluation, tests and benchmarks on galleries small enough to list exactly (a large
gallery's lists come from its Faiss index and stored kNN graph, :mod:`reidx.indexers.query`).
"""

from __future__ import annotations

import numpy as np
import torch

from reidx.indexers.distances import unit_euclidean
from reidx.indexers.rerank import RerankParams
from reidx.indexers.rerank_blocks import chunks
from reidx.indexers.rerank_sparse import rerank_candidates


def nearest_lists(query: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each query row's k nearest gallery rows by brute force: (ids int64, Euclidean distances
    between the unit rows) ascending, as a Faiss flat index gives them. For evaluation and tests,
    in row chunks of about CHUNK_ELEMENTS distances; a large gallery's lists come from its index."""
    ids, dist = [], []
    for rows in chunks(len(query), len(gallery)):
        distances = torch.from_numpy(unit_euclidean(query[rows], gallery))
        values, index = torch.topk(distances, min(k, distances.shape[1]), dim=1, largest=False)
        ids.append(index.numpy())
        dist.append(values.numpy())
    return np.concatenate(ids), np.concatenate(dist)


def rerank_features_scalable(method: str, query: np.ndarray, gallery: np.ndarray, params: RerankParams | None = None,
                             top_k: int = 400, knn: int = 30) -> np.ndarray:
    """(Q, G) distances as `reidx query` ranks: each query's top_k candidates re-ranked by the
    scalable mode (knn-wide gallery graph), every other gallery item after them in plain order.
    Lists by brute force, so evaluation can measure what the query path gives."""
    ids, dist = nearest_lists(query, gallery, top_k)
    graph_ids, graph_dist = nearest_lists(gallery, gallery, knn)
    reranked = rerank_candidates(method, ids, dist, graph_ids, graph_dist, params,
                                 max_distance=estimate_max_distance(query, gallery))
    ranked = unit_euclidean(query, gallery) + (float(reranked.max()) + 1.0)  # after every candidate
    np.put_along_axis(ranked, ids, reranked, 1)
    return ranked


def estimate_max_distance(query: np.ndarray, gallery: np.ndarray, sample: int = 4096, seed: int = 0) -> float:
    """Median over the queries of their farthest distance to a random sample of gallery rows: the
    row normaliser (approximation 3 in the module doc) for rows that do not list the whole gallery."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(gallery), min(sample, len(gallery)), replace=False)
    similarity = np.asarray(query, np.float32) @ np.asarray(gallery, np.float32)[np.sort(rows)].T
    farthest = np.sqrt(np.maximum(2.0 - 2.0 * similarity.min(axis=1), 0.0))
    return float(np.median(farthest))
