"""The ``reidx`` command line: a thin click layer over the Python API (``api.py``) and the stages.

One vocabulary across commands (docs/cli.md): the same option means the same thing everywhere
(``--weights`` is always the ReID embedder, ``--detector`` the person detector, ``--batch-size``
items per forward pass, ``--out`` what the command creates), and ``--json`` prints exactly one
JSON object on stdout whose keys follow one naming (``images``, ``images_failed``, ``persons``,
``failures``, ``wall_s``, …). Progress and warnings go to stderr.

Exit status: 0 done; 1 a user error (one ``Error: ...`` line on stderr; ``REIDX_DEBUG=1`` shows
the traceback); 2 some inputs failed; 3 a source failed (missing, unmounted, unreadable); 130
interrupted (Ctrl-C or SIGTERM; what was committed is kept). Only click is imported at
start-up: ``reidx --help`` and argument errors answer at once. Outside a terminal, long commands
log progress lines and a final ``summary {json}`` line through the ``reidx`` logger (stderr,
and ``--log-file``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time

import click

DEFAULT_WEIGHTS = "osnet_x0_25_msmt17"
DEFAULT_DETECTOR = "yolox_nano.onnx"
DEFAULT_MAX_PIXELS = 50_000_000  # = reidx.pipeline.imaging.DEFAULT_MAX_PIXELS (checked by a test; no import here)
EXIT_USER_ERROR, EXIT_INTERRUPTED = 1, 130
LOG = logging.getLogger("reidx")


def _user_error_types() -> tuple[type, ...]:
    """Failures a user can fix, shown as one line (imported only when something failed)."""
    from reidx.pipeline.datasets import DatasetError
    from reidx.pipeline.lock import GalleryLockedError
    from reidx.pipeline.models.weights import WeightsError

    return WeightsError, DatasetError, ValueError, ImportError, FileNotFoundError, GalleryLockedError


class Interrupted(Exception):
    """Ctrl-C or SIGTERM during a command; ``summary`` is what a job had committed, when it says."""

    def __init__(self, summary: dict | None = None):
        super().__init__("interrupted")
        self.summary = summary


class ReidxGroup(click.Group):
    """Every error is one ``Error:`` line and exit status 1 — usage errors too (click's default is 2,
    which reidx keeps for "some inputs failed")."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.ClickException:
            raise
        except KeyboardInterrupt as exc:  # before click turns it into Abort and prints a blank line
            raise Interrupted(getattr(exc, "summary", None)) from None
        except Exception as exc:
            if os.environ.get("REIDX_DEBUG") or not isinstance(exc, _user_error_types()):
                raise
            raise click.ClickException(str(exc)) from None

    def main(self, args=None, prog_name=None, **extra):
        extra.pop("standalone_mode", None)
        _setup_logging()
        previous = signal.signal(signal.SIGTERM, _terminate)  # a service manager's stop: as Ctrl-C
        try:
            code = super().main(args=args, prog_name=prog_name or "reidx", standalone_mode=False, **extra)
        except click.ClickException as exc:
            hint = ""
            if isinstance(exc, click.UsageError) and exc.ctx is not None:
                hint = f" (see '{exc.ctx.command_path} --help')"
            click.echo(f"Error: {exc.format_message()}{hint}", err=True)
            sys.exit(EXIT_USER_ERROR)
        except (Interrupted, click.Abort, KeyboardInterrupt) as exc:
            done = getattr(exc, "summary", None)
            committed = (f"{done['images_new']} images ({done['persons']} persons) were committed; "
                         if done else "everything committed so far is kept; ")
            click.echo(f"Interrupted: {committed}rerun the same command to resume.", err=True)
            sys.exit(EXIT_INTERRUPTED)
        finally:
            signal.signal(signal.SIGTERM, previous)
        sys.exit(code if isinstance(code, int) else 0)


def _terminate(signum, frame):
    raise KeyboardInterrupt


def _setup_logging() -> None:
    """Progress and summary lines go to stderr when no one watches a terminal (cron, systemd, CI)."""
    LOG.setLevel(logging.INFO)
    LOG.propagate = False
    if not sys.stderr.isatty() and not any(getattr(h, "reidx_stderr", False) for h in LOG.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s reidx %(message)s", "%Y-%m-%dT%H:%M:%S"))
        handler.reidx_stderr = True
        LOG.addHandler(handler)


def _log_file(ctx, param, value):
    if value:
        handler = logging.FileHandler(value, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S"))
        LOG.addHandler(handler)
    return value


def _summary_line(command: str, report: dict) -> None:
    """One line a monitor can parse: ``summary {"command": …, …}``."""
    LOG.info("summary %s", json.dumps({"command": command, **report}))


def _options(*options):
    """Apply a list of click options in the order listed (one definition shared by several commands)."""
    def apply(func):
        for option in reversed(options):
            func = option(func)
        return func
    return apply


def _out(*suffixes: str, help: str, required: bool = True):
    """``--out/-o`` for a file: its suffix must say what is written (``x.csv`` would silently be Parquet)."""
    def check(ctx, param, value):
        if value is not None and not str(value).lower().endswith(suffixes):
            raise click.BadParameter(f"{value!r} must end with {' or '.join(suffixes)}", ctx, param)
        return value
    return click.option("--out", "-o", required=required, type=click.Path(dir_okay=False), callback=check, help=help)


weights_option = click.option("--weights", "-w", default=DEFAULT_WEIGHTS, show_default=True,
                              help="ReID embedder weights: a file path or a known model name.")
backend_option = click.option("--backend", type=click.Choice(["auto", "torch", "onnx"]), default="auto",
                              show_default=True, help="auto: onnxruntime on CPU when installed (fastest there), "
                                                      "else torch; both run the same weights (extra reidx[onnx]).")
device_option = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                             show_default=True, help="auto uses CUDA when torch sees a GPU.")
precision_option = click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32",
                                show_default=True, help="bf16 autocast is faster but less exact (README: Speed).")
max_pixels_option = click.option("--max-pixels", type=click.IntRange(1), default=DEFAULT_MAX_PIXELS,
                                 show_default=True, help="Images larger than this are refused before decoding.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
strict_option = click.option("--strict", is_flag=True,
                             help="Exit 2 also for images that failed on earlier nights and still fail.")
gpu_option = click.option("--gpu", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
                          help="Faiss on the GPU: auto uses one when Faiss reports it (faiss-gpu, reidx[gpu]).")


def batch_size_option(default: int, what: str):
    return click.option("--batch-size", type=click.IntRange(1), default=default, show_default=True,
                        help=f"{what} per forward pass.")


embedder_options = _options(weights_option, backend_option, device_option, precision_option,
                            batch_size_option(32, "Crops"), max_pixels_option)
rerank_options = _options(
    click.option("--rerank", type=click.Choice(["none", "k-reciprocal", "sim", "sim-graph"]), default="none",
                 show_default=True, help="Re-rank the cosine ranking: k-reciprocal (Zhong et al. 2017), sim (Jia "
                                         "et al. 2020), sim-graph (SIM's graph reasoning alone)."),
    click.option("--rerank-preset", type=click.Choice(["safe", "published"]), default="safe", show_default=True,
                 help="Parameters --k1/--k2/--lambda start from: safe (shipped defaults, README: Re-ranking) or "
                      "published (the papers')."),
    click.option("--k1", type=click.IntRange(1),
                 help="k-reciprocal neighbourhood size (k-reciprocal: safe 15, published 20; sim: 3 / 20)."),
    click.option("--k2", type=click.IntRange(1), help="Local query expansion size (k-reciprocal; default 6)."),
    click.option("--lambda", "lambda_value", type=click.FloatRange(0, 1),
                 help="Weight of the original distance in the re-ranked one (k-reciprocal, sim; default 0.3)."),
)
# `reidx index` and the indexing half of `reidx nightly`
index_job_options = _options(
    click.option("--out", "-o", "gallery", required=True, type=click.Path(file_okay=False),
                 help="Gallery folder (shards/, ledger/, gallery.json); created if missing."),
    weights_option, backend_option, device_option, max_pixels_option,
    click.option("--task-size", type=click.IntRange(1), default=256, show_default=True,
                 help="Images per Dask task (each task writes one shard)."),
    click.option("--workers", type=click.IntRange(1),
                 help="Local worker processes, one thread each [default: one per core, measured best]."),
    click.option("--scheduler", help="Address of an existing Dask scheduler (default: a local cluster)."),
    click.option("--retry-failed", is_flag=True,
                 help="Process again every image that failed before (failed images whose bytes changed are "
                      "always retried)."),
    click.option("--allow-uri-change", is_flag=True,
                 help="Accept a source whose uri differs from the one its name was first indexed from "
                      "(the same data moved); otherwise that is an error."),
    strict_option,
)
log_file_option = click.option("--log-file", type=click.Path(dir_okay=False), callback=_log_file, expose_value=False,
                               is_eager=True, help="Also append progress and summary lines to this file.")
log_every_option = click.option("--log-every", "log_every_s", type=click.FloatRange(0), default=30.0,
                                show_default=True, help="Seconds between progress lines when stderr is no terminal.")
# `reidx build-index` and the index half of `reidx nightly`
index_build_options = _options(
    click.option("--type", "index_type", type=click.Choice(["auto", "flat", "ivf-flat", "ivf-sq8", "ivf-pq"]),
                 default="auto", show_default=True,
                 help="auto: the memory budget decides — exact (flat) up to 100,000 detections, then ivf-sq8, "
                      "then ivf-pq (re-ranked from the vectors on disk) when ivf-sq8 would not fit (nlist ≈ 4·√N). "
                      "ivf-sq8: 4× less memory than ivf-flat; ivf-pq: 32× less."),
    click.option("--nlist", type=click.IntRange(1), help="IVF lists [default: ≈ 4·√N, ≥ 39 vectors per list]."),
    click.option("--memory-budget", help="Memory the index may take, e.g. 4G or 512M; chooses --type auto "
                                         "[default: a quarter of this machine's RAM]."),
    gpu_option,
    click.option("--knn", "knn_k", type=click.IntRange(0), default=30, show_default=True,
                 help="Store each gallery item's k nearest gallery neighbours (for re-ranking); 0: none."),
    click.option("--rebuild", is_flag=True, help="Retrain from scratch instead of adding new shards."),
)
# `reidx build-index` only: `reidx nightly` has these from index_job_options and passes them on
index_build_cluster_options = _options(
    click.option("--workers", type=click.IntRange(1),
                 help="Build on a local Dask cluster of this many worker processes [default: in this process]."),
    click.option("--scheduler", help="Address of an existing Dask scheduler to build on (workers must see the "
                                     "gallery at the same path)."),
)


def _progress() -> bool:
    return sys.stderr.isatty()


def _log(line: str) -> None:
    click.echo(line, err=True)


def _emit(report: dict, as_json: bool, text) -> None:
    """One JSON object, or the human lines ``text(report)`` returns."""
    if as_json:
        click.echo(json.dumps(report))
    else:
        for line in text(report):
            click.echo(line)


@click.group(cls=ReidxGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="reidx")
def main():
    """reidx: find people in large image archives and ask where else they appear.

    Weights are given by file path or known name (e.g. osnet_x0_25_msmt17); names are looked
    up in $REIDX_MODEL_DIR, then ~/.cache/reidx/models. Exit status: 0 done, 1 user error,
    2 some inputs failed (--strict), 130 interrupted. Option and JSON names: docs/cli.md.
    """


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@_out(".parquet", help="Output Parquet file.")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False),
              help="CSV/Parquet table (path, person_id, camera) for images not in Market-1501 naming.")
@embedder_options
@json_option
def embed(inputs, out, labels, weights, backend, device, precision, batch_size, max_pixels, as_json):
    """Embed person crops (files, folders, globs) into a Parquet table.

    One row per image: path, person_id and camera (from Market-1501 naming such as
    0001_c1s1_001051_00.jpg, or --labels), the unit-length embedding, and an error column
    for images that could not be decoded (their embedding is null).
    """
    from reidx.api import Embedder
    from reidx.pipeline.atomic import write_parquet_atomic
    from reidx.pipeline.datasets import label_crops, list_images
    from reidx.pipeline.embedding_table import build_table

    started = time.perf_counter()
    paths = list_images(list(inputs))
    if not paths:
        raise click.ClickException("no images found in the inputs")
    embedder = Embedder(weights, backend=backend, device=device, precision=precision, batch_size=batch_size)
    crops = label_crops(paths, labels)
    result = embedder.embed_files(crops["path"].to_pylist(), max_pixels=max_pixels, progress=_progress())
    write_parquet_atomic(build_table(crops, result, embedder.info), out)
    failures = [{"path": p, "reason": e} for p, e in zip(crops["path"].to_pylist(), result.errors) if e]
    report = {"out": str(out), "images": len(paths), "images_failed": len(failures),
              "persons": len(paths) - len(failures), "failures": failures, "embedder": embedder.info.id,
              "dim": embedder.info.dim, "wall_s": round(time.perf_counter() - started, 2)}
    if not as_json:
        for failure in failures:
            _log(f"skipped {failure['path']}: {failure['reason']}")
    _emit(report, as_json, lambda r: [f"embedded {r['persons']}/{r['images']} images with {r['embedder']} → {out}"])


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
             device, precision, batch_size, max_pixels, as_json):
    """Evaluate ReID retrieval on a labelled query/gallery split.

    Market-1501 protocol: same id and same camera ignored, junk (id -1) removed from the
    gallery, queries without a valid match skipped. Reports mAP, CMC rank-1/5/10 and mINP
    in percent. Example:

      reidx evaluate --query DATA/query --gallery DATA/bounding_box_test --weights osnet_x0_25_msmt17
    """
    from reidx.api import Embedder
    from reidx.indexers.evaluation import evaluate_split
    from reidx.indexers.rerank import params_from_options
    from reidx.pipeline.labelled_split import embed_side, is_embedded_table

    started = time.perf_counter()
    params = params_from_options(rerank, preset=rerank_preset, k1=k1, k2=k2, lambda_value=lambda_value)
    needs_model = not all(is_embedded_table(list(s)) for s in (query_inputs, gallery_inputs))
    embedder = Embedder(weights, backend=backend, device=device, precision=precision) if needs_model else None
    query, gallery = (embed_side(list(side), embedder and embedder.model, labels, batch_size, _progress(), max_pixels)
                      for side in (query_inputs, gallery_inputs))
    report = evaluate_split(query, gallery, rerank, params).as_percent_dict()
    report.update(images_failed=query.num_failed + gallery.num_failed, rerank=rerank,
                  wall_s=round(time.perf_counter() - started, 2))
    if embedder is not None:
        report["embedder"] = embedder.info.id

    def text(r):
        if rerank != "none":
            yield f"re-ranked with {rerank}"
        yield (f"queries {r['queries']} (skipped without a valid match: {r['queries_skipped']}), "
               f"gallery {r['gallery_items']}")
        for key, label in (("mAP", "mAP"), ("rank1", "Rank-1"), ("rank5", "Rank-5"), ("rank10", "Rank-10"),
                           ("mINP", "mINP")):
            yield f"{label:>8}: {r[key]:6.2f}%"
    _emit(report, as_json, text)


def _index_text(r: dict):
    yield (f"images {r['images']}: new {r['images_new']}, skipped (already indexed) {r['images_skipped']}, "
           f"failed {r['images_failed']}")
    for reason, count in sorted(r["failed_by_reason"].items()):
        yield f"  failed: {count} × {reason}"
    for name, reason in r["sources_failed"].items():
        yield f"  source {name} not indexed: {reason}"
    yield f"persons {r['persons']}, {r['wall_s']} s, {r['images_per_s']} images/s"


def _run_index(manifests, gallery, weights, backend, device, max_pixels, task_size, workers, scheduler,
               retry_failed, allow_uri_change, log_every_s) -> dict:
    if scheduler and workers:
        raise click.UsageError("--scheduler and --workers exclude each other")
    from reidx.pipeline.job import run_index

    return run_index(list(manifests), gallery, weights=weights, backend=backend, device=device, workers=workers,
                     scheduler=scheduler, batch_size=task_size, max_pixels=max_pixels, progress=_progress(), log=_log,
                     retry_failed=retry_failed, allow_uri_change=allow_uri_change, log_every_s=log_every_s)


def _night_status(summary: dict, strict: bool) -> int:
    from reidx.pipeline.job import exit_code

    code = exit_code(summary, strict)
    for name, reason in summary["sources_failed"].items():
        click.echo(f"Error: source {name} failed: {reason}", err=True)
    return code


@main.command()
@click.argument("manifests", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@index_job_options
@log_file_option
@log_every_option
@json_option
def index(manifests, gallery, weights, backend, device, max_pixels, task_size, workers, scheduler, retry_failed,
          allow_uri_change, strict, log_every_s, as_json):
    """Index the images of MANIFEST(s) into a gallery: the nightly job.

    Lists every source, skips images the gallery's ledger already holds, and runs batches on
    Dask workers that read, decode, detect (frames), embed and write Parquet shards. Safe to kill
    and rerun: the rerun finishes the job with no image lost or counted twice. Failures (corrupt
    images, unsafe archive members, missing sources) are recorded with their reason; see `reidx ledger`.
    """
    summary = _run_index(manifests, gallery, weights, backend, device, max_pixels, task_size, workers, scheduler,
                         retry_failed, allow_uri_change, log_every_s)
    _emit(summary, as_json, _index_text)
    _summary_line("index", summary)
    sys.exit(_night_status(summary, strict))


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
        failures = [{"image_key": k, "reason": r} for k, r in zip(table["image_key"].to_pylist(),
                                                                 table["reason"].to_pylist())]
        _emit({"gallery": str(gallery), "failures": failures}, as_json,
              lambda r: (f"{f['image_key']}\t{f['reason']}" for f in r["failures"]))
        return
    statuses = table["status"].to_pylist()
    report = {"gallery": str(gallery), "images": len(statuses), "images_ok": statuses.count("ok"),
              "images_failed": statuses.count("failed"), "persons": int(pc.sum(table["num_persons"]).as_py() or 0)}
    _emit(report, as_json, lambda r: [f"{r['images']} images: {r['images_ok']} ok, {r['images_failed']} failed; "
                                      f"{r['persons']} persons"])


# the person detector's options (reidx detect, evaluate-detections); defaults measured: docs/detection.md
detector_options = _options(
    click.option("--detector", default=DEFAULT_DETECTOR, show_default=True,
                 help="Detector weights: a known name (yolox_nano.onnx, yolox_nano … yolox_x) or a .onnx/.pth path."),
    backend_option,
    click.option("--input-size", type=click.IntRange(32), default=None,
                 help="Square canvas side, a multiple of 32 [default: 576 for Nano, measured best with tiles "
                      "on full-HD frames; 416 Tiny, 640 others]. Larger finds smaller people, slower."),
    click.option("--tiles", default="2x1", show_default=True,
                 help="Also detect in COLUMNSxROWS overlapping windows of frames at least twice the canvas "
                      "(swapped for portrait frames), or 'off': finds people 50-110 px tall in full HD, ~3x slower."),
    click.option("--antialias/--no-antialias", default=True, show_default=True,
                 help="Antialiased resize to the canvas; --no-antialias is the official YOLOX demo's resize."),
    click.option("--score-threshold", type=click.FloatRange(0, 1), default=0.3, show_default=True,
                 help="Keep boxes with objectness x person probability at least this."),
    click.option("--nms-iou", type=click.FloatRange(0, 1), default=0.45, show_default=True,
                 help="A box overlapping a better one by more than this IoU is dropped."),
    click.option("--containment", type=click.FloatRange(0, 1), default=0.8, show_default=True,
                 help="A box with more than this share of its area inside a better box of similar width "
                      "(a part of the same person) is dropped; 1 turns it off."),
    click.option("--min-height", type=click.FloatRange(0), default=0.0, show_default=True,
                 help="Drop boxes shorter than this, in frame pixels."),
    click.option("--max-detections", type=click.IntRange(1), default=100, show_default=True, help="Per frame."),
    device_option,
    click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
                 help="bf16 autocast (torch backend) moves boxes and flips near-threshold ones; not for production."),
    batch_size_option(8, "Frames"),
    max_pixels_option,
)


@main.command()
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


@main.command()
@click.argument("images", nargs=-1, required=True)
@_out(".parquet", help="Output Parquet file.")
@click.option("--crops", "crops_dir", type=click.Path(file_okay=False),
              help="Also save each person crop here as <frame>_<k>.jpg (the pixels the embedder sees).")
@click.option("--draw", "draw_dir", type=click.Path(file_okay=False),
              help="Also save each frame with its boxes drawn here, for looking.")
@detector_options
@json_option
def detect(images, out, crops_dir, draw_dir, batch_size, max_pixels, as_json, **detector_args):
    """Detect people in full frames (files, folders, globs) into a Parquet table.

    One row per person: path, detection (index in the frame, best first), frame_width,
    frame_height, x1 y1 x2 y2 (frame pixels), score. Frames that cannot be decoded are
    reported and named in the table's metadata (reidx.failed). Example:

      reidx detect frames/ --out detections.parquet --draw boxes/
    """
    from reidx.pipeline.datasets import list_images
    from reidx.pipeline.detect import build_detector
    from reidx.pipeline.detect_output import detect_to_parquet

    started = time.perf_counter()
    paths = list_images(list(images))
    if not paths:
        raise click.ClickException("no images found in the inputs")
    model = build_detector(**detector_args)
    report = detect_to_parquet(model, paths, out, crops_dir, draw_dir, batch_size, progress=_progress(),
                               max_pixels=max_pixels)
    report["wall_s"] = round(time.perf_counter() - started, 2)
    if not as_json:
        for failure in report["failures"]:
            _log(f"skipped {failure['path']}: {failure['reason']}")
    _emit(report, as_json, lambda r: [f"{r['persons']} people in {r['images'] - r['images_failed']}/{r['images']} "
                                      f"frames with {r['detector']} at {r['input_size']} → {out}"])


@main.command("evaluate-detections")
@click.argument("ground_truth", type=click.Path(exists=True, dir_okay=False))
@click.option("--detections", type=click.Path(exists=True, dir_okay=False), help="A table of reidx detect to score.")
@click.option("--images", type=click.Path(exists=True, file_okay=False), help="Folder of the labelled frames.")
@click.option("--split", default="all", show_default=True,
              help="Frames to score: all, or a split named in the ground truth file (e.g. tune, confirm).")
@click.option("--iou", "iou_threshold", type=click.FloatRange(0, 1, min_open=True), default=0.5, show_default=True,
              help="IoU a detection needs with a person to find them.")
@detector_options
@json_option
def evaluate_detections_command(ground_truth, detections, images, split, iou_threshold, batch_size, max_pixels,
                                as_json, **detector_args):
    """Detection AP of a detections table (--detections) or of the detector (options as for
    detect) run on the frames in --images, against hand-drawn boxes (JSON; docs/detection.md):

    \b
      reidx evaluate-detections tests/data/scene_person_boxes.json --images ../shared/data/scenes/frames
    """
    from reidx.indexers.detection_metrics import evaluation_report
    from reidx.pipeline.detect import build_detector

    if (detections is None) == (images is None):
        raise click.UsageError("give either --detections (a table to score) or --images (frames to detect in)")
    started = time.perf_counter()
    model = None if images is None else build_detector(**detector_args)
    report = evaluation_report(ground_truth, detections, images, split, iou_threshold, model, batch_size, max_pixels)
    report["wall_s"] = round(time.perf_counter() - started, 2)
    _emit(report, as_json, lambda r: [f"AP{round(100 * iou_threshold)} {r['AP']:.2f}%, recall {r['recall']:.2f}%, "
                                      f"precision {r['precision']:.2f}% ({r['true_positives']} of {r['num_gt']} "
                                      f"people found, {r['false_positives']} false boxes) on {r['images']} frames"])


# --- retrieval: index, query, export ---------------------------------------------------------------

def _build_text(r: dict):
    if r["mode"] == "unchanged":
        yield f"index {r['index_version']} is up to date: {r['persons']} detections ({r['index_type']})"
        return
    line = f"{r['mode']} build {r['index_version']}: {r['persons']} detections in {r['index_type']}"
    if r.get("nprobe"):
        line += (f" (nlist {r['nlist']}, nprobe {r['nprobe']}: recall@10 {r['recall_at_10']:.3f}, "
                 f"recall@100 {r['recall_at_100']:.3f})")
    yield line + f", {r['wall_s']} s" + (f" — {r['reason']}" if r.get("reason") else "")


def _build_index(gallery, index_type, nlist, gpu, knn_k, rebuild, memory_budget=None, workers=None,
                 scheduler=None) -> dict:
    if scheduler and workers:
        raise click.UsageError("--scheduler and --workers exclude each other")
    from reidx.indexers.build import build_index

    return build_index(gallery, index_type=index_type, nlist=nlist, gpu=gpu, knn_k=knn_k, rebuild=rebuild,
                       memory_budget=memory_budget, workers=workers, scheduler=scheduler, log=_log)


@main.command("build-index")
@click.argument("gallery", type=click.Path(exists=True, file_okay=False))
@index_build_options
@index_build_cluster_options
@log_file_option
@json_option
def build_index_command(gallery, index_type, nlist, memory_budget, gpu, knn_k, rebuild, workers, scheduler, as_json):
    """Build or update GALLERY's Faiss index (and its kNN graph) from its committed shards.

    Cosine similarity (inner product on unit vectors). IVF indexes are trained on a sample and
    get a default nprobe measured to give recall@100 ≥ 0.95 on the gallery's own vectors. A
    rerun adds only new shards (O(new): a delta file, their kNN rows, reverse edges into old
    rows); it retrains when the gallery has doubled since training. Out of core: vectors stream
    from the shards, inverted lists stay on disk (memory-mapped). The new version replaces the
    old one atomically: running queries are never disturbed.
    """
    summary = _build_index(gallery, index_type, nlist, gpu, knn_k, rebuild, memory_budget, workers, scheduler)
    _emit(summary, as_json, _build_text)
    _summary_line("build-index", summary)


@main.command()
@click.argument("manifests", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@index_job_options
@index_build_options
@log_file_option
@log_every_option
@json_option
def nightly(manifests, gallery, weights, backend, device, max_pixels, task_size, workers, scheduler, retry_failed,
            allow_uri_change, strict, index_type, nlist, memory_budget, gpu, knn_k, rebuild, log_every_s, as_json):
    """The nightly run: `reidx index` the manifests, then `reidx build-index` the gallery.

    Takes every option of both. Both steps are incremental and safe to rerun after a crash. The
    index is built whenever the gallery holds committed shards, even when some inputs or sources
    failed; the exit status then says so (2 or 3).
    """
    from reidx.pipeline.ledger import committed_shards

    started = time.perf_counter()
    indexed = _run_index(manifests, gallery, weights, backend, device, max_pixels, task_size, workers, scheduler,
                         retry_failed, allow_uri_change, log_every_s)
    built = (_build_index(gallery, index_type, nlist, gpu, knn_k, rebuild, memory_budget, workers, scheduler)
             if committed_shards(gallery) else None)
    report = {"index": indexed, "build_index": built, "wall_s": round(time.perf_counter() - started, 2)}
    _emit(report, as_json, lambda r: [*_index_text(r["index"]),
                                      *(_build_text(built) if built else ["no committed detections yet: no index"])])
    _summary_line("nightly", report)
    sys.exit(_night_status(indexed, strict))


@main.command()
@click.argument("gallery", type=click.Path(exists=True, file_okay=False))
@click.argument("queries", nargs=-1, required=True)
@_out(".parquet", help="Ranked results (Parquet).")
@click.option("--report", type=click.Path(dir_okay=False), help="Also write an HTML report (+ a _files/ folder).")
@click.option("--report-top", type=click.IntRange(1), default=10, show_default=True,
              help="Gallery crops per query in the report.")
@click.option("--top-k", type=click.IntRange(1), default=100, show_default=True,
              help="Ranked gallery detections per query.")
@click.option("--detect", is_flag=True, help="Queries are full frames: every detected person becomes a query.")
@click.option("--largest", is_flag=True, help="With --detect: only the largest person of each frame.")
@click.option("--group-by", "group_by", metavar="KEYS",
              help="Search several images of one person as one query: person_id, camera, folder (one folder per "
                   "person) or input (one QUERY argument per person), or several joined by commas.")
@click.option("--fuse", "fusion", type=click.Choice(["mean", "min"]), default="mean", show_default=True,
              help="With --group-by: mean = the members' mean vector, renormalised; min = best-of (each gallery "
                   "item's smallest distance to any member).")
@click.option("--since", help="Only gallery detections at or after this time (ISO 8601, cameras' local time).")
@click.option("--until", help="Only gallery detections at or before this time (ISO 8601).")
@click.option("--camera", "cameras", multiple=True, help="Only gallery detections of this camera (repeatable).")
@click.option("--exclude-same-camera", is_flag=True,
              help="Leave out gallery detections from the query's own camera(s).")
@click.option("--exclude-self", is_flag=True,
              help="Leave out gallery detections from the query's own image (the query itself, when indexed).")
@click.option("--min-score", type=click.FloatRange(0, 1), help="Only gallery detections with at least this "
                                                               "detection score (crops have 1.0).")
@click.option("--trajectory", is_flag=True,
              help="Also write each query's sightings as a time-ordered path: OUT's name + .trajectory.parquet.")
@click.option("--accept-rank", type=click.IntRange(1), default=200, show_default=True,
              help="Sighting rule (trajectory and report): rank at most this ...")
@click.option("--accept-distance", type=click.FloatRange(0, 2), default=0.08, show_default=True,
              help="... and cosine distance at most this (chosen on Con-ReID's training identities for "
                   "osnet_x0_25_msmt17; see docs/query.md).")
@rerank_options
@click.option("--candidates", type=click.IntRange(1), default=400, show_default=True,
              help="With --rerank: each query's top candidates that are re-ranked (then cut to --top-k). Fewer "
                   "is faster; on Con-ReID 100 lost up to 1.2 mAP against exact re-ranking, 400 at most 0.18.")
@click.option("--nprobe", type=click.IntRange(1), help="IVF lists searched [default: the calibrated one].")
@click.option("--metrics", "score", is_flag=True,
              help="Also report mAP/rank-k/mINP from the labels (Market-1501 names or manifest labels); only "
                   "meaningful when queries and gallery share one label space.")
@click.option("--weights", "-w", help="Check the gallery was embedded with these weights [default: the gallery's own].")
@backend_option
@device_option
@gpu_option
@max_pixels_option
@json_option
def query(gallery, queries, out, report, report_top, top_k, detect, largest, group_by, fusion, since, until, cameras,
          exclude_same_camera, exclude_self, min_score, trajectory, accept_rank, accept_distance, rerank,
          rerank_preset, k1, k2, lambda_value, candidates, nprobe, score, weights, backend, device, gpu, max_pixels,
          as_json):
    """Find where the people in QUERIES appear in GALLERY.

    QUERIES are crop images, folders, globs or manifests (.toml). Each person is embedded with
    the gallery's own embedder and searched in its index; OUT gets one row per (query, rank)
    (schema: docs/schemas.md). An image where nothing is detected gets a status row. Filters
    (--since/--until/--camera/--exclude-same-camera/--exclude-self/--min-score) are applied
    inside the search: every query still gets its --top-k best among what passes. When
    queries and gallery share labels (Market-1501 names or manifest labels), --metrics reports
    mAP/rank-k (matches beyond --top-k count as missed). Example:

      reidx query out/gallery crops/ --out results.parquet --report results.html --trajectory
    """
    if largest and not detect:
        raise click.UsageError("--largest needs --detect")
    if report is not None and not report.lower().endswith((".html", ".htm")):
        raise click.UsageError(f"--report {report!r} must end with .html")
    from reidx.indexers.filters import SearchFilter, parse_time
    from reidx.indexers.query import run_query
    from reidx.indexers.query_groups import parse_group_by
    from reidx.indexers.rerank import params_from_options

    try:
        keys = parse_group_by(group_by)
        search_filter = SearchFilter(since=parse_time(since, "--since"), until=parse_time(until, "--until"),
                                     cameras=tuple(cameras), exclude_same_camera=exclude_same_camera,
                                     exclude_self=exclude_self, min_score=min_score)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    params = params_from_options(rerank, preset=rerank_preset, k1=k1, k2=k2, lambda_value=lambda_value)
    summary = run_query(gallery, list(queries), out, top_k=top_k, detect=detect, largest=largest, rerank=rerank,
                        rerank_params=params, candidates=candidates, nprobe=nprobe, weights=weights,
                        backend=backend, device=device, gpu=gpu, max_pixels=max_pixels, progress=_progress(),
                        score=score, search_filter=search_filter, group_by=keys, fusion=fusion)
    if trajectory or report:
        import pyarrow.parquet as pq

        results = pq.read_table(out)
    if trajectory:
        from reidx.indexers.trajectory import trajectory_path, write_trajectories

        summary["trajectory"] = write_trajectories(results, trajectory_path(out), accept_rank, accept_distance)
    if report:
        from reidx.indexers.report import write_report
        from reidx.indexers.versions import load_index

        summary["report"] = write_report(results, load_index(gallery, gpu="off").items, report, top_n=report_top,
                                         max_pixels=max_pixels, rank_max=accept_rank, distance_max=accept_distance)

    def text(r):
        groups = f" in {r['query_groups']} groups" if "query_groups" in r else ""
        yield f"{r['query_persons']} query persons{groups} → {r['rows']} rows in {out} ({r['wall_s']} s)"
        if r["images_without_person"] or r["images_failed"]:
            yield f"  {r['images_without_person']} images without a person, {r['images_failed']} failed"
        if "metrics" in r:
            m = r["metrics"]
            yield (f"  labelled: mAP {m['mAP']:.2f}%, rank-1 {m['rank1']:.2f}% over {m['queries']} queries "
                   f"(top-{r['top_k']} lists)")
        if "trajectory" in r:
            t = r["trajectory"]
            yield f"  trajectory: {t['sightings']} sightings in {t['segments']} segments → {t['out']}"
        if report:
            yield f"  report: {report}"
    _emit(summary, as_json, text)


@main.command()
@click.argument("gallery", type=click.Path(exists=True, file_okay=False))
@_out(".parquet", help="Output Parquet file.")
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

    started = time.perf_counter()
    summary = export_detections(gallery, out, where=where, columns=columns.split(",") if columns else None,
                                with_embeddings=with_embeddings, timeout=timeout)
    summary["wall_s"] = round(time.perf_counter() - started, 2)
    _emit(summary, as_json, lambda r: [f"{r['persons']} detections → {out}"])


# --- fine-tuning ---------------------------------------------------------------------------------

LOSS_NAMES = ("id", "triplet", "oim")  # = reidx.pipeline.training.LOSSES (checked by a test; no import here)


def parse_losses(spec: str, weights: dict[str, float]) -> dict[str, float]:
    """``"id+triplet"`` and per-loss weights → {"id": w_id, "triplet": w_triplet}."""
    names = [name.strip().lower() for name in spec.split("+") if name.strip()]
    unknown = [n for n in names if n not in LOSS_NAMES]
    if not names or unknown or len(set(names)) != len(names):
        raise click.BadParameter(f"{spec!r}: combine distinct names from {', '.join(LOSS_NAMES)} with '+', "
                                 f"e.g. id+triplet", param_hint="--loss")
    return {name: weights[name] for name in names}


@main.command()
@click.option("--data", required=True,
              help="Training crops: a folder (or glob) in Market-1501 naming (PPPP_cC…) or a CSV/Parquet "
                   "label table (path, person_id, camera). Person ids ≤ 0 count as unlabelled.")
@click.option("--init", default=DEFAULT_WEIGHTS, show_default=True,
              help="Weights to start from (file path or known name), or 'none' to train from scratch.")
@click.option("--arch", default="osnet_x0_25", show_default=True,
              help="OSNet width when training from scratch (a checkpoint's own width is used otherwise).")
@_out(".pth", ".pt", help="Final checkpoint (.pth); the per-epoch resume checkpoint goes beside it as "
                          "<name>.resume.pth.")
@click.option("--loss", "loss_spec", default="id+triplet", show_default=True,
              help="Losses to combine with '+': id (label-smoothed cross-entropy), triplet (batch-hard), "
                   "oim (online instance matching).")
@click.option("--id-weight", type=click.FloatRange(0, min_open=True), default=1.0, show_default=True)
@click.option("--triplet-weight", type=click.FloatRange(0, min_open=True), default=1.0, show_default=True)
@click.option("--oim-weight", type=click.FloatRange(0, min_open=True), default=1.0, show_default=True)
@click.option("--margin", type=click.FloatRange(0), default=0.3, show_default=True,
              help="Triplet margin (ignored with --soft-margin).")
@click.option("--soft-margin", is_flag=True, help="Triplet soft margin: log(1 + exp(d_ap − d_an)).")
@click.option("--oim-scale", type=click.FloatRange(0, min_open=True), default=30.0, show_default=True,
              help="OIM 1/τ: similarities are multiplied by this before the softmax.")
@click.option("--oim-momentum", type=click.FloatRange(0, 1, max_open=True), default=0.5, show_default=True,
              help="OIM γ: table rows move as v ← γ·v + (1−γ)·x.")
@click.option("--oim-queue", type=click.IntRange(0), default=5000, show_default=True,
              help="OIM queue length for features of unlabelled crops (person id ≤ 0).")
@click.option("--epochs", type=click.IntRange(1), default=12, show_default=True)
@click.option("--p", "p", type=click.IntRange(2), default=16, show_default=True, help="Identities per batch.")
@click.option("--k", "k", type=click.IntRange(2), default=4, show_default=True, help="Images per identity per batch.")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=3.5e-4, show_default=True,
              help="Adam learning rate after warm-up.")
@click.option("--weight-decay", type=click.FloatRange(0), default=5e-4, show_default=True)
@click.option("--warmup-epochs", type=click.FloatRange(0), default=1.0, show_default=True,
              help="Linear warm-up from 1% of --lr.")
@click.option("--schedule", type=click.Choice(["cosine", "step"]), default="cosine", show_default=True,
              help="Decay after warm-up: cosine to 1% of --lr at the last epoch, or ×0.1 at each --step-epochs.")
@click.option("--step-epochs", default="", help="Comma-separated epochs for --schedule step, e.g. 8,11.")
@device_option
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="auto: bf16 autocast where the CPU/GPU supports it, else fp32.")
@click.option("--seed", type=int, default=0, show_default=True, help="Batches, augmentation and new layers.")
@click.option("--threads", type=click.IntRange(1), help="CPU threads for torch [default: one per core]. On a "
              "machine shared with other busy processes, 1 can be several times faster than 2 (docs/training.md).")
@click.option("--val-query", help="Validation query images: folder, glob or file (with --val-gallery).")
@click.option("--val-gallery", help="Validation gallery images: folder, glob or file.")
@click.option("--val-every", type=click.IntRange(0), default=0, show_default=True,
              help="Validate every N epochs as well as after the last (0: after the last only).")
@click.option("--resume", is_flag=True, help="Continue exactly from the last finished epoch of this --out.")
@json_option
def train(data, init, arch, out, loss_spec, id_weight, triplet_weight, oim_weight, margin, soft_margin, oim_scale,
          oim_momentum, oim_queue, epochs, p, k, lr, weight_decay, warmup_epochs, schedule, step_epochs, device,
          precision, seed, threads, val_query, val_gallery, val_every, resume, as_json):
    """Fine-tune an OSNet embedder on labelled person crops.

    Starts from a published checkpoint (default osnet_x0_25_msmt17) with a new classifier sized
    to the training identities; batches hold P identities × K images, augmented by flip,
    pad-and-crop and random erasing. The final checkpoint loads like published weights:

    \b
      reidx train --data DATA/bounding_box_train --out model.pth
      reidx evaluate --query DATA/query --gallery DATA/bounding_box_test --weights model.pth
    """
    try:
        steps = [int(s) for s in step_epochs.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(f"{step_epochs!r}: give comma-separated epoch numbers, e.g. 8,11",
                                 param_hint="--step-epochs") from None
    if schedule == "step" and not steps:
        raise click.UsageError("--schedule step needs --step-epochs, e.g. --step-epochs 8,11")
    losses = parse_losses(loss_spec, {"id": id_weight, "triplet": triplet_weight, "oim": oim_weight})
    from reidx.indexers.evaluation import checkpoint_validator
    from reidx.pipeline.training.loop import TrainConfig, train as run_training

    config = TrainConfig(
        data=str(data), out=str(out), init=None if init.lower() == "none" else init, arch=arch, losses=losses,
        epochs=epochs, p=p, k=k, lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs, schedule=schedule,
        step_epochs=steps, margin=margin, soft_margin=soft_margin, oim_scale=oim_scale, oim_momentum=oim_momentum,
        oim_queue=oim_queue, device=device, precision=precision, seed=seed, threads=threads,
        val_query=val_query, val_gallery=val_gallery, val_every=val_every,
    )
    validate = checkpoint_validator(val_query, val_gallery, device) if val_query and val_gallery else None
    summary = run_training(config, resume=resume, progress=_progress(), log=_log, validate=validate)

    def text(r):
        yield (f"trained {r['epochs']} epochs on {r['num_images']} crops of {r['num_identities']} identities "
               f"({r['precision']}, {r['device']}, {r['train_images_per_s']} images/s, {r['wall_s']} s) → {r['out']}")
        if r.get("validation"):
            yield f"validation: mAP {r['validation']['mAP']:.2f}%, rank-1 {r['validation']['rank1']:.2f}%"
    _emit(summary, as_json, text)


if __name__ == "__main__":
    main()
