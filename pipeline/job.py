"""The nightly indexing job (driver side): manifests → Dask batches → shards → ledger.

The driver holds the gallery lock, cleans what a crashed run left (:func:`pipeline.ledger.recover`),
lists every source, skips images the ledger already holds, and sends batches to Dask workers
(a local cluster of worker *processes* by default, or an existing scheduler). A worker writes
its shard durably and returns one ledger record per image; the driver commits those records
only then. So a kill of the driver or of a worker at any moment loses nothing and duplicates
nothing: rerunning the command finishes the job.

Videos (``kind = "video"`` sources) go by segments, one ledger entry each
(:mod:`reidx.pipeline.video_job`): the driver sends a video's first segment not yet done, commits
it when its shard and tracker state are written, then sends the next one to the same worker
(which kept the video open there). At most one video per worker is in flight, so open videos
stay few; image batches fill the rest.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import Counter
from pathlib import Path

from reidx.pipeline.gallery import check_or_write_config, ledger_dir, register_sources, shards_dir
from reidx.pipeline.imaging import DEFAULT_MAX_PIXELS
from reidx.pipeline.ledger import append, failed_keys_count, latest, ledger_rows, processed_keys, recover
from reidx.pipeline.lock import GalleryLock
from reidx.pipeline.manifest import ManifestError, load_manifest
from reidx.pipeline.persons import ModelSpec
from reidx.pipeline.progress import Progress
from reidx.pipeline.shards import image_key
from reidx.pipeline.sources import ARCHIVE_REST, SourceError, list_source
from reidx.pipeline.video_job import VideoChain, video_entries
from reidx.pipeline.video_persons import segment_key
from reidx.pipeline.worker import process_batch, process_video_segment

EXIT_INPUTS_FAILED, EXIT_SOURCE_FAILED = 2, 3


def default_workers() -> int:
    """One single-threaded worker process per core: on 2 cores 2×1 indexed 1.98× faster than
    1×2 threads (benchmarks/index.py), since decoding and small-batch inference parallelise
    better across processes than inside one."""
    return max(1, os.cpu_count() or 1)


def _client(scheduler: str | None, workers: int):
    """A client of the given scheduler, or of a local cluster of worker processes.

    The local workers are started with SIGINT ignored (they inherit it): Ctrl-C in a terminal
    reaches the whole process group, and only the driver should answer it — by closing the
    cluster — instead of every worker printing a traceback.
    """
    from dask.distributed import Client, LocalCluster

    if scheduler:
        return Client(scheduler), None
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                               silence_logs=logging.ERROR)
    finally:
        signal.signal(signal.SIGINT, previous)
    return Client(cluster), cluster


class JobInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the job; ``summary`` says what was committed before it (all kept)."""

    def __init__(self, summary: dict):
        super().__init__("interrupted")
        self.summary = summary


def exit_code(summary: dict, strict: bool = False) -> int:
    """The night's status for a monitor: 0 all good, 2 some inputs failed, 3 a source failed.

    ``strict`` also counts images whose latest ledger outcome is a failure from an earlier night."""
    if summary["sources_failed"]:
        return EXIT_SOURCE_FAILED
    if summary["images_failed"] or summary.get("video_segments_failed") or (
            strict and summary.get("images_failed_in_ledger")):
        return EXIT_INPUTS_FAILED
    return 0


def run_index(manifests: list[str | os.PathLike], gallery: str | os.PathLike, *, weights: str, backend: str = "auto",
              device: str = "auto", workers: int | None = None, scheduler: str | None = None,
              batch_size: int = 256, max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = False, log=print,
              allow_uri_change: bool = False, retry_failed: bool = False, log_every_s: float = 30.0,
              embedding_dtype: str | None = None) -> dict:
    """Index the manifests' images into ``gallery``; returns the run summary (JSON-able).

    Raises :class:`JobInterrupted` on Ctrl-C/SIGTERM after closing the cluster (the lock is released).
    """
    started = time.perf_counter()
    gallery = Path(gallery)
    sources = unique_sources([load_manifest(m) for m in manifests])
    gallery.mkdir(parents=True, exist_ok=True)
    with GalleryLock(gallery) as lock:
        if lock.took_over:
            log(f"the previous job ({lock.took_over}) died holding the gallery; recovering")
        recovered = recover(gallery)
        config = check_or_write_config(gallery, weights, embedding_dtype)
        register_sources(gallery, {s.name: s.uri for s in sources}, allow_uri_change)
        for folder in (shards_dir(gallery), ledger_dir(gallery)):
            folder.mkdir(exist_ok=True)  # a gallery exists from its first night, even one whose sources all failed
        summary = {"gallery": str(gallery), "embedder": config["embedder"], "images": 0, "images_new": 0,
                   "images_skipped": 0, "images_failed": 0, "images_retried": 0, "failed_by_reason": Counter(),
                   "persons": 0, "sources_failed": {}, "recovered": recovered, "stage_seconds": Counter(),
                   "videos": 0, "videos_skipped": 0, "video_segments_new": 0, "video_segments_failed": 0,
                   "video_frames": 0, "video_segments_reopened": 0}
        summary["images_requeued"] = requeue_missing_shards(gallery, log)
        done = processed_keys(gallery, retry_failed)
        fingerprints: dict[str, str] = {}
        tasks, chains = _plan(gallery, sources, done, batch_size, summary, fingerprints, retry_failed)
        total = sum(len(members) for _, members in tasks) + len(chains)
        if total:
            # never more local workers than units of work (a small night starts one, with all cores)
            workers = workers or min(default_workers(), len(tasks) + len(chains))
            spec = ModelSpec(weights, backend, device, threads=max(1, (os.cpu_count() or 1) // workers),
                             max_pixels=max_pixels)
            _run_tasks(gallery, tasks, spec, scheduler, workers, summary, total, progress, log, log_every_s,
                       fingerprints, chains, retry_failed)
            recover(gallery)  # shards of tasks that a killed worker wrote but never reported
        summary["images_failed_in_ledger"] = failed_keys_count(gallery)
    wall = time.perf_counter() - started
    summary["failed_by_reason"] = dict(summary["failed_by_reason"])
    summary["stage_seconds"] = {k: round(v, 2) for k, v in summary["stage_seconds"].items()}
    summary["wall_s"] = round(wall, 2)
    summary["images_per_s"] = round(summary["images_new"] / wall, 1) if wall else 0.0
    return summary


def unique_sources(manifests: list) -> list:
    """All sources of a run; a name used twice (in one or several manifests) is an error, not two sources."""
    sources, seen = [], {}
    for manifest in manifests:
        for source in manifest.sources:
            if source.name in seen:
                raise ManifestError(f"{manifest.path}: source name {source.name!r} is also used in {seen[source.name]}; "
                                    f"source names must be unique in a gallery")
            seen[source.name] = manifest.path
            sources.append(source)
    return sources


def requeue_missing_shards(gallery: Path, log) -> int:
    """Images whose shard vanished from disk go back to work (with a ledger row saying why), never skipped."""
    table = latest(gallery)
    rows = [{"image_key": key, "source": source, "member": member, "status": "requeued",
             "reason": f"shard {shard} missing from disk"}
            for key, source, member, status, shard in zip(*(table[c].to_pylist() for c in
                                                            ("image_key", "source", "member", "status", "shard")))
            if status == "ok" and shard and not (shards_dir(gallery) / shard).exists()]
    if rows:
        append(gallery, ledger_rows(rows))
        log(f"{len(rows)} images are indexed again: their shards are missing from disk")
    return len(rows)


def _todo(source, listing, done: dict, summary: dict) -> list[str]:
    """Members to process: new ones, and failures whose bytes changed since (fingerprint)."""
    fingerprints = listing.fingerprints
    todo = []
    for member in listing.members:
        key = image_key(source.name, member)
        if key not in done:
            todo.append(member)
        elif done[key] is not None and done[key] != fingerprints.get(member, done[key]):
            todo.append(member)  # it failed, and its bytes changed since (replaced, finished uploading)
            summary["images_retried"] += 1
    return todo


def _plan(gallery: Path, sources: list, done: dict, batch_size: int, summary: dict, fingerprints: dict,
          retry_failed: bool = False) -> tuple[list, list]:
    """List every source, commit the refusals, return the (source, members) image tasks still to do
    and the videos with a segment to do, each as a (:class:`VideoChain`, its next segment).

    ``fingerprints`` receives each listed image's fingerprint by image key, for its ledger row."""
    tasks, refused, chains = [], [], []
    entries = video_entries(latest(gallery)) if any(s.kind == "video" for s in sources) else {}
    for source in sources:
        try:
            listing = list_source(source)
            if not listing.members and not listing.rejected:
                raise SourceError(f"source {source.name} ({source.uri}) lists no images: is it mounted?")
        except SourceError as exc:
            summary["sources_failed"][source.name] = str(exc)
            refused.append({"image_key": f"{source.name}/", "source": source.name, "member": "",
                            "status": "failed", "reason": str(exc)})
            continue
        if source.kind == "video":
            refused += _plan_videos(source, listing, done, entries, summary, chains, retry_failed)
            continue
        summary["images"] += len(listing.members) + len(listing.rejected)
        for member, fingerprint in listing.fingerprints.items():
            fingerprints[image_key(source.name, member)] = fingerprint
        for member, reason in listing.rejected:
            key = image_key(source.name, member)
            if key not in done:
                refused.append({"image_key": key, "source": source.name, "member": member, "status": "failed",
                                "reason": reason})
        todo = _todo(source, listing, done, summary)
        summary["images_skipped"] += len(listing.members) - len(todo)
        tasks += [(source, todo[i:i + batch_size]) for i in range(0, len(todo), batch_size)]
    _commit(gallery, refused, summary, fingerprints)
    return tasks, chains


def _plan_videos(source, listing, done: dict, entries: dict, summary: dict, chains: list, retry_failed: bool) -> list:
    """A video source's videos with work left (into ``chains``); returns the refusals to record.

    A refused video (unsafe or oversized archive member) is recorded as its first segment failing."""
    refused = []
    summary["videos"] += len(listing.members) + len(listing.rejected)
    for member, reason in listing.rejected:
        key = image_key(source.name, member)
        key = key if member == ARCHIVE_REST else segment_key(key, 0)
        if key not in done:
            refused.append({"image_key": key, "source": source.name, "member": member, "status": "failed",
                            "reason": reason, "fingerprint": listing.fingerprints.get(member), "frame_start": 0,
                            "frame_stop": 0, "video_end": True, "video": True})
    for member in listing.members:
        chain = VideoChain(source, member, listing.fingerprints.get(member))
        segment = chain.next_segment(entries, retry_failed)
        if segment is None:
            summary["videos_skipped"] += 1
        else:
            chains.append((chain, segment))
    return refused


def _run_tasks(gallery: Path, tasks: list, spec: ModelSpec, scheduler: str | None, workers: int, summary: dict,
               total: int, progress: bool, log, log_every_s: float, fingerprints: dict, chains: list = (),
               retry_failed: bool = False) -> None:
    """Send the tasks to Dask workers; commit each task's ledger rows as its shard is reported written.

    Videos go segment by segment, at most one per worker at a time: a segment's commit sends the
    video's next segment to the worker that ran it (loosely: another one if that worker is gone)."""
    from dask.distributed import as_completed

    client, cluster = _client(scheduler, workers)
    meter = Progress(total, "index", bar=progress, every_s=log_every_s)
    try:
        if client.dashboard_link:
            log(f"Dask dashboard: {client.dashboard_link}")
        futures = [client.submit(process_batch, str(gallery), source, members, spec, pure=False)
                   for source, members in tasks]
        videos = {}  # video segment future -> its chain
        waiting = list(reversed(chains))
        entries = video_entries(latest(gallery)) if chains else {}
        slots = workers if scheduler is None else max(1, len(client.scheduler_info().get("workers", {})))

        def send(chain, segment, worker=None) -> None:
            first, state = segment
            restrict = {"workers": [worker], "allow_other_workers": True} if worker else {}
            future = client.submit(process_video_segment, str(gallery), chain.source, chain.member, first, state,
                                   chain.fingerprint, spec, pure=False, priority=1, **restrict)
            videos[future] = chain
            pending.add(future)

        pending = as_completed(futures)
        while waiting and len(videos) < slots:
            send(*waiting.pop())
        for future in pending:
            result = future.result()
            _commit(gallery, result["records"], summary, fingerprints)
            summary["stage_seconds"].update(result["seconds"])
            chain = videos.pop(future, None)
            if chain is None:
                meter.update(len(result["records"]), persons=summary["persons"], failed=summary["images_failed"])
                continue
            summary["video_frames"] += result["frames"]
            summary["video_segments_reopened"] += result["reopened"]  # decoded from the video's start again
            for record in result["records"]:
                entries[record["image_key"]] = {c: record.get(c) for c in
                                                ("status", "frame_stop", "video_end", "tracks_state", "fingerprint")}
            segment = chain.next_segment(entries, retry_failed)
            if segment is not None:
                send(chain, segment, result["worker"])
                continue
            meter.update(1, persons=summary["persons"], failed=summary["images_failed"])
            if waiting:
                send(*waiting.pop())
        meter.close()
    except KeyboardInterrupt:
        logging.getLogger("distributed").setLevel(logging.CRITICAL)  # no shutdown tracebacks from Dask
        raise JobInterrupted(summary) from None
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _commit(gallery: Path, records: list[dict], summary: dict, fingerprints: dict) -> None:
    """Append ledger rows (the commit point) and count them into the summary."""
    if not records:
        return
    for record in records:
        record.setdefault("fingerprint", fingerprints.get(record["image_key"]))
    append(gallery, ledger_rows(records))
    for record in records:
        if record.get("video"):  # a video segment (or a refused video)
            summary["video_segments_new"] += 1
            summary["persons"] += record.get("num_persons") or 0
            if record["status"] == "failed":
                summary["video_segments_failed"] += 1  # counted by kind, without the frame where it broke
                summary["failed_by_reason"][record["reason"].split(" at frame")[0].split(":")[0]] += 1
            continue
        if not record["member"]:
            continue  # a whole-source failure, counted in sources_failed
        summary["images_new"] += 1
        summary["persons"] += record.get("num_persons") or 0
        if record["status"] == "failed":
            summary["images_failed"] += 1
            summary["failed_by_reason"][record["reason"].split(":")[0]] += 1
