"""Keeping the base model's behaviour where the new data says nothing (fine-tuning without forgetting).

Three tools, a repair and a soup, all measured in ``docs/training.md``:

- **WiSE-FT** (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"): the output
  weights are ``(1 − α)·base + α·fine-tuned``, element-wise over every floating-point tensor the
  two share: convolution and BatchNorm weights *and* BatchNorm's running mean and variance (the
  statistics then describe the interpolated network's activations only approximately; the
  measurements are made with them as they are). Tensors the base lacks or shapes it does not
  share (the new classifier) and integer counters are the fine-tuned model's. α = 0 gives the
  base's weights and α = 1 the fine-tuned ones bit for bit (``torch.lerp`` is exact at both ends).
  It costs nothing during training and α can be changed afterwards from the fine-tuned weights.
- **BatchNorm statistics recomputed** on the un-augmented training crops after the mix (REPAIR,
  Jordan et al. 2023, "Repairing the variance collapse of interpolated networks"; training itself
  only ever saw augmented crops).
- **Feature distillation from the frozen base model**: the base (eval mode, no gradient) embeds
  each training batch too, and ``λ · mean(1 − cos(f_student, f_base))`` joins the loss — the
  cosine distance that retrieval ranks by, so the student is held near the base's geometry on the
  training images while the ReID losses move it where the labels say so.
- **A model soup** (Wortsman et al. 2022): the tuned network is the element-wise mean of this
  run's and other finished runs' that differ only in their seed (``--soup-with``), before the
  WiSE-FT mix; one network, so embedding costs what one run's does.
- **Surgical fine-tuning** (Lee et al. 2023, "Surgical fine-tuning improves adaptation to
  distribution shifts"): only the named OSNet stages learn; the others keep the base's weights
  *and* BatchNorm statistics (they run in eval mode during training), so whatever the new data
  cannot explain through the trained stages stays as the base had it.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from reidx.pipeline.models.registry import load_model


def load_base(init: str) -> nn.Module:
    """The model to keep (WiSE-FT's and the distillation's base, the gate's base), frozen in eval
    mode (CPU): ``init`` itself, or, for a gated checkpoint, the base it keeps — training on from a
    fine-tuned model still falls back to the original model off the site."""
    from reidx.pipeline.models.domain_gate import DomainGatedOSNet

    module = load_model(init, "osnet", allow_onnx=False).module.eval()
    if isinstance(module, DomainGatedOSNet):
        module = module.base
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


STAGES = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc")  # OSNet's blocks, input to output


def check_stages(stages: list[str] | None) -> None:
    unknown = sorted(set(stages or ()) - set(STAGES))
    if stages is not None and (not stages or unknown):
        raise ValueError(f"unknown stage(s) {unknown}; train some of {', '.join(STAGES)} (or all)")


def frozen_stages(model: nn.Module, trainable: list[str] | None) -> list[nn.Module]:
    """The OSNet stages not in ``trainable`` (None: every stage learns); the new classifier always learns."""
    if trainable is None:
        return []
    return [child for name, child in model.named_children() if name in STAGES and name not in trainable]


def freeze_stages(model: nn.Module, trainable: list[str] | None) -> None:
    """No gradient for the frozen stages."""
    for stage in frozen_stages(model, trainable):
        stage.requires_grad_(False)


def hold_frozen_statistics(model: nn.Module, trainable: list[str] | None) -> None:
    """After ``model.train()``: frozen stages back to eval mode, so their BatchNorm statistics stay the base's."""
    for stage in frozen_stages(model, trainable):
        stage.eval()


def wise_interpolate(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor],
                     alpha: float) -> dict[str, torch.Tensor]:
    """``(1 − alpha)·base + alpha·tuned`` for every floating tensor both hold with the same shape;
    everything else (the new classifier, ``num_batches_tracked``) as ``tuned`` has it."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"the WiSE-FT coefficient must lie in [0, 1], not {alpha}")
    mixed = {}
    for key, value in tuned.items():
        start = base.get(key)
        if start is not None and start.shape == value.shape and value.is_floating_point():
            mixed[key] = torch.lerp(start.to(value), value, alpha)
        else:
            mixed[key] = value
    return mixed


def soup(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A uniform model soup (Wortsman et al. 2022, "Model soups"): the element-wise mean of the
    floating tensors of runs fine-tuned from the same base (integer counters: the first run's)."""
    first = states[0]
    for state in states[1:]:
        if state.keys() != first.keys() or any(state[k].shape != v.shape for k, v in first.items()):
            raise ValueError("a soup needs runs of one architecture with the same tensors")
    return {k: (sum(s[k].double() for s in states) / len(states)).to(v.dtype) if v.is_floating_point() else v
            for k, v in first.items()}


def soup_members(paths: list[str], config, data_hash: str) -> list[dict[str, torch.Tensor]]:
    """The tuned networks of ``--soup-with``'s runs, each checked to be another seed of this run."""
    from reidx.pipeline.training.checkpoint import check_soup_member, resume_path

    states = []
    for path in paths:
        if Path(path).resolve() == resume_path(config.out).resolve():
            raise ValueError(f"{path} is this run's own checkpoint: --soup-with names the other runs")
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
            raise ValueError(f"{path}: not a readable checkpoint ({exc})") from None
        check_soup_member(saved, config, data_hash, path)
        states.append(saved["state_dict"])
    return states


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean cosine distance between each student feature and the base model's feature of the same crop."""
    return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=1)).mean()


@torch.inference_mode()
def domain_gate_entry(base: nn.Module, data, seed: int = 0, batch_size: int = 64) -> dict:
    """The checkpoint's ``domain_gate`` entry (:mod:`reidx.pipeline.models.domain_gate`): the base
    weights (``base`` from :func:`load_base`), and the gate's reference and calibration from the
    base features of every training crop."""
    from reidx.pipeline.models.domain_gate import calibrate
    from reidx.pipeline.training.head import frozen_features

    features = F.normalize(frozen_features(base, data, np.arange(len(data.paths)), batch_size), dim=1)
    return {"base_state_dict": base.state_dict(), **calibrate(features.numpy(), data.targets, seed=seed)}


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, data, trainable: list[str] | None = None, batch_size: int = 64) -> int:
    """Replace the BatchNorm running statistics of ``model`` (in place) by their cumulative mean
    over every training crop, un-augmented, in a seeded order; the frozen stages of surgical
    fine-tuning keep theirs (the base's). Returns the number of crops."""
    from reidx.pipeline.embed import to_input_tensor

    device = next(model.parameters()).device
    model.train()
    hold_frozen_statistics(model, trainable)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over all batches, not an exponential one
    order = np.random.default_rng(0).permutation(len(data.paths))
    try:
        for i in range(0, len(order), batch_size):
            model(to_input_tensor(data.crops(order[i:i + batch_size])).to(device))
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        model.eval()
    return len(order)
