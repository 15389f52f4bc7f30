"""Adaptive re-ranking (issue 15): does the default stay at or above plain ranking on every gallery?

    python benchmarks/rerank_adaptive.py [--markdown FILE]   # evidence: every gallery kind, both weights
    python benchmarks/rerank_adaptive.py --select            # choose the rule's constants (tuning set only)

Prints one JSON object (plain mAP, and for each setting the mean gain and the worst draw's gain).
Features are embedded once with the torch OSNet and cached as .npz in the temp folder.

Evidence galleries (never used to choose anything in this benchmark):

- ``con-reid``: the Con-ReID evaluation split (212 queries, 5,295 gallery images, ~88 per person):
  dense, and 10 seeded draws each of ≤2 and ≤1 images per identity and camera;
- ``cuhk03``: cuhk03-train, query camera 1 against gallery camera 2 (≈5 per person), full and
  10 draws each of ≤2 and ≤1 gallery images per identity;
- ``cuhk03-hard``: the shape of the outside set where every fixed setting lost (two images per
  person on each side, many identities): ≤2 query and ≤2 gallery images per identity (10 draws),
  and ≤1 query / ≤2 gallery (10 draws);
- ``mixed``: half the identities keep many images, half one (2 draws each split): reported, not
  an acceptance gallery.

Settings: plain; per method (k-reciprocal, sim-graph, sim) the ``adaptive`` preset (the default),
``safe`` (its values at full strength) and ``published``, all in exact mode (``reidx evaluate``);
and the adaptive default in scalable mode as ``reidx query`` runs it (each query's 400 nearest
candidates, a 30-wide gallery graph, brute force as Faiss flat gives them), on the full galleries
and the first three draws of each kind (``SCALABLE_SEEDS``; the summary says how many).

``--select``: the constants of ``indexers.rerank_adaptive`` (RESIDUAL, OFF/ON, WIDE_NEAREST,
QUERY_NEIGHBOURS) are chosen on the Con-ReID *training* identities only (71 identities, disjoint
from every evidence gallery; one query per identity and camera, the rest as gallery; dense,
≤2 / ≤1 per identity and camera, 2 and 5 per identity, each also with Gaussian noise added to the
features to mimic weak weights): the grid point with the largest worst-case gain over plain
over all tuning galleries, methods and both weights (ties: larger mean gain); every point is
scored on k-reciprocal and sim-graph, the ``FINALISTS`` best also on full SIM.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("REIDX_MODEL_DIR", str(REPO.parent / "shared" / "models"))
DATA = REPO.parent / "shared" / "data"
SETS = {"con-reid": ("con-reid/query", "con-reid/bounding_box_test"),
        "cuhk03": ("cuhk03-train/query", "cuhk03-train/gallery"),
        "con-reid-train": (None, "con-reid/bounding_box_train")}
WEIGHTS = ("osnet_x0_25_msmt17", "osnet_x0_25_market1501")
METHODS = ("k-reciprocal", "sim-graph", "sim")
EVIDENCE_SEEDS = range(200, 210)
SCALABLE_SEEDS = (200, 201, 202, 300)  # scalable mode on these draws only (its per-query runs are the slow part)
TUNING_SEEDS = range(0, 2)
NOISE = 1.4  # tuning copies: features + N(0, NOISE²/D) per dimension, renormalised


def embedded(name: str, weights: str) -> dict:
    """Features and labels (cameras as strings) of one data set, cached in the temp folder."""
    cache = Path(tempfile.gettempdir()) / f"reidx_rerank_bench_{name}_{weights}.npz"
    if not cache.exists():
        from reidx.pipeline.embed import TorchEmbedder
        from reidx.pipeline.labelled_split import embed_side

        embedder = TorchEmbedder(weights)
        arrays = {}
        for side, folder in zip(("q", "g"), SETS[name]):
            if folder is None:
                continue
            part = embed_side([str(DATA / folder)], embedder)
            keep = part.table["person_id"].to_numpy() != -1
            arrays.update({"query" if side == "q" else "gallery": part.features[keep],
                           f"{side}_pids": part.table["person_id"].to_numpy()[keep],
                           f"{side}_cams": np.asarray(part.table["camera"].to_pylist())[keep]})
        np.savez(cache, **arrays)
    return dict(np.load(cache))


def keep_per_group(pids, cams, n: int, rng, by_camera: bool) -> np.ndarray:
    """Sorted indices keeping at most n random items of each identity (and camera)."""
    keys = list(zip(pids.tolist(), cams.tolist())) if by_camera else [(p,) for p in pids.tolist()]
    groups: dict = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    kept = [i for key in sorted(groups) for i in rng.choice(groups[key], min(n, len(groups[key])), replace=False)]
    return np.sort(np.asarray(kept))


def subset(split: dict, gallery=None, query=None) -> dict:
    out = dict(split)
    if gallery is not None:
        out.update(gallery=split["gallery"][gallery], g_pids=split["g_pids"][gallery], g_cams=split["g_cams"][gallery])
    if query is not None:
        out.update(query=split["query"][query], q_pids=split["q_pids"][query], q_cams=split["q_cams"][query])
    return out


def draws(split: dict, kinds, seeds, by_camera: bool):
    """(kind, seed, split) for 'full' and each (query ≤ nq or all, gallery ≤ ng) kind."""
    for kind in kinds:
        if kind == "full":
            yield kind, None, split
            continue
        nq, ng = kind
        for seed in seeds:
            rng = np.random.default_rng(seed)
            query = keep_per_group(split["q_pids"], split["q_cams"], nq, rng, False) if nq else None
            gallery = keep_per_group(split["g_pids"], split["g_cams"], ng, rng, by_camera)
            yield kind, seed, subset(split, gallery, query)


def mixed(split: dict, rich: int, seeds, by_camera: bool):
    """Half the identities keep ≤ rich images (per camera when by_camera), the other half one."""
    for seed in seeds:
        rng = np.random.default_rng(seed)
        ids = rng.permutation(np.unique(split["g_pids"]))
        is_rich = np.isin(split["g_pids"], ids[: len(ids) // 2])
        many = keep_per_group(split["g_pids"], split["g_cams"], rich, rng, by_camera)
        one = keep_per_group(split["g_pids"], split["g_cams"], 1, rng, False)
        yield ("mixed", rich), seed, subset(split, np.union1d(many[is_rich[many]], one[~is_rich[one]]))


def evidence_galleries(weights: str):
    con, cuhk = embedded("con-reid", weights), embedded("cuhk03", weights)
    for kind, seed, split in draws(con, ["full", (0, 2), (0, 1)], EVIDENCE_SEEDS, True):
        yield "con-reid", kind, seed, split
    for kind, seed, split in draws(cuhk, ["full", (0, 2), (0, 1)], EVIDENCE_SEEDS, False):
        yield "cuhk03", kind, seed, split
    for kind, seed, split in draws(cuhk, [(2, 2), (1, 2)], EVIDENCE_SEEDS, False):
        yield "cuhk03-hard", kind, seed, split
    for kind, seed, split in itertools.chain(mixed(con, 2, range(300, 302), True), mixed(cuhk, 5, range(300, 302), False)):
        yield "mixed", kind, seed, split


def tuning_galleries(weights: str):
    """Con-ReID training identities: one query per identity and camera, the rest gallery; draws, noisy copies."""
    pool = embedded("con-reid-train", weights)
    query = keep_per_group(pool["g_pids"], pool["g_cams"], 1, np.random.default_rng(7), True)
    rest = np.setdiff1d(np.arange(len(pool["g_pids"])), query)
    split = {"query": pool["gallery"][query], "q_pids": pool["g_pids"][query], "q_cams": pool["g_cams"][query],
             "gallery": pool["gallery"][rest], "g_pids": pool["g_pids"][rest], "g_cams": pool["g_cams"][rest]}
    found = []
    for label, features, seeds in (("clean", split, TUNING_SEEDS), ("noisy", noisy_copy(split), TUNING_SEEDS[:1])):
        found += [((label, kind if isinstance(kind, str) else f"{kind[1]}/id-cam"), seed, s)
                  for kind, seed, s in draws(features, ["full", (0, 2), (0, 1)], seeds, True)]
        found += [((label, f"{n}/id"), seed, s) for n in (2, 5)
                  for _, seed, s in draws(features, [(0, n)], seeds, False)]
    return [("con-reid-train", kind, seed, s) for kind, seed, s in found]


def noisy_copy(split: dict) -> dict:
    """The split with noise added to every feature: weak weights' plain mAP (35-42 here, cuhk03 26-34)."""
    return dict(split, query=_noisy(split["query"], 1), gallery=_noisy(split["gallery"], 2))


def _noisy(features: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noisy = features + NOISE * rng.standard_normal(features.shape).astype(np.float32) / np.sqrt(features.shape[1])
    return (noisy / np.linalg.norm(noisy, axis=1, keepdims=True)).astype(np.float32)


def labels(split):
    return split["q_pids"], split["q_cams"], split["g_pids"], split["g_cams"]


def score(split: dict, settings: dict, scalable: bool = True) -> dict:
    """mAP (percent) of plain ranking and of each setting name → (method, params), exact mode;
    plus '<method> adaptive scalable' for the default as `reidx query` runs it."""
    from reidx.indexers.distances import cosine_distances, unit_euclidean
    from reidx.indexers.metrics import evaluate_ranking
    from reidx.indexers.rerank import rerank
    from reidx.indexers.rerank_lists import rerank_features_scalable

    q, g = split["query"], split["gallery"]
    q_g, q_q, g_g = unit_euclidean(q, g), unit_euclidean(q, q), unit_euclidean(g, g)
    out = {"plain": 100 * evaluate_ranking(cosine_distances(q, g), *labels(split)).mAP}
    for name, (method, params) in settings.items():
        out[name] = 100 * evaluate_ranking(rerank(method, q_g, q_q, g_g, params), *labels(split)).mAP
    if scalable:
        for method in METHODS:
            ranked = rerank_features_scalable(method, q, g, top_k=400, knn=30)
            out[f"{method} adaptive scalable"] = 100 * evaluate_ranking(ranked, *labels(split)).mAP
    return out


def preset_settings() -> dict:
    from reidx.indexers.rerank import default_params

    return {f"{method} {preset}": (method, default_params(method, preset))
            for method in METHODS for preset in ("adaptive", "safe", "published")}


def summarise(rows: list[dict]) -> dict:
    """Per (set, kind): gallery size, draws, mean plain mAP, mean and worst gain of each setting."""
    table: dict = {}
    for row in rows:
        table.setdefault(f"{row['weights']}/{row['set']}/{row['kind']}", []).append(row)
    out = {}
    for key, group in table.items():
        plain = np.array([r["mAP"]["plain"] for r in group])
        gains = {n: np.array([r["mAP"][n] - r["mAP"]["plain"] for r in group if n in r["mAP"]])
                 for n in group[0]["mAP"] if n != "plain"}
        out[key] = {"gallery": int(np.mean([r["gallery"] for r in group])), "queries": group[0]["queries"],
                    "draws": len(group), "plain_mAP": round(float(plain.mean()), 2),
                    "scalable_draws": sum("k-reciprocal adaptive scalable" in r["mAP"] for r in group),
                    "mean_gain": {n: round(float(v.mean()), 2) for n, v in gains.items()},
                    "worst_gain": {n: round(float(v.min()), 2) for n, v in gains.items()}}
    return out


def evidence() -> dict:
    import torch

    torch.set_num_threads(1)
    settings, rows = preset_settings(), []
    for weights in WEIGHTS:
        for name, kind, seed, split in evidence_galleries(weights):
            scalable = seed is None or seed in SCALABLE_SEEDS
            rows.append({"weights": weights.removeprefix("osnet_x0_25_"), "set": name,
                         "kind": kind if isinstance(kind, str) else "q{}g{}".format(*kind), "seed": seed,
                         "gallery": len(split["g_pids"]), "queries": len(split["q_pids"]),
                         "mAP": score(split, settings, scalable)})
            print(json.dumps({k: rows[-1][k] for k in ("weights", "set", "kind", "seed")}), file=sys.stderr, flush=True)
    summary = summarise(rows)
    acceptance = {}
    for name in (n for n in next(iter(summary.values()))["worst_gain"] if "adaptive" in n):
        worst = min(v["worst_gain"][name] for k, v in summary.items() if "/mixed/" not in k)
        dense = [v["mean_gain"][name] for k, v in summary.items() if k.endswith("/con-reid/full")]
        acceptance[name] = {"worst_gain_every_draw": worst, "dense_con_reid_mean_gain": round(float(np.mean(dense)), 2)}
    return {"summary": summary, "acceptance_adaptive": acceptance, "draws": rows}


@contextmanager
def constants(**values):
    """Temporarily set rerank_adaptive's module constants (the selection grid)."""
    from reidx.indexers import rerank_adaptive

    before = {name: getattr(rerank_adaptive, name) for name in values}
    for name, value in values.items():
        setattr(rerank_adaptive, name, value)
    try:
        yield
    finally:
        for name, value in before.items():
            setattr(rerank_adaptive, name, value)


GRID = [dict(RESIDUAL=r, OFF=off, ON=on, WIDE_NEAREST=w, QUERY_NEIGHBOURS=t)
        for r in (0.04, 0.06, 0.08) for off, on in ((1.0, 2.0), (1.0, 3.0), (2.0, 4.0))
        for w in (0.5, 0.6, 0.7) for t in (5, 10)]


FINALISTS = 6


class _TuningGallery:
    """One tuning gallery's distances and the method outputs that do not depend on the strength:
    k-reciprocal and sim-graph are linear in each query's strength (so one run per k1 serves
    every grid point); full SIM is cached per distinct strength vector."""

    def __init__(self, split: dict):
        from reidx.indexers.distances import cosine_distances, unit_euclidean
        from reidx.indexers.metrics import evaluate_ranking

        self.split, self.evaluate = split, evaluate_ranking
        q, g = split["query"], split["gallery"]
        self.q_g, self.q_q, self.g_g = unit_euclidean(q, g), unit_euclidean(q, q), unit_euclidean(g, g)
        self.plain = self.mAP(cosine_distances(q, g))
        self.cache: dict = {}
        # what exact_strengths reads, sorted once: each gallery item's 29 nearest others, and each
        # query's 20 nearest gallery items (ties by index)
        others = self.g_g.copy()
        np.fill_diagonal(others, np.inf)
        self.gallery_nearest = np.sort(others, axis=1)[:, :29]
        self.query_nearest = np.argsort(self.q_g, axis=1, kind="stable")[:, :20]

    def strengths(self) -> tuple[dict, np.ndarray]:
        """exact_strengths with the module's current constants, from the sorted rows."""
        from reidx.indexers import rerank_adaptive

        counts = rerank_adaptive.neighbour_counts(self.gallery_nearest)
        profile = rerank_adaptive.profile_of_counts(counts)
        nearest = self.query_nearest[:, :rerank_adaptive.QUERY_NEIGHBOURS]
        return profile, rerank_adaptive.query_strengths(profile, counts[nearest])

    def mAP(self, distances) -> float:
        return 100 * self.evaluate(distances, *labels(self.split)).mAP

    def gain(self, method: str, params, strength: np.ndarray, k1: int) -> float:
        result_key = (method, k1, strength.tobytes())
        if result_key not in self.cache:
            self.cache[result_key] = self._gain(method, params, strength[:, None].astype(np.float64), strength, k1)
        return self.cache[result_key]

    def _gain(self, method, params, s, strength, k1) -> float:
        from reidx.indexers.rerank import GRAPH_TIE, k_reciprocal_rerank, sim_graph_distance, sim_rerank

        if method == "k-reciprocal":
            key = ("kr", k1)
            if key not in self.cache:  # λ = 0 and λ = 1: the Jaccard and the original parts
                self.cache[key] = [k_reciprocal_rerank(self.q_g, self.q_q, self.g_g, k1, params.k2, lam)
                                   for lam in (0.0, 1.0)]
            jaccard, original = self.cache[key]
            lam = 1 - s * (1 - params.lambda_value)
            return self.mAP((1 - lam) * jaccard + lam * original) - self.plain
        if method == "sim-graph":
            key = ("sg",)
            if key not in self.cache:
                self.cache[key] = sim_graph_distance(self.q_g, self.g_g, params.graph_lambda, params.k_graph,
                                                     params.k_mean, reciprocal=params.reciprocal_graph)
            # sim_graph_distance(strength=None) is d_S + GRAPH_TIE·d; the product's blend is
            # s·d_S + (1 − s)·d + GRAPH_TIE·d
            return self.mAP(s * self.cache[key] + (1 - s) * self.q_g * (1 + GRAPH_TIE)) - self.plain
        return self.mAP(sim_rerank(self.q_g, self.g_g, params.graph_lambda, params.k_graph, params.k_mean,
                                   params.k0, params.k1, params.lambda_value, strength,
                                   params.reciprocal_graph)) - self.plain


def select() -> dict:
    """The grid point with the largest worst-case gain over plain on the tuning galleries: every
    point on k-reciprocal and sim-graph (linear in the strength, so cheap), then the
    ``FINALISTS`` best of those also on full SIM (a run per distinct strength vector), ranked on
    all three."""
    import torch

    from reidx.indexers import rerank_adaptive
    from reidx.indexers.rerank import default_params

    torch.set_num_threads(1)
    galleries = [(w, kind, seed, _TuningGallery(s)) for w in WEIGHTS for _, kind, seed, s in tuning_galleries(w)]

    def gains_at(point: dict, methods) -> list[float]:
        values = []
        with constants(**point):
            for weights, kind, seed, gallery in galleries:
                profile, strength = gallery.strengths()
                for method in methods:
                    params = default_params(method)
                    k1 = rerank_adaptive.adaptive_k1(profile, params.k1, params.dense_k1)
                    values.append(gallery.gain(method, params, strength, k1))
        return values

    def rank(gains: dict) -> list[int]:
        return sorted(gains, key=lambda i: (round(min(gains[i]), 2), float(np.mean(gains[i]))), reverse=True)

    first = {}
    for index, point in enumerate(GRID):
        first[index] = gains_at(point, ("k-reciprocal", "sim-graph"))
        print(json.dumps({"point": point, "worst": round(min(first[index]), 2),
                          "mean": round(float(np.mean(first[index])), 3)}), file=sys.stderr, flush=True)
    finalists = rank(first)[:FINALISTS]
    gains = {i: first[i] + gains_at(GRID[i], ("sim",)) for i in finalists}
    ranked = rank(gains)
    shipped = {name: getattr(rerank_adaptive, name) for name in GRID[0]}
    shipped_index = next((i for i, p in enumerate(GRID) if p == shipped), None)
    return {"tuning_galleries": [f"{w.removeprefix('osnet_x0_25_')}/{k}/{s}: gallery {len(g.split['g_pids'])}, "
                                 f"queries {len(g.split['q_pids'])}, plain {g.plain:.2f}" for w, k, s, g in galleries],
            "grid_points": len(GRID), "criterion": "largest worst-case gain over plain (ties: larger mean) over "
                                                   "every tuning gallery, method and weights; full SIM on the "
                                                   f"{FINALISTS} best points of k-reciprocal and sim-graph",
            "top_k_reciprocal_sim_graph": [{"point": GRID[i], "worst_gain": round(min(first[i]), 2),
                                            "mean_gain": round(float(np.mean(first[i])), 3)} for i in rank(first)[:8]],
            "top": [{"point": GRID[i], "worst_gain": round(min(gains[i]), 2),
                     "mean_gain": round(float(np.mean(gains[i])), 3)} for i in ranked],
            "chosen": GRID[ranked[0]], "shipped": shipped, "shipped_is_chosen": GRID[ranked[0]] == shipped,
            "shipped_rank_k_reciprocal_sim_graph": rank(first).index(shipped_index) + 1
            if shipped_index is not None else None}


def markdown(summary: dict) -> str:
    names = [n for n in next(iter(summary.values()))["mean_gain"]]
    lines = ["| gallery | images | draws | plain | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 4)]
    for key, row in summary.items():
        cells = [f"{row['mean_gain'][n]:+.2f} ({row['worst_gain'][n]:+.2f})" for n in names]
        lines.append(f"| {key} | {row['gallery']} | {row['draws']} | {row['plain_mAP']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--select", action="store_true", help="choose the constants on the tuning set instead")
    parser.add_argument("--markdown", type=Path, help="also write the evidence summary as a Markdown table")
    args = parser.parse_args()
    start = time.perf_counter()
    result = {"benchmark": "rerank_adaptive"}
    if args.select:
        result["selection"] = select()
    else:
        result.update(evidence())
        if args.markdown:
            args.markdown.write_text(markdown(result["summary"]) + "\n")
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
