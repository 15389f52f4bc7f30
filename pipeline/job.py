"""The nightly indexing job (driver side): manifests → Dask batches → shards → ledger.

The driver holds the gallery lock, cleans what a crashed run left (:func:`pipeline.ledger.recover`),
lists every source, skips images the ledger already holds, and sends batches to Dask workers
(a local cluster of worker *processes* by default, or an existing scheduler). A worker writes
its shard durably and returns one ledger record per image; the driver commits those records
only then. So a kill of the driver or of a worker at any moment loses nothing and duplicates
nothing: rerunning the command finishes the job.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from pathlib import Path

from reidx.pipeline.gallery import check_or_write_config
from reidx.pipeline.imaging import DEFAULT_MAX_PIXELS
from reidx.pipeline.ledger import append, ledger_rows, processed_keys, recover
from reidx.pipeline.lock import GalleryLock
from reidx.pipeline.manifest import load_manifest
from reidx.pipeline.persons import ModelSpec
from reidx.pipeline.sources import SourceError, list_source
from reidx.pipeline.worker import process_batch


def default_workers() -> int:
    """One single-threaded worker process per core: on 2 cores 2×1 indexed 1.98× faster than
    1×2 threads (benchmarks/index.py), since decoding and small-batch inference parallelise
    better across processes than inside one."""
    return max(1, os.cpu_count() or 1)


def _client(scheduler: str | None, workers: int):
    from dask.distributed import Client, LocalCluster

    if scheduler:
        return Client(scheduler), None
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                           silence_logs=logging.ERROR)
    return Client(cluster), cluster


def run_index(manifests: list[str | os.PathLike], gallery: str | os.PathLike, *, weights: str, backend: str = "auto",
              device: str = "auto", workers: int | None = None, scheduler: str | None = None,
              batch_size: int = 256, max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = False, log=print) -> dict:
    """Index the manifests' images into ``gallery``; returns the run summary (JSON-able)."""
    from dask.distributed import as_completed
    from tqdm import tqdm

    started = time.perf_counter()
    gallery = Path(gallery)
    loaded = [load_manifest(m) for m in manifests]
    gallery.mkdir(parents=True, exist_ok=True)
    with GalleryLock(gallery) as lock:
        if lock.took_over:
            log(f"took over a stale lock left by {lock.took_over}")
        recovered = recover(gallery)
        config = check_or_write_config(gallery, weights)
        done = processed_keys(gallery)
        summary = {"gallery": str(gallery), "embedder": config["embedder"], "images": 0, "images_new": 0,
                   "images_skipped": 0, "images_failed": 0, "failed_by_reason": Counter(), "persons": 0,
                   "sources_failed": {}, "recovered": recovered, "stage_seconds": Counter()}
        tasks, refused = [], []
        for source in (s for m in loaded for s in m.sources):
            try:
                listing = list_source(source)
            except SourceError as exc:
                summary["sources_failed"][source.name] = str(exc)
                refused.append({"image_key": f"{source.name}/", "source": source.name, "member": "",
                                "status": "failed", "reason": str(exc)})
                continue
            summary["images"] += len(listing.members) + len(listing.rejected)
            for member, reason in listing.rejected:
                key = f"{source.name}/{member}"
                if key not in done:
                    refused.append({"image_key": key, "source": source.name, "member": member, "status": "failed",
                                    "reason": reason})
            todo = [m for m in listing.members if f"{source.name}/{m}" not in done]
            summary["images_skipped"] += len(listing.members) - len(todo)
            tasks += [(source, todo[i:i + batch_size]) for i in range(0, len(todo), batch_size)]
        _commit(gallery, refused, summary)

        total = sum(len(members) for _, members in tasks)
        if total:
            workers = workers or default_workers()
            spec = ModelSpec(weights, backend, device, threads=max(1, (os.cpu_count() or 1) // workers),
                             max_pixels=max_pixels)
            client, cluster = _client(scheduler, workers)
            try:
                if client.dashboard_link:
                    log(f"Dask dashboard: {client.dashboard_link}")
                futures = [client.submit(process_batch, str(gallery), source, members, spec, pure=False)
                           for source, members in tasks]
                bar = tqdm(total=total, unit="img", desc="index", disable=not progress)
                for future in as_completed(futures):
                    result = future.result()
                    records = result["records"]
                    _commit(gallery, records, summary)
                    summary["stage_seconds"].update(result["seconds"])
                    bar.update(len(records))
                    bar.set_postfix(persons=summary["persons"], failed=summary["images_failed"])
                bar.close()
            finally:
                client.close()
                if cluster is not None:
                    cluster.close()
            recover(gallery)  # shards of tasks that a killed worker wrote but never reported
    wall = time.perf_counter() - started
    summary["failed_by_reason"] = dict(summary["failed_by_reason"])
    summary["stage_seconds"] = {k: round(v, 2) for k, v in summary["stage_seconds"].items()}
    summary["wall_s"] = round(wall, 2)
    summary["images_per_s"] = round(summary["images_new"] / wall, 1) if wall else 0.0
    return summary


def _commit(gallery: Path, records: list[dict], summary: dict) -> None:
    """Append ledger rows (the commit point) and count them into the summary."""
    if not records:
        return
    append(gallery, ledger_rows(records))
    for record in records:
        if not record["member"]:
            continue  # a whole-source failure, counted in sources_failed
        summary["images_new"] += 1
        summary["persons"] += record.get("num_persons") or 0
        if record["status"] == "failed":
            summary["images_failed"] += 1
            summary["failed_by_reason"][record["reason"].split(":")[0]] += 1
