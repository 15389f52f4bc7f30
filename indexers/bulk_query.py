"""Bulk query across Dask workers: many query vectors split into chunks, each chunk searched by a
worker that opens the version's memory-mapped index itself (once per worker process).

The result equals :meth:`GalleryIndex.search` in one process: each query is searched on its
own by the same index files with the same nprobe, whichever worker runs it.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from reidx.indexers.build_tasks import search_queries
from reidx.indexers.distributed import Executor

CHUNK = 8192  # queries per task


def bulk_search(gallery_index, vectors: np.ndarray, k: int, nprobe: int | None = None, workers: int | None = None,
                scheduler: str | None = None, executor: Executor | None = None,
                chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """(cosine distances (Q, k), ids (Q, k)) of every vector, the chunks run on the cluster
    (``executor``, or one made from ``workers``/``scheduler``; neither: in this process)."""
    if gallery_index.meta.layout < 2:
        return gallery_index.search(vectors, k, nprobe)
    layout = asdict(gallery_index.meta)
    calls = [{"folder": str(gallery_index.folder), "layout": layout, "vectors": np.ascontiguousarray(vectors[a:a + chunk]),
              "k": k, "nprobe": nprobe} for a in range(0, len(vectors), chunk)]
    if executor is None:
        with Executor(workers, scheduler) as own:
            results = own.map(search_queries, calls)
    else:
        results = executor.map(search_queries, calls)
    if not results:
        width = min(k, gallery_index.count)
        return np.zeros((0, width), np.float32), np.zeros((0, width), np.int64)
    return np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results])
