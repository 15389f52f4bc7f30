"""The units of work of an index build and of a bulk query: what one Dask worker (or the driver) runs.

Each reads its inputs from files, writes its outputs as files into the version folder being
built, and returns a small dict; memory is one streamed batch plus what the task produces
(one part's codes), independent of the gallery size.

- :func:`ingest_shards`: some shards → the items segment (metadata, Arrow IPC), the vector
  segment (exact vectors, .npy) and a training sample.
- :func:`add_segment`: a vector segment → an IVF part (an empty copy of the trained index, filled).
- :func:`knn_range`: graph rows of a range of ids, from the index being built.
- :func:`search_queries`: a chunk of a bulk query against a published version.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from reidx.indexers.distributed import worker_threads
from reidx.indexers.graph_codes import lists_name, open_graph_codes, probes_name
from reidx.indexers.ivf_ondisk import add_part
from reidx.indexers.knn_graph import knn_rows
from reidx.indexers.knn_store import DenseLayerWriter
from reidx.indexers.searcher import open_searcher
from reidx.indexers.vector_store import SegmentWriter, VectorStore, segment_name
from reidx.pipeline.shards import DEFAULT_BATCH_ROWS, iter_shard_batches, shard_row_counts, shard_schema

KNN_BLOCK = 16384  # graph rows searched per call


def items_name(first_id: int) -> str:
    return f"items-{first_id:012d}.arrow"


def items_schema() -> pa.Schema:
    """One row per Faiss id: every shard column but the embedding, the shard's name, the id."""
    fields = [f for f in shard_schema(1) if f.name != "embedding"]
    return pa.schema(fields + [pa.field("shard", pa.string()), pa.field("faiss_id", pa.int64())],
                     metadata={"reidx.schema": "index-items", "reidx.schema_version": "1"})


def _items_batch(meta: pa.Table, shard: str, ids: np.ndarray, schema: pa.Schema) -> pa.RecordBatch:
    """Conform a shard batch to the items schema (version 1 shards lack frame_index/track_id: nulls)."""
    n = meta.num_rows
    columns = []
    for field in schema:
        if field.name == "shard":
            columns.append(pa.array([shard] * n, pa.string()))
        elif field.name == "faiss_id":
            columns.append(pa.array(ids, pa.int64()))
        elif field.name in meta.column_names:
            columns.append(meta[field.name].combine_chunks().cast(field.type))
        else:
            columns.append(pa.nulls(n, field.type))
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def ingest_shards(gallery: str, shards: list[str], first_id: int, folder: str, sample_fraction: float = 0.0,
                  seed: int = 0, batch_rows: int = DEFAULT_BATCH_ROWS) -> dict:
    """Stream ``shards`` once (the only read of the Parquet files): ids first_id.. in shard order
    go into the vector segment (shards' dtype) and the items segment. Returns the count, the dim,
    the (embedder, sha256) pairs seen and a seeded random ``sample`` of about ``sample_fraction``
    of the rows (float32; the same whichever worker ran it), for training."""
    worker_threads()
    folder = Path(folder)
    count = int(shard_row_counts(gallery, shards).sum())
    schema = items_schema()
    segment = items = None
    embedders, samples, next_id = set(), [], first_id
    rng = np.random.default_rng([seed, first_id])
    for shard, meta, vectors in iter_shard_batches(gallery, shards, batch_rows, metadata=True, dtype=None):
        if segment is None:
            segment = SegmentWriter(folder / segment_name(first_id), count, vectors.shape[1], vectors.dtype)
            items = pa.ipc.new_file(str(folder / items_name(first_id)), schema)
        elif vectors.shape[1] != segment.shape[1]:
            raise ValueError(f"shard {shard} has {vectors.shape[1]}-dimensional embeddings, others {segment.shape[1]}")
        ids = np.arange(next_id, next_id + len(vectors), dtype=np.int64)
        next_id += len(vectors)
        segment.write(vectors)
        items.write_batch(_items_batch(meta, shard, ids, schema))
        embedders |= set(zip(meta["embedder"].to_pylist(), meta["embedder_sha256"].to_pylist()))
        if sample_fraction > 0:
            samples.append(vectors[rng.random(len(vectors)) < sample_fraction].astype(np.float32))
    segment.close()
    items.close()
    _fsync(folder / items_name(first_id))
    dim = segment.shape[1]
    return {"first_id": first_id, "count": count, "dim": dim, "dtype": str(segment.dtype),
            "embedders": sorted(embedders),
            "sample": np.concatenate(samples) if samples else np.zeros((0, dim), np.float32)}


def add_segment(folder: str, first_id: int, templates: list[bytes], parts: list[str], probes: int = 0,
                batch_rows: int = DEFAULT_BATCH_ROWS) -> int:
    """Add one vector segment (ids first_id..) to an empty copy of each trained template (the
    index, then the graph codes) with one list assignment; write them as the IVF ``parts`` and the
    assignment as ``lists-<first_id>.npy``; with ``probes``, each vector's that many nearest lists
    as ``probes-<first_id>.npy`` too (a nightly's new graph rows, ``graph_codes``). Returns the
    count. Memory: the parts' codes plus one batch."""
    worker_threads()
    store = VectorStore(Path(folder), [first_id])
    blocks = ((np.arange(first, first + len(v)), v) for first, v in store.iter_blocks(batch_rows))
    nearest = add_part(templates, blocks, [Path(folder) / p for p in parts], max(1, probes))
    if len(templates) > 1:  # graph codes: their rows look up each item's list (and, in a nightly, its probes)
        outputs = {lists_name(first_id): nearest[:, 0]}
        if probes:
            outputs[probes_name(first_id)] = nearest
        for name, array in outputs.items():
            np.save(Path(folder) / name, np.ascontiguousarray(array))
            _fsync(Path(folder) / name)
    return len(nearest)


def knn_range(folder: str, layout: dict, start: int, stop: int, k: int, layer: str) -> str:
    """Graph rows of ids start..stop-1 (vectors from the version's store, neighbours from its graph
    codes, or from its index as it searches, refine included) written as one dense layer; returns its name."""
    worker_threads()
    search = graph_search(Path(folder), layout)
    store = VectorStore(Path(folder), layout["vector_segments"])
    writer = DenseLayerWriter(Path(folder), layer, start, stop - start, k)
    for first in range(start, stop, KNN_BLOCK):
        last = min(stop, first + KNN_BLOCK)
        own = np.arange(first, last)
        ids, dist = knn_rows(lambda v, kk: search(own, v, kk), store.read(first, last), own, k)
        writer.write(ids, dist)
    return writer.close()


def graph_search(folder: Path, layout: dict):
    """``search(ids, vectors, k)`` for indexed items' graph rows at the layout's graph breadth:
    the graph codes where the version has them, else the index as queries search it."""
    if layout.get("graph_files"):
        codes = open_graph_codes(folder, layout)
        exact = bool(layout.get("knn_exact_coarse"))
        return lambda ids, vectors, k: codes.search(ids, vectors, k, layout["knn_breadth"], exact)
    searcher = open_searcher(folder, layout)
    return lambda ids, vectors, k: searcher.search(vectors, k, layout.get("knn_breadth") or layout["nprobe"])


def search_queries(folder: str, layout: dict, vectors: np.ndarray, k: int, nprobe: int | None) -> tuple:
    """One chunk of a bulk query: (cosine distances, ids) from the memory-mapped version."""
    worker_threads()
    return open_searcher(Path(folder), layout).search(vectors, k, nprobe)


def _fsync(path: Path) -> None:
    import os

    with open(path, "rb") as f:
        os.fsync(f.fileno())
