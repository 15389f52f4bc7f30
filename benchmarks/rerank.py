"""Re-ranking speed: reidx's exact mode vs a dense-NumPy formulation vs the naive reference, same run.

    python benchmarks/rerank.py [--repeats 5] [--dense-repeats 2] [--weights osnet_x0_25_msmt17]
    python benchmarks/rerank.py --sparse-galleries [--markdown FILE]  # issue 6 item 4: safe-defaults table
    python benchmarks/rerank.py --select-defaults [--markdown FILE]   # the held-out selection, then the table

Input: the Con-ReID evaluation split (212 queries + 5,295 gallery = 5,507 items), embedded
once with the torch OSNet (cached as a .npz in the temp folder), Euclidean distances between
the unit features. Timed from the three distance matrices to the (Q, G) re-ranked distances,
for k-reciprocal (k1 20, k2 6, λ 0.3) and full SIM (published parameters).

- ``reidx_exact``: ``indexers.rerank`` as shipped: torch, no N×N matrix built, one torch thread
  while re-ranking (``RERANK_THREADS``); ``_torch_threads`` with torch's default threads (one per
  core); ``_omp_passive`` with those and OMP_WAIT_POLICY=PASSIVE. With the other core busy,
  torch's spinning OpenMP threads can cost a scheduler tick at every parallel op (seconds in
  all): the variants show what the single thread saves, and what the other cure would.
- ``dense_numpy``: the published formulation: dense N×N matrices in NumPy, full argsorts,
  per-item Python loops, a dense V and an inverted-index Jaccard loop (the style of the
  released codes, which cost 8.8 s and 8.6 s on this machine kind; written here from the steps).
  Its sorts are stable (ties by index, reidx's rule): the released codes' quicksort breaks
  exact ties arbitrarily, and this split has exact ties (duplicate-looking crops).
- ``naive``: ``tests/rerank_oracle.py``, loop by loop; far too slow at full size (cubic), so it
  is timed, with reidx_exact beside it, on a subset named in the JSON.

``--sparse-galleries`` / ``--select-defaults`` measure mAP, not time (issue 6, item 4): plain
ranking against each method with the ``safe`` preset (the shipped defaults until issue 15 made
``adaptive`` the default: benchmarks/rerank_adaptive.py) and the published parameters on the dense
gallery and on seeded sparse ones (1-2 images per identity and camera), and the held-out choice of
those defaults (identity halves, disjoint seeds); docs/reranking.md shows the results.

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

        import reidx.indexers.rerank
        from reidx.indexers.rerank import PUBLISHED, rerank

        if implementation != "reidx_exact":  # torch's default: one thread per core
            reidx.indexers.rerank.RERANK_THREADS = None
            torch.set_num_threads(max(1, os.cpu_count() or 1))
        # The published parameters, as the dense-NumPy formulation and the reference costs use.
        run = (lambda: rerank("k-reciprocal", q_g, q_q, g_g, PUBLISHED)) if method == "k-reciprocal" else \
            (lambda: rerank("sim", q_g, None, g_g, PUBLISHED))
    elif implementation == "dense_numpy":
        run = (lambda: dense_numpy_k_reciprocal(q_g, q_q, g_g)) if method == "k-reciprocal" else \
            (lambda: dense_numpy_sim(q_g, g_g))
    elif implementation == "naive":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test oracle lives with the tests
        from rerank_oracle import naive_k_reciprocal_rerank, naive_sim_rerank

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
        from reidx.pipeline.labelled_split import embed_side
        from reidx.pipeline.embed import TorchEmbedder

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


# ---------------------------------------------------------------- safe defaults (issue 6, item 4)

WEIGHTS = ("osnet_x0_25_msmt17", "osnet_x0_25_market1501")
DENSITIES = ("dense", "2_per_id_camera", "1_per_id_camera")
# Candidates the selection searches; each method's published parameters are among them.
GRIDS = {
    "k-reciprocal": [dict(k1=k1, k2=k2, lambda_value=lam) for k1 in (10, 15, 20) for k2 in (3, 6)
                     for lam in (0.3, 0.6)],
    "sim-graph": [dict(k_mean=km, k_graph=kg) for km in (1, 2, 3, 4, 9) for kg in (10, 15, 20)],
    "sim": [dict(k_mean=km, k_graph=kg, k0=k0, k1=k1, lambda_value=lam) for km in (2, 3, 9) for kg in (10, 20)
            for k0 in (1, 2, 3, 12) for k1 in (3, 5, 20) for lam in (0.3, 0.8, 0.9)],
}
# Disjoint seeds: the draws that choose are never the draws that confirm or that the table shows.
TUNING_SEEDS, CONFIRMATION_SEEDS, TABLE_SEEDS = range(0, 10), range(100, 110), range(200, 210)


def sparse_gallery(g_pids, g_cams, per_identity_camera: int, rng) -> np.ndarray:
    """Indices of a gallery keeping at most ``per_identity_camera`` random images of each (id, camera)."""
    keep = []
    for pid, cam in sorted(set(zip(g_pids.tolist(), g_cams.tolist()))):
        group = np.flatnonzero((g_pids == pid) & (g_cams == cam))
        keep.extend(rng.choice(group, min(per_identity_camera, len(group)), replace=False))
    return np.sort(np.asarray(keep))


def gallery_draws(g_pids, g_cams, seeds) -> list[tuple[str, int | None, np.ndarray]]:
    """(density, seed, gallery indices): the dense gallery, then per seed one gallery of at most
    2 and one of at most 1 random image per (identity, camera)."""
    draws = [("dense", None, np.arange(len(g_pids)))]
    for density in DENSITIES[1:]:
        draws += [(density, seed, sparse_gallery(g_pids, g_cams, int(density[0]), np.random.default_rng(seed)))
                  for seed in seeds]
    return draws


def identity_half(split: dict, half: str, seed: int = 0) -> dict:
    """The split kept to one half ("A" or "B") of a seeded random halving of the identities."""
    identities = np.random.default_rng(seed).permutation(np.unique(split["g_pids"]))
    chosen = identities[: len(identities) // 2] if half == "A" else identities[len(identities) // 2:]
    q, g = np.isin(split["q_pids"], chosen), np.isin(split["g_pids"], chosen)
    return {"query": split["query"][q], "q_pids": split["q_pids"][q], "q_cams": split["q_cams"][q],
            "gallery": split["gallery"][g], "g_pids": split["g_pids"][g], "g_cams": split["g_cams"][g]}


def describe(method: str, params) -> str:
    """The parameters ``method`` reads, e.g. 'k1=20 k2=6 lambda=0.3'."""
    from reidx.indexers.rerank import METHOD_PARAMS

    return " ".join(f"{name.removesuffix('_value')}={getattr(params, name)}" for name in METHOD_PARAMS[method])


def map_scores(split: dict, seeds, settings: dict) -> tuple[list[tuple[str, int | None, int]], dict[str, np.ndarray]]:
    """mAP (percent) of plain ranking and of each setting (name → (method, params)) on every
    gallery draw of ``split``: the draws (density, seed, size), and one array per name (``plain`` included)."""
    from reidx.indexers.distances import cosine_distances
    from reidx.indexers.metrics import evaluate_ranking
    from reidx.indexers.distances import unit_euclidean
    from reidx.indexers.rerank import rerank

    query = split["query"]
    scores = {name: [] for name in ("plain", *settings)}
    draws = gallery_draws(split["g_pids"], split["g_cams"], seeds)
    q_q = unit_euclidean(query, query)
    for _, _, keep in draws:
        gallery = split["gallery"][keep]
        labels = (split["q_pids"], split["q_cams"], split["g_pids"][keep], split["g_cams"][keep])
        q_g, g_g = unit_euclidean(query, gallery), unit_euclidean(gallery, gallery)
        scores["plain"].append(100 * evaluate_ranking(cosine_distances(query, gallery), *labels).mAP)
        for name, (method, params) in settings.items():
            scores[name].append(100 * evaluate_ranking(rerank(method, q_g, q_q, g_g, params), *labels).mAP)
    return ([(density, seed, len(keep)) for density, seed, keep in draws],
            {name: np.asarray(v) for name, v in scores.items()})


def delta_summary(draws, scores: dict, name: str) -> dict:
    """Per density: mean mAP gain over plain ranking and the worst draw's gain."""
    delta = scores[name] - scores["plain"]
    out = {}
    for density in DENSITIES:
        rows = [i for i, draw in enumerate(draws) if draw[0] == density]
        out[density] = {"mean_gain": round(float(delta[rows].mean()), 2),
                        "worst_gain": round(float(delta[rows].min()), 2)}
    return out


def choose(method: str, tuning: list[dict]) -> tuple[str, dict, dict]:
    """The grid point whose worst gain over plain, over every tuning gallery, is largest (ties:
    larger mean gain): (its description, its parameters, the tuning summary of the top five)."""
    from reidx.indexers.rerank import RerankParams

    settings = {describe(method, RerankParams(**p)): (method, RerankParams(**p)) for p in GRIDS[method]}
    gains = {name: [] for name in settings}
    for split in tuning:
        _, scores = map_scores(split, TUNING_SEEDS, settings)
        for name in settings:
            gains[name].extend(scores[name] - scores["plain"])
    ranked = sorted(settings, key=lambda n: (round(min(gains[n]), 2), np.mean(gains[n])), reverse=True)
    top = {n: {"worst_gain": round(float(min(gains[n])), 2), "mean_gain": round(float(np.mean(gains[n])), 2)}
           for n in ranked[:5]}
    published = describe(method, RerankParams())
    top[f"{published} (published)"] = {"worst_gain": round(float(min(gains[published])), 2),
                                       "mean_gain": round(float(np.mean(gains[published])), 2)}
    return ranked[0], settings[ranked[0]][1], top


def load_splits() -> dict:
    return {w: split_features(w, Path(tempfile.gettempdir()) / f"reidx_rerank_bench_{w}.npz") for w in WEIGHTS}


def select_defaults() -> dict:
    """Held-out selection: choose on identity half A (both weights, draws TUNING_SEEDS), confirm
    on the unseen half B (draws CONFIRMATION_SEEDS); the reverse direction is reported as well,
    as a check of how stable the choice is."""
    import torch

    from reidx.indexers.rerank import RerankParams, default_params

    torch.set_num_threads(1)  # reproducible sums, and no spinning threads on a shared machine
    splits = load_splits()
    halves = {h: [identity_half(splits[w], h) for w in WEIGHTS] for h in "AB"}
    result = {"protocol": "identities halved at random (seed 0); choose on half A with both weights over the dense "
                          "gallery and 10 draws each of 2 and 1 images per identity and camera (seeds 0-9): the grid "
                          "point with the largest worst-case mAP gain over plain ranking; confirm on half B with "
                          "fresh draws (seeds 100-109); reverse: choose on B, check on A",
              "tuning_sizes": {h: {w: {"queries": len(s["query"]), "gallery": len(s["gallery"])}
                                   for w, s in zip(WEIGHTS, halves[h])} for h in "AB"},
              "grid_sizes": {m: len(g) for m, g in GRIDS.items()}, "methods": {}}
    for method in GRIDS:
        entry = {}
        for tune, confirm in (("A", "B"), ("B", "A")):
            name, params, top = choose(method, halves[tune])
            published = RerankParams()
            settings = {name: (method, params), f"{describe(method, published)} (published)": (method, published)}
            held_out = {}
            for weights, split in zip(WEIGHTS, halves[confirm]):
                draws, scores = map_scores(split, CONFIRMATION_SEEDS, settings)
                held_out[weights] = {n: delta_summary(draws, scores, n) for n in settings}
            entry[f"choose_on_{tune}"] = {"chosen": name, "tuning_top": top, f"held_out_{confirm}": held_out}
        entry["shipped"] = describe(method, default_params(method, "safe"))  # the safe preset's values
        entry["shipped_is_the_choice_on_A"] = entry["shipped"] == entry["choose_on_A"]["chosen"]
        result["methods"][method] = entry
    return result


def evidence_table(seeds=TABLE_SEEDS) -> dict:
    """The README table: plain vs each method with the shipped defaults and with the published
    parameters, on the full split's dense gallery and on sparse draws, both weights."""
    import torch

    from reidx.indexers.rerank import PUBLISHED, default_params

    torch.set_num_threads(1)
    settings = {}
    for method in ("k-reciprocal", "sim-graph", "sim"):
        settings[f"{method} shipped"] = (method, default_params(method, "safe"))  # the safe preset (issue 6)
        settings[f"{method} published"] = (method, PUBLISHED)
    table = {}
    for weights, split in load_splits().items():
        draws, scores = map_scores(split, seeds, settings)
        for density in DENSITIES:
            rows = [i for i, draw in enumerate(draws) if draw[0] == density]
            table[f"{weights}/{density}"] = {
                "gallery_size": draws[rows[0]][2], "draws": len(rows),
                "mAP_mean": {n: round(float(v[rows].mean()), 2) for n, v in scores.items()},
                "worst_gain_vs_plain": {n: round(float((v - scores["plain"])[rows].min()), 2)
                                        for n, v in scores.items() if n != "plain"}}
    parameters = {name: describe(method, params) for name, (method, params) in settings.items()}
    return {"seeds": f"{seeds.start}-{seeds.stop - 1}", "parameters": parameters, "table": table,
            "markdown": markdown_table(table, parameters)}


def markdown_table(table: dict, parameters: dict) -> str:
    """One row per gallery: mean mAP of each setting, with the worst draw's gain over plain; the
    parameters below."""
    names = list(next(iter(table.values()))["mAP_mean"])
    lines = ["| gallery | images | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
    for key, row in table.items():
        weights, density = key.split("/")
        label = f"{weights.removeprefix('osnet_x0_25_')}, {density.replace('_', ' ')}"
        if row["draws"] > 1:
            label += f" ({row['draws']} draws)"
        cells = [f"{row['mAP_mean']['plain']:.2f}"] + [
            f"{row['mAP_mean'][n]:.2f} ({row['worst_gain_vs_plain'][n]:+.2f})" for n in names[1:]]
        lines.append(f"| {label} | {row['gallery_size']} | " + " | ".join(cells) + " |")
    lines += ["", "mAP in percent, mean over the draws; in brackets the worst draw's gain over plain ranking. "
              "Parameters: " + "; ".join(f"{name}: {value}" for name, value in parameters.items()) + "."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="repeats of reidx_exact")
    parser.add_argument("--dense-repeats", type=int, default=2, help="repeats of the dense-NumPy formulation")
    parser.add_argument("--weights", default="osnet_x0_25_msmt17")
    parser.add_argument("--naive-subset", type=int, nargs=2, default=(40, 400), metavar=("QUERIES", "GALLERY"))
    parser.add_argument("--sparse-galleries", action="store_true",
                        help="instead: the safe-defaults evidence table (mAP of plain vs shipped and published "
                             "re-ranking on the dense gallery and on galleries of 1-2 images per identity and camera)")
    parser.add_argument("--select-defaults", action="store_true",
                        help="instead: the held-out selection of the shipped defaults, then the evidence table")
    parser.add_argument("--markdown", type=Path, help="with --sparse-galleries/--select-defaults: also write the "
                                                      "evidence table as Markdown to this file")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sparse_galleries or args.select_defaults:
        start = time.perf_counter()
        result = {"benchmark": "rerank_safe_defaults"}
        if args.select_defaults:
            result["selection"] = select_defaults()
        result["evidence"] = evidence_table()
        result["seconds"] = round(time.perf_counter() - start, 1)
        if args.markdown:
            args.markdown.write_text(result["evidence"]["markdown"] + "\n")
        print(json.dumps(result, indent=1))
        return
    if args.worker:
        implementation, method, inputs, output, repeats = args.worker
        print(json.dumps(run_implementation(implementation, method, inputs, output, int(repeats))))
        return

    from reidx.indexers.metrics import evaluate_ranking
    from reidx.indexers.distances import unit_euclidean

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
            for implementation, repeats in (("reidx_exact", args.repeats), ("reidx_exact_torch_threads", args.repeats),
                                            ("reidx_exact_omp_passive", args.repeats),
                                            ("dense_numpy", args.dense_repeats)):
                runs[implementation] = in_subprocess(implementation, method, full, folder, repeats)
            for implementation, (stats, _) in runs.items():
                key = f"{implementation}/{method}"
                result["seconds_median"][key] = round(statistics.median(stats["seconds"]), 3)
                result["seconds_all"][key] = [round(s, 3) for s in stats["seconds"]]
                result["peak_rss_growth_mib"][key] = stats["peak_rss_growth_mib"]
                result["mAP"][key] = round(100 * evaluate_ranking(runs[implementation][1], *labels).mAP, 2)
            for implementation in ("reidx_exact", "reidx_exact_torch_threads", "reidx_exact_omp_passive"):
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
    result["torch_threads"] = {"reidx_exact": 1, "reidx_exact_torch_threads": os.cpu_count(),
                               "reidx_exact_omp_passive": os.cpu_count()}
    result["load_average_1min"] = {"start": load_start, "end": round(os.getloadavg()[0], 2)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
