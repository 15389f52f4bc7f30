"""What limits new items' graph rows in the graph codes: the candidate lists or the shortlist?

    python benchmarks/graph_new_items.py --gallery /tmp/reidx_scale_v2/g5000000 --first-new 5000000

Samples items with ids ≥ ``--first-new`` (those a nightly added), computes their exact top-30
over the whole version (one streamed pass), then their rows from the graph codes
(``indexers/graph_codes.py``) with the lists to scan chosen two ways — the best of their own
list's 128 nearest centroids (what builds do) or an exact coarse search through the index's
quantizer — at several breadths and shortlist lengths; prints recall@30 of each as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import faiss

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / ".pyroot"))

from reidx.indexers.check_sample import sample_ids  # noqa: E402
from reidx.indexers.graph_codes import GraphCodes  # noqa: E402
from reidx.indexers.ivf_ondisk import open_ivf  # noqa: E402
from reidx.indexers.knn_graph import graph_recall, knn_rows  # noqa: E402
from reidx.indexers.vector_store import VectorStore, exact_search  # noqa: E402
from reidx.indexers.versions import current_version, read_meta  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gallery", required=True)
    parser.add_argument("--first-new", type=int, required=True, help="first id a nightly added")
    parser.add_argument("--sample", type=int, default=500)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    folder = current_version(args.gallery)
    meta = read_meta(folder)
    k = meta.knn_k
    store = VectorStore(folder, meta.vector_segments)
    ids = args.first_new + sample_ids(store.count - args.first_new, args.seed, args.sample)
    vectors = store.get(ids)
    _, truth = exact_search(store, vectors, k + 1)
    codes = GraphCodes(folder, asdict(meta))
    mapped = open_ivf([folder / f for f in meta.ivf_files])
    quantizer = faiss.extract_index_ivf(mapped.index).quantizer

    def recall_of(lists, sims, shortlist: int) -> float:
        codes.index.nprobe = lists.shape[1]
        _, candidates = codes.index.search_preassigned(vectors, shortlist, lists, sims)
        found = codes.refine(vectors, candidates, k + 1)
        rows, _ = knn_rows(lambda v, kk: found, vectors, ids, k)
        return round(graph_recall(rows, truth, k), 4)

    out = {"gallery": args.gallery, "version": meta.version, "count": store.count, "nlist": meta.nlist,
           "sampled_new_items": len(ids), "recall_at_30": {}}
    for breadth in (32, 128):
        own = codes.probes(ids, vectors, breadth)
        exact_sims, exact_lists = quantizer.search(vectors, breadth)
        for shortlist in (124, 500):
            out["recall_at_30"][f"breadth {breadth}, shortlist {shortlist}, own list's neighbours"] = \
                recall_of(*own, shortlist)
            out["recall_at_30"][f"breadth {breadth}, shortlist {shortlist}, exact coarse search"] = \
                recall_of(exact_lists, exact_sims, shortlist)
            print(json.dumps(out["recall_at_30"]), file=sys.stderr, flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
