"""Where the new classifier starts: random (torchreid's way) or a linear probe of the base's
features (LP-FT, Kumar et al. 2022, "Fine-tuning can distort pretrained features and
underperform out-of-distribution").

Why a probe: a random classifier sends large, meaningless gradients into the pretrained features
for the first hundred steps (the warm-up only shrinks them), and those steps move the features
furthest. A classifier fitted first on the frozen model's features of the training crops starts
fine-tuning near a solution, so the features move only as far as the labels need.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from reidx.pipeline.training.losses import identity_logits, with_margin

HEAD_INITS = ("random", "probe")
PROBE_STEPS = 300  # full-batch Adam steps on the cached features (seconds even on a CPU)
PROBE_LR = 0.01


@torch.no_grad()  # not inference_mode: the probe's autograd uses these tensors
def frozen_features(model: nn.Module, data, indices: np.ndarray, batch_size: int = 64) -> torch.Tensor:
    """The model's features (eval mode, as published) of the training crops ``indices``, un-augmented."""
    from reidx.pipeline.embed import to_input_tensor

    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    try:
        return torch.cat([model(to_input_tensor(data.crops(indices[i:i + batch_size])).to(device)).float()
                          for i in range(0, len(indices), batch_size)])
    finally:
        model.train(was_training)


def probe_classifier(model: nn.Module, data, label_smoothing: float, weight_decay: float,
                     cosine_margin: float | None = None, steps: int = PROBE_STEPS, lr: float = PROBE_LR) -> dict:
    """Fit ``model.classifier`` (already sized and seeded) on the frozen features of the labelled
    training crops with the ID loss fine-tuning uses (``cosine_margin``: see
    :func:`~reidx.pipeline.training.losses.with_margin`); returns the probe's final loss and accuracy."""
    labelled = np.flatnonzero(data.targets >= 0)
    features = frozen_features(model, data, labelled)
    targets = torch.from_numpy(data.targets[labelled]).to(features.device)
    head = model.classifier
    optimizer = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)

    def loss_of(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(with_margin(logits, targets, cosine_margin), targets, label_smoothing=label_smoothing)

    for _ in range(steps):
        loss = loss_of(identity_logits(head, features, cosine_margin))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        logits = identity_logits(head, features, cosine_margin)
        loss = loss_of(logits)
        accuracy = (logits.argmax(1) == targets).float().mean()
    return {"crops": len(labelled), "loss": round(float(loss), 5), "accuracy": round(float(accuracy), 5)}
