"""The gallery's Faiss index: trained on a sample of the shards, every embedding added, kept up to date.

Layout under ``GALLERY/index/`` (docs/schemas.md), one folder per built version::

    CURRENT                 the name of the live version folder (replaced atomically)
    v-<time>-<rand>/
        index.faiss         the Faiss index (always saved as a CPU index)
        items.parquet       faiss id -> detection_id and the detection's metadata (no embedding)
        knn.parquet         each gallery item's k nearest gallery items (for re-ranking)
        meta.json           type, metric, dim, embedder, count, nlist, nprobe, measured recall, shards

A build writes a complete new version folder, then swaps ``CURRENT`` with one ``os.replace``: a
query that started earlier keeps reading the old folder (the previous version is kept), a query
that starts later reads the new one, and nobody ever sees a half-written index.

Vectors are unit length, so inner product is cosine similarity; distances handed out are cosine
distances ``1 - q.g``. Faiss ids are row positions 0..N-1 in the order items were added, so an
incremental build appends ids and never renumbers.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reidx.pipeline.embedding_table import embeddings_to_numpy, write_parquet_atomic
from reidx.pipeline.ledger import read_ledger
from reidx.pipeline.lock import GalleryLock
from reidx.pipeline.shards import SHARDS_DIR

INDEX_DIR = "index"
CURRENT = "CURRENT"
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


@dataclass
class IndexMeta:
    version: str
    type: str
    metric: str
    dim: int
    embedder: str
    embedder_sha256: str
    count: int
    trained_count: int
    nlist: int | None
    nprobe: int | None
    recall_at_10: float
    recall_at_100: float
    knn_k: int
    shards: list[str] = field(default_factory=list)
    built_at: str = ""
    build: dict = field(default_factory=dict)  # how this version was made: full|incremental, seconds, gpu


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


# --- reading the gallery --------------------------------------------------------------------------

def committed_shards(gallery: Path) -> list[str]:
    """Shard files the ledger names: only those are part of the gallery (others are crash leftovers)."""
    names = {s for s in read_ledger(gallery)["shard"].to_pylist() if s}
    return sorted(n for n in names if (gallery / SHARDS_DIR / n).exists())


def read_shards(gallery: Path, names: list[str]) -> tuple[pa.Table, np.ndarray]:
    """(metadata table with a ``shard`` column, embeddings (N, D) float32) of the named shards, in order."""
    metas, vectors = [], []
    for name in names:
        table = pq.read_table(gallery / SHARDS_DIR / name)
        vectors.append(embeddings_to_numpy(table["embedding"]))
        table = table.drop_columns(["embedding"])
        metas.append(table.append_column("shard", pa.array([name] * table.num_rows, pa.string())))
    if not metas:
        return pa.table({}), np.zeros((0, 0), np.float32)
    return pa.concat_tables(metas, promote_options="permissive"), np.concatenate(vectors)


# --- the kNN graph ----------------------------------------------------------------------------------

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


# --- versions on disk -----------------------------------------------------------------------------

def index_root(gallery: str | os.PathLike) -> Path:
    return Path(gallery) / INDEX_DIR


def current_version(gallery: str | os.PathLike) -> Path | None:
    pointer = index_root(gallery) / CURRENT
    if not pointer.exists():
        return None
    folder = index_root(gallery) / pointer.read_text().strip()
    return folder if folder.is_dir() else None


def _write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _publish(gallery: Path, index: faiss.Index, items: pa.Table, knn: tuple[np.ndarray, np.ndarray],
             meta: IndexMeta) -> Path:
    """Write a complete version folder, then point CURRENT at it; keep the previous version for
    queries that are still reading it, remove older ones."""
    root = index_root(gallery)
    folder = root / meta.version
    tmp = root / f".{meta.version}.tmp"
    tmp.mkdir(parents=True)
    faiss.write_index(index, str(tmp / "index.faiss"))
    write_parquet_atomic(items, tmp / "items.parquet")
    write_parquet_atomic(knn_table(*knn), tmp / "knn.parquet")
    (tmp / "meta.json").write_text(json.dumps(asdict(meta), indent=2))
    for path in tmp.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    os.replace(tmp, folder)
    previous = current_version(gallery)
    _write_atomic_text(root / CURRENT, meta.version)
    keep = {meta.version, previous.name if previous else None}
    for old in root.glob("v-*"):
        if old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)
    for leftover in root.glob(".v-*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)
    return folder


def _version_name() -> str:
    return f"v-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"


# --- the loaded index -------------------------------------------------------------------------------

@dataclass
class GalleryIndex:
    """A loaded index version: search it, look up what its ids are, read its kNN graph."""

    folder: Path
    meta: IndexMeta
    index: faiss.Index
    items: pa.Table
    on_gpu: bool = False

    @property
    def count(self) -> int:
        return self.index.ntotal

    def search(self, vectors: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(cosine distances (Q, k), faiss ids (Q, k)); nprobe defaults to the calibrated one."""
        set_nprobe(self.index, nprobe or self.meta.nprobe, self.on_gpu)
        return search(self.index, vectors, k)

    def knn(self) -> tuple[np.ndarray, np.ndarray]:
        return read_knn(self.folder)


def load_index(gallery: str | os.PathLike, gpu: str = "auto") -> GalleryIndex:
    """The live version of GALLERY's index (retried once if a build swapped it while we opened it)."""
    for attempt in range(2):
        folder = current_version(gallery)
        if folder is None:
            raise FileNotFoundError(f"{gallery} has no index yet: run `reidx build-index {gallery}` "
                                    f"(or `reidx nightly`) first")
        try:
            meta = IndexMeta(**json.loads((folder / "meta.json").read_text()))
            index = faiss.read_index(str(folder / "index.faiss"))
            items = pq.read_table(folder / "items.parquet")
            break
        except (FileNotFoundError, RuntimeError):
            if attempt:
                raise
    on_gpu = resolve_gpu(gpu)
    if on_gpu:
        index = to_gpu(index, meta.type)
    return GalleryIndex(folder, meta, index, items, on_gpu)


# --- building ---------------------------------------------------------------------------------------

def _embedder_of(items: pa.Table) -> tuple[str, str]:
    pairs = set(zip(items["embedder"].to_pylist(), items["embedder_sha256"].to_pylist()))
    if len(pairs) != 1:
        raise IndexBuildError(f"the shards hold embeddings of {len(pairs)} embedders ({sorted(pairs)}); "
                          f"one index holds one embedder's vectors")
    return pairs.pop()


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


def build_index(gallery: str | os.PathLike, *, index_type: str = "auto", nlist: int | None = None,
                gpu: str = "auto", knn_k: int = DEFAULT_KNN, rebuild: bool = False, seed: int = 0,
                log=lambda message: None) -> dict:
    """Build or update GALLERY's index; returns a JSON-able summary.

    Incremental by default: when the live version's type still fits, the embedder is the same and
    the gallery has not grown past RETRAIN_GROWTH × the trained count, only shards it does not hold
    yet are added (to a copy), their kNN rows computed, and old rows updated with new neighbours.
    Otherwise (or with ``rebuild``) everything is trained and added from scratch.
    """
    started = time.perf_counter()
    gallery = Path(gallery)
    if not (gallery / SHARDS_DIR).is_dir():
        raise FileNotFoundError(f"{gallery} is not a gallery (no {SHARDS_DIR}/ folder): run `reidx index` first")
    on_gpu = resolve_gpu(gpu)
    if nlist is not None and nlist < 1:
        raise IndexBuildError(f"--nlist must be at least 1, got {nlist}")
    if knn_k < 0:
        raise IndexBuildError(f"--knn must be ≥ 0, got {knn_k}")
    with GalleryLock(index_root(gallery)):
        shards = committed_shards(gallery)
        if not shards:
            raise IndexBuildError(f"{gallery} holds no committed shards yet: nothing to index")
        previous = None if rebuild else current_version(gallery)
        old_meta = IndexMeta(**json.loads((previous / "meta.json").read_text())) if previous else None
        new_shards = [s for s in shards if not old_meta or s not in set(old_meta.shards)]
        new_items, new_vectors = read_shards(gallery, new_shards)
        total = (old_meta.count if old_meta else 0) + new_items.num_rows
        kind = choose_type(index_type, total)
        reason = _full_rebuild_reason(old_meta, shards, kind, total, knn_k, nlist)
        if reason is None and not new_shards:
            return _summary(gallery, old_meta, "unchanged", None, 0, on_gpu, started)
        if reason is None:
            embedder = _embedder_of(new_items) if new_items.num_rows else (old_meta.embedder, old_meta.embedder_sha256)
            if embedder != (old_meta.embedder, old_meta.embedder_sha256):
                reason = "the new shards come from another embedder"
        if reason is None:
            log(f"adding {new_items.num_rows} new detections from {len(new_shards)} shards to {old_meta.version}")
            index = faiss.read_index(str(previous / "index.faiss"))
            old_items = pq.read_table(previous / "items.parquet")
            ids = np.arange(old_meta.count, total, dtype=np.int64)
            items = pa.concat_tables([old_items, new_items.append_column("faiss_id", pa.array(ids))],
                                     promote_options="permissive")
            if on_gpu:
                index = to_gpu(index, kind)
            index.add(new_vectors)
            knn_ids, knn_dist = read_knn(previous)
            vectors_for_calibration = np.concatenate([_indexed_vectors(gallery, old_items), new_vectors])
            nlist_used, trained_count, mode = old_meta.nlist, old_meta.trained_count, "incremental"
            if kind != "flat":
                set_nprobe(index, old_meta.nprobe, on_gpu)
            if old_meta.knn_k:
                knn_ids, knn_dist = merge_new_neighbours(knn_ids, knn_dist, vectors_for_calibration[:old_meta.count],
                                                         new_vectors, old_meta.count)
                new_ids, new_dist = knn_graph(index, new_vectors, old_meta.count, old_meta.knn_k)
                knn_ids, knn_dist = np.concatenate([knn_ids, new_ids]), np.concatenate([knn_dist, new_dist])
        else:
            if old_meta:
                log(f"full rebuild: {reason}")
            items, vectors = read_shards(gallery, shards)
            embedder = _embedder_of(items)
            items = items.append_column("faiss_id", pa.array(np.arange(items.num_rows, dtype=np.int64)))
            nlist_used = None if kind == "flat" else (nlist or default_nlist(len(vectors)))
            if nlist_used is not None and nlist_used > len(vectors):
                raise IndexBuildError(f"--nlist {nlist_used} is more than the {len(vectors)} vectors to train on")
            log(f"adding {len(vectors)} detections to a new exact index" if kind == "flat" else
                f"training {kind} (nlist {nlist_used}) and adding {len(vectors)} detections")
            index = train_and_add(kind, vectors, nlist_used, on_gpu, seed)
            vectors_for_calibration, trained_count, mode = vectors, len(vectors), "full"
            knn_ids = knn_dist = np.zeros((len(vectors), 0))
        if kind == "flat":
            nprobe, r10, r100 = None, 1.0, 1.0
        else:
            nprobe, r10, r100 = calibrate_nprobe(index, vectors_for_calibration, nlist_used, on_gpu, seed=seed)
            if r100 < TARGET_RECALL_AT_100:
                log(f"warning: recall@100 is {r100:.3f} even at nprobe={nprobe} ({kind} loses accuracy in "
                    f"its compression); use ivf-flat or ivf-sq8 for higher recall")
            set_nprobe(index, nprobe, on_gpu)
        if knn_k and mode == "full":
            log(f"computing each item's {knn_k} nearest neighbours")
            knn_ids, knn_dist = knn_graph(index, vectors_for_calibration, 0, min(knn_k, index.ntotal))
        meta = IndexMeta(version=_version_name(), type=kind, metric="inner_product", dim=index.d,
                         embedder=embedder[0], embedder_sha256=embedder[1], count=index.ntotal,
                         trained_count=trained_count, nlist=nlist_used, nprobe=nprobe,
                         recall_at_10=round(r10, 4), recall_at_100=round(r100, 4),
                         knn_k=int(knn_ids.shape[1]) if knn_k else 0, shards=shards,
                         built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                         build={"mode": mode, "gpu": on_gpu, "reason": reason,
                                "seconds": round(time.perf_counter() - started, 2)})
        _publish(gallery, to_cpu(index, on_gpu), items, (knn_ids, knn_dist), meta)
    added = int(new_items.num_rows) if mode == "incremental" else meta.count
    return _summary(gallery, meta, mode, reason, added, on_gpu, started)


def _summary(gallery: Path, meta: IndexMeta, mode: str, reason: str | None, added: int, on_gpu: bool,
             started: float) -> dict:
    """What `reidx build-index --json` prints: the live version's figures and what this run did."""
    return {"gallery": str(gallery), "version": meta.version, "mode": mode, "reason": reason, "type": meta.type,
            "count": meta.count, "added": added, "nlist": meta.nlist, "nprobe": meta.nprobe,
            "recall_at_10": meta.recall_at_10, "recall_at_100": meta.recall_at_100, "knn_k": meta.knn_k,
            "gpu": on_gpu, "seconds": round(time.perf_counter() - started, 2)}


def _indexed_vectors(gallery: Path, items: pa.Table) -> np.ndarray:
    """The vectors of ``items`` in faiss-id order, re-read from their shards (the index may be
    compressed, so it cannot give them back exactly)."""
    names = list(dict.fromkeys(items["shard"].to_pylist()))
    _, vectors = read_shards(gallery, names)
    return vectors


def _full_rebuild_reason(old: IndexMeta | None, shards: list[str], kind: str, total: int, knn_k: int,
                         nlist: int | None) -> str | None:
    """Why the live version cannot simply be extended (None: it can)."""
    if old is None:
        return "no index yet"
    if set(old.shards) - set(shards):
        return "shards were removed from the gallery"
    if kind != old.type:
        return f"index type changes from {old.type} to {kind}"
    if nlist is not None and nlist != old.nlist:
        return f"nlist changes from {old.nlist} to {nlist}"
    if knn_k != old.knn_k and min(knn_k, total) != old.knn_k:
        return f"kNN graph size changes from {old.knn_k} to {knn_k}"
    if kind != "flat" and total > RETRAIN_GROWTH * old.trained_count:
        return f"the gallery grew from {old.trained_count} to {total} (> {RETRAIN_GROWTH:g}× the trained size)"
    return None
