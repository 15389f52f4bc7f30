"""The Python API: what the ``reidx`` command line calls, for use from a notebook or a service.

In the manner of torchreid's ``FeatureExtractor``::

    import reidx

    vectors = reidx.Embedder("osnet_x0_25_msmt17").embed(["a.jpg", "b.jpg"])  # (2, 512) unit rows
    gallery = reidx.Gallery("out/demo-gallery")
    hits = gallery.search(vectors, k=10)                     # Arrow table: query, rank, detection_id, …
    ranked = gallery.query(["crop.jpg"], rerank="k-reciprocal")  # Arrow table, query-results schema

Every heavy import happens inside the methods: ``import reidx`` costs nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import numpy as np

DEFAULT_WEIGHTS = "osnet_x0_25_msmt17"


class Embedder:
    """ReID embeddings of person crops: ``embed(images)`` → float32 (N, D), unit rows.

    ``images``: file paths, PIL images or RGB uint8 arrays (H, W, 3), each one person crop (resized
    as torchreid does). A file that cannot be decoded raises ``ImageDecodeError`` naming it; for
    batch runs that must go on past bad files use :meth:`embed_files`.
    """

    def __init__(self, weights: str = DEFAULT_WEIGHTS, *, backend: str = "auto", device: str = "auto",
                 precision: str = "fp32", batch_size: int = 32):
        from reidx.pipeline.embed import build_embedder

        self.model = build_embedder(weights, backend=backend, device=device, precision=precision)
        self.info = self.model.info
        self.batch_size = batch_size

    def embed(self, images: Sequence) -> np.ndarray:
        import numpy as np
        from PIL import Image

        from reidx.pipeline.embed import resize_crop
        from reidx.pipeline.imaging import ImageDecodeError, load_image

        crops = []
        for image in images:
            if isinstance(image, (str, os.PathLike)):
                try:
                    image = load_image(image)
                except ImageDecodeError as exc:
                    raise ImageDecodeError(f"{image}: {exc}") from None
            elif isinstance(image, np.ndarray):
                image = Image.fromarray(np.asarray(image, np.uint8))
            crops.append(resize_crop(image.convert("RGB")))
        if not crops:
            return np.zeros((0, self.info.dim), np.float32)
        return np.concatenate([self.model.embed(np.stack(crops[i:i + self.batch_size]))
                               for i in range(0, len(crops), self.batch_size)])

    def embed_files(self, paths: Sequence, max_pixels: int | None = None, progress: bool = False):
        """:class:`~reidx.pipeline.embed_files.EmbeddedFiles`: NaN rows and reasons for files that failed."""
        from reidx.pipeline.embed_files import embed_files
        from reidx.pipeline.imaging import DEFAULT_MAX_PIXELS

        return embed_files(self.model, list(paths), batch_size=self.batch_size,
                           max_pixels=max_pixels or DEFAULT_MAX_PIXELS, progress=progress)


class Gallery:
    """A gallery folder: its nightly indexing, its Faiss index, and searches in it."""

    def __init__(self, path: str | os.PathLike, gpu: str = "auto"):
        self.path = Path(path)
        self.gpu = gpu
        self._index = None

    @property
    def index(self):
        """The live :class:`~reidx.indexers.versions.GalleryIndex` (loaded on first use)."""
        if self._index is None:
            from reidx.indexers.versions import load_index

            self._index = load_index(self.path, gpu=self.gpu)
        return self._index

    def add(self, manifests: Sequence[str | os.PathLike], **options) -> dict:
        """Index the manifests' images into this gallery (``reidx index``); returns its summary."""
        from reidx.pipeline.job import run_index

        options.setdefault("weights", DEFAULT_WEIGHTS)
        return run_index(list(manifests), self.path, **options)

    def build_index(self, **options) -> dict:
        """Build or update the Faiss index (``reidx build-index``); returns its summary."""
        from reidx.indexers.build import build_index

        summary = build_index(self.path, **options)
        self._index = None
        return summary

    def search(self, vectors, k: int = 100, nprobe: int | None = None):
        """Top-k gallery detections of each vector → Arrow table (``query`` row number, ``rank``,
        ``cosine_distance`` and the detection's columns, as ``reidx query`` writes them)."""
        import numpy as np
        import pyarrow as pa

        from reidx.indexers.query import search_candidates

        vectors = np.atleast_2d(np.asarray(vectors, np.float32))
        distances, ids = search_candidates(self.index, vectors, k, nprobe)
        valid = ids >= 0
        rows = np.repeat(np.arange(len(vectors)), valid.sum(axis=1))
        ranks = np.concatenate([np.arange(1, n + 1) for n in valid.sum(axis=1)]) if len(vectors) else np.zeros(0)
        table = self.index.items.take(pa.array(ids[valid])).drop_columns(["faiss_id"])
        table = table.append_column("cosine_distance", pa.array(distances[valid], pa.float32()))
        return table.add_column(0, "query", pa.array(rows, pa.int64())).add_column(1, "rank", pa.array(ranks, pa.int32()))

    def query(self, images: Sequence[str], *, top_k: int = 100, detect: bool = False, rerank: str = "none",
              rerank_preset: str = "adaptive", k1: int | None = None, k2: int | None = None,
              lambda_value: float | None = None, group_by: str | Sequence[str] | None = None, fusion: str = "mean",
              since=None, until=None, cameras: Sequence[str] = (), exclude_same_camera: bool = False,
              exclude_self: bool = False, min_score: float | None = None, **options):
        """Every person in ``images`` (files, folders, globs, manifests) searched and optionally re-ranked →
        Arrow table in the query-results schema (``reidx query``).

        ``group_by`` (``"person_id"``, ``"folder"``, ``"input"``, ``"camera"`` or several) searches
        several images of one person as one query, fused by ``fusion`` (``mean`` or ``min``).
        ``since``/``until`` (datetime or ISO text), ``cameras``, ``exclude_same_camera``,
        ``exclude_self``, ``min_score`` filter the gallery inside the search (docs/query.md).
        ``rerank``, ``rerank_preset`` (``adaptive``, the default; ``safe``; ``published``), ``k1``,
        ``k2``, ``lambda_value`` are ``reidx query``'s --rerank, --rerank-preset, --k1, --k2, --lambda
        (docs/reranking.md).
        """
        from datetime import datetime

        from reidx.indexers.filters import SearchFilter, parse_time
        from reidx.indexers.query import query_gallery
        from reidx.indexers.query_groups import parse_group_by
        from reidx.indexers.rerank import params_from_options

        def when(value, option):
            return value if value is None or isinstance(value, datetime) else parse_time(str(value), option)

        keys = parse_group_by(group_by if group_by is None or isinstance(group_by, str) else ",".join(group_by))
        search_filter = SearchFilter(since=when(since, "since"), until=when(until, "until"), cameras=tuple(cameras),
                                     exclude_same_camera=exclude_same_camera, exclude_self=exclude_self,
                                     min_score=min_score)
        params = params_from_options(rerank, preset=rerank_preset, k1=k1, k2=k2, lambda_value=lambda_value)
        table, _ = query_gallery(self.index, [str(i) for i in images], top_k=top_k, detect=detect, rerank=rerank,
                                 rerank_params=params, search_filter=search_filter, group_by=keys, fusion=fusion,
                                 **options)
        return table


def trajectories(results, rank_max: int | None = None, distance_max: float | None = None):
    """Query results (``Gallery.query``) → each query's sightings as a time-ordered path (Arrow table,
    schema in docs/schemas.md); sightings: rank ≤ ``rank_max`` and distance ≤ ``distance_max``
    (defaults measured on Con-ReID, docs/query.md)."""
    from reidx.indexers.trajectory import DEFAULT_DISTANCE_MAX, DEFAULT_RANK_MAX
    from reidx.indexers.trajectory import trajectories as paths

    return paths(results, rank_max or DEFAULT_RANK_MAX, DEFAULT_DISTANCE_MAX if distance_max is None else distance_max)


def evaluate(query: Sequence[str], gallery: Sequence[str], weights: str = DEFAULT_WEIGHTS, rerank: str = "none",
             labels: str | None = None, rerank_preset: str = "adaptive", k1: int | None = None, k2: int | None = None,
             lambda_value: float | None = None, **embedder_options) -> dict:
    """Market-1501 metrics (percent) of ``weights`` on a labelled split (``reidx evaluate``); the
    re-ranking options as in ``Gallery.query``."""
    from reidx.indexers.evaluation import evaluate_split
    from reidx.indexers.rerank import params_from_options
    from reidx.pipeline.labelled_split import embed_side, is_embedded_table

    embedder = None
    if not (is_embedded_table(list(query)) and is_embedded_table(list(gallery))):
        embedder = Embedder(weights, **embedder_options).model
    sides = [embed_side(list(side), embedder, labels) for side in (query, gallery)]
    params = params_from_options(rerank, preset=rerank_preset, k1=k1, k2=k2, lambda_value=lambda_value)
    return evaluate_split(*sides, rerank, params).as_percent_dict()
