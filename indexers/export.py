"""``reidx export``: a gallery's detections with their metadata as one Parquet file, for other tools.

Reads only committed shards (those the ledger names), so a crashed run's leftovers never leak
out. ``--where`` is one SQL boolean expression evaluated by DuckDB over the shards (why DuckDB:
a real SQL engine with Arrow zero-copy reads beats a hand-written filter language); DuckDB runs
with external access disabled, so a filter can read nothing but the detections.

The filter is never pasted into a statement: a ``--where "1=1; SELECT 'forged' ..."`` ran its
second statement and wrote forged rows. It must parse as exactly one statement when put after
WHERE, and is then applied with the relation API (``relation.filter``), which accepts a single
expression only. A timer interrupts a filter that runs longer than ``timeout`` seconds.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pyarrow.dataset as ds

from reidx.pipeline.atomic import write_parquet_atomic
from reidx.pipeline.gallery import shards_dir
from reidx.pipeline.integrity import damaged_shards
from reidx.pipeline.ledger import committed_shards


DEFAULT_TIMEOUT_S = 300.0
_ONE_EXPRESSION = "--where must be one boolean expression such as \"camera = '3' AND score > 0.5\""


def export_detections(gallery: str | os.PathLike, out: str | os.PathLike, where: str | None = None,
                      columns: list[str] | None = None, with_embeddings: bool = False,
                      timeout: float = DEFAULT_TIMEOUT_S) -> dict:
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
        try:
            statements = duckdb.extract_statements(f"SELECT * FROM detections WHERE {where}")
        except duckdb.Error as exc:
            raise ValueError(f"{_ONE_EXPRESSION}: {_first_line(exc)}") from None
        if len(statements) != 1:
            raise ValueError(f"{_ONE_EXPRESSION}, not several statements: remove the ';' and what follows")
        connection = duckdb.connect(config={"enable_external_access": False})
        connection.register("detections", detections)
        selected = ", ".join(f'"{c}"' for c in columns)
        timer = threading.Timer(timeout, connection.interrupt)
        timer.daemon = True
        timer.start()
        try:
            relation = connection.sql(f"SELECT {selected} FROM detections").filter(where)
            table = relation.to_arrow_table() if hasattr(relation, "to_arrow_table") else relation.arrow()
        except duckdb.InterruptException:
            raise ValueError(f"--where {where!r} was stopped after {timeout:g} s: narrow the filter "
                             f"or raise --timeout") from None
        except duckdb.ParserException as exc:
            raise ValueError(f"{_ONE_EXPRESSION}: {_first_line(exc)}") from None
        except duckdb.Error as exc:
            raise ValueError(f"--where {where!r}: {_first_line(exc)}") from None
        finally:
            timer.cancel()
            connection.close()
    else:
        table = detections.to_table(columns=columns)
    table = table.replace_schema_metadata({**(detections.schema.metadata or {}), b"reidx.exported_from": str(gallery).encode()})
    write_parquet_atomic(table, out)
    return {"out": str(out), "gallery": str(gallery), "persons": table.num_rows, "columns": table.column_names,
            "shards": len(shards)}


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
