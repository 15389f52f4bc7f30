"""Gallery shards: detections with their embeddings, as Parquet files under ``GALLERY/shards/``.

Schema version 2 (documented in docs/schemas.md), one row per detected person:

==================  ==============================  ==========================================
column              type                            meaning
==================  ==============================  ==========================================
detection_id        string                          ``<sha1(image_key)[:20]>-<k>``: stable, unique
image_key           string                          ``<source name>/<member path>``
source              string                          manifest source name
source_uri          string                          the source's uri
member              string                          POSIX path of the image inside the source
camera              string, null                    from the manifest (constant or regex)
timestamp           timestamp[ms], null             from the manifest (regex + format)
frame_width         int32                           decoded (EXIF-upright) image width
frame_height        int32                           decoded (EXIF-upright) image height
x1, y1, x2, y2      float32                         person box in frame pixels
score               float32                         detection score (1.0 for crop sources)
embedding           fixed_size_list<float32>[D]     unit-length ReID embedding (or float16 when the gallery
                                                    asks for it, ``embedding_dtype`` in gallery.json: half
                                                    the disk and I/O; readers always get float32)
embedder            string                          embedder model name
embedder_sha256     string                          sha256 of the embedder weights
detector            string, null                    detector model name (null for crops)
detector_sha256     string, null                    sha256 of the detector weights
person_id           int64, null                     label from the manifest, when it gives one
frame_index         int32, null                     video sources: the decoded frame's index in the video
track_id            string, null                    video sources: ``<image_key of the video>#<n>``, one
                                                    person followed within one camera (pipeline/tracking.py)
==================  ==============================  ==========================================

Version 1 shards (no ``frame_index``/``track_id``) read as version 2 with both null.

Readers never need a gallery in memory: :func:`iter_shard_batches` streams vectors (and
metadata) in bounded batches, :func:`shard_row_counts` counts rows from the Parquet footers.

Shards are written atomically (temporary name, fsync, rename) and become part of the gallery
only once the ledger names them (see :mod:`pipeline.ledger`); an unnamed shard is a crash
leftover and is removed on the next run.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reidx.pipeline.atomic import write_parquet_atomic
from reidx.pipeline.embedding_table import embeddings_to_numpy
from reidx.pipeline.gallery import read_config, shards_dir

SHARD_SCHEMA_VERSION = "2"
EMBEDDING_DTYPES = {"float32": pa.float32(), "float16": pa.float16()}
DEFAULT_BATCH_ROWS = 65536  # ≈ 128 MiB of float32 × 512 vectors per streamed batch


def shard_schema(dim: int, dtype: str = "float32") -> pa.Schema:
    fields = [
        ("detection_id", pa.string()), ("image_key", pa.string()), ("source", pa.string()),
        ("source_uri", pa.string()), ("member", pa.string()), ("camera", pa.string()),
        ("timestamp", pa.timestamp("ms")), ("frame_width", pa.int32()), ("frame_height", pa.int32()),
        ("x1", pa.float32()), ("y1", pa.float32()), ("x2", pa.float32()), ("y2", pa.float32()),
        ("score", pa.float32()), ("embedding", pa.list_(EMBEDDING_DTYPES[dtype], dim)), ("embedder", pa.string()),
        ("embedder_sha256", pa.string()), ("detector", pa.string()), ("detector_sha256", pa.string()),
        ("person_id", pa.int64()), ("frame_index", pa.int32()), ("track_id", pa.string()),
    ]
    nullable = {"camera", "timestamp", "detector", "detector_sha256", "person_id", "frame_index", "track_id"}
    metadata = {"reidx.schema": "gallery-shard", "reidx.schema_version": SHARD_SCHEMA_VERSION}
    return pa.schema([pa.field(n, t, nullable=n in nullable) for n, t in fields], metadata=metadata)


def image_key(source: str, member: str) -> str:
    return f"{source}/{member}"


def detection_id(key: str, index: int) -> str:
    """Stable across reruns: the same image and detection order always give the same id."""
    return f"{hashlib.sha1(key.encode()).hexdigest()[:20]}-{index}"


def new_shard_name() -> str:
    """A name no other run or worker can pick: shards are never overwritten, only added or removed."""
    return f"part-{uuid.uuid4().hex}.parquet"


def embedding_dtype(gallery: str | os.PathLike) -> str:
    """The dtype the gallery stores embeddings in: ``float32`` unless its gallery.json says ``float16``."""
    dtype = read_config(gallery).get("embedding_dtype", "float32")
    if dtype not in EMBEDDING_DTYPES:
        raise ValueError(f"gallery.json embedding_dtype must be one of {sorted(EMBEDDING_DTYPES)}, got {dtype!r}")
    return dtype


def with_embedding_dtype(table: pa.Table, dtype: str) -> pa.Table:
    """The table with its embedding column stored as ``dtype`` (float16 halves shards; unit vectors
    lose ≈ 1e-3 relative precision, measured effect on mAP in docs/scaling.md)."""
    column = table["embedding"]
    target = pa.list_(EMBEDDING_DTYPES[dtype], column.type.list_size)
    if column.type == target:
        return table
    values = embeddings_to_numpy(column).astype(np.float16 if dtype == "float16" else np.float32)
    array = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), column.type.list_size)
    field = table.schema.field("embedding").with_type(target)
    return table.set_column(table.schema.get_field_index("embedding"), field, array)


def write_shard(table: pa.Table, gallery: str | os.PathLike, name: str | None = None, dtype: str | None = None) -> str:
    """Write a shard durably under ``GALLERY/shards/``; return its file name. ``dtype`` (default:
    the gallery's :func:`embedding_dtype`) is what the embeddings are stored as."""
    name = name or new_shard_name()
    write_parquet_atomic(with_embedding_dtype(table, dtype or embedding_dtype(gallery)), shards_dir(gallery) / name)
    return name


def shard_files(gallery: str | os.PathLike) -> list[Path]:
    folder = shards_dir(gallery)
    return sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []


def shard_row_counts(gallery: str | os.PathLike, names: list[str]) -> np.ndarray:
    """Rows per shard from the Parquet footers (no data read)."""
    return np.array([pq.ParquetFile(shards_dir(gallery) / n).metadata.num_rows for n in names], np.int64)


def iter_shard_batches(gallery: str | os.PathLike, names: list[str], batch_rows: int = DEFAULT_BATCH_ROWS,
                       metadata: bool = False, dtype=np.float32):
    """Yield ``(shard name, metadata table or None, vectors (n, D))`` batches of at most
    ``batch_rows`` rows, shard by shard in order: memory is one batch, whatever the gallery size.
    Vectors are float32 unless ``dtype=None`` (the stored dtype, float16 or float32)."""
    for name in names:
        file = pq.ParquetFile(shards_dir(gallery) / name)
        columns = None if metadata else ["embedding"]
        for batch in file.iter_batches(batch_size=batch_rows, columns=columns):
            table = pa.Table.from_batches([batch])
            vectors = embeddings_to_numpy(table["embedding"], dtype)
            meta = table.drop_columns(["embedding"]) if metadata else None
            yield name, meta, vectors


def read_shards(gallery: str | os.PathLike, names: list[str]) -> tuple[pa.Table, np.ndarray]:
    """(metadata table with a ``shard`` column, embeddings (N, D) float32) of the named shards, in order."""
    metas, vectors = [], []
    for name in names:
        table = pq.read_table(shards_dir(gallery) / name)
        vectors.append(embeddings_to_numpy(table["embedding"]))
        table = table.drop_columns(["embedding"])
        metas.append(table.append_column("shard", pa.array([name] * table.num_rows, pa.string())))
    if not metas:
        return pa.table({}), np.zeros((0, 0), np.float32)
    return pa.concat_tables(metas, promote_options="permissive"), np.concatenate(vectors)
