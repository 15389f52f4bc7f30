"""A fine-tuned embedder that keeps the base model's features on crops unlike its training site.

Fine-tuning on one site moves the features towards that site's people and away from everyone
else's (docs/training.md: plain fine-tuning on Con-ReID costs cuhk03 15 mAP points). WiSE-FT's
weight mix trades the two off for every crop at once. The domain gate decides crop by crop, from
the base model's own features and no labels, whether the new data says anything about it:

    s(x) = mean of the k largest cosine similarities between base(x) and the base features of
           the training crops ("reference")
    a(x) = (1 − β)·min(1, F(s(x)) / p), with F the empirical distribution of s over the training
           crops themselves, each scored against the *other* identities' crops (as a new person of
           the same site would score)
    f(x) = normalise((1 − a(x))·base(x) + a(x)·tuned(x))

A crop that scores like the training site's own crops (at or above their p-quantile) gets the
fine-tuned features, mixed with a share β of the base's (``base_share``, default 0: on the site
the output is then an ensemble of the two networks' features; better on held-out people of the
training site, worse on the reported split — docs/training.md, session 17); one that
scores below every training crop gets the base's (bit for bit when its whole batch does, else to
float rounding); in between, a mix. The cost: both networks run
(measured 1.81–2.18× the base's embedding time with onnxruntime); only a batch wholly off the site,
where every weight is 0, runs the base alone.

Checkpoint layout (written by ``reidx train``): ``state_dict`` holds the tuned weights in
torchreid's layout as usual (tools that know nothing of the gate load the tuned model), and
``domain_gate`` holds ``base_state_dict``, ``reference`` (M × D unit rows, float16),
``low_scores`` (the sorted calibration scores up to the p-quantile), ``k``, ``p`` and
``base_share`` (β; absent in checkpoints written before it existed: 0).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from reidx.pipeline.models.registry import GATE_KEY  # the checkpoint key

GATE_K = 10  # neighbours averaged: enough to smooth one look-alike crop, few against a site's thousands
GATE_P = 0.05  # crops scoring below the training site's own 5 % quantile start to fall back to the base
MAX_REFERENCE = 4096  # training crops kept as the reference (4 MB at float16, ~2 M multiply-adds a crop)


class DomainGatedOSNet(nn.Module):
    """``forward(x)`` → (N, D) features: the base's, the tuned model's, or a mix, per crop (above)."""

    def __init__(self, base: nn.Module, tuned: nn.Module, reference: torch.Tensor, low_scores: torch.Tensor,
                 k: int, base_share: float = 0.0) -> None:
        super().__init__()
        self.base, self.tuned, self.k, self.base_share = base, tuned, int(k), float(base_share)
        self.register_buffer("reference", reference.float())
        self.register_buffer("low_scores", low_scores.float())

    def gate(self, base_unit: torch.Tensor) -> torch.Tensor:
        """(N,) weight of the tuned features, in [0, 1 − base_share], from unit base features (in
        float32 even under bf16 autocast: the calibration's steps are a few thousandths apart)."""
        with torch.autocast(base_unit.device.type, enabled=False):
            score = (base_unit.float() @ self.reference.T).topk(self.k, dim=1).values.mean(1)
            below = (self.low_scores.unsqueeze(0) < score.unsqueeze(1)).float().sum(1)
        return below / self.low_scores.numel() * (1.0 - self.base_share)

    def tuned_share(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) weight of the tuned features for input crops (what ``forward`` mixes with)."""
        return self.gate(F.normalize(self.base(x).float(), dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raw = self.base(x).float()
        base = F.normalize(raw, dim=1)
        a = self.gate(base).unsqueeze(1)
        if not torch.jit.is_tracing() and not bool(a.any()):
            return raw  # a batch wholly off the site: the base's own output; the tuned network need not run
        tuned = F.normalize(self.tuned(x).float(), dim=1)
        return (1 - a) * base + a * tuned  # the embedder normalises


def calibrate(features: np.ndarray, identities: np.ndarray, k: int = GATE_K, p: float = GATE_P,
              max_reference: int = MAX_REFERENCE, seed: int = 0) -> dict:
    """The gate's reference and calibration from the training crops' unit base features.

    ``identities``: an id per crop (≥ 0), or −1 for unlabelled crops (scored against everything
    but themselves). Returns the ``domain_gate`` entries other than the base weights.
    """
    features, identities = np.asarray(features, np.float32), np.asarray(identities)
    n = len(features)
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(n, max_reference, replace=False)) if n > max_reference else np.arange(n)
    reference, ref_ids = features[keep], identities[keep]
    k = max(1, min(k, len(keep) - 1))
    scores = _scores(features, identities, keep, reference, ref_ids, k)
    if not np.isfinite(scores).any():  # one identity only: no crop has another's to compare with
        scores = _scores(features, np.full(n, -1), keep, reference, np.full(len(keep), -1), k)
    scores = np.sort(scores[np.isfinite(scores)])  # crops with no other identity in the reference drop out
    low = scores[: max(1, math.ceil(p * len(scores)))]
    return {"reference": torch.from_numpy(reference).half(), "low_scores": torch.from_numpy(low.copy()),
            "k": int(k), "p": float(p), "calibration_median": float(np.median(scores))}


def _scores(features, identities, keep, reference, ref_ids, k) -> np.ndarray:
    """Each crop's mean similarity to its (up to) k nearest reference crops of *other* identities
    (unlabelled crops, −1: every crop but itself); NaN where the reference holds none."""
    n = len(features)
    scores = np.empty(n, np.float32)
    for start in range(0, n, 2048):
        stop = min(n, start + 2048)
        sims = features[start:stop] @ reference.T
        ids = identities[start:stop]
        same = (ids[:, None] == ref_ids[None, :]) & (ids[:, None] >= 0)
        same |= np.arange(start, stop)[:, None] == keep[None, :]  # never a crop's own copy
        sims[same] = -np.inf
        top = np.partition(sims, sims.shape[1] - k, axis=1)[:, -k:]
        finite = np.isfinite(top)
        with np.errstate(invalid="ignore", divide="ignore"):  # rows with none: NaN, dropped by the caller
            scores[start:stop] = np.where(finite, top, 0.0).sum(1) / finite.sum(1)
    return scores


def from_checkpoint(tuned: nn.Module, gate, build_base, feature_dim: int, path) -> DomainGatedOSNet:
    """Wrap a loaded tuned OSNet with the checkpoint's ``domain_gate`` entry, checked first:
    ``build_base(state_dict)`` builds the base network and its feature size (the registry's loader)."""
    from reidx.pipeline.models.weights import WeightsError

    def damaged(what: str) -> WeightsError:
        return WeightsError(f"{path}: the {GATE_KEY} entry is damaged ({what}); re-make the file from the "
                            f"resume checkpoint beside it with the same `reidx train` command plus --resume "
                            f"(add --no-domain-gate for the tuned network alone)")

    if not isinstance(gate, dict):
        raise damaged("not a dictionary")
    reference, low, k = gate.get("reference"), gate.get("low_scores"), gate.get("k")
    if not isinstance(reference, torch.Tensor) or not reference.is_floating_point() or reference.ndim != 2 \
            or reference.shape[1] != feature_dim or not torch.isfinite(reference).all():
        raise damaged(f"reference: not a finite float matrix of {feature_dim}-d rows")
    if not isinstance(low, torch.Tensor) or not low.is_floating_point() or low.ndim != 1 or low.numel() == 0 \
            or not torch.isfinite(low).all():
        raise damaged("low_scores: not a non-empty finite float vector")
    if type(k) is not int or not 1 <= k <= len(reference):
        raise damaged(f"k: not an integer from 1 to {len(reference)}")
    base_share = gate.get("base_share", 0.0)
    if isinstance(base_share, bool) or not isinstance(base_share, (int, float)) or not 0.0 <= base_share < 1.0:
        raise damaged("base_share: not a number in [0, 1)")
    if not isinstance(gate.get("base_state_dict"), dict):
        raise damaged("base_state_dict missing")
    try:
        base, base_dim = build_base(gate["base_state_dict"])
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise damaged(f"base_state_dict: {exc}") from None
    if base_dim != feature_dim:
        raise damaged(f"the base gives {base_dim}-d features, the tuned network {feature_dim}-d")
    return DomainGatedOSNet(base.eval(), tuned, reference, low, k, base_share).eval()
