"""Small shared pieces, each with one owner: atomic writes, labels, boxes and the crop rule,
prefetching batches, the gallery layout. Hermetic: no ../shared, no models."""

from __future__ import annotations

import os
import stat
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reidx.pipeline.atomic import write_bytes_atomic, write_parquet_atomic
from reidx.pipeline.batching import prefetch_batches
from reidx.pipeline.boxes import box_iou, crop_boxes, crop_region, nms
from reidx.pipeline.gallery import index_dir, is_gallery, ledger_dir, read_config, shards_dir
from reidx.pipeline.labels import MARKET_CAMERA, MARKET_PERSON, parse_market_name


def test_atomic_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "file.bin"
    write_bytes_atomic(target, b"old")
    write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"new" and [p.name for p in target.parent.iterdir()] == ["file.bin"]
    with pytest.raises(ZeroDivisionError):
        write_parquet_atomic(pa.table({"a": [1]}), tmp_path / "t.parquet") and 1 / 0
    with pytest.raises(pa.ArrowInvalid):  # a writer that fails leaves the old file and no temporary
        write_parquet_atomic(pa.table({"a": [1]}).append_column("b", pa.array([1, 2])), tmp_path / "t.parquet")
    assert pq.read_table(tmp_path / "t.parquet")["a"].to_pylist() == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub", "t.parquet"]


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_write_honours_the_umask(tmp_path, umask):
    """Files are readable by the operations group when the umask says so (mkstemp alone gives 0600)."""
    old = os.umask(umask)
    try:
        path = write_bytes_atomic(tmp_path / "f", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


@pytest.mark.parametrize("name, expected", [
    ("0001_c1s1_001051_00.jpg", (1, "1")),
    ("folder/-1_c6s2_000001_01.jpg", (-1, "6")),
    ("0042_c2_03.jpg", (42, "2")),
    ("c1s1_001051.jpg", None),
    ("person.jpg", None),
])
def test_market_naming_is_parsed_once_with_cameras_as_strings(name, expected):
    assert parse_market_name(name) == expected


def test_source_regexes_agree_with_the_parser():
    for member in ("a/0007_c3s1_000001_00.jpg", "0007_c3s1_000001_00.jpg"):
        assert (int(MARKET_PERSON.search(member).group(1)), MARKET_CAMERA.search(member).group(1)) == (7, "3")


def test_iou_and_nms():
    a, b = [0, 0, 10, 20], [5, 0, 15, 20]
    assert box_iou([a], [b])[0, 0] == pytest.approx(1 / 3)
    assert box_iou([[0, 0, 0, 0]], [[0, 0, 0, 0]])[0, 0] == 0.0
    boxes = np.array([a, [100, 100, 110, 120], [1, 0, 11, 20]], np.float32)
    assert nms(boxes, [0.5, 0.9, 0.8], 0.45).tolist() == [1, 2]
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.45).tolist() == []


def test_crop_rule_rounds_outward_inside_the_frame():
    assert crop_region([10.2, 20.7, 30.1, 40.0], 100, 100) == (10, 20, 31, 40)
    assert crop_region([-5, -5, 200, 200], 50, 60) == (0, 0, 50, 60)
    assert crop_region([49.9, 59.9, 49.9, 59.9], 50, 60) == (49, 59, 50, 60)  # never empty
    image = np.arange(100 * 100 * 3, dtype=np.uint8).reshape(100, 100, 3)
    (crop,) = crop_boxes(image, np.array([[10.2, 20.7, 30.1, 40.0, 0.9]]))
    assert crop.shape == (20, 21, 3) and (crop == image[20:40, 10:31]).all()


def test_prefetch_keeps_order_and_loads_ahead_in_threads():
    seen_threads = set()

    def load(item):
        seen_threads.add(threading.current_thread().name)
        return item * 10

    out = list(prefetch_batches(list(range(7)), load, batch_size=3, workers=2))
    assert out == [(0, [0, 10, 20]), (3, [30, 40, 50]), (6, [60])]
    assert threading.current_thread().name not in seen_threads
    assert list(prefetch_batches([], load, batch_size=3)) == []


def test_gallery_layout(tmp_path):
    assert not is_gallery(tmp_path) and read_config(tmp_path) == {}
    shards_dir(tmp_path).mkdir()
    assert is_gallery(tmp_path)
    assert (ledger_dir(tmp_path).name, index_dir(tmp_path).name) == ("ledger", "index")


def test_a_protocol_timeout_and_the_deadline_give_one_message():
    """The protocol's own socket timeout (set to timeout_s) can fire just before the deadline:
    the same event must read the same ("no answer ... within N s"), whichever comes first."""
    import socket
    import time

    from reidx.pipeline.remote import NetworkTimeout, deadline

    def protocol_timeout():
        raise socket.timeout("timed out")

    for call in (protocol_timeout, lambda: time.sleep(2)):
        with pytest.raises(NetworkTimeout, match=r"no answer from ftp://host/x within 0.5 s"):
            deadline(call, 0.5, "ftp://host/x")
    with pytest.raises(ValueError, match="other"):  # other errors pass through unchanged
        deadline(lambda: (_ for _ in ()).throw(ValueError("other")), 0.5, "ftp://host/x")
    assert deadline(lambda: 7, 0.5, "ftp://host/x") == 7
