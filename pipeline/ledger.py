"""The ledger: which images a gallery has processed, with what outcome — the job's commit record.

``GALLERY/ledger/part-*.parquet``, append-only, each part written atomically. Schema (v3):

| column        | type                 | meaning                                              |
|---------------|----------------------|------------------------------------------------------|
| image_key     | string               | ``<source>/<member>`` (see :mod:`pipeline.shards`)    |
| source        | string               | manifest source name                                  |
| member        | string               | member path inside the source                         |
| status        | string               | ``ok``, ``failed`` or ``requeued`` (verify --repair)   |
| reason        | string, null         | why it failed (decode error, unsafe member, ...)      |
| num_persons   | int32                | persons written for this image (0 if none / failed)   |
| shard         | string, null         | shard file holding its rows (null when none)          |
| processed_at  | timestamp[ms, UTC]   | when the driver committed it                          |
| shard_sha256  | string, null         | sha256 of the shard file as written (verified on read) |
| shard_rows    | int32, null          | rows in that shard                                    |
| fingerprint   | string, null         | the image's bytes as listed (size, mtime / crc): a    |
|               |                      | failed image is retried when it changes               |
| frame_start   | int32, null          | video segments: first decoded frame index             |
| frame_stop    | int32, null          | video segments: the next segment starts at this frame |
| video_end     | bool, null           | video segments: the video ends (or broke) here        |
| tracks_state  | string, null         | video segments: tracker state after it, a file under  |
|               |                      | ``GALLERY/tracks/``                                   |

A video is one entry per *segment*, keyed ``<source>/<member>@<frame_start>`` (docs/video.md):
the next segment of a video starts at its predecessor's ``frame_stop`` with the tracker state
its predecessor committed. Version 1 parts (no shard_sha256, shard_rows, fingerprint) and
version 2 parts (no video columns) read with those columns null.
An image's *latest* row is its state: ``requeued`` (its shard was found damaged) and a failure
whose fingerprint changed send it back to work on the next night.

Commit protocol (exactly once across crashes): a worker writes a shard durably first; only then
does the driver append the ledger part naming the shard and its images. A crash between the
two leaves a shard no ledger row names: :func:`recover` deletes it (and temporary files), and
its images — absent from the ledger — are processed again. Images the ledger holds are skipped.
A video segment's tracker state file is written (atomically, under a fresh name) with its shard
and committed by the same ledger row; :func:`recover` removes state files no row names.
"""

from __future__ import annotations

import os
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reidx.pipeline.atomic import write_parquet_atomic
from reidx.pipeline.gallery import ledger_dir, shards_dir
from reidx.pipeline.shards import shard_files

LEDGER_SCHEMA = pa.schema(
    [
        pa.field("image_key", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("member", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("reason", pa.string()),
        pa.field("num_persons", pa.int32(), nullable=False),
        pa.field("shard", pa.string()),
        pa.field("processed_at", pa.timestamp("ms", tz="UTC"), nullable=False),
        pa.field("shard_sha256", pa.string()),
        pa.field("shard_rows", pa.int32()),
        pa.field("fingerprint", pa.string()),
        pa.field("frame_start", pa.int32()),
        pa.field("frame_stop", pa.int32()),
        pa.field("video_end", pa.bool_()),
        pa.field("tracks_state", pa.string()),
    ],
    metadata={"reidx.schema": "ledger", "reidx.schema_version": "3"},
)
TRACKS_DIR = "tracks"  # GALLERY/tracks/: video tracker states (the layout's other folders: pipeline/gallery.py)


def tracks_dir(gallery: str | os.PathLike) -> Path:
    return Path(gallery) / TRACKS_DIR


def _as_current(table: pa.Table) -> pa.Table:
    """A ledger part of any version in the current schema (columns added later read as null)."""
    for field in LEDGER_SCHEMA:
        if field.name not in table.column_names:
            table = table.append_column(field.name, pa.nulls(table.num_rows, field.type))
    return table.select(LEDGER_SCHEMA.names).cast(LEDGER_SCHEMA)


def ledger_rows(records: list[dict]) -> pa.Table:
    """Rows from dicts with the schema's keys; ``processed_at`` defaults to now."""
    now = datetime.now(timezone.utc)
    columns = {f.name: [r.get(f.name) for r in records] for f in LEDGER_SCHEMA}
    columns["processed_at"] = [r.get("processed_at") or now for r in records]
    columns["num_persons"] = [r.get("num_persons") or 0 for r in records]
    return pa.table(columns, schema=LEDGER_SCHEMA)


def append(gallery: str | os.PathLike, rows: pa.Table) -> Path | None:
    """Commit rows: one new ledger part, written atomically. Nothing is written for no rows."""
    if rows.num_rows == 0:
        return None
    return write_parquet_atomic(rows.cast(LEDGER_SCHEMA), ledger_dir(gallery) / f"part-{uuid.uuid4().hex}.parquet")


def read_ledger(gallery: str | os.PathLike) -> pa.Table:
    parts = sorted(ledger_dir(gallery).glob("part-*.parquet"))
    if not parts:
        return LEDGER_SCHEMA.empty_table()
    return pa.concat_tables([_as_current(pq.read_table(p)) for p in parts])


def latest(gallery: str | os.PathLike) -> pa.Table:
    """One row per image key: its most recent outcome (a missing source is recorded every night)."""
    import pyarrow.compute as pc

    table = read_ledger(gallery)
    if table.num_rows == 0:
        return table
    order = pc.sort_indices(table, sort_keys=[("processed_at", "ascending")])  # stable: ties keep part order
    keys = pc.dictionary_encode(  # hashed in Arrow, not Python; large_string: over 2 GiB of keys in one array
        table["image_key"].take(order).cast(pa.large_string()).combine_chunks(), null_encoding="encode")
    codes = keys.indices.to_numpy(zero_copy_only=False)
    last = np.full(len(keys.dictionary), -1, np.int64)
    np.maximum.at(last, codes, np.arange(len(codes)))  # each key's last row in time order
    return table.take(order.take(pa.array(np.sort(last))))


def ledger_counts(gallery: str | os.PathLike) -> dict:
    """What ``reidx ledger`` reports, in the index summary's words: ``images*`` count still images
    (and whole sources that failed), ``video_segments*`` a video's entries (rows with
    ``frame_start``: one per segment, plus a failed one where it broke), ``videos`` the videos they
    belong to and ``videos_failed`` those with a failed entry; ``persons`` all rows written."""
    table = latest(gallery)
    statuses, sources = table["status"].to_pylist(), table["source"].to_pylist()
    members, video = table["member"].to_pylist(), [v is not None for v in table["frame_start"].to_pylist()]
    images = [s for s, v in zip(statuses, video) if not v]
    segments = [(s, (k, m)) for s, k, m, v in zip(statuses, sources, members, video) if v]
    return {"images": len(images), "images_ok": images.count("ok"), "images_failed": images.count("failed"),
            "videos": len({m for _, m in segments}), "videos_failed": len({m for s, m in segments if s == "failed"}),
            "video_segments": len(segments), "video_segments_ok": sum(s == "ok" for s, _ in segments),
            "video_segments_failed": sum(s == "failed" for s, _ in segments),
            "persons": sum(table["num_persons"].to_pylist())}


def committed_shards(gallery: str | os.PathLike) -> list[str]:
    """Shard files the ledger names and that exist: only those are part of the gallery (others are
    crash leftovers). Read one part and one column at a time: the ledger has a row per image."""
    import pyarrow.compute as pc

    names: set[str] = set()
    for part in sorted(ledger_dir(gallery).glob("part-*.parquet")):
        column = pq.read_table(part, columns=["shard"])["shard"]
        names |= {s for s in pc.unique(column).to_pylist() if s}
    return sorted(n for n in names if (shards_dir(gallery) / n).exists())


def failed_keys_count(gallery: str | os.PathLike) -> int:
    """Images whose latest outcome is a failure (what ``--strict`` reports, earlier nights included)."""
    table = latest(gallery)
    members = table["member"].to_pylist()
    return sum(1 for status, member in zip(table["status"].to_pylist(), members) if status == "failed" and member)


def processed_keys(gallery: str | os.PathLike, retry_failed: bool = False) -> dict[str, str | None]:
    """Images the next night skips, each with the fingerprint it was processed at.

    An image is done when its latest row is ``ok`` or ``failed``; ``requeued`` images (damaged
    shard) are not, and with ``retry_failed`` neither are failures. The caller also retries a
    failure whose bytes changed since (its fingerprint differs).
    """
    table = latest(gallery)
    done = {}
    for key, status, fingerprint in zip(table["image_key"].to_pylist(), table["status"].to_pylist(),
                                        table["fingerprint"].to_pylist()):
        if status == "ok" or (status == "failed" and not retry_failed):
            done[key] = fingerprint if status == "failed" else None
    return done


def shard_digests(gallery: str | os.PathLike) -> dict[str, tuple[str | None, int | None]]:
    """The live shards — named by some image's latest ``ok`` row — with their recorded (sha256, rows);
    (None, None) where a version-1 ledger recorded none. A shard whose images were requeued is not live."""
    table = latest(gallery)
    return {name: (sha, rows) for name, status, sha, rows in zip(
        table["shard"].to_pylist(), table["status"].to_pylist(), table["shard_sha256"].to_pylist(),
        table["shard_rows"].to_pylist()) if name and status == "ok"}


def recorded_digests(gallery: str | os.PathLike, names: list[str]) -> dict[str, tuple[str | None, int | None]]:
    """(sha256, rows) the ledger recorded for each named shard when it was committed (every row
    naming a shard records the same pair; (None, None) from a version-1 ledger). Reads three
    columns, not the whole ledger: a nightly checks its new shards in O(new) + a column scan."""
    import pyarrow.compute as pc

    wanted = pa.array(sorted(set(names)), pa.string())
    found: dict[str, tuple[str | None, int | None]] = {}
    if not len(wanted):
        return found
    for part in sorted(ledger_dir(gallery).glob("part-*.parquet")):
        present = set(pq.read_schema(part).names)
        table = pq.read_table(part, columns=[c for c in ("shard", "shard_sha256", "shard_rows") if c in present])
        table = table.filter(pc.is_in(table["shard"], value_set=wanted))
        shas = table["shard_sha256"].to_pylist() if "shard_sha256" in present else [None] * table.num_rows
        rows = table["shard_rows"].to_pylist() if "shard_rows" in present else [None] * table.num_rows
        for name, sha, count in zip(table["shard"].to_pylist(), shas, rows):
            found.setdefault(name, (sha, count))
    return found


def recover(gallery: str | os.PathLike) -> dict:
    """Remove what a crashed run left: temporary files and shards no ledger row names.

    Must only run while this process holds the gallery's job lock.
    """
    gallery = Path(gallery)
    removed = {"temporary_files": 0, "orphan_shards": 0}
    for folder in (shards_dir(gallery), ledger_dir(gallery), tracks_dir(gallery)):
        for tmp in folder.glob(".*.tmp") if folder.is_dir() else []:
            tmp.unlink(missing_ok=True)
            removed["temporary_files"] += 1
    ledger = read_ledger(gallery)
    committed = {s for s in ledger["shard"].to_pylist() if s}
    for shard in shard_files(gallery):
        if shard.name not in committed:
            shard.unlink(missing_ok=True)
            removed["orphan_shards"] += 1
    states = {s for s in ledger["tracks_state"].to_pylist() if s}
    folder = tracks_dir(gallery)
    orphans = [p for p in folder.glob("*.json") if p.name not in states] if folder.is_dir() else []
    for state in orphans:  # written by a segment that was never committed
        state.unlink(missing_ok=True)
    if orphans:
        removed["orphan_tracks_states"] = len(orphans)
    return removed
