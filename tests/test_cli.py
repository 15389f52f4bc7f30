"""The reidx command line as a user runs it: real files; real processes for --help, the errors and
the acceptance command, click's runner in this process where the output, not the process, is
tested (a `reidx` process costs ~5 s of imports here, most of these tests' time)."""

import json
import os
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from conftest import CON_REID, MODELS

COMMANDS = ["embed", "evaluate"]


def reidx(*args, env_extra=None):
    env = {**os.environ, "REIDX_MODEL_DIR": str(MODELS), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "reidx.cli", *args], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(__file__)))


def reidx_here(*args):
    """`reidx ARGS` through click's runner in this process: the same code, exit status and streams."""
    from click.testing import CliRunner

    from reidx.cli import main

    result = CliRunner().invoke(main, list(args))
    return subprocess.CompletedProcess(["reidx", *args], result.exit_code, result.stdout, result.stderr)


@pytest.fixture(scope="module")
def small_split(tmp_path_factory):
    """Two identities' query and gallery crops copied from Con-ReID, plus a corrupt gallery file."""
    root = tmp_path_factory.mktemp("split")
    for side, source in (("query", "query"), ("gallery", "bounding_box_test")):
        (root / side).mkdir()
        for path in sorted((CON_REID / source).iterdir()):
            if path.name.startswith(("0001_", "0004_", "0015_")):
                shutil.copy(path, root / side)
    real = sorted((CON_REID / "query").iterdir())[0].read_bytes()
    (root / "gallery" / "0004_c9s1_000000_99.jpg").write_bytes(real[: len(real) // 2])  # truncated JPEG
    return root


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help(command):
    result = reidx(*([command] if command else []), "--help")
    assert result.returncode == 0 and "Usage:" in result.stdout


def test_embed_writes_one_row_per_image_with_labels_and_errors(small_split, tmp_path):
    out = tmp_path / "gallery.parquet"
    result = reidx_here("embed", str(small_split / "gallery"), "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    table = pq.read_table(out)
    images = sorted(p.name for p in (small_split / "gallery").iterdir())
    assert report["images"] == table.num_rows == len(images)
    assert report["images_failed"] == 1 and report["embedder"].startswith("osnet_x0_25_msmt17@6f57607fed9f")
    assert table.column_names == ["path", "person_id", "camera", "embedding", "error"]
    embedding_type = table.schema.field("embedding").type
    assert embedding_type.list_size == 512 and str(embedding_type.value_type) == "float"
    rows = {os.path.basename(p): (pid, cam, emb, err) for p, pid, cam, emb, err in zip(*table.to_pydict().values())}
    pid, cam, emb, err = rows["0004_c9s1_000000_99.jpg"]
    assert (pid, cam, emb) == (4, "9", None) and "corrupt" in err
    assert table.schema.metadata[b"reidx.weights_sha256"].startswith(b"6f57607fed9f")


def test_evaluate_json_from_images_equals_from_embedded_tables(small_split, tmp_path):
    from_images = reidx_here("evaluate", "-q", str(small_split / "query"), "-g", str(small_split / "gallery"), "--json")
    assert from_images.returncode == 0, from_images.stderr
    for side in ("query", "gallery"):
        assert reidx_here("embed", str(small_split / side), "-o", str(tmp_path / f"{side}.parquet")).returncode == 0
    from_tables = reidx_here("evaluate", "-q", str(tmp_path / "query.parquet"), "-g", str(tmp_path / "gallery.parquet"),
                        "--json")
    a, b = json.loads(from_images.stdout), json.loads(from_tables.stdout)
    for key in ("mAP", "rank1", "rank5", "rank10", "mINP", "queries", "gallery_items"):
        assert a[key] == b[key]
    assert a["images_failed"] == 1 and 0 < a["mAP"] <= 100


def test_evaluate_with_a_label_table(small_split, tmp_path):
    """Renamed files labelled by a CSV table give the same figures as Market naming."""
    renamed = tmp_path / "renamed"
    rows = ["path,person_id,camera"]
    for side in ("query", "gallery"):
        (renamed / side).mkdir(parents=True)
        for i, path in enumerate(sorted((small_split / side).iterdir())):
            pid, cam = path.name.split("_")[0], path.name.split("_")[1][1]
            shutil.copy(path, renamed / side / f"img{i:04d}.jpg")
            rows.append(f"{side}/img{i:04d}.jpg,{int(pid)},{cam}")
    (renamed / "labels.csv").write_text("\n".join(rows))
    labelled = reidx_here("evaluate", "-q", str(renamed / "query"), "-g", str(renamed / "gallery"),
                     "--labels", str(renamed / "labels.csv"), "--json")
    named = reidx_here("evaluate", "-q", str(small_split / "query"), "-g", str(small_split / "gallery"), "--json")
    assert labelled.returncode == 0, labelled.stderr
    assert json.loads(labelled.stdout)["mAP"] == json.loads(named.stdout)["mAP"]
    unlabelled = reidx_here("evaluate", "-q", str(renamed / "query"), "-g", str(renamed / "gallery"))
    assert unlabelled.returncode == 1 and "pass --labels" in unlabelled.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["evaluate", "-q", "/nonexistent", "-g", "/nonexistent"], "no such file or folder"),
        (["embed", str(CON_REID / "query"), "-o", "/tmp/x.parquet", "--weights", "osnet_x1_0_msmt17"],
         "not found. Looked in"),
        (["embed", str(CON_REID / "query"), "-o", "/tmp/x.parquet", "--weights", "nonsense"], "unknown model name"),
    ],
)
def test_user_errors_are_one_clear_line(args, message, tmp_path):
    result = reidx(*args, env_extra={"HOME": str(tmp_path)})
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr


def test_acceptance_command_on_the_real_split(reference):
    """The issue's acceptance command, verbatim, as a subprocess."""
    result = reidx("evaluate", "--query", str(CON_REID / "query"), "--gallery", str(CON_REID / "bounding_box_test"),
                   "--weights", "osnet_x0_25_market1501", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    expected = reference["osnet_x0_25_market1501.pth"]["plain_cosine"]
    assert set(report) >= {"mAP", "rank1", "rank5", "rank10", "mINP", "queries", "gallery_items"}
    assert report["mAP"] == pytest.approx(expected["mAP"], abs=0.10)
    assert report["rank1"] == pytest.approx(expected["rank1"], abs=0.50)
