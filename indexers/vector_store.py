"""The exact vectors of an index version, on disk: ``vectors-<first id>.npy`` segments in Faiss-id order.

Written once per build step (a full build writes one segment per part, a nightly one per new
part), never modified, so later versions hard-link them. They serve what a compressed or
memory-mapped index cannot: re-ranking a PQ shortlist with exact inner products, exact
ground truth for calibration and for the kNN-graph drift check, and sampled rows — without
re-reading the Parquet shards and without holding the gallery in memory. Stored in the shards'
own dtype (float16 shards give a float16 store: half the disk), always handed out as float32.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import faiss
import numpy as np

from reidx.pipeline.embedding_table import as_float32

DEFAULT_SCAN_ROWS = 131072  # rows per block of an exact scan: 256 MiB of float32 × 512 (plus the read)
GATHER_WINDOW_BYTES = 64 << 20  # a gather maps this much of a segment at a time, then drops its pages
FOLIO_MARGIN = 2 << 20  # a dropped window is widened by this much each side: a PMD-sized folio


def segment_name(first_id: int) -> str:
    return f"vectors-{first_id:012d}.npy"


class SegmentWriter:
    """Append rows to one .npy segment; plain writes, fsynced on close.

    ``rows``: the final count, announced in the header up front (close checks it), or None when
    it is known only at the end (a header with room for any count, rewritten on close)."""

    def __init__(self, path: Path, rows: int | None, dim: int, dtype):
        self.path, self.rows, self.written = Path(path), rows, 0
        self.dtype, self.shape = np.dtype(dtype), (rows, dim)
        self.file = open(self.path, "wb")
        # an unknown count reserves room for any count; a known one gets numpy's own header size
        self.header_bytes = len(_npy_header(self.dtype, (1 << 62 if rows is None else rows, dim)))
        self.file.write(_npy_header(self.dtype, (rows or 0, dim), self.header_bytes))

    def write(self, vectors: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(vectors, self.dtype).tobytes())
        self.written += len(vectors)

    def close(self) -> None:
        if self.rows is None:
            self.file.seek(0)
            self.file.write(_npy_header(self.dtype, (self.written, self.shape[1]), self.header_bytes))
        elif self.written != self.rows:
            raise ValueError(f"{self.path}: {self.written} rows written, {self.rows} announced")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def _npy_header(dtype: np.dtype, shape: tuple[int, int], length: int | None = None) -> bytes:
    """A version-1.0 .npy header for this dtype and shape, space-padded to ``length`` bytes
    (default: the next multiple of 64, as numpy writes it)."""
    text = "{'descr': %r, 'fortran_order': False, 'shape': (%d, %d), }" % (
        np.lib.format.dtype_to_descr(dtype), *shape)
    used = 10 + len(text) + 1  # magic and version (8), length (2), text, newline
    length = -(-used // 64) * 64 if length is None else length
    if used > length:
        raise ValueError(f"a header of {used} bytes does not fit in {length}")
    text += " " * (length - used) + "\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode("latin1")


def _header(path: Path) -> tuple[tuple[int, int], np.dtype, int]:
    """(shape, dtype, data offset) of a C-ordered .npy file (every reader here assumes that order)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read(f)
        if fortran_order:
            raise ValueError(f"{path}: a C-ordered array expected, found a Fortran-ordered one")
        return shape, dtype, f.tell()


class MappedRows:
    """The rows of one 2-D .npy file, memory-mapped read-only, gathered window by window.

    ``take(rows)`` returns copies; after each GATHER_WINDOW_BYTES of the file its pages are
    dropped from this process (``madvise(MADV_DONTNEED)``; they stay in the page cache). Why: a
    fault on a file mapping maps a whole large folio of the page cache (Linux 6.x), so 1,000
    random rows of a 256 MB segment left 206 MB resident, and the graph step's shortlists, spread
    over every segment, could make the whole store resident between two releases (10 GB at 10M
    float16 × 512). A gather now adds at most one window (plus a folio) to resident memory,
    whatever the file's size; its time is unchanged (``benchmarks/gather.py``).
    """

    def __init__(self, path: Path):
        shape, self.dtype, self.offset = _header(Path(path))
        if len(shape) not in (1, 2):
            raise ValueError(f"{path}: a C-ordered 1-D or 2-D array expected, found shape {shape}")
        self.shape = (shape[0], shape[1] if len(shape) == 2 else 1)
        self.row_bytes = self.shape[1] * self.dtype.itemsize
        with open(path, "rb") as f:
            self.mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.array = np.frombuffer(self.mapping, self.dtype, self.shape[0] * self.shape[1], self.offset).reshape(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows (0 ≤ row < len, any order) as a new (len(rows), width) array of the file's dtype."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        out = np.empty((len(rows), self.shape[1]), self.dtype)
        if not len(rows):
            return out
        if np.all(rows[1:] >= rows[:-1]):  # sorted already (lookups of unique rows): no argsort
            where = None
        else:
            where = np.argsort(rows, kind="stable")  # sorted gathers touch pages in order
            rows = rows[where]
        if rows[0] < 0 or rows[-1] >= self.shape[0]:
            raise IndexError(f"rows {rows[0]}..{rows[-1]} asked of a file of {self.shape[0]}")
        window = (self.offset + rows * self.row_bytes) // GATHER_WINDOW_BYTES
        cuts = np.concatenate([[0], np.flatnonzero(np.diff(window)) + 1, [len(rows)]])
        for a, b in zip(cuts[:-1], cuts[1:]):
            out[slice(a, b) if where is None else where[a:b]] = self.array[rows[a:b]]
            self._drop_window(int(window[a]))
        return out

    def slice(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1, copied, their pages dropped."""
        out = np.array(self.array[start:stop])
        if len(out):
            self._drop(self.offset + start * self.row_bytes, self.offset + (start + len(out)) * self.row_bytes)
        return out

    def _drop_window(self, window: int) -> None:
        """The window's pages, and a large folio's worth either side (what a fault there may have
        mapped beyond it)."""
        self._drop(window * GATHER_WINDOW_BYTES - FOLIO_MARGIN, (window + 1) * GATHER_WINDOW_BYTES + FOLIO_MARGIN)

    def _drop(self, start: int, stop: int) -> None:
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        low = max(0, start - start % mmap.PAGESIZE)
        high = min(len(self.mapping), -(-stop // mmap.PAGESIZE) * mmap.PAGESIZE)
        if high > low:
            self.mapping.madvise(mmap.MADV_DONTNEED, low, high - low)


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
        self._maps: dict[int, MappedRows] = {}

    @property
    def count(self) -> int:
        """One past the last id held (the store of a version holds ids 0..count-1)."""
        return int(self.starts[-1])

    def _map(self, segment: int) -> MappedRows:
        if segment not in self._maps:
            self._maps[segment] = MappedRows(self.paths[segment])
        return self._maps[segment]

    def release(self) -> None:
        """Unmap the segments (each gather already drops its pages; this closes the maps)."""
        self._maps.clear()

    def get(self, ids: np.ndarray) -> np.ndarray:
        """float32 rows of the given ids (any shape; -1 gives zeros), gathered from the mapped
        segments window by window (:class:`MappedRows`: resident memory stays bounded)."""
        ids = np.asarray(ids, np.int64)
        flat = ids.reshape(-1)
        out = np.zeros((len(flat), self.dim), np.float32)
        segment = np.searchsorted(self.starts, flat, side="right") - 1
        for s in np.unique(segment[flat >= 0]):
            pick = np.flatnonzero((segment == s) & (flat >= 0))
            out[pick] = as_float32(self._map(int(s)).take(flat[pick] - self.starts[s]))
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
