"""Faiss primitives: index kinds, GPU cloning, batched search, exact ground truth, recall, nprobe calibration.

Pure operations on arrays and Faiss indexes — no files. Vectors are unit length, so inner
product is cosine similarity; distances handed out are cosine distances ``1 - q.g``.
"""

from __future__ import annotations

import math

import faiss
import numpy as np

INDEX_TYPES = ("flat", "ivf-flat", "ivf-sq8", "ivf-pq")
# Below this many vectors `auto` keeps exact search: it needs no training, gives recall 1, and a
# batch of queries still costs only a few ms each on 2 cores (benchmarks/search.py).
AUTO_EXACT_MAX = 100_000
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


def default_nlist(count: int) -> int:
    """≈ 4·√N lists, but never fewer than 39 training points per list (Faiss' minimum)."""
    return max(1, min(int(round(4 * math.sqrt(count))), count // MIN_POINTS_PER_LIST))


def choose_type(requested: str, count: int) -> str:
    if requested == "auto":
        return "flat" if count <= AUTO_EXACT_MAX else AUTO_IVF_TYPE
    if requested not in INDEX_TYPES:
        raise IndexBuildError(f"--type must be auto or one of {', '.join(INDEX_TYPES)}, got {requested!r}")
    return requested


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
    """An empty CPU index of the given kind, inner-product metric (PQ: dim/8 bytes per vector)."""
    if kind == "ivf-pq" and dim % 8:
        raise IndexBuildError(f"ivf-pq needs a dimension divisible by 8, got {dim}")
    factory = {"flat": "Flat", "ivf-flat": f"IVF{nlist},Flat", "ivf-sq8": f"IVF{nlist},SQ8",
               "ivf-pq": f"IVF{nlist},PQ{dim // 8}x8"}
    if kind not in factory:
        raise IndexBuildError(f"unknown index type {kind!r}")
    return faiss.index_factory(dim, factory[kind], faiss.METRIC_INNER_PRODUCT)


def to_gpu(index: faiss.Index, kind: str) -> faiss.Index:
    """Clone onto every GPU. float16 PQ lookup tables: Faiss needs them for 64 sub-quantizers on
    GPU and they are faster; flat and IVF-flat vectors stay float32 so GPU and CPU results agree."""
    options = faiss.GpuMultipleClonerOptions()
    options.useFloat16 = kind == "ivf-pq"
    return faiss.index_cpu_to_all_gpus(index, options)


def to_cpu(index: faiss.Index, on_gpu: bool) -> faiss.Index:
    return faiss.index_gpu_to_cpu(index) if on_gpu else index


def set_nprobe(index: faiss.Index, nprobe: int | None, on_gpu: bool = False) -> None:
    if nprobe is None:
        return
    space = faiss.GpuParameterSpace() if on_gpu else faiss.ParameterSpace()
    space.set_index_parameter(index, "nprobe", int(nprobe))


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
                     target: float = TARGET_RECALL_AT_100, seed: int = 0) -> tuple[int, float, float]:
    """Smallest power-of-two nprobe whose recall@100 on a sample of the gallery's own vectors
    reaches ``target``; returns (nprobe, recall@10, recall@100) as measured."""
    rng = np.random.default_rng(seed)
    sample = vectors[np.sort(rng.choice(len(vectors), size=min(CALIBRATION_QUERIES, len(vectors)), replace=False))]
    truth = exact_neighbours(sample, vectors, 100)
    nprobe = 1
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
    if on_gpu:
        index = to_gpu(index, kind)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        size = min(len(vectors), TRAINING_POINTS_PER_LIST * (nlist or 1))
        index.train(vectors[np.sort(rng.choice(len(vectors), size=size, replace=False))])
    index.add(vectors)
    return index
