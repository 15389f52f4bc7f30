"""Ranked query results: the Arrow table ``reidx query`` writes, and its labelled metrics.

Results schema (``reidx.schema=query-results``, version 2), one row per (query, rank), where a
query is one person or, with ``--group-by``, a group of them searched as one (indexers/query_groups.py):

=================  =====================  ====================================================
column             type                   meaning
=================  =====================  ====================================================
query_id           string                 the query person's id (like a detection_id); a group's
                                          is ``g-`` + a digest of its members' ids
query_path         string                 the query image (``uri::member`` inside archives); a
                                          group's first member's
query_x1..y2       float32                the query person's box in its image (group: first member)
query_camera       string, null           camera, from Market-1501 naming or the manifest (group:
                                          null unless all members share one)
query_person_id    int64, null            label, from Market-1501 naming or the manifest (group:
                                          null unless all members share one)
query_group        string, null           the group's key (``person_id=7,camera=3``); null without
                                          ``--group-by`` and for a person without a key value
query_members      int32                  query persons fused into this query (1 without groups)
query_cameras      list<string>           the cameras of all its members (what
                                          ``--exclude-same-camera`` and the metrics' junk rule use)
status             string                 ok | no_person (nothing detected) | failed
reason             string, null           why the image failed
rank               int32, null            1 = best; null on status rows
detection_id       string, null           the gallery detection (see docs/schemas.md)
image_key, source, member, camera, timestamp, x1, y1, x2, y2, score, person_id, frame_index,
track_id                                  the gallery detection's shard columns
cosine_distance    float32, null          1 − q·g
rerank_distance    float32, null          the re-ranked distance (null without re-ranking)
rerank             string                 the re-ranking method (``none`` without)
=================  =====================  ====================================================

Rows are ordered by query, then rank; ranks follow ``rerank_distance`` when re-ranking ran.
Version 1 (before groups and filters) lacked ``query_group``, ``query_members``, ``query_cameras``,
``frame_index`` and ``track_id``.
Key-value metadata adds ``reidx.filter`` (the search filter as JSON) and ``reidx.group``
(``group_by`` and ``fusion``), set by indexers/query.py.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from reidx.indexers.metrics import evaluate_top_k
from reidx.indexers.versions import GalleryIndex
from reidx.pipeline.labels import JUNK

RESULT_SCHEMA_VERSION = "2"
GALLERY_COLUMNS = ["detection_id", "image_key", "source", "member", "camera", "timestamp",
                   "x1", "y1", "x2", "y2", "score", "person_id", "frame_index", "track_id"]


def result_schema() -> pa.Schema:
    f32 = pa.float32()
    fields = [("query_id", pa.string()), ("query_path", pa.string()), ("query_x1", f32), ("query_y1", f32),
              ("query_x2", f32), ("query_y2", f32), ("query_camera", pa.string()), ("query_person_id", pa.int64()),
              ("query_group", pa.string()), ("query_members", pa.int32()), ("query_cameras", pa.list_(pa.string())),
              ("status", pa.string()), ("reason", pa.string()), ("rank", pa.int32()), ("detection_id", pa.string()),
              ("image_key", pa.string()), ("source", pa.string()), ("member", pa.string()),
              ("camera", pa.string()), ("timestamp", pa.timestamp("ms")), ("x1", f32), ("y1", f32), ("x2", f32),
              ("y2", f32), ("score", f32), ("person_id", pa.int64()), ("frame_index", pa.int32()),
              ("track_id", pa.string()), ("cosine_distance", f32),
              ("rerank_distance", f32), ("rerank", pa.string())]
    return pa.schema(fields, metadata={"reidx.schema": "query-results", "reidx.schema_version": RESULT_SCHEMA_VERSION})


def ranked_rows(persons, gallery_index: GalleryIndex, distances: np.ndarray, ids: np.ndarray,
                rerank: str, rerank_distances: np.ndarray | None, units=None) -> pa.Table:
    """One row per (query, rank), then one status row per image without a person.

    ``ids``/``distances``/``rerank_distances`` (Q, k) are already in rank order; id -1 (fewer found) is
    skipped. ``units`` (:class:`indexers.query_groups.QueryUnits`): the queries when persons were
    grouped; without it every person is its own query.
    """
    schema = result_schema()
    columns: dict[str, list] = defaultdict(list)
    if persons.table is not None:
        table = persons.table
        if units is None:
            from reidx.indexers.query_groups import group_units

            units = group_units(table, persons.paths, ())
        num_q = ids.shape[0]
        valid = ids >= 0
        q_rows = np.repeat(np.arange(num_q), valid.sum(axis=1))
        ranks = np.concatenate([np.arange(1, n + 1) for n in valid.sum(axis=1)]) if num_q else np.zeros(0, int)
        gallery = gallery_index.items.take(pa.array(ids[valid]))
        first = [int(rows[0]) for rows in units.members]
        cameras, person_ids = table["camera"].to_pylist(), table["person_id"].to_pylist()

        def shared(values, rows):  # a group's value when all its members agree, else None
            found = {values[r] for r in rows}
            return found.pop() if len(found) == 1 else None

        per_unit = {
            "query_id": units.ids,
            "query_path": [persons.paths[r] for r in first],
            **{f"query_{c}": table[c].take(pa.array(first, pa.int64())).to_pylist() for c in ("x1", "y1", "x2", "y2")},
            "query_camera": [shared(cameras, rows) for rows in units.members],
            "query_person_id": [shared(person_ids, rows) for rows in units.members],
            "query_group": units.keys,
            "query_members": [len(rows) for rows in units.members],
            "query_cameras": [sorted({cameras[r] for r in rows if cameras[r] is not None}) for rows in units.members],
        }
        for name, values in per_unit.items():
            columns[name] = [values[i] for i in q_rows]
        columns["status"] = ["ok"] * len(q_rows)
        columns["reason"] = [None] * len(q_rows)
        columns["rank"] = ranks.tolist()
        for name in GALLERY_COLUMNS:  # indexes of version-1 shards have no frame_index/track_id
            columns[name] = gallery[name].to_pylist() if name in gallery.column_names else [None] * len(q_rows)
        columns["cosine_distance"] = distances[valid].tolist()
        columns["rerank_distance"] = rerank_distances[valid].tolist() if rerank_distances is not None else \
            [None] * len(q_rows)
        columns["rerank"] = [rerank] * len(q_rows)
    defaults = {"rerank": "none", "query_members": 0, "query_cameras": []}
    for row in persons.status_rows:
        for field in schema:
            columns[field.name].append(row.get(field.name, defaults.get(field.name)))
    length = max((len(v) for v in columns.values()), default=0)
    return pa.table({f.name: columns.get(f.name, [None] * length) for f in schema}, schema=schema)


def score_results(results: pa.Table, items: pa.Table, allowed: np.ndarray | None = None) -> dict | None:
    """Market-1501 metrics (percent) of ranked results, when queries and gallery carry labels; else None.

    Junk (id -1) and same-id-same-camera gallery items are skipped, as ``reidx evaluate`` does (for
    a group: the same id in any of its members' cameras, ``query_cameras``); matches beyond the
    top-k count as missed (see :func:`indexers.metrics.evaluate_top_k`). ``allowed``: the gallery
    items a search filter let through (:func:`indexers.filters.item_mask`); matches it removed are
    not counted as relevant.
    """
    if allowed is not None:
        items = items.filter(pa.array(allowed))
    ok = results.filter(pc.and_(pc.equal(results["status"], "ok"),
                                        pc.is_valid(results["query_person_id"])))
    g_pids, g_cams = items["person_id"].to_pylist(), items["camera"].to_pylist()
    labelled = [(p, c) for p, c in zip(g_pids, g_cams) if p is not None and p != JUNK]
    if ok.num_rows == 0 or not labelled:
        return None
    per_id, per_id_cam = Counter(p for p, _ in labelled), Counter(labelled)
    names = ("query_id", "query_person_id", "query_camera", "person_id", "camera")
    columns = {n: ok[n].to_pylist() for n in names}
    groups = ok["query_cameras"].to_pylist() if "query_cameras" in ok.column_names else [None] * ok.num_rows
    lists: dict[str, list] = {}
    labels: dict[str, tuple] = {}
    for (qid, qpid, qcam, pid, cam), qcams in zip(zip(*columns.values()), groups):
        if qid not in labels:
            labels[qid] = (qpid, frozenset(qcams) if qcams else frozenset([qcam]))
        if pid is None or pid == JUNK or (pid == qpid and cam in labels[qid][1]):
            continue
        lists.setdefault(qid, []).append(int(pid == qpid))
    queries = list(labels)
    relevant = {q: per_id[labels[q][0]] - sum(per_id_cam[(labels[q][0], c)] for c in labels[q][1]) for q in queries}
    if not any(relevant.values()):
        return None  # no query has a valid match in this gallery: nothing to score
    metrics = evaluate_top_k([np.array(lists.get(q, []), dtype=np.int64) for q in queries],
                             [relevant[q] for q in queries], len(labelled))
    report = metrics.as_percent_dict()
    report["top_k_cut"] = True
    return report
