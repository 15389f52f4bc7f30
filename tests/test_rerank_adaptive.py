"""Adaptive re-ranking (``indexers.rerank_adaptive``, issue 15): the unlabelled group-size estimate,
the gallery profile build-index stores, per-query strengths, and the safety they buy.

Fast tests use synthetic galleries of known group sizes; the slow ones embed cuhk03-train and check
that the default never goes below plain ranking where every fixed setting did (two images per
person in query and gallery) and still gains where people have about five.
"""

import json

import numpy as np
import pytest

from reidx.indexers import rerank_adaptive as adaptive
from reidx.indexers.distances import unit_euclidean
from reidx.indexers.metrics import evaluate_ranking
from reidx.indexers.rerank import ADAPTIVE, default_params, exact_strengths, rerank
from reidx.indexers.rerank_lists import nearest_lists
from reidx.indexers.rerank_sparse import rerank_candidates
from conftest import SHARED

METHODS = ("k-reciprocal", "sim", "sim-graph")


def grouped_features(group_sizes, dim=64, spread=0.25, seed=0):
    """Unit features of identities with the given numbers of images (tight groups, random centres)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((len(group_sizes), dim))
    pids = np.repeat(np.arange(len(group_sizes)), group_sizes)
    x = centres[pids] + spread * rng.standard_normal((len(pids), dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), pids


def graph_rows(features, k=30):
    """kNN graph rows as build-index stores them: itself first, cosine distances."""
    similarity = features @ features.T
    np.fill_diagonal(similarity, 2.0)  # itself first
    ids = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    cosine = 1 - np.take_along_axis(features @ features.T, ids, 1)
    cosine[:, 0] = 0
    return ids, cosine.astype(np.float32)


@pytest.mark.parametrize("size, expected", [(1, 0), (2, 1), (5, 4)])
def test_counts_find_the_group_size(size, expected):
    """Groups of one, two and five images: the median count is the number of same-identity others."""
    features, _ = grouped_features([size] * (300 // size), seed=size)
    ids, cosine = graph_rows(features)
    profile = adaptive.gallery_rerank_profile(ids, cosine)
    assert profile["group_size"] == expected
    assert profile["strength"] == adaptive.strength(expected)


def test_groups_wider_than_the_graph_count_29():
    """Sixty frames of each person spread along a low-dimensional path (as tracks are): every item's
    29 nearest are its own, the nearest well inside the 29th."""
    rng = np.random.default_rng(3)
    centres, directions = rng.standard_normal((8, 64)), 0.3 * rng.standard_normal((8, 2, 64))
    steps = rng.uniform(-1, 1, (8, 60, 2))
    x = centres[:, None] + np.einsum("ipk,ikd->ipd", steps, directions) + 0.01 * rng.standard_normal((8, 60, 64))
    features = (x / np.linalg.norm(x, axis=-1, keepdims=True)).reshape(-1, 64).astype(np.float32)
    assert adaptive.gallery_rerank_profile(*graph_rows(features))["group_size"] == adaptive.GRAPH_NEIGHBOURS


def test_profile_is_small_json_and_metric_consistent():
    features, _ = grouped_features([4] * 60, seed=4)
    ids, cosine = graph_rows(features)
    profile = adaptive.gallery_rerank_profile(ids, cosine)
    assert json.loads(json.dumps(profile)) == profile and len(json.dumps(profile)) < 300
    assert profile == adaptive.gallery_rerank_profile(ids, np.sqrt(2 * cosine), metric="euclidean")
    assert set(profile) >= {"version", "items", "group_size", "strength"}
    with pytest.raises(ValueError, match="metric"):
        adaptive.gallery_rerank_profile(ids, cosine, metric="dot")


def test_small_or_padded_graphs_mean_plain_ranking():
    """A gallery smaller than the graph cannot be read: strength 0 (Faiss pads its rows with -1/inf)."""
    features, _ = grouped_features([5] * 4, seed=5)
    ids, cosine = graph_rows(features, k=20)
    ids = np.concatenate([ids, np.full((20, 10), -1)], 1)
    cosine = np.concatenate([cosine, np.full((20, 10), np.inf, np.float32)], 1)
    assert adaptive.gallery_rerank_profile(ids, cosine)["strength"] == 0.0
    q_g = unit_euclidean(features[:3], features)
    _, strength = exact_strengths(q_g, unit_euclidean(features, features))
    assert (strength == 0).all()


def test_query_strength_is_at_most_the_gallerys():
    profile = {"strength": 0.5}
    counts = np.array([[4, 4, 4], [0, 0, 4], [np.nan, 4, 4], [np.nan, np.nan, np.nan]])
    np.testing.assert_array_equal(adaptive.query_strengths(profile, counts), [0.5, 0.0, 0.5, 0.0])
    np.testing.assert_array_equal(adaptive.query_strengths({"strength": 1.0}, counts), [1.0, 0.0, 1.0, 0.0])


def test_dense_galleries_take_the_published_k1_unless_k1_is_given():
    dense, sparse = {"group_size": 29.0}, {"group_size": 4.0}
    params = ADAPTIVE["k-reciprocal"]
    assert adaptive.adaptive_k1(dense, params.k1, params.dense_k1) == 20
    assert adaptive.adaptive_k1(sparse, params.k1, params.dense_k1) == params.k1 == 15
    assert adaptive.adaptive_k1(dense, 7, None) == 7


def split_of(group_sizes, seed):
    """Queries: one extra image of each identity, drawn like its gallery images."""
    features, pids = grouped_features([n + 1 for n in group_sizes], seed=seed)
    first = np.r_[0, np.cumsum([n + 1 for n in group_sizes])[:-1]]
    is_query = np.zeros(len(pids), bool)
    is_query[first] = True
    return features[is_query], pids[is_query], features[~is_query], pids[~is_query]


@pytest.mark.parametrize("sizes", [[1] * 60 + [2] * 40, [2] * 50, [4] * 30 + [1] * 30, [6] * 20])
def test_scalable_equals_exact_with_adaptive_strengths(sizes):
    """Both modes read the same 29 distances per item and the same 10 nearest candidates, so their
    strengths and re-ranked distances agree (covering lists; k-reciprocal: exact mode per query)."""
    query, _, gallery, _ = split_of(sizes, seed=len(sizes))
    q_g, q_q, g_g = unit_euclidean(query, gallery), unit_euclidean(query, query), unit_euclidean(gallery, gallery)
    ids, dist = nearest_lists(query, gallery, len(gallery))
    graph_ids, graph_dist = nearest_lists(gallery, gallery, len(gallery))
    profile, strength = exact_strengths(q_g, g_g)
    assert profile == adaptive.candidate_strengths(ids, dist, graph_dist)[0]
    np.testing.assert_array_equal(strength, adaptive.candidate_strengths(ids, dist, graph_dist)[1])
    for method in METHODS:
        scalable = rerank_candidates(method, ids, dist, graph_ids, graph_dist)
        if method == "k-reciprocal":
            exact = np.concatenate([rerank(method, q_g[i:i + 1], q_q[i:i + 1, i:i + 1], g_g) for i in range(len(q_g))])
        else:
            exact = rerank(method, q_g, q_q, g_g)
        assert np.abs(scalable - np.take_along_axis(exact, ids, 1)).max() <= 1e-5


def test_strength_zero_is_the_plain_ranking():
    """Galleries of pairs: strength 0, and every method returns the plain order."""
    query, _, gallery, _ = split_of([2] * 80, seed=9)
    q_g, q_q, g_g = unit_euclidean(query, gallery), unit_euclidean(query, query), unit_euclidean(gallery, gallery)
    assert exact_strengths(q_g, g_g)[0]["strength"] == 0.0
    for method in METHODS:
        np.testing.assert_array_equal(np.argsort(rerank(method, q_g, q_q, g_g), 1, kind="stable"),
                                      np.argsort(q_g, 1, kind="stable"))


def test_the_profile_of_a_faiss_graph_matches_exact_mode():
    """What build-index stores (knn_graph over a Faiss index, cosine) gives exact mode's profile."""
    import faiss

    from reidx.indexers.knn_graph import knn_graph

    _, _, gallery, _ = split_of([4] * 40 + [1] * 20, seed=11)
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery)
    stored = adaptive.gallery_rerank_profile(*knn_graph(index, gallery, 0, 30))
    assert stored == exact_strengths(unit_euclidean(gallery[:2], gallery), unit_euclidean(gallery, gallery))[0]


def test_build_index_stores_the_profile_and_updates_it_incrementally(tmp_path):
    """build-index writes the profile of its stored graph into meta.json (full and incremental
    builds); it equals the profile read back from the whole graph, which `reidx query` would
    otherwise compute."""
    from test_index_scale import add_shards

    from reidx.indexers.build import build_index
    from reidx.indexers.query import stored_profile
    from reidx.indexers.versions import load_index

    features, _ = grouped_features([4] * 60 + [1] * 40, seed=12)
    gallery = tmp_path / "g"
    add_shards(gallery, features[:200], "base")
    build_index(gallery, index_type="flat", knn_k=30)
    for step in ("full", "incremental"):
        index = load_index(gallery, gpu="off")
        stored = index.meta.rerank_profile
        assert stored == adaptive.gallery_rerank_profile(*index.knn()) == stored_profile(stored)
        assert stored["items"] == index.count and 0 < stored["strength"] <= 1
        if step == "full":
            add_shards(gallery, features[200:], "night")
            assert build_index(gallery, index_type="flat", knn_k=30)["mode"] == "incremental"
    assert stored["items"] == len(features) and stored_profile({**stored, "version": 0}) is None


# ---------------------------------------------------------------- cuhk03-train, real features (slow)

_CUHK03 = {}


def cuhk03(weights):
    if weights not in _CUHK03:
        from reidx.pipeline.embed import build_embedder
        from reidx.pipeline.labelled_split import embed_side

        embedder = build_embedder(weights)
        sides = [embed_side([str(SHARED / "data" / "cuhk03-train" / side)], embedder) for side in ("query", "gallery")]
        _CUHK03[weights] = [(side.features, side.table["person_id"].to_numpy(),
                             np.asarray(side.table["camera"].to_pylist())) for side in sides]
    return _CUHK03[weights]


def at_most(pids, n, rng):
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(pids == p), min(n, (pids == p).sum()), replace=False)
                                   for p in np.unique(pids)]))


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["osnet_x0_25_msmt17", "osnet_x0_25_market1501"])
def test_default_never_below_plain_on_two_images_per_person(weights):
    """The outside failure's shape: two images per person in query and gallery, 300 people. Every
    fixed setting lost here (safe k-reciprocal up to −2.8 mAP with msmt17 weights); the default may not."""
    (q, q_pids, q_cams), (g, g_pids, g_cams) = cuhk03(weights)
    for seed in (0, 1):
        rng = np.random.default_rng(seed)
        qi, gi = at_most(q_pids, 2, rng), at_most(g_pids, 2, rng)
        labels = (q_pids[qi], q_cams[qi], g_pids[gi], g_cams[gi])
        q_g, q_q, g_g = unit_euclidean(q[qi], g[gi]), unit_euclidean(q[qi], q[qi]), unit_euclidean(g[gi], g[gi])
        plain = evaluate_ranking(q_g, *labels).mAP
        for method in METHODS:
            assert evaluate_ranking(rerank(method, q_g, q_q, g_g), *labels).mAP >= plain, (method, seed)


@pytest.mark.slow
def test_default_still_gains_on_five_images_per_person():
    """cuhk03-train as it is (≈5 gallery images per person), msmt17 weights: each method gains ≥ +4 mAP."""
    (q, q_pids, q_cams), (g, g_pids, g_cams) = cuhk03("osnet_x0_25_msmt17")
    labels = (q_pids, q_cams, g_pids, g_cams)
    q_g, q_q, g_g = unit_euclidean(q, g), unit_euclidean(q, q), unit_euclidean(g, g)
    plain = evaluate_ranking(q_g, *labels).mAP
    for method in METHODS:
        assert evaluate_ranking(rerank(method, q_g, q_q, g_g), *labels).mAP >= plain + 0.04, method
    assert default_params("sim").adaptive


def ranking(method, q_g, q_q, g_g, params):
    """Exact mode's distances (Q, G) and the scalable mode's ranking (gallery ids) from lists that
    cover the gallery, built from the same distances (ties by index, as exact mode breaks them),
    read in candidate order for ties, as `reidx query` sorts. k-reciprocal: exact mode one query
    at a time (the scalable mode never links queries; docs/reranking.md)."""
    if method == "k-reciprocal":
        exact = np.concatenate([rerank(method, q_g[i:i + 1], q_q[i:i + 1, i:i + 1], g_g, params)
                                for i in range(len(q_g))])
    else:
        exact = rerank(method, q_g, q_q, g_g, params)
    ids = np.argsort(q_g, axis=1, kind="stable")
    graph_ids = np.argsort(np.where(np.eye(len(g_g), dtype=bool), -1.0, g_g), axis=1, kind="stable")  # itself first
    scalable = rerank_candidates(method, ids, np.take_along_axis(q_g, ids, 1), graph_ids,
                                 np.take_along_axis(g_g, graph_ids, 1), params)
    return exact, np.take_along_axis(ids, np.argsort(scalable, axis=1, kind="stable"), 1)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["adaptive", "published"])
def test_scalable_ranks_as_exact_on_real_features(preset):
    """Issue 15, item 2: cuhk03-train (msmt17 weights), 30 queries (one per person) against a
    sparse gallery (≤ 2 per person, 600 images: adaptive strength 0) and the full one (1,478, ≈5
    per person: strength ≈ 1); candidate lists and graph cover the gallery. The scalable mode's
    ranking of every query is exact mode's up to swaps of items whose exact re-ranked distances
    differ by less than 1e-5 (float sums in another order: with 300 queries, 41 had such a swap
    with k-reciprocal on the full gallery; none on the sparse one). Read in the scalable order,
    exact mode's distances never decrease by more than that."""
    (q, q_pids, _), (g, g_pids, _) = cuhk03("osnet_x0_25_msmt17")
    rng = np.random.default_rng(15)
    qi = np.sort(rng.choice(at_most(q_pids, 1, rng), 30, replace=False))
    for gi in (at_most(g_pids, 2, rng), np.arange(len(g_pids))):
        q_g, q_q, g_g = unit_euclidean(q[qi], g[gi]), unit_euclidean(q[qi], q[qi]), unit_euclidean(g[gi], g[gi])
        for method in METHODS:
            exact, order = ranking(method, q_g, q_q, g_g, default_params(method, preset))
            assert np.diff(np.take_along_axis(exact, order, 1), axis=1).min() >= -1e-5, (method, len(gi))
