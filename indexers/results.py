"""Ranked query results: the Arrow table ``reidx query`` writes, and its labelled metrics.

Results schema (``reidx.schema=query-results``, version 1), one row per (query person, rank):

=================  =====================  ====================================================
column             type                   meaning
=================  =====================  ====================================================
query_id           string                 the query person's id (like a detection_id)
query_path         string                 the query image (``uri::member`` inside archives)
query_x1..y2       float32                the query person's box in its image
query_camera       string, null           camera, from Market-1501 naming or the manifest
query_person_id    int64, null            label, from Market-1501 naming or the manifest
status             string                 ok | no_person (nothing detected) | failed
reason             string, null           why the image failed
rank               int32, null            1 = best; null on status rows
detection_id       string, null           the gallery detection (see docs/schemas.md)
image_key, source, member, camera, timestamp, x1, y1, x2, y2, score, person_id
                                          the gallery detection's shard columns
cosine_distance    float32, null          1 − q·g
rerank_distance    float32, null          the re-ranked distance (null without re-ranking)
rerank             string                 the re-ranking method (``none`` without)
=================  =====================  ====================================================

Rows are ordered by query, then rank; ranks follow ``rerank_distance`` when re-ranking ran.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from reidx.indexers.metrics import evaluate_top_k
from reidx.indexers.versions import GalleryIndex
from reidx.pipeline.labels import JUNK

RESULT_SCHEMA_VERSION = "1"
GALLERY_COLUMNS = ["detection_id", "image_key", "source", "member", "camera", "timestamp",
                   "x1", "y1", "x2", "y2", "score", "person_id"]


def result_schema() -> pa.Schema:
    f32 = pa.float32()
    fields = [("query_id", pa.string()), ("query_path", pa.string()), ("query_x1", f32), ("query_y1", f32),
              ("query_x2", f32), ("query_y2", f32), ("query_camera", pa.string()), ("query_person_id", pa.int64()),
              ("status", pa.string()), ("reason", pa.string()), ("rank", pa.int32()), ("detection_id", pa.string()),
              ("image_key", pa.string()), ("source", pa.string()), ("member", pa.string()),
              ("camera", pa.string()), ("timestamp", pa.timestamp("ms")), ("x1", f32), ("y1", f32), ("x2", f32),
              ("y2", f32), ("score", f32), ("person_id", pa.int64()), ("cosine_distance", f32),
              ("rerank_distance", f32), ("rerank", pa.string())]
    return pa.schema(fields, metadata={"reidx.schema": "query-results", "reidx.schema_version": RESULT_SCHEMA_VERSION})


def ranked_rows(persons, gallery_index: GalleryIndex, distances: np.ndarray, ids: np.ndarray,
                rerank: str, rerank_distances: np.ndarray | None) -> pa.Table:
    """One row per (query person, rank), then one status row per image without a person.

    ``ids``/``distances``/``rerank_distances`` (Q, k) are already in rank order; id -1 (fewer found) is skipped.
    """
    schema = result_schema()
    columns: dict[str, list] = defaultdict(list)
    if persons.table is not None:
        table = persons.table
        num_q = ids.shape[0]
        valid = ids >= 0
        q_rows = np.repeat(np.arange(num_q), valid.sum(axis=1))
        ranks = np.concatenate([np.arange(1, n + 1) for n in valid.sum(axis=1)]) if num_q else np.zeros(0, int)
        gallery = gallery_index.items.take(pa.array(ids[valid]))
        query_values = {"query_id": table["detection_id"], "query_x1": table["x1"], "query_y1": table["y1"],
                        "query_x2": table["x2"], "query_y2": table["y2"], "query_camera": table["camera"],
                        "query_person_id": table["person_id"]}
        for name, column in query_values.items():
            columns[name] = column.take(pa.array(q_rows)).to_pylist()
        columns["query_path"] = [persons.paths[i] for i in q_rows]
        columns["status"] = ["ok"] * len(q_rows)
        columns["reason"] = [None] * len(q_rows)
        columns["rank"] = ranks.tolist()
        for name in GALLERY_COLUMNS:
            columns[name] = gallery[name].to_pylist()
        columns["cosine_distance"] = distances[valid].tolist()
        columns["rerank_distance"] = rerank_distances[valid].tolist() if rerank_distances is not None else \
            [None] * len(q_rows)
        columns["rerank"] = [rerank] * len(q_rows)
    for row in persons.status_rows:
        for field in schema:
            columns[field.name].append(row.get(field.name, "none" if field.name == "rerank" else None))
    length = max((len(v) for v in columns.values()), default=0)
    return pa.table({f.name: columns.get(f.name, [None] * length) for f in schema}, schema=schema)


def score_results(results: pa.Table, items: pa.Table) -> dict | None:
    """Market-1501 metrics (percent) of ranked results, when queries and gallery carry labels; else None.

    Junk (id -1) and same-id-same-camera gallery items are skipped, as ``reidx evaluate`` does;
    matches beyond the top-k count as missed (see :func:`indexers.metrics.evaluate_top_k`).
    """
    ok = results.filter(pc.and_(pc.equal(results["status"], "ok"),
                                        pc.is_valid(results["query_person_id"])))
    g_pids, g_cams = items["person_id"].to_pylist(), items["camera"].to_pylist()
    labelled = [(p, c) for p, c in zip(g_pids, g_cams) if p is not None and p != JUNK]
    if ok.num_rows == 0 or not labelled:
        return None
    per_id, per_id_cam = Counter(p for p, _ in labelled), Counter(labelled)
    columns = {n: ok[n].to_pylist() for n in ("query_id", "query_person_id", "query_camera", "person_id", "camera")}
    lists: dict[str, list] = {}
    labels: dict[str, tuple] = {}
    for qid, qpid, qcam, pid, cam in zip(*columns.values()):
        labels[qid] = (qpid, qcam)
        if pid is None or pid == JUNK or (pid == qpid and cam == qcam):
            continue
        lists.setdefault(qid, []).append(int(pid == qpid))
    queries = list(labels)
    if all(per_id[labels[q][0]] == per_id_cam[labels[q]] for q in queries):
        return None  # no query has a valid match in this gallery: nothing to score
    metrics = evaluate_top_k([np.array(lists.get(q, []), dtype=np.int64) for q in queries],
                             [per_id[labels[q][0]] - per_id_cam[labels[q]] for q in queries], len(labelled))
    report = metrics.as_percent_dict()
    report["top_k_cut"] = True
    return report
