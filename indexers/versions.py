"""Index versions on disk: publish a complete version atomically, load the live one.

Layout under ``GALLERY/index/`` (docs/schemas.md, docs/scaling.md), one folder per built version::

    CURRENT                      the name of the live version folder (replaced atomically)
    v-<time>-<rand>/
        index.faiss              flat: the in-memory exact index; IVF: the base file, lists memory-mapped
        delta-<n>.faiss          IVF lists added by nightly builds since the base (stacked at load)
        items-<first id>.arrow   faiss id -> detection_id and the detection's metadata (Arrow IPC, mapped)
        vectors-<first id>.npy   the exact vectors in faiss-id order (shards' dtype; re-ranking, checks)
        knn-<n>.{rows,ids,dist}.npy  kNN-graph layers, later ones override rows of earlier ones
        meta.json                type, metric, dim, embedder, count, nlist, nprobe, measured recall,
                                 memory budget and expected size, shards, and the files above

Every file but meta.json is written once and never modified, so a nightly build hard-links the
previous version's files into its new folder and writes only what is new (O(new) bytes).
Versions built before issue 12 (``layout`` 1: ``index.faiss``, ``items.parquet``,
``knn.parquet``) are still loaded; the next build replaces them with a full rebuild.

A build writes a complete new version folder, then swaps ``CURRENT`` with one ``os.replace``: a
query that started earlier keeps reading the old folder (the previous version is kept), a query
that starts later reads the new one, and nobody ever sees a half-written index.

Vectors are unit length, so inner product is cosine similarity; distances handed out are cosine
distances ``1 - q.g``. Faiss ids are row positions 0..N-1 in the order items were added, so an
incremental build appends ids and never renumbers.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reidx.indexers.faiss_ops import CPU_ONLY_TYPES, resolve_gpu, search, set_nprobe, to_gpu
from reidx.indexers.knn_graph import knn_table, read_knn
from reidx.pipeline.atomic import fsync_dir, write_parquet_atomic, write_text_atomic
from reidx.pipeline.gallery import index_dir
from reidx.pipeline.integrity import file_records

CURRENT = "CURRENT"


class IndexDamagedError(ValueError):
    """The live index version's files are damaged (the message says what to run)."""


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
    layout: int = 1
    ivf_files: list[str] = field(default_factory=list)  # base, then deltas (layout 2, IVF types)
    graph_files: list[str] = field(default_factory=list)  # the kNN-graph step's codes, base then deltas (graph_codes)
    vector_segments: list[int] = field(default_factory=list)  # first faiss id of each vectors-*.npy
    item_segments: list[int] = field(default_factory=list)  # first faiss id of each items-*.arrow
    knn_layers: list[str] = field(default_factory=list)
    refine_factor: int | None = None
    memory_budget: int | None = None
    expected_bytes: int | None = None
    choice: str = ""  # why this index type
    knn_recall: float | None = None  # measured recall@knn_k of the stored graph on a sample
    quantizer: str = "flat"
    check_file: str | None = None  # the sample check's items and exact top-100 (indexers.check_sample)
    file_records: dict = field(default_factory=dict)  # {file: {size, sha256}}: `reidx verify` and builds check them
    rerank_profile: dict | None = None  # the gallery's neighbour structure for adaptive re-ranking (issue 15)

    def files(self) -> list[str]:
        """Every file of a layout-2 version but meta.json."""
        from reidx.indexers.build_tasks import items_name
        from reidx.indexers.knn_store import layer_files
        from reidx.indexers.vector_store import segment_name

        index_files = self.ivf_files if self.ivf_files else ["index.faiss"]
        graph = []
        if self.graph_files:
            from reidx.indexers.graph_codes import GRAPH_COARSE, GRAPH_TEMPLATE, lists_name

            graph = self.graph_files + [GRAPH_TEMPLATE, GRAPH_COARSE] + [lists_name(i) for i in self.vector_segments]
        return (list(index_files) + graph + [segment_name(i) for i in self.vector_segments]
                + [items_name(i) for i in self.item_segments] + [f for n in self.knn_layers for f in layer_files(n)]
                + ([self.check_file] if self.check_file else []))


def read_meta(folder: Path) -> IndexMeta:
    return IndexMeta(**json.loads((Path(folder) / "meta.json").read_text()))


def index_root(gallery: str | os.PathLike) -> Path:
    return index_dir(gallery)


def current_version(gallery: str | os.PathLike) -> Path | None:
    pointer = index_root(gallery) / CURRENT
    if not pointer.exists():
        return None
    folder = index_root(gallery) / pointer.read_text().strip()
    return folder if folder.is_dir() else None


def staging_folder(gallery: Path, version: str) -> Path:
    """Where a build writes its version before :func:`publish_folder` (invisible to readers)."""
    tmp = index_root(gallery) / f".{version}.tmp"
    tmp.mkdir(parents=True)
    return tmp


def remove_leftovers(gallery: Path) -> int:
    """Staging folders of builds that died (call only while holding the index lock)."""
    leftovers = list(index_root(gallery).glob(".v-*.tmp"))
    for leftover in leftovers:
        shutil.rmtree(leftover, ignore_errors=True)
    return len(leftovers)


def publish(gallery: Path, index: faiss.Index, items: pa.Table, knn: tuple[np.ndarray, np.ndarray],
             meta: IndexMeta) -> Path:
    """Write a complete layout-1 version folder (one in-memory index, Parquet items and graph),
    then point CURRENT at it."""
    tmp = staging_folder(gallery, meta.version)
    faiss.write_index(index, str(tmp / "index.faiss"))
    write_parquet_atomic(items, tmp / "items.parquet")
    write_parquet_atomic(knn_table(*knn), tmp / "knn.parquet")
    with open(tmp / "index.faiss", "rb") as f:
        os.fsync(f.fileno())
    return publish_folder(gallery, tmp, meta)


def _records_of(folder: Path | None) -> dict:
    try:
        return json.loads((folder / "meta.json").read_text()).get("file_records", {}) if folder else {}
    except (OSError, ValueError):
        return {}


def publish_folder(gallery: Path, tmp: Path, meta: IndexMeta) -> Path:
    """Write meta.json into a complete staging folder, rename it into place and point CURRENT at
    it; keep the previous version for queries still reading it, remove older ones. The folder's
    other files must already be durable (each writer fsyncs its files)."""
    root = index_root(gallery)
    folder = root / meta.version
    names = meta.files() if meta.layout >= 2 else ["index.faiss", "items.parquet", "knn.parquet"]
    previous = current_version(gallery)
    previous_records = _records_of(previous)
    meta.file_records = file_records(tmp, [n for n in names if (tmp / n).is_file()], meta.version, previous,
                                     previous_records)
    write_text_atomic(tmp / "meta.json", json.dumps(asdict(meta), indent=2))
    fsync_dir(tmp)
    os.replace(tmp, folder)
    fsync_dir(root)
    write_text_atomic(root / CURRENT, meta.version)
    keep = {meta.version, previous.name if previous else None}
    for old in root.glob("v-*"):
        if old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)
    remove_leftovers(gallery)
    return folder


def version_name() -> str:
    return f"v-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"


@dataclass
class GalleryIndex:
    """A loaded index version: search it, look up what its ids are, read its kNN graph."""

    folder: Path
    meta: IndexMeta
    index: faiss.Index
    items: pa.Table
    on_gpu: bool = False
    searcher: object = None  # layout 2: reidx.indexers.searcher.Searcher (mapped lists, refine)

    @property
    def count(self) -> int:
        return self.index.ntotal

    def search(self, vectors: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(cosine distances (Q, k), faiss ids (Q, k)); nprobe defaults to the calibrated one."""
        if self.searcher is not None and not self.on_gpu:
            return self.searcher.search(vectors, k, nprobe)
        set_nprobe(self.index, nprobe or self.meta.nprobe, self.on_gpu)
        if self.searcher is not None and self.searcher.refine_factor:  # GPU ivf-pq: re-rank from disk too
            from reidx.indexers.searcher import REFINE_MIN_SHORTLIST, refine

            vectors = np.ascontiguousarray(vectors, np.float32)
            _, shortlist = search(self.index, vectors, max(k * self.searcher.refine_factor, REFINE_MIN_SHORTLIST))
            return refine(self.searcher.store, vectors, shortlist, k)
        return search(self.index, vectors, k)

    def knn(self) -> tuple[np.ndarray, np.ndarray]:
        """The whole graph as (N, k) arrays (what re-ranking takes today)."""
        if self.meta.layout >= 2:
            return self.knn_graph().to_arrays()
        return read_knn(self.folder)

    def knn_graph(self):
        """The layered graph (layout 2): ``lookup(rows)`` reads only those rows."""
        from reidx.indexers.knn_store import KnnGraph

        return KnnGraph(self.folder, self.meta.knn_layers, self.meta.count, self.meta.knn_k)


def read_items(folder: Path, meta: IndexMeta) -> pa.Table:
    """The items table; layout 2 maps its Arrow segments (rows are paged in only when touched)."""
    if meta.layout < 2:
        return pq.read_table(folder / "items.parquet")
    from reidx.indexers.build_tasks import items_name, items_schema

    tables = [pa.ipc.open_file(pa.memory_map(str(folder / items_name(i)))).read_all() for i in meta.item_segments]
    return pa.concat_tables(tables) if tables else items_schema().empty_table()


def load_index(gallery: str | os.PathLike, gpu: str = "auto") -> GalleryIndex:
    """The live version of GALLERY's index (retried once if a build swapped it while we opened it)."""
    from reidx.indexers.searcher import Searcher

    for attempt in range(2):
        folder = current_version(gallery)
        if folder is None:
            raise FileNotFoundError(f"{gallery} has no index yet: run `reidx build-index {gallery}` "
                                    f"(or `reidx nightly`) first")
        try:
            meta = read_meta(folder)
            searcher = None
            if meta.layout >= 2:
                searcher = Searcher(folder, asdict(meta))
                index = searcher.index
            else:
                index = faiss.read_index(str(folder / "index.faiss"))
            items = read_items(folder, meta)
            break
        except (FileNotFoundError, RuntimeError, ValueError, OSError) as exc:
            if attempt:  # not a build's swap: the live version itself is damaged
                raise IndexDamagedError(f"{gallery}'s index version {folder.name} cannot be read "
                                        f"({str(exc).splitlines()[0][:200]}): run `reidx verify {gallery} --repair`, "
                                        f"then `reidx build-index {gallery}`") from None
    on_gpu = resolve_gpu(gpu) and meta.type not in CPU_ONLY_TYPES
    if on_gpu:  # GPU search copies the lists into GPU memory (not run here: no GPU on this machine)
        index = to_gpu(index, meta.type)
    return GalleryIndex(folder, meta, index, items, on_gpu, searcher)
