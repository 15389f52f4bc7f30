"""Bulk query: query images → persons → embeddings (the gallery's own embedder) → Faiss top-K → ranked rows.

Queries go through the same reading, detecting, cropping and embedding code as the nightly job
(:func:`pipeline.worker.persons_of_members`), so a query crop and a gallery crop of the same
image give the same vector.

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

import dataclasses
import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from reidx.indexers.faiss_index import GalleryIndex, load_index
from reidx.pipeline.embedding_table import embeddings_to_numpy, write_parquet_atomic
from reidx.pipeline.job import GALLERY_CONFIG
from reidx.pipeline.manifest import Source, load_manifest
from reidx.pipeline.models.weights import resolve_weights
from reidx.pipeline.sources import SourceError, archive_type, list_source
from reidx.pipeline.worker import DEFAULT_DETECTOR, ModelSpec, persons_of_members

RESULT_SCHEMA_VERSION = "1"
# Market-1501 naming (PPPP_cC...): labels for plain file queries, so results can be scored.
MARKET_CAMERA = re.compile(r"_c(\d+)")
MARKET_PERSON = re.compile(r"(?:^|/)(-?\d+)_c\d")
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


def member_path(source: Source, member: str) -> str:
    """Where a member lives, for people and for the report: a file path, or ``archive::member``."""
    if archive_type(source.uri) or "://" in source.uri:
        return f"{source.uri}::{member}"
    root = Path(source.uri)
    return str(root / member) if root.is_dir() else str(root)


def query_sources(inputs: list[str], detect: bool) -> list[Source]:
    """Each input as a source: a ``.toml`` manifest gives its own sources; a folder, file or glob
    is one source of crops (or of full frames with ``detect``), labelled by Market-1501 naming."""
    kind = "frames" if detect else "crops"
    sources: list[Source] = []
    for number, item in enumerate(inputs, 1):
        if str(item).endswith(".toml"):
            for source in load_manifest(item).sources:
                sources.append(dataclasses.replace(source, kind=kind) if detect else source)
            continue
        uri = item if "://" in str(item) else str(Path(item).expanduser().resolve())
        if "://" not in uri and not archive_type(uri) and not any(c in uri for c in "*?[") and not Path(uri).exists():
            raise FileNotFoundError(f"query input {item} does not exist")
        sources.append(Source(name=f"query-{number}", uri=uri, kind=kind, camera_regex=MARKET_CAMERA,
                              person_id_regex=MARKET_PERSON))
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"query sources share a name ({names}); give each manifest source a unique name")
    return sources


def gallery_model_spec(gallery: Path, gallery_index: GalleryIndex, weights: str | None, backend: str, device: str,
                       detector: str | None, max_pixels: int) -> ModelSpec:
    """The models that made the gallery: its embedder (another one is an error) and its detector."""
    config_path = gallery / GALLERY_CONFIG
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    spec = weights or config.get("weights") or gallery_index.meta.embedder
    resolved = resolve_weights(spec)
    if resolved.sha256 != gallery_index.meta.embedder_sha256:
        raise ValueError(f"{gallery} was embedded with {gallery_index.meta.embedder} "
                         f"({gallery_index.meta.embedder_sha256[:12]}); --weights {spec} is another model "
                         f"({resolved.sha256[:12]}) whose vectors cannot be compared with it")
    detector = detector or config.get("detector", DEFAULT_DETECTOR)
    return ModelSpec(spec, backend=backend, device=device, max_pixels=max_pixels, detector=detector)


@dataclass
class QueryPersons:
    """Every query person (shard-schema rows + their image paths) and the images that gave none."""

    table: pa.Table | None
    paths: list[str]
    status_rows: list[dict]  # query_path, status (no_person | failed), reason


def largest_only(table: pa.Table) -> pa.Table:
    """Keep the largest box of each query image (the person the user most likely meant)."""
    keys = table["image_key"].to_pylist()
    area = ((table["x2"].to_numpy() - table["x1"].to_numpy()) * (table["y2"].to_numpy() - table["y1"].to_numpy()))
    best: dict[str, int] = {}
    for row, key in enumerate(keys):
        if key not in best or area[row] > area[best[key]]:
            best[key] = row
    return table.take(sorted(best.values()))


def collect_query_persons(sources: list[Source], spec: ModelSpec, largest: bool = False, batch_size: int = 64,
                          progress: bool = False) -> QueryPersons:
    from tqdm import tqdm

    tables, paths, status_rows = [], [], []
    listings = []
    for source in sources:
        try:
            listing = list_source(source)
        except SourceError as exc:
            raise FileNotFoundError(str(exc)) from None
        listings.append((source, listing))
        status_rows += [{"query_path": member_path(source, m), "status": "failed", "reason": r}
                        for m, r in listing.rejected]
    total = sum(len(listing.members) for _, listing in listings)
    if total == 0 and not status_rows:
        raise ValueError(f"no query images found in {', '.join(s.uri for s in sources)}")
    bar = tqdm(total=total, unit="img", desc="query images", disable=not progress)
    for source, listing in listings:
        for start in range(0, len(listing.members), batch_size):
            persons = persons_of_members(source, listing.members[start:start + batch_size], spec)
            for record in persons.records:
                if record["status"] == "failed" or not record.get("num_persons"):
                    status_rows.append({"query_path": member_path(source, record["member"]),
                                        "status": "failed" if record["status"] == "failed" else "no_person",
                                        "reason": record.get("reason")})
            if persons.table is not None:
                table = largest_only(persons.table) if largest else persons.table
                tables.append(table)
                paths += [member_path(source, m) for m in table["member"].to_pylist()]
            bar.update(len(persons.records))
    bar.close()
    table = pa.concat_tables(tables) if tables else None
    return QueryPersons(table, paths, status_rows)


def ranked_rows(persons: QueryPersons, gallery_index: GalleryIndex, distances: np.ndarray, ids: np.ndarray,
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


def run_query(gallery: str | os.PathLike, inputs: list[str], out: str | os.PathLike, *, top_k: int = 100,
              detect: bool = False, largest: bool = False, rerank: str = "none", rerank_params=None,
              candidates: int = 400, nprobe: int | None = None, weights: str | None = None,
              backend: str = "auto", device: str = "auto", gpu: str = "auto", detector: str | None = None,
              max_pixels: int = 50_000_000, batch_size: int = 1024, progress: bool = False,
              score: bool = False) -> dict:
    """Query GALLERY with every person in ``inputs``; write ranked rows to ``out`` (Parquet); return a summary.

    ``score``: also report Market-1501 metrics, for when queries and gallery share one label space
    (person ids from different datasets must not be compared, so this is asked for, not guessed).
    """
    import time

    from tqdm import tqdm

    started = time.perf_counter()
    gallery = Path(gallery)
    gallery_index = load_index(gallery, gpu=gpu)
    spec = gallery_model_spec(gallery, gallery_index, weights, backend, device, detector, max_pixels)
    persons = collect_query_persons(query_sources(inputs, detect), spec, largest, progress=progress)
    rerank_distances = None
    k = min(top_k, gallery_index.count)
    if persons.table is not None:
        vectors = embeddings_to_numpy(persons.table["embedding"])
        search_k = max(k, candidates or 0) if rerank != "none" else k
        distances = np.empty((len(vectors), min(search_k, gallery_index.count)), np.float32)
        ids = np.empty(distances.shape, np.int64)
        bar = tqdm(total=len(vectors), unit="query", desc="search", disable=not progress)
        for start in range(0, len(vectors), batch_size):
            chunk = slice(start, start + batch_size)
            distances[chunk], ids[chunk] = gallery_index.search(vectors[chunk], search_k, nprobe=nprobe)
            bar.update(len(vectors[chunk]))
        bar.close()
        if rerank != "none":
            from reidx.indexers.rerank_sparse import rerank_candidates

            knn_ids, knn_dist = gallery_index.knn()
            if knn_ids.shape[1] == 0:
                raise ValueError(f"{gallery} has no kNN graph for re-ranking: rebuild its index with "
                                 f"`reidx build-index {gallery} --knn 30`")
            rerank_distances = rerank_candidates(rerank, ids, unit_euclidean_from_cosine(distances),
                                                 knn_ids, unit_euclidean_from_cosine(knn_dist), params=rerank_params)
            order = np.argsort(rerank_distances, axis=1, kind="stable")[:, :k]
            ids, distances = np.take_along_axis(ids, order, 1), np.take_along_axis(distances, order, 1)
            rerank_distances = np.take_along_axis(rerank_distances, order, 1)
        else:
            ids, distances = ids[:, :k], distances[:, :k]
    else:
        distances = ids = np.zeros((0, 0))
    results = ranked_rows(persons, gallery_index, distances, ids, rerank, rerank_distances)
    metadata = {**results.schema.metadata, b"reidx.index_version": gallery_index.meta.version.encode(),
                b"reidx.embedder": f"{gallery_index.meta.embedder}@{gallery_index.meta.embedder_sha256[:12]}".encode(),
                b"reidx.gallery": str(gallery.resolve()).encode(),
                b"reidx.rerank": json.dumps({"method": rerank, "params": dataclasses.asdict(rerank_params)
                                             if rerank_params is not None else None}).encode()}
    write_parquet_atomic(results.replace_schema_metadata(metadata), out)
    statuses = results["status"].to_pylist()
    summary = {"out": str(out), "gallery": str(gallery), "index_version": gallery_index.meta.version,
            "index_type": gallery_index.meta.type, "queries": 0 if persons.table is None else persons.table.num_rows,
            "images_without_person": statuses.count("no_person"), "images_failed": statuses.count("failed"),
            "rows": results.num_rows, "top_k": k, "rerank": rerank,
            "seconds": round(time.perf_counter() - started, 2)}
    scores = score_results(results, gallery_index.items) if score else None
    if scores is not None:
        summary["metrics"] = scores
    return summary


def score_results(results: pa.Table, items: pa.Table) -> dict | None:
    """Market-1501 metrics (percent) of ranked results, when queries and gallery carry labels; else None.

    Junk (id -1) and same-id-same-camera gallery items are skipped, as ``reidx evaluate`` does;
    matches beyond the top-k count as missed (see :func:`indexers.metrics.evaluate_top_k`).
    """
    from collections import Counter

    from reidx.indexers.metrics import evaluate_top_k

    ok = results.filter(pa.compute.and_(pa.compute.equal(results["status"], "ok"),
                                        pa.compute.is_valid(results["query_person_id"])))
    g_pids, g_cams = items["person_id"].to_pylist(), items["camera"].to_pylist()
    labelled = [(p, c) for p, c in zip(g_pids, g_cams) if p is not None and p != -1]
    if ok.num_rows == 0 or not labelled:
        return None
    per_id, per_id_cam = Counter(p for p, _ in labelled), Counter(labelled)
    columns = {n: ok[n].to_pylist() for n in ("query_id", "query_person_id", "query_camera", "person_id", "camera")}
    lists: dict[str, list] = {}
    labels: dict[str, tuple] = {}
    for qid, qpid, qcam, pid, cam in zip(*columns.values()):
        labels[qid] = (qpid, qcam)
        if pid is None or pid == -1 or (pid == qpid and cam == qcam):
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


def unit_euclidean_from_cosine(cosine_distance: np.ndarray) -> np.ndarray:
    """‖q − g‖ for unit vectors from 1 − q·g (re-ranking works on Euclidean distances, as published)."""
    return np.sqrt(np.clip(2.0 * cosine_distance, 0.0, None)).astype(np.float32)
