"""The nightly indexing job (driver side): manifests → Dask batches → shards → ledger.

The driver holds the gallery lock, cleans what a crashed run left (:func:`pipeline.ledger.recover`),
lists every source, skips images the ledger already holds, and sends batches to Dask workers
(a local cluster of worker *processes* by default, or an existing scheduler). A worker writes
its shard durably and returns one ledger record per image; the driver commits those records
only then. So a kill of the driver or of a worker at any moment loses nothing and duplicates
nothing: rerunning the command finishes the job.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from pathlib import Path

from reidx.pipeline.ledger import append, ledger_rows, processed_keys, recover
from reidx.pipeline.lock import GalleryLock
from reidx.pipeline.manifest import load_manifest
from reidx.pipeline.models.weights import resolve_weights
from reidx.pipeline.sources import SourceError, list_source
from reidx.pipeline.worker import DEFAULT_DETECTOR, ModelSpec, process_batch

GALLERY_CONFIG = "gallery.json"


def _check_gallery_embedder(gallery: Path, weights: str) -> dict:
    """A gallery holds one embedder's vectors; another one is an error, not a silent mix."""
    resolved = resolve_weights(weights)
    # "weights" is how to find the model again (`reidx query` embeds with it): a known name, or the file's path
    spec = str(resolved.path) if resolved.known is None else resolved.known.name
    # "detector": what frames sources were detected with, so `reidx query --detect` uses the same
    config = {"embedder": resolved.model_name, "weights_sha256": resolved.sha256, "weights": spec,
              "detector": DEFAULT_DETECTOR}
    path = gallery / GALLERY_CONFIG
    if path.exists():
        existing = json.loads(path.read_text())
        if existing.get("weights_sha256") != resolved.sha256:
            raise ValueError(f"{gallery} holds embeddings of {existing.get('embedder')} "
                             f"({existing.get('weights_sha256', '?')[:12]}); --weights {weights} is another model")
        return existing
    path.write_text(json.dumps(config, indent=2))
    return config


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
              batch_size: int = 256, max_pixels: int = 50_000_000, progress: bool = False, log=print) -> dict:
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
        config = _check_gallery_embedder(gallery, weights)
        done = processed_keys(gallery)
        summary = {"gallery": str(gallery), "embedder": config["embedder"], "images_seen": 0, "images_new": 0,
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
            summary["images_seen"] += len(listing.members) + len(listing.rejected)
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
