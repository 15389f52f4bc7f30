"""One side of a labelled evaluation split, embedded: images (or a ``reidx embed`` table) → labels + features.

What ``reidx evaluate`` and training's validation feed to the metrics. Either side may be image
inputs (folders, globs, files; labels from Market-1501 naming or a label table) or a Parquet
table written by ``reidx embed``. Rows without an embedding or a label are dropped and counted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from reidx.pipeline.datasets import label_crops, list_images
from reidx.pipeline.imaging import DEFAULT_MAX_PIXELS
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


def embed_side(inputs: list[str], embedder=None, labels: str | os.PathLike | None = None,
               batch_size: int = 32, progress: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS) -> EmbeddedSplit:
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
        from reidx.pipeline.embed_files import embed_files

        crops = label_crops(list_images(inputs), labels, require=True)
        result = embed_files(embedder, crops["path"].to_pylist(), batch_size=batch_size, max_pixels=max_pixels,
                             progress=progress)
        table = build_table(crops, result, embedder.info)
    usable = pc.and_(pc.is_valid(table["embedding"]), pc.is_valid(table["person_id"]))
    kept = table.filter(usable)
    return EmbeddedSplit(kept, embeddings_to_numpy(kept["embedding"]), table.num_rows - kept.num_rows)
