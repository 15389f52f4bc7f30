"""Image files → embeddings: the batch loop behind ``reidx embed``, ``evaluate`` and training checks.

Decoding runs in threads a batch or two ahead of the model (:mod:`reidx.pipeline.batching`);
a file that cannot be decoded gets a NaN row and its reason, and never stops the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from reidx.pipeline.batching import prefetch_batches
from reidx.pipeline.embed import BATCH_SIZE, Embedder, resize_crop
from reidx.pipeline.imaging import DEFAULT_MAX_PIXELS, load_image_or_reason


@dataclass
class EmbeddedFiles:
    """Result of :func:`embed_files`: one entry per input path, in input order."""

    embeddings: np.ndarray  # (N, D) float32; rows of failed images are NaN
    errors: list[str | None]  # None where the image embedded, else why it did not

    @property
    def ok(self) -> np.ndarray:
        return np.array([e is None for e in self.errors], dtype=bool)


def embed_files(embedder: Embedder, paths: Sequence, batch_size: int = BATCH_SIZE, decode_workers: int = 2,
                max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = False) -> EmbeddedFiles:
    """Embed image files (whole images are the crops) in batches, in input order."""
    from tqdm import tqdm

    def load(path):
        image, reason = load_image_or_reason(path, max_pixels)
        return (None, reason) if image is None else (resize_crop(image), None)

    out = np.full((len(paths), embedder.info.dim), np.nan, dtype=np.float32)
    errors: list[str | None] = [None] * len(paths)
    bar = tqdm(total=len(paths), unit="img", desc="embed", disable=not progress)
    for start, loaded in prefetch_batches(paths, load, batch_size, workers=decode_workers, ahead=2):
        good = [i for i, (crop, _) in enumerate(loaded) if crop is not None]
        for i, (_, error) in enumerate(loaded):
            errors[start + i] = error
        if good:
            out[[start + i for i in good]] = embedder.embed(np.stack([loaded[i][0] for i in good]))
        bar.update(len(loaded))
    bar.close()
    return EmbeddedFiles(out, errors)
