"""Bulk query: query images → persons (the gallery's own models) → Faiss top-K → optional re-ranking → ranked rows.

Stages: :mod:`reidx.indexers.query_inputs` (inputs → query persons), the index search and the
re-ranking of each query's candidates (here), :mod:`reidx.indexers.results` (ranked Arrow table,
schema documented there, and labelled metrics).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from reidx.indexers.distances import unit_euclidean_from_cosine
from reidx.indexers.query_inputs import collect_query_persons, gallery_model_spec, query_sources
from reidx.indexers.results import ranked_rows, score_results
from reidx.indexers.versions import GalleryIndex, load_index
from reidx.pipeline.atomic import write_parquet_atomic
from reidx.pipeline.embedding_table import embeddings_to_numpy
from reidx.pipeline.imaging import DEFAULT_MAX_PIXELS


def search_candidates(gallery_index: GalleryIndex, vectors: np.ndarray, k: int, nprobe: int | None = None,
                      batch_size: int = 1024, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(cosine distances, ids) (Q, min(k, N)) of each vector's top-k gallery items, in batches."""
    from tqdm import tqdm

    distances = np.empty((len(vectors), min(k, gallery_index.count)), np.float32)
    ids = np.empty(distances.shape, np.int64)
    bar = tqdm(total=len(vectors), unit="query", desc="search", disable=not progress)
    for start in range(0, len(vectors), batch_size):
        chunk = slice(start, start + batch_size)
        distances[chunk], ids[chunk] = gallery_index.search(vectors[chunk], k, nprobe=nprobe)
        bar.update(len(vectors[chunk]))
    bar.close()
    return distances, ids


def rerank_top(gallery_index: GalleryIndex, method: str, params, distances: np.ndarray, ids: np.ndarray,
               k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Re-rank each query's candidates with the stored kNN graph; returns the top-k (distances, ids, re-ranked)."""
    from reidx.indexers.rerank_sparse import rerank_candidates

    knn_ids, knn_dist = gallery_index.knn()
    if knn_ids.shape[1] == 0:
        raise ValueError(f"{gallery_index.folder.parent.parent} has no kNN graph for re-ranking: rebuild its index "
                         f"with `reidx build-index GALLERY --knn 30`")
    reranked = rerank_candidates(method, ids, unit_euclidean_from_cosine(distances), knn_ids,
                                 unit_euclidean_from_cosine(knn_dist), params=params)
    order = np.argsort(reranked, axis=1, kind="stable")[:, :k]
    return (np.take_along_axis(distances, order, 1), np.take_along_axis(ids, order, 1),
            np.take_along_axis(reranked, order, 1))


def query_gallery(gallery_index: GalleryIndex, inputs: list[str], *, top_k: int = 100, detect: bool = False,
                  largest: bool = False, rerank: str = "none", rerank_params=None, candidates: int = 400,
                  nprobe: int | None = None, weights: str | None = None, backend: str = "auto", device: str = "auto",
                  detector: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS, batch_size: int = 1024,
                  progress: bool = False) -> tuple[pa.Table, int]:
    """Every person in ``inputs`` searched in a loaded gallery index → (ranked rows in the query-results
    schema, with run metadata; number of query persons)."""
    gallery = gallery_index.folder.parent.parent
    spec = gallery_model_spec(gallery, gallery_index, weights, backend, device, detector, max_pixels)
    persons = collect_query_persons(query_sources(inputs, detect), spec, largest, progress=progress)
    rerank_distances = None
    k = min(top_k, gallery_index.count)
    if persons.table is not None:
        vectors = embeddings_to_numpy(persons.table["embedding"])
        search_k = max(k, candidates or 0) if rerank != "none" else k
        distances, ids = search_candidates(gallery_index, vectors, search_k, nprobe, batch_size, progress)
        if rerank != "none":
            distances, ids, rerank_distances = rerank_top(gallery_index, rerank, rerank_params, distances, ids, k)
        else:
            ids, distances = ids[:, :k], distances[:, :k]
    else:
        distances = ids = np.zeros((0, 0))
    results = ranked_rows(persons, gallery_index, distances, ids, rerank, rerank_distances)
    meta = gallery_index.meta
    metadata = {**results.schema.metadata, b"reidx.index_version": meta.version.encode(),
                b"reidx.embedder": f"{meta.embedder}@{meta.embedder_sha256[:12]}".encode(),
                b"reidx.gallery": str(Path(gallery).resolve()).encode(),
                b"reidx.rerank": json.dumps({"method": rerank, "params": dataclasses.asdict(rerank_params)
                                             if rerank_params is not None else None}).encode()}
    return results.replace_schema_metadata(metadata), 0 if persons.table is None else persons.table.num_rows


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
    summary = {"out": str(out), "gallery": str(gallery), "index_version": gallery_index.meta.version,
               "index_type": gallery_index.meta.type, "query_persons": query_persons,
               "images_without_person": statuses.count("no_person"), "images_failed": statuses.count("failed"),
               "rows": results.num_rows, "top_k": min(options.get("top_k", 100), gallery_index.count),
               "rerank": options.get("rerank", "none"), "wall_s": round(time.perf_counter() - started, 2)}
    scores = score_results(results, gallery_index.items) if score else None
    if scores is not None:
        summary["metrics"] = scores
    return summary
