"""Evaluate a ReID embedder on a labelled query/gallery split (Market-1501 protocol).

Either side may be image inputs (folders, globs, files) or a Parquet table written by
``reidx embed``; images are embedded with the given embedder. Junk gallery items (person id -1)
leave the gallery before ranking; distractors (id 0) stay.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from reidx.indexers.metrics import RankingMetrics, cosine_distances, evaluate_ranking
from reidx.pipeline.datasets import label_crops, list_images
from reidx.pipeline.embed import Embedder, embed_files
from reidx.pipeline.embedding_table import build_table, embeddings_to_numpy, read_table, table_embedder_id


@dataclass
class EmbeddedSplit:
    """One side of a split: labels and unit-length features of the images that decoded."""

    table: pa.Table  # embedded-crops schema (see pipeline.embedding_table), failed rows dropped
    features: np.ndarray  # (N, D) float32
    num_failed: int


def is_embedded_table(inputs: list[str]) -> bool:
    """One Parquet file written by ``reidx embed`` stands for a side already embedded."""
    return len(inputs) == 1 and str(inputs[0]).endswith(".parquet")


def embed_side(inputs: list[str], embedder: Embedder | None, labels: str | os.PathLike | None = None,
               batch_size: int = 32, progress: bool = False) -> EmbeddedSplit:
    """Embed (or read) one side of the split and keep only rows with features and labels."""
    if is_embedded_table(inputs):
        table = read_table(inputs[0])
        if embedder is not None:
            name, sha = table_embedder_id(table)
            if sha != embedder.info.weights_sha256:
                raise ValueError(f"{inputs[0]} was embedded with {name} ({sha[:12]}), "
                                 f"not {embedder.info.name} ({embedder.info.weights_sha256[:12]})")
    else:
        if embedder is None:
            raise ValueError("image inputs need an embedder (--weights)")
        crops = label_crops(list_images(inputs), labels, require=True)
        result = embed_files(embedder, crops["path"].to_pylist(), batch_size=batch_size, progress=progress)
        table = build_table(crops, result, embedder.info)
    usable = pc.and_(pc.is_valid(table["embedding"]), pc.is_valid(table["person_id"]))
    kept = table.filter(usable)
    return EmbeddedSplit(kept, embeddings_to_numpy(kept["embedding"]), table.num_rows - kept.num_rows)


def evaluate_split(query: EmbeddedSplit, gallery: EmbeddedSplit, rerank: str = "none",
                   rerank_params=None) -> RankingMetrics:
    """Cosine ranking of every query against the gallery, junk (id -1) removed, optionally
    re-ranked (``indexers.rerank``: k-reciprocal, sim, sim-graph) on Euclidean distances."""
    g_pids = gallery.table["person_id"].to_numpy()
    not_junk = g_pids != -1
    g_feats, g_pids = gallery.features[not_junk], g_pids[not_junk]
    g_cams = gallery.table["camera"].to_numpy()[not_junk]
    if rerank == "none":
        distances = cosine_distances(query.features, g_feats)
    else:
        from reidx.indexers.rerank import rerank_features

        distances = rerank_features(rerank, query.features, g_feats, rerank_params)
    return evaluate_ranking(distances, query.table["person_id"].to_numpy(), query.table["camera"].to_numpy(),
                            g_pids, g_cams)
