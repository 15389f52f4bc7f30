"""``reidx build-index``: build or update a gallery's index from its committed shards, out of core.

Orchestration only: the steps are :mod:`reidx.indexers.build_steps` (each bounded in memory,
parallel ones run on :mod:`reidx.indexers.distributed`), on-disk IVF files
:mod:`reidx.indexers.ivf_ondisk`, publishing and loading :mod:`reidx.indexers.versions`. A
build holds the gallery's index lock, writes a complete new version folder (hard-linking what
it keeps from the previous one) and swaps it in; a build killed anywhere leaves a staging folder
that the next build removes, and the live version untouched.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from reidx.indexers import build_steps as steps
from reidx.indexers import graph_codes
from reidx.indexers.check_sample import (CHECK_SAMPLE, NEW_CHECK_SAMPLE, TUNE_SAMPLE, CheckSample, check_name,
                                         exact_check, extend_check, first_check, sample_ids)
from reidx.indexers.distributed import Executor
from reidx.indexers.faiss_ops import (DEFAULT_KNN, IN_MEMORY_TYPES, IVF_TYPES, REFINE_FACTOR,
                                      TARGET_RECALL_AT_100, HNSW_QUANTIZER_MIN_NLIST, IndexBuildError, breadth_limit,
                                      breadth_start, choose_type, default_memory_budget, default_nlist,
                                      expected_bytes, parse_bytes, resolve_gpu, training_size)
from reidx.indexers.ivf_ondisk import merge_parts
from reidx.indexers.knn_store import layer_files
from reidx.indexers.searcher import Searcher
from reidx.indexers.vector_store import VectorStore, link_or_copy
from reidx.indexers.versions import (IndexMeta, current_version, index_root, publish_folder, read_meta,
                                     remove_leftovers, staging_folder, version_name)
from reidx.pipeline.gallery import SHARDS_DIR, is_gallery
from reidx.pipeline.integrity import damaged_shards, version_problem
from reidx.pipeline.ledger import committed_shards
from reidx.pipeline.lock import GalleryLock
from reidx.pipeline.shards import shard_row_counts, shards_dir

TEMPLATE = "template.faiss"  # the trained, empty IVF index: nightly parts are copies of it
CALIBRATION_RESIDENT_BYTES = 1 << 30  # mapped list pages a calibration search keeps resident at most


def build_index(gallery: str | os.PathLike, *, index_type: str = "auto", nlist: int | None = None,
                gpu: str = "auto", knn_k: int = DEFAULT_KNN, rebuild: bool = False, seed: int = 0,
                memory_budget: int | str | None = None, workers: int | None = None, scheduler: str | None = None,
                task_rows: int | None = None, log=lambda message: None) -> dict:
    """Build or update GALLERY's index; returns a JSON-able summary.

    Incremental by default: when the live version's type still fits the memory budget, the
    embedder is the same and the gallery has not grown past RETRAIN_GROWTH × the trained count,
    only shards it does not hold yet are read, added as a delta, their kNN rows searched and old
    rows updated from the reverse edges (O(new)); otherwise (or with ``rebuild``) a full,
    out-of-core build. ``workers``/``scheduler``: run the parallel steps on Dask (same result).
    ``task_rows``: vectors per task (default build_steps.ROWS_PER_TASK; the result does not depend
    on it for the index lists, only on how the work is cut).
    """
    started = time.perf_counter()
    gallery = Path(gallery)
    if not is_gallery(gallery):
        raise FileNotFoundError(f"{gallery} is not a gallery (no {SHARDS_DIR}/ folder): run `reidx index` first")
    on_gpu = resolve_gpu(gpu)
    if nlist is not None and nlist < 1:
        raise IndexBuildError(f"--nlist must be at least 1, got {nlist}")
    if knn_k < 0:
        raise IndexBuildError(f"--knn must be ≥ 0, got {knn_k}")
    if workers and scheduler:
        raise IndexBuildError("--scheduler and --workers exclude each other")
    budget = parse_bytes(memory_budget) or default_memory_budget()
    with GalleryLock(index_root(gallery)):
        remove_leftovers(gallery)
        shards = committed_shards(gallery)
        if not shards:
            raise IndexBuildError(f"{gallery} holds no committed shards yet: nothing to index")
        previous = None if rebuild else current_version(gallery)
        damage = version_problem(previous, own_files_only=True) if previous else None
        if damage:
            log(f"the live index {previous.name} is damaged ({damage}): building afresh")
            previous = None
        old = read_meta(previous) if previous else None
        new_shards = [s for s in shards if not old or s not in set(old.shards)]
        refuse_damaged(gallery, new_shards)
        dim = _dim(gallery, shards[0])
        new_rows = int(shard_row_counts(gallery, new_shards).sum())
        total = (old.count if old else 0) + new_rows
        if total == 0:
            raise IndexBuildError(f"{gallery}'s committed shards hold no detections: nothing to index")
        chosen, chosen_why = choose_type(index_type, total, dim, budget, nlist)
        kind, why = steps.kept_type(old, index_type, chosen, chosen_why, total, budget)
        reason = steps.full_rebuild_reason(old, shards, kind, total, knn_k, nlist)
        if reason is not None:  # a full build chooses afresh
            kind, why = chosen, chosen_why
        if reason is None and not new_rows:  # no new shards, or only empty ones
            return _summary(gallery, old, "unchanged", None, 0, on_gpu, started)
        with Executor(workers, scheduler) as executor:
            context = {"gallery": gallery, "executor": executor, "on_gpu": on_gpu, "seed": seed, "log": log,
                       "budget": budget, "dim": dim,
                       "task_rows": task_rows or steps.ROWS_PER_TASK}
            if reason is None:
                log(f"adding {len(new_shards)} new shards to {old.version}")
                if kind != chosen:
                    log(f"{kind} {why}")
                meta = _incremental(context, previous, old, new_shards, shards)
                if kind != chosen:
                    meta.choice = f"{kind}: {why}"
            else:
                if old:
                    log(f"full rebuild: {reason}")
                meta = _full(context, shards, kind, why, nlist, min(knn_k, total))
            meta.build.update({"mode": "full" if reason else "incremental", "gpu": on_gpu, "reason": reason,
                               "workers": executor.workers if executor.distributed else 0,
                               "seconds": round(time.perf_counter() - started, 2)})
            publish_folder(gallery, Path(meta.build.pop("staging")), meta)
    added = total - (old.count if old and reason is None else 0)
    return _summary(gallery, meta, meta.build["mode"], reason, added, on_gpu, started)


def _full(ctx: dict, shards: list[str], kind: str, why: str, nlist: int | None, knn_k: int) -> IndexMeta:
    gallery, executor, log, seed = ctx["gallery"], ctx["executor"], ctx["log"], ctx["seed"]
    version = version_name()
    tmp = staging_folder(gallery, version)
    groups = steps.plan_groups(gallery, shards, ctx["task_rows"])
    total = sum(rows for _, rows in groups)
    nlist_used = None if kind in IN_MEMORY_TYPES else (nlist or default_nlist(total))
    if nlist_used is not None and nlist_used > total:
        raise IndexBuildError(f"--nlist {nlist_used} is more than the {total} vectors to train on")
    sample_size = training_size(total, nlist_used) if nlist_used else 0
    log(f"reading {len(shards)} shards ({total} detections) in {len(groups)} tasks")
    ingested = steps.ingest(executor, gallery, groups, 0, tmp, sample_size, seed)
    embedder = _embedder_of(ingested)
    segments = [r["first_id"] for r in ingested]
    store = VectorStore(tmp, segments)
    ivf_files, graph_files = [], []
    if kind in IN_MEMORY_TYPES:
        if kind == "hnsw":
            log(f"inserting {total} detections into the HNSW graph")
        steps.build_in_memory(kind, tmp, store, None)
    else:
        log(f"training {kind} (nlist {nlist_used}) on {sample_size} sampled vectors")
        sample = steps.training_sample(ingested, sample_size, seed)
        templates = [steps.train(kind, sample, nlist_used, ctx["on_gpu"], seed)]
        _write_durably(tmp / TEMPLATE, templates[0])
        ivf_files = ["index.faiss"]
        if knn_k and graph_codes.supported(kind, store.dim, IVF_TYPES):
            graph_template, coarse = graph_codes.train_graph_codes(templates[0], sample, seed)
            _write_durably(tmp / graph_codes.GRAPH_TEMPLATE, graph_template)
            _write_durably(tmp / graph_codes.GRAPH_COARSE, _npy_bytes(coarse))
            templates.append(graph_template)
            graph_files = [graph_codes.GRAPH_BASE]
        del sample
        log(f"adding {total} detections in {len(segments)} parts")
        steps.add_and_merge(executor, tmp, segments, templates, ivf_files + graph_files)
    layout = {"type": kind, "nlist": nlist_used, "ivf_files": ivf_files, "vector_segments": segments, "nprobe": None,
              "refine_factor": REFINE_FACTOR if kind == "ivf-pq" else None, "graph_files": graph_files}
    log(f"exact neighbours of {min(CHECK_SAMPLE + TUNE_SAMPLE, total)} sampled items (one pass over the vectors)")
    check, tune = first_check(store, seed)
    check.save(tmp / check_name(0))
    nprobe, r10, r100 = _calibrate(tmp, layout, store, check, breadth_limit(kind, nlist_used), breadth_start(kind),
                                   log)
    layout["nprobe"] = nprobe
    layers, knn_recall = [], None
    if knn_k:
        _calibrate_graph(tmp, layout, knn_k, tune, log)
        log(f"computing each item's {knn_k} nearest neighbours")
        layers = steps.graph_ranges(executor, tmp, layout, knn_k, 0, total, "g0", ctx["task_rows"])
        knn_recall = steps.graph_check(tmp, layers, total, knn_k, check.ids, check.truth_ids)
    profile = steps.rerank_profile(tmp, layers, total, knn_k) if knn_k else None
    return IndexMeta(
        version=version, type=kind, metric="inner_product", dim=store.dim, embedder=embedder[0],
        embedder_sha256=embedder[1], count=total, trained_count=total, nlist=nlist_used, nprobe=nprobe,
        recall_at_10=round(r10, 4), recall_at_100=round(r100, 4), knn_k=knn_k, shards=shards,
        built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        build={"staging": str(tmp), "generation": 0, "knn_recall_built": knn_recall,
               "knn_breadth": layout.get("knn_breadth")},
        layout=2, ivf_files=ivf_files, graph_files=graph_files, vector_segments=segments, item_segments=segments,
        knn_layers=layers, check_file=check_name(0),
        refine_factor=layout["refine_factor"], memory_budget=ctx["budget"],
        expected_bytes=expected_bytes(kind, total, store.dim, nlist_used), choice=f"{kind}: {why}",
        knn_recall=knn_recall, quantizer=_quantizer(nlist_used), rerank_profile=profile)


def _incremental(ctx: dict, previous: Path, old: IndexMeta, new_shards: list[str], shards: list[str]) -> IndexMeta:
    """O(new): the old files hard-linked, the new shards ingested and added as a delta file, the
    sample check (nprobe, graph breadth), the new items' graph rows searched, reverse edges into
    old rows, the graph's recall on the sample (and repair)."""
    gallery, executor, log, seed = ctx["gallery"], ctx["executor"], ctx["log"], ctx["seed"]
    version, generation = version_name(), old.build.get("generation", 0) + 1
    tmp = staging_folder(gallery, version)
    in_memory = old.type in IN_MEMORY_TYPES
    keep = [f for f in old.files() if not (in_memory and f == "index.faiss") and f != old.check_file]
    for name in keep + ([] if in_memory else [TEMPLATE]):
        link_or_copy(previous / name, tmp / name)
    groups = steps.plan_groups(gallery, new_shards, ctx["task_rows"])
    ingested = steps.ingest(executor, gallery, groups, old.count, tmp, 0, seed)
    if _embedder_of(ingested) != (old.embedder, old.embedder_sha256):
        raise IndexBuildError("the new shards come from another embedder than the index; one index holds one "
                              "embedder's vectors")
    new_segments = [r["first_id"] for r in ingested]
    segments = old.vector_segments + new_segments
    store = VectorStore(tmp, segments)
    total = store.count
    ivf_files, graph_files = list(old.ivf_files), list(old.graph_files)
    if in_memory:
        steps.build_in_memory(old.type, tmp, store, previous / "index.faiss")
    else:
        templates = [(tmp / TEMPLATE).read_bytes()]
        deltas = [f"delta-g{generation}.faiss"]
        if graph_files:
            templates.append((tmp / graph_codes.GRAPH_TEMPLATE).read_bytes())
            deltas.append(f"graph-delta-g{generation}.faiss")
        log(f"adding {total - old.count} detections as {deltas[0]}")
        steps.add_and_merge(executor, tmp, new_segments, templates, deltas,
                            probes=graph_codes.PROBES_KEPT if graph_files else 0)
        ivf_files.append(deltas[0])
        graph_files += deltas[1:]
        if len(ivf_files) - 1 > steps.MAX_DELTAS:
            ivf_files = _merge_deltas(tmp, templates[0], ivf_files, f"index-g{generation}.faiss", log)
            if graph_files:
                graph_files = _merge_deltas(tmp, templates[1], graph_files, f"graph-g{generation}.faiss", log)
    layout = {"type": old.type, "nlist": old.nlist, "ivf_files": ivf_files, "vector_segments": segments,
              "nprobe": old.nprobe, "refine_factor": old.refine_factor, "graph_files": graph_files,
              "knn_exact_coarse": True}  # new items' lists by the quantizer (graph_codes.exact_probes)
    layers, knn_recall, built_recall, touched, repaired = list(old.knn_layers), None, None, 0, False
    check, new_tune = _grown_check(previous, old, store, [seed, generation], log)
    check.save(tmp / check_name(generation))
    nprobe, r10, r100 = _calibrate(tmp, layout, store, check, breadth_limit(old.type, old.nlist),
                                   old.nprobe or breadth_start(old.type), log)
    layout["nprobe"] = nprobe
    if old.knn_k:  # the graph breadth calibrated on sampled new items: their rows as accurate as a build's
        _calibrate_graph(tmp, layout, old.knn_k, new_tune, log)
        new_layers = steps.graph_ranges(executor, tmp, layout, old.knn_k, old.count, total,
                                        f"g{generation}", ctx["task_rows"])
        reverse, touched = steps.reverse_layer(tmp, old.knn_layers, new_layers, old.count, total, old.knn_k,
                                               f"knn-g{generation}-reverse")
        layers += new_layers + ([reverse] if reverse else [])
        log(f"graph: {total - old.count} new rows, {touched} old rows gained a new neighbour")
    for first in new_segments:  # the add's coarse search, kept for the new rows only: not part of the version
        (tmp / graph_codes.probes_name(first)).unlink(missing_ok=True)
    built_recall = old.build.get("knn_recall_built")
    if old.knn_k:
        knn_recall = steps.graph_check(tmp, layers, total, old.knn_k, check.ids, check.truth_ids)
        target = steps.KNN_TARGET_RECALL if layout.get("knn_breadth") else 1.0  # exact rows (flat) stay exact
        floor = max(steps.KNN_MIN_RECALL, min(built_recall or 0, target) - steps.KNN_MAX_DRIFT)
        if knn_recall < floor:
            log(f"graph recall@{old.knn_k} {knn_recall} < {floor:.3f}: recomputing every row")
            for name in layers:
                for f in layer_files(name):
                    (tmp / f).unlink()
            layers = steps.graph_ranges(executor, tmp, layout, old.knn_k, 0, total,
                                        f"g{generation}r", ctx["task_rows"])
            knn_recall = built_recall = steps.graph_check(tmp, layers, total, old.knn_k, check.ids, check.truth_ids)
            repaired = True
    meta = IndexMeta(**{**asdict(old), "version": version, "count": total, "nprobe": nprobe,
                        "recall_at_10": round(r10, 4), "recall_at_100": round(r100, 4), "shards": shards,
                        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        "ivf_files": ivf_files, "graph_files": graph_files, "vector_segments": segments,
                        "item_segments": segments,
                        "knn_layers": layers, "knn_recall": knn_recall, "memory_budget": ctx["budget"],
                        "check_file": check_name(generation),
                        "expected_bytes": expected_bytes(old.type, total, old.dim, old.nlist),
                        "rerank_profile": steps.rerank_profile(tmp, layers, total, old.knn_k) if old.knn_k else None})
    meta.build = {"staging": str(tmp), "generation": generation, "knn_recall_built": built_recall,
                  "knn_rows_updated": touched, "knn_repaired": repaired, "knn_breadth": layout.get("knn_breadth"),
                  "knn_exact_coarse": bool(layout.get("graph_files"))}
    return meta


def _grown_check(previous: Path, old: IndexMeta, store: VectorStore, seed, log) -> tuple[CheckSample, CheckSample]:
    """(the check sample of the grown gallery, sampled new items to tune on), exact top-100s: the live
    version's sample updated from the new rows (O(new), ``indexers.check_sample``); drawn afresh
    where that version kept none (built before samples were kept)."""
    if old.check_file and (previous / old.check_file).is_file():
        kept = CheckSample.load(previous / old.check_file)
        log(f"exact neighbours of the sample from the {store.count - old.count} new items, and of "
            f"{NEW_CHECK_SAMPLE} sampled new items (one pass over the vectors)")
    else:
        log(f"{old.version} kept no check sample: exact neighbours of {CHECK_SAMPLE} sampled items")
        kept = exact_check(VectorStore(previous, old.vector_segments), sample_ids(old.count, seed))
    return extend_check(store, kept, old.count, seed)


def _calibrate(folder: Path, layout: dict, store: VectorStore, check: CheckSample, limit: int | None, start: int,
               log) -> tuple[int | None, float, float]:
    """The queries' search breadth (IVF nprobe, HNSW efSearch) calibrated on the check sample from
    ``start`` up to ``limit``; (breadth, recall@10, recall@100)."""
    searcher = Searcher(folder, layout, resident_bytes=CALIBRATION_RESIDENT_BYTES)
    nprobe, r10, r100 = steps.calibrate(searcher, store.get(check.ids), check.truth_ids, limit, start)
    log(f"queries search at breadth {nprobe}: sampled recall@10 {r10:.4f}, recall@100 {r100:.4f}")
    if r100 < TARGET_RECALL_AT_100:
        log(f"warning: recall@100 is {r100:.3f} even at search breadth {nprobe} ({layout['type']} loses "
            f"accuracy in its compression or graph); use ivf-flat or ivf-sq8 for higher recall")
    return nprobe, r10, r100


def _calibrate_graph(folder: Path, layout: dict, k: int, sample: CheckSample, log) -> None:
    """The graph rows' own search breadth (layout["knn_breadth"]), from the sample; none for flat."""
    limit = breadth_limit(layout["type"], layout.get("nlist"))
    if not limit:
        return
    if layout.get("graph_files") and not layout.get("knn_exact_coarse"):
        limit = min(limit, graph_codes.COARSE_NEIGHBOURS)
    breadth, got = steps.graph_breadth(folder, layout, k, sample.ids, sample.truth_ids, breadth_start(layout["type"]),
                                       limit)
    layout["knn_breadth"] = breadth
    codes = "graph codes" if layout.get("graph_files") else "the index"
    log(f"graph rows searched in {codes} at breadth {breadth} (sampled recall@{k} {got}; "
        f"queries use {layout['nprobe']})")


def _merge_deltas(folder: Path, template: bytes, files: list[str], base: str, log) -> list[str]:
    """A base IVF file and its deltas merged into ``base`` (a streamed O(N) copy); [base]."""
    log(f"merging {files[0]} and {len(files) - 1} deltas into {base}")
    merge_parts(template, [folder / f for f in files], folder / base)
    for name in files:
        (folder / name).unlink()
    return [base]


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def refuse_damaged(gallery: Path, shards: list[str]) -> None:
    """Never index a shard that differs from what was committed (checksum, rows, finite unit vectors)."""
    damaged = damaged_shards(gallery, shards)
    if damaged:
        name, problem = next(iter(damaged.items()))
        raise IndexBuildError(f"{len(damaged)} committed shard(s) are damaged, e.g. {name}: {problem}; run "
                              f"`reidx verify {gallery} --repair` (their images are indexed again next night)")


def _quantizer(nlist: int | None) -> str:
    return "none" if nlist is None else ("hnsw32" if nlist >= HNSW_QUANTIZER_MIN_NLIST else "flat")


def _dim(gallery: Path, shard: str) -> int:
    import pyarrow.parquet as pq

    return pq.read_schema(shards_dir(gallery) / shard).field("embedding").type.list_size


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _embedder_of(ingested: list[dict]) -> tuple[str, str]:
    pairs = {tuple(p) for r in ingested for p in r["embedders"]}
    if len(pairs) != 1:
        raise IndexBuildError(f"the shards hold embeddings of {len(pairs)} embedders ({sorted(pairs)}); "
                              f"one index holds one embedder's vectors")
    return pairs.pop()


def _summary(gallery: Path, meta: IndexMeta, mode: str, reason: str | None, added: int, on_gpu: bool,
             started: float) -> dict:
    """What `reidx build-index --json` prints: the live version's figures and what this run did."""
    return {"gallery": str(gallery), "index_version": meta.version, "mode": mode, "reason": reason,
            "index_type": meta.type, "persons": meta.count, "persons_added": added, "nlist": meta.nlist,
            "nprobe": meta.nprobe, "recall_at_10": meta.recall_at_10, "recall_at_100": meta.recall_at_100,
            "knn_k": meta.knn_k, "knn_recall": meta.knn_recall, "memory_budget": meta.memory_budget,
            "expected_bytes": meta.expected_bytes, "gpu": on_gpu, "wall_s": round(time.perf_counter() - started, 2)}
