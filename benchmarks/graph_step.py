"""The kNN-graph step, two ways on one built version: graph codes (``indexers/graph_codes.py``) vs
the index's own search (how rows were searched before) — each calibrated the way a build
calibrates it, then timed on the same rows in the same run.

    python benchmarks/scale.py --counts 1000000 --keep --workdir /tmp/reidx_scale_gc
    python benchmarks/graph_step.py --gallery /tmp/reidx_scale_gc/g1000000 [--rows 50000]

For each way: the graph breadth chosen on 1,000 sampled items (recall@k ≥ the build's target
against their exact neighbours), that recall, and the wall time per row over ``--rows`` evenly
spaced ids searched as ``knn_range`` searches them (blocks of its size, all cores); prints JSON.
Repeats (``--repeats``, default 3) alternate the two ways; the median is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / ".pyroot"))

from reidx.indexers import build_steps as steps  # noqa: E402
from reidx.indexers.build_tasks import KNN_BLOCK, graph_search  # noqa: E402
from reidx.indexers.check_sample import exact_check, sample_ids  # noqa: E402
from reidx.indexers.faiss_ops import breadth_limit, breadth_start  # noqa: E402
from reidx.indexers.graph_codes import COARSE_NEIGHBOURS  # noqa: E402
from reidx.indexers.knn_graph import knn_rows  # noqa: E402
from reidx.indexers.vector_store import VectorStore  # noqa: E402
from reidx.indexers.versions import current_version, read_meta  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gallery", required=True)
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    folder = current_version(args.gallery)
    meta = read_meta(folder)
    if not meta.graph_files:
        raise SystemExit(f"{folder} has no graph codes (built before them, or not an IVF index)")
    layout = asdict(meta)
    k = meta.knn_k
    store = VectorStore(folder, meta.vector_segments)
    check = exact_check(store, sample_ids(store.count, args.seed))
    ids, truth_ids = check.ids, check.truth_ids
    ways = {"graph_codes": dict(layout), "index_search": {**layout, "graph_files": []}}
    limit = breadth_limit(meta.type, meta.nlist)
    out = {"gallery": str(args.gallery), "version": meta.version, "count": meta.count, "type": meta.type,
           "nlist": meta.nlist, "query_nprobe": meta.nprobe, "k": k, "rows_timed": args.rows, "ways": {}}
    for name, way in ways.items():
        cap = min(limit, COARSE_NEIGHBOURS) if way["graph_files"] else limit
        breadth, got = steps.graph_breadth(folder, way, k, ids, truth_ids, breadth_start(meta.type), cap)
        way["knn_breadth"] = breadth
        out["ways"][name] = {"breadth": breadth, "sampled_recall": got, "ms_per_row": []}
        print(f"[graph_step] {name}: breadth {breadth}, sampled recall@{k} {got}", file=sys.stderr, flush=True)
    timed = np.linspace(0, store.count - KNN_BLOCK, max(1, args.rows // KNN_BLOCK)).astype(np.int64)
    for repeat in range(args.repeats):
        for name, way in ways.items():
            search = graph_search(folder, way)
            started, rows = time.perf_counter(), 0
            for first in timed:
                own = np.arange(first, first + KNN_BLOCK)
                knn_rows(lambda v, kk: search(own, v, kk), store.read(first, first + KNN_BLOCK), own, k)
                rows += len(own)
            out["ways"][name]["ms_per_row"].append(round(1e3 * (time.perf_counter() - started) / rows, 4))
            print(f"[graph_step] repeat {repeat} {name}: {out['ways'][name]['ms_per_row'][-1]} ms/row",
                  file=sys.stderr, flush=True)
    for way in out["ways"].values():
        way["median_ms_per_row"] = statistics.median(way["ms_per_row"])
    out["speedup"] = round(out["ways"]["index_search"]["median_ms_per_row"]
                           / out["ways"]["graph_codes"]["median_ms_per_row"], 2)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
