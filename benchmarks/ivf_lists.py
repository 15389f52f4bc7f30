"""How many inverted lists, and which coarse quantizer: recall@100 against nprobe, same run.

    python benchmarks/ivf_lists.py [--count 1000000] [--nlist 8944] [--nprobes 8,16,32,64] [--quantizers flat,hnsw128,hnsw512]

Why: at 5M detections `benchmarks/scale.py` calibrated nprobe 64 (and a graph breadth of 16)
where 1M had needed 8, which made the kNN-graph step of the build hours long. Two suspects: the
HNSW coarse quantizer that builds switch to from 8,192 lists (does it pick worse lists than exact
search over the centroids?), and the number of lists itself (4·√N). This trains one k-means
(39 points per centroid, 10 iterations, seeded) on ``--count`` vectors of benchmarks/scale.py's
generator (the real crops' neighbour structure), then fills an IVF-Flat index through each
quantizer and measures recall@100 of 1,000 queries (fresh synthetic identities, chunks 900–909)
against exact search at each nprobe. One OpenMP thread, so that it can run beside a build.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import faiss  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--nlist", type=int, default=8944)
    parser.add_argument("--nprobes", default="8,16,32,64")
    parser.add_argument("--quantizers", default="flat,hnsw128,hnsw512")
    args = parser.parse_args()
    from scale import SHARD_ROWS, Crops

    faiss.omp_set_num_threads(1)
    crops = Crops(0)
    x = np.concatenate([crops.chunk(i, SHARD_ROWS) for i in range(-(-args.count // SHARD_ROWS))])[:args.count]
    queries = np.concatenate([crops.chunk(900 + i, 100) for i in range(10)])
    train = x[np.random.default_rng(0).choice(len(x), 39 * args.nlist, replace=False)]
    kmeans = faiss.Kmeans(x.shape[1], args.nlist, niter=10, seed=1, verbose=False, max_points_per_centroid=39)
    started = time.perf_counter()
    kmeans.train(train)
    train_s = time.perf_counter() - started
    _, truth = faiss.knn(queries, x, 100, metric=faiss.METRIC_INNER_PRODUCT)
    recall = {}
    for name in args.quantizers.split(","):
        if name == "flat":
            quantizer = faiss.IndexFlatIP(x.shape[1])
        else:
            quantizer = faiss.IndexHNSWFlat(x.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
            quantizer.hnsw.efConstruction = 40
        quantizer.add(kmeans.centroids)
        if name != "flat":
            quantizer.hnsw.efSearch = int(name[len("hnsw"):])
        index = faiss.IndexIVFFlat(quantizer, x.shape[1], args.nlist, faiss.METRIC_INNER_PRODUCT)
        index.is_trained = True
        index.add(x)
        for nprobe in (int(p) for p in args.nprobes.split(",")):
            index.nprobe = nprobe
            _, found = index.search(queries, 100)
            recall.setdefault(name, {})[nprobe] = round(float(np.mean(
                [len(np.intersect1d(a, b)) / 100 for a, b in zip(found, truth)])), 4)
            print(f"[ivf_lists] {name} nprobe {nprobe}: recall@100 {recall[name][nprobe]}", file=sys.stderr, flush=True)
    print(json.dumps({"count": len(x), "nlist": args.nlist, "mean_list_size": round(len(x) / args.nlist, 1),
                      "train_s": round(train_s, 1), "recall_at_100": recall, "load_at_end": os.getloadavg()}))


if __name__ == "__main__":
    main()
