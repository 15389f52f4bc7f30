"""Scalable re-ranking on a 1,000,000-item gallery: ms per query and peak memory (issue 6, item 3).

    python benchmarks/rerank_scalable.py [--gallery 1000000] [--queries 1000] [--top-k 100] [--knn 30]
    python benchmarks/rerank_scalable.py --con-reid   # accuracy: scalable vs exact mAP on Con-ReID by top K

Data (seeded, synthetic, 512-d, L2-normalised): the gallery is made of scenes (1,000 items each)
holding identities (about 20 images each): item = normalise(scene centre + 0.8·identity offset
+ 0.45·noise); queries are fresh images of random identities. Scenes lie far apart, so every
item's nearest neighbours fall inside its own scene, and the gallery kNN graph is computed
exactly scene by scene (a 1M × 1M flat search would take hours on 2 cores). That shortcut is
checked, not assumed: ``--check-rows`` random rows are searched against the whole gallery with
a Faiss flat index and must list the same neighbours. Query candidates come from a Faiss flat
(exact) inner-product search over all items; its time per query is the same-run baseline.

The graph is a full (G, k) array (ids int64, distances float32: 360 MB at 1M × 30), held in
memory by the re-ranking process. Each method runs in its own subprocess that loads only the
candidates, the graph and the row normaliser (the 2 GB of vectors stay in the build process),
so its peak RSS is what `reidx query` would need beyond the index. Exact mode is not run: its
(Q + G)² distances would be 4 TB. This machine kind has 2 cores, often shared: the load
average at start and end is reported. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.rerank import peak_rss_kib, reset_peak_rss  # noqa: E402

SCENE_SIZE = 1000
IMAGES_PER_IDENTITY = 20


def normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_data(num_gallery: int, num_queries: int, dim: int, seed: int):
    """(gallery, queries, query identity) vectors: scenes of identities, see the module doc."""
    rng = np.random.default_rng(seed)
    num_scenes = num_gallery // SCENE_SIZE
    identities_per_scene = SCENE_SIZE // IMAGES_PER_IDENTITY
    scene = normalise(rng.standard_normal((num_scenes, dim)).astype(np.float32))
    offset = 0.8 * rng.standard_normal((num_scenes * identities_per_scene, dim)).astype(np.float32) / np.sqrt(dim)
    gallery = np.empty((num_scenes * SCENE_SIZE, dim), np.float32)
    identity_of = np.repeat(np.arange(num_scenes * identities_per_scene), IMAGES_PER_IDENTITY)
    for s in range(num_scenes):  # scene by scene: temporaries stay small
        rows = slice(s * SCENE_SIZE, (s + 1) * SCENE_SIZE)
        noise = 0.45 * rng.standard_normal((SCENE_SIZE, dim)).astype(np.float32) / np.sqrt(dim)
        gallery[rows] = normalise(scene[s] + offset[identity_of[rows]] + noise)
    query_identity = rng.choice(len(offset), num_queries, replace=False)
    noise = 0.45 * rng.standard_normal((num_queries, dim)).astype(np.float32) / np.sqrt(dim)
    queries = normalise(scene[query_identity // identities_per_scene] + offset[query_identity] + noise)
    return gallery, queries.astype(np.float32)


def to_distance(similarity):
    return np.sqrt(np.maximum(2.0 - 2.0 * similarity, 0.0)).astype(np.float32)


def scene_graph(gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each item's k nearest items (itself first), searched within its scene."""
    import torch

    ids = np.empty((len(gallery), k), np.int64)
    dist = np.empty((len(gallery), k), np.float32)
    for start in range(0, len(gallery), SCENE_SIZE):
        block = torch.from_numpy(gallery[start: start + SCENE_SIZE])
        similarity, index = torch.topk(block @ block.T, k, dim=1)
        ids[start: start + SCENE_SIZE] = index.numpy() + start
        dist[start: start + SCENE_SIZE] = to_distance(similarity.numpy())
    return ids, dist


def build(args, folder: Path) -> dict:
    """Vectors, the Faiss top-K of every query (timed), the graph, the check; arrays saved to ``folder``."""
    import faiss

    from reidx.indexers.rerank_lists import estimate_max_distance

    report = {}
    start = time.perf_counter()
    gallery, queries = make_data(args.gallery, args.queries, args.dim, args.seed)
    report["generate_s"] = round(time.perf_counter() - start, 1)
    index = faiss.IndexFlatIP(args.dim)
    index.add(gallery)
    start = time.perf_counter()
    similarity, candidates = index.search(queries, max(args.top_k))
    report["faiss_flat_search_ms_per_query"] = round(1000 * (time.perf_counter() - start) / args.queries, 2)
    start = time.perf_counter()
    graph_ids, graph_dist = scene_graph(gallery, args.knn)
    report["graph_build_s"] = round(time.perf_counter() - start, 1)
    rng = np.random.default_rng(args.seed + 1)
    rows = np.sort(rng.choice(len(gallery), args.check_rows, replace=False))
    check_similarity, check_ids = index.search(gallery[rows], args.knn)
    same_sets = [set(a) == set(b) for a, b in zip(check_ids.tolist(), graph_ids[rows].tolist())]
    report["graph_check"] = {
        "rows_checked": int(args.check_rows), "rows_with_identical_neighbour_sets": int(sum(same_sets)),
        "max_abs_distance_difference": float(np.abs(to_distance(check_similarity) - graph_dist[rows]).max())}
    max_distance = estimate_max_distance(queries, gallery)
    np.save(folder / "query_ids.npy", candidates.astype(np.int64))
    np.save(folder / "query_dist.npy", to_distance(similarity))
    np.save(folder / "graph_ids.npy", graph_ids)
    np.save(folder / "graph_dist.npy", graph_dist)
    report["max_distance_estimate"] = round(max_distance, 4)
    report["build_peak_rss_mib"] = round(peak_rss_kib() / 1024, 1)
    return report


def rerank_worker(method: str, top_k: int, folder: Path, max_distance: float, repeats: int) -> dict:
    """One method in a fresh process: load the arrays, re-rank every query's top_k candidates,
    wall and CPU time, peak memory."""
    from reidx.indexers.rerank import RERANK_THREADS
    from reidx.indexers.rerank_sparse import rerank_candidates

    arrays = {name: np.load(folder / f"{name}.npy") for name in ("query_ids", "query_dist", "graph_ids", "graph_dist")}
    arrays["query_ids"] = np.ascontiguousarray(arrays["query_ids"][:, :top_k])
    arrays["query_dist"] = np.ascontiguousarray(arrays["query_dist"][:, :top_k])
    inputs_mib = sum(a.nbytes for a in arrays.values()) / 2 ** 20
    rss_before_kib = reset_peak_rss()
    seconds, cpu_seconds = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        out = rerank_candidates(method, arrays["query_ids"], arrays["query_dist"], arrays["graph_ids"],
                                arrays["graph_dist"], max_distance=max_distance)
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - cpu_start)
    peak_kib = peak_rss_kib()
    changed = float((np.argsort(out, axis=1, kind="stable") != np.arange(out.shape[1])).any(axis=1).mean())
    return {"seconds": [round(s, 2) for s in seconds], "ms_per_query_median": round(
        1000 * float(np.median(seconds)) / len(out), 2), "cpu_ms_per_query_median": round(
        1000 * float(np.median(cpu_seconds)) / len(out), 2), "inputs_mib": round(inputs_mib, 1),
        "rss_with_inputs_mib": round(rss_before_kib / 1024, 1), "peak_rss_mib": round(peak_kib / 1024, 1),
        "peak_growth_mib": round((peak_kib - rss_before_kib) / 1024, 1),
        "torch_threads_while_reranking": RERANK_THREADS,
        "share_of_queries_reordered": round(changed, 3), "all_finite": bool(np.isfinite(out).all())}


def con_reid_accuracy(top_ks, knn: int) -> dict:
    """Scalable vs exact mode on the Con-ReID split, shipped defaults, both weights: mAP of exact
    mode (for k-reciprocal also run one query at a time, without query-query links), of the
    scalable mode from each query's top K and a ``knn``-wide graph (brute force, as
    Faiss flat gives), and of exact mode's own distances kept to the same candidates (what any
    top-K re-ranking can reach: gallery items beyond K keep their plain order). ms per query is
    CPU time (steadier than wall time on a shared machine), one torch thread."""
    from benchmarks.rerank import load_splits
    from reidx.indexers.metrics import evaluate_ranking
    from reidx.indexers.distances import unit_euclidean
    from reidx.indexers.rerank import rerank
    from reidx.indexers.rerank_lists import estimate_max_distance, nearest_lists
    from reidx.indexers.rerank_sparse import rerank_candidates

    result = {}
    for weights, split in load_splits().items():
        q, g = split["query"], split["gallery"]
        labels = (split["q_pids"], split["q_cams"], split["g_pids"], split["g_cams"])
        q_g, q_q, g_g = unit_euclidean(q, g), unit_euclidean(q, q), unit_euclidean(g, g)
        graph_ids, graph_dist = nearest_lists(g, g, knn)
        max_distance = estimate_max_distance(q, g)

        def percent_map(candidates, values):
            ranked = 10.0 + q_g  # beyond the candidates: plain order
            np.put_along_axis(ranked, candidates, values, 1)
            return round(100 * evaluate_ranking(ranked, *labels).mAP, 2)

        for method in ("k-reciprocal", "sim-graph", "sim"):
            exact = rerank(method, q_g, q_q, g_g)
            row = {"exact_mAP": round(100 * evaluate_ranking(exact, *labels).mAP, 2), "by_top_k": {}}
            if method == "k-reciprocal":  # exact mode without query-query links, as the scalable mode works
                alone = np.concatenate([rerank(method, q_g[i:i + 1], q_q[i:i + 1, i:i + 1], g_g)
                                        for i in range(len(q))])
                row["exact_one_query_at_a_time_mAP"] = round(100 * evaluate_ranking(alone, *labels).mAP, 2)
            for top_k in top_ks:
                ids, dist = nearest_lists(q, g, top_k)
                start = time.process_time()
                scalable = rerank_candidates(method, ids, dist, graph_ids, graph_dist, max_distance=max_distance)
                cpu = time.process_time() - start
                row["by_top_k"][top_k] = {
                    "scalable_mAP": percent_map(ids, scalable),
                    "exact_on_candidates_mAP": percent_map(ids, np.take_along_axis(exact, ids, 1)),
                    "cpu_ms_per_query": round(1000 * cpu / len(q), 2)}
                row["by_top_k"][top_k]["scalable_minus_exact"] = round(
                    row["by_top_k"][top_k]["scalable_mAP"] - row["exact_mAP"], 2)
                # rerank_candidates' own default row normaliser (√2) instead of the estimate
                row["by_top_k"][top_k]["scalable_mAP_max_distance_sqrt2"] = percent_map(
                    ids, rerank_candidates(method, ids, dist, graph_ids, graph_dist))
            result[f"{weights}/{method}"] = row
    return {"benchmark": "rerank_scalable_con_reid", "knn": knn,
            "max_distance": "estimate_max_distance (and √2, rerank_candidates' default)", "results": result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gallery", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--top-k", type=lambda v: [int(k) for k in v.split(",")], default=[100, 400],
                        help="candidates per query, comma-separated: each is a run")
    parser.add_argument("--knn", type=int, default=30)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check-rows", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--methods", default="k-reciprocal,sim,sim-graph")
    parser.add_argument("--con-reid", action="store_true",
                        help="instead: scalable vs exact mAP on the Con-ReID split for each --con-reid-top-k")
    parser.add_argument("--con-reid-top-k", default="100,200,300,400,500")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--build", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.con_reid:
        print(json.dumps(con_reid_accuracy([int(k) for k in args.con_reid_top_k.split(",")], args.knn), indent=1))
        return
    if args.build:
        print(json.dumps(build(args, Path(args.build))))
        return
    if args.worker:
        method, top_k, folder, max_distance, repeats = args.worker
        print(json.dumps(rerank_worker(method, int(top_k), Path(folder), float(max_distance), int(repeats))))
        return
    result = {"benchmark": "rerank_scalable", "gallery": args.gallery, "queries": args.queries, "top_k": args.top_k,
              "knn": args.knn, "dim": args.dim, "cpu_count": os.cpu_count(),
              "load_average_1min": {"start": round(os.getloadavg()[0], 2)}}
    with tempfile.TemporaryDirectory() as folder:
        # The build in its own process too: its 4 GB (vectors and the flat index) are gone before re-ranking.
        options = [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in
                   ("gallery", "queries", "knn", "dim", "seed", "check_rows")] + [f"--top-k={max(args.top_k)}"]
        done = subprocess.run([sys.executable, __file__, "--build", folder, *options], capture_output=True,
                              text=True, check=True)
        result["build"] = json.loads(done.stdout)
        result["runs"] = {}
        for top_k in args.top_k:
            for method in args.methods.split(","):
                done = subprocess.run([sys.executable, __file__, "--worker", method, str(top_k), folder,
                                       str(result["build"]["max_distance_estimate"]), str(args.repeats)],
                                      capture_output=True, text=True, check=True)
                result["runs"][f"{method}/top_k={top_k}"] = json.loads(done.stdout)
    result["load_average_1min"]["end"] = round(os.getloadavg()[0], 2)
    result["machine_memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
