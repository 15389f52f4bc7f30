"""Operations-grade nightly job: hostile names, images, archives, servers, weights, filters and folders.

Every case here broke a night (or worse) before; each test builds the real input (files,
archives, a silent local server, racing processes) and runs the real code on it.
"""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import CON_REID, MODELS, REPO, SCENES

QUERY = sorted((CON_REID / "query").iterdir())


def reidx(*args, timeout=600):
    env = {**os.environ, "REIDX_MODEL_DIR": str(MODELS)}
    return subprocess.run([sys.executable, "-m", "reidx.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


# --- case 2: a 1-pixel-thin image through the detector -------------------------------------------

@pytest.mark.parametrize("size", [(5000, 1), (1, 5000)])
def test_thin_image_goes_through_the_detector(size):
    from reidx.pipeline.detect import Detector
    from reidx.pipeline.imaging import decode_image

    frame = Image.open(SCENES / "frames" / "c1s1_001051.jpg").convert("RGB")
    thin = frame.resize(size)  # a real frame squeezed to one row / one column
    buf = io.BytesIO()
    thin.save(buf, format="PNG")
    image = np.asarray(decode_image(buf.getvalue()))
    assert image.shape[:2] == (size[1], size[0])
    (boxes,) = Detector().detect([image])
    assert boxes.ndim == 2 and boxes.shape[1] == 5
    assert np.all(boxes[:, [0, 2]] <= size[0] + 1e-3) and np.all(boxes[:, [1, 3]] <= size[1] + 1e-3)


# --- case 6: files that are not weights ---------------------------------------------------------

def _not_weights(tmp_path, kind):
    if kind == "/etc/passwd":
        return "/etc/passwd"
    path = tmp_path / {"random.onnx": "random.onnx", "text.pth": "text.pth", "random.pth": "random.pth"}[kind]
    if kind == "text.pth":
        path.write_text("hello, these are my notes, not a checkpoint\n" * 20)
    else:
        path.write_bytes(np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return str(path)


@pytest.mark.parametrize("kind, expected", [("random.onnx", "not an ONNX model"),
                                            ("text.pth", "not a readable torch checkpoint"),
                                            ("/etc/passwd", "not a readable torch checkpoint"),
                                            ("random.pth", "not a readable torch checkpoint")])
@pytest.mark.parametrize("loader", ["embed-torch", "embed-onnx", "detector", "load_state_dict"])
def test_a_file_that_is_not_weights_is_one_clear_weights_error(tmp_path, kind, expected, loader):
    from reidx.pipeline.detect import Detector
    from reidx.pipeline.embed import build_embedder
    from reidx.pipeline.models.weights import WeightsError, load_state_dict

    path = _not_weights(tmp_path, kind)
    load = {"embed-torch": lambda p: build_embedder(p, backend="torch"),
            "embed-onnx": lambda p: build_embedder(p, backend="onnx"),
            "detector": lambda p: Detector(p),
            "load_state_dict": load_state_dict}[loader]
    if loader == "load_state_dict" and kind.endswith(".onnx"):
        expected = "not a readable torch checkpoint"  # asked to read it as a checkpoint: that is what it is not
    with pytest.raises(WeightsError) as err:
        load(path)
    message = str(err.value)
    assert expected in message and path in message and "pickled Python objects" not in message
    assert "\n" not in message
