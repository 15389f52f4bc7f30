"""Manifest validation and archive sources, with hostile archives built here."""

import io
import tarfile
import zipfile
from datetime import datetime

import pytest

from reidx.pipeline.manifest import ManifestError, load_manifest
from reidx.pipeline.sources import SourceError, list_source, read_members
from conftest import CON_REID, REPO

QUERY_IMAGES = sorted((CON_REID / "query").iterdir())[:6]


def write_manifest(tmp_path, body: str):
    path = tmp_path / "night.toml"
    path.write_text(body)
    return path


def one_source(tmp_path, uri, extra=""):
    return load_manifest(write_manifest(tmp_path, f'[[source]]\nname = "s"\nuri = "{uri}"\nkind = "crops"\n{extra}'))


def test_valid_manifest_resolves_relative_uri_and_parses_fields(tmp_path):
    (tmp_path / "imgs").mkdir()
    manifest = one_source(tmp_path, "imgs", extra=(
        "camera = { regex = '_c(\\d+)' }\n"
        "timestamp = { regex = '(\\d{8}T\\d{6})', format = '%Y%m%dT%H%M%S' }\n"
        "labels = { person_id = '^(-?\\d+)_' }\ninclude = ['*.jpg']\n"))
    source = manifest.sources[0]
    assert source.uri == str((tmp_path / "imgs").resolve())
    member = "0001_c3s1_20261121T220501.jpg"
    assert source.camera_of(member) == "3" and source.person_id_of(member) == 1
    assert source.timestamp_of(member) == datetime(2026, 11, 21, 22, 5, 1)

    assert source.person_id_of("-1_c1.jpg") == -1


@pytest.mark.parametrize(
    "body, message",
    [
        ("version = 1\n", "no [[source]] tables"),
        ("[[source]]\nname = 'a'\nkind = 'crops'\n", "source[0] (a): missing required key 'uri'"),
        ("[[source]]\nname = 'a'\nuri = 'x'\nkind = 'videos'\n", "source[0] (a): key 'kind' must be one of"),
        ("[[source]]\nname = 'a'\nuri = 'x'\nkind = 'crops'\ncamra = 1\n", "unknown key(s) ['camra']"),
        ("[[source]]\nname = 'a'\nuri = 'x'\nkind = 'crops'\ncamera = { regex = '(' }\n", "key 'camera.regex': invalid"),
        ("[[source]]\nname = 'a'\nuri = 'x'\nkind = 'crops'\ncamera = { regex = 'c1' }\n", "needs a (group)"),
        ("[[source]]\nname = 'a'\nuri = 'x'\nkind = 'crops'\ntimestamp = { regex = '(\\d+)' }\n",
         "key 'timestamp.format' must be a strptime format"),
        ("[[source]]\nname = 'a'\nuri = 'x'\nkind = 'frames'\ntimestamp = { regex = '(\\d+)', frame_rate = 0, "
         "start = 2013-01-01T08:00:00 }\n", "needs frame_rate (frames per second, > 0) and start"),
        ("[[source]]\nname = 'a b'\nuri = 'x'\nkind = 'crops'\n", "may use letters, digits"),
        ("[[source]]\nname = 'a'\nuri = 'x'\nkind = 'crops'\n[[source]]\nname = 'a'\nuri = 'y'\nkind = 'crops'\n",
         "used twice"),
        ("[[source]\nname = 'a'", "not valid TOML"),
        ("version = 2\n[[source]]\nname = 'a'\nuri = 'x'\nkind = 'crops'\n", "key 'version'"),
    ],
)
def test_invalid_manifests_name_file_source_and_key(tmp_path, body, message):
    path = write_manifest(tmp_path, body)
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_missing_manifest_file(tmp_path):
    with pytest.raises(ManifestError, match="no such manifest"):
        load_manifest(tmp_path / "nope.toml")


def test_folder_and_glob_sources_list_and_read(tmp_path):
    folder = tmp_path / "imgs" / "day1"
    folder.mkdir(parents=True)
    for path in QUERY_IMAGES:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "notes.txt").write_text("not an image")
    source = one_source(tmp_path, "imgs").sources[0]
    listing = list_source(source)
    assert listing.members == sorted(f"day1/{p.name}" for p in QUERY_IMAGES)
    data = {m: d for m, d, err in read_members(source, listing.members)}
    assert data[f"day1/{QUERY_IMAGES[0].name}"] == QUERY_IMAGES[0].read_bytes()
    globbed = one_source(tmp_path, str(tmp_path / "imgs" / "*" / "0*.jpg")).sources[0]
    assert list_source(globbed).members == listing.members
    excluded = one_source(tmp_path, "imgs", extra=f"exclude = ['*{QUERY_IMAGES[0].name}']").sources[0]
    assert len(list_source(excluded).members) == len(QUERY_IMAGES) - 1


def hostile_tar(path, compressed: bool):
    with tarfile.open(path, "w:gz" if compressed else "w") as tar:
        for image in QUERY_IMAGES[:3]:
            tar.add(image, arcname=f"cam1/{image.name}")
        evil = [("../escape.jpg", tarfile.REGTYPE), ("/etc/abs.jpg", tarfile.REGTYPE),
                ("cam1/link.jpg", tarfile.SYMTYPE), ("cam1/hard.jpg", tarfile.LNKTYPE),
                ("cam1/dev.jpg", tarfile.CHRTYPE), ("cam1/fifo.jpg", tarfile.FIFOTYPE)]
        for name, kind in evil:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = "/etc/passwd" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
            payload = b"\xff\xd8 evil" if kind == tarfile.REGTYPE else b""
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


@pytest.mark.parametrize("compressed", [False, True])
def test_tar_sources_read_regular_members_and_refuse_unsafe_ones(tmp_path, compressed):
    archive = tmp_path / ("night.tar.gz" if compressed else "night.tar")
    hostile_tar(archive, compressed)
    source = one_source(tmp_path, archive.name).sources[0]
    listing = list_source(source)
    assert listing.members == sorted(f"cam1/{p.name}" for p in QUERY_IMAGES[:3])
    reasons = dict(listing.rejected)
    assert reasons["../escape.jpg"] == "member name contains '..'"
    assert reasons["/etc/abs.jpg"] == "absolute member name"
    assert "link" in reasons["cam1/link.jpg"] and "link" in reasons["cam1/hard.jpg"]
    assert "device" in reasons["cam1/dev.jpg"] and "FIFO" in reasons["cam1/fifo.jpg"]
    read = list(read_members(source, listing.members[::-1] + ["cam1/link.jpg", "cam1/missing.jpg"]))
    by_member = {m: (d, e) for m, d, e in read}
    assert by_member[f"cam1/{QUERY_IMAGES[1].name}"][0] == QUERY_IMAGES[1].read_bytes()
    assert "link" in by_member["cam1/link.jpg"][1]
    assert by_member["cam1/missing.jpg"][1] == "member not found in archive"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([archive.name, "night.toml"])  # nothing extracted


def test_zip_source_refuses_traversal_and_reads_members(tmp_path):
    archive = tmp_path / "night.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for image in QUERY_IMAGES[:2]:
            zf.write(image, f"c2/{image.name}")
        zf.writestr("../../outside.jpg", b"evil")
    source = one_source(tmp_path, archive.name).sources[0]
    listing = list_source(source)
    assert listing.members == sorted(f"c2/{p.name}" for p in QUERY_IMAGES[:2])
    assert listing.rejected == [("../../outside.jpg", "member name contains '..'")]
    (member, data, err), = read_members(source, listing.members[:1])
    assert err is None and data == QUERY_IMAGES[0].read_bytes()


def test_fsspec_url_source(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    for image in QUERY_IMAGES[:2]:
        fs.pipe(f"/night/{image.name}", image.read_bytes())
    source = one_source(tmp_path, "memory://night").sources[0]
    listing = list_source(source)
    assert listing.members == sorted(p.name for p in QUERY_IMAGES[:2])
    assert [d for _, d, _ in read_members(source, listing.members)][0] == QUERY_IMAGES[0].read_bytes()


@pytest.mark.parametrize("uri", ["missing_folder", "missing.tar", "missing.zip"])
def test_missing_source_is_a_source_error(tmp_path, uri):
    with pytest.raises(SourceError, match="does not exist"):
        list_source(one_source(tmp_path, uri).sources[0])


def test_corrupt_archive_is_a_source_error(tmp_path):
    (tmp_path / "broken.zip").write_bytes(b"PK not really")
    with pytest.raises(SourceError, match="cannot read"):
        list_source(one_source(tmp_path, "broken.zip").sources[0])


@pytest.mark.parametrize("name, sizes", [("con-reid.toml", [212, 5295]), ("scenes.toml", [16])])
def test_shipped_manifests_validate_and_list_the_shared_data(name, sizes):
    from conftest import REPO

    manifest = load_manifest(REPO / "data_manifests" / name)
    assert [len(list_source(s).members) for s in manifest.sources] == sizes
    first = list_source(manifest.sources[0]).members[0]
    assert manifest.sources[0].camera_of(first) is not None


def test_timestamps_from_frame_numbers(tmp_path):
    """Recordings named by frame number (Market-1501's cCsS_FFFFFF at 25 frames/s) get times."""
    from datetime import timedelta

    from reidx.pipeline.manifest import load_manifest

    source = load_manifest(REPO / "data_manifests" / "scenes.toml").sources[0]
    assert source.timestamp_of("c1s1_001051.jpg") == datetime(2013, 1, 1, 8) + timedelta(seconds=1051 / 25)
    assert source.timestamp_of("c1s1_001051.jpg") < source.timestamp_of("c1s1_002301.jpg")
    assert source.timestamp_of("no-number.jpg") is None
