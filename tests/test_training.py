"""Fine-tuning: losses on hand-checkable inputs (OIM's gradient against its closed form), the
P×K sampler, augmentation, and a smoke training on a few real identities of Con-ReID's
bounding_box_train that lowers the loss, resumes exactly and saves a checkpoint the embedder
loads like a published one."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reidx.pipeline.datasets import list_images
from reidx.pipeline.labels import parse_market_name
from reidx.pipeline.embed import build_embedder, resize_crop, to_input_tensor
from reidx.pipeline.imaging import load_image
from reidx.pipeline.models.weights import WeightsError, load_state_dict
from reidx.pipeline.training.augment import Augment
from reidx.pipeline.training.data import load_training_set
from reidx.pipeline.training.losses import (COSINE_SCALE, BatchHardTripletLoss, IdentityLoss, OIMLoss, identity_logits,
                                            oim_loss, with_margin)
from reidx.pipeline.training.loop import TrainConfig, build_model, learning_rate, resume_path, train
from reidx.pipeline.training.sampler import PKSampler
from conftest import CON_REID

TRAIN_DIR = CON_REID / "bounding_box_train"
# Six identities with 2, 17, 18, 22, 25 and 32 crops (116 in all): 0142 has fewer than K = 4.
SMOKE_IDS = (142, 63, 14, 7, 6, 59)


# ---------------------------------------------------------------- losses


def test_identity_loss_smooths_labels_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    targets = torch.tensor([0, 2])
    log_p0 = 2.0 - math.log(math.exp(2.0) + 2.0)  # log softmax of the first row, class 0
    log_p_other = -math.log(math.exp(2.0) + 2.0)
    row0 = -((0.9 + 0.1 / 3) * log_p0 + 2 * (0.1 / 3) * log_p_other)
    row1 = math.log(3.0)  # uniform logits: every class has log p = −log 3, whatever the smoothing
    assert IdentityLoss(0.1)(logits, targets).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    assert IdentityLoss(0.0)(logits, targets).item() == pytest.approx((-log_p0 + row1) / 2, rel=1e-6)
    # unlabelled rows (target −1) do not count
    with_unlabelled = IdentityLoss(0.1)(torch.cat([logits, torch.tensor([[9.0, -9.0, 0.0]])]),
                                        torch.tensor([0, 2, -1]))
    assert with_unlabelled.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_batch_hard_triplet_picks_farthest_positive_and_nearest_negative():
    # 1-D features: identity 0 at 0, 1 and 1.5; identity 1 at 3 and 5.
    features = torch.tensor([[0.0], [1.0], [1.5], [3.0], [5.0]], requires_grad=True)
    targets = torch.tensor([0, 0, 0, 1, 1])
    # anchor: (farthest positive, nearest negative) → gap d_ap − d_an
    gaps = [1.5 - 3.0, 1.0 - 2.0, 1.5 - 1.5, 2.0 - 1.5, 2.0 - 3.5]
    loss = BatchHardTripletLoss(margin=0.3)(features, targets)
    assert loss.item() == pytest.approx(sum(max(0.0, g + 0.3) for g in gaps) / 5, rel=1e-5)
    soft = BatchHardTripletLoss(soft_margin=True)(features, targets)
    assert soft.item() == pytest.approx(sum(math.log1p(math.exp(g)) for g in gaps) / 5, rel=1e-5)
    # only the active anchors (1.5 and 3) and their hardest pairs (0 and 3; 5 and 1.5) get a gradient
    loss.backward()
    assert features.grad[1].item() == 0.0 and (features.grad[[0, 2, 3, 4]] != 0).all()
    # an anchor alone in its identity (9) has no positive: left out of the mean, not counted as zero
    lone = BatchHardTripletLoss(margin=0.3)(torch.tensor([[0.0], [1.0], [1.5], [3.0], [5.0], [9.0]]),
                                            torch.tensor([0, 0, 0, 1, 1, 2]))
    assert lone.item() == pytest.approx(sum(max(0.0, g + 0.3) for g in gaps) / 5, rel=1e-5)


def test_cosine_margin_logits_by_hand():
    """--id-margin m: logits 30·cos θ_j (the bias is not used; accuracy is read from these), and the
    loss's 30·(cos θ_j − m on the true class); rows without a target (−1) get no margin."""
    classifier = torch.nn.Linear(2, 3)
    with torch.no_grad():
        classifier.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]]))
        classifier.bias.fill_(5.0)
    features = torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    r = 1 / math.sqrt(2)
    cosines = torch.tensor([[1.0, 0.0, -1.0], [r, r, -r], [0.0, 1.0, 0.0]])
    margined = cosines - torch.tensor([[0.35, 0, 0], [0, 0.35, 0], [0, 0, 0]])
    targets = torch.tensor([0, 1, -1])
    logits = identity_logits(classifier, features, 0.35)
    assert torch.allclose(with_margin(logits, targets, 0.35), COSINE_SCALE * margined, atol=1e-5)
    assert torch.allclose(logits, COSINE_SCALE * cosines, atol=1e-5)
    # unset: the linear classifier, bias included, and no margin
    linear = identity_logits(classifier, features, None)
    assert torch.allclose(linear, features @ classifier.weight.t() + 5.0)
    assert torch.equal(with_margin(linear, targets, None), linear)
    with pytest.raises(ValueError, match="id_margin"):
        TrainConfig(data="x", out="y.pth", id_margin=1.5).check()
    with pytest.raises(ValueError, match="needs the id loss"):
        TrainConfig(data="x", out="y.pth", id_margin=0.3, losses={"triplet": 1.0}).check()


def test_triplet_on_normalised_features_by_hand():
    """--triplet-normalise: distances between unit features, so the length of a feature is ignored."""
    features = torch.tensor([[1.0, 0.0], [5.0, 0.0], [0.0, 1.0], [3.0, 3.0]])
    targets = torch.tensor([0, 0, 1, 1])
    # unit: (1,0), (1,0), (0,1), (r,r); same-direction positives are at distance 0
    d_diag, d_perp = math.sqrt(2 - math.sqrt(2)), math.sqrt(2)  # (1,0)–(r,r), (1,0)–(0,1)
    gaps = [0 - d_diag, 0 - d_diag, d_diag - d_perp, d_diag - d_diag]
    loss = BatchHardTripletLoss(margin=0.3, normalise=True)(features, targets)
    assert loss.item() == pytest.approx(sum(max(0.0, g + 0.3) for g in gaps) / 4, rel=1e-5)
    assert BatchHardTripletLoss(margin=0.3)(features, targets).item() > 1.0  # raw: the lengths dominate


def test_oim_loss_by_hand():
    x = torch.tensor([[1.0, 0.0, 0.0]])
    lut = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    queue = torch.tensor([[0.0, 0.0, 1.0]])
    # p_t = e^30 / (e^30 + e^0 + e^0): −log p_t = log(1 + 2·e^−30)
    loss_t0 = oim_loss(x, torch.tensor([0]), lut, queue, 30.0).item()
    assert loss_t0 == pytest.approx(math.log1p(2 * math.exp(-30)), abs=1e-9)
    # the queue's slots are negatives only: −log p for target 1 is log(e^30 + 2) − 0
    loss_t1 = oim_loss(x, torch.tensor([1]), lut, queue, 30.0).item()
    assert loss_t1 == pytest.approx(math.log(math.exp(30) + 2), rel=1e-6)


def test_oim_gradient_matches_closed_form():
    gen = torch.Generator().manual_seed(0)
    unit = lambda *shape: F.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1)  # noqa: E731
    x, lut, queue = unit(6, 16).requires_grad_(), unit(5, 16), unit(4, 16)
    targets = torch.tensor([0, 1, 2, 3, 4, 2])
    tau = 1 / 30
    oim_loss(x, targets, lut, queue, 1 / tau).sum().backward()
    for i, t in enumerate(targets.tolist()):
        logits = torch.cat([lut @ x[i], queue @ x[i]]).detach() / tau
        prob = torch.softmax(logits, 0)
        p, q = prob[:5], prob[5:]
        # (1/τ)[(p_t − 1)·v_t + Σ_{j≠t} p_j v_j + Σ_k q_k u_k], divided by the batch size (mean)
        others = [j for j in range(5) if j != t]
        closed = ((p[t] - 1) * lut[t] + (p[others, None] * lut[others]).sum(0) + (q[:, None] * queue).sum(0)) / tau
        torch.testing.assert_close(x.grad[i], closed / len(targets), rtol=1e-10, atol=1e-12)


def test_oim_module_normalises_updates_table_and_queue():
    oim = OIMLoss(num_classes=2, feature_dim=3, queue_size=2, scale=30.0, momentum=0.5)
    oim.lut.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    features = torch.tensor([[2.0, 2.0, 0.0], [0.0, 0.0, 3.0]], requires_grad=True)
    loss = oim(features, torch.tensor([0, -1]))
    x = F.normalize(features.detach(), dim=1)
    # the empty queue is not used: only the table's two columns
    table_only = oim_loss(x[:1], torch.tensor([0]), torch.eye(3)[:2], torch.zeros(0, 3), 30)
    assert loss.item() == pytest.approx(table_only.item())
    # gradient through the normalisation: the closed form projected off x, over |f|
    loss.backward()
    g = (torch.softmax(30 * x[0, :2], 0)[0] - 1) * torch.tensor([1.0, 0, 0]) * 30 \
        + torch.softmax(30 * x[0, :2], 0)[1] * torch.tensor([0.0, 1, 0]) * 30
    projected = (g - (g @ x[0]) * x[0]) / features.detach()[0].norm()
    torch.testing.assert_close(features.grad[0], projected)
    # v_t ← normalise(γ·v_t + (1−γ)·x); the unlabelled feature went into the queue
    torch.testing.assert_close(oim.lut[0], F.normalize(0.5 * torch.tensor([1.0, 0, 0]) + 0.5 * x[0], dim=0))
    torch.testing.assert_close(oim.lut[1], torch.tensor([0.0, 1.0, 0.0]))
    assert int(oim.queue_len) == 1 and torch.equal(oim.queue[0], x[1])
    # circular: a third unlabelled feature replaces the oldest
    oim(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]), torch.tensor([-1, -1]))
    assert int(oim.queue_len) == 2 and torch.equal(oim.queue[0], torch.tensor([0.0, 1.0, 0.0]))
    # eval mode computes the loss but leaves the memory alone
    oim.eval()
    before = oim.lut.clone()
    oim(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([1]))
    assert torch.equal(oim.lut, before)


# ---------------------------------------------------------------- sampler, augmentation, schedule


def test_pk_sampler_batches():
    targets = np.array([0] * 9 + [1] * 5 + [2] * 2 + [3] * 8 + [-1] * 3)
    sampler = PKSampler(targets, p=3, k=4, seed=1, unlabelled=2)
    batches = sampler.epoch(0)
    assert batches
    seen = []
    for batch in batches:
        labelled, extra = batch[:12], batch[12:]
        assert len(extra) == 2 and (targets[extra] == -1).all()
        ids, counts = np.unique(targets[labelled], return_counts=True)
        assert len(ids) == 3 and (counts == 4).all()
        seen += [i for i in labelled if targets[i] != 2]  # identity 2 (2 crops) is drawn with replacement
    assert len(seen) == len(set(seen))  # otherwise each crop at most once per epoch
    assert [b.tolist() for b in sampler.epoch(0)] == [b.tolist() for b in batches]  # a pure function of the epoch
    assert [b.tolist() for b in sampler.epoch(1)] != [b.tolist() for b in batches]
    with pytest.raises(ValueError, match="only 4 labelled identities"):
        PKSampler(targets, p=5, k=2)


def test_augment_shapes_determinism_and_identity():
    crops = np.stack([resize_crop(load_image(p)) for p in list_images([CON_REID / "query"])[:4]])
    augment = Augment()
    a = augment(crops, np.random.default_rng(7))
    assert a.shape == (4, 3, 256, 128) and a.dtype == torch.float32
    torch.testing.assert_close(a, augment(crops, np.random.default_rng(7)), rtol=0, atol=0)
    assert not torch.equal(a, augment(crops, np.random.default_rng(8)))
    # without augmentation it is exactly the inference preprocessing
    plain = Augment(flip_p=0.0, pad=0, erase_p=0.0)(crops, np.random.default_rng(0))
    assert torch.equal(plain, to_input_tensor(crops))
    flipped = Augment(flip_p=1.0, pad=0, erase_p=0.0)(crops, np.random.default_rng(0))
    assert torch.equal(flipped, to_input_tensor(crops[:, :, ::-1]))
    # erasing blanks one rectangle per crop to 0 (the normalised mean colour)
    erased = Augment(flip_p=0.0, pad=0, erase_p=1.0)(crops, np.random.default_rng(0))
    changed = (erased != plain).any(dim=1)
    for i in range(4):
        rows, cols = torch.nonzero(changed[i], as_tuple=True)
        assert len(rows) > 0 and (erased[i][:, rows, cols] == 0).all()
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert 0.02 * 256 * 128 * 0.9 <= box <= 0.4 * 256 * 128 * 1.1
    # pad-and-crop shifts by at most the padding
    shifted = Augment(flip_p=0.0, pad=10, erase_p=0.0)(crops, np.random.default_rng(3))
    assert shifted.shape == plain.shape and not torch.equal(shifted, plain)


def test_learning_rate_warmup_then_cosine_or_step():
    config = TrainConfig(data="", out="", epochs=10, lr=1e-3, warmup_epochs=2)
    assert learning_rate(config, 0) == pytest.approx(1e-5)
    assert learning_rate(config, 1) == pytest.approx(1e-3 * (0.01 + 0.99 / 2))
    assert learning_rate(config, 2) == pytest.approx(1e-3)
    assert learning_rate(config, 6) == pytest.approx(1e-3 * (0.01 + 0.99 * 0.5))
    assert learning_rate(config, 10) == pytest.approx(1e-5)
    step = TrainConfig(data="", out="", epochs=10, lr=1e-3, warmup_epochs=1, schedule="step", step_epochs=[5, 8])
    assert [learning_rate(step, t) for t in (4.9, 5, 8)] == pytest.approx([1e-3, 1e-4, 1e-5])


# ---------------------------------------------------------------- smoke training on real crops


@pytest.fixture(scope="module")
def smoke_table(tmp_path_factory):
    """A label table naming the real crops of SMOKE_IDS in place (nothing copied)."""
    path = tmp_path_factory.mktemp("train") / "labels.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "person_id", "camera"])
        for image in list_images([TRAIN_DIR]):
            pid, cam = parse_market_name(image.name)
            if pid in SMOKE_IDS:
                writer.writerow([str(image), pid, cam])
    return path


@pytest.fixture(scope="module")
def smoke_data(smoke_table):
    return load_training_set(smoke_table)


def smoke_config(table, out, epochs=2, **overrides) -> TrainConfig:
    # one thread: small batches gain little from two, and lose several-fold when the cores are shared
    options = {"p": 4, "k": 4, "lr": 5e-4, "warmup_epochs": 0.5, "threads": 1, "wise_alpha": 1.0,
               "distill_weight": 0.0, "domain_gate": False, **overrides}
    return TrainConfig(data=str(table), out=str(out), epochs=epochs, **options)


def fixed_loss(model, data) -> float:
    """id + triplet loss of the model in eval mode on every training crop, unaugmented."""
    model.eval()
    with torch.no_grad():
        x = to_input_tensor(data.crops(np.arange(len(data.paths))))
        y = torch.from_numpy(data.targets)
        features = model(x)
        return (IdentityLoss()(model.classifier(features), y) + BatchHardTripletLoss()(features, y)).item()


def test_training_set_labels_and_hash(smoke_data, smoke_table):
    assert len(smoke_data.paths) == 116 and smoke_data.person_ids == sorted(SMOKE_IDS)
    assert smoke_data.cache.shape == (116, 256, 128, 3)
    first = smoke_data.paths[0]
    assert smoke_data.person_ids[smoke_data.targets[0]] == parse_market_name(first.split("/")[-1])[0]
    again = load_training_set(smoke_table)
    assert again.data_hash == smoke_data.data_hash and np.array_equal(again.cache, smoke_data.cache)


def test_smoke_training_lowers_loss_resumes_exactly_and_loads(tmp_path, smoke_data, smoke_table):
    config = smoke_config(smoke_table, tmp_path / "full" / "model.pth")
    threads = torch.get_num_threads()
    summary = train(config, data=smoke_data)
    assert torch.get_num_threads() == threads  # --threads applied to the training only
    assert summary["epochs"] == 2 and summary["num_identities"] == 6 and summary["base_model"] == "osnet_x0_25_msmt17"

    # the loss on the training crops went down from the initial weights (pretrained + new classifier)
    initial, _ = build_model(config, smoke_data.num_classes)
    trained, _ = build_model(config, smoke_data.num_classes)
    saved = torch.load(config.out, weights_only=True)
    trained.load_state_dict(saved["state_dict"])
    before, after = fixed_loss(initial, smoke_data), fixed_loss(trained, smoke_data)
    assert after < 0.7 * before, (before, after)

    # metadata: base model, data hash, losses, epochs, plain types only (weights_only load above)
    meta = saved["reidx_training"]
    assert meta["base_model"] == "osnet_x0_25_msmt17" and meta["data_hash"] == smoke_data.data_hash
    assert meta["losses"] == {"id": 1.0, "triplet": 1.0} and meta["epochs"] == 2 and len(meta["history"]) == 2
    assert saved["state_dict"]["classifier.weight"].shape == (6, 512)

    # loads like published weights: the project's loader, the torch and the default (onnxruntime) embedders
    assert "conv1.conv.weight" in load_state_dict(config.out)
    crops = smoke_data.crops(np.arange(0, 116, 10))
    with torch.no_grad():
        reference = F.normalize(trained.eval()(to_input_tensor(crops)), dim=1).numpy()
    for backend in ("torch", "auto"):
        embedder = build_embedder(config.out, backend=backend, device="cpu")
        assert embedder.info.dim == 512 and embedder.info.name == "model"
        cosine = (embedder.embed(crops) * reference).sum(axis=1)
        assert cosine.min() > 0.9999, (backend, cosine.min())

    # one epoch, then --resume for the second: the same weights as the uninterrupted run
    split = smoke_config(smoke_table, tmp_path / "split" / "model.pth")
    assert train(split, data=smoke_data, stop_after=1)["epochs"] == 1
    # the same call without resume (a rerun after a kill, say) must not start afresh over the kept epoch
    kept = resume_path(split.out).read_bytes()
    with pytest.raises(FileExistsError, match="add --resume to continue it"):
        train(split, data=smoke_data)
    assert resume_path(split.out).read_bytes() == kept
    with pytest.raises(ValueError, match="lr"):
        train(smoke_config(smoke_table, split.out, lr=1e-3), resume=True, data=smoke_data)
    resumed = train(smoke_config(smoke_table, split.out), resume=True, data=smoke_data)
    assert resumed["epochs"] == 2
    full_state, split_state = saved["state_dict"], torch.load(split.out, weights_only=True)["state_dict"]
    assert full_state.keys() == split_state.keys()
    for key in full_state:
        assert torch.equal(full_state[key], split_state[key]), key
    assert resume_path(split.out).is_file()


def test_resume_without_checkpoint_is_an_error(tmp_path, smoke_data, smoke_table):
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(smoke_config(smoke_table, tmp_path / "model.pth"), resume=True, data=smoke_data)
    for damaged in (b"not a checkpoint", b"PK\x03\x04" + bytes(60)):  # foreign bytes; a truncated zip
        resume_path(tmp_path / "model.pth").write_bytes(damaged)  # one clear error, no traceback
        with pytest.raises(WeightsError, match="not a readable torch checkpoint.*resume checkpoint: delete it") as error:
            train(smoke_config(smoke_table, tmp_path / "model.pth"), resume=True, data=smoke_data)
        assert "state_dict" not in str(error.value)  # not the advice for published weights


def test_probe_head_init_fits_the_classifier_before_training(tmp_path, smoke_data, smoke_table):
    """--head-init probe (LP-FT): the new classifier is fitted on the frozen base features first, so
    it starts near a solution (random: chance level); it needs a base model and the id loss."""
    from reidx.pipeline.training.head import probe_classifier

    config = smoke_config(smoke_table, tmp_path / "model.pth", head_init="probe")
    model, _ = build_model(config, smoke_data.num_classes)
    before = fixed_loss(model, smoke_data)
    probe = probe_classifier(model, smoke_data, config.label_smoothing, config.weight_decay)
    assert probe["crops"] == 116 and probe["accuracy"] >= 0.95, probe
    assert fixed_loss(model, smoke_data) < before - 1.0
    # the default: a probe where there is a base and a classifier, random otherwise
    assert TrainConfig(data=str(smoke_table), out=str(tmp_path / "x.pth")).head_init == "probe"
    for other in ({"init": None}, {"losses": {"triplet": 1.0}}):
        assert TrainConfig(data=str(smoke_table), out=str(tmp_path / "x.pth"), **other).head_init == "random"
    for bad in ({"init": None}, {"losses": {"triplet": 1.0}}):
        with pytest.raises(ValueError, match="head-init probe"):
            smoke_config(smoke_table, tmp_path / "x.pth", head_init="probe", **bad).check()
    with pytest.raises(ValueError, match="head_init"):
        smoke_config(smoke_table, tmp_path / "x.pth", head_init="zeros").check()
    # a run with the probe trains and resumes exactly like any other (the probe is not redone on resume)
    lines = []
    first = train(config, data=smoke_data, stop_after=1, log=lines.append)
    assert any("classifier probed" in line for line in lines)
    lines.clear()
    resumed = train(config, resume=True, data=smoke_data, log=lines.append)
    assert not any("classifier probed" in line for line in lines)
    assert resumed["epochs"] == 2 and first["epochs"] == 1


def test_cosine_classifier_and_unit_triplet_train_and_resume(tmp_path, smoke_data, smoke_table):
    """--id-margin and --triplet-normalise: the probe fits the cosine classifier, a run trains with both,
    and both are part of what a resume must repeat (an older checkpoint means: unset)."""
    from reidx.pipeline.training.head import probe_classifier

    config = smoke_config(smoke_table, tmp_path / "model.pth", head_init="probe", id_margin=0.35,
                          triplet_normalise=True)
    model, _ = build_model(config, smoke_data.num_classes)
    probe = probe_classifier(model, smoke_data, config.label_smoothing, config.weight_decay, config.id_margin)
    assert probe["crops"] == 116 and probe["accuracy"] >= 0.95, probe
    first = train(config, data=smoke_data, stop_after=1)
    assert first["epochs"] == 1 and math.isfinite(first["history"][-1]["loss"])
    for changed, message in (({"triplet_normalise": True}, "id_margin: 0.35 → None"),
                             ({"id_margin": 0.35}, "triplet_normalise: True → False")):
        with pytest.raises(ValueError, match=message):
            train(smoke_config(smoke_table, tmp_path / "model.pth", head_init="probe", **changed), resume=True,
                  data=smoke_data)
    assert train(config, resume=True, data=smoke_data)["epochs"] == 2
