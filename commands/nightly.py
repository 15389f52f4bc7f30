"""The nightly job's commands: index, nightly, build-index, ledger, verify."""

from __future__ import annotations

import sys
import time

import click

from reidx.commands.common import (_emit, _log, _progress, _summary_line, index_build_cluster_options,
                                   index_build_options, index_job_options, json_option, log_every_option,
                                   log_file_option)


def _index_text(r: dict):
    yield (f"images {r['images']}: new {r['images_new']}, skipped (already indexed) {r['images_skipped']}, "
           f"failed {r['images_failed']}")
    if r.get("videos"):
        yield (f"videos {r['videos']}: segments new {r['video_segments_new']}, failed {r['video_segments_failed']}; "
               f"videos skipped (nothing left to do) {r['videos_skipped']}; frames decoded {r['video_frames']}")
    for reason, count in sorted(r["failed_by_reason"].items()):
        yield f"  failed: {count} × {reason}"
    for name, reason in r["sources_failed"].items():
        yield f"  source {name} not indexed: {reason}"
    yield f"persons {r['persons']}, {r['wall_s']} s, {r['images_per_s']} images/s"


def _run_index(manifests, gallery, weights, backend, device, max_pixels, task_size, workers, scheduler,
               retry_failed, embedding_dtype, allow_uri_change, log_every_s) -> dict:
    if scheduler and workers:
        raise click.UsageError("--scheduler and --workers exclude each other")
    from reidx.pipeline.job import run_index

    return run_index(list(manifests), gallery, weights=weights, backend=backend, device=device, workers=workers,
                     scheduler=scheduler, batch_size=task_size, max_pixels=max_pixels, progress=_progress(), log=_log,
                     retry_failed=retry_failed, embedding_dtype=embedding_dtype, allow_uri_change=allow_uri_change,
                     log_every_s=log_every_s)


def _night_status(summary: dict, strict: bool) -> int:
    from reidx.pipeline.job import exit_code

    code = exit_code(summary, strict)
    for name, reason in summary["sources_failed"].items():
        click.echo(f"Error: source {name} failed: {reason}", err=True)
    return code


@click.command()
@click.argument("manifests", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@index_job_options
@log_file_option
@log_every_option
@json_option
def index(manifests, gallery, weights, backend, device, max_pixels, task_size, workers, scheduler, retry_failed,
          embedding_dtype, allow_uri_change, strict, log_every_s, as_json):
    """Index the images of MANIFEST(s) into a gallery: the nightly job.

    Lists every source, skips images the gallery's ledger already holds, and runs batches on
    Dask workers that read, decode, detect (frames), embed and write Parquet shards. Safe to kill
    and rerun: the rerun finishes the job with no image lost or counted twice. Failures (corrupt
    images, unsafe archive members, missing sources) are recorded with their reason; see `reidx ledger`.
    """
    summary = _run_index(manifests, gallery, weights, backend, device, max_pixels, task_size, workers, scheduler,
                         retry_failed, embedding_dtype, allow_uri_change, log_every_s)
    _emit(summary, as_json, _index_text)
    _summary_line("index", summary)
    sys.exit(_night_status(summary, strict))


@click.command()
@click.argument("gallery", type=click.Path(exists=True, file_okay=False))
@click.option("--failed", is_flag=True, help="List only failed images and video segments, with their reasons.")
@json_option
def ledger(gallery, failed, as_json):
    """Show what a gallery's ledger records (each image's or video segment's latest outcome): counts of
    images, videos and segments, or failures with --failed."""
    import pyarrow.compute as pc

    from reidx.pipeline.ledger import latest, ledger_counts

    if failed:
        table = latest(gallery)
        table = table.filter(pc.equal(table["status"], "failed"))
        failures = [{"image_key": k, "reason": r} for k, r in zip(table["image_key"].to_pylist(),
                                                                 table["reason"].to_pylist())]
        _emit({"gallery": str(gallery), "failures": failures}, as_json,
              lambda r: (f"{f['image_key']}\t{f['reason']}" for f in r["failures"]))
        return
    report = {"gallery": str(gallery), **ledger_counts(gallery)}
    _emit(report, as_json, lambda r: [_ledger_text(r)])


def _ledger_text(r: dict) -> str:
    images = f"{r['images']} images: {r['images_ok']} ok, {r['images_failed']} failed; "
    if not r["videos"]:
        return images + f"{r['persons']} persons"
    broken = f" ({r['videos_failed']} broken)" if r["videos_failed"] else ""
    return ((images if r["images"] else "") + f"{r['videos']} video{'s' * (r['videos'] != 1)}{broken} in "
            f"{r['video_segments']} segment{'s' * (r['video_segments'] != 1)}: {r['video_segments_ok']} ok, "
            f"{r['video_segments_failed']} failed; {r['persons']} persons")


# the person detector's options (reidx detect, evaluate-detections); defaults measured: docs/detection.md


@click.command()
@click.argument("gallery", type=click.Path(exists=True, file_okay=False))
@click.option("--repair", is_flag=True,
              help="Send the images of damaged shards back to work (next `reidx index`), move damaged files to "
                   "GALLERY/quarantine/, drop a damaged live index (next `reidx build-index` rebuilds).")
@json_option
def verify(gallery, repair, as_json):
    """Check GALLERY: every committed shard against its recorded checksum and rows (and its
    embeddings finite and unit length), every ledger part readable, the live index's files.

    Exit status 0 when all is well (or was repaired), 2 when damage was found and left as it is.
    """
    from reidx.pipeline.gallery import index_dir
    from reidx.pipeline.integrity import is_clean, repair_gallery, verify_gallery
    from reidx.pipeline.lock import GalleryLock

    started = time.perf_counter()
    with GalleryLock(gallery), GalleryLock(index_dir(gallery)):  # no job writes while we look or mend
        report = verify_gallery(gallery)
        clean = is_clean(report)
        if repair and not clean:
            report["repaired"] = repair_gallery(gallery, report)
    report.update(clean=clean, wall_s=round(time.perf_counter() - started, 2))

    def text(r):
        yield f"{r['shards_checked']} committed shards checked: {len(r['damaged_shards'])} damaged"
        for name, problem in r["damaged_shards"].items():
            yield f"  shard {name}: {problem}"
        for part in r["ledger_parts_unreadable"]:
            yield f"  ledger part {part['part']}: unreadable: {part['reason']}"
        if r["index"] and r["index"]["problem"]:
            yield f"  index {r['index']['version']}: {r['index']['problem']}"
        if "repaired" in r:
            done = r["repaired"]
            yield (f"repaired: {done['images_requeued']} images requeued, {len(done['quarantined'])} files moved to "
                   f"quarantine/" + (f", index {done['index_removed']} removed" if done["index_removed"] else ""))
        elif not r["clean"]:
            yield f"run `reidx verify {gallery} --repair` to mend"
    _emit(report, as_json, text)
    sys.exit(0 if clean or repair else 2)


# --- retrieval: index, query, export ---------------------------------------------------------------

def _build_text(r: dict):
    if r["mode"] == "unchanged":
        yield f"index {r['index_version']} is up to date: {r['persons']} detections ({r['index_type']})"
        return
    line = f"{r['mode']} build {r['index_version']}: {r['persons']} detections in {r['index_type']}"
    if r.get("nprobe"):
        breadth = f"efSearch {r['nprobe']}" if r["index_type"] == "hnsw" else f"nlist {r['nlist']}, nprobe {r['nprobe']}"
        line += (f" ({breadth}: recall@10 {r['recall_at_10']:.3f}, "
                 f"recall@100 {r['recall_at_100']:.3f})")
    yield line + f", {r['wall_s']} s" + (f" — {r['reason']}" if r.get("reason") else "")


def _build_index(gallery, index_type, nlist, gpu, knn_k, rebuild, memory_budget=None, workers=None,
                 scheduler=None) -> dict:
    if scheduler and workers:
        raise click.UsageError("--scheduler and --workers exclude each other")
    from reidx.indexers.build import build_index

    return build_index(gallery, index_type=index_type, nlist=nlist, gpu=gpu, knn_k=knn_k, rebuild=rebuild,
                       memory_budget=memory_budget, workers=workers, scheduler=scheduler, log=_log)


@click.command("build-index")
@click.argument("gallery", type=click.Path(exists=True, file_okay=False))
@index_build_options
@index_build_cluster_options
@log_file_option
@json_option
def build_index_command(gallery, index_type, nlist, memory_budget, gpu, knn_k, rebuild, workers, scheduler, as_json):
    """Build or update GALLERY's Faiss index (and its kNN graph) from its committed shards.

    Cosine similarity (inner product on unit vectors). IVF indexes are trained on a sample and
    get a default nprobe measured to give recall@100 ≥ 0.95 on the gallery's own vectors (an
    hnsw index, when asked for, gets its efSearch the same way; it is held in RAM). A
    rerun adds only new shards (O(new): a delta file, their kNN rows, reverse edges into old
    rows); it retrains when the gallery has doubled since training. Out of core: vectors stream
    from the shards, inverted lists stay on disk (memory-mapped). The new version replaces the
    old one atomically: running queries are never disturbed.
    """
    summary = _build_index(gallery, index_type, nlist, gpu, knn_k, rebuild, memory_budget, workers, scheduler)
    _emit(summary, as_json, _build_text)
    _summary_line("build-index", summary)


@click.command()
@click.argument("manifests", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@index_job_options
@index_build_options
@log_file_option
@log_every_option
@json_option
def nightly(manifests, gallery, weights, backend, device, max_pixels, task_size, workers, scheduler, retry_failed,
            embedding_dtype, allow_uri_change, strict, index_type, nlist, memory_budget, gpu, knn_k, rebuild, log_every_s, as_json):
    """The nightly run: `reidx index` the manifests, then `reidx build-index` the gallery.

    Takes every option of both. Both steps are incremental and safe to rerun after a crash. The
    index is built whenever the gallery holds committed shards, even when some inputs or sources
    failed; the exit status then says so (2 or 3).
    """
    from reidx.pipeline.ledger import committed_shards

    started = time.perf_counter()
    indexed = _run_index(manifests, gallery, weights, backend, device, max_pixels, task_size, workers, scheduler,
                         retry_failed, embedding_dtype, allow_uri_change, log_every_s)
    built = (_build_index(gallery, index_type, nlist, gpu, knn_k, rebuild, memory_budget, workers, scheduler)
             if committed_shards(gallery) else None)
    report = {"index": indexed, "build_index": built, "wall_s": round(time.perf_counter() - started, 2)}
    _emit(report, as_json, lambda r: [*_index_text(r["index"]),
                                      *(_build_text(built) if built else ["no committed detections yet: no index"])])
    _summary_line("nightly", report)
    sys.exit(_night_status(indexed, strict))
