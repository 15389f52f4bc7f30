"""The fine-tuning loop: OSNet from a published checkpoint (or from scratch) on labelled crops.

One function, :func:`train`, that the CLI and the tests call. What it does, and why:

- Adam with a linear warm-up (the new classifier starts random; full-rate steps at once would
  push large, noisy gradients into the pretrained features) then cosine or step decay.
- bf16 autocast where the hardware supports it (``precision="auto"``), on CPU and GPU; the
  losses are computed in fp32.
- After every epoch a *resume checkpoint* (``<out stem>.resume.pth``) holds the model, the
  optimizer, OIM's memory and the history; batches and augmentation are a pure function of
  (seed, epoch), so ``resume=True`` continues exactly as an uninterrupted run would.
- Optional validation every N epochs runs :func:`indexers.evaluation.embed_side` and
  :func:`~indexers.evaluation.evaluate_split` on the checkpoint just written, through
  :func:`pipeline.embed.build_embedder`: the same code and numbers as ``reidx evaluate``.
- The final checkpoint is torchreid's layout under ``state_dict`` (features + the new
  classifier, which inference ignores) plus plain metadata under ``reidx_training`` (base model
  and its sha256, training data hash, losses, epochs, history), so ``reidx evaluate``,
  ``embed`` and ``index`` load it like a published file.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from reidx.pipeline.embed import resolve_device
from reidx.pipeline.models.osnet import OSNET_CHANNELS, build_osnet, infer_osnet_arch, load_osnet_state
from reidx.pipeline.models.weights import load_state_dict, resolve_weights
from reidx.pipeline.training.augment import Augment
from reidx.pipeline.training.data import TrainingSet, load_training_set
from reidx.pipeline.training.losses import BatchHardTripletLoss, IdentityLoss, OIMLoss, oim_logits
from reidx.pipeline.training.sampler import PKSampler

LOSSES = ("id", "triplet", "oim")
CHECKPOINT_FORMAT = 1
# Options that may change between a run and its resumption (device and threads change float rounding only).
RESUME_MAY_DIFFER = {"out", "device", "threads", "val_query", "val_gallery", "val_every"}
LOG_EVERY_S = 60.0  # without a progress bar, one progress line per minute (for logs of long runs)


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in every checkpoint)."""

    data: str
    out: str
    init: str | None = "osnet_x0_25_msmt17"  # weights to start from; None trains from scratch
    arch: str = "osnet_x0_25"  # used only from scratch (a checkpoint's width is read from it)
    losses: dict[str, float] = field(default_factory=lambda: {"id": 1.0, "triplet": 1.0})
    epochs: int = 12
    p: int = 16
    k: int = 4
    lr: float = 3.5e-4
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    schedule: str = "cosine"  # or "step": ×0.1 at each of step_epochs
    step_epochs: list[int] = field(default_factory=list)
    min_lr_factor: float = 0.01  # cosine ends at lr × this
    label_smoothing: float = 0.1
    margin: float = 0.3
    soft_margin: bool = False
    oim_scale: float = 30.0  # 1/τ
    oim_momentum: float = 0.5  # γ
    oim_queue: int = 5000
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 where supported, else fp32
    seed: int = 0
    threads: int | None = None  # CPU threads for torch (None: torch's default, one per core)
    val_query: str | None = None
    val_gallery: str | None = None
    val_every: int = 0  # with a validation split: every N epochs and after the last (0: after the last only)

    def check(self) -> None:
        unknown = set(self.losses) - set(LOSSES)
        if not self.losses or unknown:
            raise ValueError(f"unknown loss(es) {sorted(unknown)}; combine {', '.join(LOSSES)} with '+'")
        if any(w <= 0 for w in self.losses.values()):
            raise ValueError("loss weights must be positive")
        if self.schedule not in ("cosine", "step"):
            raise ValueError(f"schedule must be cosine or step, not {self.schedule!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, not {self.precision!r}")
        if self.init is None and self.arch not in OSNET_CHANNELS:
            raise ValueError(f"unknown OSNet architecture {self.arch!r}; known: {', '.join(OSNET_CHANNELS)}")
        if bool(self.val_query) != bool(self.val_gallery):
            raise ValueError("validation needs both --val-query and --val-gallery")
        if self.epochs < 1:
            raise ValueError("epochs must be at least 1")


def resume_path(out: str | os.PathLike) -> Path:
    """Where the per-epoch checkpoint of a run writing ``out`` lives: ``model.pth`` → ``model.resume.pth``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.resume{out.suffix or '.pth'}")


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def learning_rate(config: TrainConfig, t: float) -> float:
    """Learning rate at fractional epoch ``t``: linear warm-up from 1 % then cosine or step decay."""
    if t < config.warmup_epochs:
        return config.lr * (0.01 + 0.99 * t / config.warmup_epochs)
    if config.schedule == "step":
        return config.lr * 0.1 ** sum(t >= s for s in config.step_epochs)
    progress = min(1.0, (t - config.warmup_epochs) / max(config.epochs - config.warmup_epochs, 1e-9))
    floor = config.min_lr_factor
    return config.lr * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def build_model(config: TrainConfig, num_classes: int) -> tuple[nn.Module, dict]:
    """OSNet (+ a classifier sized to the training identities when the id loss is on) and what it came from."""
    if config.init:
        resolved = resolve_weights(config.init, ".pth")
        if resolved.path.suffix == ".onnx":
            raise ValueError(f"{resolved.path}: training starts from a torch checkpoint (.pth), not an ONNX "
                             f"export (its BatchNorm is folded away)")
        state = load_state_dict(resolved.path)
        arch = resolved.known.arch if resolved.known else infer_osnet_arch(state)
        feature_dim = state["fc.0.weight"].shape[0] if "fc.0.weight" in state else 512
        model = build_osnet(arch, feature_dim=feature_dim)
        load_osnet_state(model, state)
        base = {"base_model": resolved.model_name, "base_sha256": resolved.sha256}
    else:
        torch.manual_seed(config.seed)
        arch, feature_dim = config.arch, 512
        model = build_osnet(arch, feature_dim=feature_dim)
        base = {"base_model": None, "base_sha256": None}
    if "id" in config.losses:
        model.classifier = nn.Linear(feature_dim, num_classes)  # torchreid's name: inference skips it
        generator = torch.Generator().manual_seed(config.seed)
        with torch.no_grad():
            model.classifier.weight.normal_(0.0, 0.01, generator=generator)
            model.classifier.bias.zero_()
    return model, {"arch": arch, "feature_dim": feature_dim, **base}


def _save_atomic(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _plain_config(config: TrainConfig) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()}


def _check_resumable(saved: dict, config: TrainConfig, data: TrainingSet, path: Path) -> None:
    meta = saved.get("reidx_training", {})
    if meta.get("data_hash") != data.data_hash:
        raise ValueError(f"{path} was trained on other data (hash {str(meta.get('data_hash'))[:12]}, now "
                         f"{data.data_hash[:12]}); resume needs the same training data")
    before, now = meta.get("config", {}), _plain_config(config)
    changed = [f"{k}: {before.get(k)!r} → {now[k]!r}" for k in now
               if k not in RESUME_MAY_DIFFER and before.get(k) != now[k]]
    if changed:
        raise ValueError(f"cannot resume {path} exactly with changed options ({'; '.join(changed)}); "
                         f"rerun with the options it was started with")


def validate(weights: Path, config: TrainConfig) -> dict:
    """mAP/CMC of a checkpoint on the validation split, by the code behind ``reidx evaluate``."""
    from reidx.indexers.evaluation import embed_side, evaluate_split
    from reidx.pipeline.embed import build_embedder

    embedder = build_embedder(str(weights), device=config.device)
    query = embed_side([config.val_query], embedder)
    gallery = embed_side([config.val_gallery], embedder)
    metrics = evaluate_split(query, gallery).as_percent_dict()
    return {k: metrics[k] for k in ("mAP", "rank1", "rank5", "mINP") if k in metrics}


def train(config: TrainConfig, resume: bool = False, progress: bool = False,
          log: Callable[[str], None] | None = None, data: TrainingSet | None = None,
          stop_after: int | None = None) -> dict:
    """Train as ``config`` says; returns a summary of the run.

    ``data`` may pass an already loaded :class:`TrainingSet` (tests reuse one). ``stop_after``
    ends this call after that many epochs, as an interruption would: ``resume=True`` goes on.
    ``config.threads`` applies during the call only (torch's thread count is per process).
    """
    config.check()
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _train(config, resume, progress, log or (lambda line: None), data, stop_after)
    finally:
        torch.set_num_threads(threads)


def _train(config: TrainConfig, resume: bool, progress: bool, log: Callable[[str], None],
           data: TrainingSet | None, stop_after: int | None) -> dict:
    from tqdm import tqdm

    started = time.perf_counter()
    device = resolve_device(config.device)
    use_bf16 = config.precision == "bf16" or (config.precision == "auto" and bf16_supported(device))
    if config.precision == "bf16" and not bf16_supported(device):
        raise ValueError(f"bf16 was asked for, but this {device.type} does not support it; use --precision fp32")

    if data is None:
        data = load_training_set(config.data, progress=progress)
    num_unlabelled = int((data.targets < 0).sum())
    log(f"training data: {len(data.paths)} crops, {data.num_classes} identities, {num_unlabelled} unlabelled"
        + "".join(f"; skipped {n}: {reason}" for reason, n in data.skipped.items()))

    model, origin = build_model(config, data.num_classes)
    id_loss = IdentityLoss(config.label_smoothing)
    triplet_loss = BatchHardTripletLoss(config.margin, config.soft_margin)
    oim = None
    if "oim" in config.losses:
        oim = OIMLoss(data.num_classes, origin["feature_dim"], config.oim_queue, config.oim_scale, config.oim_momentum)
        oim.to(device)
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    state_path, out = resume_path(config.out), Path(config.out)
    start_epoch, history = 0, []
    if resume:
        if not state_path.is_file():
            raise FileNotFoundError(f"nothing to resume: {state_path} does not exist (it is written after each epoch)")
        saved = torch.load(state_path, map_location=device, weights_only=True)
        _check_resumable(saved, config, data, state_path)
        model.load_state_dict(saved["state_dict"])
        optimizer.load_state_dict(saved["optimizer"])
        if oim is not None:
            oim.load_state_dict(saved["oim"])
        start_epoch, history = saved["epoch"], saved["reidx_training"]["history"]
        log(f"resuming after epoch {start_epoch} from {state_path}")

    metadata = {"format": CHECKPOINT_FORMAT, **origin, "data": str(config.data), "data_hash": data.data_hash,
                "num_images": len(data.paths), "num_identities": data.num_classes, "person_ids": data.person_ids,
                "losses": dict(config.losses), "precision": "bf16" if use_bf16 else "fp32",
                "config": _plain_config(config), "torch": str(torch.__version__)}
    sampler = PKSampler(data.targets, config.p, config.k, config.seed,
                        unlabelled=config.k if "oim" in config.losses else 0)
    augment = Augment()
    step_seconds, step_images = 0.0, 0

    end_epoch = config.epochs if stop_after is None else min(config.epochs, start_epoch + stop_after)
    for epoch in range(start_epoch, end_epoch):
        batches = sampler.epoch(epoch)
        rng = np.random.default_rng([config.seed, epoch, 1])  # augmentation of this epoch
        model.train()
        totals = {"loss": 0.0, "correct": 0, "labelled": 0, "images": 0}
        epoch_start = last_log = time.perf_counter()
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch", disable=not progress)
        for i, batch in enumerate(bar):
            tick = time.perf_counter()
            lr = learning_rate(config, epoch + i / len(batches))
            for group in optimizer.param_groups:
                group["lr"] = lr
            x = augment(data.crops(batch), rng).to(device, non_blocking=True)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            y = torch.from_numpy(data.targets[batch]).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                features = model(x)
                logits = model.classifier(features) if "id" in config.losses else None
            features = features.float()
            terms = {}
            if "id" in config.losses:
                terms["id"] = id_loss(logits.float(), y)
            if "triplet" in config.losses:
                terms["triplet"] = triplet_loss(features, y)
            if oim is not None:
                if logits is None:  # accuracy from the OIM table when there is no classifier
                    with torch.no_grad():
                        x_unit = torch.nn.functional.normalize(features, dim=1)
                        logits = oim_logits(x_unit, oim.lut, oim.queue[:0], config.oim_scale)
                terms["oim"] = oim(features, y)
            loss = sum(config.losses[name] * value for name, value in terms.items())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

            labelled = y >= 0
            totals["loss"] += float(loss.detach()) * len(batch)
            if logits is not None:
                totals["correct"] += int((logits.detach().argmax(1) == y)[labelled].sum())
                totals["labelled"] += int(labelled.sum())
            totals["images"] += len(batch)
            step_seconds += time.perf_counter() - tick
            step_images += len(batch)
            status = {"loss": f"{totals['loss'] / totals['images']:.3f}",
                      "acc": f"{totals['correct'] / max(totals['labelled'], 1):.3f}",
                      "img_s": f"{step_images / step_seconds:.1f}", "lr": f"{lr:.2e}"}
            bar.set_postfix(status)
            if not progress and time.perf_counter() - last_log > LOG_EVERY_S:
                last_log = time.perf_counter()
                log(f"epoch {epoch + 1}/{config.epochs} batch {i + 1}/{len(batches)}: "
                    + ", ".join(f"{k} {v}" for k, v in status.items()))
        bar.close()
        seconds = time.perf_counter() - epoch_start
        record = {"epoch": epoch + 1, "loss": round(totals["loss"] / totals["images"], 5),
                  "accuracy": round(totals["correct"] / max(totals["labelled"], 1), 5),
                  "images": totals["images"], "seconds": round(seconds, 2),
                  "images_per_s": round(totals["images"] / seconds, 1), "lr": lr}
        history.append(record)
        checkpoint = {"state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
                      "oim": oim.state_dict() if oim is not None else {},
                      "epoch": epoch + 1, "reidx_training": {**metadata, "epochs": epoch + 1, "history": history}}
        _save_atomic(checkpoint, state_path)
        last = epoch + 1 == config.epochs
        if config.val_query and (last or (config.val_every and (epoch + 1) % config.val_every == 0)):
            record["validation"] = validate(state_path, config)
            _save_atomic(checkpoint, state_path)  # now with the validation in its history
        log(f"epoch {epoch + 1}/{config.epochs}: loss {record['loss']:.4f}, accuracy {record['accuracy']:.3f}, "
            f"{record['images_per_s']} images/s, {seconds:.0f} s"
            + (f", val mAP {record['validation']['mAP']:.2f} rank-1 {record['validation']['rank1']:.2f}"
               if "validation" in record else ""))

    epochs_done = len(history)
    final = {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
             "reidx_training": {**metadata, "epochs": epochs_done, "history": history}}
    _save_atomic(final, out)
    summary = {"out": str(out), "resume_checkpoint": str(state_path), "epochs": epochs_done,
               "validation": history[-1].get("validation") if history else None,
               "base_model": origin["base_model"], "data_hash": data.data_hash, "num_images": len(data.paths),
               "num_identities": data.num_classes, "losses": dict(config.losses),
               "precision": metadata["precision"], "device": device.type,
               "train_images_per_s": round(step_images / step_seconds, 1) if step_seconds else None,
               "final_loss": history[-1]["loss"] if history else None,
               "first_loss": history[0]["loss"] if history else None, "history": history}
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    return summary
