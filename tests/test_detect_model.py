"""YOLOX in torch: published sizes, official checkpoint layout, ONNX import equal to onnxruntime."""

import numpy as np
import pytest
import torch

from reidx.pipeline.detect import Detector, letterbox
from reidx.pipeline.imaging import load_image
from reidx.pipeline.models.weights import WeightsError, resolve_weights
from reidx.pipeline.models.yolox import (YOLOX_SIZES, BaseConv, FusedConv, build_yolox, focus_as_conv, fold_batchnorm,
                                   fuse_conv_silu, infer_yolox_size)
from reidx.pipeline.models.yolox_onnx import OnnxYOLOX, graph_input_size, load_yolox_onnx
from conftest import MODELS, SCENES

ONNX = MODELS / "yolox_nano.onnx"

# Parameter counts in the YOLOX README (millions, as rounded there).
PUBLISHED_PARAMS = {"yolox_nano": 0.91, "yolox_tiny": 5.06, "yolox_s": 9.0, "yolox_m": 25.3, "yolox_l": 54.2,
                    "yolox_x": 99.1}


@pytest.mark.parametrize("name", list(YOLOX_SIZES))
def test_sizes_have_the_published_parameter_counts(name):
    with torch.device("meta"):  # no memory, no init: X has 99 M parameters
        model = build_yolox(name)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    digits = len(str(PUBLISHED_PARAMS[name]).split(".")[1])
    assert round(count, digits) == PUBLISHED_PARAMS[name]
    assert infer_yolox_size(model.state_dict()) == name
    assert all(m.eps == 1e-3 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_official_checkpoint_layout_loads_strictly(tmp_path):
    """An official checkpoint is {"model": state_dict, ...}; a file of another size is refused."""
    torch.manual_seed(0)
    model = build_yolox("yolox_nano").eval()
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    path = tmp_path / "my_nano.pth"
    torch.save({"model": model.state_dict(), "start_epoch": 300, "optimizer": {}}, path)
    detector = Detector(str(path), input_size=416)
    assert detector.info.name == "yolox_nano" and detector.info.input_size == 416
    x = torch.rand(1, 3, 416, 416) * 255
    with torch.no_grad():
        expected = model(x)
    assert (detector.raw(x) - expected).abs().max() < 1e-3  # folded + fused path equals the plain model
    assert Detector(str(path), backend="auto").info.backend == "torch"  # onnxruntime runs ONNX files only

    state = model.state_dict()
    state.pop("head.obj_preds.0.bias")
    torch.save({"model": state}, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="missing"):
        Detector(str(tmp_path / "broken.pth"))


def test_known_checkpoint_names_point_at_the_official_release(monkeypatch, tmp_path):
    monkeypatch.setenv("REIDX_MODEL_DIR", str(tmp_path))
    monkeypatch.setattr("reidx.pipeline.models.weights.CACHE_DIR", tmp_path / "cache")
    with pytest.raises(WeightsError, match="Megvii-BaseDetection/YOLOX/releases/download/0.1.1rc0/yolox_s.pth"):
        resolve_weights("yolox_s")


@pytest.fixture(scope="module")
def frames():
    paths = sorted((SCENES / "frames").glob("*.jpg"))
    return [np.asarray(load_image(p)) for p in paths[::5]]


def test_onnx_import_equals_onnxruntime_on_the_same_tensor(frames):
    assert graph_input_size(ONNX) == (416, 416)
    x, _ = letterbox(frames, 416)
    x = torch.cat([x, torch.rand(1, 3, 416, 416) * 255])
    import onnxruntime as ort

    session = ort.InferenceSession(str(ONNX), providers=["CPUExecutionProvider"])  # the file exactly as shipped
    reference = np.concatenate([session.run(None, {"images": x[i:i + 1].numpy()})[0] for i in range(len(x))])
    assert reference.shape == (len(x), 3549, 85)
    plain = load_yolox_onnx(ONNX)  # BatchNorm folded, eager convolutions
    with torch.no_grad():
        assert np.abs(plain(x).numpy() - reference).max() < 1e-3
    # our torch path: channels-last, fused conv+SiLU where available (auto picks onnxruntime on CPU)
    fast = Detector("yolox_nano.onnx", backend="torch")
    assert fast.info.backend == "torch" and np.abs(fast.raw(x).numpy() - reference).max() < 1e-3
    runtime = Detector("yolox_nano.onnx", backend="auto", device="cpu")
    assert runtime.info.backend == "onnx" and np.abs(runtime.raw(x).numpy() - reference).max() < 1e-3


def test_shape_agnostic_graph_runs_other_sizes_and_batches():
    runner = OnnxYOLOX(ONNX)
    model = load_yolox_onnx(ONNX)
    x = torch.rand(2, 3, 640, 640) * 255
    out = runner(x)
    assert out.shape == (2, 8400, 85)
    with torch.no_grad():
        assert np.abs(model(x).numpy() - out).max() < 1e-3


def test_fusion_is_checked_and_reversible():
    model = build_yolox("yolox_nano").eval()
    x = torch.rand(1, 3, 64, 64) * 255
    assert not fuse_conv_silu(model, x)  # BatchNorm still there: nothing to fuse
    fold_batchnorm(model)
    with torch.no_grad():
        before = model(x)
        model = model.to(memory_format=torch.channels_last)
        fused = fuse_conv_silu(model, x.contiguous(memory_format=torch.channels_last))
        after = model(x)
    kinds = {type(m) for m in model.modules()}
    assert (FusedConv in kinds) == fused and (BaseConv in kinds) != fused
    assert (after - before).abs().max() < 1e-3


def test_focus_stem_is_one_6x6_convolution():
    torch.manual_seed(0)
    model = fold_batchnorm(build_yolox("yolox_s").eval())
    stem = model.backbone.backbone.stem
    x = torch.rand(2, 3, 64, 96) * 255
    with torch.no_grad():
        expected = stem(x)
        got = torch.nn.functional.silu(focus_as_conv(stem)(x))
    assert got.shape == expected.shape == (2, 32, 32, 48)
    assert (got - expected).abs().max() < 1e-3 * expected.abs().max()
