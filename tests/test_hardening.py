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
