"""Fault injection: random SIGKILLs of the nightly job over a gallery full of bad inputs.

Each trial starts `reidx nightly` (index, then build-index) on an empty gallery whose manifest
holds good crops and bad inputs of every kind the operations issue lists, kills it at a random
moment — the driver, one Dask worker, or the whole process group — and reruns it to the end.
The gallery must then equal an uninterrupted run's: the same detection ids, none twice, no
orphan shard, the same latest ledger outcome per image (every bad input recorded with its
reason), the same number of indexed detections, and `reidx verify` clean.

Prints one JSON object: kills, survived, bad_inputs, recorded, and each trial. Resumable: the
trials already done are kept in WORKDIR/state.json and a rerun goes on from there.

    python benchmarks/faults.py --workdir /tmp/reidx-faults --trials 24
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("REIDX_SHARED", REPO.parent / "shared"))
ENV = {**os.environ, "REIDX_MODEL_DIR": str(SHARED / "models")}


def make_inputs(root: Path) -> tuple[Path, dict]:
    """Good crops and one bad input of each kind; returns the manifest and {image key: what is bad}."""
    from PIL import Image

    crops = sorted((SHARED / "data" / "con-reid" / "query").glob("*.jpg"))[:40]
    good = root / "good"
    good.mkdir(parents=True)
    for path in crops:
        shutil.copy(path, good)
    bad = {}

    def add(name, data, why):
        (good / name).write_bytes(data)
        bad[f"cams/{name}"] = why

    sample = crops[0].read_bytes()
    add("0001_c1_empty.jpg", b"", "empty file")
    add("0001_c1_truncated.jpg", sample[:300], "truncated JPEG")
    add("0001_c1_text.jpg", b"not an image at all", "text named .jpg")
    add("0001_c1_eps.jpg", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", "EPS (Ghostscript)")
    add("99999999999999999999_c1s1_000002.jpg", sample, "label larger than int64")
    buffer = io.BytesIO()
    Image.new("RGB", (8000, 8000)).save(buffer, "PNG")
    add("0001_c1_huge.png", buffer.getvalue(), "over the pixel cap")
    os.symlink("/etc/passwd", good / "0001_c1_link.jpg")
    bad["cams/0001_c1_link.jpg"] = "symlink leaving the source"

    archive = root / "night.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for path in crops[:5]:
            z.write(path, path.name)
        with __import__("warnings").catch_warnings():
            __import__("warnings").simplefilter("ignore")
            z.writestr(crops[5].name, crops[5].read_bytes())
            z.writestr(crops[5].name, crops[6].read_bytes())  # the same name twice
    bad[f"zipped/{crops[5].name}"] = "duplicate member name"

    tgz = root / "broken.tar.gz"
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        for path in crops[7:10]:
            tar.add(path, arcname=path.name)
    data = bytearray(raw.getvalue())
    data[len(data) // 2:len(data) // 2 + 64] = os.urandom(64)
    tgz.write_bytes(bytes(data))

    frames = root / "frames"
    frames.mkdir()
    Image.new("RGB", (5000, 1), (90, 90, 90)).save(frames / "c1s1_000001.jpg")  # letterboxed to width 0 before
    bad["frames/c1s1_000001.jpg"] = "a 5000×1 frame through the detector (must be processed, not crash)"
    empty = root / "empty"
    empty.mkdir()
    manifest = root / "night.toml"
    manifest.write_text(f"""
[[source]]
name = "cams"
uri = "{good}"
kind = "crops"
labels = {{ person_id = '^(-?\\d+)_c' }}
[[source]]
name = "zipped"
uri = "{archive}"
kind = "crops"
[[source]]
name = "tarball"
uri = "{tgz}"
kind = "crops"
[[source]]
name = "frames"
uri = "{frames}"
kind = "frames"
[[source]]
name = "unmounted"
uri = "{root / 'not-there'}"
kind = "crops"
[[source]]
name = "blank"
uri = "{empty}"
kind = "crops"
[[source]]
name = "remote"
uri = "nosuchproto://host/cams"
kind = "crops"
""")
    bad.update({"unmounted/": "missing source", "blank/": "source with no images", "remote/": "unknown protocol",
                "tarball/": "corrupt gzip mid-stream (recorded on the source or its members)"})
    return manifest, bad


def nightly(manifest: Path, gallery: Path, wait: bool = True):
    command = [sys.executable, "-m", "reidx.cli", "nightly", str(manifest), "--out", str(gallery), "--task-size", "4",
               "--workers", "2", "--max-pixels", "20000000", "--json"]
    if wait:
        return subprocess.run(command, env=ENV, cwd=REPO, capture_output=True, text=True)
    return subprocess.Popen(command, env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def state_of(gallery: Path) -> dict:
    """What must equal an uninterrupted run's."""
    import pyarrow.parquet as pq

    from reidx.pipeline.ledger import latest, read_ledger

    named = {s for s in read_ledger(gallery)["shard"].to_pylist() if s}
    files = {p.name for p in (gallery / "shards").glob("part-*.parquet")}
    ids = [i for p in sorted(files)
           for i in pq.read_table(gallery / "shards" / p, columns=["detection_id"])["detection_id"].to_pylist()]
    table = latest(gallery)
    outcomes = {k: (s if s != "failed" else "failed:" + (r or "").split(":")[0])
                for k, s, r in zip(*(table[c].to_pylist() for c in ("image_key", "status", "reason")))}
    meta = json.loads((gallery / "index" / (gallery / "index" / "CURRENT").read_text().strip() / "meta.json")
                      .read_text()) if (gallery / "index" / "CURRENT").exists() else {}
    verify = subprocess.run([sys.executable, "-m", "reidx.cli", "verify", str(gallery)], env=ENV, cwd=REPO,
                            capture_output=True, text=True)
    return {"ids": sorted(ids), "duplicates": len(ids) - len(set(ids)), "orphans": sorted(files - named),
            "outcomes": outcomes, "indexed": meta.get("count"), "verify_clean": verify.returncode == 0}


def children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in found] + [g for c in found for g in children(int(c))]


def trial(number: int, manifest: Path, root: Path, reference: dict, seconds: float, rng: random.Random) -> dict:
    gallery = root / f"trial-{number}"
    shutil.rmtree(gallery, ignore_errors=True)
    target = rng.choice(["driver", "worker", "group"])
    delay = rng.uniform(0.5, seconds)
    job = nightly(manifest, gallery, wait=False)
    time.sleep(delay)
    killed = job.poll() is None
    if killed:
        if target == "driver":
            os.kill(job.pid, signal.SIGKILL)
        elif target == "group":
            os.killpg(job.pid, signal.SIGKILL)
        else:
            workers = [p for p in children(job.pid)]
            if workers:
                os.kill(rng.choice(workers), signal.SIGKILL)
            else:
                killed = False
    job.wait()
    if target != "group":  # an orphaned worker tree dies with its group
        try:
            os.killpg(job.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    rerun = nightly(manifest, gallery)
    got = state_of(gallery)
    same = {k: got[k] == reference[k] for k in ("ids", "outcomes", "indexed")}
    result = {"trial": number, "target": target, "after_s": round(delay, 2), "killed": killed,
              "rerun_exit": rerun.returncode, "duplicates": got["duplicates"], "orphans": len(got["orphans"]),
              "verify_clean": got["verify_clean"], **{f"same_{k}": v for k, v in same.items()}}
    result["survived"] = bool(all(same.values()) and not got["duplicates"] and not got["orphans"]
                              and got["verify_clean"] and rerun.returncode == reference["exit"])
    shutil.rmtree(gallery, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/reidx-faults")
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root = Path(args.workdir)
    state_file = root / "state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    if "reference" not in state:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        manifest, bad = make_inputs(root)
        started = time.perf_counter()
        run = nightly(manifest, root / "reference")
        reference = state_of(root / "reference")
        reference["exit"] = run.returncode
        state = {"reference": reference, "reference_s": round(time.perf_counter() - started, 1), "bad": bad,
                 "trials": []}
        state_file.write_text(json.dumps(state))
    manifest = root / "night.toml"
    rng = random.Random(args.seed)
    for _ in state["trials"]:  # the same random draws as an uninterrupted series
        rng.choice(["driver", "worker", "group"]), rng.uniform(0.5, state["reference_s"])
    while len(state["trials"]) < args.trials:
        state["trials"].append(trial(len(state["trials"]), manifest, root, state["reference"],
                                     state["reference_s"], rng))
        state_file.write_text(json.dumps(state))
        print(json.dumps(state["trials"][-1]), file=sys.stderr)
    reference, bad = state["reference"], state["bad"]
    def outcome(key):  # a source's failure may be recorded on the source or on its members
        if key in reference["outcomes"]:
            return reference["outcomes"][key]
        found = [v for k, v in reference["outcomes"].items() if k.startswith(key) and v != "ok"]
        return found[0] if found else None
    recorded = {k: outcome(k) for k in bad}
    trials = state["trials"]
    print(json.dumps({
        "benchmark": "faults", "trials": len(trials), "kills": sum(t["killed"] for t in trials),
        "survived": sum(t["survived"] for t in trials), "by_target": {t: sum(1 for x in trials if x["target"] == t)
                                                                    for t in ("driver", "worker", "group")},
        "reference_run_s": state["reference_s"], "reference_exit": reference["exit"],
        "reference_detections": len(reference["ids"]), "bad_inputs": len(bad),
        "recorded": sum(1 for k, v in recorded.items() if v and (v != "ok" or k.startswith("frames/"))),
        "bad_input_outcomes": {k: f"{bad[k]} -> {v}" for k, v in recorded.items()},
        "failed_trials": [t for t in trials if not t["survived"]],
    }, indent=1))


if __name__ == "__main__":
    main()
