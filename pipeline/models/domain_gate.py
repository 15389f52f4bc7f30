"""A fine-tuned embedder that keeps the base model's features on crops unlike its training site.

Fine-tuning on one site moves the features towards that site's people and away from everyone
else's (docs/training.md: plain fine-tuning on Con-ReID costs cuhk03 15 mAP points). WiSE-FT's
weight mix trades the two off for every crop at once. The domain gate decides crop by crop, from
the base model's own features and no labels, whether the new data says anything about it:

    s(x) = mean of the k largest cosine similarities between base(x) and the base features of
           the training crops ("reference")
    a(x) = min(1, F(s(x)) / p), with F the empirical distribution of s over the training crops
           themselves, each scored against the *other* identities' crops (as a new person of the
           same site would score)
    f(x) = normalise((1 − a(x))·base(x) + a(x)·tuned(x))

A crop that scores like the training site's own crops (at or above their p-quantile) gets the
fine-tuned features; one that scores below every training crop gets the base's, bit for bit; in
between, a mix. The cost: both networks run (measured 1.96× the base's embedding time with
onnxruntime); only a batch wholly off the site, where every weight is 0, runs the base alone.

Checkpoint layout (written by ``reidx train``): ``state_dict`` holds the tuned weights in
torchreid's layout as usual (tools that know nothing of the gate load the tuned model), and
``domain_gate`` holds ``base_state_dict``, ``reference`` (M × D unit rows, float16),
``low_scores`` (the sorted calibration scores up to the p-quantile), ``k`` and ``p``.
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
                 k: int) -> None:
        super().__init__()
        self.base, self.tuned, self.k = base, tuned, int(k)
        self.register_buffer("reference", reference.float())
        self.register_buffer("low_scores", low_scores.float())

    def gate(self, base_unit: torch.Tensor) -> torch.Tensor:
        """(N,) weight of the tuned features, in [0, 1], from unit base features."""
        score = (base_unit @ self.reference.T).topk(self.k, dim=1).values.mean(1)
        below = (self.low_scores.unsqueeze(0) < score.unsqueeze(1)).float().sum(1)
        return below / self.low_scores.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.normalize(self.base(x).float(), dim=1)
        a = self.gate(base).unsqueeze(1)
        if not torch.jit.is_tracing() and not bool(a.any()):
            return base  # a batch wholly off the site: the tuned network need not run (same result)
        tuned = F.normalize(self.tuned(x).float(), dim=1)
        return (1 - a) * base + a * tuned  # the embedder normalises


def calibrate(features: np.ndarray, identities: np.ndarray, k: int = GATE_K, p: float = GATE_P,
              max_reference: int = MAX_REFERENCE, seed: int = 0) -> dict:
    """The gate's reference and calibration from the training crops' unit base features.

    ``identities``: an id per crop (≥ 0), or −1 for unlabelled crops (scored against everything
    but themselves). Returns the ``domain_gate`` entries other than the base weights.
    """
    features = np.asarray(features, np.float32)
    n = len(features)
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(n, max_reference, replace=False)) if n > max_reference else np.arange(n)
    reference, ref_ids = features[keep], identities[keep]
    k = max(1, min(k, len(keep) - 1))
    scores = np.empty(n, np.float32)
    for start in range(0, n, 2048):
        stop = min(n, start + 2048)
        sims = features[start:stop] @ reference.T
        ids = identities[start:stop]
        same = (ids[:, None] == ref_ids[None, :]) & (ids[:, None] >= 0)
        same |= np.arange(start, stop)[:, None] == keep[None, :]  # never a crop's own copy
        sims[same] = -np.inf
        top = np.partition(sims, sims.shape[1] - k, axis=1)[:, -k:]
        scores[start:stop] = np.where(np.isfinite(top), top, -1.0).mean(1)
    scores.sort()
    low = scores[: max(1, math.ceil(p * n))]
    return {"reference": torch.from_numpy(reference).half(), "low_scores": torch.from_numpy(low.copy()),
            "k": int(k), "p": float(p), "calibration_median": float(np.median(scores))}


def from_checkpoint(tuned: nn.Module, gate, build_base, feature_dim: int, path) -> DomainGatedOSNet:
    """Wrap a loaded tuned OSNet with the checkpoint's ``domain_gate`` entry.
    ``build_base(state_dict)`` builds the base network (the registry's own OSNet loader)."""
    from reidx.pipeline.models.weights import WeightsError

    needed = {"base_state_dict": dict, "reference": torch.Tensor, "low_scores": torch.Tensor, "k": int}
    wrong = [key for key, kind in needed.items() if not isinstance(gate, dict) or not isinstance(gate.get(key), kind)]
    if not wrong:
        reference, low = gate["reference"], gate["low_scores"]
        if reference.ndim != 2 or reference.shape[1] != feature_dim or not 1 <= gate["k"] <= len(reference):
            wrong.append("reference")
        if low.ndim != 1 or low.numel() == 0:
            wrong.append("low_scores")
    if wrong:
        raise WeightsError(f"{path}: the {GATE_KEY} entry is damaged ({', '.join(wrong)} missing or malformed); "
                           f"re-make it with `reidx train ... --resume` or load the tuned network alone")
    base = build_base(gate["base_state_dict"]).eval()
    return DomainGatedOSNet(base, tuned, gate["reference"], gate["low_scores"], gate["k"]).eval()
