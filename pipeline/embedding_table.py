"""Embedded crops as an Arrow table, written to and read from Parquet.

Schema (version 2), one row per input image, in input order:

| column      | type                          | meaning                                         |
|-------------|-------------------------------|-------------------------------------------------|
| path        | string                        | absolute path of the image                      |
| person_id   | int64, null                   | identity from Market naming or a label table    |
| camera      | string, null                  | camera from Market naming or a label table      |
| embedding   | fixed_size_list<float32>[D], null | unit-length feature; null if the image failed |
| error       | string, null                  | why the image could not be embedded, else null  |

The Parquet file's key-value metadata records the embedder (``reidx.embedder``: name,
``reidx.weights_sha256``, ``reidx.backend``, ``reidx.dim``) so a table is never compared with
features of another model. Version 1 tables (camera as int64) are read with the camera cast to
string (:mod:`reidx.pipeline.labels`: a camera is a string everywhere).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:  # the types only: this module must not import torch
    from reidx.pipeline.embed import EmbedderInfo
    from reidx.pipeline.embed_files import EmbeddedFiles

SCHEMA_VERSION = "2"


def embedding_array(embeddings: np.ndarray, valid: np.ndarray | None = None) -> pa.FixedSizeListArray:
    """(N, D) float32 → ``fixed_size_list<float32>[D]``, null where ``valid`` is False."""
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, dim = embeddings.shape
    values = pa.array(embeddings.reshape(-1), type=pa.float32())
    mask = None if valid is None else pa.array(~np.asarray(valid, dtype=bool))
    return pa.FixedSizeListArray.from_arrays(values, dim, mask=mask)


def as_float32(vectors: np.ndarray) -> np.ndarray:
    """float32 rows; float16 through Faiss' fp16 decoder (F16C, threaded: 3× numpy's cast, and
    numpy's is 10× slower again on the subnormals that small embedding values become), bit-equal.
    Faiss is imported here only as that decoder."""
    if vectors.dtype != np.float16 or not vectors.size:
        return vectors.astype(np.float32, copy=False)
    import faiss

    decoder = faiss.ScalarQuantizer(vectors.shape[-1], faiss.ScalarQuantizer.QT_fp16)
    flat = np.ascontiguousarray(vectors).reshape(-1, vectors.shape[-1])
    return decoder.decode(flat.view(np.uint8)).reshape(vectors.shape)


def embeddings_to_numpy(column: pa.ChunkedArray | pa.FixedSizeListArray, dtype=np.float32) -> np.ndarray:
    """``fixed_size_list<float>[D]`` column (no nulls) → (N, D) array, without copying rows one by one.

    float32 by default (float16 shards are widened: Faiss and the models compute in float32);
    ``dtype=None`` keeps the stored dtype (float16 stays half the size, e.g. for an on-disk copy)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if column.null_count:
        raise ValueError("embedding column has nulls; filter failed rows first")
    dim = column.type.list_size
    values = column.flatten().to_numpy(zero_copy_only=False)
    if dtype is None:
        return values.reshape(-1, dim)
    if np.dtype(dtype) == np.float32:
        return as_float32(values.reshape(-1, dim))
    return values.astype(dtype, copy=False).reshape(-1, dim)


def build_table(crops: pa.Table, result: EmbeddedFiles, info: EmbedderInfo) -> pa.Table:
    """Join a crop set (path, person_id, camera) with its embeddings and errors."""
    table = crops.append_column("embedding", embedding_array(np.nan_to_num(result.embeddings), result.ok))
    table = table.append_column("error", pa.array(result.errors, pa.string()))
    metadata = {
        "reidx.schema": "embedded-crops",
        "reidx.schema_version": SCHEMA_VERSION,
        "reidx.embedder": info.name,
        "reidx.weights_sha256": info.weights_sha256,
        "reidx.backend": info.backend,
        "reidx.dim": str(info.dim),
    }
    return table.replace_schema_metadata(metadata)


def read_table(path: str | os.PathLike) -> pa.Table:
    table = pq.read_table(path)
    meta = table.schema.metadata or {}
    if meta.get(b"reidx.schema") != b"embedded-crops":
        raise ValueError(f"{path} is not an embeddings table written by `reidx embed`")
    if "camera" in table.column_names and table.schema.field("camera").type != pa.string():
        table = table.set_column(table.schema.get_field_index("camera"), "camera",
                                 table["camera"].cast(pa.string()))
    return table


def table_embedder_id(table: pa.Table) -> tuple[str, str]:
    meta = table.schema.metadata or {}
    return meta.get(b"reidx.embedder", b"?").decode(), meta.get(b"reidx.weights_sha256", b"?").decode()
