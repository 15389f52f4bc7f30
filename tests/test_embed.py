"""The embedder on real Con-ReID crops: preprocessing, fast path fidelity, ONNX backend, bad files."""

import numpy as np
import pytest
import torch
from PIL import Image

from reidx.pipeline.datasets import list_images
from reidx.pipeline.embed import OnnxEmbedder, TorchEmbedder, build_embedder, resize_crop, to_input_tensor
from reidx.pipeline.embed_files import embed_files
from reidx.pipeline.imaging import load_image
from conftest import CON_REID


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    paths = list_images([CON_REID / "bounding_box_test"])[::80]  # 67 crops of many identities
    return np.stack([resize_crop(load_image(p)) for p in paths])


@pytest.fixture(scope="module")
def plain_fp32() -> TorchEmbedder:
    return TorchEmbedder("osnet_x0_25_msmt17", fast=False)


def test_preprocessing_is_torchreids():
    red = Image.new("RGB", (64, 128), (255, 0, 0))
    crop = resize_crop(red)
    assert crop.shape == (256, 128, 3)
    x = to_input_tensor(crop[None])
    expected = [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (0 - 0.406) / 0.225]
    assert x.shape == (1, 3, 256, 128)
    assert torch.allclose(x[0, :, 100, 60], torch.tensor(expected), atol=1e-6)
    # bilinear resize as PIL does it (what torchvision's Resize calls for PIL images)
    ramp = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (128, 1))[..., None].repeat(3, 2))
    assert np.array_equal(resize_crop(ramp), np.asarray(ramp.resize((128, 256), Image.BILINEAR)))


def test_features_are_unit_float32_512d(crops, plain_fp32):
    features = TorchEmbedder("osnet_x0_25_msmt17").embed(crops)
    assert features.dtype == np.float32 and features.shape == (len(crops), 512)
    assert np.allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)


def test_fast_path_keeps_every_feature(crops, plain_fp32):
    reference = plain_fp32.embed(crops)
    fast = TorchEmbedder("osnet_x0_25_msmt17").embed(crops)
    assert (fast * reference).sum(1).min() >= 0.99999


def test_batch_composition_does_not_change_features(crops):
    embedder = TorchEmbedder("osnet_x0_25_msmt17")
    whole = embedder.embed(crops)
    one_by_one = np.concatenate([embedder.embed(crops[i:i + 1]) for i in range(8)])
    assert np.abs(whole[:8] - one_by_one).max() < 1e-5


def test_bf16_is_opt_in_and_close(crops, plain_fp32):
    embedder = TorchEmbedder("osnet_x0_25_msmt17", precision="bf16")
    assert TorchEmbedder("osnet_x0_25_msmt17").precision == "fp32"
    cosine = (embedder.embed(crops) * plain_fp32.embed(crops)).sum(1)
    assert cosine.min() > 0.98  # measured ≥ 0.991: too loose for the default, fine on request


def test_onnx_backend_matches_our_torch_model_on_the_same_weights(crops):
    # The shared export is another training run than osnet_x0_25_msmt17.pth (its weights differ),
    # so the comparison that means something is onnxruntime vs our OSNet holding the export's weights.
    onnx_embedder = OnnxEmbedder("osnet_x0_25_msmt17.onnx")
    torch_embedder = TorchEmbedder("osnet_x0_25_msmt17.onnx")
    assert onnx_embedder.info.name == "osnet_x0_25_msmt17"
    assert onnx_embedder.info.weights_sha256 == torch_embedder.info.weights_sha256
    cosine = (onnx_embedder.embed(crops) * torch_embedder.embed(crops)).sum(1)
    assert cosine.min() >= 0.999


def test_checkpoint_run_by_onnxruntime_equals_torch(crops, plain_fp32):
    """The default CPU path: our OSNet exported in memory, run by onnxruntime."""
    onnx_embedder = build_embedder("osnet_x0_25_msmt17")
    assert isinstance(onnx_embedder, OnnxEmbedder)
    assert onnx_embedder.info.weights_sha256 == plain_fp32.info.weights_sha256
    assert (onnx_embedder.embed(crops) * plain_fp32.embed(crops)).sum(1).min() >= 0.99999


def test_onnx_batches_equal_single_images(crops):
    onnx_embedder = OnnxEmbedder("osnet_x0_25_msmt17")
    single = np.concatenate([onnx_embedder.embed(crops[i:i + 1]) for i in range(4)])
    assert np.abs(onnx_embedder.embed(crops[:4]) - single).max() < 1e-5


def test_embed_files_records_bad_files_and_keeps_order(tmp_path, plain_fp32):
    good = list_images([CON_REID / "query"])[:5]
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello")
    truncated = good[0].read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(truncated[: len(truncated) // 3])
    paths = [good[0], tmp_path / "empty.jpg", good[1], tmp_path / "text.jpg", tmp_path / "truncated.jpg",
             *good[2:]]
    result = embed_files(plain_fp32, paths, batch_size=3)
    assert [e is None for e in result.errors] == [True, False, True, False, False, True, True, True]
    assert "empty" in result.errors[1] and "not an image" in result.errors[3]
    assert np.isnan(result.embeddings[1]).all()
    expected = plain_fp32.embed(np.stack([resize_crop(load_image(p)) for p in good]))
    assert np.abs(result.embeddings[result.ok] - expected).max() < 1e-5
