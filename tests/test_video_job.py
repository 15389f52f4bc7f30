"""Video sources through `reidx index`: the shared street clip (detections, tracks, timestamps), a
truncated copy, and a longer clip encoded here from the shared scene frames (sampling, segments,
archives, a kill -9 mid-video and the rerun)."""

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from datetime import datetime, timedelta

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import MODELS, REPO, SCENES, SHARED
from reidx.pipeline.boxes import box_iou
from reidx.pipeline.embedding_table import embeddings_to_numpy
from reidx.pipeline.ledger import latest, read_ledger
from reidx.pipeline.manifest import ManifestError, load_manifest
from reidx.pipeline.tracking import track_embedding
from reidx.pipeline.video_job import VideoChain, video_entries
from test_video import encode, remux

CLIP = SHARED / "data" / "video" / "street-8f-3fps.mp4"
START = datetime(2024, 5, 1, 7, 30)


def reidx(*args, wait=True):
    env = {**os.environ, "REIDX_MODEL_DIR": str(MODELS)}
    command = [sys.executable, "-m", "reidx.cli", *args]
    if not wait:
        return subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)


def index(manifest, gallery, *extra):
    result = reidx("index", str(manifest), "--out", str(gallery), "--workers", "1", "--json", *extra)
    assert result.returncode in (0, 2), result.stderr
    return json.loads(result.stdout)


def rows(gallery, source):
    """The committed rows of one source, as a list of dicts (embedding as an array)."""
    shards = sorted({s for s in read_ledger(gallery)["shard"].to_pylist() if s})
    table = pq.read_table([str(gallery / "shards" / s) for s in shards])
    table = table.filter(pc.equal(table["source"], source))
    vectors = embeddings_to_numpy(table["embedding"])
    out = table.drop_columns(["embedding"]).to_pylist()
    for row, vector in zip(out, vectors):
        row["embedding"] = vector
    return out


def ledger_of(gallery, prefix):
    table = latest(gallery)
    return {r["image_key"]: r for r in table.to_pylist() if r["image_key"].startswith(prefix)}


def centre(row):
    return (row["x1"] + row["x2"]) / 2, (row["y1"] + row["y2"]) / 2


def track_at(detections, x, y):
    """The rows of the track whose frame-0 box centre is nearest (x, y), in frame order."""
    first = [r for r in detections if r["frame_index"] == 0]
    nearest = min(first, key=lambda r: np.hypot(centre(r)[0] - x, centre(r)[1] - y))
    return sorted((r for r in detections if r["track_id"] == nearest["track_id"]), key=lambda r: r["frame_index"])


# --- the shared street clip --------------------------------------------------------------------


@pytest.fixture(scope="module")
def street(tmp_path_factory):
    """One night over the clip (detections), the clip again (tracks) and a truncated copy of it."""
    root = tmp_path_factory.mktemp("street")
    broken = root / "broken"
    broken.mkdir()
    # the clip's index (moov) is at its end: moved first (as faststart writes it), then cut at 60%
    data = remux(CLIP.read_bytes(), root / "faststart.mp4", "mp4", {"movflags": "faststart"})
    (broken / "street-cut.mp4").write_bytes(data[: int(0.6 * len(data))])
    manifest = root / "street.toml"
    manifest.write_text(f"""
[[source]]
name = "street"
uri = "{CLIP.parent}"
kind = "video"
camera = "street-1"
timestamp = 2024-05-01T07:30:00

[[source]]
name = "street-tracks"
uri = "{CLIP.parent}"
kind = "video"
index = "tracks"

[[source]]
name = "broken"
uri = "{broken}"
kind = "video"
""")
    summary = index(manifest, root / "g")
    return root / "g", manifest, summary


def test_street_clip_people_detected_tracked_and_timed(street):
    gallery, _, summary = street
    assert summary["videos"] == 3 and summary["video_frames"] == 8 + 8 + 4
    detections = rows(gallery, "street")
    key = "street/street-8f-3fps.mp4"
    assert {r["frame_index"] for r in detections} == set(range(8))
    for row in detections:
        assert row["image_key"] == key and row["camera"] == "street-1" and row["detector"] == "yolox_nano"
        assert abs(row["timestamp"] - (START + timedelta(seconds=row["frame_index"] / 3))) < timedelta(milliseconds=1)
        assert row["track_id"].startswith(key + "#")
    for frame in range(8):  # a track never holds two detections of one frame
        ids = [r["track_id"] for r in detections if r["frame_index"] == frame]
        assert len(ids) == len(set(ids)) >= 10
    # Checked by eye (crops of each track at the product's detector defaults, input 416, threshold
    # 0.3): the man in a black waistcoat, white shirt and grey tie holding a white paper, standing
    # by two orange cones right of centre (frame 0 box centre ≈ (1400, 694)), is one track in all
    # 8 frames; so is the man in a grey suit jacket seen from behind walking away (≈ (413, 526)).
    waiter = track_at(detections, 1400, 694)
    assert [r["frame_index"] for r in waiter] == list(range(8))
    boxes = np.array([[r["x1"], r["y1"], r["x2"], r["y2"]] for r in waiter])
    assert box_iou(boxes[:1], boxes).min() > 0.8  # he stands still (0.88 at least when written)
    walker = track_at(detections, 413, 526)
    assert [r["frame_index"] for r in walker] == list(range(8)) and walker[0]["track_id"] != waiter[0]["track_id"]
    vectors = np.stack([r["embedding"] for r in waiter + walker])
    assert (vectors[:8] @ vectors[:8].T).min() > 0.75 and (vectors[:8] @ vectors[8:].T).max() < 0.75
    # 13 tracks through all 8 frames when written (the tracker test's walker among them, whose box
    # merges with a passer-by's from frame 5 at these detector settings)
    lengths = {}
    for row in detections:
        lengths[row["track_id"]] = lengths.get(row["track_id"], 0) + 1
    assert sum(n == 8 for n in lengths.values()) >= 10


def test_tracks_index_holds_one_vector_per_track(street):
    gallery, _, _ = street
    detections, tracks = rows(gallery, "street"), rows(gallery, "street-tracks")
    numbers = lambda rs: sorted(r["track_id"].split("#")[1] for r in rs)  # noqa: E731
    assert numbers(tracks) == sorted(set(numbers(detections)))  # same detections, same tracks, one row each
    assert len(tracks) < len(detections) / 5  # 17 rows against 120 when written
    waiter = track_at(detections, 1400, 694)
    (row,) = [r for r in tracks if r["track_id"].endswith("#" + waiter[0]["track_id"].split("#")[1])]
    expected = track_embedding(np.stack([r["embedding"] for r in waiter]), np.array([r["score"] for r in waiter]),
                               np.array([[r["x1"], r["y1"], r["x2"], r["y2"]] for r in waiter]))
    assert float(row["embedding"] @ expected) > 0.999
    assert row["frame_index"] in range(8) and len({r["detection_id"] for r in tracks}) == len(tracks)


def test_truncated_copy_keeps_its_first_frames_and_records_where_it_broke(street):
    gallery, _, summary = street
    kept = rows(gallery, "broken")
    assert {r["frame_index"] for r in kept} == {0, 1, 2, 3}
    whole = rows(gallery, "street")
    for frame in range(4):  # the same people as in the whole clip's first four frames
        a, b = ([[r["x1"], r["y1"], r["x2"], r["y2"]] for r in rs if r["frame_index"] == frame] for rs in (kept, whole))
        assert len(a) == len(b) and (box_iou(np.array(a), np.array(b)).max(axis=1) > 0.99).all()
    entries = ledger_of(gallery, "broken/")
    assert sorted(entries) == ["broken/street-cut.mp4@0", "broken/street-cut.mp4@4"]
    good, bad = entries["broken/street-cut.mp4@0"], entries["broken/street-cut.mp4@4"]
    assert (good["status"], good["frame_stop"], good["video_end"], good["num_persons"]) == ("ok", 4, False, len(kept))
    assert bad["status"] == "failed" and bad["video_end"] and bad["shard"] is None
    assert "frame 4 (1.33 s)" in bad["reason"] and "truncated" in bad["reason"]
    assert summary["video_segments_failed"] == 1 and summary["failed_by_reason"] == {"truncated or corrupt": 1}


def test_rerun_adds_nothing_and_the_ledger_counts_segments(street):
    gallery, manifest, _ = street
    again = index(manifest, gallery)
    assert again["video_segments_new"] == 0 and again["videos_skipped"] == 3 and again["persons"] == 0
    counted = json.loads(reidx("ledger", str(gallery), "--json").stdout)
    # one entry per segment: street@0, street-tracks@0, broken@0 (ok) and broken@4 (failed)
    assert (counted["images"], counted["videos"], counted["videos_failed"]) == (0, 3, 1)
    assert (counted["video_segments"], counted["video_segments_ok"], counted["video_segments_failed"]) == (4, 3, 1)


# --- a longer clip encoded from the scene frames -----------------------------------------------

NAME = "cam7_20240501T073000.mp4"  # the start time is in the name


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """24 frames at 4 frames/s, 640×360 H.264: 4 campus scenes held 6 frames each with a slow pan."""
    root = tmp_path_factory.mktemp("encoded")
    paths = sorted((SCENES / "frames").glob("*.jpg"))[1:5]
    scenes = [np.asarray(Image.open(p).convert("RGB").resize((640, 360), Image.BILINEAR)) for p in paths]
    frames = [np.roll(scenes[i // 6], 4 * (i % 6), axis=1) for i in range(24)]
    folder = root / "cam"
    folder.mkdir()
    (folder / NAME).write_bytes(encode(frames, rate=4))
    with tarfile.open(root / "cam.tar", "w") as tar:
        tar.add(folder / NAME, arcname=NAME)
    return root


def cam_manifest(root, path, sources=("cam", "cam-tar", "cam-url", "cam-capped")):
    uris = {"cam": root / "cam", "cam-tar": root / "cam.tar", "cam-url": f"file://{root}/cam",
            "cam-capped": root / "cam.tar"}
    text = ""
    for name in sources:
        text += f"""
[[source]]
name = "{name}"
uri = "{uris[name]}"
kind = "video"
fps = 2
segment_s = 1.0
timestamp = {{ regex = '_(\\d{{8}}T\\d{{6}})', format = "%Y%m%dT%H%M%S" }}
{"max_member_bytes = 1000" if name == "cam-capped" else ""}
"""
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def reference(encoded):
    gallery = encoded / "reference"
    summary = index(cam_manifest(encoded, encoded / "all.toml"), gallery)
    return gallery, summary


SEGMENTS = [0, 4, 8, 12, 16, 20]  # fps 2 of 4 keeps even frames; a segment: 1 s, 2 sampled frames


def test_sampling_segments_timestamps_and_archives(reference):
    gallery, summary = reference
    cam = rows(gallery, "cam")
    assert {r["frame_index"] for r in cam} <= set(range(0, 24, 2)) and len({r["frame_index"] for r in cam}) >= 10
    for row in cam:
        assert abs(row["timestamp"] - (START + timedelta(seconds=row["frame_index"] / 4))) < timedelta(milliseconds=1)
    entries = ledger_of(gallery, "cam/")
    assert sorted(entries) == sorted(f"cam/{NAME}@{s}" for s in SEGMENTS)
    for start, stop in zip(SEGMENTS, SEGMENTS[1:] + [None]):
        entry = entries[f"cam/{NAME}@{start}"]
        assert entry["status"] == "ok" and entry["frame_start"] == start and entry["tracks_state"]
        assert entry["video_end"] == (stop is None) and (stop is None or entry["frame_stop"] == stop)
    segment_of = lambda frame: max(s for s in SEGMENTS if s <= frame)  # noqa: E731
    spans = {}
    for row in cam:
        spans.setdefault(row["track_id"], set()).add(segment_of(row["frame_index"]))
    assert any(len(s) > 1 for s in spans.values())  # tracks run on across segment boundaries
    # the same video inside a tar (read whole into memory) or behind an fsspec URL (streamed from
    # its file object) gives the same rows
    order = lambda r: (r["frame_index"], int(r["track_id"].split("#")[1]))  # noqa: E731
    cam = sorted(cam, key=order)
    for other in ("cam-tar", "cam-url"):
        same = sorted(rows(gallery, other), key=order)
        assert [order(r) for r in same] == [order(r) for r in cam]
        assert min(float(a["embedding"] @ b["embedding"]) for a, b in zip(same, cam)) > 0.9999
    (capped,) = ledger_of(gallery, "cam-capped/").values()
    assert capped["image_key"] == f"cam-capped/{NAME}@0" and capped["status"] == "failed"
    assert capped["reason"].startswith("member too large")
    assert summary["video_segments_new"] == 3 * len(SEGMENTS) + 1 and summary["video_frames"] == 36
    assert summary["video_segments_reopened"] == 0  # each segment found its video open where the last one ended


def test_killed_mid_video_resumes_at_its_segment_with_the_same_tracks(encoded, reference):
    gallery = encoded / "killed"
    manifest = cam_manifest(encoded, encoded / "cam.toml", sources=("cam",))
    run = reidx("index", str(manifest), "--out", str(gallery), "--workers", "1", wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and not list((gallery / "ledger").glob("part-*.parquet")):
        time.sleep(0.02)
    os.killpg(run.pid, signal.SIGKILL)  # the driver and its workers: no cleanup runs
    run.wait()
    committed = ledger_of(gallery, "cam/")
    assert 1 <= len(committed) < len(SEGMENTS), "the kill did not land mid-video"
    # A kill between a segment's writes and its commit: the next segment written, never committed
    from reidx.pipeline.persons import ModelSpec
    from reidx.pipeline.worker import process_video_segment

    source = load_manifest(manifest).sources[0]
    chain = VideoChain(source, NAME, None)
    first, state = chain.next_segment(video_entries(latest(gallery)))
    assert first == SEGMENTS[len(committed)]
    written = process_video_segment(str(gallery), source, NAME, first, state, None, ModelSpec("osnet_x0_25_msmt17"))
    assert written["records"][0]["shard"] and written["records"][0]["tracks_state"]

    summary = index(manifest, gallery)
    assert summary["recovered"]["orphan_shards"] >= 1 and summary["recovered"]["orphan_tracks_states"] >= 1
    assert summary["video_segments_new"] == len(SEGMENTS) - len(committed)
    assert summary["video_segments_reopened"] == 1  # the first segment after the kill decodes from the start
    keys = read_ledger(gallery)["image_key"].to_pylist()
    assert sorted(keys) == sorted(f"cam/{NAME}@{s}" for s in SEGMENTS)  # each segment committed exactly once
    got = {r["detection_id"]: r for r in rows(gallery, "cam")}
    expected = {r["detection_id"]: r for r in rows(reference[0], "cam")}
    assert got.keys() == expected.keys()
    for key, row in expected.items():  # the same track ids across the segment where the run died
        assert (got[key]["track_id"], got[key]["frame_index"]) == (row["track_id"], row["frame_index"])
        assert float(got[key]["embedding"] @ row["embedding"]) > 0.9999
    states = {p.name for p in (gallery / "tracks").glob("*.json")}
    assert states == {e["tracks_state"] for e in ledger_of(gallery, "cam/").values()}


# --- the driver's bookkeeping, without models --------------------------------------------------


def test_manifest_video_keys_are_validated(tmp_path):
    def load(body):
        path = tmp_path / "m.toml"
        path.write_text(f'[[source]]\nname = "v"\nuri = "{tmp_path}"\n{body}\n')
        return load_manifest(path).sources[0]

    source = load('kind = "video"\nfps = 2\nsegment_s = 30\nindex = "tracks"\ntimestamp = 2024-05-01T09:30:00+02:00')
    assert (source.fps, source.every, source.segment_s, source.video_index) == (2.0, None, 30.0, "tracks")
    assert source.timestamp_of("any.mp4") == START  # an offset is stored in UTC
    assert load('kind = "video"\nevery = 3').every == 3 and load('kind = "video"').segment_s == 60.0
    bad = {
        'kind = "video"\nfps = 2\nevery = 3': "not both",
        'kind = "video"\nfps = 0': "'fps' must be a positive number",
        'kind = "video"\nevery = 1.5': "'every' must be a whole number",
        'kind = "video"\nindex = "frames"': "'index' must be one of",
        'kind = "video"\nsegment_s = -1': "'segment_s' must be a positive",
        'kind = "frames"\nfps = 2': "only for kind = \"video\"",
        'kind = "frames"\ntimestamp = 2024-05-01T07:30:00': "constant timestamp is only for",
        'kind = "video"\ntimestamp = 2024-05-01': "date and time",
    }
    for body, message in bad.items():
        with pytest.raises(ManifestError, match=message):
            load(body)


def test_next_segment_walks_the_ledger():
    from reidx.pipeline.manifest import Source

    source = Source(name="v", uri="/nowhere", kind="video")
    key = "v/x.mp4@"

    def entry(status, stop=None, end=None, state=None, fp="a"):
        return dict(status=status, frame_stop=stop, video_end=end, tracks_state=state, fingerprint=fp)

    def walk(entries, fp="a", retry=False):
        return VideoChain(source, "x.mp4", fp).next_segment(entries, retry)

    assert walk({}) == (0, None)
    assert walk({key + "0": entry("ok", 10, False, "s0")}) == (10, "s0")
    done = {key + "0": entry("ok", 10, False, "s0"), key + "10": entry("ok", 14, True, "s1")}
    assert walk(done) is None
    assert walk({**done, key + "0": entry("requeued")}) == (0, None)  # its shard went missing: redone
    broke = {key + "0": entry("ok", 7, False, "s0"), key + "7": entry("failed", 7, True)}
    assert walk(broke) is None and walk(broke, retry=True) == (7, "s0")
    assert walk(broke, fp="b") == (7, "s0")  # the file changed since (an upload went on): retried
    chain = VideoChain(source, "x.mp4", "b")
    assert chain.next_segment(broke) == (7, "s0") and chain.next_segment(broke) is None  # once per run


def test_a_worker_decodes_a_video_once_across_its_segments(encoded, reference, monkeypatch):
    # The reader of a finished segment stays open where the next one starts: the whole video is
    # opened (and decoded) once, and gives the rows the nightly job gave.
    from reidx.pipeline import video_persons
    from reidx.pipeline.persons import ModelSpec

    opened, real = [], video_persons._open
    monkeypatch.setattr(video_persons, "_open", lambda *args: opened.append(args[2]) or real(*args))
    source = load_manifest(cam_manifest(encoded, encoded / "one.toml", sources=("cam",))).sources[0]
    frame, state, starts, found = 0, None, [], []
    spec = ModelSpec("osnet_x0_25_msmt17")
    while True:
        persons = video_persons.persons_of_video_segment(source, NAME, frame, state, spec)
        starts.append(frame)
        found += persons.table.to_pylist() if persons.table is not None else []
        if persons.records[0]["video_end"]:
            break
        frame, state = persons.records[0]["frame_stop"], json.loads(json.dumps(persons.tracker_state))
    assert starts == SEGMENTS and opened == [0]
    expected = {r["detection_id"]: (r["track_id"], r["frame_index"]) for r in rows(reference[0], "cam")}
    assert {r["detection_id"]: (r["track_id"], r["frame_index"]) for r in found} == expected


def test_ledger_counts_images_videos_and_segments(tmp_path):
    """`reidx ledger` says segments and videos, not "images", for video entries (latest outcome each)."""
    from click.testing import CliRunner

    from reidx.cli import main
    from reidx.pipeline.ledger import append, ledger_rows

    def segment(video, first, stop, status="ok", persons=3, **extra):
        return {"image_key": f"cam/{video}@{first}", "source": "cam", "member": video, "status": status,
                "num_persons": persons, "frame_start": first, "frame_stop": stop, **extra}

    append(tmp_path, ledger_rows([
        {"image_key": "stills/a.jpg", "source": "stills", "member": "a.jpg", "status": "ok", "num_persons": 2},
        {"image_key": "stills/b.jpg", "source": "stills", "member": "b.jpg", "status": "failed", "reason": "x"},
        segment("a.mp4", 0, 180), segment("a.mp4", 180, 240, video_end=True),
        segment("b.mp4", 0, 4), segment("b.mp4", 4, 4, "failed", 0, reason="truncated", video_end=True),
        segment("c.mp4", 0, 0, "failed", 0, reason="cannot read", video_end=True)]))
    append(tmp_path, ledger_rows([segment("c.mp4", 0, 90, video_end=True)]))  # retried: its latest is ok
    result = CliRunner().invoke(main, ["ledger", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    counts = json.loads(result.stdout)
    assert counts == {"gallery": str(tmp_path), "images": 2, "images_ok": 1, "images_failed": 1, "videos": 3,
                      "videos_failed": 1, "video_segments": 5, "video_segments_ok": 4, "video_segments_failed": 1,
                      "persons": 2 + 4 * 3}
    text = CliRunner().invoke(main, ["ledger", str(tmp_path)]).stdout.strip()
    assert text == ("2 images: 1 ok, 1 failed; 3 videos (1 broken) in 5 segments: 4 ok, 1 failed; "
                    "14 persons")
