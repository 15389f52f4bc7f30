"""The gallery's kNN graph: each item's k nearest gallery items, stored beside the index for re-ranking.

Row ``i`` holds item ``i`` itself first (distance 0), then its nearest others by cosine
distance; missing slots are id -1 at distance inf. Stored as ``knn.parquet`` in each index
version (columns ``faiss_id``, ``neighbour_ids``, ``cosine_distances``, fixed-size lists).
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reidx.indexers.faiss_ops import search

def knn_graph(index: faiss.Index, vectors: np.ndarray, first_id: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each vector's k nearest indexed items, itself first at distance 0 (duplicates could otherwise
    push it down); rows for ids first_id.. first_id+len(vectors)-1. Missing slots are id -1, inf."""
    found_d, found = search(index, vectors, k + 1)
    own = np.arange(first_id, first_id + len(vectors))[:, None]
    ids = np.full((len(vectors), k), -1, np.int64)
    dist = np.full((len(vectors), k), np.inf, np.float32)
    ids[:, 0], dist[:, 0] = own[:, 0], 0.0
    for row in range(len(vectors)):
        keep = (found[row] != own[row, 0]) & (found[row] >= 0)
        others, others_d = found[row][keep][:k - 1], found_d[row][keep][:k - 1]
        ids[row, 1:1 + len(others)], dist[row, 1:1 + len(others)] = others, others_d
    return ids, dist


def merge_new_neighbours(ids: np.ndarray, dist: np.ndarray, old_vectors: np.ndarray, new_vectors: np.ndarray,
                         first_new: int) -> tuple[np.ndarray, np.ndarray]:
    """After adding items first_new.., put into each old item's list the new items closer than its
    current k-th neighbour; returns the updated (ids, distances) of the old items.

    The candidates come from an exact search of the old vectors against the new ones only, so an
    incremental graph equals one rebuilt from scratch up to the index's own search approximation.
    Cost O(old × new), small beside retraining while nightly additions stay a fraction of the
    gallery (past RETRAIN_GROWTH the whole index is rebuilt anyway).
    """
    k = ids.shape[1]
    sims, found = faiss.knn(np.ascontiguousarray(old_vectors, np.float32), np.ascontiguousarray(new_vectors, np.float32),
                            min(k, len(new_vectors)), metric=faiss.METRIC_INNER_PRODUCT)
    merged_ids = np.concatenate([ids, np.where(found >= 0, found + first_new, -1)], axis=1)
    merged_d = np.concatenate([dist, np.where(found >= 0, 1.0 - sims, np.inf)], axis=1).astype(np.float32)
    # self stays first (key -1), missing slots last; ties keep the older item (stable sort)
    keys = np.where(merged_ids == np.arange(len(ids))[:, None], -1.0, np.where(merged_ids < 0, np.inf, merged_d))
    best = np.argsort(keys, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(merged_ids, best, axis=1), np.take_along_axis(merged_d, best, axis=1)


def knn_table(ids: np.ndarray, dist: np.ndarray) -> pa.Table:
    k = ids.shape[1]
    if k == 0:  # no graph asked for (--knn 0): an empty table with the same columns
        ids, dist, k = np.zeros((0, 1), np.int64), np.zeros((0, 1), np.float32), 1
    return pa.table({
        "faiss_id": pa.array(np.arange(len(ids), dtype=np.int64)),
        "neighbour_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), k),
        "cosine_distances": pa.FixedSizeListArray.from_arrays(pa.array(dist.reshape(-1).astype(np.float32)), k),
    })


def read_knn(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(ids (N, k) int64, cosine distances (N, k) float32) of the stored gallery kNN graph."""
    table = pq.read_table(folder / "knn.parquet")
    if table.num_rows == 0:
        return np.zeros((0, 0), np.int64), np.zeros((0, 0), np.float32)
    k = table.schema.field("neighbour_ids").type.list_size
    # copies: Arrow's buffers are read-only, and callers (merging, torch re-ranking) need their own arrays
    ids = np.array(table["neighbour_ids"].combine_chunks().flatten().to_numpy().reshape(-1, k))
    dist = np.array(table["cosine_distances"].combine_chunks().flatten().to_numpy().reshape(-1, k))
    return ids, dist
