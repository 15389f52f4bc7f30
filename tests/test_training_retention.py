"""Fine-tuning without forgetting: WiSE-FT mixing of base and fine-tuned weights, distillation from
the frozen base, and the base-vs-output report on a second domain (``--val-other``), on a tiny
real run (one epoch on six Con-ReID identities)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from reidx.pipeline.datasets import list_images
from reidx.pipeline.embed import build_embedder
from reidx.pipeline.labels import parse_market_name
from reidx.pipeline.models.weights import load_state_dict
from reidx.pipeline.training.augment import Photometric
from reidx.pipeline.training.loop import train
from reidx.pipeline.training.retention import load_base, wise_interpolate
from conftest import CON_REID, MODELS, SHARED
from test_training import SMOKE_IDS, TRAIN_DIR, smoke_config, smoke_data, smoke_table  # noqa: F401 (fixtures)

CUHK03 = SHARED / "data" / "cuhk03-train"


def embed(weights, crops) -> np.ndarray:
    return build_embedder(str(weights), backend="torch", device="cpu").embed(crops)


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory, smoke_data, smoke_table):
    """One plain epoch, trained once: each test re-makes the output from a copy of its resume
    checkpoint (a finished run resumed with other output options is not trained again)."""
    out = tmp_path_factory.mktemp("one_epoch") / "model.pth"
    return out, train(smoke_config(smoke_table, out, epochs=1), data=smoke_data)


def copy_run(one_epoch, folder):
    """The one-epoch run's resume checkpoint copied beside a new output path in ``folder``."""
    from reidx.pipeline.training.checkpoint import resume_path

    out = folder / "model.pth"
    shutil.copy(resume_path(one_epoch[0]), resume_path(out))
    return out


def test_wise_alpha_mixes_base_and_fine_tuned_weights(tmp_path, smoke_data, smoke_table, one_epoch):
    out = copy_run(one_epoch, tmp_path)
    tuned = train(smoke_config(smoke_table, out, epochs=1), resume=True, data=smoke_data)
    assert tuned["history"] == one_epoch[1]["history"]  # re-made from the copy, not trained again
    assert tuned["wise_alpha"] == 1.0 and tuned["epochs"] == 1
    tuned_state = torch.load(out, weights_only=True)["state_dict"]
    crops = smoke_data.crops(np.arange(0, 116, 9))
    tuned_features, base_features = embed(out, crops), embed("osnet_x0_25_msmt17", crops)
    assert (tuned_features * base_features).sum(1).min() < 0.999  # training moved the features

    # a finished run resumed with another α is re-mixed from the unmixed weights, not trained again
    with pytest.raises(ValueError, match="lr"):
        train(smoke_config(smoke_table, out, epochs=1, lr=1e-3, wise_alpha=0.0), resume=True, data=smoke_data)
    remixed = train(smoke_config(smoke_table, out, epochs=1, wise_alpha=0.0), resume=True, data=smoke_data)
    assert remixed["epochs"] == 1 and remixed["history"] == tuned["history"]
    saved = torch.load(out, weights_only=True)
    assert saved["reidx_training"]["wise_alpha"] == 0.0 and saved["reidx_training"]["config"]["wise_alpha"] == 0.0
    base_state = load_state_dict(MODELS / "osnet_x0_25_msmt17.pth")  # the published file itself
    for key, value in saved["state_dict"].items():  # α = 0: the base's tensors bit for bit (BN statistics too)
        if key.startswith("classifier.") or key.endswith("num_batches_tracked"):
            assert torch.equal(value, tuned_state[key])  # the new classifier and BN's step counters
        else:
            assert torch.equal(value, base_state[key]), key
    assert np.array_equal(embed(out, crops), base_features)

    train(smoke_config(smoke_table, out, epochs=1, wise_alpha=1.0), resume=True, data=smoke_data)
    assert np.array_equal(embed(out, crops), tuned_features)

    train(smoke_config(smoke_table, out, epochs=1, wise_alpha=0.5), resume=True, data=smoke_data)
    half = torch.load(out, weights_only=True)["state_dict"]
    for key in ("conv1.conv.weight", "conv1.bn.running_var", "fc.0.weight"):
        assert torch.allclose(half[key], (base_state[key] + tuned_state[key]) / 2, atol=1e-6), key
    assert torch.equal(half["conv1.bn.num_batches_tracked"], tuned_state["conv1.bn.num_batches_tracked"])
    mixed = embed(out, crops)
    assert not np.allclose(mixed, base_features, atol=1e-4) and not np.allclose(mixed, tuned_features, atol=1e-4)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        wise_interpolate(base_state, tuned_state, 1.5)


def test_recompute_bn_refits_only_the_statistics_to_the_mixed_network(tmp_path, smoke_data, smoke_table, one_epoch):
    """--recompute-bn: after the WiSE-FT mix every BatchNorm's running statistics are the mean over
    the clean training crops of the mixed network's own activations; weights are untouched."""
    from reidx.pipeline.embed import to_input_tensor
    from reidx.pipeline.models.osnet import build_osnet, load_osnet_state

    out = copy_run(one_epoch, tmp_path)
    train(smoke_config(smoke_table, out, epochs=1, wise_alpha=0.5), resume=True, data=smoke_data)
    mixed = torch.load(out, weights_only=True)["state_dict"]
    lines = []
    summary = train(smoke_config(smoke_table, out, epochs=1, wise_alpha=0.5, recompute_bn=True), resume=True,
                    data=smoke_data, log=lines.append)
    assert summary["recompute_bn"] is True and summary["history"] == one_epoch[1]["history"]  # not trained again
    assert any("BatchNorm statistics recomputed on 116" in line for line in lines)
    saved = torch.load(out, weights_only=True)
    repaired = saved["state_dict"]
    assert saved["reidx_training"]["recompute_bn"] is True
    statistics = [k for k in mixed if k.endswith(("running_mean", "running_var"))]
    for key in mixed:
        if key in statistics:
            assert not torch.allclose(repaired[key], mixed[key], rtol=1e-3, atol=0), key
        elif not key.endswith("num_batches_tracked"):
            assert torch.equal(repaired[key], mixed[key]), key
    # the stem's statistics by hand: its convolution's output over all 116 crops, in the seeded order, in
    # batches of 64, each batch's mean weighted alike (BatchNorm's cumulative average). BatchNorm's own
    # float32 sums over 64×128×64 values per channel land up to ~0.006 from an exact mean (measured),
    # far closer than the mixed statistics were
    model = build_osnet("osnet_x0_25")
    load_osnet_state(model, mixed)
    order = np.random.default_rng(0).permutation(116)
    with torch.no_grad():
        expected = torch.stack([model.conv1.conv(to_input_tensor(smoke_data.crops(order[i:i + 64]))).mean((0, 2, 3))
                                for i in range(0, 116, 64)]).mean(0)
    error = (repaired["conv1.bn.running_mean"] - expected).abs().max()
    assert error < 0.02 and error < (mixed["conv1.bn.running_mean"] - expected).abs().max() / 10, error
    # the features change, and the repair is undone by re-making the output without it
    crops = smoke_data.crops(np.arange(0, 116, 9))
    repaired_features = embed(out, crops)
    train(smoke_config(smoke_table, out, epochs=1, wise_alpha=0.5), resume=True, data=smoke_data)
    assert torch.equal(torch.load(out, weights_only=True)["state_dict"]["conv1.bn.running_mean"],
                       mixed["conv1.bn.running_mean"])
    assert not np.allclose(embed(out, crops), repaired_features, atol=1e-3)


def train_mode_features(weights, crops) -> np.ndarray:
    """Features as the distillation term sees the student: BatchNorm on the batch's own statistics."""
    from reidx.pipeline.embed import l2_normalise, to_input_tensor
    from reidx.pipeline.models.registry import load_model

    with torch.no_grad():
        module = load_model(str(weights), "osnet", domain_gate=False).module.train()
        return l2_normalise(module(to_input_tensor(crops)).numpy())


def test_distillation_pulls_the_student_towards_the_base(tmp_path, smoke_data, smoke_table):
    """The term pulls the student's training-mode features (batch statistics) towards the base's.
    Its eval-mode effect on these 16-crop batches is not monotone in λ (0.77 / 0.81 / 0.77 at λ 0 /
    5 / 20 with a random classifier, 0.85 / 0.85 / 0.77 with the probe): the term compares batch-
    statistics features with the base's running-statistics ones (docs/training.md, "Forgetting")."""
    crops = smoke_data.crops(np.arange(0, 116, 5))
    base_features = embed("osnet_x0_25_msmt17", crops)
    closeness = {}
    for weight in (0.0, 20.0):
        out = tmp_path / f"distill{weight:g}.pth"
        summary = train(smoke_config(smoke_table, out, epochs=1, distill_weight=weight), data=smoke_data)
        closeness[weight] = float((train_mode_features(out, crops) * base_features).sum(1).mean())
    assert summary["distill_weight"] == 20.0
    assert torch.load(out, weights_only=True)["reidx_training"]["config"]["distill_weight"] == 20.0
    assert closeness[20.0] > closeness[0.0] + 0.02, closeness  # measured 0.539 vs 0.506
    teacher = load_base("osnet_x0_25_msmt17")
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training


def test_surgical_stages_keep_the_rest_and_photometric_distillation_trains(tmp_path, smoke_data, smoke_table):
    """--train-stages conv1: every other stage keeps the base's tensors bit for bit, BatchNorm
    statistics included (frozen stages run in eval mode); the photometric distillation view trains."""
    out = tmp_path / "stem.pth"
    summary = train(smoke_config(smoke_table, out, epochs=1, train_stages=["conv1"], distill_weight=1.0,
                                 distill_view="photometric"), data=smoke_data)
    assert summary["epochs"] == 1 and summary["final_loss"] > 0
    tuned = torch.load(out, weights_only=True)
    assert tuned["reidx_training"]["config"]["train_stages"] == ["conv1"]
    base_state = load_state_dict(MODELS / "osnet_x0_25_msmt17.pth")
    for key, value in tuned["state_dict"].items():
        if key.startswith("conv1."):  # the stem learnt (weights and statistics; its step counter counts on)
            assert not torch.equal(value, base_state[key]), key
        elif not key.startswith("classifier."):
            assert torch.equal(value, base_state[key]), key
    with pytest.raises(ValueError, match="unknown stage"):
        train(smoke_config(smoke_table, out, epochs=1, train_stages=["conv9"]), data=smoke_data)
    with pytest.raises(ValueError, match="distill_view"):
        train(smoke_config(smoke_table, out, epochs=1, distill_view="blur"), data=smoke_data)


def test_photometric_view_is_seeded_and_changes_colour_and_resolution(smoke_data):
    crops = smoke_data.crops(np.arange(8))
    first = Photometric()(crops, np.random.default_rng(3))
    assert first.dtype == np.uint8 and first.shape == crops.shape
    assert np.array_equal(first, Photometric()(crops, np.random.default_rng(3)))
    gray = Photometric(gray_p=1.0, blur_p=0.0)(crops, np.random.default_rng(3)).astype(int)
    assert np.abs(gray[..., 0] - gray[..., 1]).max() <= 1 and np.abs(gray[..., 1] - gray[..., 2]).max() <= 1
    blurred = Photometric(blur_p=1.0, blur_scale=(0.25, 0.25), brightness=(1, 1), contrast=(1, 1),
                          saturation=(1, 1), gray_p=0.0)(crops, np.random.default_rng(3)).astype(float)
    detail = lambda x: np.abs(np.diff(x, axis=1)).mean()  # noqa: E731 (vertical pixel differences)
    assert detail(blurred) < 0.85 * detail(crops.astype(float))  # 0.75 with this seed


def test_cli_train_reports_base_and_output_on_target_and_other_domain(tmp_path):
    """`reidx train --val-query/--val-gallery --val-other` prints both domains' mAP for the base and
    the output weights in --json: the numbers `reidx evaluate`'s code gives for each."""
    from click.testing import CliRunner

    from reidx.cli import main
    from reidx.indexers.evaluation import evaluate_split
    from reidx.pipeline.labelled_split import embed_side

    folder = tmp_path / "crops"
    folder.mkdir()
    for image in list_images([TRAIN_DIR]):
        if parse_market_name(image.name)[0] in SMOKE_IDS[1:5]:
            shutil.copy(image, folder)
    out = tmp_path / "cli.pth"
    target = [str(CON_REID / "query" / "001[5-7]_*"), str(CON_REID / "bounding_box_test" / "001[5-7]_c1*")]
    other = [str(CUHK03 / "query" / "000?_*"), str(CUHK03 / "gallery" / "000?_*")]
    args = ["train", "--data", str(folder), "--out", str(out), "--epochs", "1", "--p", "4", "--k", "4",
            "--loss", "id+triplet+oim", "--oim-weight", "0.5", "--device", "cpu", "--threads", "1",
            "--val-query", target[0], "--val-gallery", target[1], "--val-other", *other,
            "--wise-alpha", "0.7", "--distill-weight", "0.5", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["epochs"] == 1 and report["num_identities"] == 4 and report["losses"] == {
        "id": 1.0, "triplet": 1.0, "oim": 0.5}
    assert report["wise_alpha"] == 0.7 and report["distill_weight"] == 0.5
    saved = torch.load(out, weights_only=True)["reidx_training"]
    assert saved["data_hash"] == report["data_hash"] and saved["evaluation"] == report["evaluation"]
    for side, (query, gallery) in {"target": target, "other": other}.items():
        figures = report["evaluation"][side]
        assert (figures["query"], figures["gallery"]) == (query, gallery)
        for key, weights in (("base", "osnet_x0_25_msmt17"), ("fine_tuned", str(out))):
            embedder = build_embedder(weights)
            expected = evaluate_split(embed_side([query], embedder), embed_side([gallery], embedder))
            assert figures[key]["mAP"] == expected.as_percent_dict()["mAP"], (side, key)
        assert figures["delta_mAP"] == round(figures["fine_tuned"]["mAP"] - figures["base"]["mAP"], 2)
    assert report["validation"] == report["evaluation"]["target"]["fine_tuned"]
    assert "other (" in CliRunner().invoke(main, args[:-1] + ["--resume"]).output  # text form, re-mixed only
    finished = out.read_bytes()
    again = CliRunner().invoke(main, args)  # without --resume: refused, the finished run is kept
    assert again.exit_code == 1 and "cli.resume.pth holds the finished epochs" in again.output, again.output
    assert "add --resume" in again.output and out.read_bytes() == finished
    bad = CliRunner().invoke(main, ["train", "--data", str(folder), "--out", str(tmp_path / "bad.pth"), "--p", "5"])
    assert bad.exit_code == 1 and "only 4 labelled identities" in bad.output


def test_soup_with_averages_other_seeds_and_refuses_runs_that_differ(tmp_path, smoke_data, smoke_table, one_epoch):
    """--soup-with: a finished run re-made with another seed's resume checkpoint gets the element-wise
    mean of the two tuned networks (then the WiSE-FT mix as usual), not trained again; a run that is
    not another seed of it — other data, other options, unfinished, its output or itself — is refused."""
    from click.testing import CliRunner

    from reidx.cli import main
    from reidx.pipeline.training.checkpoint import resume_path

    out = copy_run(one_epoch, tmp_path)
    other = tmp_path / "seed1" / "model.pth"
    other.parent.mkdir()
    train(smoke_config(smoke_table, other, epochs=1, seed=1), data=smoke_data)
    mine, theirs = (torch.load(resume_path(p), weights_only=True)["state_dict"] for p in (out, other))
    assert not torch.equal(mine["conv1.conv.weight"], theirs["conv1.conv.weight"])  # the seeds differ

    summary = train(smoke_config(smoke_table, out, epochs=1, soup_with=[str(resume_path(other))]), resume=True,
                    data=smoke_data)
    assert summary["history"] == one_epoch[1]["history"] and summary["soup_with"] == [str(resume_path(other))]
    souped = torch.load(out, weights_only=True)["state_dict"]
    for key in ("conv1.conv.weight", "conv2.0.conv1.bn.running_mean", "fc.0.weight", "classifier.weight"):
        assert torch.allclose(souped[key], (mine[key] + theirs[key]) / 2, atol=1e-7), key
    assert torch.equal(souped["conv1.bn.num_batches_tracked"], mine["conv1.bn.num_batches_tracked"])
    half = train(smoke_config(smoke_table, out, epochs=1, soup_with=[str(resume_path(other))], wise_alpha=0.5),
                 resume=True, data=smoke_data)
    assert half["wise_alpha"] == 0.5
    base_state = load_state_dict(MODELS / "osnet_x0_25_msmt17.pth")
    mixed = torch.load(out, weights_only=True)["state_dict"]
    assert torch.allclose(mixed["fc.0.weight"], (base_state["fc.0.weight"] + souped["fc.0.weight"]) / 2, atol=1e-6)

    def refused(member, match, **overrides):
        with pytest.raises(ValueError, match=match):
            train(smoke_config(smoke_table, out, epochs=1, soup_with=[str(member)], **overrides), resume=True,
                  data=smoke_data)

    refused(resume_path(out), "this run's own checkpoint")
    refused(other, "not a resume checkpoint")  # the other run's output: already mixed
    saved = torch.load(resume_path(other), weights_only=True)
    saved["reidx_training"]["epochs"] = 0  # as if interrupted before its last epoch
    torch.save(saved, tmp_path / "unfinished.pth")
    refused(tmp_path / "unfinished.pth", "finished 0 of 1 epochs")
    saved["reidx_training"].update(epochs=1, data_hash="0" * 64)
    torch.save(saved, tmp_path / "elsewhere.pth")
    refused(tmp_path / "elsewhere.pth", "other data")
    saved = torch.load(resume_path(other), weights_only=True)
    saved["reidx_training"]["config"]["lr"] = 1e-3
    torch.save(saved, tmp_path / "other_lr.pth")
    refused(tmp_path / "other_lr.pth", r"more than the seed \(lr: 0.001 → 0.0005\)")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    refused(tmp_path / "garbage.pth", "not a readable checkpoint")
    fresh = tmp_path / "fresh" / "model.pth"  # a new run is refused before it trains, not after
    with pytest.raises(ValueError, match="other data"):
        train(smoke_config(smoke_table, fresh, epochs=1, soup_with=[str(tmp_path / "elsewhere.pth")]), data=smoke_data)
    assert not resume_path(fresh).exists()
    with pytest.raises(ValueError, match="twice"):
        smoke_config(smoke_table, out, epochs=1, soup_with=["a.pth", "a.pth"]).check()
    missing = CliRunner().invoke(main, ["train", "--data", str(smoke_table), "--out", str(out), "--soup-with",
                                        str(tmp_path / "absent.resume.pth")])
    assert missing.exit_code == 1 and "absent.resume.pth' does not exist" in missing.output


def test_checkpoints_from_before_distillation_resume_as_undistilled(tmp_path):
    """A resume checkpoint written before --distill-weight existed was trained without it: resuming
    it with λ = 1 would change the run, so it is refused; λ = 0 (today's default) continues."""
    from reidx.pipeline.training.checkpoint import check_resumable, plain_config
    from reidx.pipeline.training.loop import TrainConfig

    old = TrainConfig(data="crops", out=str(tmp_path / "m.pth"), distill_weight=0.0)
    saved = {"reidx_training": {"data_hash": "h", "config": {
        k: v for k, v in plain_config(old).items() if k not in ("distill_weight", "wise_alpha", "val_other")}}}
    check_resumable(saved, old, "h", tmp_path / "m.resume.pth")
    with pytest.raises(ValueError, match="distill_weight: 0.0 → 1.0"):
        check_resumable(saved, TrainConfig(data="crops", out=old.out, distill_weight=1.0), "h", tmp_path / "m.resume.pth")
    check_resumable(saved, TrainConfig(data="crops", out=old.out), "h", tmp_path / "m.resume.pth")


def test_domain_gate_gives_tuned_features_on_site_and_base_features_elsewhere(tmp_path, smoke_data, smoke_table,
                                                                              one_epoch):
    """The gated checkpoint holds the base and the tuned network: crops of the training site (its
    own crops, and unseen Con-ReID people) get the tuned features; cuhk03 crops, another campus,
    get the base's. The ONNX backend runs the same gate."""
    from reidx.pipeline.embed import to_input_tensor
    from reidx.pipeline.models.domain_gate import DomainGatedOSNet
    from reidx.pipeline.models.registry import load_model

    out = copy_run(one_epoch, tmp_path)
    summary = train(smoke_config(smoke_table, out, epochs=1, domain_gate=True, base_share=0.4), resume=True,
                    data=smoke_data)
    saved = torch.load(out, weights_only=True)
    gate = saved["domain_gate"]
    assert summary["domain_gate"] and saved["reidx_training"]["domain_gate"]["k"] == gate["k"] == 10
    assert gate["reference"].shape == (len(smoke_data.paths), 512) and len(gate["low_scores"]) == 6  # ⌈5 % of 116⌉
    base_state = load_state_dict(MODELS / "osnet_x0_25_msmt17.pth")
    assert all(torch.equal(gate["base_state_dict"][k], v) for k, v in base_state.items() if not k.startswith("classifier"))

    gated = load_model(str(out), "osnet").module
    assert isinstance(gated, DomainGatedOSNet)
    assert not isinstance(load_model(str(out), "osnet", domain_gate=False).module, DomainGatedOSNet)
    site = {"training crops": smoke_data.crops(np.arange(0, 116, 4)),
            "unseen Con-ReID people": np.stack([resize(p) for p in sorted((CON_REID / "query").glob("*.jpg"))[:32]]),
            "cuhk03": np.stack([resize(p) for p in sorted((CUHK03 / "query").glob("*.jpg"))[::45][:32]])}
    with torch.no_grad():
        weight = {name: gated.tuned_share(to_input_tensor(crops)).numpy() for name, crops in site.items()}
    # on the site the base keeps its share (--base-share 0.4): the tuned network gets at most 0.6
    assert gate["base_share"] == 0.4 and weight["training crops"].min() == pytest.approx(0.6)
    assert weight["unseen Con-ReID people"].mean() > 0.8 * 0.6, weight
    # six identities make a coarse gate (measured 0.18 mean, 78 % exactly 0); 71 give 0.0x (docs/training.md)
    assert weight["cuhk03"].mean() < 0.3 and (weight["cuhk03"] == 0).mean() > 0.7, weight
    for name, crops in site.items():
        features, base, tuned = embed(out, crops), embed("osnet_x0_25_msmt17", crops), embed_tuned(out, crops)
        a = weight[name][:, None]
        expected = (1 - a) * base + a * tuned
        assert np.allclose(features, expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=2e-5), name
    train(smoke_config(smoke_table, out, epochs=1, domain_gate=True), resume=True, data=smoke_data)
    assert torch.load(out, weights_only=True)["domain_gate"]["base_share"] == 0.0  # the default; re-made, not retrained
    with torch.no_grad():
        alone = load_model(str(out), "osnet").module.tuned_share(to_input_tensor(site["training crops"]))
    assert alone.min() == 1.0  # share 0: the site's own crops get the tuned features alone
    with pytest.raises(ValueError, match="needs the domain gate"):
        smoke_config(smoke_table, out, epochs=1, base_share=0.2).check()  # smoke_config: no gate
    off_site = site["cuhk03"][weight["cuhk03"] == 0]  # a batch wholly off the site: the base's features exactly
    assert np.array_equal(embed(out, off_site), embed("osnet_x0_25_msmt17", off_site))
    # training on from the gated checkpoint keeps the original base (WiSE-FT, distillation, a new gate)
    kept_base = load_base(str(out)).state_dict()  # loaded once: not once per tensor compared
    assert all(torch.equal(kept_base[k], v) for k, v in base_state.items() if not k.startswith("classifier"))
    onnx = build_embedder(str(out), backend="onnx", device="cpu").embed(site["cuhk03"])
    assert np.abs(onnx - embed(out, site["cuhk03"])).max() < 1e-4

    from reidx.pipeline.models.weights import WeightsError

    narrow_base = {**gate["base_state_dict"], "fc.0.weight": gate["base_state_dict"]["fc.0.weight"][:256]}
    for damage in ({"reference": gate["reference"][:, :100]}, {"low_scores": torch.zeros(0)}, {"k": "ten"},
                   {"k": True}, {"reference": gate["reference"] * float("nan")},
                   {"low_scores": torch.tensor([float("-inf")])}, {"base_state_dict": {}},
                   {"base_state_dict": narrow_base}, {"base_share": 1.0}, {"base_share": "0.4"},
                   {"base_share": True}, {"base_share": -0.1}):
        torch.save({**saved, "domain_gate": {**gate, **damage}}, tmp_path / "damaged.pth")
        with pytest.raises(WeightsError, match="domain_gate entry is damaged"):
            build_embedder(str(tmp_path / "damaged.pth"), backend="torch")
    train(smoke_config(smoke_table, out, epochs=1, domain_gate=False), resume=True, data=smoke_data)
    assert "domain_gate" not in torch.load(out, weights_only=True)  # re-made without the gate, not retrained


def resize(path) -> np.ndarray:
    from reidx.pipeline.embed import resize_crop
    from reidx.pipeline.imaging import load_image

    return resize_crop(load_image(path))


def embed_tuned(weights, crops) -> np.ndarray:
    """The tuned network of a gated checkpoint alone (what a tool unaware of the gate loads)."""
    from reidx.pipeline.embed import l2_normalise, to_input_tensor
    from reidx.pipeline.models.registry import load_model

    with torch.no_grad():
        return l2_normalise(load_model(str(weights), "osnet", domain_gate=False).module(to_input_tensor(crops)).numpy())
