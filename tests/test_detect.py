"""The person detector on real full-HD frames: official pre/post-processing, backends agreeing, the CLI."""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from reidx.pipeline.boxes import box_iou, crop_boxes, nms
from reidx.pipeline.detect import Detector, PostProcess, letterbox, postprocess
from reidx.pipeline.imaging import load_image
from conftest import MODELS, SCENES

FRAMES = sorted((SCENES / "frames").glob("*.jpg"))


def match_one_to_one(a: np.ndarray, b: np.ndarray) -> float:
    """Lowest IoU between each box and its best partner, both ways (1.0 for two empty sets)."""
    assert len(a) == len(b)
    if len(a) == 0:
        return 1.0
    iou = box_iou(a[:, :4], b[:, :4])
    assert (np.sort(iou.argmax(1)) == np.arange(len(a))).all()  # a permutation: one to one
    return min(iou.max(1).min(), iou.max(0).min())


@pytest.fixture(scope="module")
def frames():
    return [np.asarray(load_image(p)) for p in FRAMES]


def test_letterbox_is_yolox_official():
    frame = np.zeros((64, 128, 3), np.uint8)
    frame[..., 0] = 200  # red
    frame[..., 2] = np.arange(128, dtype=np.uint8)[None, :] * 2  # blue ramp 0, 2, 4, ...
    batch, ratios = letterbox([frame], 64)
    assert ratios == [0.5] and batch.shape == (1, 3, 64, 64) and batch.dtype == torch.float32
    top = batch[0, :, :32, :]
    assert (top[2] == 200).all()  # BGR: red is the last channel
    # downscale by 2 without antialiasing = the mean of each pixel pair, as cv2.INTER_LINEAR gives
    assert top[0, 0].tolist() == [4 * x + 1 for x in range(64)]
    assert (batch[0, :, 32:, :] == 114).all()  # pad below, canvas square, no normalisation
    tall, _ = letterbox([np.full((100, 50, 3), 7, np.uint8)], 64)
    assert (tall[0, :, :, :32] == 7).all() and (tall[0, :, :, 32:] == 114).all()  # int(50 * 0.64) = 32 columns


def test_nms_by_hand():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0, 0, 10, 10.0]], np.float32)
    scores = np.array([0.8, 0.9, 0.7, 0.9], np.float32)
    # box 1 (0.9) first; box 3 ties at 0.9 and comes later in input order; IoU(1, 3) = 90/110 = 0.82
    assert nms(boxes, scores, 0.45).tolist() == [1, 2]
    assert nms(boxes, scores, 0.85).tolist() == [1, 3, 2]  # 0.82 ≤ 0.85 keeps box 3; box 0 = box 3 exactly
    assert nms(boxes, scores, 0.45, max_keep=1).tolist() == [1]
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.45).tolist() == []


def test_postprocess_decodes_scores_person_and_maps_back():
    raw = torch.zeros(1, 3549, 85)
    raw[..., 2:4] = math.log(4)  # every anchor: a 4-stride square
    cell = 5 * 52 + 10  # stride 8, cell x=10, y=5 → centre (84, 44) on the canvas, 32×32
    raw[0, cell, :4] = torch.tensor([0.5, 0.5, math.log(4), math.log(4)])
    raw[0, cell, 4], raw[0, cell, 5], raw[0, cell, 6] = 0.9, 0.5, 0.99  # another class is likelier: still a person box
    edge = 3 * 52 + 51  # cell x=51 (last column): box sticks out to the right
    raw[0, edge, 4], raw[0, edge, 5] = 0.8, 0.8
    ratio = 416 / 1920
    out = postprocess(raw, (416, 416), [ratio], [(1080, 1920)])[0]
    assert out.shape == (2, 5)
    # best first: the edge box, centre (408, 24) and 32×32 on the canvas, its right side clipped to the frame
    assert out[0] == pytest.approx([392 / ratio, 8 / ratio, 1920, 40 / ratio, 0.64], rel=1e-5)
    # score = objectness × person probability (0.9 × 0.5), not the likelier class's
    assert out[1] == pytest.approx([68 / ratio, 28 / ratio, 100 / ratio, 60 / ratio, 0.45], rel=1e-5)
    assert len(postprocess(raw, (416, 416), [ratio], [(1080, 1920)], PostProcess(score_threshold=0.5))[0]) == 1
    assert len(postprocess(raw, (416, 416), [ratio], [(1080, 1920)], PostProcess(min_height=32 / ratio + 1))[0]) == 0
    assert len(postprocess(raw, (416, 416), [ratio], [(1080, 1920)], PostProcess(max_detections=1))[0]) == 1


@pytest.mark.parametrize("size, step", [(416, 1), (640, 2)])
def test_torch_and_onnxruntime_paths_give_the_same_boxes(frames, size, step):
    """All 16 frames at the default 416 (the acceptance check); every other frame at 640."""
    frames = frames[::step]
    torch_boxes = Detector(input_size=size).detect(frames)
    ort_boxes = Detector(input_size=size, backend="onnx").detect(frames)
    assert sum(len(b) for b in torch_boxes) >= 40
    for a, b in zip(torch_boxes, ort_boxes):
        assert match_one_to_one(a, b) >= 0.99
        assert np.abs(a[:, 4] - b[:, 4]).max(initial=0) < 1e-3


def test_the_query_person_is_detected():
    """0001_c1s1_001051_00.jpg was cut from c1s1_001051.jpg: the woman in white, centre right."""
    from reidx.pipeline.embed import TorchEmbedder, resize_crop

    frame = np.asarray(load_image(SCENES / "frames" / "c1s1_001051.jpg"))
    boxes = Detector().detect([frame])[0]
    embedder = TorchEmbedder("osnet_x0_25_msmt17")
    crops = np.stack([resize_crop(Image.fromarray(c)) for c in crop_boxes(frame, boxes)])
    query = embedder.embed(resize_crop(load_image(SCENES / "queries" / "0001_c1s1_001051_00.jpg"))[None])
    similarity = (embedder.embed(crops) @ query.T).ravel()
    best = int(similarity.argmax())
    x1, y1, x2, y2, score = boxes[best]
    assert similarity[best] >= 0.9 and np.sort(similarity)[-2] < 0.7  # measured 0.964, next 0.55
    assert 0.55 < (x1 + x2) / 2 / 1920 < 0.8 and y2 - y1 > 250 and score > 0.5  # centre right, near, confident


def test_batches_of_mixed_sizes_equal_one_by_one(frames):
    full = frames[0]
    half = np.asarray(Image.fromarray(full).resize((960, 540), Image.BILINEAR))
    portrait = np.ascontiguousarray(full[:, 1000:1600])
    detector = Detector()
    together = detector.detect([full, half, portrait])
    alone = [detector.detect([f])[0] for f in (full, half, portrait)]
    for a, b in zip(together, alone):
        assert match_one_to_one(a, b) >= 0.999
    # the same scene at half the pixels gives the same people at half the coordinates
    confident = together[0][together[0][:, 4] > 0.5]
    scaled = together[1][:, :4] * 2
    assert box_iou(confident[:, :4], scaled).max(1).min() > 0.9


def test_cli_detect_writes_table_crops_and_drawings(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for path in FRAMES[:2]:
        shutil.copy(path, inputs)
    (inputs / "broken.jpg").write_bytes(FRAMES[0].read_bytes()[:1000])
    out = tmp_path / "det.parquet"
    env = {**os.environ, "REIDX_MODEL_DIR": str(MODELS)}
    result = subprocess.run([sys.executable, "-m", "reidx.cli", "detect", str(inputs), "--out", str(out), "--crops",
                             str(tmp_path / "crops"), "--draw", str(tmp_path / "draw"), "--min-height", "100",
                             "--json"], capture_output=True, text=True, env=env,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    table = pq.read_table(out)
    assert table.column_names == ["path", "detection", "frame_width", "frame_height", "x1", "y1", "x2", "y2", "score"]
    assert report["images"] == 3 and report["images_failed"] == 1 and report["persons"] == table.num_rows > 0
    assert "corrupt" in {f["path"]: f["reason"] for f in report["failures"]}[str(inputs / "broken.jpg")]
    rows = table.to_pylist()
    assert all(r["frame_width"] == 1920 and r["y2"] - r["y1"] >= 100 and r["score"] >= 0.3 for r in rows)
    assert len(list((tmp_path / "crops").iterdir())) == table.num_rows
    assert sorted(p.name for p in (tmp_path / "draw").iterdir()) == sorted(p.name for p in FRAMES[:2])
    metadata = table.schema.metadata
    assert metadata[b"reidx.schema"] == b"detections" and metadata[b"reidx.input_size"] == b"416"
    assert str(inputs / "broken.jpg") in json.loads(metadata[b"reidx.failed"])
