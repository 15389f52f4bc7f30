"""Integrity of a gallery's files: checksums recorded at commit, checked on read and by ``reidx verify``.

A night's damage must never go unnoticed: a shard deleted by hand, 200 random bytes written
into one (found in an outside test: every command succeeded and 96 of 100 queries got the
corrupted item at rank 1), a truncated ``index.faiss``. So:

- the worker records each shard's sha256 and row count in the ledger as it commits it;
- readers (``build-index``, ``export``) check a shard against that record before using it, and
  refuse non-finite or non-unit embeddings whatever the record says;
- each index version records its files' sizes and sha256 in ``meta.json``;
- :func:`verify_gallery` checks everything and :func:`repair_gallery` sends exactly the affected
  images back to work (ledger rows ``requeued``), moving damaged files to ``GALLERY/quarantine/``
  — nothing is deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from reidx.pipeline.gallery import index_dir, ledger_dir, shards_dir

QUARANTINE_DIR = "quarantine"
UNIT_TOLERANCE = 1e-3  # |‖v‖ − 1|: float32 rounding of a normalised vector stays far below this


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def embedding_problem(vectors: np.ndarray) -> str | None:
    """Why these rows are not usable unit embeddings (None when they are)."""
    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():
        return f"{int((~finite).sum())} embeddings hold NaN or infinite values"
    norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64))
    off = np.abs(norms - 1.0) > UNIT_TOLERANCE
    if off.any():
        return f"{int(off.sum())} embeddings are not unit length (norms up to {norms.max():.3g})"
    return None


def shard_problem(path: Path, sha256: str | None = None, rows: int | None = None) -> str | None:
    """Why a committed shard cannot be used (None when it can): missing, changed, unreadable, bad vectors.
    One read of the file serves the checksum and the parse; only the embedding column is decoded
    (float16 through Faiss' decoder): 3.3× faster than reading the whole table on a 50k-row shard
    (median of 3, same process, beside a 5M build)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from reidx.pipeline.embedding_table import embeddings_to_numpy

    if not path.is_file():
        return "missing"
    data = path.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        return "checksum mismatch: the file changed or is damaged since it was committed"
    try:
        parquet = pq.ParquetFile(pa.BufferReader(data))
        vectors = embeddings_to_numpy(parquet.read(columns=["embedding"]).column("embedding"))
    except Exception as exc:  # noqa: BLE001 - any parse failure is the file's damage
        return f"unreadable: {str(exc).splitlines()[0]}"
    if rows is not None and parquet.metadata.num_rows != rows:
        return f"holds {parquet.metadata.num_rows} rows, the ledger recorded {rows}"
    return embedding_problem(vectors)


def damaged_shards(gallery: str | os.PathLike, names: list[str] | None = None) -> dict[str, str]:
    """{shard name: what is wrong} for the committed shards (or the given ones, each against what
    the ledger recorded when it was committed)."""
    from reidx.pipeline.ledger import recorded_digests, shard_digests

    digests = shard_digests(gallery) if names is None else recorded_digests(gallery, names)
    damaged = {}
    for name in sorted(digests if names is None else names):
        sha256, rows = digests.get(name, (None, None))
        problem = shard_problem(shards_dir(gallery) / name, sha256, rows)
        if problem:
            damaged[name] = problem
    return damaged


def file_records(folder: Path, names: list[str], version: str, previous: Path | None = None,
                 previous_records: dict | None = None) -> dict[str, dict]:
    """{file: {size, sha256, written_by}}, written into an index version's meta.json (``file_records``).
    A file that is a hard link of the previous version's keeps that version's record (its bytes
    were hashed when written): a nightly hashes only what it wrote, O(new), not every file."""
    records = {}
    for name in names:
        path = folder / name
        old = (previous_records or {}).get(name)
        if old and previous is not None and _same_file(path, previous / name):
            records[name] = {"written_by": version, **old}
        else:
            records[name] = {"size": path.stat().st_size, "sha256": file_sha256(path), "written_by": version}
    return records


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def version_problem(folder: Path, own_files_only: bool = False) -> str | None:
    """Why an index version folder cannot be served (None when it can). Every file's size is
    checked; with ``own_files_only`` (a nightly checking the version it extends) only the files
    that version wrote are hashed, the ones it shares with older versions were hashed when those
    were checked (``reidx verify`` hashes every file)."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError) as exc:
        return f"meta.json unreadable: {exc}"
    for name, record in meta.get("file_records", {}).items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != record["size"]:
            return f"{name} has {path.stat().st_size} bytes, {record['size']} were written"
        if own_files_only and record.get("written_by") not in (None, meta.get("version")):
            continue
        if file_sha256(path) != record["sha256"]:
            return f"{name} changed since it was written (checksum mismatch)"
    return None


def verify_gallery(gallery: str | os.PathLike) -> dict:
    """Every check, nothing changed: ``{"shards_checked", "damaged_shards", "ledger_parts_unreadable", "index"}``."""
    import pyarrow.parquet as pq

    gallery = Path(gallery)
    unreadable = []
    for part in sorted(ledger_dir(gallery).glob("part-*.parquet")):
        try:
            pq.read_table(part)
        except Exception as exc:  # noqa: BLE001
            unreadable.append({"part": part.name, "reason": str(exc).splitlines()[0]})
    report = {"gallery": str(gallery), "ledger_parts_unreadable": unreadable}
    if unreadable:  # the ledger is the commit record: nothing else can be judged against it
        report.update(shards_checked=0, damaged_shards={}, index=None)
        return report
    from reidx.pipeline.ledger import shard_digests

    report["shards_checked"] = len(shard_digests(gallery))
    report["damaged_shards"] = damaged_shards(gallery)
    pointer = index_dir(gallery) / "CURRENT"
    if pointer.is_file():
        version = pointer.read_text().strip()
        folder = index_dir(gallery) / version
        problem = version_problem(folder) if folder.is_dir() else "the version folder is missing"
        report["index"] = {"version": version, "problem": problem}
    else:
        report["index"] = None
    return report


def is_clean(report: dict) -> bool:
    return not (report["ledger_parts_unreadable"] or report["damaged_shards"]
                or (report["index"] and report["index"]["problem"]))


def _quarantine(gallery: Path, path: Path) -> str:
    target = gallery / QUARANTINE_DIR / f"{time.strftime('%Y%m%dT%H%M%S')}-{path.name}"
    target.parent.mkdir(exist_ok=True)
    shutil.move(str(path), str(target))
    return str(target.relative_to(gallery))


def repair_gallery(gallery: str | os.PathLike, report: dict) -> dict:
    """Act on a :func:`verify_gallery` report (the caller holds the gallery lock).

    Damaged shards: their images' latest rows become ``requeued`` (the next ``reidx index``
    processes exactly them again) and the file moves to quarantine. Unreadable ledger parts
    move to quarantine (their images become new work; their shards, orphans, are removed by the
    next run's recovery). A damaged live index version moves to quarantine and ``CURRENT`` is
    removed, so the next ``reidx build-index`` builds afresh."""
    from reidx.pipeline.ledger import append, latest, ledger_rows

    gallery = Path(gallery)
    actions = {"quarantined": [], "images_requeued": 0, "index_removed": None}
    for part in report["ledger_parts_unreadable"]:
        actions["quarantined"].append(_quarantine(gallery, ledger_dir(gallery) / part["part"]))
    if report["damaged_shards"]:
        table = latest(gallery)
        rows = [{"image_key": key, "source": source, "member": member, "status": "requeued",
                 "reason": f"shard {shard} damaged: {report['damaged_shards'][shard]}"}
                for key, source, member, shard in zip(table["image_key"].to_pylist(), table["source"].to_pylist(),
                                                       table["member"].to_pylist(), table["shard"].to_pylist())
                if shard in report["damaged_shards"]]
        append(gallery, ledger_rows(rows))
        actions["images_requeued"] = len(rows)
        for shard in report["damaged_shards"]:
            if (shards_dir(gallery) / shard).exists():
                actions["quarantined"].append(_quarantine(gallery, shards_dir(gallery) / shard))
    if report["index"] and report["index"]["problem"]:
        folder = index_dir(gallery) / report["index"]["version"]
        (index_dir(gallery) / "CURRENT").unlink(missing_ok=True)
        if folder.is_dir():
            actions["quarantined"].append(_quarantine(gallery, folder))
        actions["index_removed"] = report["index"]["version"]
    return actions
