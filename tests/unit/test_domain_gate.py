"""The domain gate's calibration and weights on synthetic features (hermetic: no models, no data):
crops like the training site's get the tuned features, foreign ones the base's, a mix between."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from reidx.pipeline.models.domain_gate import DomainGatedOSNet, calibrate


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def site(rng, centre: np.ndarray, identities: int, per_identity: int, spread: float = 0.3):
    """Features of a site: each identity a tight cluster around its own point near ``centre``."""
    people = unit(centre + spread * rng.standard_normal((identities, len(centre))))
    features = np.repeat(people, per_identity, axis=0) + 0.1 * rng.standard_normal((identities * per_identity, len(centre)))
    return unit(features), np.repeat(np.arange(identities), per_identity)


def test_calibration_scores_each_crop_against_other_identities_only():
    rng = np.random.default_rng(0)
    features, ids = site(rng, np.eye(16)[0], identities=20, per_identity=10)
    gate = calibrate(features, ids, k=5, p=0.1)
    assert gate["reference"].dtype == torch.float16 and gate["reference"].shape == (200, 16)
    assert len(gate["low_scores"]) == 20 and np.all(np.diff(gate["low_scores"].numpy()) >= 0)
    # with its own identity's crops excluded a crop scores like a new person: well below its own cluster
    own = (features[:10] @ features[:10].T).mean()
    assert gate["calibration_median"] < own - 0.05
    # unlabelled crops (-1) are scored against everything but themselves
    unlabelled = calibrate(features, np.full(200, -1), k=5, p=0.1)
    assert unlabelled["calibration_median"] > gate["calibration_median"]


def test_small_and_large_training_sets():
    rng = np.random.default_rng(1)
    features, ids = site(rng, np.eye(8)[0], identities=2, per_identity=3)
    assert calibrate(features, ids, k=10)["k"] == 5  # at most the other crops
    big, big_ids = site(rng, np.eye(8)[0], identities=50, per_identity=100)
    first, second = calibrate(big, big_ids, max_reference=1000), calibrate(big, big_ids, max_reference=1000)
    assert first["reference"].shape == (1000, 8) and torch.equal(first["reference"], second["reference"])
    assert len(first["low_scores"]) == 250  # 5 % of all 5,000 crops, not of the reference


def test_gate_gives_tuned_on_site_base_off_site_and_a_mix_between():
    rng = np.random.default_rng(2)
    on_site, ids = site(rng, np.eye(16)[0], identities=30, per_identity=8, spread=0.1)
    gate = calibrate(on_site, ids, k=5, p=0.05)
    rotate = torch.from_numpy(np.linalg.qr(rng.standard_normal((16, 16)))[0].astype(np.float32))
    model = DomainGatedOSNet(nn.Identity(), nn.Linear(16, 16, bias=False), gate["reference"], gate["low_scores"], 5)
    model.tuned.weight.data = rotate
    new_people, _ = site(rng, np.eye(16)[0], identities=10, per_identity=4, spread=0.1)  # same site, new people
    foreign, _ = site(rng, np.eye(16)[5], identities=10, per_identity=4, spread=0.1)
    with torch.no_grad():
        weight_new = model.gate(torch.from_numpy(new_people))
        weight_foreign = model.gate(torch.from_numpy(foreign))
        out_foreign = model(torch.from_numpy(foreign))
        out_new = model(torch.from_numpy(new_people))
    assert weight_new.mean() > 0.9 and weight_foreign.max() == 0.0
    assert torch.allclose(out_foreign, torch.from_numpy(foreign), atol=1e-6)  # the base's features exactly
    full = weight_new == 1
    assert torch.allclose(out_new[full], torch.from_numpy(new_people)[full] @ rotate.T, atol=1e-5)


def test_gate_is_the_calibration_quantile_over_p():
    """a(x) = min(1, F(s(x)) / p): with calibration scores 0.5, 0.6, 0.7, 0.8 below the p-quantile,
    a crop scoring 0.65 has 2 of 4 below it, so it gets half the tuned feature."""
    reference = torch.eye(4)[:1]
    model = DomainGatedOSNet(nn.Identity(), nn.Identity(), reference, torch.tensor([0.5, 0.6, 0.7, 0.8]), k=1)
    for score, expected in ((0.65, 0.5), (0.45, 0.0), (0.75, 0.75), (0.95, 1.0)):
        x = torch.tensor([[score, (1 - score ** 2) ** 0.5, 0.0, 0.0]])
        assert float(model.gate(x)) == expected, score


def test_lopsided_and_single_identity_sets_still_calibrate_on_real_scores():
    """A crop whose identity fills most of the reference has fewer than k other-identity crops: its
    score averages the ones there are (no filler values that would let every crop through)."""
    rng = np.random.default_rng(3)
    big, _ = site(rng, np.eye(16)[0], identities=1, per_identity=40, spread=0.1)
    small, _ = site(rng, np.eye(16)[0], identities=1, per_identity=3, spread=0.1)
    features, ids = np.concatenate([small, big]), [0] * 3 + [1] * 40  # a plain list is fine too
    gate = calibrate(features, ids, k=10, p=0.05)
    assert gate["low_scores"].min() > 0.5  # all crops of one site: similar, never a −1 filler
    single = calibrate(big, np.zeros(40, int), k=10, p=0.05)  # one identity: scored against the rest
    assert torch.isfinite(single["low_scores"]).all() and single["low_scores"].min() > 0.5
