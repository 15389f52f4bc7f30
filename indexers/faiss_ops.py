"""Faiss primitives: index kinds, GPU cloning, batched search, exact ground truth, recall, nprobe calibration.

Pure operations on arrays and Faiss indexes — no files. Vectors are unit length, so inner
product is cosine similarity; distances handed out are cosine distances ``1 - q.g``.
"""

from __future__ import annotations

import math
import os

import faiss
import numpy as np

INDEX_TYPES = ("flat", "ivf-flat", "ivf-sq8", "ivf-pq", "hnsw")
IVF_TYPES = ("ivf-flat", "ivf-sq8", "ivf-pq")
# Held whole in memory (index.faiss read at load; no training, no lists on disk): exact search and
# the HNSW graph. `hnsw` is asked for by name (`auto` never picks it): it is for galleries without
# the cluster structure IVF exploits -- on the Gaussian `mixture` set of benchmarks/search.py IVF
# needs 6 % of its lists for recall@10 0.95 and stays below 4x exact search, HNSW reaches 10x
# (docs/search.md) -- and it costs about 4·d + 8·HNSW_M bytes per vector of RAM.
IN_MEMORY_TYPES = ("flat", "hnsw")
CPU_ONLY_TYPES = ("hnsw",)  # Faiss has no GPU HNSW: built and searched on the CPU whatever --gpu says
HNSW_M = 32  # graph links per node (64 on the bottom layer)
HNSW_EF_CONSTRUCTION = 80  # candidate list while inserting: twice Faiss' default (a better graph for twice the cost; not tuned)
HNSW_EF_START = 128  # calibration (for recall@100) starts here and doubles
HNSW_EF_MAX = 4096
# Below this many vectors `auto` keeps exact search (if it fits the memory budget): it needs no
# training, gives recall 1, and a batch of queries still costs only a few ms each on 2 cores
# (benchmarks/search.py).
AUTO_EXACT_MAX = 100_000
# `auto` memory budget: this fraction of the machine's RAM for the index (autofaiss sizes its
# index the same way, from a memory figure rather than a vector count).
DEFAULT_BUDGET_FRACTION = 0.25
# ivf-pq keeps dim/8 bytes per vector; its shortlist of REFINE_FACTOR × k is re-ranked with exact
# inner products against the vectors on disk (indexers/vector_store.py)
REFINE_FACTOR = 4
# From this many lists the coarse quantizer is an HNSW graph over the centroids (assigning 10M
# vectors to 12k flat centroids alone costs ~65 TFLOP) and k-means is two-level (√nlist groups).
HNSW_QUANTIZER_MIN_NLIST = 8192
HNSW_EF_SEARCH = 128
# ivf-sq8 above that: 4× smaller than ivf-flat (0.53 vs 2.06 GB at 1M × 512) and 1.1–3.6× the QPS at
# the same nprobe; its recall@10 ceiling of ≈ 0.98 is above the calibration target (docs/search.md).
AUTO_IVF_TYPE = "ivf-sq8"
# An incremental build retrains from scratch once the gallery has grown past this factor of the
# count the coarse quantizer was trained on: centroids from a much smaller sample leave lists
# unbalanced and searches slower at the same recall.
RETRAIN_GROWTH = 2.0
TARGET_RECALL_AT_100 = 0.95
CALIBRATION_QUERIES = 1000
TRAINING_POINTS_PER_LIST = 64  # k-means sample: Faiss wants 39..256 points per centroid
MIN_POINTS_PER_LIST = 39
DEFAULT_KNN = 30


class IndexBuildError(ValueError):
    """The index cannot be built or read as asked (message says why and what to do)."""


def training_size(count: int, nlist: int) -> int:
    """Training sample: TRAINING_POINTS_PER_LIST per list up to 262,144 points, never below Faiss'
    minimum of MIN_POINTS_PER_LIST per list (so large nlist stays trainable in bounded memory)."""
    return min(count, max(MIN_POINTS_PER_LIST * nlist, min(TRAINING_POINTS_PER_LIST * nlist, 262_144)))


def default_nlist(count: int) -> int:
    """≈ 4·√N lists, but never fewer than 39 training points per list (Faiss' minimum)."""
    return max(1, min(int(round(4 * math.sqrt(count))), count // MIN_POINTS_PER_LIST))


def default_memory_budget() -> int:
    """DEFAULT_BUDGET_FRACTION of physical memory, in bytes."""
    return int(DEFAULT_BUDGET_FRACTION * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def parse_bytes(text: str | int | None) -> int | None:
    """``"4G"``, ``"512M"``, ``"1.5GB"``, ``"1000000"`` → bytes (binary units); None stays None."""
    if text is None or isinstance(text, int):
        return text
    value = str(text).strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(value[-1:], 1)
    try:
        number = float(value[:-1] if scale > 1 else value)
    except ValueError:
        raise IndexBuildError(f"--memory-budget must be bytes or a size like 4G or 512M, got {text!r}") from None
    if number <= 0:
        raise IndexBuildError(f"--memory-budget must be positive, got {text!r}")
    return int(number * scale)


def expected_bytes(kind: str, count: int, dim: int, nlist: int | None) -> int:
    """What the index takes in memory when its lists are resident (as ``faiss.write_index`` sizes it):
    codes + 8-byte ids per vector, plus the coarse quantizer (and its HNSW links)."""
    per_vector = {"flat": 4 * dim, "ivf-flat": 4 * dim + 8, "ivf-sq8": dim + 8, "ivf-pq": dim // 8 + 8,
                  "hnsw": 4 * dim + 4 * (2 * HNSW_M + HNSW_M // 8) + 12}[kind]  # + upper layers, levels
    quantizer = 0 if kind in IN_MEMORY_TYPES else (nlist or 1) * (4 * dim + (2 * 32 * 4 if (nlist or 0) >= HNSW_QUANTIZER_MIN_NLIST else 0))
    return per_vector * count + quantizer + (256 * 4 * dim if kind == "ivf-pq" else 0)


def choose_type(requested: str, count: int, dim: int = 512, budget: int | None = None,
                nlist: int | None = None) -> tuple[str, str]:
    """(index type, why) for ``count`` vectors under a memory ``budget`` (bytes; default
    :func:`default_memory_budget`): exact search while small and within budget, else the first of
    ivf-sq8 (AUTO_IVF_TYPE) and ivf-pq (+ re-ranking from disk) whose expected size fits."""
    budget = budget or default_memory_budget()
    if requested != "auto":
        if requested not in INDEX_TYPES:
            raise IndexBuildError(f"--type must be auto or one of {', '.join(INDEX_TYPES)}, got {requested!r}")
        return requested, "asked for"
    lists = nlist or default_nlist(count)
    if count <= AUTO_EXACT_MAX and expected_bytes("flat", count, dim, None) <= budget:
        return "flat", f"{count} ≤ {AUTO_EXACT_MAX} vectors and exact search fits the budget"
    for kind in (AUTO_IVF_TYPE, "ivf-pq"):
        size = expected_bytes(kind, count, dim, lists)
        if size <= budget or kind == "ivf-pq":
            over = "" if size <= budget else " (the smallest type; over budget)"
            return kind, f"expected {size / 2**30:.2f} GiB within the {budget / 2**30:.2f} GiB budget{over}"
    raise AssertionError("unreachable")


def gpu_count() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def resolve_gpu(gpu: str) -> bool:
    """``auto``: use the GPU when Faiss reports one; ``on`` without one is an error, not a silent CPU run."""
    if gpu not in ("auto", "on", "off"):
        raise IndexBuildError(f"--gpu must be auto, on or off, got {gpu!r}")
    if gpu == "on" and gpu_count() == 0:
        raise IndexBuildError("--gpu on was asked for, but Faiss reports no GPU (is faiss-gpu installed? reidx[gpu])")
    return gpu != "off" and gpu_count() > 0


def new_index(kind: str, dim: int, nlist: int | None) -> faiss.Index:
    """An empty CPU index of the given kind, inner-product metric (PQ: dim/8 bytes per vector); an
    HNSW coarse quantizer from HNSW_QUANTIZER_MIN_NLIST lists."""
    if kind == "ivf-pq" and dim % 8:
        raise IndexBuildError(f"ivf-pq needs a dimension divisible by 8, got {dim}")
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = HNSW_EF_START
        return index
    coarse = f"IVF{nlist}_HNSW32" if (nlist or 0) >= HNSW_QUANTIZER_MIN_NLIST else f"IVF{nlist}"
    factory = {"flat": "Flat", "ivf-flat": f"{coarse},Flat", "ivf-sq8": f"{coarse},SQ8",
               "ivf-pq": f"{coarse},PQ{dim // 8}x8"}
    if kind not in factory:
        raise IndexBuildError(f"unknown index type {kind!r}")
    index = faiss.index_factory(dim, factory[kind], faiss.METRIC_INNER_PRODUCT)
    if kind == "ivf-pq":  # the factory turns on polysemous training: 70+ s on 20k points, unused by search
        faiss.downcast_index(faiss.extract_index_ivf(index)).do_polysemous_training = False
    if kind != "flat" and (nlist or 0) >= HNSW_QUANTIZER_MIN_NLIST:
        faiss.downcast_index(faiss.extract_index_ivf(index).quantizer).hnsw.efSearch = HNSW_EF_SEARCH
    return index


def train_empty(kind: str, sample: np.ndarray, nlist: int, on_gpu: bool = False, seed: int = 0) -> faiss.Index:
    """A trained, empty IVF index (CPU) from a sample. Large nlist: two-level k-means (√nlist groups,
    then lists within each group: ~√nlist times less work than flat k-means, which at 12k lists on
    500k points would take most of an hour on 2 cores), centroids into the (HNSW) quantizer, then
    the encoder trained on the sample; otherwise Faiss' own training (on GPU when asked)."""
    index = new_index(kind, sample.shape[1], nlist)
    if nlist >= HNSW_QUANTIZER_MIN_NLIST:
        from faiss.contrib.clustering import two_level_clustering

        centroids, _ = two_level_clustering(sample, int(math.sqrt(nlist)), nlist, spherical=True, seed=seed + 1234)
        ivf = faiss.extract_index_ivf(index)
        ivf.quantizer.train(centroids)
        ivf.quantizer.add(centroids)
        index.train(sample)  # the quantizer is full: Faiss trains only the encoder (SQ ranges, PQ codebooks)
        return index
    if on_gpu:
        gpu_index = to_gpu(index, kind)
        gpu_index.train(sample)
        return to_cpu(gpu_index, True)
    index.train(sample)
    return index


def to_gpu(index: faiss.Index, kind: str) -> faiss.Index:
    """Clone onto every GPU. float16 PQ lookup tables: Faiss needs them for 64 sub-quantizers on
    GPU and they are faster; flat and IVF-flat vectors stay float32 so GPU and CPU results agree."""
    options = faiss.GpuMultipleClonerOptions()
    options.useFloat16 = kind == "ivf-pq"
    return faiss.index_cpu_to_all_gpus(index, options)


def to_cpu(index: faiss.Index, on_gpu: bool) -> faiss.Index:
    return faiss.index_gpu_to_cpu(index) if on_gpu else index


def set_nprobe(index: faiss.Index, nprobe: int | None, on_gpu: bool = False) -> None:
    """The search breadth: lists probed for IVF, efSearch for HNSW (meta.json's ``nprobe`` holds either)."""
    if nprobe is None:
        return
    hnsw = _hnsw_of(index)
    if hnsw is not None:
        hnsw.efSearch = int(nprobe)
        return
    space = faiss.GpuParameterSpace() if on_gpu else faiss.ParameterSpace()
    space.set_index_parameter(index, "nprobe", int(nprobe))


def _hnsw_of(index: faiss.Index):
    index = faiss.downcast_index(index)
    return index.hnsw if isinstance(index, faiss.IndexHNSW) else None


def breadth_limit(kind: str, nlist: int | None) -> int | None:
    """The largest search breadth calibration may reach: nlist for IVF, HNSW_EF_MAX for HNSW."""
    return HNSW_EF_MAX if kind == "hnsw" else nlist


def breadth_start(kind: str) -> int:
    return HNSW_EF_START if kind == "hnsw" else 1


def search(index: faiss.Index, vectors: np.ndarray, k: int, batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by inner product, in batches; returns (cosine distances, ids) with id -1 where fewer were found."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    k = min(k, index.ntotal)
    distances = np.empty((len(vectors), k), np.float32)
    ids = np.empty((len(vectors), k), np.int64)
    for start in range(0, len(vectors), batch):
        sims, found = index.search(vectors[start:start + batch], k)
        distances[start:start + batch] = 1.0 - sims
        ids[start:start + batch] = found
    distances[ids < 0] = np.inf
    return distances, ids


def exact_neighbours(queries: np.ndarray, vectors: np.ndarray, k: int) -> np.ndarray:
    """Ground-truth ids by brute force (Faiss' blocked BLAS search)."""
    _, ids = faiss.knn(np.ascontiguousarray(queries, np.float32), np.ascontiguousarray(vectors, np.float32),
                       min(k, len(vectors)), metric=faiss.METRIC_INNER_PRODUCT)
    return ids


def recall(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean fraction of each query's true top-k that the search returned in its top-k."""
    k = min(k, truth.shape[1])
    hits = [len(np.intersect1d(f[:k][f[:k] >= 0], t[:k])) for f, t in zip(found, truth)]
    return float(np.mean(hits) / k) if len(hits) else 1.0


def calibrate_nprobe(index: faiss.Index, vectors: np.ndarray, nlist: int, on_gpu: bool = False,
                     target: float = TARGET_RECALL_AT_100, seed: int = 0, start: int = 1) -> tuple[int, float, float]:
    """Smallest power-of-two breadth from ``start`` (nprobe up to ``nlist``; for HNSW efSearch up
    to ``breadth_limit``) whose recall@100 on a sample of the gallery's own vectors reaches
    ``target``; returns (breadth, recall@10, recall@100) as measured."""
    rng = np.random.default_rng(seed)
    sample = vectors[np.sort(rng.choice(len(vectors), size=min(CALIBRATION_QUERIES, len(vectors)), replace=False))]
    truth = exact_neighbours(sample, vectors, 100)
    nprobe = min(start, nlist)
    while True:
        set_nprobe(index, nprobe, on_gpu)
        _, found = search(index, sample, 100)
        r100, r10 = recall(found, truth, 100), recall(found, truth, 10)
        if r100 >= target or nprobe >= nlist:
            return nprobe, r10, r100
        nprobe = min(nprobe * 2, nlist)


def train_and_add(kind: str, vectors: np.ndarray, nlist: int | None, on_gpu: bool = False, seed: int = 0) -> faiss.Index:
    """A new index of ``kind`` trained (k-means on a sample of TRAINING_POINTS_PER_LIST·nlist) and filled."""
    index = new_index(kind, vectors.shape[1], nlist)
    if on_gpu and kind not in CPU_ONLY_TYPES:
        index = to_gpu(index, kind)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        size = min(len(vectors), TRAINING_POINTS_PER_LIST * (nlist or 1))
        index.train(vectors[np.sort(rng.choice(len(vectors), size=size, replace=False))])
    index.add(vectors)
    return index
