"""The fine-tuning loop: OSNet from a published checkpoint (or from scratch) on labelled crops.

One function, :func:`train`, that the CLI and the tests call. What it does, and why:

- Adam with a linear warm-up (the new classifier starts random; full-rate steps at once would
  push large, noisy gradients into the pretrained features) then cosine or step decay.
- bf16 autocast where the hardware supports it (``precision="auto"``), on CPU and GPU; the
  losses are computed in fp32.
- After every epoch a *resume checkpoint* (``<out stem>.resume.pth``) holds the model, the
  optimizer, OIM's memory and the history; batches and augmentation are a pure function of
  (seed, epoch), so ``resume=True`` continues exactly as an uninterrupted run would.
- Optional validation every N epochs scores the checkpoint just written with a ``validate``
  function the caller passes (``reidx train`` passes
  :func:`reidx.indexers.evaluation.checkpoint_validator`: the same code and numbers as
  ``reidx evaluate``); training itself never imports the indexers. At the end the base and the
  output weights are both scored on the validation split and on a second domain (``val_other``),
  so what fine-tuning costs elsewhere is in the summary.
- Forgetting (:mod:`.retention`): ``wise_alpha`` < 1 writes ``(1 − α)·base + α·fine-tuned``
  weights (WiSE-FT); ``distill_weight`` > 0 adds a cosine feature-distillation loss towards the
  frozen base model; ``recompute_bn`` refits the output's BatchNorm statistics to the mixed
  network on the clean training crops. A finished run given ``resume=True`` with another
  ``wise_alpha`` only re-mixes and re-scores its output (the resume checkpoint keeps the unmixed
  weights).
- The final checkpoint is torchreid's layout under ``state_dict`` (features + the new
  classifier, which inference ignores) plus plain metadata under ``reidx_training`` (base model
  and its sha256, training data hash, losses, epochs, history), so ``reidx evaluate``,
  ``embed`` and ``index`` load it like a published file.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from reidx.pipeline.models.osnet import build_osnet
from reidx.pipeline.models.registry import load_model
from reidx.pipeline.models.weights import load_checkpoint
from reidx.pipeline.runtime import resolve_device
from reidx.pipeline.training.augment import Augment, Photometric
from reidx.pipeline.training.checkpoint import (RunExistsError, check_resumable, plain_config, resume_path,
                                                save_checkpoint)
from reidx.pipeline.training.data import TrainingSet, load_training_set
from reidx.pipeline.training.head import probe_classifier
from reidx.pipeline.training.losses import (BatchHardTripletLoss, IdentityLoss, OIMLoss, identity_logits, oim_logits,
                                            with_margin)
from reidx.pipeline.training.config import TrainConfig
from reidx.pipeline.training.retention import (distillation_loss, domain_gate_entry, freeze_stages,
                                               hold_frozen_statistics, load_base, recompute_batchnorm, soup,
                                               soup_members, wise_interpolate)
from reidx.pipeline.training.sampler import PKSampler

from reidx.pipeline.training import LOSSES
CHECKPOINT_FORMAT = 1
LOG_EVERY_S = 60.0  # without a progress bar, one progress line per minute (for logs of long runs)
Validator = Callable[[str, str, str], dict]  # (weights, query, gallery) → {"mAP": …, "rank1": …} (percent)

__all__ = ["LOSSES", "TrainConfig", "build_model", "learning_rate", "resume_path", "train"]


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
        loaded = load_model(config.init, "osnet", allow_onnx=False, domain_gate=False)
        model, arch, feature_dim = loaded.module, loaded.arch, loaded.output_dim
        base = {"base_model": loaded.resolved.model_name, "base_sha256": loaded.resolved.sha256}
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


def train(config: TrainConfig, resume: bool = False, progress: bool = False,
          log: Callable[[str], None] | None = None, data: TrainingSet | None = None,
          stop_after: int | None = None, validate: Validator | None = None) -> dict:
    """Train as ``config`` says; returns a summary of the run.

    ``data`` may pass an already loaded :class:`TrainingSet` (tests reuse one). ``stop_after``
    ends this call after that many epochs, as an interruption would: ``resume=True`` goes on.
    ``validate`` scores checkpoints when ``config.val_query`` is set. ``config.threads`` applies
    during the call only (torch's thread count is per process).
    """
    config.check()
    if not resume and resume_path(config.out).is_file():  # a fresh start would overwrite an earlier run's epochs
        raise RunExistsError(f"{resume_path(config.out)} holds the finished epochs of an earlier run into "
                              f"{config.out}; add --resume to continue it (or to re-make a finished run's output "
                              f"with other output options), or delete it, or choose another --out, to start afresh")
    if (config.val_query or config.val_other) and validate is None:
        raise ValueError("validation was asked for (val_query/val_other) but no validate function was given")
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        run = _Run.start(config, resume, progress, log or (lambda line: None), data)
        end_epoch = config.epochs if stop_after is None else min(config.epochs, run.start_epoch + stop_after)
        for epoch in range(run.start_epoch, end_epoch):
            run.train_epoch(epoch, validate)
        return run.finish(validate)
    finally:
        torch.set_num_threads(threads)


@dataclass
class _Run:
    """One training run's state: model, losses, optimizer, sampler and history."""

    config: TrainConfig
    data: TrainingSet
    device: torch.device
    use_bf16: bool
    model: nn.Module
    origin: dict
    oim: OIMLoss | None
    optimizer: torch.optim.Optimizer
    progress: bool
    log: Callable[[str], None]
    started: float
    parts: dict = field(default_factory=dict)  # losses, sampler, augment: stateless, built once
    start_epoch: int = 0
    history: list = field(default_factory=list)
    step_seconds: float = 0.0
    step_images: int = 0

    @classmethod
    def start(cls, config: TrainConfig, resume: bool, progress: bool, log: Callable[[str], None],
              data: TrainingSet | None) -> "_Run":
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
        soup_with = soup_members(config.soup_with or [], config, data.data_hash)  # refused now, not after training
        model, origin = build_model(config, data.num_classes)
        freeze_stages(model, config.train_stages)
        oim = None
        if "oim" in config.losses:
            oim = OIMLoss(data.num_classes, origin["feature_dim"], config.oim_queue, config.oim_scale,
                          config.oim_momentum).to(device)
        model.to(device)
        if device.type == "cuda":
            model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        teacher = load_base(config.init).to(device) if config.distill_weight > 0 else None
        if teacher is not None and device.type == "cuda":
            teacher.to(memory_format=torch.channels_last)
        parts = {"teacher": teacher,
                 "id": IdentityLoss(config.label_smoothing),
                 "triplet": BatchHardTripletLoss(config.margin, config.soft_margin, config.triplet_normalise),
                 "sampler": PKSampler(data.targets, config.p, config.k, config.seed,
                                      unlabelled=config.k if "oim" in config.losses else 0),
                 "augment": Augment(), "photometric": Photometric(), "soup_with": soup_with}
        run = cls(config, data, device, use_bf16, model, origin, oim, optimizer, progress, log, started, parts)
        if resume:
            run.load_resume_checkpoint()
        elif config.head_init == "probe":
            probe = probe_classifier(model, data, config.label_smoothing, config.weight_decay, config.id_margin)
            log(f"classifier probed on the frozen features of {probe['crops']} crops: loss {probe['loss']:.3f}, "
                f"accuracy {probe['accuracy']:.3f}")
        return run

    @property
    def state_path(self) -> Path:
        return resume_path(self.config.out)

    def metadata(self) -> dict:
        config, data = self.config, self.data
        return {"format": CHECKPOINT_FORMAT, **self.origin, "data": str(config.data), "data_hash": data.data_hash,
                "num_images": len(data.paths), "num_identities": data.num_classes, "person_ids": data.person_ids,
                "losses": dict(config.losses), "precision": "bf16" if self.use_bf16 else "fp32",
                "config": plain_config(config), "torch": str(torch.__version__)}

    def load_resume_checkpoint(self) -> None:
        path = self.state_path
        if not path.is_file():
            raise FileNotFoundError(f"nothing to resume: {path} does not exist (it is written after each epoch)")
        # the project's safe loader (tensors only); load_state_dict below moves them to the device
        saved = load_checkpoint(path, remedy="it is this run's resume checkpoint: delete it, or choose another "
                                             "--out, to train afresh")
        check_resumable(saved, self.config, self.data.data_hash, path)
        self.model.load_state_dict(saved["state_dict"])
        self.optimizer.load_state_dict(saved["optimizer"])
        if self.oim is not None:
            self.oim.load_state_dict(saved["oim"])
        self.start_epoch, self.history = saved["epoch"], saved["reidx_training"]["history"]
        self.log(f"resuming after epoch {self.start_epoch} from {path}")

    def step(self, batch: np.ndarray, x: torch.Tensor,
             x_distill: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """One optimiser step on a batch (``x_distill``: a second view for the distillation term
        only); returns (loss, logits or None, targets)."""
        losses = self.parts
        config = self.config
        y = torch.from_numpy(self.data.targets[batch]).to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            features = self.model(x if x_distill is None else torch.cat([x, x_distill]))
            features, student_distill = (features, features) if x_distill is None else features.split(len(x))
            logits = identity_logits(self.model.classifier, features, config.id_margin) \
                if "id" in config.losses else None
        features = features.float()
        terms = {}
        if "id" in config.losses:
            terms["id"] = losses["id"](with_margin(logits.float(), y, config.id_margin), y)
        if "triplet" in config.losses:
            terms["triplet"] = losses["triplet"](features, y)
        if self.parts["teacher"] is not None:
            with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
                teacher = self.parts["teacher"](x if x_distill is None else x_distill)
            terms["distill"] = distillation_loss(student_distill, teacher)
        if self.oim is not None:
            if logits is None:  # accuracy from the OIM table when there is no classifier
                with torch.no_grad():
                    x_unit = torch.nn.functional.normalize(features, dim=1)
                    logits = oim_logits(x_unit, self.oim.lut, self.oim.queue[:0], config.oim_scale)
            terms["oim"] = self.oim(features, y)
        weights = {**config.losses, "distill": config.distill_weight}
        loss = sum(weights[name] * value for name, value in terms.items())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss, logits, y

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """A batch on the training device (channels-last on CUDA, as the model is)."""
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.device.type == "cuda" else x

    def train_epoch(self, epoch: int, validate: Validator | None) -> dict:
        from tqdm import tqdm

        config, data = self.config, self.data
        batches = self.parts["sampler"].epoch(epoch)
        rng = np.random.default_rng([config.seed, epoch, 1])  # augmentation of this epoch
        distill_rng = np.random.default_rng([config.seed, epoch, 2])  # and of its distillation view
        augment = self.parts["augment"]
        self.model.train()
        hold_frozen_statistics(self.model, config.train_stages)
        totals = {"loss": 0.0, "correct": 0, "labelled": 0, "images": 0}
        epoch_start = last_log = time.perf_counter()
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch", disable=not self.progress)
        for i, batch in enumerate(bar):
            tick = time.perf_counter()
            lr = learning_rate(config, epoch + i / len(batches))
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            crops = data.crops(batch)
            x = self.to_device(augment(crops, rng))
            x_distill = None
            if config.distill_weight > 0 and config.distill_view == "photometric":
                x_distill = self.to_device(augment(self.parts["photometric"](crops, distill_rng), distill_rng))
            loss, logits, y = self.step(batch, x, x_distill)
            labelled = y >= 0
            totals["loss"] += float(loss.detach()) * len(batch)
            if logits is not None:
                totals["correct"] += int((logits.detach().argmax(1) == y)[labelled].sum())
                totals["labelled"] += int(labelled.sum())
            totals["images"] += len(batch)
            self.step_seconds += time.perf_counter() - tick
            self.step_images += len(batch)
            status = {"loss": f"{totals['loss'] / totals['images']:.3f}",
                      "acc": f"{totals['correct'] / max(totals['labelled'], 1):.3f}",
                      "img_s": f"{self.step_images / self.step_seconds:.1f}", "lr": f"{lr:.2e}"}
            bar.set_postfix(status)
            if not self.progress and time.perf_counter() - last_log > LOG_EVERY_S:
                last_log = time.perf_counter()
                self.log(f"epoch {epoch + 1}/{config.epochs} batch {i + 1}/{len(batches)}: "
                         + ", ".join(f"{k} {v}" for k, v in status.items()))
        bar.close()
        seconds = time.perf_counter() - epoch_start
        record = {"epoch": epoch + 1, "loss": round(totals["loss"] / totals["images"], 5),
                  "accuracy": round(totals["correct"] / max(totals["labelled"], 1), 5),
                  "images": totals["images"], "seconds": round(seconds, 2),
                  "images_per_s": round(totals["images"] / seconds, 1), "lr": lr}
        self.history.append(record)
        self.save_epoch(epoch)
        if config.val_query and config.val_every and (epoch + 1) % config.val_every == 0:
            record["validation"] = validate(str(self.state_path), config.val_query, config.val_gallery)
            self.save_epoch(epoch)  # now with the validation in its history
        self.log(f"epoch {epoch + 1}/{config.epochs}: loss {record['loss']:.4f}, accuracy {record['accuracy']:.3f}, "
                 f"{record['images_per_s']} images/s, {seconds:.0f} s"
                 + (f", val mAP {record['validation']['mAP']:.2f} rank-1 {record['validation']['rank1']:.2f}"
                    if "validation" in record else ""))
        return record

    def save_epoch(self, epoch: int) -> None:
        checkpoint = {"state_dict": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                      "oim": self.oim.state_dict() if self.oim is not None else {}, "epoch": epoch + 1,
                      "reidx_training": {**self.metadata(), "epochs": epoch + 1, "history": self.history}}
        save_checkpoint(checkpoint, self.state_path)

    def finish(self, validate: Validator | None = None) -> dict:
        """Write the final checkpoint (loads like published weights; WiSE-FT-mixed when
        ``wise_alpha`` < 1), score base and output on the validation splits, summarise the run."""
        config, history, data, out = self.config, self.history, self.data, Path(self.config.out)
        metadata = self.metadata()
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        if self.parts["soup_with"]:  # the other seeds' tuned networks, loaded and checked at the start
            state = soup([state, *self.parts["soup_with"]])
            self.log(f"tuned network: the soup of this run and {len(config.soup_with)} other seed(s)")
        base = load_base(config.init) if config.wise_alpha < 1.0 or config.domain_gate else None
        if config.wise_alpha < 1.0:
            state = wise_interpolate(base.state_dict(), state, config.wise_alpha)
        if config.recompute_bn:  # on the mixed network: its own activations' statistics
            self.model.load_state_dict(state)
            crops = recompute_batchnorm(self.model, data, config.train_stages)
            state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
            self.log(f"BatchNorm statistics recomputed on {crops} un-augmented training crops")
        final = {"state_dict": state, "reidx_training": {**metadata, "epochs": len(history), "history": history,
                                                         "wise_alpha": config.wise_alpha,
                                                         "recompute_bn": config.recompute_bn}}
        if config.domain_gate:
            gate = {**domain_gate_entry(base, data, config.seed), "base_share": float(config.base_share)}
            final["domain_gate"] = gate
            final["reidx_training"]["domain_gate"] = {k: gate[k] for k in ("k", "p", "calibration_median",
                                                                           "base_share")}
            self.log(f"domain gate: {len(gate['reference'])} reference crops, k {gate['k']}, p {gate['p']:g}, "
                     f"base share on the site {gate['base_share']:g}")
        save_checkpoint(final, out)
        evaluation = self.compare(validate)
        if evaluation:
            final["reidx_training"]["evaluation"] = evaluation
            save_checkpoint(final, out)
        return {"out": str(out), "resume_checkpoint": str(self.state_path), "epochs": len(history),
                "validation": evaluation["target"]["fine_tuned"] if "target" in evaluation else None,
                "evaluation": evaluation, "wise_alpha": config.wise_alpha, "recompute_bn": config.recompute_bn,
                "distill_weight": config.distill_weight,
                "domain_gate": config.domain_gate, "base_share": config.base_share, "soup_with": config.soup_with,
                "base_model": self.origin["base_model"], "data_hash": data.data_hash, "num_images": len(data.paths),
                "num_identities": data.num_classes, "losses": dict(self.config.losses),
                "precision": metadata["precision"], "device": self.device.type,
                "train_images_per_s": round(self.step_images / self.step_seconds, 1) if self.step_seconds else None,
                "final_loss": history[-1]["loss"] if history else None,
                "first_loss": history[0]["loss"] if history else None, "history": history,
                "wall_s": round(time.perf_counter() - self.started, 1)}

    def compare(self, validate: Validator | None) -> dict:
        """mAP & co. of the base and the output weights on the validation split ("target") and
        on the second domain ("other"), with the change in mAP."""
        config, result = self.config, {}
        sides = {"target": (config.val_query, config.val_gallery), "other": tuple(config.val_other or (None, None))}
        for side, (query, gallery) in sides.items():
            if not query:
                continue
            base = validate(config.init, query, gallery) if config.init else None
            tuned = validate(str(config.out), query, gallery)
            result[side] = {"query": query, "gallery": gallery, "base": base, "fine_tuned": tuned,
                            "delta_mAP": round(tuned["mAP"] - base["mAP"], 2) if base else None}
            self.log(f"{side} ({query} vs {gallery}): mAP "
                     + (f"{base['mAP']:.2f} (base) → " if base else "") + f"{tuned['mAP']:.2f}")
        return result
