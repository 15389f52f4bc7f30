"""Bulk query: query images → persons (the gallery's own models) → groups → filtered Faiss top-K →
optional re-ranking → ranked rows.

Stages: :mod:`reidx.indexers.query_inputs` (inputs → query persons), :mod:`reidx.indexers.query_groups`
(persons → queries: one per person or one per group, fused), :mod:`reidx.indexers.filters` (the
search filter, applied inside the search), the re-ranking of each query's candidates (here),
:mod:`reidx.indexers.results` (ranked Arrow table, schema documented there, and labelled metrics).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from reidx.indexers.distances import unit_euclidean_from_cosine
from reidx.indexers.filters import SearchFilter, filtered_search, image_identity, item_mask, self_items
from reidx.indexers.query_groups import fuse_mean, group_units, merge_min
from reidx.indexers.query_inputs import QueryPersons, collect_query_persons, gallery_model_spec, query_sources
from reidx.indexers.results import ranked_rows, score_results
from reidx.indexers.versions import GalleryIndex, load_index
from reidx.pipeline.atomic import write_parquet_atomic
from reidx.pipeline.embedding_table import embeddings_to_numpy
from reidx.pipeline.imaging import DEFAULT_MAX_PIXELS


def search_candidates(gallery_index: GalleryIndex, vectors: np.ndarray, k: int, nprobe: int | None = None,
                      batch_size: int = 1024, progress: bool = False, cluster: dict | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(cosine distances, ids) (Q, min(k, N)) of each vector's top-k gallery items, in batches.

    ``cluster`` (``{"workers": N}`` or ``{"scheduler": ADDRESS}``): the batches are searched on
    Dask workers that map the index themselves (:func:`bulk_search`; same results), in at least
    8 tasks so that every worker of a small cluster gets some."""
    from tqdm import tqdm

    if cluster:
        from reidx.indexers.bulk_query import bulk_search

        chunk = min(batch_size, max(1, -(-len(vectors) // 8)))
        return bulk_search(gallery_index, vectors, k, nprobe, chunk=chunk, **cluster)

    distances = np.empty((len(vectors), min(k, gallery_index.count)), np.float32)
    ids = np.empty(distances.shape, np.int64)
    bar = tqdm(total=len(vectors), unit="query", desc="search", disable=not progress)
    for start in range(0, len(vectors), batch_size):
        chunk = slice(start, start + batch_size)
        distances[chunk], ids[chunk] = gallery_index.search(vectors[chunk], k, nprobe=nprobe)
        bar.update(len(vectors[chunk]))
    bar.close()
    return distances, ids


def stored_profile(profile: dict | None) -> dict | None:
    """meta.json's adaptive re-ranking profile when this version of the rule wrote it, else None
    (re-ranking then computes it from the graph)."""
    from reidx.indexers.rerank_adaptive import PROFILE_VERSION

    return profile if profile and profile.get("version") == PROFILE_VERSION else None


def rerank_top(gallery_index: GalleryIndex, method: str, params, distances: np.ndarray, ids: np.ndarray,
               k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Re-rank each query's candidates with the stored kNN graph; returns the top-k (distances, ids, re-ranked)."""
    from reidx.indexers.rerank_sparse import rerank_candidates

    knn_ids, knn_dist = gallery_index.knn()
    if knn_ids.shape[1] == 0:
        raise ValueError(f"{gallery_index.folder.parent.parent} has no kNN graph for re-ranking: rebuild its index "
                         f"with `reidx build-index GALLERY --knn 30`")
    reranked = rerank_candidates(method, ids, unit_euclidean_from_cosine(distances), knn_ids,
                                 unit_euclidean_from_cosine(knn_dist), params=params,
                                 profile=stored_profile(gallery_index.meta.rerank_profile))
    order = np.argsort(reranked, axis=1, kind="stable")[:, :k]
    return (np.take_along_axis(distances, order, 1), np.take_along_axis(ids, order, 1),
            np.take_along_axis(reranked, order, 1))


def search_persons(gallery_index: GalleryIndex, persons: QueryPersons, *, top_k: int = 100,
                   search_filter: SearchFilter = SearchFilter(), group_by: tuple[str, ...] = (), fusion: str = "mean",
                   rerank: str = "none", rerank_params=None, candidates: int = 400, nprobe: int | None = None,
                   batch_size: int = 1024, progress: bool = False, mechanism: str | None = None,
                   cluster: dict | None = None) -> pa.Table:
    """Query persons (already embedded) → ranked rows in the query-results schema.

    Persons are grouped into queries (``group_by``, fused by ``fusion``), each query's candidates
    are found among the gallery items passing ``search_filter`` (inside the search), then re-ranked.
    ``cluster``: unfiltered searches run on Dask workers (:func:`search_candidates`); filtered
    searches run in this process.
    """
    rerank_distances = units = None
    k = min(top_k, gallery_index.count)
    search_k = max(k, candidates or 0) if rerank != "none" else k
    if persons.table is not None:
        vectors = embeddings_to_numpy(persons.table["embedding"])
        units = group_units(persons.table, persons.paths, group_by)
        cameras = persons.table["camera"].to_pylist()
        member_cameras = [frozenset(cameras[r] for r in rows if cameras[r] is not None) for rows in units.members]
        excluded = None
        if search_filter.exclude_self:
            images = [image_identity(u, m) for u, m in zip(persons.table["source_uri"].to_pylist(),
                                                             persons.table["member"].to_pylist())]
            own = self_items(gallery_index.items, set(images))
            excluded = [np.unique(np.concatenate([own.get(images[r], np.zeros(0, np.int64)) for r in rows]))
                        for rows in units.members]
        if fusion == "min" and group_by:  # each member searched with its group's filter, lists merged
            member_unit = np.empty(len(vectors), np.int64)
            for unit, rows in enumerate(units.members):
                member_unit[rows] = unit
            distances, ids = _search(gallery_index, vectors, search_k, search_filter,
                                     [member_cameras[u] for u in member_unit],
                                     [excluded[u] for u in member_unit] if excluded is not None else None,
                                     nprobe, batch_size, progress, mechanism, cluster)
            distances, ids = merge_min(distances, ids, units, search_k)
        elif fusion in ("mean", "min"):
            queries = fuse_mean(vectors, units) if group_by else vectors
            distances, ids = _search(gallery_index, queries, search_k, search_filter, member_cameras, excluded,
                                     nprobe, batch_size, progress, mechanism, cluster)
        else:
            raise ValueError(f"unknown fusion {fusion!r}; use mean or min")
        if rerank != "none":
            distances, ids, rerank_distances = rerank_top(gallery_index, rerank, rerank_params, distances, ids, k)
        else:
            ids, distances = ids[:, :k], distances[:, :k]
    else:
        distances = ids = np.zeros((0, 0))
    return ranked_rows(persons, gallery_index, distances, ids, rerank, rerank_distances, units)


def _search(gallery_index, vectors, k, search_filter, cameras, excluded, nprobe, batch_size, progress, mechanism,
            cluster):
    if not search_filter.active:
        return search_candidates(gallery_index, vectors, k, nprobe, batch_size, progress)
    return filtered_search(gallery_index, vectors, k, search_filter, cameras, excluded, nprobe=nprobe,
                           mechanism=mechanism, batch_size=batch_size)


def query_gallery(gallery_index: GalleryIndex, inputs: list[str], *, top_k: int = 100, detect: bool = False,
                  largest: bool = False, rerank: str = "none", rerank_params=None, candidates: int = 400,
                  nprobe: int | None = None, weights: str | None = None, backend: str = "auto", device: str = "auto",
                  detector: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS, batch_size: int = 1024,
                  search_filter: SearchFilter = SearchFilter(), group_by: tuple[str, ...] = (), fusion: str = "mean",
                  progress: bool = False, cluster: dict | None = None) -> tuple[pa.Table, int]:
    """Every person in ``inputs`` searched in a loaded gallery index → (ranked rows in the query-results
    schema, with run metadata; number of query persons)."""
    gallery = gallery_index.folder.parent.parent
    spec = gallery_model_spec(gallery, gallery_index, weights, backend, device, detector, max_pixels)
    persons = collect_query_persons(query_sources(inputs, detect), spec, largest, progress=progress)
    results = search_persons(gallery_index, persons, top_k=top_k, search_filter=search_filter, group_by=group_by,
                             fusion=fusion, rerank=rerank, rerank_params=rerank_params, candidates=candidates,
                             nprobe=nprobe, batch_size=batch_size, progress=progress, cluster=cluster)
    return with_run_metadata(results, gallery_index, rerank, rerank_params, search_filter, group_by, fusion), \
        0 if persons.table is None else persons.table.num_rows


def with_run_metadata(results: pa.Table, gallery_index: GalleryIndex, rerank: str, rerank_params,
                      search_filter: SearchFilter, group_by: tuple[str, ...], fusion: str) -> pa.Table:
    meta = gallery_index.meta
    gallery = gallery_index.folder.parent.parent
    metadata = {**results.schema.metadata, b"reidx.index_version": meta.version.encode(),
                b"reidx.embedder": f"{meta.embedder}@{meta.embedder_sha256[:12]}".encode(),
                b"reidx.gallery": str(Path(gallery).resolve()).encode(),
                b"reidx.rerank": json.dumps({"method": rerank, "params": dataclasses.asdict(rerank_params)
                                             if rerank_params is not None else None}).encode(),
                b"reidx.filter": json.dumps(search_filter.describe()).encode(),
                b"reidx.group": json.dumps({"group_by": list(group_by), "fusion": fusion if group_by else None}).encode()}
    return results.replace_schema_metadata(metadata)


def run_query(gallery: str | os.PathLike, inputs: list[str], out: str | os.PathLike, *, gpu: str = "auto",
              score: bool = False, **options) -> dict:
    """Query GALLERY with every person in ``inputs``; write ranked rows to ``out`` (Parquet); return a summary.

    ``options`` are :func:`query_gallery`'s. ``score``: also report Market-1501 metrics, for when
    queries and gallery share one label space (person ids from different datasets must not be
    compared, so this is asked for, not guessed).
    """
    started = time.perf_counter()
    gallery_index = load_index(gallery, gpu=gpu)
    results, query_persons = query_gallery(gallery_index, inputs, **options)
    write_parquet_atomic(results, out)
    statuses = results["status"].to_pylist()
    search_filter = options.get("search_filter", SearchFilter())
    summary = {"out": str(out), "gallery": str(gallery), "index_version": gallery_index.meta.version,
               "index_type": gallery_index.meta.type, "query_persons": query_persons,
               "images_without_person": statuses.count("no_person"), "images_failed": statuses.count("failed"),
               "rows": results.num_rows, "top_k": min(options.get("top_k", 100), gallery_index.count),
               "rerank": options.get("rerank", "none")}
    if options.get("group_by"):
        ok = results.filter(pc.equal(results["status"], "ok"))
        summary.update(query_groups=len(set(ok["query_id"].to_pylist())), group_by=",".join(options["group_by"]),
                       fusion=options.get("fusion", "mean"))
    if search_filter.active:
        summary["filter"] = search_filter.describe()
    allowed = item_mask(gallery_index.items, search_filter) if search_filter.per_item else None
    scores = score_results(results, gallery_index.items, allowed) if score else None
    if scores is not None:
        summary["metrics"] = scores
    summary["wall_s"] = round(time.perf_counter() - started, 2)
    return summary
