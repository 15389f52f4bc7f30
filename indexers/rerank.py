"""Re-ranking of query-gallery distances: k-reciprocal (Zhong et al., CVPR 2017) and SIM (Jia et al., IJCAI 2020).

Pure functions on distance matrices (no model, no I/O), vectorised in torch: CPU, or CUDA when
the inputs are CUDA tensors. Inputs are Euclidean distances between L2-normalised features;
outputs are NumPy (Q, G) float32 distances, smaller is closer.

This is the exact mode: each item's neighbours come from its full rows of the given distance
blocks (read in place; no N×N matrix is built), then the building blocks of
``indexers.rerank_blocks`` work on neighbour lists and sparse rows only; the scalable mode
(``indexers.rerank_sparse``) feeds the same blocks from a Faiss top-K and a gallery kNN graph.

Parameters: with none given a method runs with the ``adaptive`` preset: the shipped defaults
(``SAFE_DEFAULTS``) applied with a strength that each gallery's and each query's own neighbour
structure decides (``indexers.rerank_adaptive``: none where identities have one or two images,
where every fixed setting lost mAP); ``safe`` is those defaults at full strength everywhere, and
``published`` the papers' values (``default_params``, ``params_from_options``).

Tie rule: equal distances are ordered by item index (a stable sort), here and in
``tests/rerank_oracle.py`` (the loop-by-loop reference the tests compare against). SIM's graph
distance adds ``GRAPH_TIE``·d(q, j), so that its many exact ties (mutual neighbours j, j' share
their two shortest paths) are ordered by the plain distance, as the scalable mode's candidate
order orders them, and not by gallery index.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import torch

from reidx.indexers import rerank_adaptive
from reidx.indexers.distances import unit_euclidean
from reidx.indexers.rerank_blocks import (
    NormalisedSquares,
    chunks,
    expanded_reciprocal_sets,
    gaussian_weights,
    jaccard_distance,
    local_query_expansion,
    mean_of_smallest,
    nearest_neighbours,
    reciprocal_mask,
)

METHODS = ("none", "k-reciprocal", "sim", "sim-graph")


@dataclass(frozen=True)
class RerankParams:
    """Field defaults are the published values (``PUBLISHED``); the shipped defaults per method
    are ``SAFE_DEFAULTS``. k1, lambda_value serve both methods; k2 is k-reciprocal's query
    expansion; k0, graph_lambda, k_graph, k_mean are SIM's."""

    k1: int = 20  # k-reciprocal neighbourhood size (SIM: gallery side)
    k2: int = 6  # local query expansion (k-reciprocal only; 1 switches it off)
    lambda_value: float = 0.3  # weight of the original distance in the final mix
    k0: int = 12  # SIM query side: plain k0 + 1 nearest
    graph_lambda: float = 0.01  # SIM graph reasoning: scale of gallery-gallery distances
    k_graph: int = 20  # SIM graph reasoning: gallery neighbours of each item, itself included
    k_mean: int = 9  # SIM graph reasoning: paths averaged
    # SIM graph reasoning through reciprocal neighbours only: t ∈ N(j) leads to j only if j ∈ N(t)
    # too (the paper: any t ∈ N(j)). A one-sided neighbour — a partial crop, a person beside the
    # query, whose nearest items are the query's images while theirs are each other — is not
    # pulled up (docs/reranking.md, person search).
    reciprocal_graph: bool = False
    adaptive: bool = False  # strength per gallery and per query (indexers.rerank_adaptive)
    dense_k1: int | None = None  # adaptive k-reciprocal: k1 where identities outgrow the kNN graph

    def __post_init__(self):
        for name in ("k1", "k2", "k0", "k_graph", "k_mean"):
            if getattr(self, name) < 1:
                raise ValueError(f"re-ranking parameter {name} must be ≥ 1, got {getattr(self, name)}")
        if not 0.0 <= self.lambda_value <= 1.0:
            raise ValueError(f"lambda_value must lie in [0, 1], got {self.lambda_value}")
        if self.graph_lambda < 0:
            raise ValueError(f"graph_lambda must be ≥ 0, got {self.graph_lambda}")
        if self.dense_k1 is not None and self.dense_k1 < 1:
            raise ValueError(f"dense_k1 must be ≥ 1, got {self.dense_k1}")


# torch intra-op threads while re-ranking (None: leave torch's setting). Re-ranking is thousands
# of small ops: a second thread gains little, and where another process keeps a core busy,
# torch's spinning OpenMP threads cost a scheduler tick at each op (k-reciprocal on Con-ReID:
# seconds instead of tenths; benchmarks/rerank.py). The setting is restored after each call.
RERANK_THREADS: int | None = 1


@contextmanager
def rerank_threads():
    """Run a re-ranking call (as a decorator too) with RERANK_THREADS torch threads, restoring
    the caller's setting."""
    before = torch.get_num_threads()
    if RERANK_THREADS is not None:
        torch.set_num_threads(RERANK_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


PRESETS = ("adaptive", "safe", "published")
PUBLISHED = RerankParams()
# What --rerank METHOD uses when no parameter is given (issue 6, item 4). The published values
# assume many true matches per identity in the gallery: with 1-2 images per identity and camera
# they cost up to 22 mAP (SIM). These keep mAP at or above plain ranking on dense and sparse
# galleries; chosen on one half of the identities, confirmed on the other (docs/reranking.md,
# `python benchmarks/rerank.py --select-defaults`).
SAFE_DEFAULTS = {
    "none": PUBLISHED,
    "k-reciprocal": replace(PUBLISHED, k1=15),
    "sim": replace(PUBLISHED, k1=3, k0=2, k_graph=10, k_mean=2, reciprocal_graph=True),
    "sim-graph": replace(PUBLISHED, k_graph=10, k_mean=2, reciprocal_graph=True),
}
# The default (issue 15): no fixed set was safe on every gallery (two images per identity lost
# 1.7-4.5 mAP with each method), so the safe values run with a strength decided per gallery and
# per query from unlabelled neighbour structure; k-reciprocal takes the published k1 where
# identities outgrow the kNN graph (dense galleries). docs/reranking.md has the evidence.
ADAPTIVE = {method: replace(params, adaptive=method != "none",
                            dense_k1=rerank_adaptive.DENSE_K1 if method == "k-reciprocal" else None)
            for method, params in SAFE_DEFAULTS.items()}
# SIM graph distance + GRAPH_TIE·d(q, j): orders exact ties by plain distance, changes no
# reference figure (84.45 / 87.20 mAP published) and no other order beyond 1e-4·|Δd|.
GRAPH_TIE = 1e-4


def default_params(method: str, preset: str = "adaptive") -> RerankParams:
    """The parameters ``method`` runs with when none are given: ``adaptive`` (the shipped default:
    the safe values at a strength each gallery and query decide), ``safe`` (those values at full
    strength) or ``published`` (the papers' values, which assume many true matches per identity)."""
    if method not in SAFE_DEFAULTS:
        raise ValueError(f"unknown re-ranking method {method!r}; choose one of {', '.join(METHODS)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown re-ranking preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return {"adaptive": ADAPTIVE, "safe": SAFE_DEFAULTS}.get(preset, {method: PUBLISHED})[method]


def as_tensor(distances, device: torch.device | None = None) -> torch.Tensor:
    """A float32 tensor on the given device (no copy when it already is one)."""
    tensor = distances if torch.is_tensor(distances) else torch.from_numpy(np.asarray(distances))
    return tensor.to(device=device, dtype=torch.float32)


def check_distances(*tensors: torch.Tensor) -> None:
    """Distances must be finite and ≥ 0 (NaN has no rank; the squaring assumes d ≥ 0): one pass each."""
    for tensor in tensors:
        if tensor.numel():
            low, high = torch.aminmax(tensor)
            if not (torch.isfinite(low) and torch.isfinite(high) and low >= 0):
                raise ValueError("distances must be finite and non-negative")


# ---------------------------------------------------------------- the methods


@rerank_threads()
def k_reciprocal_rerank(q_g, q_q, g_g, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
                        strength=None) -> np.ndarray:
    """Zhong et al.'s k-reciprocal re-ranking: (1 − λ)·Jaccard + λ·original, (Q, G).

    ``strength`` (Q,) in [0, 1] (default 1) scales each query's Jaccard weight: λ_q = 1 − s·(1 − λ);
    0 leaves the plain ranking (original is monotone in the plain distance)."""
    RerankParams(k1=k1, k2=k2, lambda_value=lambda_value)
    device = _device_of(q_g, q_q, g_g)
    q_g, q_q, g_g = (as_tensor(d, device) for d in (q_g, q_q, g_g))
    check_distances(q_g, q_q, g_g)
    num_query = q_g.shape[0]
    # Row i of the published joint matrix after its transpose is column i before it.
    original = NormalisedSquares([[q_q.T, q_g], [q_g.T, g_g.T]])
    neighbours = original.neighbours(max(k1 + 1, k2))
    vectors = gaussian_weights(expanded_reciprocal_sets(neighbours, k1), original.shape[1], original.pairs)
    if k2 != 1:  # the published code skips the expansion for k2 = 1
        vectors = local_query_expansion(vectors, neighbours[:, :k2])
    query_rows, gallery_rows = vectors.split(num_query)
    jaccard = jaccard_distance(query_rows, gallery_rows)
    lam = _query_lambda(lambda_value, strength, num_query, device)
    return ((1 - lam) * jaccard + lam * original.block(0, 1)).cpu().numpy()


@rerank_threads()
def sim_graph_distance(q_g, g_g, lam: float = 0.01, k_graph: int = 20, k_mean: int = 9, strength=None,
                       reciprocal: bool = False) -> np.ndarray:
    """SIM similarity-graph reasoning: d_S(q, j) = mean of the k_mean smallest d(q, t) + lam·d(j, t)
    over j's k_graph nearest gallery items t (j included), all read from the original q-g matrix,
    + GRAPH_TIE·d(q, j) (ties by plain distance). ``strength`` (Q,): s·d_S + (1 − s)·d per query.
    ``reciprocal``: a path through t counts only if j is among t's k_graph nearest too; the
    others count as j's own path d(q, j) (see RerankParams.reciprocal_graph)."""
    device = _device_of(q_g, g_g)
    q_g, g_g = as_tensor(q_g, device), as_tensor(g_g, device)
    check_distances(q_g, g_g)
    return _sim_graph(q_g, g_g, lam, k_graph, k_mean, strength, reciprocal).cpu().numpy()


def _sim_graph(q_g: torch.Tensor, g_g: torch.Tensor, lam: float, k_graph: int, k_mean: int,
               strength=None, reciprocal: bool = False) -> torch.Tensor:
    # Ranked on the scaled values, like the paper (scaling can merge near-equal distances).
    neighbours = nearest_neighbours([g_g], k_graph, key=lambda values, rows: values * lam)  # (G, k)
    hop = g_g.gather(1, neighbours) * lam
    one_sided = ~reciprocal_mask(neighbours, neighbours.shape[1] - 1) if reciprocal else None  # (G, k)
    k_mean = min(k_mean, neighbours.shape[1])
    if q_g.device.type == "cpu":
        q_g_np, neighbours_np, hop_np = q_g.numpy(), neighbours.numpy(), hop.numpy()
        graph = np.empty(q_g_np.shape, np.float32)
        for rows in chunks(q_g_np.shape[0], neighbours_np.size * 4):  # ≈ 4M-element chunks stay in cache
            paths = q_g_np[rows][:, neighbours_np] + hop_np  # (n, G, k): d(q, t) + lam·d(j, t)
            if one_sided is not None:
                paths = np.where(one_sided.numpy(), q_g_np[rows][:, :, None], paths)
            graph[rows] = mean_of_smallest(paths, k_mean)
        graph = torch.from_numpy(graph)
    else:
        graph = torch.empty_like(q_g)
        for rows in chunks(q_g.shape[0], neighbours.numel()):
            paths = q_g[rows][:, neighbours] + hop
            if one_sided is not None:
                paths = torch.where(one_sided, q_g[rows][:, :, None], paths)
            shortest = torch.topk(paths, k_mean, dim=2, largest=False, sorted=False).values
            graph[rows] = (shortest.double().sum(2) / k_mean).float()
    return blend_graph(graph, q_g, strength)


def blend_graph(graph: torch.Tensor, plain: torch.Tensor, strength=None) -> torch.Tensor:
    """s·d_S + (1 − s)·d + GRAPH_TIE·d per query row (s: (Q,) or None for 1), the one rule both
    modes apply to SIM's graph distance."""
    if strength is not None:
        s = torch.as_tensor(strength, dtype=graph.dtype, device=graph.device)[:, None]
        graph = s * graph + (1 - s) * plain
    return graph + GRAPH_TIE * plain


def _query_lambda(lambda_value: float, strength, num_query: int, device) -> torch.Tensor | float:
    """λ_q = 1 − s·(1 − λ) as a (Q, 1) column, or λ itself without strengths."""
    if strength is None:
        return lambda_value
    s = torch.as_tensor(strength, dtype=torch.float32, device=device).reshape(num_query, 1)
    return 1 - s * (1 - lambda_value)


@rerank_threads()
def sim_rerank(q_g, g_g, lam: float = 0.01, k_graph: int = 20, k_mean: int = 9,
               k0: int = 12, k1: int = 20, lambda_value: float = 0.3, strength=None,
               reciprocal: bool = False) -> np.ndarray:
    """Full SIM: graph reasoning, then mutual-nearest-neighbour reasoning on its output.

    Query side: plain k0+1 nearest gallery items; gallery side: expanded k-reciprocal sets on
    the gallery-gallery distances; no query expansion; (1 − λ)·Jaccard + λ·original, where
    original is d_S² with each query row divided by its maximum (the published joint matrix
    holds only gallery columns). ``strength`` (Q,) blends both steps: the graph distance as in
    ``sim_graph_distance``, and λ_q = 1 − s·(1 − λ); 0 gives the plain ranking. ``reciprocal``:
    the graph step through reciprocal neighbours only (``sim_graph_distance``).
    """
    RerankParams(k1=k1, lambda_value=lambda_value, k0=k0, graph_lambda=lam, k_graph=k_graph, k_mean=k_mean)
    device = _device_of(q_g, g_g)
    q_g, g_g = as_tensor(q_g, device), as_tensor(g_g, device)
    check_distances(q_g, g_g)
    num_gallery = q_g.shape[1]
    graph = NormalisedSquares([[_sim_graph(q_g, g_g, lam, k_graph, k_mean, strength, reciprocal).to(device)]])
    query_original = graph.block(0, 0)
    query_sets = nearest_neighbours([query_original], k0 + 1)
    query_vectors = gaussian_weights(query_sets, num_gallery, lambda rows, cols: query_original[rows, cols])
    gallery_original = NormalisedSquares([[g_g.T]])
    gallery_sets = expanded_reciprocal_sets(gallery_original.neighbours(k1 + 1), k1)
    gallery_vectors = gaussian_weights(gallery_sets, num_gallery, gallery_original.pairs)
    jaccard = jaccard_distance(query_vectors, gallery_vectors)
    lam_q = _query_lambda(lambda_value, strength, q_g.shape[0], device)
    return ((1 - lam_q) * jaccard + lam_q * query_original).cpu().numpy()


@rerank_threads()
def rerank(method: str, q_g, q_q=None, g_g=None, params: RerankParams | None = None, **overrides) -> np.ndarray:
    """One entry point: ``method`` in none | k-reciprocal | sim | sim-graph, (Q, G) distances out.

    ``params`` (default: ``default_params(method)``) may be adjusted with keyword overrides.
    """
    params = replace(params or default_params(method), **overrides)
    q_g, q_q, g_g = (d if d is None or torch.is_tensor(d) else np.asarray(d) for d in (q_g, q_q, g_g))
    _check_shapes(q_g, q_q, g_g)
    if method == "none":
        return np.asarray(q_g.cpu() if torch.is_tensor(q_g) else q_g, dtype=np.float32).copy()
    if g_g is None:
        raise ValueError(f"re-ranking with {method} needs the gallery-gallery distances")
    strength = None
    if params.adaptive:
        profile, strength = exact_strengths(q_g, g_g)
        params = replace(params, k1=rerank_adaptive.adaptive_k1(profile, params.k1, params.dense_k1))
    if method == "k-reciprocal":
        if q_q is None:
            raise ValueError("k-reciprocal re-ranking needs the query-query distances")
        return k_reciprocal_rerank(q_g, q_q, g_g, params.k1, params.k2, params.lambda_value, strength)
    if method == "sim":
        return sim_rerank(q_g, g_g, params.graph_lambda, params.k_graph, params.k_mean,
                          params.k0, params.k1, params.lambda_value, strength, params.reciprocal_graph)
    if method == "sim-graph":
        return sim_graph_distance(q_g, g_g, params.graph_lambda, params.k_graph, params.k_mean, strength,
                                  params.reciprocal_graph)
    raise ValueError(f"unknown re-ranking method {method!r}; choose one of {', '.join(METHODS)}")


def exact_strengths(q_g, g_g) -> tuple[dict, np.ndarray]:
    """The gallery's profile and each query's strength (``indexers.rerank_adaptive``) from full
    distance rows: each gallery item's GRAPH_NEIGHBOURS nearest others, as a kNN graph row lists
    them, and each query's QUERY_NEIGHBOURS nearest gallery items (ties by index)."""
    q_g, g_g = as_tensor(q_g), as_tensor(g_g)
    check_distances(q_g, g_g)
    num_gallery, width = g_g.shape[0], rerank_adaptive.GRAPH_NEIGHBOURS
    if num_gallery <= width:  # too small to tell: plain ranking
        counts = np.zeros(num_gallery)
    else:
        nearest = []
        for rows in chunks(num_gallery, num_gallery * 4):
            block = g_g[rows].clone()
            block[torch.arange(block.shape[0]), torch.arange(rows.start, rows.stop)] = torch.inf  # itself
            nearest.append(torch.topk(block, width, dim=1, largest=False).values)
        counts = rerank_adaptive.neighbour_counts(torch.cat(nearest).numpy())
    profile = rerank_adaptive.profile_of_counts(counts)
    candidates = nearest_neighbours([q_g], rerank_adaptive.QUERY_NEIGHBOURS).numpy()
    return profile, rerank_adaptive.query_strengths(profile, counts[candidates])


def rerank_features(method: str, query: np.ndarray, gallery: np.ndarray,
                    params: RerankParams | None = None) -> np.ndarray:
    """Re-ranked (Q, G) distances from unit-length query and gallery features."""
    needs_query_query = method == "k-reciprocal"
    return rerank(method, unit_euclidean(query, gallery),
                  unit_euclidean(query, query) if needs_query_query else None,
                  unit_euclidean(gallery, gallery) if method != "none" else None, params)


# The parameters each method reads; setting another one is a mistake worth reporting.
METHOD_PARAMS = {
    "none": (),
    "k-reciprocal": ("k1", "k2", "lambda_value"),
    "sim": ("k1", "lambda_value", "k0", "graph_lambda", "k_graph", "k_mean"),
    "sim-graph": ("graph_lambda", "k_graph", "k_mean"),
}


def params_from_options(method: str, preset: str | None = None, **options) -> RerankParams:
    """RerankParams for ``method`` from CLI-style options: the ``preset`` (default ``adaptive``) with
    the options that are set (not None) on top; a k1 given keeps that k1 on dense galleries too."""
    base = default_params(method, preset or "adaptive")
    given = {name: value for name, value in options.items() if value is not None}
    unused = sorted(set(given) - set(METHOD_PARAMS[method]))
    if unused:
        names = ", ".join("--" + name.removesuffix("_value").replace("_", "-") for name in unused)
        raise ValueError(f"{names} {'does' if len(unused) == 1 else 'do'} not apply to --rerank {method}")
    if "k1" in given:
        given["dense_k1"] = None
    return replace(base, **given)


def _check_shapes(q_g, q_q, g_g) -> None:
    if len(q_g.shape) != 2 or 0 in q_g.shape:
        raise ValueError(f"query-gallery distances must be a non-empty (Q, G) matrix, got shape {tuple(q_g.shape)}")
    num_query, num_gallery = q_g.shape
    for name, matrix, size in (("query-query", q_q, num_query), ("gallery-gallery", g_g, num_gallery)):
        if matrix is not None and tuple(matrix.shape) != (size, size):
            raise ValueError(f"{name} distances must be {size}×{size}, got shape {tuple(matrix.shape)}")


def _device_of(*arrays) -> torch.device:
    for array in arrays:
        if torch.is_tensor(array):
            return array.device
    return torch.device("cpu")


__all__ = [
    "ADAPTIVE", "GRAPH_TIE", "METHODS", "PRESETS", "PUBLISHED", "RERANK_THREADS", "SAFE_DEFAULTS", "RerankParams",
    "as_tensor", "blend_graph", "check_distances", "exact_strengths", "rerank_threads",
    "default_params", "k_reciprocal_rerank", "params_from_options",
    "rerank", "rerank_features", "sim_graph_distance", "sim_rerank",
]
