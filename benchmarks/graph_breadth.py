"""The graph rows' recall and cost against their search breadth (and shortlist), on one built version.

    python benchmarks/scale.py --counts 10000000 --keep --workdir /tmp/reidx_scale_10m
    python benchmarks/graph_breadth.py --gallery /tmp/reidx_scale_10m/g10000000 [--items 1000] [--refine 4,8]
    python benchmarks/graph_breadth.py --staging GALLERY/index/.v-….tmp --nlist N  # a full build still running

A build searches every item's graph row at the smallest breadth of the series 1, 2, 3, 5, 8, …
whose rows reach recall@k 0.95 on a sample (``build_steps.graph_breadth``), at most
``graph_codes.COARSE_NEIGHBOURS`` lists; the rows' cost grows with the breadth. This prints the
whole curve — for each breadth of the series and each shortlist factor (``GRAPH_REFINE``: the
fast-scan shortlist is that × k, re-scored exactly) — recall@k of ``--items`` sampled items
against their exact neighbours (a sample drawn with ``--seed``, not the build's) and the wall time
per row, so a stopping rule can be read off it. With ``--staging`` it reads the staging folder of
a full build that has written its graph codes (its layout from the file names, its sample the
build's kept check sample ``check-g0.npz``: exact top-100 of 1,000 items, not the tuning sample),
so a long build's curve can be read while its graph rows are computed. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from reidx.indexers import graph_codes
from reidx.indexers.build_steps import next_breadth
from reidx.indexers.build_tasks import graph_search
from reidx.indexers.check_sample import CheckSample, check_name, exact_check, sample_ids
from reidx.indexers.knn_graph import graph_recall, knn_rows
from reidx.indexers.vector_store import VectorStore
from reidx.indexers.versions import current_version, read_meta


def series(limit: int) -> list[int]:
    out, breadth = [], 1
    while breadth < limit:
        out.append(breadth)
        breadth = next_breadth(breadth)
    return out + [limit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gallery")
    parser.add_argument("--staging", help="a full build's staging folder (instead of --gallery)")
    parser.add_argument("--nlist", type=int, help="with --staging: the build's nlist (its log says it)")
    parser.add_argument("--k", type=int, default=30, help="with --staging: the graph's k")
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--refine", default=str(graph_codes.GRAPH_REFINE), help="shortlist factors, comma-separated")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    if args.staging:
        folder = Path(args.staging)
        segments = sorted(int(p.name[8:20]) for p in folder.glob("vectors-*.npy"))
        layout = {"type": "staging", "nlist": args.nlist, "ivf_files": ["index.faiss"], "graph_files": ["graph.faiss"],
                  "vector_segments": segments, "version": folder.name, "count": None, "build": {}}
        k, store = args.k, VectorStore(folder, segments)
        check = CheckSample.load(folder / check_name(0)).rows(slice(0, args.items))
    else:
        folder = current_version(Path(args.gallery))
        layout = asdict(read_meta(folder))
        k, store = layout["knn_k"], VectorStore(folder, layout["vector_segments"])
        started = time.perf_counter()
        check = exact_check(store, sample_ids(store.count, args.seed, args.items))
        print(f"[graph_breadth] exact neighbours of {len(check.ids)} items: {time.perf_counter() - started:.0f} s",
              file=sys.stderr, flush=True)
    vectors = store.get(check.ids)
    limit = min(layout["nlist"], graph_codes.COARSE_NEIGHBOURS)
    out = {"gallery": args.gallery or args.staging, "version": layout["version"], "count": store.count,
           "nlist": layout["nlist"], "k": k, "built_breadth": layout["build"].get("knn_breadth"),
           "items": len(check.ids), "curves": {}}
    for factor in (int(f) for f in args.refine.split(",")):
        graph_codes.GRAPH_REFINE = factor
        curve = []
        for breadth in series(limit):
            search = graph_search(folder, {**layout, "knn_breadth": breadth})
            tic = time.perf_counter()
            rows, _ = knn_rows(lambda v, kk: search(check.ids, v, kk), vectors, check.ids, k)
            seconds = time.perf_counter() - tic
            curve.append({"breadth": breadth, "recall": round(graph_recall(rows, check.truth_ids, k), 4),
                          "ms_per_row": round(1e3 * seconds / len(check.ids), 3)})
            print(f"[graph_breadth] refine {factor} breadth {breadth}: {curve[-1]}", file=sys.stderr, flush=True)
        out["curves"][f"refine_{factor}"] = curve
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
