"""Filtered search: a Faiss ID selector inside the search against a widening search, same run.

    python benchmarks/filtered_search.py [--count 200000] [--queries 100] [--k 100] [--types flat,ivf-sq8,hnsw]

Why: `reidx query --since/--until/--camera/--exclude-same-camera/--min-score` must return each
query's k best among the gallery items that pass, not a filtered top-k. Two ways do that
(indexers/filters.py): the ``selector`` (an IDSelectorBitmap of the passing ids handed to Faiss,
IVF re-searched with doubled nprobe for short lists) and ``widen`` (ask for ~k / fraction
passing, filter, double for queries still short). This measures both on every filter kind, and
what the naive post-filter (cut top-k, then filter) would have returned.

Data: the ``crops`` vectors of benchmarks/search.py (real OSNet features of the Con-ReID crops,
each identity copied with a random shift and small noise), with synthetic metadata: camera
uniform over 6, time uniform over 30 days, detection score uniform in [0.3, 1]; queries get a
random camera. Filters: ``same-camera`` (exclude the query's camera, ~83 % pass), ``camera``
(one camera, ~17 %), ``day`` (a 7.2-hour window, ~1 %), ``hour`` (~0.14 %), ``score`` (≥ 0.9,
~14 %). Ground truth: brute force over the passing items.

Timed: each (index, filter) cell runs selector and widen back to back ``--repeats`` times
(median wall and process CPU seconds; the machine is shared, so both are given). Recall@k is
against the ground truth; ``full`` is the fraction of queries that got min(k, passing) rows.
Prints one JSON object; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search import real_features, replicated_crops  # noqa: E402

from reidx.indexers.faiss_ops import (breadth_limit, breadth_start, calibrate_nprobe, default_nlist,  # noqa: E402
                                      search, set_nprobe, train_and_add)
from reidx.indexers.filters import SearchFilter, filtered_search, item_mask  # noqa: E402

T0 = datetime(2024, 5, 1)


class Bench:
    """What filtered_search reads of a GalleryIndex: index, items, count, meta.nprobe/nlist, search."""

    def __init__(self, index, items, nprobe, nlist, kind):
        self.index, self.items, self.on_gpu = index, items, False
        self.meta = type("Meta", (), {"nprobe": nprobe, "nlist": nlist, "type": kind})()

    @property
    def count(self):
        return self.index.ntotal

    def search(self, vectors, k, nprobe=None):
        set_nprobe(self.index, nprobe or self.meta.nprobe)  # nprobe for IVF, efSearch for hnsw
        return search(self.index, vectors, k)


def log(message: str) -> None:
    print(f"[filtered {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def timed(call, repeats: int):
    walls, cpus, result = [], [], None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = call()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--types", default="flat,ivf-sq8")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    features, identity = real_features("osnet_x0_25_msmt17", ["bounding_box_train", "bounding_box_test", "query"])
    vectors, _, queries, _, _ = replicated_crops(features, identity, args.count, args.queries, args.seed)
    rng = np.random.default_rng(args.seed)
    n = len(vectors)
    minutes = rng.integers(0, 30 * 24 * 60, n)
    items = pa.table({"camera": pa.array(rng.integers(1, 7, n).astype(str)),
                      "timestamp": pa.array([T0 + timedelta(minutes=int(m)) for m in minutes], pa.timestamp("ms")),
                      "score": pa.array(rng.uniform(0.3, 1.0, n).astype(np.float32))})
    query_cams = [frozenset([str(c)]) for c in rng.integers(1, 7, len(queries))]
    filters = {
        "same-camera": SearchFilter(exclude_same_camera=True),
        "camera": SearchFilter(cameras=("3",)),
        "score": SearchFilter(min_score=0.9),
        "day": SearchFilter(since=T0 + timedelta(days=10), until=T0 + timedelta(days=10, hours=7.2)),
        "hour": SearchFilter(since=T0 + timedelta(days=10), until=T0 + timedelta(days=10, hours=1)),
    }
    report = {"count": n, "queries": len(queries), "k": args.k, "dim": int(vectors.shape[1]),
              "faiss": faiss.__version__, "cpus": os.cpu_count(), "load_average_start": os.getloadavg(), "rows": []}
    for kind in args.types.split(","):
        nlist = None if kind in ("flat", "hnsw") else default_nlist(n)
        started = time.perf_counter()
        index = train_and_add(kind, vectors, nlist)
        nprobe = (calibrate_nprobe(index, vectors, breadth_limit(kind, nlist), start=breadth_start(kind))[0]
                  if kind != "flat" else None)
        log(f"{kind}: built in {time.perf_counter() - started:.1f} s, nlist {nlist}, nprobe {nprobe}")
        bench = Bench(index, items, nprobe, nlist, kind)
        plain_wall, plain_cpu, (_, plain_ids) = timed(lambda: bench.search(queries, args.k), args.repeats)
        for name, flt in filters.items():
            base = item_mask(items, flt)
            masks = [base & ~np.isin(items["camera"].to_numpy(zero_copy_only=False), list(c))
                     if flt.exclude_same_camera else base for c in query_cams]
            truth = []
            for q, mask in enumerate(masks):
                allowed = np.flatnonzero(mask)
                sims = vectors[allowed] @ queries[q]
                truth.append(allowed[np.argsort(-sims, kind="stable")[:args.k]])
            row = {"index": kind, "nprobe": nprobe, "filter": name, "passing": round(float(base.mean()), 4)
                   if not flt.exclude_same_camera else round(float(np.mean([m.mean() for m in masks])), 4),
                   "plain_wall_s": round(plain_wall, 3), "plain_cpu_s": round(plain_cpu, 3),
                   "post_filter_rows_mean": round(float(np.mean([m[i[i >= 0]].sum() for m, i in
                                                                 zip(masks, plain_ids)])), 2)}
            for mechanism in ("selector", "widen"):
                wall, cpu, (_, ids) = timed(lambda: filtered_search(bench, queries, args.k, flt, query_cams,
                                                                    mechanism=mechanism), args.repeats)
                hits = [len(np.intersect1d(i[i >= 0], t)) / max(1, len(t)) for i, t in zip(ids, truth)]
                full = [int((i >= 0).sum()) == len(t) for i, t in zip(ids, truth)]
                passed = all(m[i[i >= 0]].all() for m, i in zip(masks, ids))
                row[mechanism] = {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "recall": round(float(np.mean(hits)), 4),
                                  "full": round(float(np.mean(full)), 4), "all_pass": bool(passed)}
            row["widen_over_selector_wall"] = round(row["widen"]["wall_s"] / row["selector"]["wall_s"], 2)
            row["widen_over_selector_cpu"] = round(row["widen"]["cpu_s"] / max(row["selector"]["cpu_s"], 1e-9), 2)
            log(json.dumps(row))
            report["rows"].append(row)
    report["load_average_end"] = os.getloadavg()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
