"""``reidx train``: the click command over :func:`pipeline.training.loop.train` (registered in cli.py)."""

from __future__ import annotations

import json
import sys

import click

from reidx.pipeline.training.loop import LOSSES, TrainConfig

DEFAULT_INIT = "osnet_x0_25_msmt17"


def parse_losses(spec: str, weights: dict[str, float]) -> dict[str, float]:
    """``"id+triplet"`` and per-loss weights → {"id": w_id, "triplet": w_triplet}."""
    names = [name.strip().lower() for name in spec.split("+") if name.strip()]
    unknown = [n for n in names if n not in LOSSES]
    if not names or unknown or len(set(names)) != len(names):
        raise ValueError(f"--loss {spec!r}: combine distinct names from {', '.join(LOSSES)} with '+', "
                         f"e.g. id+triplet")
    return {name: weights[name] for name in names}


@click.command("train")
@click.option("--data", required=True,
              help="Training crops: a folder (or glob) in Market-1501 naming (PPPP_cC…) or a CSV/Parquet "
                   "label table (path, person_id, camera). Person ids ≤ 0 count as unlabelled.")
@click.option("--init", default=DEFAULT_INIT, show_default=True,
              help="Weights to start from (file path or known name), or 'none' to train from scratch.")
@click.option("--arch", default="osnet_x0_25", show_default=True,
              help="OSNet width when training from scratch (a checkpoint's own width is used otherwise).")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False),
              help="Final checkpoint (.pth); the per-epoch resume checkpoint goes beside it as <name>.resume.pth.")
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
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="auto uses CUDA when torch sees a GPU.")
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
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def train(data, init, arch, out, loss_spec, id_weight, triplet_weight, oim_weight, margin, soft_margin, oim_scale,
          oim_momentum, oim_queue, epochs, p, k,
          lr, weight_decay, warmup_epochs, schedule, step_epochs, device, precision, seed, threads, val_query,
          val_gallery, val_every, resume, as_json):
    """Fine-tune an OSNet embedder on labelled person crops.

    Starts from a published checkpoint (default osnet_x0_25_msmt17) with a new classifier sized
    to the training identities; batches hold P identities × K images, augmented by flip,
    pad-and-crop and random erasing. The final checkpoint loads like published weights:

    \b
      reidx train --data DATA/bounding_box_train --out model.pth
      reidx evaluate --query DATA/query --gallery DATA/bounding_box_test --weights model.pth
    """
    from reidx.pipeline.training.loop import train as run_training

    try:
        steps = [int(s) for s in step_epochs.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--step-epochs {step_epochs!r}: give comma-separated epoch numbers, e.g. 8,11") from None
    if schedule == "step" and not steps:
        raise ValueError("--schedule step needs --step-epochs, e.g. --step-epochs 8,11")
    config = TrainConfig(
        data=str(data), out=str(out), init=None if init.lower() == "none" else init, arch=arch,
        losses=parse_losses(loss_spec, {"id": id_weight, "triplet": triplet_weight, "oim": oim_weight}),
        epochs=epochs, p=p, k=k, lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs, schedule=schedule,
        step_epochs=steps, margin=margin, soft_margin=soft_margin, oim_scale=oim_scale, oim_momentum=oim_momentum,
        oim_queue=oim_queue, device=device, precision=precision, seed=seed, threads=threads,
        val_query=val_query, val_gallery=val_gallery, val_every=val_every,
    )
    summary = run_training(config, resume=resume, progress=sys.stderr.isatty(),
                           log=lambda line: click.echo(line, err=True))
    if as_json:
        click.echo(json.dumps(summary))
        return
    click.echo(f"trained {summary['epochs']} epochs on {summary['num_images']} crops of {summary['num_identities']} "
               f"identities ({summary['precision']}, {summary['device']}, {summary['train_images_per_s']} images/s, "
               f"{summary['wall_s']} s) → {summary['out']}")
    if summary.get("validation"):
        v = summary["validation"]
        click.echo(f"validation: mAP {v['mAP']:.2f}%, rank-1 {v['rank1']:.2f}%")
