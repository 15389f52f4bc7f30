"""Run index-build and bulk-query tasks on a Dask cluster, or in this process.

``--workers N`` starts a local cluster of N single-threaded worker processes; ``--scheduler
ADDRESS`` uses an existing cluster (several machines: every worker must see the gallery at the
same path, e.g. a shared filesystem); neither runs the same task functions here, one after
the other. Tasks are plain functions of paths and small arrays that write their outputs to
files (:mod:`reidx.indexers.build_tasks`), so results do not depend on where they ran: the
driver merges the files in task order.
"""

from __future__ import annotations

import logging


class Executor:
    """``map(fn, kwargs_list)`` → results in input order; ``workers`` says how many run at once."""

    def __init__(self, workers: int | None = None, scheduler: str | None = None):
        self.client = self.cluster = None
        self.workers = 1
        if scheduler or workers:
            from dask.distributed import Client, LocalCluster

            if scheduler:
                self.client = Client(scheduler)
            else:
                self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                            dashboard_address=":0", silence_logs=logging.ERROR)
                self.client = Client(self.cluster)
            self.workers = max(1, len(self.client.scheduler_info()["workers"]))

    @property
    def distributed(self) -> bool:
        return self.client is not None

    def map(self, fn, calls: list[dict]) -> list:
        if self.client is None:
            return [fn(**kwargs) for kwargs in calls]
        futures = [self.client.submit(fn, pure=False, **kwargs) for kwargs in calls]
        try:
            return self.client.gather(futures)
        finally:
            for future in futures:
                future.release()

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def worker_threads() -> None:
    """Inside a Dask worker, let Faiss use that worker's threads only (2 workers × 2 OpenMP threads
    on 2 cores would fight); in the driver process leave Faiss' default."""
    try:
        from dask.distributed import get_worker

        threads = get_worker().state.nthreads
    except (ImportError, ValueError):
        return
    import faiss

    faiss.omp_set_num_threads(max(1, int(threads)))


def split_rows(count: int, pieces: int, minimum: int = 1) -> list[tuple[int, int]]:
    """[start, stop) ranges covering 0..count-1 in about ``pieces`` equal runs of at least ``minimum``."""
    pieces = max(1, min(pieces, count // max(1, minimum) or 1))
    bounds = [count * i // pieces for i in range(pieces + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
