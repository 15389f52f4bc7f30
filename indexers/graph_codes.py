"""The kNN-graph step's own search: compact codes in the index's lists, fast-scanned, refined exactly.

Every item of the gallery needs a graph row (its top k, 30), so at millions the graph step costs
more than the rest of a build. An IVF search of one row pays twice: choosing its lists (a coarse
search over every centroid) and scanning their codes. Both are cut here, for the rows of indexed
items only (queries keep the index's own search):

- **lists**: an indexed item's nearest centroids lie among the nearest centroids of the list it
  was added to. The candidates are that list's COARSE_NEIGHBOURS nearest centroids
  (``graph-coarse.npy``, computed once per training), ranked by the item's inner product with
  them: 128 inner products per row instead of a search over every centroid.
- **codes**: a second code of every vector, product quantisation with 4-d sub-vectors at 4 bits
  (dim/8 bytes), in the *same* lists (the add tasks fill both from one assignment,
  ``ivf_ondisk.add_part``), stored as ordinary IVF files (``graph-*.faiss``: written in parts,
  merged and stacked like the index's) and searched by Faiss' SIMD fast-scan, converted in
  memory (dim/8 + 8 bytes per vector); its shortlist of max(GRAPH_REFINE × k, 100) is re-scored
  exactly against the stored vectors.

Rows do not depend on the number of workers or on how rows are batched: the centroid ranking and
the refine are Faiss' SIMD inner products computed pair by pair (``fvec_inner_products_by_idx``,
no BLAS), and fast-scan distances are integer sums per query. Each vector's list is stored
(``lists-<first id>.npy``, int32, beside its vector segment). Measured: ``benchmarks/graph_step.py``.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from reidx.indexers.ivf_ondisk import open_ivf, template_bytes
from reidx.indexers.searcher import REFINE_MIN_SHORTLIST, thread_independent
from reidx.indexers.vector_store import VectorStore

GRAPH_TEMPLATE = "graph-template.faiss"  # trained, empty: nightly parts are copies of it
GRAPH_COARSE = "graph-coarse.npy"  # (nlist, COARSE_NEIGHBOURS) int32: each list's nearest centroids
GRAPH_BASE = "graph.faiss"
SUBVECTOR_DIMS = 4  # dims per 4-bit sub-quantizer: dim/8 bytes per vector
COARSE_NEIGHBOURS = 128
GRAPH_REFINE = 4  # the fast-scan shortlist is GRAPH_REFINE × k (at least REFINE_MIN_SHORTLIST)
TRAIN_POINTS = 65536  # 16 centroids per sub-quantizer need few points
ROWS_PER_STEP = 512  # rows searched per call; their distinct candidates (≤ 512 × 124) are decoded at once
RELEASE_ROWS = 8192  # the store's mapped pages are released after this many rows (≤ 8192 × 124 KB touched)
PROBES_KEPT = 32  # a nightly's add keeps each new item's nearest lists (probes-<first id>.npy) for its graph row


def supported(kind: str, dim: int, ivf_types) -> bool:
    """Graph codes exist for IVF indexes of a dimension that 4-d sub-vectors tile (an even count)."""
    return kind in ivf_types and dim % (2 * SUBVECTOR_DIMS) == 0


def lists_name(first_id: int) -> str:
    return f"lists-{first_id:012d}.npy"


def probes_name(first_id: int) -> str:
    return f"probes-{first_id:012d}.npy"


def train_graph_codes(template: bytes, sample: np.ndarray, seed: int) -> tuple[bytes, np.ndarray]:
    """(the graph codes' trained empty index, serialised; each list's nearest centroids) for the
    index ``template``: its centroids, a product quantizer trained on the residuals of up to
    TRAIN_POINTS sampled vectors."""
    index = faiss.deserialize_index(np.frombuffer(template, np.uint8))
    ivf = faiss.extract_index_ivf(index)
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    dim = centroids.shape[1]
    quantizer = faiss.IndexFlatIP(dim)
    quantizer.add(centroids)
    codes = faiss.IndexIVFPQ(quantizer, dim, int(ivf.nlist), dim // SUBVECTOR_DIMS, 4, faiss.METRIC_INNER_PRODUCT)
    codes.own_fields = True
    quantizer.this.disown()
    if len(sample) > TRAIN_POINTS:
        sample = sample[np.sort(np.random.default_rng(seed).choice(len(sample), TRAIN_POINTS, replace=False))]
    codes.train(np.ascontiguousarray(sample, np.float32))
    width = min(COARSE_NEIGHBOURS, int(ivf.nlist))
    with thread_independent():
        _, neighbours = faiss.knn(centroids, centroids, width, metric=faiss.METRIC_INNER_PRODUCT)
    return template_bytes(codes), neighbours.astype(np.int32)


class GraphCodes:
    """``search(ids, vectors, k, breadth)`` → (cosine distances, ids) for indexed items' graph rows.

    ``layout`` is the version's meta.json as a dict (``graph_files``, ``vector_segments``).
    """

    def __init__(self, folder: Path, layout: dict):
        folder = Path(folder)
        mapped = open_ivf([folder / f for f in layout["graph_files"]])
        self.index = faiss.IndexIVFPQFastScan(mapped.index)  # reads the mapped lists into SIMD blocks
        quantizer = faiss.clone_index(mapped.index.quantizer)  # the copy outlives the mapping
        self.index.quantizer, self.index.own_fields = quantizer, True
        quantizer.this.disown()
        del mapped  # unmapped: the lists' pages stop counting in resident memory
        self.centroids = self.index.quantizer.reconstruct_n(0, self.index.nlist)
        self.coarse = np.load(folder / GRAPH_COARSE)
        self.store = VectorStore(folder, layout["vector_segments"])
        self.lists = [np.load(folder / lists_name(i), mmap_mode="r") for i in layout["vector_segments"]]
        self.kept_probes = {int(i): np.load(folder / probes_name(i), mmap_mode="r")
                            for i in layout["vector_segments"] if (folder / probes_name(i)).is_file()}
        self._since_release = 0
        self._index_files = [folder / f for f in layout["ivf_files"]]
        self._mapped_index = None

    def exact_probes(self, vectors: np.ndarray, breadth: int) -> tuple[np.ndarray, np.ndarray]:
        """Each row's ``breadth`` nearest lists by the index's own coarse quantizer: for a nightly's
        new items, whose own list's neighbours miss lists they need (benchmarks/graph_new_items.py:
        recall@30 0.975 against 0.949 at 32 lists, 5M). A flat quantizer's are found by one BLAS
        product with every centroid, its 2 × breadth best re-scored by the SIMD products (the
        result does not depend on BLAS' threads or on batching, like the rest of a row); an HNSW
        quantizer is searched per query."""
        if self._mapped_index is None:  # maps the lists, loads only the quantizer
            self._mapped_index = open_ivf(self._index_files)
        quantizer = faiss.downcast_index(faiss.extract_index_ivf(self._mapped_index.index).quantizer)
        breadth = min(breadth, self.index.nlist)
        if not isinstance(quantizer, faiss.IndexFlat):  # HNSW: its lists, ordered as the kept probes are
            with thread_independent():
                _, lists = quantizer.search(vectors, breadth)
            return self._best_lists(vectors, np.sort(lists, axis=1), breadth)
        wide = min(2 * breadth, self.index.nlist)
        _, candidates = faiss.knn(vectors, self.centroids, wide, metric=faiss.METRIC_INNER_PRODUCT)  # BLAS
        return self._best_lists(vectors, np.sort(candidates, axis=1), breadth)  # ties: the lower list first

    def kept_probes_of(self, ids: np.ndarray, vectors: np.ndarray, breadth: int):
        """The ``breadth`` nearest lists the add step kept for these ids (``probes-*.npy``, the
        quantizer's own top PROBES_KEPT, re-ranked by the SIMD products: the coarse search is not
        done twice), or None where some id has none kept or ``breadth`` asks for more."""
        starts = self.store.starts[np.searchsorted(self.store.starts, ids, side="right") - 1]
        firsts = np.unique(starts)
        if not self.kept_probes or any(int(f) not in self.kept_probes for f in firsts):
            return None
        width = next(iter(self.kept_probes.values())).shape[1]
        if breadth > width:
            return None
        candidates = np.empty((len(ids), width), np.int64)
        for first in firsts:
            pick = starts == first
            candidates[pick] = self.kept_probes[int(first)][ids[pick] - first]
        return self._best_lists(vectors, np.sort(candidates, axis=1), breadth)

    def list_of(self, ids: np.ndarray) -> np.ndarray:
        """The list each indexed id was added to."""
        segment = np.searchsorted(self.store.starts, ids, side="right") - 1
        out = np.empty(len(ids), np.int64)
        for s in np.unique(segment):
            pick = segment == s
            out[pick] = self.lists[s][ids[pick] - self.store.starts[s]]
        return out

    def probes(self, ids: np.ndarray, vectors: np.ndarray, breadth: int) -> tuple[np.ndarray, np.ndarray]:
        """Each row's ``breadth`` lists to scan and its inner products with their centroids:
        the best of the nearest centroids of its own list."""
        return self._best_lists(vectors, self.coarse[self.list_of(ids)].astype(np.int64), breadth)

    def _best_lists(self, vectors: np.ndarray, candidates: np.ndarray, breadth: int) -> tuple[np.ndarray, np.ndarray]:
        """Each row's ``breadth`` best candidate lists by its SIMD inner product with their
        centroids (ties: the earlier candidate), and those products."""
        sims = inner_products_by_idx(vectors, self.centroids, candidates)
        best = np.argsort(-sims, axis=1, kind="stable")[:, :breadth]
        return np.take_along_axis(candidates, best, 1), np.take_along_axis(sims, best, 1)

    def refine(self, vectors: np.ndarray, shortlist: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The shortlist re-scored by exact inner products: each distinct candidate read and
        decoded once (rows of one step share many), in id order."""
        valid = shortlist >= 0
        unique, inverse = np.unique(shortlist[valid], return_inverse=True)
        local = np.full(shortlist.shape, -1, np.int64)
        local[valid] = inverse
        sims = inner_products_by_idx(vectors, self.store.get(unique), local)
        best = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        picked = np.take_along_axis(local, best, 1)
        found = np.where(picked >= 0, unique[np.maximum(picked, 0)], -1)
        distances = np.where(found >= 0, 1.0 - np.take_along_axis(sims, best, 1), np.inf).astype(np.float32)
        return distances, found

    def search(self, ids: np.ndarray, vectors: np.ndarray, k: int, breadth: int,
               exact_coarse: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Rows of indexed ``ids``: probes from their own list's neighbours, or (``exact_coarse``)
        from the index's quantizer."""
        ids = np.asarray(ids, np.int64)
        vectors = np.ascontiguousarray(vectors, np.float32)
        shortlist = max(GRAPH_REFINE * k, REFINE_MIN_SHORTLIST)
        distances = np.empty((len(ids), k), np.float32)
        found = np.empty((len(ids), k), np.int64)
        for a in range(0, len(ids), ROWS_PER_STEP):
            rows = slice(a, a + ROWS_PER_STEP)
            if exact_coarse:
                kept = self.kept_probes_of(ids[rows], vectors[rows], breadth)
                lists, sims = kept if kept is not None else self.exact_probes(vectors[rows], breadth)
            else:
                lists, sims = self.probes(ids[rows], vectors[rows], breadth)
            self.index.nprobe = lists.shape[1]
            _, candidates = self.index.search_preassigned(vectors[rows], shortlist, lists, sims)
            distances[rows], found[rows] = self.refine(vectors[rows], candidates, k)
            self._since_release += len(vectors[rows])
            if self._since_release >= RELEASE_ROWS:
                self.store.release()
                self._since_release = 0
        return distances, found


def inner_products_by_idx(x: np.ndarray, y: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """(n, m) inner products of x[i] with y[ids[i, j]] (-inf where ids is -1): Faiss' SIMD code,
    each product computed alone (thread- and batch-independent)."""
    x, y = np.ascontiguousarray(x, np.float32), np.ascontiguousarray(y, np.float32)
    ids = np.ascontiguousarray(ids, np.int64)
    out = np.empty(ids.shape, np.float32)
    faiss.fvec_inner_products_by_idx(faiss.swig_ptr(out), faiss.swig_ptr(x), faiss.swig_ptr(y), faiss.swig_ptr(ids),
                                     x.shape[1], ids.shape[0], ids.shape[1])
    return out


_OPEN: dict[tuple, GraphCodes] = {}


def open_graph_codes(folder: Path, layout: dict) -> GraphCodes:
    """The version's graph codes, kept open for the process's next task (one version at a time:
    the fast-scan copy holds dim/8 + 8 bytes per vector)."""
    key = (str(folder), tuple(layout["graph_files"]), tuple(layout["vector_segments"]))
    if key not in _OPEN:
        _OPEN.clear()
        _OPEN[key] = GraphCodes(Path(folder), layout)
    return _OPEN[key]
