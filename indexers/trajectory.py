"""A query's accepted hits as a time-ordered path through the cameras (``reidx query --trajectory``).

Why: a ranked list answers "who looks like this person"; an investigator asks "where did this
person go, and when". The path is what a report's timeline draws and what other tools read.

Acceptance rule: a hit is a sighting when its rank ≤ ``rank_max`` and its cosine distance ≤
``distance_max`` (the plain distance, also after re-ranking: it has one meaning for every query).
Defaults DEFAULT_RANK_MAX / DEFAULT_DISTANCE_MAX were chosen by ``benchmarks/acceptance.py`` on
Con-ReID's *training* identities for osnet_x0_25_msmt17 (the grid's best recall at precision
≥ 0.95: precision 0.956, recall 0.403 there) and give precision 0.921, recall 0.440 on the
evaluation split they were not chosen on (docs/query.md). Other weights have other distance
scales: measure again before trusting the default. A fused group's mean vector lies closer to
the gallery than a single crop does, so the same τ accepts somewhat more there.

Trajectory schema (``reidx.schema=trajectory``, version 1), one row per (query, segment); a
segment is a maximal run of time-consecutive sightings in one camera (cam 1 → cam 3 → cam 1 is
three segments):

====================  ======================  ===============================================
column                type                    meaning
====================  ======================  ===============================================
query_id              string                  as in the query results
query_group           string, null            as in the query results
query_path            string                  as in the query results
step                  int32                   1, 2, … along the path
camera                string, null            the segment's camera
first_seen            timestamp[ms], null     its first sighting's time
last_seen             timestamp[ms], null     its last sighting's time
duration_s            float64, null           last_seen − first_seen
sightings             int32                   accepted detections in the segment
track_ids             list<string>            the distinct tracks among them (video sources)
detection_ids         list<string>            the sightings, in time order
best_detection_id     string                  the segment's closest sighting (smallest distance)
best_image_key        string                  … its image (``source/member``)
best_source           string                  … its source
best_member           string                  … its member path in the source
best_timestamp        timestamp[ms], null     … its time
best_x1..best_y2      float32                 … its box in the frame
best_cosine_distance  float32                 … its distance to the query
best_rank             int32                   … its rank in the query's results
====================  ======================  ===============================================

Sightings without a timestamp cannot be placed in time: they follow the timed path, one segment
per camera with null times. Key-value metadata: ``reidx.acceptance`` (rank_max, distance_max as
JSON) and the results' ``reidx.index_version``/``reidx.gallery``.
"""

from __future__ import annotations

import json
import os
from itertools import groupby
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from reidx.pipeline.atomic import write_parquet_atomic

TRAJECTORY_SCHEMA_VERSION = "1"
DEFAULT_RANK_MAX = 200
DEFAULT_DISTANCE_MAX = 0.08


def trajectory_schema() -> pa.Schema:
    f32, ts = pa.float32(), pa.timestamp("ms")
    fields = [("query_id", pa.string()), ("query_group", pa.string()), ("query_path", pa.string()),
              ("step", pa.int32()), ("camera", pa.string()), ("first_seen", ts), ("last_seen", ts),
              ("duration_s", pa.float64()), ("sightings", pa.int32()), ("track_ids", pa.list_(pa.string())),
              ("detection_ids", pa.list_(pa.string())), ("best_detection_id", pa.string()),
              ("best_image_key", pa.string()), ("best_source", pa.string()), ("best_member", pa.string()),
              ("best_timestamp", ts), ("best_x1", f32), ("best_y1", f32), ("best_x2", f32), ("best_y2", f32),
              ("best_cosine_distance", f32), ("best_rank", pa.int32())]
    return pa.schema(fields, metadata={"reidx.schema": "trajectory",
                                       "reidx.schema_version": TRAJECTORY_SCHEMA_VERSION})


def accepted(results: pa.Table, rank_max: int = DEFAULT_RANK_MAX,
             distance_max: float = DEFAULT_DISTANCE_MAX) -> pa.Table:
    """The result rows that are sightings under the acceptance rule, in results order."""
    keep = pc.and_(pc.equal(results["status"], "ok"),
                   pc.and_(pc.less_equal(results["rank"], rank_max),
                           pc.less_equal(results["cosine_distance"], distance_max)))
    return results.filter(pc.fill_null(keep, False))


def sighting_order(rows: list[dict]) -> list[dict]:
    """Timed sightings by time (then frame index, then rank); untimed ones after, by camera, then rank."""
    timed = sorted((r for r in rows if r.get("timestamp") is not None),
                   key=lambda r: (r["timestamp"], r.get("frame_index") or 0, r["rank"]))
    untimed = sorted((r for r in rows if r.get("timestamp") is None),
                     key=lambda r: (str(r.get("camera")), r["rank"]))
    return timed + untimed


def segments(rows: list[dict]) -> list[list[dict]]:
    """Time-ordered sightings → runs in one camera (untimed ones: one run per camera)."""
    ordered = sighting_order(rows)
    return [list(run) for _, run in groupby(ordered, key=lambda r: (r.get("timestamp") is None, r.get("camera")))]


def trajectories(results: pa.Table, rank_max: int = DEFAULT_RANK_MAX,
                 distance_max: float = DEFAULT_DISTANCE_MAX) -> pa.Table:
    """Query results (query-results schema) → trajectory rows (schema above), queries in results order."""
    schema = trajectory_schema()
    columns: dict[str, list] = {field.name: [] for field in schema}
    rows = accepted(results, rank_max, distance_max).to_pylist()
    by_query: dict[str, list[dict]] = {}
    for row in rows:
        by_query.setdefault(row["query_id"], []).append(row)
    for query_id, hits in by_query.items():
        for step, run in enumerate(segments(hits), 1):
            best = min(run, key=lambda r: (r["cosine_distance"], r["rank"]))
            times = [r["timestamp"] for r in run if r.get("timestamp") is not None]
            first, last = (min(times), max(times)) if times else (None, None)
            values = {
                "query_id": query_id, "query_group": hits[0].get("query_group"), "query_path": hits[0]["query_path"],
                "step": step, "camera": run[0].get("camera"), "first_seen": first, "last_seen": last,
                "duration_s": (last - first).total_seconds() if times else None, "sightings": len(run),
                "track_ids": list(dict.fromkeys(r["track_id"] for r in run if r.get("track_id") is not None)),
                "detection_ids": [r["detection_id"] for r in run],
                **{f"best_{c}": best.get(c) for c in ("detection_id", "image_key", "source", "member", "timestamp",
                                                      "x1", "y1", "x2", "y2", "cosine_distance", "rank")},
            }
            for name, value in values.items():
                columns[name].append(value)
    return pa.table(columns, schema=schema)


def trajectory_path(results_path: str | os.PathLike) -> Path:
    """Where ``--trajectory`` writes: beside the results, ``NAME.trajectory.parquet``."""
    results_path = Path(results_path)
    return results_path.with_name(results_path.stem + ".trajectory.parquet")


def write_trajectories(results: pa.Table, out: str | os.PathLike, rank_max: int = DEFAULT_RANK_MAX,
                       distance_max: float = DEFAULT_DISTANCE_MAX) -> dict:
    """Write the trajectories of ``results`` to ``out``; return counts for the command's summary."""
    table = trajectories(results, rank_max, distance_max)
    carried = {k: v for k, v in (results.schema.metadata or {}).items()
               if k in (b"reidx.index_version", b"reidx.gallery", b"reidx.embedder")}
    metadata = {**table.schema.metadata, **carried,
                b"reidx.acceptance": json.dumps({"rank_max": rank_max, "distance_max": distance_max}).encode()}
    write_parquet_atomic(table.replace_schema_metadata(metadata), out)
    sightings = table["sightings"].to_numpy() if table.num_rows else np.zeros(0)
    return {"out": str(out), "queries": len(set(table["query_id"].to_pylist())), "segments": table.num_rows,
            "sightings": int(sightings.sum()), "rank_max": rank_max, "distance_max": distance_max}
