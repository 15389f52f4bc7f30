"""The gallery kNN graph on disk: layers of rows, later layers overriding earlier ones.

A layer is three .npy files ``knn-<n>.rows.npy`` (int64 item ids, ascending), ``.ids.npy`` (m, k)
int64 and ``.dist.npy`` (m, k) float32 (row layout: :mod:`reidx.indexers.knn_graph`). A full
build writes dense layers covering every item; a nightly adds a layer for its new items and a
sparse layer with the old items whose rows gained a new neighbour. Layers are never modified,
so a nightly hard-links the old ones and writes O(new) bytes; the graph of a version is its
meta.json's list of layers, read memory-mapped, so looking up rows never loads the graph.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from reidx.indexers.vector_store import MappedRows, SegmentWriter

PARTS = ("rows", "ids", "dist")


def layer_files(name: str) -> list[str]:
    return [f"{name}.{part}.npy" for part in PARTS]


class DenseLayerWriter:
    """A layer for consecutive rows first..first+count-1, written block by block (bounded memory)."""

    def __init__(self, folder: Path, name: str, first: int, count: int, k: int):
        self.name, self.next = name, first
        self.writers = [SegmentWriter(folder / f"{name}.rows.npy", count, 1, np.int64),
                        SegmentWriter(folder / f"{name}.ids.npy", count, k, np.int64),
                        SegmentWriter(folder / f"{name}.dist.npy", count, k, np.float32)]

    def write(self, ids: np.ndarray, dist: np.ndarray) -> None:
        rows = np.arange(self.next, self.next + len(ids), dtype=np.int64)[:, None]
        for writer, array in zip(self.writers, (rows, ids, dist)):
            writer.write(array)
        self.next += len(ids)

    def close(self) -> str:
        for writer in self.writers:
            writer.close()
        return self.name


class SparseLayerWriter:
    """A layer of ascending rows written block by block, its row count known only at the end."""

    def __init__(self, folder: Path, name: str, k: int):
        self.name, self.k, self.count, self.last = name, k, 0, -1
        self.writers = [SegmentWriter(folder / f"{name}.rows.npy", None, 1, np.int64),
                        SegmentWriter(folder / f"{name}.ids.npy", None, k, np.int64),
                        SegmentWriter(folder / f"{name}.dist.npy", None, k, np.float32)]

    def write(self, rows: np.ndarray, ids: np.ndarray, dist: np.ndarray) -> None:
        if len(rows) and (rows[0] <= self.last or np.any(np.diff(rows) <= 0)):
            raise ValueError(f"layer {self.name}: rows must ascend across blocks")
        if ids.shape != (len(rows), self.k) or dist.shape != (len(rows), self.k):
            raise ValueError(f"layer {self.name}: rows of {self.k} expected, got {ids.shape} and {dist.shape}")
        for writer, array in zip(self.writers, (np.asarray(rows, np.int64)[:, None], ids, dist)):
            writer.write(array)
        self.count += len(rows)
        self.last = int(rows[-1]) if len(rows) else self.last

    def close(self) -> str:
        for writer in self.writers:
            writer.close()
        return self.name


def _load(folder: Path, name: str) -> tuple[np.ndarray, MappedRows, MappedRows]:
    """A layer's row ids (mapped: binary-searched), its neighbours and distances (gathered by
    window, so a lookup of millions of rows does not make the layer resident)."""
    rows = np.load(folder / f"{name}.rows.npy", mmap_mode="r")
    return rows.reshape(-1), MappedRows(folder / f"{name}.ids.npy"), MappedRows(folder / f"{name}.dist.npy")


class KnnGraph:
    """A version's kNN graph: ``lookup(rows)`` reads only the rows asked for."""

    def __init__(self, folder: Path, layers: list[str], count: int, k: int):
        self.folder, self.layers, self.count, self.k = Path(folder), list(layers), count, k
        self._maps = [_load(self.folder, name) for name in self.layers]

    def lookup(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids (m, k), distances (m, k)) of the given item ids; -1 / inf where no layer holds a row."""
        rows = np.asarray(rows, np.int64)
        ids = np.full((len(rows), self.k), -1, np.int64)
        dist = np.full((len(rows), self.k), np.inf, np.float32)
        for layer_rows, layer_ids, layer_dist in self._maps:
            if not len(layer_rows):
                continue
            at = np.minimum(np.searchsorted(layer_rows, rows), len(layer_rows) - 1)
            hit = layer_rows[at] == rows
            if hit.any():
                ids[hit], dist[hit] = layer_ids.take(at[hit]), layer_dist.take(at[hit])
        return ids, dist

    def to_arrays(self, block: int = 1 << 20) -> tuple[np.ndarray, np.ndarray]:
        """The whole graph in memory (N, k): what re-ranking reads today (docs/scaling.md)."""
        ids = np.full((self.count, self.k), -1, np.int64)
        dist = np.full((self.count, self.k), np.inf, np.float32)
        for layer_rows, layer_ids, layer_dist in self._maps:
            for start in range(0, len(layer_rows), block):
                rows = np.asarray(layer_rows[start:start + block])
                ids[rows] = layer_ids.slice(start, start + block)
                dist[rows] = layer_dist.slice(start, start + block)
        return ids, dist

    def files(self) -> list[str]:
        return [f for name in self.layers for f in layer_files(name)]
