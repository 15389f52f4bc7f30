"""Commands that run the models on image files: embed, evaluate, detect, evaluate-detections, train."""

from __future__ import annotations

import time

import click

from reidx.commands.common import (DEFAULT_DETECTOR, DEFAULT_WEIGHTS, _emit, _log, _options, _out, _progress,
                                   backend_option, batch_size_option, device_option, embedder_options, json_option,
                                   max_pixels_option, rerank_options)


@click.command()
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


@click.command()
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


@click.command()
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


@click.command("evaluate-detections")
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


# --- fine-tuning ---------------------------------------------------------------------------------

LOSS_NAMES = ("id", "triplet", "oim")  # = reidx.pipeline.training.LOSSES (checked by a test; no import here)
# = reidx.pipeline.training.WISE_ALPHA, BASE_SHARE, DISTILL_WEIGHT, HEAD_INIT, RECOMPUTE_BN (likewise)
WISE_ALPHA, BASE_SHARE, DISTILL_WEIGHT, HEAD_INIT, RECOMPUTE_BN = 0.8, 0.0, 0.0, "probe", False


def parse_losses(spec: str, weights: dict[str, float]) -> dict[str, float]:
    """``"id+triplet"`` and per-loss weights → {"id": w_id, "triplet": w_triplet}."""
    names = [name.strip().lower() for name in spec.split("+") if name.strip()]
    unknown = [n for n in names if n not in LOSS_NAMES]
    if not names or unknown or len(set(names)) != len(names):
        raise click.BadParameter(f"{spec!r}: combine distinct names from {', '.join(LOSS_NAMES)} with '+', "
                                 f"e.g. id+triplet", param_hint="--loss")
    return {name: weights[name] for name in names}


def parse_stages(spec: str) -> list[str] | None:
    """``"all"`` → None (every stage learns); ``"conv1,fc"`` → ["conv1", "fc"] (checked by TrainConfig)."""
    return None if spec.strip().lower() == "all" else [name.strip() for name in spec.split(",")]


@click.command()
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
@click.option("--triplet-normalise", is_flag=True,
              help="Triplet distances between L2-normalised features (the cosine geometry retrieval ranks by; "
                   "the margin is then on the unit sphere, distances 0–2).")
@click.option("--id-margin", type=click.FloatRange(0, 1, max_open=True),
              help="The id loss on a cosine classifier with this additive margin (CosFace: "
                   "30·(cos θ − margin) on the true class) instead of the linear softmax classifier. "
                   "[default: unset, the linear classifier]")
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
              help="Validate every N epochs as well (0: only the output, at the end).")
@click.option("--val-other", nargs=2, metavar="QUERY GALLERY",
              help="A second domain's query and gallery: at the end the base and the output weights are "
                   "scored on it (and on --val-query/--val-gallery), so what fine-tuning costs elsewhere shows.")
@click.option("--wise-alpha", type=click.FloatRange(0, 1),
              help=f"WiSE-FT: the output is (1 − α)·base + α·fine-tuned weights (1: plain fine-tuning). A "
                   f"finished run re-mixed with --resume and another α is not trained again. [default: "
                   f"{WISE_ALPHA}; 1 with --init none]")
@click.option("--distill-weight", type=click.FloatRange(0),
              help=f"λ of a cosine feature-distillation loss towards the frozen base model (0: off). [default: "
                   f"{DISTILL_WEIGHT}; 0 with --init none]")
@click.option("--distill-view", type=click.Choice(["same", "photometric"]), default="same", show_default=True,
              help="What the distillation term sees: the training batch itself, or a copy with strong "
                   "brightness/contrast/colour/resolution changes (holds the base where the site's images "
                   "say nothing).")
@click.option("--train-stages", default="all", show_default=True,
              help="Surgical fine-tuning: the OSNet stages that learn, comma-separated from conv1 (the stem) "
                   "… conv5, fc; the others keep the base's weights and BatchNorm statistics.")
@click.option("--domain-gate/--no-domain-gate", default=None,
              help="Keep the base model's features on crops unlike the training site's: the checkpoint holds "
                   "both networks and a label-free gate (from the training crops' base features) that gives "
                   "each crop the fine-tuned, the base or a mixed feature; embedding then takes ~2× as long "
                   "(docs/training.md). [default: on; off with --init none]")
@click.option("--base-share", type=click.FloatRange(0, 1, max_open=True),
              help="With the domain gate: crops of the training site get the tuned network's features mixed "
                   "with this share of the base's (an ensemble of the two networks, which both run anyway; "
                   "docs/training.md says where it helped and where it hurt); 0: the tuned network's alone. "
                   "A finished run re-made with --resume and another share is not trained again. "
                   f"[default: {BASE_SHARE:g}]")
@click.option("--head-init", type=click.Choice(["random", "probe"]),
              help="The new classifier's start: random, or probe: first fitted on the base's frozen features "
                   "of the training crops (LP-FT), so the first steps do not push noise into the features. "
                   f"[default: {HEAD_INIT}; random with --init none or without the id loss]")
@click.option("--recompute-bn/--no-recompute-bn", default=None,
              help="Recompute the output's BatchNorm statistics on the un-augmented training crops after the "
                   "WiSE-FT mix (whose interpolated statistics fit the mixed network only roughly; training "
                   "saw augmented crops only); about a minute. A finished run re-made with --resume and the "
                   f"other setting is not trained again. [default: {'on' if RECOMPUTE_BN else 'off'}]")
@click.option("--soup-with", "soup_with", multiple=True, type=click.Path(exists=True, dir_okay=False), metavar="RUN",
              help="Repeatable: the resume checkpoint (MODEL.resume.pth) of a finished run that differs from this "
                   "one only in --seed. The tuned network is then the element-wise mean of theirs and this run's "
                   "(a model soup), before the WiSE-FT mix: one network, embedding costs what one run's does. "
                   "A finished run re-made with --resume and other --soup-with runs is not trained again.")
@click.option("--resume", is_flag=True, help="Continue exactly from the last finished epoch of this --out (or re-make "
                                             "a finished run's output). Without it, an --out whose resume checkpoint "
                                             "exists is refused rather than trained over.")
@json_option
def train(data, init, arch, out, loss_spec, id_weight, triplet_weight, oim_weight, margin, soft_margin,
          triplet_normalise, id_margin, oim_scale, oim_momentum, oim_queue, epochs, p, k, lr, weight_decay,
          warmup_epochs, schedule, step_epochs, device, precision, seed, threads, val_query, val_gallery, val_every,
          val_other, wise_alpha, distill_weight, distill_view, train_stages, domain_gate, base_share, head_init,
          recompute_bn, soup_with, resume, as_json):
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
        step_epochs=steps, margin=margin, soft_margin=soft_margin, triplet_normalise=triplet_normalise,
        id_margin=id_margin, oim_scale=oim_scale, oim_momentum=oim_momentum,
        oim_queue=oim_queue, device=device, precision=precision, seed=seed, threads=threads,
        val_query=val_query, val_gallery=val_gallery, val_every=val_every,
        val_other=list(val_other) if val_other else None, wise_alpha=wise_alpha, distill_weight=distill_weight,
        distill_view=distill_view, train_stages=parse_stages(train_stages), domain_gate=domain_gate,
        base_share=base_share, head_init=head_init, recompute_bn=recompute_bn,
        soup_with=[str(path) for path in soup_with] or None,
    )
    validate = checkpoint_validator(device, threads) if val_query or val_other else None
    try:
        summary = run_training(config, resume=resume, progress=_progress(), log=_log, validate=validate)
    except KeyboardInterrupt as exc:
        from reidx.pipeline.training.loop import resume_path

        kept = resume_path(out)
        exc.rerun = (f"rerun the same command with --resume to go on from the last epoch kept in {kept}"
                     if kept.is_file() else "no epoch had finished; rerun the same command to start again")
        raise

    def text(r):
        speed = f"{r['train_images_per_s']} images/s" if r["train_images_per_s"] else "no epoch left: re-mixed only"
        yield (f"trained {r['epochs']} epochs on {r['num_images']} crops of {r['num_identities']} identities "
               f"({r['precision']}, {r['device']}, {speed}, {r['wall_s']} s, WiSE-FT α {r['wise_alpha']:g}"
               f"{', domain gate' if r['domain_gate'] else ''}) "
               f"→ {r['out']}")
        for side, e in r["evaluation"].items():
            before = f"{e['base']['mAP']:.2f}% (base) → " if e["base"] else ""
            yield (f"{side} ({e['query']} vs {e['gallery']}): mAP {before}{e['fine_tuned']['mAP']:.2f}%"
                   + (f" ({e['delta_mAP']:+.2f})" if e["delta_mAP"] is not None else "")
                   + f", rank-1 {e['fine_tuned']['rank1']:.2f}%")
    _emit(summary, as_json, text)
