"""The nightly job as an operations team runs it: exit codes a monitor reads, logs without a
terminal, Ctrl-C and SIGTERM, source names that cannot silently change. Real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq

from conftest import CON_REID, MODELS, REPO
from test_training import smoke_table  # noqa: F401 (fixture)

QUERY = sorted((CON_REID / "query").iterdir())


def reidx(*args, wait=True):
    env = {**os.environ, "REIDX_MODEL_DIR": str(MODELS)}
    command = [sys.executable, "-m", "reidx.cli", *args]
    if not wait:  # its own process group, as a terminal's foreground job (SIGINT goes to the group),
        # with SIGINT's default action as a terminal gives it: a test run started in the background
        # (`make test &`) has SIGINT ignored, and children inherit that, so Ctrl-C would reach no one
        return subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)


def folder_of(tmp_path, name, images, corrupt=0):
    folder = tmp_path / name
    folder.mkdir()
    for path in images:
        (folder / path.name).write_bytes(path.read_bytes())
    for i in range(corrupt):
        (folder / f"0001_c1_broken{i}.jpg").write_bytes(images[0].read_bytes()[:300])
    return folder


def manifest(tmp_path, file, **sources):
    text = "".join(f'[[source]]\nname = "{name}"\nuri = "{uri}"\nkind = "crops"\n' for name, uri in sources.items())
    path = tmp_path / file
    path.write_text(text)
    return path


def test_exit_codes_say_what_failed(tmp_path):
    """0 all good, 2 some inputs failed (and with --strict, still failing from an earlier night), 3 a source."""
    good = folder_of(tmp_path, "good", QUERY[:3], corrupt=1)
    night = manifest(tmp_path, "night.toml", crops=good)
    gallery = tmp_path / "g"
    first = reidx("index", str(night), "--out", str(gallery), "--json")
    assert first.returncode == 2, first.stderr
    assert json.loads(first.stdout)["images_failed"] == 1
    again = reidx("index", str(night), "--out", str(gallery))
    assert again.returncode == 0, again.stderr  # nothing new failed tonight
    strict = reidx("index", str(night), "--out", str(gallery), "--strict")
    assert strict.returncode == 2  # the broken image still fails: --strict reports it every night

    gone = manifest(tmp_path, "gone.toml", crops=good, cams=tmp_path / "unmounted")
    missing = reidx("index", str(gone), "--out", str(gallery), "--json")
    assert missing.returncode == 3
    assert "Error: source cams failed:" in missing.stderr and "does not exist" in missing.stderr
    assert "cams" in json.loads(missing.stdout)["sources_failed"]

    empty = tmp_path / "empty"
    empty.mkdir()
    blank = reidx("index", str(manifest(tmp_path, "empty.toml", blank=empty)), "--out", str(gallery))
    assert blank.returncode == 3 and "lists no images" in blank.stderr


def test_nightly_with_every_source_missing_fails_on_the_source_not_on_the_index(tmp_path):
    night = manifest(tmp_path, "night.toml", cams=tmp_path / "unmounted")
    result = reidx("nightly", str(night), "--out", str(tmp_path / "g"), "--json")
    assert result.returncode == 3, result.stderr
    assert "not a gallery" not in result.stderr and "run `reidx index` first" not in result.stderr
    report = json.loads(result.stdout)
    assert report["build_index"] is None and "cams" in report["index"]["sources_failed"]


def test_source_names_are_unique_and_keep_their_uri(tmp_path):
    a = folder_of(tmp_path, "a", QUERY[:2])
    b = folder_of(tmp_path, "b", QUERY[2:4])
    gallery = tmp_path / "g"
    twice = reidx("index", str(manifest(tmp_path, "1.toml", cam=a)), str(manifest(tmp_path, "2.toml", cam=b)),
                  "--out", str(gallery))
    assert twice.returncode == 1 and "source name 'cam' is also used" in twice.stderr
    assert not (gallery / "ledger").exists() or not list((gallery / "ledger").iterdir())  # nothing indexed
    assert reidx("index", str(manifest(tmp_path, "3.toml", cam=a)), "--out", str(gallery)).returncode == 0
    moved = manifest(tmp_path, "4.toml", cam=b)
    refused = reidx("index", str(moved), "--out", str(gallery))
    assert refused.returncode == 1 and "--allow-uri-change" in refused.stderr
    accepted = reidx("index", str(moved), "--out", str(gallery), "--allow-uri-change", "--json")
    assert accepted.returncode == 0 and json.loads(accepted.stdout)["images_new"] == 2


def test_progress_and_a_parsable_summary_are_logged_without_a_terminal(tmp_path):
    crops = folder_of(tmp_path, "crops", QUERY[:12])
    log_file = tmp_path / "night.log"
    result = reidx("index", str(manifest(tmp_path, "n.toml", crops=crops)), "--out", str(tmp_path / "g"),
                   "--task-size", "4", "--log-every", "0", "--log-file", str(log_file))
    assert result.returncode == 0, result.stderr
    progress = [line for line in result.stderr.splitlines() if " reidx index: " in line]
    assert progress and all("images/s" in line and "ETA" in line for line in progress)
    assert progress[-1].split(" reidx index: ")[1].startswith("12/12 images (100%)")
    logged = log_file.read_text().splitlines()
    summary = [line for line in logged if " summary {" in line]
    assert len(summary) == 1 and any("index: 12/12" in line for line in logged)
    parsed = json.loads(summary[0].split(" summary ", 1)[1])
    assert parsed["command"] == "index" and parsed["images_new"] == 12 and parsed["persons"] == 12


def _ledger_parts(gallery) -> set:
    return set((gallery / "ledger").glob("part-*.parquet")) if (gallery / "ledger").exists() else set()


def _wait_for_commits(gallery, process, timeout=240):
    """Until the running job has committed a shard of its own (each ledger part read once, so the
    poll stays fast while the job runs on: a slow poll let a short job finish before the signal)."""
    seen, deadline = _ledger_parts(gallery), time.time() + timeout
    while time.time() < deadline:
        for part in sorted(_ledger_parts(gallery) - seen):
            seen.add(part)
            if pq.read_table(part)["shard"].drop_null().to_pylist():
                return
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError("the job committed nothing in time")


def test_ctrl_c_and_sigterm_print_one_line_exit_130_and_a_rerun_finishes(tmp_path):
    """Ctrl-C reaches the whole process group (driver and Dask workers), a service manager's stop
    sends SIGTERM to the driver: both end in one line and status 130, the lock is released, and a
    rerun finishes with every image exactly once."""
    crops = folder_of(tmp_path, "crops", QUERY)  # all 212: long enough to interrupt
    night = manifest(tmp_path, "n.toml", crops=crops)
    gallery = tmp_path / "g"
    for send in (lambda job: os.killpg(job.pid, signal.SIGINT), lambda job: job.send_signal(signal.SIGTERM)):
        job = reidx("index", str(night), "--out", str(gallery), "--task-size", "5", "--workers", "1", wait=False)
        _wait_for_commits(gallery, job)
        send(job)
        _, err = job.communicate(timeout=120)
        assert job.returncode == 130, err
        assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
        last = err.strip().splitlines()[-1]
        assert last.startswith("Interrupted: ") and "were committed; rerun the same command to resume" in last
    rerun = reidx("index", str(night), "--out", str(gallery), "--json")  # the lock was released
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(rerun.stdout)["images_new"] < len(QUERY)  # the interrupted runs' commits were kept
    ids = pq.read_table(gallery / "shards")["detection_id"].to_pylist()
    assert len(ids) == len(set(ids)) == len(QUERY)  # every image once


def _index(night, gallery, *extra):
    result = reidx("index", str(night), "--out", str(gallery), "--task-size", "5", "--json", *extra)
    assert result.returncode in (0, 2), result.stderr
    return json.loads(result.stdout)


def _detections(gallery) -> list[str]:
    ids = pq.read_table(gallery / "shards", columns=["detection_id"])["detection_id"].to_pylist()
    assert len(ids) == len(set(ids)), "a detection is in the gallery twice"
    return sorted(ids)


def test_damaged_shards_and_index_are_found_refused_and_repaired(tmp_path):
    crops = folder_of(tmp_path, "crops", QUERY[:20])
    night = manifest(tmp_path, "n.toml", crops=crops)
    gallery = tmp_path / "g"
    assert _index(night, gallery)["images_new"] == 20
    assert reidx("build-index", str(gallery)).returncode == 0
    expected = _detections(gallery)
    clean = reidx("verify", str(gallery), "--json")
    assert clean.returncode == 0 and json.loads(clean.stdout)["shards_checked"] == 4

    shards = sorted((gallery / "shards").glob("part-*.parquet"))
    corrupt, deleted = shards[0], shards[1]
    data = bytearray(corrupt.read_bytes())
    data[len(data) // 2:len(data) // 2 + 200] = os.urandom(200)  # the outside test's 200 random bytes
    corrupt.write_bytes(bytes(data))
    deleted.unlink()
    found = reidx("verify", str(gallery), "--json")
    assert found.returncode == 2
    damaged = json.loads(found.stdout)["damaged_shards"]
    assert damaged[deleted.name] == "missing" and corrupt.name in damaged and "checksum" in damaged[corrupt.name]
    refused = reidx("build-index", str(gallery), "--rebuild")
    assert refused.returncode == 1 and "damaged" in refused.stderr and "reidx verify" in refused.stderr
    assert reidx("export", str(gallery), "--out", str(tmp_path / "x.parquet")).returncode == 1

    repaired = reidx("verify", str(gallery), "--repair", "--json")
    assert repaired.returncode == 0, repaired.stderr
    assert json.loads(repaired.stdout)["repaired"]["images_requeued"] == 10
    assert (gallery / "quarantine").is_dir() and not corrupt.exists()
    again = _index(night, gallery)
    assert again["images_new"] == 10 and again["persons"] == 10  # exactly the affected images, once
    assert reidx("verify", str(gallery)).returncode == 0
    assert _detections(gallery) == expected
    rebuilt = reidx("build-index", str(gallery), "--json")
    assert rebuilt.returncode == 0 and json.loads(rebuilt.stdout)["persons"] == 20

    version = (gallery / "index" / "CURRENT").read_text().strip()
    index_file = gallery / "index" / version / "index.faiss"
    index_file.write_bytes(index_file.read_bytes()[:1000])  # truncated
    query = reidx("query", str(gallery), str(QUERY[0]), "--out", str(tmp_path / "r.parquet"))
    assert query.returncode == 1 and "cannot be read" in query.stderr and "Traceback" not in query.stderr
    assert json.loads(reidx("verify", str(gallery), "--json").stdout)["index"]["problem"]
    healed = reidx("build-index", str(gallery), "--json")
    assert healed.returncode == 0 and json.loads(healed.stdout)["mode"] == "full"  # not "unchanged"
    assert reidx("query", str(gallery), str(QUERY[0]), "--out", str(tmp_path / "r.parquet")).returncode == 0


def test_a_shard_deleted_from_disk_is_indexed_again_not_skipped_forever(tmp_path):
    crops = folder_of(tmp_path, "crops", QUERY[:10])
    night = manifest(tmp_path, "n.toml", crops=crops)
    gallery = tmp_path / "g"
    _index(night, gallery)
    expected = _detections(gallery)
    sorted((gallery / "shards").glob("part-*.parquet"))[0].unlink()
    again = _index(night, gallery)
    assert again["images_requeued"] == 5 and again["images_new"] == 5
    assert _detections(gallery) == expected


def test_a_failed_image_is_retried_when_its_bytes_change(tmp_path):
    crops = folder_of(tmp_path, "crops", QUERY[:3])
    whole = QUERY[3].read_bytes()
    uploading = crops / QUERY[3].name
    uploading.write_bytes(whole[:400])  # caught mid-upload
    night = manifest(tmp_path, "n.toml", crops=crops)
    gallery = tmp_path / "g"
    first = _index(night, gallery)
    assert first["images_failed"] == 1
    assert _index(night, gallery)["images_new"] == 0  # unchanged: not retried every night
    uploading.write_bytes(whole)  # the upload finished
    second = _index(night, gallery)
    assert second["images_retried"] == 1 and second["images_new"] == 1 and second["images_failed"] == 0
    ledger = json.loads(reidx("ledger", str(gallery), "--json").stdout)
    assert ledger["images_ok"] == 4 and ledger["images_failed"] == 0
    (crops / "0001_c1_bad.jpg").write_bytes(b"broken")
    _index(night, gallery)
    forced = _index(night, gallery, "--retry-failed")
    assert forced["images_new"] == 1 and forced["images_failed"] == 1  # retried on request, still broken


def test_sigterm_during_training_keeps_the_epochs_and_the_rerun_needs_resume(tmp_path, smoke_table):
    """A training stopped by SIGTERM ends in one line naming --resume; the same command without it is
    refused (it would start afresh over the kept epochs); with it, the run finishes."""
    out = tmp_path / "model.pth"
    args = ["train", "--data", str(smoke_table), "--out", str(out), "--epochs", "4", "--p", "4", "--k", "4",
            "--threads", "1", "--device", "cpu", "--no-domain-gate", "--head-init", "random", "--wise-alpha", "1"]
    job = reidx(*args, wait=False)
    kept = out.with_name("model.resume.pth")
    deadline = time.time() + 240
    while not kept.is_file():  # written after each epoch
        assert job.poll() is None and time.time() < deadline, job.communicate()
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=120)
    assert job.returncode == 130 and "Traceback" not in err, err
    assert "rerun the same command with --resume" in err.strip().splitlines()[-1], err
    epochs_kept = kept.read_bytes()
    again = reidx(*args)
    assert again.returncode == 1 and "add --resume to continue it" in again.stderr, again.stderr
    assert kept.read_bytes() == epochs_kept and not out.exists()
    resumed = reidx(*args, "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["epochs"] == 4 and out.is_file()
