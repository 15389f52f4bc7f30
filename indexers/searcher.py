"""Open a version folder's index for search: flat in memory, IVF memory-mapped, PQ re-ranked from disk.

One object for every process that searches a version — the query command, the kNN-graph step
of a build, and each Dask worker of a bulk query — so they all search the same way. Opened
searchers are cached per process (a Dask worker opens a version once for all its tasks).
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from reidx.indexers.faiss_ops import search, set_nprobe
from reidx.indexers.ivf_ondisk import open_ivf, release_pages
from reidx.indexers.vector_store import VectorStore

FIRST_CHUNK_ROWS = 16  # a bounded search's first chunk, which measures what a query leaves resident
REFINE_MIN_SHORTLIST = 100  # small k (graph rows of 6) still re-rank a useful shortlist
_CACHE: dict[tuple, "Searcher"] = {}
_CACHE_SIZE = 4


class Searcher:
    """``search(vectors, k, nprobe)`` → (cosine distances, ids) over one version's files.

    ``layout`` is the version's meta.json as a dict (``type``, ``ivf_files``, ``vector_segments``,
    ``nprobe``, ``refine_factor``); with a refine factor, the index's top ``refine_factor × k``
    are re-scored with exact inner products against the vectors on disk.
    """

    def __init__(self, folder: Path, layout: dict, resident_bytes: int | None = None):
        self.folder, self.layout = Path(folder), layout
        self.resident_bytes = resident_bytes
        self._mapped = None
        if layout["type"] == "flat" or not layout.get("ivf_files"):
            self.index = faiss.read_index(str(self.folder / "index.faiss"))
        else:
            self._mapped = open_ivf([self.folder / f for f in layout["ivf_files"]])
            self.index = self._mapped.index
        self.nprobe = layout.get("nprobe")
        quantizer = None if self._mapped is None else faiss.extract_index_ivf(self.index).quantizer
        self.flat_quantizer = quantizer is not None and isinstance(faiss.downcast_index(quantizer), faiss.IndexFlat)
        self.refine_factor = layout.get("refine_factor") or 0
        segments = layout.get("vector_segments") or []
        self.store = VectorStore(self.folder, segments) if segments else None

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(self, vectors: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """With ``resident_bytes`` (a build's calibration), queries go in chunks whose mapped list
        pages are released after each (:func:`ivf_ondisk.release_pages`), and each chunk is sized
        from the resident growth *measured* on the previous one: a fault maps a whole large folio
        (or a fault-around block), so the bytes of the lists a chunk probes understate what it
        leaves resident, and chunks sized from list sizes overshot the bound. The results are the
        same (each query is searched alone: per-query SIMD or HNSW coarse search)."""
        vectors = np.ascontiguousarray(vectors, np.float32)
        if not self.resident_bytes or self._mapped is None or len(vectors) <= FIRST_CHUNK_ROWS:
            return self._search(vectors, k, nprobe)
        parts, start, rows = [], 0, FIRST_CHUNK_ROWS
        self.chunk_rows = []  # the chunks' sizes, for the record
        while start < len(vectors):
            self.chunk_rows.append(rows)
            before = mapped_resident_bytes()
            parts.append(self._search(vectors[start:start + rows], k, nprobe))
            after = mapped_resident_bytes()
            self.release()
            start += rows
            if before is None or after is None:  # no /proc: sized from the lists' bytes
                rows = self._estimated_chunk_rows(nprobe or self.nprobe)
            else:
                # per-row growth of a smaller chunk overstates a larger one's (lists are shared): safe
                rows = max(1, min(4 * rows, int(self.resident_bytes * rows // max(1, after - before))))
        return np.concatenate([d for d, _ in parts]), np.concatenate([i for _, i in parts])

    def _estimated_chunk_rows(self, nprobe: int | None) -> int:
        ivf = faiss.extract_index_ivf(self.index)
        list_bytes = max(1.0, ivf.ntotal * (ivf.code_size + 8) / ivf.nlist)
        return max(1, int(self.resident_bytes // ((nprobe or 1) * list_bytes)))

    def release(self) -> None:
        """The mapped lists' (and stored vectors') pages out of this process's resident memory."""
        release_pages([self.folder / f for f in self.layout.get("ivf_files") or []])
        if self.store is not None:
            self.store.release()

    def _search(self, vectors: np.ndarray, k: int, nprobe: int | None) -> tuple[np.ndarray, np.ndarray]:
        set_nprobe(self.index, nprobe or self.nprobe)
        with thread_independent(self.flat_quantizer):
            if not self.refine_factor or self.store is None:
                return search(self.index, vectors, k)
            _, shortlist = search(self.index, vectors, max(k * self.refine_factor, REFINE_MIN_SHORTLIST))
        return refine(self.store, vectors, shortlist, k)


class thread_independent:
    """Inner products without BLAS: while searching an IVF index with a flat quantizer, and in
    the graph codes' coarse steps (``indexers.graph_codes``).

    Faiss computes a batch's query-centroid products with BLAS, whose last bits depend on its
    thread count; IVF distances include that product, so a Dask worker (1 thread) and the driver
    (all cores) ordered near-ties differently (3 graph rows in 24,000, at 1e-7). Faiss' own SIMD
    path is per query and thread-independent: every process then returns the same results, however
    the queries are batched. (Coarse BLAS on one thread was tried: thread-independent, but a row's
    result then depended on the batch it came in — bulk queries cut into chunks differed.)
    """

    def __init__(self, active: bool = True):
        self.active = active

    def __enter__(self):
        if self.active:
            self.saved = faiss.cvar.distance_compute_blas_threshold
            faiss.cvar.distance_compute_blas_threshold = 1 << 30

    def __exit__(self, *exc):
        if self.active:
            faiss.cvar.distance_compute_blas_threshold = self.saved


def refine(store: VectorStore, queries: np.ndarray, shortlist: np.ndarray, k: int,
           batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank each query's shortlist by exact inner product with its stored vectors; top-k."""
    k = min(k, shortlist.shape[1])
    distances = np.empty((len(queries), k), np.float32)
    ids = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), batch):
        rows = shortlist[start:start + batch]
        sims = np.einsum("qd,qkd->qk", queries[start:start + batch], store.get(rows))
        sims[rows < 0] = -np.inf
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        ids[start:start + batch] = np.take_along_axis(rows, order, 1)
        distances[start:start + batch] = 1.0 - np.take_along_axis(sims, order, 1)
    distances[ids < 0] = np.inf
    return distances, ids


def mapped_resident_bytes() -> int | None:
    """This process's resident pages of mapped files (``RssFile`` + ``RssShmem``: files on tmpfs
    count as the latter); None where /proc does not say."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("RssFile:", "RssShmem:")))
        return sum(int(v.split()[0]) * 1024 for v in fields.values()) if len(fields) == 2 else None
    except OSError:
        return None


def open_searcher(folder: Path, layout: dict) -> Searcher:
    """A cached Searcher for this folder and file list (the files of a version never change)."""
    key = (str(folder), layout["type"], tuple(layout.get("ivf_files") or ()),
           tuple(layout.get("vector_segments") or ()), layout.get("refine_factor"))
    if key not in _CACHE:
        while len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = Searcher(Path(folder), layout)
    searcher = _CACHE[key]
    searcher.nprobe = layout.get("nprobe")
    return searcher
