"""The ``reidx`` command line: a thin click layer over functions the tests call directly.

Every command has ``--help``; commands that report take ``--json`` and then print exactly one
JSON object on stdout (progress bars and warnings go to stderr). Errors the user can fix print
one ``Error: ...`` line and exit with status 1; set ``REIDX_DEBUG=1`` for the traceback.
"""

from __future__ import annotations

import json
import os
import sys

import click

DEFAULT_WEIGHTS = "osnet_x0_25_msmt17"


class ReidxGroup(click.Group):
    """Turns expected failures (bad paths, weights, labels) into one clear line instead of a traceback."""

    def invoke(self, ctx):
        from reidx.pipeline.datasets import DatasetError
        from reidx.pipeline.lock import GalleryLockedError
        from reidx.pipeline.models.weights import WeightsError

        try:
            return super().invoke(ctx)
        except (WeightsError, DatasetError, ValueError, ImportError, FileNotFoundError, GalleryLockedError) as exc:
            if os.environ.get("REIDX_DEBUG"):
                raise
            raise click.ClickException(str(exc)) from None


@click.group(cls=ReidxGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="reidx")
def main():
    """reidx: find people in large image archives and ask where else they appear.

    Weights are given by file path or known name (e.g. osnet_x0_25_msmt17); names are looked
    up in $REIDX_MODEL_DIR, then ~/.cache/reidx/models.
    """


# Options shared by every command that embeds crops, defined once so they read the same everywhere.
def embedder_options(func):
    options = [
        click.option("--weights", "-w", default=DEFAULT_WEIGHTS, show_default=True,
                     help="ReID weights: a file path or a known model name."),
        click.option("--backend", type=click.Choice(["auto", "torch", "onnx"]), default="auto", show_default=True,
                     help="auto: onnxruntime on CPU when installed (fastest there), else torch. "
                          "Both run the same weights; onnx needs the extra reidx[onnx]."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                     help="auto uses CUDA when torch sees a GPU."),
        click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
                     help="bf16 autocast is faster but less exact (see README: Speed)."),
        click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True,
                     help="Crops per forward pass."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


# Re-ranking options, shared by `evaluate` and `query` so both run the same code the same way.
def rerank_options(func):
    options = [
        click.option("--rerank", type=click.Choice(["none", "k-reciprocal", "sim", "sim-graph"]), default="none",
                     show_default=True, help="Re-rank the cosine ranking: k-reciprocal (Zhong et al. 2017), sim (Jia "
                                             "et al. 2020), sim-graph (SIM's graph reasoning alone)."),
        click.option("--rerank-preset", type=click.Choice(["safe", "published"]), default="safe", show_default=True,
                     help="Parameters --k1/--k2/--lambda start from: safe (shipped defaults, never below plain "
                          "ranking on dense or sparse galleries, README: Re-ranking) or published (the papers')."),
        click.option("--k1", type=click.IntRange(1),
                     help="k-reciprocal neighbourhood size (k-reciprocal: safe 15, published 20; sim: 3 / 20)."),
        click.option("--k2", type=click.IntRange(1), help="Local query expansion size (k-reciprocal; default 6)."),
        click.option("--lambda", "lambda_value", type=click.FloatRange(0, 1),
                     help="Weight of the original distance in the re-ranked one (k-reciprocal, sim; default 0.3)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")


def _progress() -> bool:
    return sys.stderr.isatty()


def _embedder(weights, backend, device, precision):
    from reidx.pipeline.embed import build_embedder

    return build_embedder(weights, backend=backend, device=device, precision=precision)


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Output Parquet file.")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False),
              help="CSV/Parquet table (path, person_id, camera) for images not in Market-1501 naming.")
@embedder_options
@json_option
def embed(inputs, out, labels, weights, backend, device, precision, batch_size, as_json):
    """Embed person crops (files, folders, globs) into a Parquet table.

    One row per image: path, person_id and camera (from Market-1501 naming such as
    0001_c1s1_001051_00.jpg, or --labels), the unit-length embedding, and an error column
    for images that could not be decoded (their embedding is null).
    """
    from reidx.pipeline.datasets import label_crops, list_images
    from reidx.pipeline.embed import embed_files
    from reidx.pipeline.embedding_table import build_table, write_parquet_atomic

    paths = list_images(list(inputs))
    if not paths:
        raise click.ClickException("no images found in the inputs")
    embedder = _embedder(weights, backend, device, precision)
    crops = label_crops(paths, labels)
    result = embed_files(embedder, crops["path"].to_pylist(), batch_size=batch_size, progress=_progress())
    write_parquet_atomic(build_table(crops, result, embedder.info), out)
    failed = [(p, e) for p, e in zip(crops["path"].to_pylist(), result.errors) if e]
    report = {"out": str(out), "num_images": len(paths), "num_embedded": len(paths) - len(failed),
              "num_failed": len(failed), "embedder": embedder.info.id, "dim": embedder.info.dim}
    if as_json:
        click.echo(json.dumps(report))
    else:
        for path, err in failed:
            click.echo(f"skipped {path}: {err}", err=True)
        click.echo(f"embedded {report['num_embedded']}/{len(paths)} images with {embedder.info.id} → {out}")


@main.command()
@click.option("--query", "-q", "query_inputs", required=True, multiple=True,
              help="Query images (folder, glob or file; repeatable) or a Parquet table from `reidx embed`.")
@click.option("--gallery", "-g", "gallery_inputs", required=True, multiple=True,
              help="Gallery images (folder, glob or file; repeatable) or a Parquet table from `reidx embed`.")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False),
              help="CSV/Parquet table (path, person_id, camera) instead of Market-1501 naming.")
@rerank_options
@embedder_options
@json_option
def evaluate(query_inputs, gallery_inputs, labels, rerank, rerank_preset, k1, k2, lambda_value, weights, backend,
             device, precision, batch_size, as_json):
    """Evaluate ReID retrieval on a labelled query/gallery split.

    Market-1501 protocol: same id and same camera ignored, junk (id -1) removed from the
    gallery, queries without a valid match skipped. Reports mAP, CMC rank-1/5/10 and mINP
    in percent. Example:

      reidx evaluate --query DATA/query --gallery DATA/bounding_box_test --weights osnet_x0_25_msmt17
    """
    from reidx.indexers.evaluation import embed_side, evaluate_split, is_embedded_table
    from reidx.indexers.rerank import params_from_options

    rerank_params = params_from_options(rerank, preset=rerank_preset, k1=k1, k2=k2, lambda_value=lambda_value)
    needs_model = not all(is_embedded_table(list(s)) for s in (query_inputs, gallery_inputs))
    embedder = _embedder(weights, backend, device, precision) if needs_model else None
    query = embed_side(list(query_inputs), embedder, labels, batch_size, _progress())
    gallery = embed_side(list(gallery_inputs), embedder, labels, batch_size, _progress())
    metrics = evaluate_split(query, gallery, rerank, rerank_params)
    report = metrics.as_percent_dict()
    report["num_failed_images"] = query.num_failed + gallery.num_failed
    if embedder is not None:
        report["embedder"] = embedder.info.id
    report["rerank"] = rerank
    if as_json:
        click.echo(json.dumps(report))
        return
    if rerank != "none":
        click.echo(f"re-ranked with {rerank}")
    click.echo(f"queries {report['num_query']} (skipped without a valid match: {report['num_query_skipped']}), "
               f"gallery {report['num_gallery']}")
    for key, label in (("mAP", "mAP"), ("rank1", "Rank-1"), ("rank5", "Rank-5"), ("rank10", "Rank-10"),
                       ("mINP", "mINP")):
        click.echo(f"{label:>8}: {report[key]:6.2f}%")


@main.command()
@click.argument("manifests", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "-o", "gallery", required=True, type=click.Path(file_okay=False),
              help="Gallery folder (shards/, ledger/, gallery.json); created if missing.")
@click.option("--scheduler", help="Address of an existing Dask scheduler (default: a local cluster).")
@click.option("--workers", type=click.IntRange(1), help="Local worker processes, one thread each (default: one per core, measured best).")
@click.option("--weights", "-w", default=DEFAULT_WEIGHTS, show_default=True, help="ReID weights: path or known name.")
@click.option("--backend", type=click.Choice(["auto", "torch", "onnx"]), default="auto", show_default=True,
              help="Embedding backend inside the workers (see `reidx embed --help`).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=256, show_default=True,
              help="Images per Dask task (one shard each).")
@click.option("--max-pixels", type=click.IntRange(1), default=50_000_000, show_default=True,
              help="Images larger than this are refused before decoding.")
@click.option("--strict", is_flag=True, help="Exit 2 when any image or source failed.")
@json_option
def index(manifests, gallery, scheduler, workers, weights, backend, device, batch_size, max_pixels, strict, as_json):
    """Index the images of MANIFEST(s) into a gallery: the nightly job.

    Lists every source, skips images the gallery's ledger already holds, and runs batches on
    Dask workers that read, decode, embed and write Parquet shards. Safe to kill and rerun:
    the rerun finishes the job with no image lost or counted twice. Failures (corrupt images,
    unsafe archive members, missing sources) are recorded with their reason; see `reidx ledger`.
    """
    from reidx.pipeline.job import run_index

    if scheduler and workers:
        raise click.UsageError("--scheduler and --workers exclude each other")
    summary = run_index(list(manifests), gallery, weights=weights, backend=backend, device=device, workers=workers,
                        scheduler=scheduler, batch_size=batch_size, max_pixels=max_pixels, progress=_progress(),
                        log=lambda line: click.echo(line, err=True))
    if as_json:
        click.echo(json.dumps(summary))
    else:
        click.echo(f"images seen {summary['images_seen']}, new {summary['images_new']}, "
                   f"skipped (already indexed) {summary['images_skipped']}, failed {summary['images_failed']}")
        for reason, count in sorted(summary["failed_by_reason"].items()):
            click.echo(f"  failed: {count} × {reason}")
        for name, reason in summary["sources_failed"].items():
            click.echo(f"  source {name} not indexed: {reason}")
        click.echo(f"persons {summary['persons']}, {summary['wall_s']} s, {summary['images_per_s']} images/s")
    if strict and (summary["images_failed"] or summary["sources_failed"]):
        sys.exit(2)


@main.command()
@click.argument("gallery", type=click.Path(exists=True, file_okay=False))
@click.option("--failed", is_flag=True, help="List only failed images, with their reasons.")
@json_option
def ledger(gallery, failed, as_json):
    """Show what a gallery's ledger records (each image's latest outcome): counts, or failures with --failed."""
    import pyarrow.compute as pc

    from reidx.pipeline.ledger import latest

    table = latest(gallery)
    if failed:
        table = table.filter(pc.equal(table["status"], "failed"))
        rows = [{"image_key": k, "reason": r} for k, r in zip(table["image_key"].to_pylist(),
                                                              table["reason"].to_pylist())]
        if as_json:
            click.echo(json.dumps({"failed": rows}))
        else:
            for row in rows:
                click.echo(f"{row['image_key']}\t{row['reason']}")
        return
    statuses = table["status"].to_pylist()
    report = {"images": len(statuses), "ok": statuses.count("ok"), "failed": statuses.count("failed"),
              "persons": int(pc.sum(table["num_persons"]).as_py() or 0)}
    click.echo(json.dumps(report) if as_json else
               f"{report['images']} images: {report['ok']} ok, {report['failed']} failed; {report['persons']} persons")


@main.command()
@click.argument("images", nargs=-1, required=True)
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Output Parquet file.")
@click.option("--crops", "crops_dir", type=click.Path(file_okay=False),
              help="Also save each person crop here as <frame>_<k>.jpg.")
@click.option("--draw", "draw_dir", type=click.Path(file_okay=False),
              help="Also save each frame with its boxes drawn here, for looking.")
@click.option("--weights", "-w", default="yolox_nano.onnx", show_default=True,
              help="Detector weights: a known name (yolox_nano.onnx, yolox_nano … yolox_x) or a .onnx/.pth path.")
@click.option("--backend", type=click.Choice(["torch", "onnx", "auto"]), default="torch", show_default=True,
              help="torch: our YOLOX (any weights, CUDA when present). onnx: onnxruntime on an ONNX export "
                   "(same boxes). auto: onnxruntime for ONNX weights on CPU, else torch.")
@click.option("--input-size", type=click.IntRange(32), default=None,
              help="Square canvas side, a multiple of 32 [default: 416 for Nano/Tiny and the ONNX export, "
                   "640 others]. Larger finds smaller people, slower: in full-HD frames Nano at 416 misses many "
                   "people under ~110 px tall (smallest found ~70 px); at 640 it finds them down to ~55 px.")
@click.option("--score-threshold", type=click.FloatRange(0, 1), default=0.3, show_default=True,
              help="Keep boxes with objectness × person probability at least this.")
@click.option("--nms-iou", type=click.FloatRange(0, 1), default=0.45, show_default=True,
              help="A box overlapping a better one by more than this IoU is dropped.")
@click.option("--min-height", type=click.FloatRange(0), default=0.0, show_default=True,
              help="Drop boxes shorter than this, in frame pixels.")
@click.option("--max-detections", type=click.IntRange(1), default=100, show_default=True, help="Per frame, best first.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="auto uses CUDA when torch sees a GPU.")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="bf16 autocast (torch backend) moves boxes and flips near-threshold ones; not for production.")
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True, help="Frames per forward pass.")
@json_option
def detect(images, out, crops_dir, draw_dir, weights, backend, input_size, score_threshold, nms_iou, min_height,
           max_detections, device, precision, batch_size, as_json):
    """Detect people in full frames (files, folders, globs) into a Parquet table.

    One row per person: path, detection (index in the frame, best first), frame_width,
    frame_height, x1 y1 x2 y2 (frame pixels), score. Frames that cannot be decoded are
    reported and named in the table's metadata (reidx.failed). Example:

      reidx detect frames/ --out detections.parquet --draw boxes/
    """
    from reidx.pipeline.datasets import list_images
    from reidx.pipeline.detect import Detector, PostProcess, detect_to_parquet

    paths = list_images(list(images))
    if not paths:
        raise click.ClickException("no images found in the inputs")
    options = PostProcess(score_threshold, nms_iou, min_height, max_detections)
    detector = Detector(weights, backend=backend, device=device, input_size=input_size, options=options,
                        precision=precision)
    report = detect_to_parquet(detector, paths, out, crops_dir, draw_dir, batch_size, progress=_progress())
    if as_json:
        click.echo(json.dumps(report))
    else:
        for path, err in report["failed"].items():
            click.echo(f"skipped {path}: {err}", err=True)
        click.echo(f"{report['num_detections']} people in {report['num_frames'] - report['num_failed']}/"
                   f"{report['num_frames']} frames with {report['detector']} at {report['input_size']} → {out}")


# --- retrieval: index, query, export ---------------------------------------------------------------

def index_options(func):
    """Options of `build-index`, shared with `nightly`."""
    options = [
        click.option("--type", "index_type", type=click.Choice(["auto", "flat", "ivf-flat", "ivf-sq8", "ivf-pq"]),
                     default="auto", show_default=True,
                     help="auto: exact (flat) up to 100,000 detections, ivf-sq8 above (nlist ≈ 4·√N). ivf-sq8: 4× "
                          "less memory than ivf-flat; ivf-pq: 32× less, much lower recall."),
        click.option("--nlist", type=click.IntRange(1), help="IVF lists [default: ≈ 4·√N, ≥ 39 vectors per list]."),
        click.option("--gpu", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
                     help="auto: train and search on the GPU when Faiss reports one (faiss-gpu, reidx[gpu])."),
        click.option("--knn", "knn_k", type=click.IntRange(0), default=30, show_default=True,
                     help="Store each gallery item's k nearest gallery neighbours (for re-ranking); 0: none."),
        click.option("--rebuild", is_flag=True, help="Retrain from scratch instead of adding new shards."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _echo_build(summary: dict) -> None:
    if summary["mode"] == "unchanged":
        click.echo(f"index {summary['version']} is up to date: {summary['count']} detections ({summary['type']})")
        return
    line = f"{summary['mode']} build {summary['version']}: {summary['count']} detections in {summary['type']}"
    if summary.get("nprobe"):
        line += (f" (nlist {summary['nlist']}, nprobe {summary['nprobe']}: recall@10 {summary['recall_at_10']:.3f}, "
                 f"recall@100 {summary['recall_at_100']:.3f})")
    click.echo(line + f", {summary['seconds']} s" + (f" — {summary['reason']}" if summary.get("reason") else ""))


@main.command("build-index")
@click.argument("gallery", type=click.Path(exists=True, file_okay=False))
@index_options
@json_option
def build_index_command(gallery, index_type, nlist, gpu, knn_k, rebuild, as_json):
    """Build or update GALLERY's Faiss index (and its kNN graph) from its committed shards.

    Cosine similarity (inner product on unit vectors). IVF indexes are trained on a sample and
    get a default nprobe measured to give recall@100 ≥ 0.95 on the gallery's own vectors. A
    rerun adds only new shards; it retrains when the gallery has doubled since training. The new
    version replaces the old one atomically: running queries are never disturbed.
    """
    from reidx.indexers.faiss_index import build_index

    summary = build_index(gallery, index_type=index_type, nlist=nlist, gpu=gpu, knn_k=knn_k, rebuild=rebuild,
                          log=lambda line: click.echo(line, err=True))
    click.echo(json.dumps(summary)) if as_json else _echo_build(summary)


@main.command()
@click.argument("manifests", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "-o", "gallery", required=True, type=click.Path(file_okay=False), help="Gallery folder.")
@click.option("--weights", "-w", default=DEFAULT_WEIGHTS, show_default=True, help="ReID weights: path or known name.")
@click.option("--workers", type=click.IntRange(1), help="Local worker processes (default: one per core).")
@click.option("--scheduler", help="Address of an existing Dask scheduler (default: a local cluster).")
@index_options
@click.option("--strict", is_flag=True, help="Exit 2 when any image or source failed (the index is still built).")
@json_option
def nightly(manifests, gallery, weights, workers, scheduler, index_type, nlist, gpu, knn_k, rebuild, strict, as_json):
    """The nightly run: `reidx index` the manifests, then `reidx build-index` the gallery.

    Both steps are incremental and safe to rerun after a crash.
    """
    from reidx.indexers.faiss_index import build_index
    from reidx.pipeline.job import run_index

    if scheduler and workers:
        raise click.UsageError("--scheduler and --workers exclude each other")
    log = lambda line: click.echo(line, err=True)  # noqa: E731
    indexed = run_index(list(manifests), gallery, weights=weights, workers=workers, scheduler=scheduler,
                        progress=_progress(), log=log)
    built = build_index(gallery, index_type=index_type, nlist=nlist, gpu=gpu, knn_k=knn_k, rebuild=rebuild, log=log)
    if as_json:
        click.echo(json.dumps({"index": indexed, "build_index": built}))
    else:
        click.echo(f"indexed {indexed['images_new']} new images ({indexed['persons']} persons, "
                   f"{indexed['images_failed']} failed) in {indexed['wall_s']} s")
        _echo_build(built)
    if strict and (indexed["images_failed"] or indexed["sources_failed"]):
        sys.exit(2)


@main.command()
@click.argument("gallery", type=click.Path(exists=True, file_okay=False))
@click.argument("queries", nargs=-1, required=True)
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Ranked results (Parquet).")
@click.option("--report", type=click.Path(dir_okay=False), help="Also write an HTML report (+ a _files/ folder).")
@click.option("--report-top", type=click.IntRange(1), default=10, show_default=True, help="Gallery crops per query in the report.")
@click.option("--top-k", type=click.IntRange(1), default=100, show_default=True, help="Ranked gallery detections per query.")
@click.option("--detect", is_flag=True, help="Queries are full frames: every detected person becomes a query.")
@click.option("--largest", is_flag=True, help="With --detect: only the largest person of each frame.")
@rerank_options
@click.option("--candidates", type=click.IntRange(1), default=400, show_default=True,
              help="With --rerank: each query's top candidates that are re-ranked (then cut to --top-k). Fewer "
                   "is faster; on Con-ReID 100 lost up to 1.2 mAP against exact re-ranking, 400 at most 0.18.")
@click.option("--nprobe", type=click.IntRange(1), help="IVF lists searched [default: the calibrated one].")
@click.option("--metrics", "score", is_flag=True,
              help="Also report mAP/rank-k/mINP from the labels (Market-1501 names or manifest labels); only "
                   "meaningful when queries and gallery share one label space.")
@click.option("--weights", "-w", help="Check the gallery was embedded with these weights [default: the gallery's own].")
@click.option("--backend", type=click.Choice(["auto", "torch", "onnx"]), default="auto", show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--gpu", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Search the index on the GPU when Faiss reports one.")
@json_option
def query(gallery, queries, out, report, report_top, top_k, detect, largest, rerank, rerank_preset, k1, k2,
          lambda_value, candidates, nprobe, score, weights, backend, device, gpu, as_json):
    """Find where the people in QUERIES appear in GALLERY.

    QUERIES are crop images, folders, globs or manifests (.toml). Each person is embedded with
    the gallery's own embedder and searched in its index; OUT gets one row per (query, rank)
    (schema: docs/schemas.md). An image where nothing is detected gets a status row. When
    queries and gallery share labels (Market-1501 names or manifest labels), --metrics reports
    mAP/rank-k (matches beyond --top-k count as missed). Example:

      reidx query out/gallery crops/ --out results.parquet --report results.html
    """
    from reidx.indexers.query import run_query
    from reidx.indexers.rerank import params_from_options

    if largest and not detect:
        raise click.UsageError("--largest needs --detect")
    params = params_from_options(rerank, preset=rerank_preset, k1=k1, k2=k2, lambda_value=lambda_value)
    summary = run_query(gallery, list(queries), out, top_k=top_k, detect=detect, largest=largest, rerank=rerank,
                        rerank_params=params, candidates=candidates, nprobe=nprobe, weights=weights,
                        backend=backend, device=device, gpu=gpu, progress=_progress(), score=score)
    if report:
        import pyarrow.parquet as pq

        from reidx.indexers.faiss_index import load_index
        from reidx.indexers.report import write_report

        summary["report"] = write_report(pq.read_table(out), load_index(gallery, gpu="off").items, report,
                                         top_n=report_top)
    if as_json:
        click.echo(json.dumps(summary))
        return
    click.echo(f"{summary['queries']} query persons → {summary['rows']} rows in {out} ({summary['seconds']} s)")
    if summary["images_without_person"] or summary["images_failed"]:
        click.echo(f"  {summary['images_without_person']} images without a person, {summary['images_failed']} failed")
    if "metrics" in summary:
        m = summary["metrics"]
        click.echo(f"  labelled: mAP {m['mAP']:.2f}%, rank-1 {m['rank1']:.2f}% over {m['num_query']} queries "
                   f"(top-{summary['top_k']} lists)")
    if report:
        click.echo(f"  report: {report}")


@main.command()
@click.argument("gallery", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Output Parquet file.")
@click.option("--where", "where",
              help="Row filter: one SQL (DuckDB) boolean expression, e.g. \"camera = '3' AND score > 0.5\".")
@click.option("--columns", help="Comma-separated columns to keep [default: all but the embedding].")
@click.option("--with-embeddings", is_flag=True, help="Keep the embedding column.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=300, show_default=True,
              help="Stop a --where filter that runs longer than this many seconds.")
@json_option
def export(gallery, out, where, columns, with_embeddings, timeout, as_json):
    """Export GALLERY's detections (committed shards) with their metadata to one Parquet file."""
    from reidx.indexers.export import export_detections

    summary = export_detections(gallery, out, where=where, columns=columns.split(",") if columns else None,
                                with_embeddings=with_embeddings, timeout=timeout)
    click.echo(json.dumps(summary) if as_json else f"{summary['rows']} detections → {out}")


def _register_train() -> None:
    """`reidx train` lives with the training code (pipeline/training/command.py)."""
    from reidx.pipeline.training.command import train

    main.add_command(train)


_register_train()


if __name__ == "__main__":
    main()
