"""Distances between unit-length embeddings, in the two forms reidx uses — defined once.

Ranking uses cosine distance ``1 − q·g`` (Faiss' inner product on unit vectors). Re-ranking,
as published (Zhong et al.; Jia et al.), works on Euclidean distances, which for unit vectors
are ``‖q − g‖ = sqrt(2 − 2·q·g) = sqrt(2 · cosine distance)``.
"""

from __future__ import annotations

import numpy as np


def cosine_distances(query: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """(Q, G) 1 − q·g for L2-normalised rows, computed in float32 (the plain ranking)."""
    return 1.0 - np.asarray(query, np.float32) @ np.asarray(gallery, np.float32).T


def unit_euclidean(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(A, B) Euclidean distances between L2-normalised rows: sqrt(max(2 − 2·a·b, 0)), float32."""
    similarity = np.asarray(a, np.float32) @ np.asarray(b, np.float32).T
    return np.sqrt(np.maximum(2.0 - 2.0 * similarity, 0.0)).astype(np.float32)


def unit_euclidean_from_cosine(cosine_distance: np.ndarray) -> np.ndarray:
    """‖q − g‖ for unit vectors from given cosine distances 1 − q·g (e.g. Faiss search results)."""
    return np.sqrt(np.clip(2.0 * cosine_distance, 0.0, None)).astype(np.float32)
