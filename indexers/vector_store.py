"""The exact vectors of an index version, on disk: ``vectors-<first id>.npy`` segments in Faiss-id order.

Written once per build step (a full build writes one segment per part, a nightly one per new
part), never modified, so later versions hard-link them. They serve what a compressed or
memory-mapped index cannot: re-ranking a PQ shortlist with exact inner products, exact
ground truth for calibration and for the kNN-graph drift check, and sampled rows — without
re-reading the Parquet shards and without holding the gallery in memory. Stored in the shards'
own dtype (float16 shards give a float16 store: half the disk), always handed out as float32.
"""

from __future__ import annotations

import os
from pathlib import Path

import faiss
import numpy as np

from reidx.pipeline.embedding_table import as_float32

DEFAULT_SCAN_ROWS = 131072  # rows per block of an exact scan: 256 MiB of float32 × 512 (plus the read)


def segment_name(first_id: int) -> str:
    return f"vectors-{first_id:012d}.npy"


class SegmentWriter:
    """Append rows to one .npy segment whose final shape is known up front; plain writes, fsynced on close."""

    def __init__(self, path: Path, rows: int, dim: int, dtype):
        self.path, self.rows, self.written = Path(path), rows, 0
        self.dtype, self.shape = np.dtype(dtype), (rows, dim)
        self.file = open(self.path, "wb")
        np.lib.format.write_array_header_1_0(self.file, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                         "fortran_order": False, "shape": (rows, dim)})

    def write(self, vectors: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(vectors, self.dtype).tobytes())
        self.written += len(vectors)

    def close(self) -> None:
        if self.written != self.rows:
            raise ValueError(f"{self.path}: {self.written} rows written, {self.rows} announced")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def _header(path: Path) -> tuple[tuple[int, int], np.dtype, int]:
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
        return shape, dtype, f.tell()


class VectorStore:
    """The segments of one version folder, as one (N, D) array addressed by Faiss id."""

    def __init__(self, folder: Path, first_ids: list[int]):
        self.folder = Path(folder)
        self.paths = [self.folder / segment_name(i) for i in first_ids]
        headers = [_header(p) for p in self.paths]
        self.counts = np.array([h[0][0] for h in headers], np.int64)
        base = int(first_ids[0]) if len(first_ids) else 0
        self.starts = (base + np.concatenate([[0], np.cumsum(self.counts)])).astype(np.int64)
        if list(self.starts[:-1]) != [int(i) for i in first_ids]:
            raise ValueError(f"{folder}: vector segments do not tile the ids")
        self.dim = int(headers[0][0][1]) if headers else 0
        self.dtype = headers[0][1] if headers else np.dtype(np.float32)
        self.offsets = [h[2] for h in headers]
        self._maps: dict[int, np.ndarray] = {}

    @property
    def count(self) -> int:
        """One past the last id held (the store of a version holds ids 0..count-1)."""
        return int(self.starts[-1])

    def _map(self, segment: int) -> np.ndarray:
        if segment not in self._maps:
            self._maps[segment] = np.load(self.paths[segment], mmap_mode="r")
        return self._maps[segment]

    def release(self) -> None:
        """Unmap the segments: the pages ``get`` touched stop counting in this process's resident memory."""
        self._maps.clear()

    def get(self, ids: np.ndarray) -> np.ndarray:
        """float32 rows of the given ids (any shape; -1 gives zeros), gathered from the mapped segments."""
        ids = np.asarray(ids, np.int64)
        flat = ids.reshape(-1)
        out = np.zeros((len(flat), self.dim), np.float32)
        segment = np.searchsorted(self.starts, flat, side="right") - 1
        for s in np.unique(segment[flat >= 0]):
            pick = (segment == s) & (flat >= 0)
            rows = flat[pick] - self.starts[s]
            order = np.argsort(rows, kind="stable")  # sorted gathers touch pages in order
            out[np.flatnonzero(pick)[order]] = as_float32(self._map(int(s))[rows[order]])
        return out.reshape(*ids.shape, self.dim)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1 as float32, with plain reads (no mapping: scans stay out of resident memory)."""
        parts = []
        for s in range(len(self.paths)):
            lo, hi = max(start, self.starts[s]), min(stop, self.starts[s + 1])
            if lo >= hi:
                continue
            with open(self.paths[s], "rb") as f:
                f.seek(self.offsets[s] + int(lo - self.starts[s]) * self.dim * self.dtype.itemsize)
                parts.append(np.fromfile(f, self.dtype, int(hi - lo) * self.dim).reshape(-1, self.dim))
        if not parts:
            return np.zeros((0, self.dim), np.float32)
        return as_float32(parts[0] if len(parts) == 1 else np.concatenate(parts))

    def iter_blocks(self, rows: int = DEFAULT_SCAN_ROWS, start: int | None = None, stop: int | None = None):
        """Yield ``(first id, float32 block)`` over ids start..stop-1 (default: all the store holds)."""
        start = int(self.starts[0]) if start is None else start
        stop = self.count if stop is None else stop
        for first in range(start, stop, rows):
            yield first, self.read(first, min(stop, first + rows))


def exact_search(store: VectorStore, queries: np.ndarray, k: int, rows: int = DEFAULT_SCAN_ROWS,
                 start: int | None = None, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product over the store's ids start..stop-1 (default: all), one block in
    memory at a time: (cosine distances (Q, k), ids (Q, k)), id -1 where it holds fewer than k."""
    queries = np.ascontiguousarray(queries, np.float32)
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for first, block in store.iter_blocks(rows, start=start, stop=stop):
        sims, found = faiss.knn(queries, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(sims, np.where(found >= 0, found + first, -1))
    heap.finalize()
    distances = 1.0 - heap.D
    distances[heap.I < 0] = np.inf
    return distances.astype(np.float32), heap.I


def link_or_copy(source: Path, target: Path) -> None:
    """Share an immutable file with a later version (hard link; a copy where links are not possible)."""
    try:
        os.link(source, target)
    except OSError:
        import shutil

        shutil.copy2(source, target)
