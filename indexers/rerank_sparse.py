"""Scalable re-ranking: k-reciprocal, SIM and SIM graph reasoning from each query's top-K
candidates and the stored gallery kNN graph, for galleries whose N² distances do not fit.

Inputs are NumPy arrays of Euclidean distances between L2-normalised vectors (exact mode's unit):

- ``query_gallery_ids`` (Q, K) int, ``query_gallery_dist`` (Q, K) float32: each query's K
  nearest gallery rows (0..G-1, from Faiss), ascending; id -1 (Faiss' padding) is ignored;
- ``gallery_knn_ids`` (G, k) int, ``gallery_knn_dist`` (G, k) float32: each gallery item's k
  nearest gallery items, itself included (distance 0), as build-index stores them.

The output is the (Q, K) float32 re-ranked distances of the same candidates in the same order
(inf where the id is -1); the caller sorts. Memory is the inputs plus one batch of queries'
neighbourhoods: no Q×G or G×G array is ever built. The building blocks are exact mode's
(``indexers.rerank_blocks``), fed from neighbour lists instead of dense rows.

Each query is re-ranked on its own, against the gallery only: a query's answer should not depend
on which other queries share its batch, and on Con-ReID exact k-reciprocal without the
query-query links is as good (84.60 / 87.12 mAP one query at a time, 84.43 / 87.00 all together;
benchmarks/rerank_scalable.py --con-reid). So, when every query lists the whole gallery (K ≥ G)
and every gallery item does too (k ≥ G), the output row of query i equals, up to float rounding
of sums taken in another order (tested to 1e-5):

- k-reciprocal: exact mode run on that query alone,
  ``rerank("k-reciprocal", q_g[i:i+1], q_q[i:i+1, i:i+1], g_g)[0, ids[i]]``;
- sim, sim-graph: exact mode on all queries at once (these methods never link queries).

With shorter lists four things are approximated, each by reading "not listed" as "farther than
everything listed":

1. a distance no list holds (q to a non-candidate, j to an item beyond j's k) is the row's
   largest listed distance, a lower bound of the true one;
2. q enters a gallery item's neighbour list only where that item is one of q's candidates;
3. the published "original" distance divides each row by its largest distance to anything, which
   lists cannot tell; a row that does not list the whole gallery uses ``max_distance`` (or its
   largest listed distance if larger): a large gallery's farthest distances vary little from row
   to row, and on Con-ReID √2 or ``rerank_lists.estimate_max_distance`` give mAPs within 0.07;
4. SIM's query side (top k0 + 1) and graph paths see only the candidates.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from reidx.indexers import rerank_adaptive
from reidx.indexers.rerank import RerankParams, blend_graph, default_params, rerank_threads
from reidx.indexers.rerank_blocks import (
    CHUNK_ELEMENTS,
    expanded_reciprocal_sets,
    gaussian_weights,
    local_query_expansion,
    mean_of_smallest,
    paired_jaccard_distance,
    sort_rows,
)

SCALABLE_METHODS = ("k-reciprocal", "sim", "sim-graph")
QUERY = -1  # the query's own id in a neighbour list: before every gallery id, as in exact mode's joint order
TINY = torch.finfo(torch.float32).tiny


@rerank_threads()
def rerank_candidates(method: str, query_gallery_ids, query_gallery_dist, gallery_knn_ids, gallery_knn_dist,
                      params: RerankParams | None = None, max_distance: float = 2 ** 0.5,
                      batch_size: int | None = None, profile: dict | None = None) -> np.ndarray:
    """Re-ranked (Q, K) distances of each query's candidates (module doc: contract, exactness).

    ``params`` defaults to ``default_params(method)``, the same as exact mode. ``max_distance``:
    row normaliser for rows that do not list the whole gallery (default √2, the distance of
    orthogonal unit vectors; ``rerank_lists.estimate_max_distance`` measures it). ``batch_size``: queries per
    batch (default: about CHUNK_ELEMENTS list entries per batch). ``profile``: the gallery's
    ``rerank_adaptive.gallery_rerank_profile`` (as stored with the index) for adaptive
    parameters; computed from the graph when not given.
    """
    if method not in SCALABLE_METHODS:
        raise ValueError(f"scalable re-ranking supports {', '.join(SCALABLE_METHODS)}, not {method!r}")
    params = params or default_params(method)
    query_ids, query_dist = _as_lists(query_gallery_ids, query_gallery_dist, "query-gallery")
    graph = _Graph(*_as_lists(gallery_knn_ids, gallery_knn_dist, "gallery kNN"))
    if int(query_ids.max(initial=-1)) >= graph.size:
        raise ValueError(f"query candidate ids must be gallery rows 0..{graph.size - 1}")
    strength = None
    if params.adaptive:
        profile, strength = rerank_adaptive.candidate_strengths(query_ids, query_dist, graph.dist.numpy(), profile)
        params = replace(params, k1=rerank_adaptive.adaptive_k1(profile, params.k1, params.dense_k1))
    graph.check_width(method, params)
    if not max_distance > 0:
        raise ValueError(f"max_distance must be > 0, got {max_distance}")
    width = max(params.k1 + 1, params.k2, params.k_graph)
    if batch_size is None:  # k-reciprocal reads up to three hops from each candidate, the others two
        per_query = query_ids.shape[1] * width * (graph.width + 1) * (3 if method == "k-reciprocal" else 1)
        batch_size = max(1, CHUNK_ELEMENTS // max(1, per_query))
    out = np.empty(query_ids.shape, np.float32)
    for start in range(0, query_ids.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        batch = _Candidates(torch.from_numpy(query_ids[rows]), torch.from_numpy(query_dist[rows]), graph.size)
        batch_strength = None if strength is None else torch.from_numpy(strength[rows])
        if method == "k-reciprocal":
            result = _k_reciprocal(batch, graph, params, max_distance, batch_strength)
        else:
            result = _sim(batch, graph, params, max_distance, method == "sim-graph", batch_strength)
        out[rows] = torch.where(batch.valid, result, torch.inf).numpy()
    return out


# ---------------------------------------------------------------- inputs


def _as_lists(ids, dist, name) -> tuple[np.ndarray, np.ndarray]:
    ids, dist = np.asarray(ids), np.asarray(dist, np.float32)
    if ids.ndim != 2 or ids.shape != dist.shape or 0 in ids.shape:
        raise ValueError(f"{name} ids and distances must be non-empty matrices of one shape, "
                         f"got {ids.shape} and {dist.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} ids must be integers, got {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    listed = dist[ids >= 0]
    if (ids < -1).any() or not np.isfinite(listed).all() or (listed < 0).any():
        raise ValueError(f"{name} lists: ids must be ≥ -1 and listed distances finite and non-negative")
    return np.ascontiguousarray(ids), np.ascontiguousarray(dist)


class _Graph:
    """The gallery kNN graph as tensors (views of the arrays, no copy); -1 ids become ``size``."""

    def __init__(self, ids: np.ndarray, dist: np.ndarray):
        self.size, self.width = ids.shape
        self.ids, self.dist = torch.from_numpy(ids), torch.from_numpy(dist)
        if int(self.ids.max()) >= self.size:
            raise ValueError(f"gallery kNN ids must be gallery rows 0..{self.size - 1}")
        self.covers = bool((ids >= 0).sum(1).min() >= self.size)  # every row lists the whole gallery

    def check_width(self, method: str, params: RerankParams) -> None:
        need = {"k-reciprocal": max(params.k1 + 1, params.k2), "sim": max(params.k1 + 1, params.k_graph),
                "sim-graph": params.k_graph}[method]
        if self.width < min(need, self.size):
            raise ValueError(f"the gallery kNN graph lists {self.width} neighbours per item; --rerank {method} "
                             f"with these parameters reads {need}")

    def lists(self, items: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, distances) of the items' lists, -1 ids as ``size`` at distance inf (they sort last)."""
        ids, dist = self.ids[items, :width], self.dist[items, :width]
        missing = ids < 0
        return ids.masked_fill(missing, self.size), dist.masked_fill(missing, torch.inf)


class _Candidates:
    """One batch of queries' candidates, -1 ids as ``num_gallery`` at distance inf."""

    def __init__(self, ids: torch.Tensor, dist: torch.Tensor, num_gallery: int):
        self.valid = ids >= 0
        self.ids = ids.masked_fill(~self.valid, num_gallery)
        self.dist = dist.masked_fill(~self.valid, torch.inf)
        self.covers = self.valid.sum(1) >= num_gallery  # per query
        self.known = _KnownDistances([(self.ids, self.dist)], num_gallery)

    @property
    def flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(query, gallery id) of every valid candidate, query-major."""
        owner = torch.arange(self.ids.shape[0])[:, None].expand_as(self.ids)
        return owner[self.valid], self.ids[self.valid]


class _KnownDistances:
    """The distances some rows list, looked up by (row, id); an unlisted pair reads the row's
    largest listed distance (approximation 1). ``blocks`` of (ids, distances) hold consecutive
    rows, each block as wide as its lists; ids run from QUERY to ``num_ids`` (a sentinel)."""

    def __init__(self, blocks: list[tuple[torch.Tensor, torch.Tensor]], num_ids: int):
        self.span = num_ids + 2
        keys, dists, largest, start = [], [], [], 0
        for ids, dist in blocks:
            listed = ids < num_ids
            keys.append(((start + torch.arange(ids.shape[0]))[:, None] * self.span + (ids - QUERY))[listed])
            dists.append(dist[listed])
            largest.append(torch.where(listed, dist, 0).amax(1))
            start += ids.shape[0]
        self.key, order = torch.cat(keys).sort()
        self.dist = torch.cat(dists)[order]
        self.largest = torch.cat(largest)

    def find(self, rows: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(distance, listed?) of each (row, id) pair; unlisted pairs read the row's largest."""
        key = rows * self.span + (ids - QUERY)
        slot = torch.searchsorted(self.key, key).clamp_(max=max(self.key.numel() - 1, 0))
        listed = self.key[slot] == key
        return torch.where(listed, self.dist[slot], self.largest[rows]), listed


def _normaliser(largest: torch.Tensor, covers: torch.Tensor, max_distance: float) -> torch.Tensor:
    """Squared row maxima of the published 'original' distance (approximation 3 for uncovered rows)."""
    maxima = torch.where(covers, largest, largest.clamp_min(max_distance))
    return (maxima * maxima).clamp_min(TINY)


# ---------------------------------------------------------------- local neighbourhoods


class _Neighbourhoods:
    """The gallery items a batch reads, each as its own row, with neighbour lists in local indices.

    ``owner`` separates copies: k-reciprocal gives each query its own copy of every item it reads
    (the query enters those items' lists, approximation 2), SIM shares one copy (owner 0) across
    the batch. Local rows: ``num_queries`` query rows, then one per (owner, item), then a dummy
    row listing only itself, which stands for every item outside the neighbourhood (no real item
    is ever reciprocal with it).
    """

    def __init__(self, graph: _Graph, keys: torch.Tensor, num_queries: int, candidates: _Candidates | None,
                 width: int, max_distance: float):
        self.graph, self.num_queries = graph, num_queries
        self.keys = keys  # owner·G + item, unique and sorted: the local order
        self.owner, self.item = self.keys // graph.size, self.keys % graph.size
        self.dummy = num_queries + self.keys.numel()
        self.num_rows = self.dummy + 1
        ids, dist = graph.lists(self.item)
        blocks = []  # (ids, distances, owner, covers) of consecutive rows, each as wide as its lists
        if candidates is not None:  # query rows first; the query enters the lists of its own candidates
            to_query, listed = candidates.known.find(self.owner, self.item)
            ids = torch.cat([ids, torch.where(listed, QUERY, graph.size)[:, None]], 1)
            dist = torch.cat([dist, to_query.masked_fill(~listed, torch.inf)[:, None]], 1)
            blocks.append((torch.cat([torch.full((num_queries, 1), QUERY), candidates.ids], 1),
                           torch.cat([torch.zeros(num_queries, 1), candidates.dist], 1),
                           torch.arange(num_queries), candidates.covers))
        blocks.append((ids, dist, self.owner, torch.full((self.keys.numel(),), graph.covers)))
        self.known = _KnownDistances([(ids, dist) for ids, dist, _, _ in blocks], graph.size)
        self.squared_max = _normaliser(self.known.largest, torch.cat([b[3] for b in blocks]), max_distance)
        lists, start = [], 0
        for ids, dist, owner, _ in blocks:
            squared_max = self.squared_max[start: start + ids.shape[0], None]
            _, ids = sort_rows(dist * dist / squared_max, ids)
            lists.append(self.local(owner[:, None].expand(-1, width), _widen(ids[:, :width], width, graph.size)))
            start += ids.shape[0]
        self.neighbours = torch.cat([*lists, torch.full((1, width), self.dummy)])
        self.global_id = torch.cat([torch.full((num_queries,), QUERY), self.item, torch.tensor([graph.size])])

    def local(self, owners: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Local rows of (owner, id) pairs: the owner's query row for QUERY, the dummy when absent."""
        key = owners * self.graph.size + ids.clamp(0, self.graph.size - 1)
        slot = torch.searchsorted(self.keys, key).clamp_(max=self.keys.numel() - 1)
        found = (self.keys[slot] == key) & (ids >= 0) & (ids < self.graph.size)
        return torch.where(ids == QUERY, owners, torch.where(found, slot + self.num_queries, self.dummy))

    def original(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Normalised squared distances of local (row, col) pairs (unlisted: approximation 1)."""
        dist, _ = self.known.find(rows, self.global_id[cols])
        return dist * dist / self.squared_max[rows]


def _widen(values: torch.Tensor, width: int, fill) -> torch.Tensor:
    """Rows padded with ``fill`` to ``width`` columns."""
    if values.shape[1] == width:
        return values
    return torch.cat([values, torch.full((values.shape[0], width - values.shape[1]), fill, dtype=values.dtype)], 1)


def _reach(keys: torch.Tensor, graph: _Graph, width: int) -> torch.Tensor:
    """The (owner·G + item) keys plus those of the first ``width`` entries of their items' lists,
    unique and sorted (deduplicated at every hop: neighbourhoods overlap heavily)."""
    ids = graph.ids[keys % graph.size, :width]
    reached = (keys // graph.size * graph.size)[:, None] + ids
    return torch.unique(torch.cat([keys, reached[ids >= 0]]))


# ---------------------------------------------------------------- the methods


def _k_reciprocal(batch: _Candidates, graph: _Graph, params: RerankParams, max_distance: float,
                  strength: torch.Tensor | None = None) -> torch.Tensor:
    num_queries = batch.ids.shape[0]
    k1, k2 = params.k1, params.k2
    half = int(round(k1 / 2))
    width = min(max(k1 + 1, k2), 1 + graph.size)
    owner, cand = batch.flat
    # What one query's re-ranking reads: its candidates and their k2 nearest (the expansion's
    # rows), their lists (reciprocal sets), and those members' half lists (the 2/3 expansion).
    targets = _reach(owner * graph.size + cand, graph, k2)
    keys = _reach(_reach(targets, graph, width), graph, half + 1)
    space = _Neighbourhoods(graph, keys, num_queries, batch, width, max_distance)
    target_rows = torch.cat([torch.arange(num_queries), num_queries + torch.searchsorted(keys, targets)])
    sets = expanded_reciprocal_sets(space.neighbours, k1, target_rows)
    vectors = gaussian_weights(sets, space.num_rows, lambda rows, cols: space.original(target_rows[rows], cols))
    position = torch.full((space.num_rows,), target_rows.numel())  # the dummy reads an empty row
    position[target_rows] = torch.arange(target_rows.numel())
    vectors = vectors._replace(num_rows=target_rows.numel() + 1)
    cand_local = space.local(owner, cand)
    if k2 != 1:  # the published code skips the expansion for k2 = 1
        output_rows = torch.cat([torch.arange(num_queries), cand_local])
        vectors = local_query_expansion(vectors, position[space.neighbours[output_rows, :k2]])
        query_rows, cand_rows = torch.arange(num_queries), num_queries + torch.arange(cand_local.numel())
    else:
        query_rows, cand_rows = position[:num_queries], position[cand_local]
    jaccard = paired_jaccard_distance(vectors, query_rows[owner], vectors, cand_rows)
    lam = _query_lambda(params.lambda_value, strength, owner)
    result = torch.zeros(batch.ids.shape)
    result[batch.valid] = (1 - lam) * jaccard + lam * space.original(owner, cand_local)
    return result


def _query_lambda(lambda_value: float, strength: torch.Tensor | None, owner: torch.Tensor):
    """λ_q = 1 − s·(1 − λ) for each candidate's query (exact mode's rule), or λ itself."""
    return lambda_value if strength is None else 1 - strength[owner] * (1 - lambda_value)


def _sim(batch: _Candidates, graph: _Graph, params: RerankParams, max_distance: float,
         graph_only: bool, strength: torch.Tensor | None = None) -> torch.Tensor:
    graph_dist = blend_graph(_graph_distances(batch, graph, params), batch.dist, strength)
    if graph_only:
        return graph_dist
    k1, half = params.k1, int(round(params.k1 / 2))
    # Query side: the plain k0 + 1 nearest candidates by the normalised squared d_S.
    largest = torch.where(batch.valid, graph_dist, 0).amax(1)
    query_original = graph_dist * graph_dist / _normaliser(largest, batch.covers, max_distance)[:, None]
    query_original = query_original.masked_fill(~batch.valid, torch.inf)
    keys, nearest = sort_rows(query_original, batch.ids)
    keys, nearest = keys[:, : params.k0 + 1], nearest[:, : params.k0 + 1]
    # Gallery side: expanded k-reciprocal sets on the gallery alone, shared by the batch.
    owner, cand = batch.flat
    width = min(k1 + 1, graph.size)
    targets = torch.unique(cand)  # owner 0: one copy shared by the batch
    space = _Neighbourhoods(graph, _reach(_reach(targets, graph, width), graph, half + 1), 0, None, width,
                            max_distance)
    target_rows = torch.searchsorted(space.keys, targets)
    sets = expanded_reciprocal_sets(space.neighbours, k1, target_rows)
    gallery_vectors = gaussian_weights(sets, space.num_rows, lambda rows, cols: space.original(target_rows[rows], cols))
    nearest_rows = space.local(torch.zeros_like(nearest), nearest).masked_fill(keys == torch.inf, space.num_rows)
    query_vectors = gaussian_weights(nearest_rows, space.num_rows, lambda rows, cols: _pair_values(
        nearest_rows, keys, rows, cols))
    jaccard = paired_jaccard_distance(query_vectors, owner, gallery_vectors, torch.searchsorted(targets, cand))
    lam = _query_lambda(params.lambda_value, strength, owner)
    result = torch.zeros(batch.ids.shape)
    result[batch.valid] = (1 - lam) * jaccard + lam * query_original[batch.valid]
    return result


def _pair_values(members: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """values[r, a] where members[r, a] == c, for each (r, c) pair."""
    return values[rows, (members[rows] == cols[:, None]).int().argmax(1)]


def _graph_rows(graph: _Graph, items: torch.Tensor, graph_lambda: float, width: int):
    """(λ·distances, ids) of the items' ``width`` nearest, ranked on the scaled values (ties by
    id) as exact mode ranks them."""
    ids, dist = graph.lists(items)
    hop, ids = sort_rows(dist * graph_lambda, ids)
    return hop[:, :width], ids[:, :width]


def _graph_distances(batch: _Candidates, graph: _Graph, params: RerankParams) -> torch.Tensor:
    """SIM graph reasoning for each candidate j: mean of the k_mean smallest d(q, t) + λ·d(j, t) over
    j's k_graph nearest t, ranked on the scaled values as exact mode does (approximation 1 for t
    outside q's candidates)."""
    num_queries, num_candidates = batch.ids.shape
    items = batch.ids.clamp(max=graph.size - 1).reshape(-1)
    width = min(params.k_graph, graph.width, graph.size)
    hop, ids = _graph_rows(graph, items, params.graph_lambda, width)
    owners = torch.arange(num_queries).repeat_interleave(num_candidates)[:, None].expand_as(ids)
    to_query, _ = batch.known.find(owners, ids)
    paths = to_query + hop
    if params.reciprocal_graph:  # through t only if j is in t's list too; else j's own path d(q, j)
        _, back = _graph_rows(graph, ids.clamp(max=graph.size - 1).reshape(-1), params.graph_lambda, width)
        reciprocal = (back.view(*ids.shape, width) == items[:, None, None]).any(-1)
        paths = torch.where(reciprocal, paths, batch.dist.reshape(-1, 1))
    paths = paths.view(num_queries, num_candidates, width).numpy()
    return torch.from_numpy(mean_of_smallest(paths, min(params.k_mean, width)).astype(np.float32))


__all__ = ["SCALABLE_METHODS", "rerank_candidates"]
