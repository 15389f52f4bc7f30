"""The steps of an out-of-core index build, each bounded in memory whatever the gallery size.

full build:   plan → ingest (shards → vector + items segments, sample; parallel) → train on the
              sample → add (segments → IVF parts; parallel) → merge (parts → base file, streamed)
              → check (calibrate nprobe on a sample) → graph (rows by range; parallel) → check graph
nightly:      plan new shards → ingest → add with the old template → merge into one delta file
              → graph rows of the new items + reverse edges into old rows → check, repair if drifted

Results do not depend on the number of workers: tasks are cut by rows (ROWS_PER_TASK,
KNN_TASK_ROWS), not by workers, samples are seeded per task, and parts merge in id order.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np

from reidx.indexers.build_tasks import add_segment, graph_search, ingest_shards, knn_range
from reidx.indexers.check_sample import TRUTH_K, sample_ids
from reidx.indexers.faiss_ops import (IVF_TYPES, RETRAIN_GROWTH, TARGET_RECALL_AT_100, expected_bytes, new_index,
                                      recall, train_empty)
from reidx.indexers.ivf_ondisk import merge_parts, template_bytes
from reidx.indexers.knn_graph import graph_recall, knn_rows, reverse_edges
from reidx.indexers.knn_store import KnnGraph, SparseLayerWriter, layer_files
from reidx.indexers.rerank_adaptive import gallery_rerank_profile_of
from reidx.indexers.searcher import Searcher
from reidx.indexers.vector_store import VectorStore
from reidx.pipeline.shards import shard_row_counts

if TYPE_CHECKING:
    from reidx.indexers.versions import IndexMeta

ROWS_PER_TASK = 250_000  # vectors per ingest/add task: a part of ≤ 250k codes in a worker's memory
KNN_TASK_ROWS = 250_000
KNN_MIN_RECALL = 0.90  # repair the graph below this recall@k, or when it lost KNN_MAX_DRIFT from the target or
# from its recall when built, whichever is lower (a build's breadth overshoots the target by up to one doubling)
KNN_MAX_DRIFT = 0.03
KNN_TARGET_RECALL = 0.95  # graph rows are searched at the breadth that reaches this recall@k on the sample
FLAT_STEP_GAIN = 0.002  # ... or where a × 1.5 wider search gains less than this (choose_breadth)
PROFILE_ROWS = 262_144  # graph rows the re-ranking profile is estimated from (all, below)
MAX_DELTAS = 8  # nightly delta files before they are merged into the base (a streamed O(N) copy)


def plan_groups(gallery: Path, shards: list[str], rows_per_task: int = ROWS_PER_TASK) -> list[tuple[list[str], int]]:
    """Consecutive runs of non-empty shards of about ``rows_per_task`` rows: [(shards, rows)]."""
    groups, current, rows = [], [], 0
    for name, count in zip(shards, shard_row_counts(gallery, shards)):
        if count == 0:
            continue
        current.append(name)
        rows += int(count)
        if rows >= rows_per_task:
            groups.append((current, rows))
            current, rows = [], 0
    if current:
        groups.append((current, rows))
    return groups


def ingest(executor, gallery: Path, groups, first_id: int, folder: Path, sample_size: int, seed: int) -> list[dict]:
    """Every group into its vector and items segments (ids from first_id, in group order)."""
    total = sum(rows for _, rows in groups)
    fraction = min(1.0, 1.05 * sample_size / total) if sample_size and total else 0.0
    calls, next_id = [], first_id
    for shards, rows in groups:
        calls.append({"gallery": str(gallery), "shards": shards, "first_id": next_id, "folder": str(folder),
                      "sample_fraction": fraction, "seed": seed})
        next_id += rows
    return executor.map(ingest_shards, calls)


def training_sample(ingested: list[dict], size: int, seed: int) -> np.ndarray:
    """The ingest tasks' samples together, cut to ``size`` rows (seeded). Each task's part is
    dropped once copied: memory peaks at the sample plus one part, not twice the sample."""
    total = sum(len(r["sample"]) for r in ingested)
    keep = np.sort(np.random.default_rng(seed).choice(total, size, replace=False)) if total > size else None
    dim = ingested[0]["sample"].shape[1] if ingested else 0
    sample = np.empty((total if keep is None else len(keep), dim), np.float32)
    at = filled = 0
    for r in ingested:
        part = r.pop("sample")
        rows = np.arange(at, at + len(part))
        picked = rows if keep is None else keep[(keep >= at) & (keep < at + len(part))]
        sample[filled:filled + len(picked)] = part[picked - at]
        filled += len(picked)
        at += len(part)
        del part
    return sample


def train(kind: str, sample: np.ndarray, nlist: int, on_gpu: bool, seed: int) -> bytes:
    """The trained empty index (serialised) from the training sample."""
    if len(sample) < nlist:
        raise ValueError(f"nlist {nlist} is more than the {len(sample)} vectors sampled to train on")
    return template_bytes(train_empty(kind, sample, nlist, on_gpu, seed))


def add_and_merge(executor, folder: Path, segments: list[int], templates: list[bytes], outs: list[str],
                  probes: int = 0) -> int:
    """Each segment into a part of each template (the index, then the graph codes; parallel, one
    list assignment; ``probes``: each vector's nearest lists kept too), each template's parts
    merged into its ``outs`` file in id order."""
    parts = [[f".part-{first:012d}-{n}.faiss" for n in range(len(templates))] for first in segments]
    executor.map(add_segment, [{"folder": str(folder), "first_id": first, "templates": templates, "parts": names,
                                "probes": probes} for first, names in zip(segments, parts)])
    counts = set()
    for n, (template, out) in enumerate(zip(templates, outs)):
        counts.add(merge_parts(template, [folder / names[n] for names in parts], folder / out))
        for names in parts:
            (folder / names[n]).unlink()
    return counts.pop()


def build_in_memory(kind: str, folder: Path, store: VectorStore, previous: Path | None) -> int:
    """index.faiss as an in-memory index (exact, or the HNSW graph): the previous one plus the
    store's rows past it, so a nightly inserts only the new rows. (HNSW insertion runs on all
    cores and its graph depends on their interleaving: two builds find the same neighbours up to
    the calibrated recall, not bit-identical graphs.)"""
    index = faiss.read_index(str(previous)) if previous else new_index(kind, store.dim, None)
    for _, block in store.iter_blocks(start=int(index.ntotal)):
        index.add(block)
    faiss.write_index(index, str(folder / "index.faiss"))
    with open(folder / "index.faiss", "rb") as f:
        import os

        os.fsync(f.fileno())
    return int(index.ntotal)


def calibrate(searcher: Searcher, queries: np.ndarray, truth_ids: np.ndarray, limit: int | None,
              start: int = 1, target: float = TARGET_RECALL_AT_100) -> tuple[int | None, float, float]:
    """Smallest power-of-two search breadth (IVF nprobe, HNSW efSearch) ≥ ``start`` whose
    recall@100 on the sample reaches ``target``, at most ``limit`` (None: exact, nothing to set)
    — the index searched as queries will search it, refine included; (breadth, recall@10, recall@100)."""
    if not limit:
        _, found = searcher.search(queries, TRUTH_K)
        return None, recall(found, truth_ids, 10), recall(found, truth_ids, TRUTH_K)
    nprobe = max(1, min(start, limit))
    while True:
        _, found = searcher.search(queries, TRUTH_K, nprobe)
        r10, r100 = recall(found, truth_ids, 10), recall(found, truth_ids, TRUTH_K)
        if r100 >= target or nprobe >= limit:
            return nprobe, r10, r100
        nprobe = min(2 * nprobe, limit)


def graph_ranges(executor, folder: Path, layout: dict, k: int, start: int, stop: int, prefix: str,
                 rows: int = KNN_TASK_ROWS) -> list[str]:
    """Graph rows of ids start..stop-1 as dense layers, one per ``rows`` ids (parallel)."""
    calls = [{"folder": str(folder), "layout": layout, "start": a, "stop": min(stop, a + rows), "k": k,
              "layer": f"knn-{prefix}-{a:012d}"} for a in range(start, stop, rows)]
    return executor.map(knn_range, calls)


def graph_breadth(folder: Path, layout: dict, k: int, ids: np.ndarray, truth_ids: np.ndarray, start: int,
                  limit: int, target: float = KNN_TARGET_RECALL) -> tuple[int, float]:
    """The search breadth for graph rows, apart from the queries' (theirs is set for recall@100, a
    graph row needs only its top k), chosen by :func:`choose_breadth` from the recall@k of the
    sampled ``ids``' rows against their exact neighbours; (breadth, recall). Searched as
    :func:`graph_ranges` searches them."""
    vectors = VectorStore(folder, layout["vector_segments"]).get(ids)

    def measure(breadth: int) -> float:
        search = graph_search(folder, {**layout, "knn_breadth": breadth})
        rows, _ = knn_rows(lambda v, kk: search(ids, v, kk), vectors, ids, k)
        return graph_recall(rows, truth_ids, k)

    return choose_breadth(measure, start, limit, target)


def choose_breadth(measure, start: int, limit: int, target: float = KNN_TARGET_RECALL,
                   flat_gain: float = FLAT_STEP_GAIN) -> tuple[int, float]:
    """The smallest breadth of the series 1, 2, 3, 5, 8, 12, 18, … (× 1.5: a doubling overshoots
    the need by 41 % on average, and the rows' cost follows the breadth) from ``start`` whose
    ``measure(breadth)`` (a recall) reaches ``target``, at most ``limit`` — or, where the curve
    flattens below the target, the breadth before the first step that gained less than
    ``flat_gain``: what the codes and the shortlist can reach is then reached, and wider searches
    only cost. (10M synthetic gallery: the 500 tuning items read 0.9454 at the cap of 128 lists,
    so every row was searched at 128 — about 2k rows/s against 7.6k at 5M's 16 — where 1,000
    other items read 0.9500 at 41 and 0.9525 at 128; ``benchmarks/graph_breadth.py``.)
    Returns (breadth, recall) rounded."""
    breadth, previous = max(1, min(start, limit)), None
    while True:
        got = measure(breadth)
        if got >= target or breadth >= limit:
            return breadth, round(got, 4)
        if previous is not None and got - previous[1] < flat_gain:
            return previous[0], round(previous[1], 4)
        previous = (breadth, got)
        breadth = min(next_breadth(breadth), limit)


def next_breadth(breadth: int) -> int:
    """The breadth after this one in the series 1, 2, 3, 5, 8, 12, 18, … (× 1.5)."""
    return max(breadth + 1, (3 * breadth + 1) // 2)


def reverse_layer(folder: Path, old_layers: list[str], new_layers: list[str], old_count: int, total: int,
                  k: int, name: str) -> tuple[str | None, int]:
    """The sparse layer of old rows that gain a new neighbour (:func:`reverse_edges`); (name, rows).
    Memory: the new items' rows (O(new · k)) and one block of touched old rows."""
    old = KnnGraph(folder, old_layers, old_count, k)
    new = KnnGraph(folder, new_layers, total, k)
    new_ids, new_dist = new.lookup(np.arange(old_count, total))  # the new items' rows, O(new · k)
    writer = SparseLayerWriter(folder, name, k)
    for rows, ids, dist in reverse_edges(old.lookup, new_ids, new_dist, old_count):
        writer.write(rows, ids, dist)
    writer.close()
    if not writer.count:
        for f in layer_files(name):
            (folder / f).unlink()
        return None, 0
    return name, writer.count


def graph_check(folder: Path, layers: list[str], count: int, k: int, ids: np.ndarray, truth_ids: np.ndarray) -> float:
    """recall@k of the stored rows of the sampled items against their exact top-k."""
    rows, _ = KnnGraph(folder, layers, count, k).lookup(ids)
    return round(graph_recall(rows, truth_ids, k), 4)


def rerank_profile(folder: Path, layers: list[str], total: int, k: int, seed: int = 0) -> dict:
    """The gallery's adaptive re-ranking profile (``indexers.rerank_adaptive``) from its stored
    graph, read in row blocks; meta.json keeps it so that queries need not read the whole graph.
    Its figures are medians and shares of per-row counts: past PROFILE_ROWS rows they come from a
    seeded sample of that many rows (a nightly then reads O(sample), not the whole graph)."""
    graph, block = KnnGraph(folder, layers, total, k), 1 << 16
    rows = np.arange(total) if total <= PROFILE_ROWS else sample_ids(total, seed, PROFILE_ROWS)
    return gallery_rerank_profile_of(graph.lookup(rows[start:start + block]) for start in range(0, len(rows), block))


def kept_type(old: IndexMeta | None, requested: str, kind: str, why: str, total: int,
               budget: int) -> tuple[str, str]:
    """Under ``--type auto`` a gallery that outgrows its IVF type's budget between retrains keeps
    the live type until its next retrain (growth past RETRAIN_GROWTH × the trained size), where the
    budget chooses again: one night's growth past the budget must not turn that nightly into a full
    rebuild (at 10M → 13M on 2 cores: about two hours instead of ten minutes). A changed budget, or
    an explicit ``--type``, re-chooses at once. (An old layout or a retrain is a full rebuild, which
    :func:`full_rebuild_reason` finds and the caller then builds with the type chosen now.)"""
    if (requested != "auto" or old is None or kind == old.type or old.type not in IVF_TYPES
            or kind not in IVF_TYPES or old.memory_budget != budget):
        return kind, why
    size = expected_bytes(old.type, total, old.dim, old.nlist)
    return old.type, (f"kept until the next retrain (past {RETRAIN_GROWTH:g} × {old.trained_count:,} vectors): "
                      f"expected {size / 2**30:.2f} GiB, over the {budget / 2**30:.2f} GiB budget; "
                      f"the retrain will choose {kind} if the budget still says so ({why})")


def full_rebuild_reason(old: IndexMeta | None, shards: list[str], kind: str, total: int, knn_k: int,
                         nlist: int | None) -> str | None:
    """Why the live version cannot simply be extended (None: it can)."""
    if old is None:
        return "no index yet"
    if old.layout < 2:
        return "the live version has the layout from before out-of-core builds"
    if set(old.shards) - set(shards):
        return "shards were removed from the gallery"
    if kind != old.type:
        return f"index type changes from {old.type} to {kind}"
    if nlist is not None and nlist != old.nlist:
        return f"nlist changes from {old.nlist} to {nlist}"
    if knn_k != old.knn_k and min(knn_k, total) != old.knn_k:
        return f"kNN graph size changes from {old.knn_k} to {knn_k}"
    if kind in IVF_TYPES and total > RETRAIN_GROWTH * old.trained_count:
        return f"the gallery grew from {old.trained_count} to {total} (> {RETRAIN_GROWTH:g}× the trained size)"
    return None
