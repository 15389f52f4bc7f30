"""Weight lookup (names, folders, checksums) and safe loading, on the real published files."""

import shutil

import pytest
import torch

from reidx.pipeline.models.osnet import build_osnet, infer_osnet_arch, load_osnet_state
from reidx.pipeline.models.weights import (
    KNOWN_MODELS,
    WeightsError,
    load_state_dict,
    resolve_weights,
)
from conftest import MODELS


def test_name_resolves_in_model_dir_and_is_verified(monkeypatch):
    monkeypatch.setenv("REIDX_MODEL_DIR", str(MODELS))
    resolved = resolve_weights("osnet_x0_25_msmt17")
    assert resolved.path == (MODELS / "osnet_x0_25_msmt17.pth").resolve()
    assert resolved.sha256 == KNOWN_MODELS["osnet_x0_25_msmt17"].sha256
    assert resolved.model_name == "osnet_x0_25_msmt17"
    assert resolve_weights("osnet_x0_25_msmt17", ".onnx").path.suffix == ".onnx"


def test_missing_name_lists_where_it_looked_and_the_download_address(monkeypatch, tmp_path):
    monkeypatch.setenv("REIDX_MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(WeightsError) as err:
        resolve_weights("osnet_x1_0_msmt17")
    message = str(err.value)
    assert str(tmp_path / "osnet_x1_0_msmt17.pth") in message
    assert ".cache/reidx/models/osnet_x1_0_msmt17.pth" in message
    assert KNOWN_MODELS["osnet_x1_0_msmt17"].url in message


def test_cache_dir_is_searched_after_model_dir(monkeypatch, tmp_path):
    cache = tmp_path / "home" / ".cache" / "reidx" / "models"
    cache.mkdir(parents=True)
    shutil.copy(MODELS / "osnet_x0_25_market1501.pth", cache)
    monkeypatch.setenv("REIDX_MODEL_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_weights("osnet_x0_25_market1501").path == (cache / "osnet_x0_25_market1501.pth").resolve()


def test_corrupt_known_file_fails_its_checksum(monkeypatch, tmp_path):
    data = bytearray((MODELS / "osnet_x0_25_msmt17.pth").read_bytes())
    data[-100] ^= 0xFF
    (tmp_path / "osnet_x0_25_msmt17.pth").write_bytes(bytes(data))
    monkeypatch.setenv("REIDX_MODEL_DIR", str(tmp_path))
    with pytest.raises(WeightsError, match="does not match the published"):
        resolve_weights("osnet_x0_25_msmt17")


def test_unknown_name_and_missing_path_are_clear_errors():
    with pytest.raises(WeightsError, match="unknown model name 'osnet_x9'"):
        resolve_weights("osnet_x9")
    with pytest.raises(WeightsError, match="does not exist"):
        resolve_weights("/nonexistent/model.pth")


def test_explicit_path_loads_without_registry(tmp_path):
    target = tmp_path / "finetuned.pth"
    shutil.copy(MODELS / "osnet_x0_25_msmt17.pth", target)
    resolved = resolve_weights(str(target))
    assert resolved.known is None and resolved.model_name == "finetuned"


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module_prefix"])
def test_checkpoint_layouts_load_to_the_same_tensors(tmp_path, wrap):
    state = load_state_dict(MODELS / "osnet_x0_25_msmt17.pth")
    if wrap == "state_dict":
        obj = {"state_dict": state, "epoch": 150, "rank1": 0.6}
    elif wrap == "model":
        obj = {"model": state}
    elif wrap == "module_prefix":
        obj = {f"module.{k}": v for k, v in state.items()}
    else:
        obj = state
    torch.save(obj, tmp_path / "ckpt.pth")
    loaded = load_state_dict(tmp_path / "ckpt.pth")
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_pickled_model_object_is_refused(tmp_path):
    torch.save(build_osnet("osnet_x0_25"), tmp_path / "whole_model.pth")
    with pytest.raises(WeightsError, match="pickled Python objects"):
        load_state_dict(tmp_path / "whole_model.pth")


def test_non_checkpoint_file_is_refused(tmp_path):
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(WeightsError, match="not a readable torch checkpoint|pickled"):
        load_state_dict(tmp_path / "notes.pth")


def test_torchreid_checkpoint_loads_strictly_except_classifier():
    state = load_state_dict(MODELS / "osnet_x0_25_msmt17.pth")
    assert state["classifier.weight"].shape == (1041, 512)
    assert infer_osnet_arch(state) == "osnet_x0_25"
    model = build_osnet("osnet_x0_25")
    load_osnet_state(model, state)
    assert torch.equal(model.conv1.conv.weight, state["conv1.conv.weight"])
    with pytest.raises(ValueError, match="does not match the OSNet architecture"):
        load_osnet_state(model, {k: v for k, v in state.items() if k != "conv5.bn.weight"})
    with pytest.raises(ValueError, match="size mismatch"):
        load_osnet_state(build_osnet("osnet_x0_5"), state)


@pytest.mark.parametrize("arch", ["osnet_x1_0", "osnet_x0_75", "osnet_x0_5", "osnet_x0_25", "osnet_ibn_x1_0"])
def test_every_width_builds_infers_and_embeds(arch):
    model = build_osnet(arch).eval()
    assert infer_osnet_arch(model.state_dict()) == arch
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 256, 128)).shape == (2, 512)
