"""The nightly job with a real Dask cluster of worker processes, real files and real kills."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from reidx.pipeline.labels import parse_market_name
from reidx.pipeline.embedding_table import embeddings_to_numpy
from reidx.pipeline.ledger import read_ledger
from conftest import CON_REID, MODELS, REPO, crops_manifest

QUERY = sorted((CON_REID / "query").iterdir())


def reidx(*args, wait=True, **kwargs):
    env = {**os.environ, "REIDX_MODEL_DIR": str(MODELS)}
    command = [sys.executable, "-m", "reidx.cli", *args]
    if not wait:
        return subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True, **kwargs)
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, **kwargs)


def committed_rows(gallery):
    """The gallery's rows as (detection_id → embedding), read from the shards the ledger names."""
    ledger = read_ledger(gallery)
    shards = sorted({s for s in ledger["shard"].to_pylist() if s})
    assert sorted(p.name for p in (gallery / "shards").glob("part-*.parquet")) == shards  # no orphans left
    table = pq.read_table([str(gallery / "shards" / s) for s in shards]) if shards else None
    if table is None:
        return {}
    ids = table["detection_id"].to_pylist()
    assert len(ids) == len(set(ids)), "a detection was written twice"
    return dict(zip(ids, embeddings_to_numpy(table["embedding"])))


@pytest.fixture(scope="module")
def crop_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("crops")
    for path in QUERY[:120]:
        (folder / path.name).write_bytes(path.read_bytes())
    return folder


@pytest.fixture(scope="module")
def reference_gallery(tmp_path_factory, crop_folder):
    """An uninterrupted run, the yardstick for the crash tests."""
    root = tmp_path_factory.mktemp("reference")
    result = reidx("index", str(crops_manifest(root / "night.toml", crop_folder)), "--out", str(root / "g"), "--task-size", "10",
                   "--json")
    assert result.returncode == 0, result.stderr
    return root / "g", json.loads(result.stdout)


def test_index_rows_labels_rerun_and_embeddings_equal_embed(reference_gallery, crop_folder, tmp_path):
    gallery, summary = reference_gallery
    assert summary["images_new"] == summary["persons"] == 120 and summary["images_failed"] == 0
    table = pq.read_table(gallery / "shards")
    assert table.num_rows == 120
    row = table.filter(pc.equal(table["member"], QUERY[0].name)).to_pylist()[0]
    pid, cam = parse_market_name(QUERY[0].name)
    assert row["person_id"] == pid and row["camera"] == str(cam)
    assert (row["x1"], row["y1"], row["x2"], row["y2"]) == (0, 0, row["frame_width"], row["frame_height"])
    assert row["embedder"] == "osnet_x0_25_msmt17" and row["embedder_sha256"].startswith("6f57607fed9f")

    manifest = crops_manifest(tmp_path / "night.toml", crop_folder)
    rerun = reidx("index", str(manifest), "--out", str(gallery), "--json")
    assert rerun.returncode == 0 and json.loads(rerun.stdout)["images_new"] == 0
    assert pq.read_table(gallery / "shards").num_rows == 120

    embedded = reidx("embed", str(crop_folder), "--out", str(tmp_path / "e.parquet"))
    assert embedded.returncode == 0, embedded.stderr
    by_name = dict(zip((os.path.basename(p) for p in pq.read_table(tmp_path / "e.parquet")["path"].to_pylist()),
                       embeddings_to_numpy(pq.read_table(tmp_path / "e.parquet")["embedding"])))
    ours = dict(zip(table["member"].to_pylist(), embeddings_to_numpy(table["embedding"])))
    assert min(float(ours[m] @ by_name[m]) for m in ours) >= 0.999


def test_float16_embeddings_halve_the_column_and_keep_the_vectors(reference_gallery, crop_folder, tmp_path):
    """`--embedding-dtype float16` is recorded in gallery.json, shards store float16, a later run
    without the option keeps it, and the vectors equal the float32 gallery's to float16 precision."""
    reference = committed_rows(reference_gallery[0])
    small = tmp_path / "crops"
    small.mkdir()
    for path in sorted(crop_folder.iterdir())[:20]:
        (small / path.name).write_bytes(path.read_bytes())
    gallery = tmp_path / "g16"
    first = reidx("index", str(crops_manifest(tmp_path / "a.toml", small)), "--out", str(gallery),
                  "--embedding-dtype", "float16", "--workers", "1", "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads((gallery / "gallery.json").read_text())["embedding_dtype"] == "float16"
    (small / QUERY[120].name).write_bytes(QUERY[120].read_bytes())
    second = reidx("index", str(crops_manifest(tmp_path / "a.toml", small)), "--out", str(gallery), "--workers", "1",
                   "--json")
    assert second.returncode == 0 and json.loads(second.stdout)["images_new"] == 1
    for shard in (gallery / "shards").glob("part-*.parquet"):
        assert pq.read_schema(shard).field("embedding").type.value_type == "halffloat"
    rows = committed_rows(gallery)
    assert len(rows) == 21
    common = set(rows) & set(reference)
    assert len(common) == 20 and max(float(np.abs(rows[d] - reference[d]).max()) for d in common) < 1e-3


def wait_for(condition, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def kill_group(process):
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.mark.parametrize("kill_point", ["first_shard_written", "after_two_commits"])
def test_driver_killed_then_rerun_gives_exactly_the_uninterrupted_rows(kill_point, reference_gallery, crop_folder,
                                                                       tmp_path):
    gallery = tmp_path / "g"
    manifest = crops_manifest(tmp_path / "night.toml", crop_folder)
    run = reidx("index", str(manifest), "--out", str(gallery), "--task-size", "10", wait=False)
    if kill_point == "first_shard_written":
        reached = wait_for(lambda: any((gallery / "shards").glob("part-*.parquet")))
    else:
        reached = wait_for(lambda: len(list((gallery / "ledger").glob("part-*.parquet"))) >= 2)
    kill_group(run)  # SIGKILL the driver and its cluster: no cleanup runs
    assert reached
    assert (gallery / ".lock").exists()  # left behind by the dead driver
    rerun = reidx("index", str(manifest), "--out", str(gallery), "--task-size", "10", "--json")
    assert rerun.returncode == 0, rerun.stderr
    assert "died holding the gallery; recovering" in rerun.stderr
    expected = committed_rows(reference_gallery[0])
    got = committed_rows(gallery)
    assert got.keys() == expected.keys()
    assert all(np.allclose(got[k], expected[k], atol=1e-5) for k in expected)
    assert read_ledger(gallery).num_rows == 120


def test_worker_killed_mid_run_loses_and_duplicates_nothing(reference_gallery, crop_folder, tmp_path):
    import psutil

    gallery = tmp_path / "g"
    run = reidx("index", str(crops_manifest(tmp_path / "night.toml", crop_folder)), "--out", str(gallery), "--task-size", "10",
                "--json", wait=False)
    assert wait_for(lambda: any((gallery / "shards").glob("part-*.parquet")))
    # worker processes are the driver's spawned children (their nannies live in the driver)
    workers = [p for p in psutil.Process(run.pid).children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]
    assert workers, "no worker process found"
    for worker in workers:
        worker.send_signal(signal.SIGKILL)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err
    assert committed_rows(gallery).keys() == committed_rows(reference_gallery[0]).keys()


def test_second_job_on_the_same_gallery_exits_at_once(crop_folder, tmp_path):
    gallery = tmp_path / "g"
    manifest = crops_manifest(tmp_path / "night.toml", crop_folder)
    first = reidx("index", str(manifest), "--out", str(gallery), "--task-size", "10", wait=False)
    try:
        def holder_written():  # the holder's name goes into the file once its flock is taken
            try:
                return bool((gallery / ".lock").read_text().strip())
            except FileNotFoundError:
                return False

        assert wait_for(holder_written)
        # Paused, the first job keeps its lock however long the second takes to start (on a loaded
        # machine it could otherwise finish first, and the second would rightly run).
        os.killpg(first.pid, signal.SIGSTOP)
        assert first.poll() is None
        started = time.time()
        second = reidx("index", str(manifest), "--out", str(gallery))
        assert second.returncode == 1 and "being indexed by another job" in second.stderr
        assert time.time() - started < 30
    finally:
        kill_group(first)


def test_bad_input_is_recorded_and_never_stops_the_night(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    good = QUERY[0].read_bytes()
    image = Image.open(io.BytesIO(good))
    (folder / "0001_c1_empty.jpg").write_bytes(b"")
    (folder / "0001_c1_truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "0001_c1_text.jpg").write_text("not an image")
    image.convert("CMYK").save(folder / "0001_c1_cmyk.jpg")
    image.convert("P").save(folder / "0001_c1_palette.png")
    image.convert("RGBA").save(folder / "0001_c1_alpha.png")
    Image.fromarray((np.asarray(image.convert("L"), np.uint16) * 200)).save(folder / "0001_c1_16bit.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(folder / "0001_c1_rotated.jpg", exif=exif.tobytes())
    Image.new("RGB", (3000, 3000)).save(folder / "0001_c1_huge.png")
    archive = tmp_path / "night.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(QUERY[1], arcname=QUERY[1].name)
        for name, kind in (("../0001_c1_escape.jpg", tarfile.REGTYPE), ("0001_c1_link.jpg", tarfile.SYMTYPE)):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "/etc/passwd"
            tar.addfile(info, io.BytesIO(b""))
    manifest = tmp_path / "night.toml"
    manifest.write_text(f"""[[source]]
name = "bad"
uri = "{folder}"
kind = "crops"
[[source]]
name = "tarball"
uri = "{archive}"
kind = "crops"
[[source]]
name = "gone"
uri = "{tmp_path / 'missing'}"
kind = "crops"
""")
    before = set(tmp_path.rglob("*"))
    gallery = tmp_path / "g"
    result = reidx("index", str(manifest), "--out", str(gallery), "--max-pixels", "4000000", "--json")
    assert result.returncode == 3, result.stderr  # a source failed (its reason on stderr and in --json)
    assert "Error: source gone failed:" in result.stderr
    summary = json.loads(result.stdout)
    assert set(tmp_path.rglob("*")) - before <= set(gallery.rglob("*")) | {gallery}  # nothing outside GALLERY
    reasons = dict(zip(read_ledger(gallery)["image_key"].to_pylist(), read_ledger(gallery)["reason"].to_pylist()))
    assert reasons["bad/0001_c1_empty.jpg"] == "empty file"
    assert reasons["bad/0001_c1_truncated.jpg"].startswith("corrupt image")
    assert reasons["bad/0001_c1_text.jpg"].startswith("not an image")
    assert "pixel cap" in reasons["bad/0001_c1_huge.png"]
    assert reasons["tarball/../0001_c1_escape.jpg"] == "member name contains '..'"
    assert "link" in reasons["tarball/0001_c1_link.jpg"]
    assert "does not exist" in reasons["gone/"] and "gone" in summary["sources_failed"]
    for ok in ("cmyk.jpg", "palette.png", "alpha.png", "16bit.png", "rotated.jpg"):
        assert reasons[f"bad/0001_c1_{ok}"] is None
    table = pq.read_table(gallery / "shards")
    rotated = table.filter(pc.equal(table["member"], "0001_c1_rotated.jpg")).to_pylist()[0]
    assert (rotated["frame_width"], rotated["frame_height"]) == (image.height, image.width)  # displayed orientation
    assert summary["images_failed"] == 6 and summary["persons"] == 6
    strict = reidx("index", str(manifest), "--out", str(gallery), "--strict")
    assert strict.returncode == 3
    listed = reidx("ledger", str(gallery), "--failed", "--json")
    assert len(json.loads(listed.stdout)["failures"]) == 7  # 6 images + the missing source


def test_shards_read_as_one_dataset_by_pyarrow_and_duckdb(reference_gallery):
    import duckdb
    import pyarrow.dataset as ds

    gallery, _ = reference_gallery
    dataset = ds.dataset(gallery / "shards", format="parquet").to_table()
    con = duckdb.connect()
    count, persons, dim = con.execute(
        f"SELECT count(*), count(DISTINCT person_id), max(len(embedding)) "
        f"FROM read_parquet('{gallery}/shards/part-*.parquet')").fetchone()
    assert count == dataset.num_rows == 120
    assert persons == len(set(dataset["person_id"].to_pylist())) and dim == 512


@pytest.mark.slow
def test_acceptance_full_con_reid_split(tmp_path):
    """Issue acceptance: every readable image once, with label and camera; a rerun adds nothing."""
    manifest = REPO / "data_manifests" / "con-reid.toml"
    first = reidx("index", str(manifest), "--out", str(tmp_path / "g"), "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["images_new"] == 212 + 5295
    table = pq.read_table(tmp_path / "g" / "shards", columns=["member", "person_id", "camera"])
    assert table.num_rows == 5507 and table["person_id"].null_count == 0 and table["camera"].null_count == 0
    for member, pid, cam in zip(*(table[c].to_pylist()[:50] for c in table.column_names)):
        assert parse_market_name(member) == (pid, cam)  # cameras are strings everywhere
    second = reidx("index", str(manifest), "--out", str(tmp_path / "g"), "--json")
    assert json.loads(second.stdout)["images_new"] == 0


def test_job_runs_on_an_existing_scheduler(crop_folder, tmp_path):
    """--scheduler ADDRESS: the same job on a cluster it did not start (here: a local one)."""
    import logging

    from dask.distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.ERROR) as cluster:
        result = reidx("index", str(crops_manifest(tmp_path / "night.toml", crop_folder)), "--out", str(tmp_path / "g"),
                       "--scheduler", cluster.scheduler_address, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["images_new"] == 120
    assert pq.read_table(tmp_path / "g" / "shards").num_rows == 120
