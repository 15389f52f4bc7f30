"""Evaluate embedded query and gallery sides with the Market-1501 protocol, optionally re-ranked.

Junk gallery items (person id -1) leave the gallery before ranking; distractors (id 0) stay.
The embedding of each side is :mod:`reidx.pipeline.labelled_split`; this module ranks and scores.
"""

from __future__ import annotations

from typing import Callable

from reidx.indexers.distances import cosine_distances
from reidx.indexers.metrics import RankingMetrics, evaluate_ranking
from reidx.pipeline.labelled_split import EmbeddedSplit, embed_side
from reidx.pipeline.labels import JUNK


def evaluate_split(query: EmbeddedSplit, gallery: EmbeddedSplit, rerank: str = "none",
                   rerank_params=None) -> RankingMetrics:
    """Cosine ranking of every query against the gallery, junk removed, optionally re-ranked
    (``indexers.rerank``: k-reciprocal, sim, sim-graph) on Euclidean distances."""
    g_pids = gallery.table["person_id"].to_numpy()
    not_junk = g_pids != JUNK
    g_feats, g_pids = gallery.features[not_junk], g_pids[not_junk]
    g_cams = gallery.table["camera"].to_numpy(zero_copy_only=False)[not_junk]
    if rerank == "none":
        distances = cosine_distances(query.features, g_feats)
    else:
        from reidx.indexers.rerank import rerank_features

        distances = rerank_features(rerank, query.features, g_feats, rerank_params)
    return evaluate_ranking(distances, query.table["person_id"].to_numpy(),
                            query.table["camera"].to_numpy(zero_copy_only=False), g_pids, g_cams)


def checkpoint_validator(device: str = "auto", threads: int | None = None) -> Callable[[str, str, str], dict]:
    """A function scoring weights (a checkpoint path or a known name) on a query/gallery split by
    the code behind ``reidx evaluate`` (for ``reidx train``: training itself never imports the
    indexers)."""
    def validate(weights: str, query: str, gallery: str) -> dict:
        from reidx.pipeline.embed import build_embedder

        embedder = build_embedder(str(weights), device=device, threads=threads)
        metrics = evaluate_split(embed_side([query], embedder), embed_side([gallery], embedder))
        report = metrics.as_percent_dict()
        return {k: report[k] for k in ("mAP", "rank1", "rank5", "mINP") if k in report}

    return validate
