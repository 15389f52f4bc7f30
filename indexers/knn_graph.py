"""The gallery's kNN graph: each item's k nearest gallery items, stored beside the index for re-ranking.

Row ``i`` holds item ``i`` itself first (distance 0), then its nearest others by cosine
distance; missing slots are id -1 at distance inf. Stored as layers of .npy files in each index
version (:mod:`reidx.indexers.knn_store`); versions built before issue 12 have ``knn.parquet``
(columns ``faiss_id``, ``neighbour_ids``, ``cosine_distances``, fixed-size lists), still read.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reidx.indexers.faiss_ops import search

def knn_rows(search_fn, vectors: np.ndarray, own: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each vector's row: itself first at distance 0 (duplicates could otherwise push it down), then
    its k-1 nearest other indexed items as ``search_fn(vectors, k)`` finds them (any index, any
    re-ranking); missing slots are id -1 at distance inf. Vectorised: no per-row Python."""
    own = np.asarray(own, np.int64)
    found_d, found = search_fn(vectors, k + 1)
    keep = (found != own[:, None]) & (found >= 0)
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k - 1]  # kept ones first, in rank order
    ids = np.full((len(own), k), -1, np.int64)
    dist = np.full((len(own), k), np.inf, np.float32)
    ids[:, 0], dist[:, 0] = own, 0.0
    width = order.shape[1]
    valid = np.take_along_axis(keep, order, 1)
    ids[:, 1:1 + width] = np.where(valid, np.take_along_axis(found, order, 1), -1)
    dist[:, 1:1 + width] = np.where(valid, np.take_along_axis(found_d, order, 1), np.inf)
    return ids, dist


def knn_graph(index: faiss.Index, vectors: np.ndarray, first_id: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ids first_id..first_id+len(vectors)-1 from a Faiss index (see :func:`knn_rows`)."""
    return knn_rows(lambda v, kk: search(index, v, kk), vectors, np.arange(first_id, first_id + len(vectors)), k)


def merge_rows(ids: np.ndarray, dist: np.ndarray, own: np.ndarray, cand_ids: np.ndarray,
               cand_dist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows (m, k) merged with candidates (m, c): self first, then by distance, missing last;
    on equal distances the row's older entries stay ahead (stable)."""
    k = ids.shape[1]
    merged_ids = np.concatenate([ids, cand_ids], axis=1)
    merged_d = np.concatenate([dist, cand_dist], axis=1).astype(np.float32)
    keys = np.where(merged_ids == own[:, None], -1.0, np.where(merged_ids < 0, np.inf, merged_d))
    best = np.argsort(keys, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(merged_ids, best, axis=1), np.take_along_axis(merged_d, best, axis=1)


REVERSE_BLOCK_ROWS = 1 << 18  # old rows merged at a time (≈ 100 MB per array of k = 30 rows)


def reverse_edges(lookup, new_ids: np.ndarray, new_dist: np.ndarray, first_new: int,
                  block_rows: int = REVERSE_BLOCK_ROWS):
    """The old items' rows after adding items first_new..: each new item's row (from the ANN
    search that gave its own neighbours) names old items near it; by symmetry of the distance, the
    new item belongs in such an old item's row if it is closer than that row's current k-th.

    ``lookup(rows) -> (ids, dist)`` reads old rows (only the touched ones are read); yields
    (old item ids, their new rows, distances) for the rows that changed, in blocks of at most
    ``block_rows`` touched rows, ids ascending across blocks (memory: the new rows' edges plus one
    block, not every touched row at once). No old vector is read and no exact old × new search is
    run: cost O(new · k). What the ANN search missed is what the drift check measures
    (:func:`graph_recall`).
    """
    k = new_ids.shape[1]
    owners = np.broadcast_to(new_ids[:, :1], new_ids.shape)
    pick = (new_ids >= 0) & (new_ids < first_new)
    targets, sources, dists = new_ids[pick], owners[pick], new_dist[pick]
    if not len(targets):
        return
    order = np.lexsort((sources, dists, targets))  # by target, then distance, then new id
    targets, sources, dists = targets[order], sources[order], dists[order]
    del order
    rows, starts, counts = np.unique(targets, return_index=True, return_counts=True)
    for first in range(0, len(rows), block_rows):
        block = slice(first, first + block_rows)
        lo = int(starts[first])
        hi = int(starts[first + block_rows]) if first + block_rows < len(rows) else len(targets)
        yield _merge_block(lookup, rows[block], starts[block] - lo, counts[block], sources[lo:hi], dists[lo:hi], k)


def _merge_block(lookup, rows, starts, counts, sources, dists, k):
    """One block of :func:`reverse_edges`: each row's k closest new candidates merged into it."""
    rank = np.arange(len(sources)) - np.repeat(starts, counts)
    keep = rank < k  # a row can take at most k new neighbours
    cand_ids = np.full((len(rows), k), -1, np.int64)
    cand_d = np.full((len(rows), k), np.inf, np.float32)
    slot = np.repeat(np.arange(len(rows)), counts)[keep]
    cand_ids[slot, rank[keep]], cand_d[slot, rank[keep]] = sources[keep], dists[keep]
    old_ids, old_d = lookup(rows)
    ids, dist = merge_rows(old_ids, old_d, rows, cand_ids, cand_d)
    changed = (ids != old_ids).any(axis=1)
    return rows[changed], ids[changed], dist[changed]


def graph_recall(rows_ids: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean fraction of the exact top-k (self included, as rows are) that the stored rows hold."""
    k = min(k, truth.shape[1], rows_ids.shape[1])
    hits = [len(np.intersect1d(r[:k][r[:k] >= 0], t[:k][t[:k] >= 0])) for r, t in zip(rows_ids, truth)]
    return float(np.mean(hits) / k) if hits else 1.0


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
