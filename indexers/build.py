"""``reidx build-index``: build or update a gallery's index from its committed shards.

Orchestration only: Faiss work is :mod:`reidx.indexers.faiss_ops`, the kNN graph
:mod:`reidx.indexers.knn_graph`, publishing and loading :mod:`reidx.indexers.versions`.
A build holds the gallery's index lock, writes a complete new version and swaps it in.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reidx.indexers.faiss_ops import (DEFAULT_KNN, RETRAIN_GROWTH, TARGET_RECALL_AT_100, IndexBuildError, calibrate_nprobe,
                                      choose_type, default_nlist, resolve_gpu, set_nprobe, to_cpu, to_gpu, train_and_add)
from reidx.indexers.knn_graph import knn_graph, merge_new_neighbours, read_knn
from reidx.indexers.versions import IndexMeta, current_version, index_root, publish, version_name
from reidx.pipeline.gallery import SHARDS_DIR, is_gallery
from reidx.pipeline.integrity import damaged_shards, version_problem
from reidx.pipeline.ledger import committed_shards
from reidx.pipeline.lock import GalleryLock
from reidx.pipeline.shards import read_shards

def _embedder_of(items: pa.Table) -> tuple[str, str]:
    pairs = set(zip(items["embedder"].to_pylist(), items["embedder_sha256"].to_pylist()))
    if len(pairs) != 1:
        raise IndexBuildError(f"the shards hold embeddings of {len(pairs)} embedders ({sorted(pairs)}); "
                          f"one index holds one embedder's vectors")
    return pairs.pop()


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
    if not is_gallery(gallery):
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
        damage = version_problem(previous) if previous else None
        if damage:
            log(f"the live index {previous.name} is damaged ({damage}): building afresh")
            previous = None
        old_meta = IndexMeta(**json.loads((previous / "meta.json").read_text())) if previous else None
        new_shards = [s for s in shards if not old_meta or s not in set(old_meta.shards)]
        refuse_damaged(gallery, new_shards if old_meta else shards)
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
        meta = IndexMeta(version=version_name(), type=kind, metric="inner_product", dim=index.d,
                         embedder=embedder[0], embedder_sha256=embedder[1], count=index.ntotal,
                         trained_count=trained_count, nlist=nlist_used, nprobe=nprobe,
                         recall_at_10=round(r10, 4), recall_at_100=round(r100, 4),
                         knn_k=int(knn_ids.shape[1]) if knn_k else 0, shards=shards,
                         built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                         build={"mode": mode, "gpu": on_gpu, "reason": reason,
                                "seconds": round(time.perf_counter() - started, 2)})
        publish(gallery, to_cpu(index, on_gpu), items, (knn_ids, knn_dist), meta)
    added = int(new_items.num_rows) if mode == "incremental" else meta.count
    return _summary(gallery, meta, mode, reason, added, on_gpu, started)


def refuse_damaged(gallery: Path, shards: list[str]) -> None:
    """Never index a shard that differs from what was committed (checksum, rows, finite unit vectors)."""
    damaged = damaged_shards(gallery, shards)
    if damaged:
        name, problem = next(iter(damaged.items()))
        raise IndexBuildError(f"{len(damaged)} committed shard(s) are damaged, e.g. {name}: {problem}; run "
                              f"`reidx verify {gallery} --repair` (their images are indexed again next night)")


def _summary(gallery: Path, meta: IndexMeta, mode: str, reason: str | None, added: int, on_gpu: bool,
             started: float) -> dict:
    """What `reidx build-index --json` prints: the live version's figures and what this run did."""
    return {"gallery": str(gallery), "index_version": meta.version, "mode": mode, "reason": reason,
            "index_type": meta.type, "persons": meta.count, "persons_added": added, "nlist": meta.nlist,
            "nprobe": meta.nprobe, "recall_at_10": meta.recall_at_10, "recall_at_100": meta.recall_at_100,
            "knn_k": meta.knn_k, "gpu": on_gpu, "wall_s": round(time.perf_counter() - started, 2)}


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
