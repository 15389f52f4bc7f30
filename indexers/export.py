"""``reidx export``: a gallery's detections with their metadata as one Parquet file, for other tools.

Reads only committed shards (those the ledger names), so a crashed run's leftovers never leak
out. ``--where`` is SQL run by DuckDB over the shards (why DuckDB: a real SQL engine with
Arrow zero-copy reads beats a hand-written filter language); DuckDB runs with external access
disabled, so a filter can read nothing but the detections.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.dataset as ds

from reidx.pipeline.atomic import write_parquet_atomic
from reidx.pipeline.gallery import shards_dir
from reidx.pipeline.integrity import damaged_shards
from reidx.pipeline.ledger import committed_shards


def export_detections(gallery: str | os.PathLike, out: str | os.PathLike, where: str | None = None,
                      columns: list[str] | None = None, with_embeddings: bool = False) -> dict:
    gallery = Path(gallery)
    shards = [str(shards_dir(gallery) / name) for name in committed_shards(gallery)]
    if not shards:
        raise ValueError(f"{gallery} holds no committed shards: nothing to export")
    damaged = damaged_shards(gallery)
    if damaged:
        name, problem = next(iter(damaged.items()))
        raise ValueError(f"{len(damaged)} committed shard(s) are damaged, e.g. {name}: {problem}; run "
                         f"`reidx verify {gallery} --repair` first")
    detections = ds.dataset(shards, format="parquet")
    available = detections.schema.names
    if columns is None:
        columns = [c for c in available if with_embeddings or c != "embedding"]
    unknown = [c for c in columns if c not in available]
    if unknown:
        raise ValueError(f"unknown column(s) {unknown}; the shards have {available}")
    if where:
        try:
            import duckdb
        except ImportError:
            raise ImportError("--where needs DuckDB: pip install 'reidx[sql]'") from None
        connection = duckdb.connect(config={"enable_external_access": False})
        connection.register("detections", detections)
        selected = ", ".join(f'"{c}"' for c in columns)
        try:
            relation = connection.sql(f"SELECT {selected} FROM detections WHERE {where}")
            table = relation.to_arrow_table() if hasattr(relation, "to_arrow_table") else relation.arrow()
        except duckdb.Error as exc:
            raise ValueError(f"--where {where!r}: {exc}") from None
    else:
        table = detections.to_table(columns=columns)
    table = table.replace_schema_metadata({**(detections.schema.metadata or {}), b"reidx.exported_from": str(gallery).encode()})
    write_parquet_atomic(table, out)
    return {"out": str(out), "gallery": str(gallery), "persons": table.num_rows, "columns": table.column_names,
            "shards": len(shards)}
