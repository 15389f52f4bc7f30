"""Operations-grade nightly job: hostile names, images, archives, servers, weights, filters and folders.

Every case here broke a night (or worse) before; each test builds the real input (files,
archives, a silent local server, racing processes) and runs the real code on it.
"""

import io
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import CON_REID, MODELS, REPO, SCENES, crops_manifest

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


# --- case 8: the gallery lock -------------------------------------------------------------------

def _lock_racer(root, trials, barrier, log):
    import threading  # noqa: F401 - forked child: only the standard library and reidx

    from reidx.pipeline.lock import GalleryLock, GalleryLockedError

    for trial in range(trials):
        try:
            barrier.wait(timeout=60)
        except Exception:  # noqa: BLE001 - a broken barrier: another racer died, stop
            return
        try:
            with GalleryLock(root / f"g{trial}"):
                with open(log, "a") as f:
                    f.write(f"{trial} {os.getpid()} in\n")
                time.sleep(0.01)
                with open(log, "a") as f:
                    f.write(f"{trial} {os.getpid()} out\n")
        except GalleryLockedError:
            pass
        except Exception as exc:  # noqa: BLE001 - any other failure is a broken lock
            with open(log, "a") as f:
                f.write(f"{trial} {os.getpid()} error {type(exc).__name__}\n")


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_racing_processes_on_a_stale_lock_never_hold_it_together(tmp_path):
    import multiprocessing
    import socket

    processes, trials = 8, 200
    stale = f"{socket.gethostname()} {_dead_pid()}"  # what a SIGKILLed holder of the old lock left
    for trial in range(trials):
        (tmp_path / f"g{trial}").mkdir()
        (tmp_path / f"g{trial}" / ".lock").write_text(stale)
    log = tmp_path / "holders.log"
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(processes)
    racers = [context.Process(target=_lock_racer, args=(tmp_path, trials, barrier, log)) for _ in range(processes)]
    started = time.monotonic()
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(timeout=max(1.0, 120 - (time.monotonic() - started)))
    for racer in racers:
        if racer.is_alive():
            racer.kill()
    assert all(r.exitcode == 0 for r in racers), [r.exitcode for r in racers]
    lines = log.read_text().split("\n")[:-1]
    by_trial: dict[int, list[str]] = {}
    for line in lines:
        trial, pid, event = line.split(" ", 2)
        by_trial.setdefault(int(trial), []).append(f"{pid} {event}")
    assert sorted(by_trial) == list(range(trials)), "a trial had no holder at all"
    for trial, events in by_trial.items():
        assert not [e for e in events if "error" in e], (trial, events)
        for i in range(0, len(events), 2):  # "pid in", "pid out", then maybe the next holder: never two inside
            pid = events[i].split()[0]
            assert events[i:i + 2] == [f"{pid} in", f"{pid} out"], (trial, events)


def test_a_lock_nobody_holds_never_blocks_a_night(tmp_path):
    """A SIGKILLed holder's lock is free at once, and neither an empty lock file (what a disk-full
    write left) nor one naming a holder on another host (a shared disk) blocks anything."""
    from reidx.pipeline.lock import GalleryLock, GalleryLockedError

    gallery = tmp_path / "g"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom reidx.pipeline.lock import GalleryLock\n"
         "lock = GalleryLock(sys.argv[1]).__enter__()\nprint('held', flush=True)\ntime.sleep(120)", str(gallery)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(GalleryLockedError, match=f" {holder.pid}\\)"):
            GalleryLock(gallery).__enter__()
    finally:
        holder.kill()
        holder.wait()
    started = time.monotonic()
    with GalleryLock(gallery):
        assert str(os.getpid()) in (gallery / ".lock").read_text()
    assert time.monotonic() - started < 1
    assert not (gallery / ".lock").exists()  # a clean exit leaves nothing behind
    for content in ("", "some-other-host 1"):
        (gallery / ".lock").write_text(content)
        with GalleryLock(gallery):
            pass


def test_a_failed_write_of_the_holder_leaves_no_lock_that_blocks_later_nights(tmp_path):
    from reidx.pipeline.lock import GalleryLock

    # a real write failure: the file-size limit 0 makes writing the holder's pid fail (EFBIG), as a full disk would
    script = ("import resource, signal, sys\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))\nfrom reidx.pipeline.lock import GalleryLock\n"
              "try:\n    with GalleryLock(sys.argv[1]):\n        print('ran')\nexcept OSError as exc:\n"
              "    print('failed', exc)\n")
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, capture_output=True, text=True)
    with GalleryLock(tmp_path):
        pass


# --- case 9: reidx export --where -------------------------------------------------------------

@pytest.fixture(scope="module")
def small_gallery(tmp_path_factory):
    """Six real Con-ReID crops indexed by the real job."""
    root = tmp_path_factory.mktemp("small")
    (root / "crops").mkdir()
    for image in QUERY[:6]:
        (root / "crops" / image.name).write_bytes(image.read_bytes())
    result = reidx("index", str(crops_manifest(root / "night.toml", root / "crops")), "--out", str(root / "g"),
                   "--workers", "1", "--json")
    assert result.returncode == 0, result.stderr
    return root / "g"


def test_export_where_accepts_one_expression_and_refuses_a_second_statement(small_gallery, tmp_path):
    import pyarrow.parquet as pq

    for where in ("1=1; SELECT 'forged' AS detection_id", "1=1 UNION ALL SELECT 'forged'"):
        out = tmp_path / "injected.parquet"
        result = reidx("export", str(small_gallery), "--out", str(out), "--where", where)
        assert result.returncode == 1, (where, result.stdout)
        assert "--where must be one boolean expression" in result.stderr and not out.exists()
    out = tmp_path / "camera1.parquet"
    result = reidx("export", str(small_gallery), "--out", str(out), "--where", "camera = '1' AND score > 0.5", "--json")
    assert result.returncode == 0, result.stderr
    table = pq.read_table(out)
    cameras = [name.split("_c")[1][0] for name in (p.name for p in QUERY[:6])]
    assert table.num_rows == json.loads(result.stdout)["persons"] == cameras.count("1") > 0
    assert set(table["camera"].to_pylist()) == {"1"} and "forged" not in table["detection_id"].to_pylist()


def test_export_where_is_stopped_after_its_timeout(small_gallery, tmp_path):
    started = time.monotonic()
    result = reidx("export", str(small_gallery), "--out", str(tmp_path / "slow.parquet"), "--timeout", "1",
                   "--where", "(SELECT sum(a.range * b.range) FROM range(1000000) a, range(1000000) b) > 0")
    assert result.returncode == 1 and "stopped after 1 s" in result.stderr, result.stderr
    assert time.monotonic() - started < 60 and not (tmp_path / "slow.parquet").exists()


# --- case 10: the report's thumbnail folder ---------------------------------------------------

def _write_report(out):
    import pyarrow as pa

    from reidx.indexers.results import result_schema
    from reidx.indexers.report import write_report

    items = pa.table({"detection_id": pa.array([], pa.string()), "source_uri": pa.array([], pa.string())})
    return write_report(result_schema().empty_table(), items, out)


@pytest.mark.parametrize("as_link", [False, True])
def test_report_never_deletes_a_folder_reidx_did_not_create(tmp_path, as_link):
    documents = tmp_path / "documents"
    documents.mkdir()
    (documents / "thesis.docx").write_bytes(b"years of work")
    (documents / "g-1.jpg").write_bytes(b"my holiday photo")
    folder = tmp_path / "x_files"
    if as_link:
        folder.symlink_to(documents, target_is_directory=True)
    else:
        folder = documents.rename(folder)
        documents = folder
    with pytest.raises(ValueError, match="was not created by reidx|symbolic link"):  # one line in the CLI
        _write_report(tmp_path / "x.html")
    assert sorted(p.name for p in documents.iterdir()) == ["g-1.jpg", "thesis.docx"]
    assert (documents / "thesis.docx").read_bytes() == b"years of work" and not (tmp_path / "x.html").exists()


def test_report_reuses_the_folder_it_created(tmp_path):
    out = tmp_path / "out" / "x.html"
    _write_report(out)
    (out.parent / "x_files" / "g-old.jpg").write_bytes(b"a thumbnail of the last run")
    (out.parent / "x_files" / "notes.txt").write_text("added by a user")
    assert _write_report(out)["report"] == str(out)  # second run: same folder, old thumbnails replaced
    assert sorted(p.name for p in (out.parent / "x_files").iterdir() if not p.name.startswith(".")) == ["notes.txt"]


# --- case 11: links out of a folder source; image formats --------------------------------------

def test_folder_source_refuses_links_that_leave_the_folder(tmp_path):
    from reidx.pipeline.manifest import load_manifest
    from reidx.pipeline.sources import list_source, read_members

    folder = tmp_path / "night"
    (folder / "cam1").mkdir(parents=True)
    (folder / "cam1" / QUERY[0].name).write_bytes(QUERY[0].read_bytes())
    (folder / "cam1" / "passwd.jpg").symlink_to("/etc/passwd")
    (folder / "cam1" / "inside.jpg").symlink_to(folder / "cam1" / QUERY[0].name)  # stays inside: fine
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(QUERY[1].read_bytes())
    (folder / "cam1" / "secret.jpg").symlink_to(outside / "secret.jpg")
    for uri in (folder, f"{folder}/*/*.jpg"):
        source = crops_manifest_source(tmp_path, uri)
        listing = list_source(source)
        assert listing.members == sorted(["cam1/inside.jpg", f"cam1/{QUERY[0].name}"])
        reasons = dict(listing.rejected)
        assert sorted(reasons) == ["cam1/passwd.jpg", "cam1/secret.jpg"]
        assert all("outside the source folder" in r for r in reasons.values())
        read = {m: (d, e) for m, d, e in read_members(source, ["cam1/passwd.jpg", "cam1/inside.jpg"])}
        assert read["cam1/passwd.jpg"][0] is None and "outside the source folder" in read["cam1/passwd.jpg"][1]
        assert read["cam1/inside.jpg"][0] == QUERY[0].read_bytes()


def crops_manifest_source(tmp_path, uri, extra=""):
    from reidx.pipeline.manifest import load_manifest

    return load_manifest(crops_manifest(tmp_path / "source.toml", uri, extra)).sources[0]


def test_decode_refuses_eps_and_keeps_the_camera_formats():
    from reidx.pipeline.imaging import ImageDecodeError, decode_image

    crop = Image.open(QUERY[0]).convert("RGB")

    def encoded(image, fmt, **kwargs):
        buf = io.BytesIO()
        image.save(buf, format=fmt, **kwargs)
        return buf.getvalue()

    with pytest.raises(ImageDecodeError, match="not an image in an accepted format .*JPEG"):
        decode_image(encoded(crop, "EPS"))  # PostScript: decoding it would run Ghostscript
    for fmt in ("JPEG", "PNG", "BMP", "WEBP", "TIFF", "GIF"):
        assert decode_image(encoded(crop, fmt)).size == crop.size
    mpo = encoded(crop, "MPO", save_all=True, append_images=[crop])
    assert decode_image(mpo).size == crop.size


# --- case 1: labels that are not an int64 -------------------------------------------------------

@pytest.mark.parametrize("key, regex, message", [
    ("labels", r"^(\w+)_c", "may capture only digits"),
    ("labels", r"^([^_]+)_", "may capture only digits"),
    ("labels", r"^(\d+|x)_", "may capture only digits"),
    ("labels", r"^(\d+)_c(\d+)", r"has 2 \(groups\)"),
    ("camera", r"_c(\d)s(\d)", r"has 2 \(groups\)"),
])
def test_label_and_field_regexes_are_checked_when_the_manifest_loads(tmp_path, key, regex, message):
    from reidx.pipeline.manifest import ManifestError, load_manifest

    field = f"labels = {{ person_id = '{regex}' }}" if key == "labels" else f"camera = {{ regex = '{regex}' }}"
    path = tmp_path / "night.toml"
    path.write_text(f"[[source]]\nname = 'a'\nuri = 'x'\nkind = 'crops'\n{field}\n")
    with pytest.raises(ManifestError, match=message):
        load_manifest(path)


def test_label_too_large_for_int64_fails_that_image_and_not_the_night(tmp_path):
    import pyarrow.parquet as pq

    from reidx.pipeline.ledger import read_ledger

    folder = tmp_path / "crops"
    folder.mkdir()
    for image in QUERY[:3]:
        (folder / image.name).write_bytes(image.read_bytes())
    huge = "99999999999999999999_c1s1_000002.jpg"
    (folder / huge).write_bytes(QUERY[3].read_bytes())
    source = crops_manifest_source(tmp_path, folder)
    assert source.person_id_of(huge) is None and source.label_error(huge).startswith("label: ")
    assert source.person_id_of(QUERY[0].name) == int(QUERY[0].name.split("_")[0])

    gallery = tmp_path / "g"
    result = reidx("index", str(crops_manifest(tmp_path / "night.toml", folder)), "--out", str(gallery),
                   "--workers", "1", "--json")
    assert result.returncode == 2, result.stderr  # the image with the bad label failed: exit 2 (case 16)
    summary = json.loads(result.stdout)
    assert summary["images_failed"] == 1 and summary["failed_by_reason"] == {"label": 1} and summary["persons"] == 3
    ledger = {r["member"]: r for r in read_ledger(gallery).to_pylist()}
    assert ledger[huge]["status"] == "failed" and "99999999999999999999" in ledger[huge]["reason"]
    shards = pq.read_table([str(gallery / "shards" / s) for s in {r["shard"] for r in ledger.values() if r["shard"]}])
    assert sorted(shards["person_id"].to_pylist()) == sorted(int(p.name.split("_")[0]) for p in QUERY[:3])


# --- case 7: one member name twice in an archive -------------------------------------------------

def test_zip_with_a_member_name_twice_indexes_neither_copy(tmp_path):
    import zipfile
    import warnings

    import pyarrow.parquet as pq

    from reidx.pipeline.ledger import read_ledger

    archive = tmp_path / "night.zip"
    twice = f"cam1/{QUERY[0].name}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns "Duplicate name": that is the point
        with zipfile.ZipFile(archive, "w") as zf:
            for image in QUERY[:3]:
                zf.write(image, f"cam1/{image.name}")
            zf.write(QUERY[5], twice)  # same name, another person's crop
    gallery = tmp_path / "g"
    result = reidx("index", str(crops_manifest(tmp_path / "night.toml", archive)), "--out", str(gallery),
                   "--workers", "1", "--json")
    assert result.returncode == 2, result.stderr  # both copies were refused: exit 2 (case 16)
    ledger = read_ledger(gallery).to_pylist()
    assert sorted(r["member"] for r in ledger) == sorted(f"cam1/{p.name}" for p in QUERY[:3])  # each name once
    (refused,) = [r for r in ledger if r["member"] == twice]
    assert refused["status"] == "failed" and "2 copies" in refused["reason"]
    shards = pq.read_table([str(gallery / "shards" / s) for s in {r["shard"] for r in ledger if r["shard"]}])
    ids = shards["detection_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 2 and twice not in shards["member"].to_pylist()


# --- case 3: corrupt compressed data -------------------------------------------------------------

def _corrupt_tar_gz(path, expected_error):
    """A real .tar.gz of eight crops with 64 (or 8) bytes overwritten mid-stream, chosen so that plain
    tarfile fails with ``expected_error`` ("zlib" error or a silent early "stop"). The archive's
    bytes are fixed (member times, owners and the gzip header's time), so the search does not
    depend on the machine's file metadata."""
    import gzip
    import itertools
    import tarfile
    import zlib

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for image in QUERY[:8]:
            data = image.read_bytes()
            info = tarfile.TarInfo(image.name)
            info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
            tar.addfile(info, io.BytesIO(data))
    clean = gzip.compress(raw.getvalue(), mtime=0)
    for length, fill, percent in itertools.product((64, 8), (b"\xff", b"\x00", b"\x5a"), range(20, 90)):
        data = bytearray(clean)
        at = len(data) * percent // 100
        data[at:at + length] = fill * length
        try:
            with tarfile.open(fileobj=io.BytesIO(bytes(data)), mode="r:*") as tar:
                names = [info.name for info in tar]
                first_intact = bool(names) and tar.extractfile(names[0]).read() == QUERY[0].read_bytes()
            got = "stop" if 0 < len(names) < 8 and first_intact else None
        except zlib.error:
            got = "zlib"
        except Exception:  # noqa: BLE001 - another symptom: try the next offset
            got = None
        if got == expected_error:
            path.write_bytes(bytes(data))
            return path
    raise AssertionError(f"no corruption gave {expected_error}")


@pytest.mark.parametrize("symptom", ["zlib", "stop"])
def test_tar_gz_corrupt_mid_stream_keeps_what_was_listed_and_records_the_break(tmp_path, symptom):
    from reidx.pipeline.sources import read_members, list_source

    source = crops_manifest_source(tmp_path, _corrupt_tar_gz(tmp_path / "night.tar.gz", symptom))
    listing = list_source(source)  # zlib.error escaped here and killed the driver; a silent stop lost members
    assert 0 < len(listing.members) < 8 and listing.members == sorted(p.name for p in QUERY[:len(listing.members)])
    (rest, reason), = listing.rejected
    assert rest == "(rest of archive)" and reason.startswith("unreadable archive")
    read = list(read_members(source, listing.members))
    assert [m for m, _, _ in read] == listing.members
    assert all(data is not None or error.startswith("unreadable archive") for _, data, error in read)
    assert read[0][1] == QUERY[0].read_bytes()


def test_zip_member_with_corrupt_deflate_data_is_that_members_failure(tmp_path):
    import zipfile

    from reidx.pipeline.sources import list_source, read_members

    archive = tmp_path / "night.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for image in QUERY[:3]:
            zf.write(image, image.name)
    data = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as zf:
        info = zf.infolist()[1]
    start = info.header_offset + 30 + len(info.filename.encode()) + info.compress_size // 3
    data[start:start + 32] = b"\xff" * 32
    archive.write_bytes(bytes(data))
    source = crops_manifest_source(tmp_path, archive)
    listing = list_source(source)
    read = {m: (d, e) for m, d, e in read_members(source, listing.members)}
    assert read[QUERY[0].name] == (QUERY[0].read_bytes(), None) and read[QUERY[2].name][0] == QUERY[2].read_bytes()
    assert read[QUERY[1].name][0] is None and read[QUERY[1].name][1].startswith("unreadable archive member")


# --- case 4: a huge member in a small archive ----------------------------------------------------

MIB = 1 << 20


class _Zeros(io.RawIOBase):
    """``size`` zero bytes, streamed: the big member is never held in memory by the test either."""

    def __init__(self, size):
        self.left = size

    def readable(self):
        return True

    def readinto(self, buffer):
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def _bomb_archive(path, size):
    """A real archive (.zip or .tar.gz) holding two crops and ``size`` bytes of zeros as big.jpg."""
    import shutil
    import tarfile
    import zipfile

    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for image in QUERY[:2]:
                zf.write(image, image.name)
            with zf.open("big.jpg", "w", force_zip64=True) as member:
                shutil.copyfileobj(_Zeros(size), member, MIB)
    else:
        with tarfile.open(path, "w:gz") as tar:
            for image in QUERY[:2]:
                tar.add(image, arcname=image.name)
            info = tarfile.TarInfo("big.jpg")
            info.size = size
            tar.addfile(info, io.BufferedReader(_Zeros(size), MIB))
    return path


@pytest.mark.parametrize("name", ["bomb.zip", "bomb.tar.gz"])
def test_member_over_max_member_bytes_is_refused_before_it_is_read(tmp_path, name):
    from reidx.pipeline.sources import list_source, read_members

    archive = _bomb_archive(tmp_path / name, 8 * MIB)
    assert archive.stat().st_size < 64 * 1024  # small on disk, 8 MiB inside
    source = crops_manifest_source(tmp_path, archive, extra="max_member_bytes = 1048576\n")
    listing = list_source(source)
    assert listing.members == sorted(p.name for p in QUERY[:2])
    (member, reason), = listing.rejected
    assert member == "big.jpg" and "8.0 MiB" in reason and "max_member_bytes" in reason
    read = {m: (d, e) for m, d, e in read_members(source, [*listing.members, "big.jpg"])}
    assert read["big.jpg"][0] is None and "max_member_bytes" in read["big.jpg"][1]
    assert read[QUERY[0].name] == (QUERY[0].read_bytes(), None)


def test_member_size_is_enforced_while_reading_when_no_header_tells_it(tmp_path):
    import zipfile

    from reidx.pipeline.sources import list_source, read_members

    folder = tmp_path / "night"
    folder.mkdir()
    (folder / QUERY[0].name).write_bytes(QUERY[0].read_bytes())
    with open(folder / "big.jpg", "wb") as f:
        f.truncate(2 * MIB)  # no header: the size is only known by reading
    source = crops_manifest_source(tmp_path, folder, extra="max_member_bytes = 1048576\n")
    read = {m: (d, e) for m, d, e in read_members(source, list_source(source).members)}
    assert read["big.jpg"][0] is None and "max_member_bytes" in read["big.jpg"][1]
    assert read[QUERY[0].name] == (QUERY[0].read_bytes(), None)

    # a zip whose headers claim 100 bytes for an 8 MiB member: never read whole
    archive = _bomb_archive(tmp_path / "liar.zip", 8 * MIB)
    data = bytearray(archive.read_bytes())
    entry = data.rindex(b"PK\x01\x02")  # central directory entry of the last member, big.jpg
    assert data[entry + 46:entry + 53] == b"big.jpg" and int.from_bytes(data[entry + 24:entry + 28], "little") == 8 * MIB
    data[entry + 24:entry + 28] = (100).to_bytes(4, "little")  # its uncompressed size, as zipfile reads it
    archive.write_bytes(bytes(data))
    with zipfile.ZipFile(archive) as zf:
        assert zf.getinfo("big.jpg").file_size == 100
    source = crops_manifest_source(tmp_path, archive, extra="max_member_bytes = 1048576\n")
    assert "big.jpg" in list_source(source).members
    read = {m: (d, e) for m, d, e in read_members(source, ["big.jpg"])}
    assert read["big.jpg"][0] is None and read["big.jpg"][1]


# --- case 5: network sources ---------------------------------------------------------------------

class SilentServer:
    """A TCP server on 127.0.0.1 that accepts connections and never answers; it stops itself after
    ``lifetime`` seconds at most (or when the test leaves the ``with``), closing every connection."""

    def __init__(self, lifetime=60.0):
        import socket
        import threading

        self.lifetime, self.accepted, self.clients = lifetime, 0, []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self):
        deadline = time.monotonic() + self.lifetime
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                client, _ = self.listener.accept()
            except OSError:
                continue
            self.accepted += 1
            self.clients.append(client)  # held open, never read from or written to
        for client in self.clients:
            client.close()
        self.listener.close()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=5)


def _has_aiohttp():
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        return False
    return True


def test_unknown_protocol_or_missing_extra_fails_only_that_source(tmp_path):
    from reidx.pipeline.sources import SourceError, list_source

    with pytest.raises(SourceError, match="unknown protocol 'nosuchproto'"):
        list_source(crops_manifest_source(tmp_path, "nosuchproto://archive/night"))
    if not _has_aiohttp():
        with pytest.raises(SourceError, match=r"pip install 'reidx\[http\]'"):
            list_source(crops_manifest_source(tmp_path, "http://127.0.0.1:9/night/"))


@pytest.mark.parametrize("protocol", ["ftp", "http"])
def test_a_server_that_never_answers_fails_that_source_after_its_timeout(tmp_path, protocol):
    from reidx.pipeline.sources import SourceError, list_source, read_members

    if protocol == "http" and not _has_aiohttp():
        pytest.skip("aiohttp is not installed (extra reidx[http]); the missing extra is tested above")
    with SilentServer() as server:
        source = crops_manifest_source(tmp_path, f"{protocol}://127.0.0.1:{server.port}/night/",
                                       extra="timeout_s = 1\n")
        started = time.monotonic()
        with pytest.raises(SourceError, match="no answer .* within 1 s"):
            list_source(source)
        listed = time.monotonic()
        (member, data, reason), = read_members(source, [QUERY[0].name])
        read = time.monotonic()
        assert server.accepted >= 1  # it really connected, and waited
    assert data is None and "within 1 s" in reason
    assert listed - started < 10 and read - listed < 10
