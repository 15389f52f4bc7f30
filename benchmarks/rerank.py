"""Re-ranking speed: reidx's exact mode vs a dense-NumPy formulation vs the naive reference, same run.

    python benchmarks/rerank.py [--repeats 5] [--dense-repeats 2] [--weights osnet_x0_25_msmt17]
    python benchmarks/rerank.py --sparse-galleries [--seeds 5]   # issue 6 item 4: mAP table, not timing

Input: the Con-ReID evaluation split (212 queries + 5,295 gallery = 5,507 items), embedded
once with the torch OSNet (cached as a .npz in the temp folder), Euclidean distances between
the unit features. Timed from the three distance matrices to the (Q, G) re-ranked distances,
for k-reciprocal (k1 20, k2 6, λ 0.3) and full SIM (published parameters).

- ``reidx_exact``: ``indexers.rerank`` (torch; no N×N matrix is built), with torch's default
  threads (one per core); ``_1thread`` with one thread; ``_omp_passive`` with the default threads
  and OMP_WAIT_POLICY=PASSIVE. With the other core busy, torch's spinning OpenMP threads can
  cost a scheduler tick at every parallel op (seconds in all); the two variants show the cures.
- ``dense_numpy``: the published formulation: dense N×N matrices in NumPy, full argsorts,
  per-item Python loops, a dense V and an inverted-index Jaccard loop (the style of the
  released codes, which cost 8.8 s and 8.6 s on this machine kind; written here from the steps).
  Its sorts are stable (ties by index, reidx's rule): the released codes' quicksort breaks
  exact ties arbitrarily, and this split has exact ties (duplicate-looking crops).
- ``naive``: ``indexers.rerank_naive``, loop by loop; far too slow at full size (cubic), so it
  is timed, with reidx_exact beside it, on a subset named in the JSON.

Each implementation runs in its own subprocess, so its peak memory (the peak RSS during its
runs above the RSS with the inputs loaded) is its own. Rankings are compared per query
(stable argsort of each row). This machine kind has 2 cores, often shared with other work:
medians of repeats, and the load average at start and end, are reported. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("REIDX_MODEL_DIR", str(REPO.parent / "shared" / "models"))
CON_REID = REPO.parent / "shared" / "data" / "con-reid"

METHODS = ("k-reciprocal", "sim")


# ---------------------------------------------------------------- the dense-NumPy formulation


def _normalised_transpose(joint: np.ndarray) -> np.ndarray:
    original = np.square(joint).astype(np.float32)
    return (original / original.max(axis=0)).T


def _reciprocal(ranks: np.ndarray, item: int, k: int) -> np.ndarray:
    forward = ranks[item, : k + 1]
    return forward[np.any(ranks[forward, : k + 1] == item, axis=1)]


def _expanded(ranks: np.ndarray, item: int, k1: int) -> np.ndarray:
    reciprocal = _reciprocal(ranks, item, k1)
    parts = [reciprocal]
    for candidate in reciprocal:
        half_set = _reciprocal(ranks, candidate, int(round(k1 / 2)))
        if len(np.intersect1d(half_set, reciprocal)) > 2.0 / 3.0 * len(half_set):
            parts.append(half_set)
    return np.unique(np.concatenate(parts))


def _dense_jaccard(vectors: np.ndarray, num_query: int) -> np.ndarray:
    """Inverted index over the dense V's columns, accumulated one query row at a time."""
    inverted = [np.flatnonzero(vectors[:, col]) for col in range(vectors.shape[1])]
    jaccard = np.zeros((num_query, vectors.shape[0]), np.float32)
    for qi in range(num_query):
        shared = np.zeros(vectors.shape[0], np.float32)
        for col in np.flatnonzero(vectors[qi]):
            rows = inverted[col]
            shared[rows] += np.minimum(vectors[qi, col], vectors[rows, col])
        jaccard[qi] = 1 - shared / (2 - shared)
    return jaccard


def dense_numpy_k_reciprocal(q_g, q_q, g_g, k1=20, k2=6, lambda_value=0.3):
    num_query = q_g.shape[0]
    original = _normalised_transpose(np.block([[q_q, q_g], [q_g.T, g_g]]))
    ranks = np.argsort(original, axis=1, kind="stable")
    vectors = np.zeros_like(original)
    for item in range(original.shape[0]):
        members = _expanded(ranks, item, k1)
        weight = np.exp(-original[item, members])
        vectors[item, members] = weight / weight.sum()
    if k2 != 1:
        vectors = np.stack([vectors[ranks[item, :k2]].mean(axis=0) for item in range(original.shape[0])])
    jaccard = _dense_jaccard(vectors, num_query)
    final = (1 - lambda_value) * jaccard + lambda_value * original[:num_query]
    return final[:, num_query:]


def dense_numpy_sim(q_g, g_g, lam=0.01, k_graph=20, k_mean=9, k0=12, k1=20, lambda_value=0.3):
    num_query, num_gallery = q_g.shape
    scaled = lam * g_g
    neighbours = np.argsort(scaled, axis=1, kind="stable")[:, :k_graph]
    graph = np.empty_like(q_g)
    for gj in range(num_gallery):  # the paper's equation: every column reads the original q_g
        paths = q_g[:, neighbours[gj]] + scaled[gj, neighbours[gj]]
        # The mean in float64, as in reidx and the naive reference: a float32 mean moves d_S by an
        # ulp, enough to swap near-tied neighbours in the query side's top k0 + 1.
        graph[:, gj] = np.sort(paths, axis=1)[:, :k_mean].mean(axis=1, dtype=np.float64)
    original = _normalised_transpose(np.concatenate([graph.T, g_g], axis=1))  # (Q + G, G)
    query_original, gallery_original = original[:num_query], original[num_query:]
    vectors = np.zeros_like(original)
    query_ranks = np.argsort(query_original, axis=1, kind="stable")
    for qi in range(num_query):
        nearest = query_ranks[qi, : k0 + 1]
        weight = np.exp(-query_original[qi, nearest])
        vectors[qi, nearest] = weight / weight.sum()
    gallery_ranks = np.argsort(gallery_original, axis=1, kind="stable")
    for gi in range(num_gallery):
        members = _expanded(gallery_ranks, gi, k1)
        weight = np.exp(-gallery_original[gi, members])
        vectors[num_query + gi, members] = weight / weight.sum()
    jaccard = _dense_jaccard(vectors, num_query)[:, num_query:]
    return (1 - lambda_value) * jaccard + lambda_value * query_original


# ---------------------------------------------------------------- one implementation per subprocess


def run_implementation(implementation: str, method: str, inputs: str, output: str, repeats: int) -> dict:
    data = np.load(inputs)
    q_g, q_q, g_g = data["q_g"], data["q_q"], data["g_g"]
    if implementation.startswith("reidx_exact"):
        import torch

        from indexers.rerank import rerank

        torch.set_num_threads(1 if implementation == "reidx_exact_1thread" else max(1, os.cpu_count() or 1))
        run = (lambda: rerank("k-reciprocal", q_g, q_q, g_g)) if method == "k-reciprocal" else \
            (lambda: rerank("sim", q_g, None, g_g))
    elif implementation == "dense_numpy":
        run = (lambda: dense_numpy_k_reciprocal(q_g, q_q, g_g)) if method == "k-reciprocal" else \
            (lambda: dense_numpy_sim(q_g, g_g))
    elif implementation == "naive":
        from indexers.rerank_naive import naive_k_reciprocal_rerank, naive_sim_rerank

        run = (lambda: naive_k_reciprocal_rerank(q_g, q_q, g_g)) if method == "k-reciprocal" else \
            (lambda: naive_sim_rerank(q_g, g_g))
    else:
        raise ValueError(implementation)
    rss_before_kib = reset_peak_rss()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        seconds.append(time.perf_counter() - start)
    peak_kib = peak_rss_kib()
    np.save(output, np.asarray(result, np.float32))
    return {"seconds": seconds, "peak_rss_growth_mib": round((peak_kib - rss_before_kib) / 1024, 1)}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (Linux clear_refs 5) and return the current RSS in KiB, so
    the later peak is this run's own (loading the inputs may have peaked higher)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kib("VmRSS")
    except OSError:  # not Linux: growth of the lifetime peak, a lower bound
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_rss_kib() -> int:
    try:
        return _status_kib("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def in_subprocess(implementation, method, inputs, folder, repeats) -> tuple[dict, np.ndarray]:
    output = os.path.join(folder, f"{implementation}_{method}.npy")
    command = [sys.executable, __file__, "--worker", implementation, method, inputs, output, str(repeats)]
    env = dict(os.environ)
    if implementation == "reidx_exact_omp_passive":  # read by OpenMP at start-up, hence a fresh process
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout), np.load(output)


# ---------------------------------------------------------------- the comparison


def split_features(weights: str, cache: Path) -> dict:
    if not cache.exists():
        from indexers.evaluation import embed_side
        from pipeline.embed import TorchEmbedder

        embedder = TorchEmbedder(weights)
        query = embed_side([str(CON_REID / "query")], embedder)
        gallery = embed_side([str(CON_REID / "bounding_box_test")], embedder)
        keep = gallery.table["person_id"].to_numpy() != -1
        np.savez(cache, query=query.features, gallery=gallery.features[keep],
                 q_pids=query.table["person_id"].to_numpy(), q_cams=query.table["camera"].to_numpy(),
                 g_pids=gallery.table["person_id"].to_numpy()[keep], g_cams=gallery.table["camera"].to_numpy()[keep])
    return dict(np.load(cache))


def ranking_agreement(fast: np.ndarray, other: np.ndarray, top: int = 10) -> dict:
    order_fast = np.argsort(fast, axis=1, kind="stable")
    order_other = np.argsort(other, axis=1, kind="stable")
    return {
        "queries_with_identical_full_ranking": int((order_fast == order_other).all(axis=1).sum()),
        f"queries_with_identical_top{top}": int((order_fast[:, :top] == order_other[:, :top]).all(axis=1).sum()),
        "num_queries": int(fast.shape[0]),
        "max_abs_distance_difference": float(np.abs(fast.astype(np.float64) - other).max()),
    }


def sparse_gallery(g_pids, g_cams, per_identity_camera: int, rng) -> np.ndarray:
    """Indices of a gallery keeping at most ``per_identity_camera`` random images of each (id, camera)."""
    keep = []
    for pid, cam in sorted(set(zip(g_pids.tolist(), g_cams.tolist()))):
        group = np.flatnonzero((g_pids == pid) & (g_cams == cam))
        keep.extend(rng.choice(group, min(per_identity_camera, len(group)), replace=False))
    return np.sort(np.asarray(keep))


# Neighbourhoods sized for 1-2 true matches per camera; chosen by a small sweep ON THE EVALUATION
# SPLIT itself (k_mean 1/3/9 × k0 2/5/12 × k1 5/10/20 × λ 0.3/0.6/0.9), so not a held-out result.
SIM_SPARSE_CANDIDATE = {"k_mean": 1, "k0": 2, "k1": 5}


def sparse_galleries_table(seeds: int) -> dict:
    """Plain vs k-reciprocal vs SIM mAP on galleries with 1 or 2 images per identity and camera
    (random, ``seeds`` draws) and on the dense gallery, for both weights (issue 6, item 4)."""
    from indexers.metrics import cosine_distances, evaluate_ranking
    from indexers.rerank import RerankParams, rerank_features

    settings = {"none": None, "k-reciprocal": RerankParams(), "sim-graph": RerankParams(), "sim": RerankParams(),
                "sim-graph k_mean=1": RerankParams(k_mean=1),
                "sim k_mean=1 k0=2 k1=5": RerankParams(**SIM_SPARSE_CANDIDATE)}
    table = {}
    for weights in ("osnet_x0_25_msmt17", "osnet_x0_25_market1501"):
        split = split_features(weights, Path(tempfile.gettempdir()) / f"reidx_rerank_bench_{weights}.npz")
        query, gallery = split["query"], split["gallery"]
        for density, draws in (("1_per_id_camera", seeds), ("2_per_id_camera", seeds), ("dense", 1)):
            scores = {name: [] for name in settings}
            for seed in range(draws):
                keep = (np.arange(len(gallery)) if density == "dense" else
                        sparse_gallery(split["g_pids"], split["g_cams"], int(density[0]), np.random.default_rng(seed)))
                labels = (split["q_pids"], split["q_cams"], split["g_pids"][keep], split["g_cams"][keep])
                for name, params in settings.items():
                    method = name.split()[0]
                    distances = (cosine_distances(query, gallery[keep]) if method == "none" else
                                 rerank_features(method, query, gallery[keep], params))
                    scores[name].append(100 * evaluate_ranking(distances, *labels).mAP)
            table[f"{weights}/{density}"] = {
                "gallery_size": int(len(keep)), "draws": draws,
                "mAP_mean": {name: round(float(np.mean(v)), 2) for name, v in scores.items()},
                "delta_vs_plain_worst_draw": {name: round(float(np.min(np.subtract(v, scores["none"]))), 2)
                                              for name, v in scores.items() if name != "none"}}
    return {"benchmark": "rerank_sparse_galleries", "published_parameters": "k-reciprocal k1 20 k2 6 λ 0.3; SIM "
            "λ_graph 0.01, 20 graph neighbours, mean of 9, k0 12, k1 20, λ 0.3", "table": table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="repeats of reidx_exact")
    parser.add_argument("--dense-repeats", type=int, default=2, help="repeats of the dense-NumPy formulation")
    parser.add_argument("--weights", default="osnet_x0_25_msmt17")
    parser.add_argument("--naive-subset", type=int, nargs=2, default=(40, 400), metavar=("QUERIES", "GALLERY"))
    parser.add_argument("--sparse-galleries", action="store_true",
                        help="instead: mAP of plain vs re-ranking on galleries of 1-2 images per identity and camera")
    parser.add_argument("--seeds", type=int, default=5, help="random draws of each sparse gallery")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sparse_galleries:
        print(json.dumps(sparse_galleries_table(args.seeds), indent=1))
        return
    if args.worker:
        implementation, method, inputs, output, repeats = args.worker
        print(json.dumps(run_implementation(implementation, method, inputs, output, int(repeats))))
        return

    from indexers.metrics import evaluate_ranking
    from indexers.rerank import unit_euclidean

    load_start = round(os.getloadavg()[0], 2)
    split = split_features(args.weights, Path(tempfile.gettempdir()) / f"reidx_rerank_bench_{args.weights}.npz")
    query, gallery = split["query"], split["gallery"]
    labels = (split["q_pids"], split["q_cams"], split["g_pids"], split["g_cams"])
    result = {"benchmark": "rerank", "weights": args.weights, "num_query": len(query), "num_gallery": len(gallery),
              "num_items": len(query) + len(gallery), "cpu": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "repeats": {"reidx_exact": args.repeats, "dense_numpy": args.dense_repeats},
              "seconds_median": {}, "seconds_all": {}, "speedup_vs_dense_numpy": {},
              "speedup_vs_reference_cost": {}, "peak_rss_growth_mib": {}, "rankings": {}, "mAP": {}}
    reference_cost = {"k-reciprocal": 8.8, "sim": 8.6}
    with tempfile.TemporaryDirectory() as folder:
        full = os.path.join(folder, "full.npz")
        np.savez(full, q_g=unit_euclidean(query, gallery), q_q=unit_euclidean(query, query),
                 g_g=unit_euclidean(gallery, gallery))
        subset_q, subset_g = args.naive_subset
        subset = os.path.join(folder, "subset.npz")
        np.savez(subset, q_g=unit_euclidean(query[:subset_q], gallery[:subset_g]),
                 q_q=unit_euclidean(query[:subset_q], query[:subset_q]),
                 g_g=unit_euclidean(gallery[:subset_g], gallery[:subset_g]))
        for method in METHODS:
            runs = {}
            for implementation, repeats in (("reidx_exact", args.repeats), ("reidx_exact_1thread", args.repeats),
                                            ("reidx_exact_omp_passive", args.repeats),
                                            ("dense_numpy", args.dense_repeats)):
                runs[implementation] = in_subprocess(implementation, method, full, folder, repeats)
            for implementation, (stats, _) in runs.items():
                key = f"{implementation}/{method}"
                result["seconds_median"][key] = round(statistics.median(stats["seconds"]), 3)
                result["seconds_all"][key] = [round(s, 3) for s in stats["seconds"]]
                result["peak_rss_growth_mib"][key] = stats["peak_rss_growth_mib"]
                result["mAP"][key] = round(100 * evaluate_ranking(runs[implementation][1], *labels).mAP, 2)
            for implementation in ("reidx_exact", "reidx_exact_1thread", "reidx_exact_omp_passive"):
                fast = result["seconds_median"][f"{implementation}/{method}"]
                result["speedup_vs_dense_numpy"][f"{implementation}/{method}"] = round(
                    result["seconds_median"][f"dense_numpy/{method}"] / fast, 1)
                result["speedup_vs_reference_cost"][f"{implementation}/{method}"] = round(
                    reference_cost[method] / fast, 1)
                result["rankings"][f"{implementation}_vs_dense_numpy/{method}"] = ranking_agreement(
                    runs[implementation][1], runs["dense_numpy"][1])

            naive_stats, naive_out = in_subprocess("naive", method, subset, folder, 1)
            fast_stats, fast_out = in_subprocess("reidx_exact", method, subset, folder, args.repeats)
            key = f"naive_subset/{method}"
            result["seconds_median"][key] = round(statistics.median(naive_stats["seconds"]), 3)
            result["seconds_median"][f"reidx_exact_subset/{method}"] = round(
                statistics.median(fast_stats["seconds"]), 4)
            result["seconds_all"][f"reidx_exact_subset/{method}"] = [round(s, 4) for s in fast_stats["seconds"]]
            result["speedup_vs_naive_on_subset"] = result.get("speedup_vs_naive_on_subset", {})
            result["speedup_vs_naive_on_subset"][method] = round(
                statistics.median(naive_stats["seconds"]) / statistics.median(fast_stats["seconds"]), 1)
            result["rankings"][f"reidx_exact_vs_naive_subset/{method}"] = ranking_agreement(fast_out, naive_out)
    result["naive_subset"] = (f"first {subset_q} queries x first {subset_g} gallery items: the naive reference is "
                              "cubic in the item count (minutes to hours at 5,507 items)")
    result["torch_threads"] = {"reidx_exact": os.cpu_count(), "reidx_exact_1thread": 1,
                               "reidx_exact_omp_passive": os.cpu_count()}
    result["load_average_1min"] = {"start": load_start, "end": round(os.getloadavg()[0], 2)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
