"""Training losses for ReID fine-tuning: identity (label-smoothed cross-entropy), batch-hard
triplet and OIM. Each is small and pure apart from OIM's memory, so each is tested on inputs
whose answer can be worked out by hand (``tests/test_training.py``).

Rows whose target is negative are *unlabelled*: the identity and triplet losses ignore them;
OIM pushes their features into its queue of negatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

UNLABELLED = -1  # target value of a crop with no identity (Market junk -1 and distractors 0)


class IdentityLoss(nn.Module):
    """Cross-entropy with label smoothing (Szegedy et al. 2016), ε = 0.1 by default.

    Why smoothing: with few training identities the classifier quickly becomes over-confident
    and stops shaping the features; a target of (1-ε) on the true class and ε/C spread over all
    C classes keeps gradients flowing (the "bag of tricks" recipe, Luo et al. 2019).
    """

    def __init__(self, epsilon: float = 0.1):
        super().__init__()
        self.epsilon = epsilon

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        labelled = targets >= 0
        logits, targets = logits[labelled].float(), targets[labelled]
        if len(targets) == 0:
            return logits.sum() * 0.0
        log_p = F.log_softmax(logits, dim=1)
        smooth = torch.full_like(log_p, self.epsilon / logits.shape[1])
        smooth.scatter_add_(1, targets[:, None], torch.full_like(log_p[:, :1], 1.0 - self.epsilon))
        return -(smooth * log_p).sum(dim=1).mean()


COSINE_SCALE = 30.0  # s of the cosine classifier: the OIM default, logits in [-30, 30]


def identity_logits(classifier: nn.Linear, features: torch.Tensor, cosine_margin: float | None = None) -> torch.Tensor:
    """The id loss's logits before any margin. ``cosine_margin`` None: the linear classifier, W·x + b
    (torchreid's). A number: a cosine classifier, s·cos θ_j, where θ_j is the angle between the
    feature and row j of W (the bias is not used), in float32 even under autocast; its margin is
    taken off by :func:`with_margin`. These are the logits accuracy is read from."""
    if cosine_margin is None:
        return classifier(features)
    with torch.autocast(features.device.type, enabled=False):
        return COSINE_SCALE * (F.normalize(features.float(), dim=1) @ F.normalize(classifier.weight.float(), dim=1).t())


def with_margin(logits: torch.Tensor, targets: torch.Tensor, cosine_margin: float | None) -> torch.Tensor:
    """CosFace's additive margin (Wang et al. 2018): s·m off each labelled row's true-class logit, so
    the loss sees s·(cos θ_j − m·[j = target]); unchanged without a margin. Why: retrieval ranks by
    cosine, and the margin asks every training crop to be nearer its own person's direction than
    any other's by m, which a softmax stops asking once a crop is classified."""
    if not cosine_margin:
        return logits
    labelled = targets >= 0
    margin = torch.zeros_like(logits)
    margin[labelled] = margin[labelled].scatter(1, targets[labelled][:, None], COSINE_SCALE * cosine_margin)
    return logits - margin


def pairwise_euclidean(x: torch.Tensor) -> torch.Tensor:
    """(N, D) → (N, N) Euclidean distances, clamped before the square root so the gradient of
    the zero diagonal stays finite."""
    sq = (x * x).sum(dim=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * x @ x.t()
    return d2.clamp_min(1e-12).sqrt()


class BatchHardTripletLoss(nn.Module):
    """Batch-hard triplet loss (Hermans et al. 2017, "In Defense of the Triplet Loss").

    For each anchor, its farthest positive and nearest negative in the P×K batch;
    loss = mean over anchors of max(0, d(a,p) - d(a,n) + margin), or with ``soft_margin``
    log(1 + exp(d(a,p) - d(a,n))). Distances are Euclidean on the features before the classifier
    (the embedding that retrieval ranks), which the identity loss alone does not shape directly.
    Anchors with no positive or no negative in the batch are left out. With ``normalise`` the
    features are L2-normalised first, so the distances are those retrieval ranks by (cosine) and
    the margin is measured on the unit sphere (distances 0…2) rather than on the features' own scale.
    """

    def __init__(self, margin: float = 0.3, soft_margin: bool = False, normalise: bool = False):
        super().__init__()
        self.margin = margin
        self.soft_margin = soft_margin
        self.normalise = normalise

    def forward(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        labelled = targets >= 0
        features, targets = features[labelled].float(), targets[labelled]
        if self.normalise:
            features = F.normalize(features, dim=1)
        dist = pairwise_euclidean(features)
        same = targets[:, None] == targets[None, :]
        eye = torch.eye(len(targets), dtype=torch.bool, device=targets.device)
        positive, negative = same & ~eye, ~same
        valid = positive.any(dim=1) & negative.any(dim=1)
        if not valid.any():
            return features.sum() * 0.0
        hardest_pos = dist.masked_fill(~positive, float("-inf")).amax(dim=1)[valid]
        hardest_neg = dist.masked_fill(~negative, float("inf")).amin(dim=1)[valid]
        gap = hardest_pos - hardest_neg
        losses = F.softplus(gap) if self.soft_margin else F.relu(gap + self.margin)
        return losses.mean()


def oim_logits(x: torch.Tensor, lut: torch.Tensor, queue: torch.Tensor, scale: float) -> torch.Tensor:
    """Scaled similarities of unit features ``x`` to the identity table and the queue: (N, C + Q)."""
    return scale * torch.cat([x @ lut.t(), x @ queue.t()], dim=1)


def oim_loss(x: torch.Tensor, targets: torch.Tensor, lut: torch.Tensor, queue: torch.Tensor,
             scale: float) -> torch.Tensor:
    """−log p_t averaged over the rows, with p_i = exp(v_iᵀx/τ) / (Σ_j exp(v_jᵀx/τ) + Σ_k exp(u_kᵀx/τ)),
    τ = 1/scale. The queue's columns are negatives only: targets index the table rows."""
    return F.cross_entropy(oim_logits(x, lut, queue, scale), targets)


class OIMLoss(nn.Module):
    """Online Instance Matching (Xiao et al. 2017, "Joint Detection and Identification Feature
    Learning for Person Search").

    Why: a classifier's weights are learned slowly by gradient and sized to a fixed softmax; OIM
    instead compares each L2-normalised feature x with a lookup table V holding a running mean
    feature per training identity, plus a circular queue U of recent *unlabelled* features
    (crops with no identity still serve as negatives). The table is updated without gradient,
    after the loss is computed: v_t ← γ·v_t + (1−γ)·x, then re-normalised (γ = 0.5); unlabelled
    features enter the queue, oldest out first. Empty queue slots are not used.

    ``forward`` L2-normalises its input; :func:`oim_loss` is the loss on features already unit.
    """

    def __init__(self, num_classes: int, feature_dim: int, queue_size: int = 5000, scale: float = 30.0,
                 momentum: float = 0.5):
        super().__init__()
        self.scale = scale
        self.momentum = momentum
        self.register_buffer("lut", torch.zeros(num_classes, feature_dim))
        self.register_buffer("queue", torch.zeros(queue_size, feature_dim))
        self.register_buffer("queue_len", torch.zeros((), dtype=torch.long))  # filled slots
        self.register_buffer("queue_head", torch.zeros((), dtype=torch.long))  # next slot to write

    def forward(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = F.normalize(features.float(), dim=1)
        labelled = targets >= 0
        # copies: the memory is updated in place below, before backward needs these values
        lut, queue = self.lut.clone(), self.queue[: int(self.queue_len)].clone()
        if labelled.any():
            loss = oim_loss(x[labelled], targets[labelled], lut, queue, self.scale)
        else:
            loss = x.sum() * 0.0
        if self.training:
            self.update(x.detach(), targets)
        return loss

    @torch.no_grad()
    def update(self, x: torch.Tensor, targets: torch.Tensor) -> None:
        """Move each labelled feature's table row towards it; push unlabelled features into the queue."""
        for feature, target in zip(x, targets.tolist()):
            if target >= 0:
                row = self.momentum * self.lut[target] + (1.0 - self.momentum) * feature
                self.lut[target] = F.normalize(row, dim=0)
            elif len(self.queue):
                head = int(self.queue_head)
                self.queue[head] = feature
                self.queue_head.fill_((head + 1) % len(self.queue))
                self.queue_len.fill_(min(int(self.queue_len) + 1, len(self.queue)))
