"""Index versions on disk: publish a complete version atomically, load the live one.

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

from reidx.indexers.faiss_ops import resolve_gpu, search, set_nprobe, to_gpu
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
    files: dict = field(default_factory=dict)  # {file: {size, sha256}}: `reidx verify` and builds check them


def index_root(gallery: str | os.PathLike) -> Path:
    return index_dir(gallery)


def current_version(gallery: str | os.PathLike) -> Path | None:
    pointer = index_root(gallery) / CURRENT
    if not pointer.exists():
        return None
    folder = index_root(gallery) / pointer.read_text().strip()
    return folder if folder.is_dir() else None


def publish(gallery: Path, index: faiss.Index, items: pa.Table, knn: tuple[np.ndarray, np.ndarray],
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
    with open(tmp / "index.faiss", "rb") as f:
        os.fsync(f.fileno())
    meta.files = file_records(tmp, ["index.faiss", "items.parquet", "knn.parquet"])
    write_text_atomic(tmp / "meta.json", json.dumps(asdict(meta), indent=2))
    os.replace(tmp, folder)
    fsync_dir(root)
    previous = current_version(gallery)
    write_text_atomic(root / CURRENT, meta.version)
    keep = {meta.version, previous.name if previous else None}
    for old in root.glob("v-*"):
        if old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)
    for leftover in root.glob(".v-*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)
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
        except (FileNotFoundError, RuntimeError, ValueError) as exc:
            if attempt:  # not a build's swap: the live version itself is damaged
                raise IndexDamagedError(f"{gallery}'s index version {folder.name} cannot be read "
                                        f"({str(exc).splitlines()[0][:200]}): run `reidx verify {gallery} --repair`, "
                                        f"then `reidx build-index {gallery}`") from None
    on_gpu = resolve_gpu(gpu)
    if on_gpu:
        index = to_gpu(index, meta.type)
    return GalleryIndex(folder, meta, index, items, on_gpu)
