"""Shards and ledger: schemas, atomic parts, and recovery after a crash between the two writes."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reidx.pipeline.embedding_table import embedding_array
from reidx.pipeline.ledger import append, ledger_rows, processed_keys, read_ledger, recover
from reidx.pipeline.shards import detection_id, image_key, shard_files, shard_schema, write_shard


def shard_table(keys: list[str], dim: int = 8) -> pa.Table:
    n = len(keys)
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    columns = {
        "detection_id": [detection_id(k, 0) for k in keys], "image_key": keys,
        "source": [k.split("/")[0] for k in keys], "source_uri": ["/data"] * n,
        "member": [k.split("/", 1)[1] for k in keys], "camera": ["1"] * n, "timestamp": [None] * n,
        "frame_width": [64] * n, "frame_height": [128] * n, "x1": [0.0] * n, "y1": [0.0] * n,
        "x2": [64.0] * n, "y2": [128.0] * n, "score": [1.0] * n, "embedding": embedding_array(vectors),
        "embedder": ["osnet_x0_25_msmt17"] * n, "embedder_sha256": ["6f57"] * n, "detector": [None] * n,
        "detector_sha256": [None] * n, "person_id": [1] * n, "frame_index": [None] * n, "track_id": [None] * n,
    }
    return pa.table(columns, schema=shard_schema(dim))


def test_detection_ids_are_stable_and_distinct():
    key = image_key("cam-a", "2026/11/21/frame_0001.jpg")
    assert key == "cam-a/2026/11/21/frame_0001.jpg"
    assert detection_id(key, 0) == detection_id(key, 0)
    assert len({detection_id(key, 0), detection_id(key, 1), detection_id("cam-b/x.jpg", 0)}) == 3


def test_shards_read_back_as_one_dataset(tmp_path):
    write_shard(shard_table(["s/a.jpg", "s/b.jpg"]), tmp_path)
    write_shard(shard_table(["s/c.jpg"]), tmp_path)
    files = shard_files(tmp_path)
    assert len(files) == 2
    dataset = pq.read_table(tmp_path / "shards")
    assert sorted(dataset["image_key"].to_pylist()) == ["s/a.jpg", "s/b.jpg", "s/c.jpg"]
    assert dataset.schema.field("embedding").type.list_size == 8


def test_ledger_appends_parts_and_lists_processed_images(tmp_path):
    assert read_ledger(tmp_path).num_rows == 0
    append(tmp_path, ledger_rows([{"image_key": "s/a.jpg", "source": "s", "member": "a.jpg", "status": "ok",
                                   "num_persons": 1, "shard": "part-1.parquet"}]))
    append(tmp_path, ledger_rows([{"image_key": "s/b.jpg", "source": "s", "member": "b.jpg",
                                   "status": "failed", "reason": "empty file"}]))
    assert append(tmp_path, ledger_rows([])) is None
    ledger = read_ledger(tmp_path)
    assert ledger.num_rows == 2 and set(processed_keys(tmp_path)) == {"s/a.jpg", "s/b.jpg"}
    assert ledger.filter(pa.compute.equal(ledger["status"], "failed"))["reason"].to_pylist() == ["empty file"]


def test_recover_removes_uncommitted_shards_and_temporary_files(tmp_path):
    committed = write_shard(shard_table(["s/a.jpg"]), tmp_path)
    append(tmp_path, ledger_rows([{"image_key": "s/a.jpg", "source": "s", "member": "a.jpg", "status": "ok",
                                   "num_persons": 1, "shard": committed}]))
    orphan = write_shard(shard_table(["s/b.jpg"]), tmp_path)  # crash before its ledger part
    (tmp_path / "shards" / f".{orphan}.abc.tmp").write_bytes(b"half a file")
    assert recover(tmp_path) == {"temporary_files": 1, "orphan_shards": 1}
    assert [p.name for p in shard_files(tmp_path)] == [committed]
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [committed]
    assert recover(tmp_path) == {"temporary_files": 0, "orphan_shards": 0}


def test_latest_keeps_each_keys_last_row_across_parts_and_ties(tmp_path):
    """latest() (Arrow dictionary codes) against the plain rule it replaced: sort by time (stable:
    part order breaks ties), each key's last row, in that order (image_key is never null)."""
    from datetime import datetime, timedelta, timezone

    from reidx.pipeline.ledger import latest

    rng = np.random.default_rng(7)
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    for part in range(6):
        rows = [{"image_key": f"k{k}", "source": "s", "member": f"k{k}", "status": str(rng.integers(0, 3)),
                 "processed_at": start + timedelta(minutes=int(rng.integers(0, 4)))}
                for k in rng.integers(0, 12, 25)]
        append(tmp_path, ledger_rows(rows))
    table = read_ledger(tmp_path).sort_by([("processed_at", "ascending")])
    last = {key: i for i, key in enumerate(table["image_key"].to_pylist())}
    expected = table.take(sorted(last.values()))
    got = latest(tmp_path)
    assert got.num_rows == len(last) and got.equals(expected)
