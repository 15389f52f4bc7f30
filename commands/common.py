"""The command line's shared vocabulary: options that mean the same in every command, and how
commands report (one JSON object with ``--json``, human lines otherwise; logs for monitors).

Only click is imported here: commands import what they run inside their bodies.
"""

from __future__ import annotations

import json
import logging
import sys

import click

DEFAULT_WEIGHTS = "osnet_x0_25_msmt17"
DEFAULT_DETECTOR = "yolox_nano.onnx"
DEFAULT_MAX_PIXELS = 50_000_000  # = reidx.pipeline.imaging.DEFAULT_MAX_PIXELS (checked by a test; no import here)
EXIT_USER_ERROR, EXIT_INTERRUPTED = 1, 130
LOG = logging.getLogger("reidx")



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
    click.option("--rerank-preset", type=click.Choice(["adaptive", "safe", "published"]), default="adaptive",
                 show_default=True,
                 help="Parameters --k1/--k2/--lambda start from: adaptive (the safe values at a strength each "
                      "gallery's and query's own neighbour structure decide: none where people have 1-2 images; "
                      "docs/reranking.md), safe (those values at full strength) or published (the papers')."),
    click.option("--k1", type=click.IntRange(1),
                 help="k-reciprocal neighbourhood size (k-reciprocal: safe 15, published 20, adaptive 15 or 20 on "
                      "dense galleries; sim: 3 / 20)."),
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
    click.option("--embedding-dtype", type=click.Choice(["float32", "float16"]),
                 help="Store new embeddings in the shards as this type; float16 halves shard bytes and reads "
                      "(Con-ReID mAP moves < 0.005 points). Recorded in gallery.json: later runs keep it "
                      "[default: the gallery's, float32 for a new one]."),
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
    click.option("--type", "index_type", type=click.Choice(["auto", "flat", "ivf-flat", "ivf-sq8", "ivf-pq", "hnsw"]),
                 default="auto", show_default=True,
                 help="auto: the memory budget decides — exact (flat) up to 100,000 detections, then ivf-sq8, "
                      "then ivf-pq (re-ranked from the vectors on disk) when ivf-sq8 would not fit (nlist ≈ 4·√N). "
                      "ivf-sq8: 4× less memory than ivf-flat; ivf-pq: 32× less. hnsw (only when asked for): "
                      "a graph held in RAM (≈ 4·d + 270 bytes per detection), for galleries without the "
                      "cluster structure IVF needs (docs/search.md); CPU only."),
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
