"""What a Dask worker process does with one task: the persons of a batch of images, or of one video
segment, written as one shard (durably, before the driver commits the task's ledger rows).

The stages themselves are :func:`reidx.pipeline.persons.persons_of_members` and
:func:`reidx.pipeline.video_persons.persons_of_video_segment`; this module only adds the writes,
so the distribution (Dask, here) stays apart from the stage code.
"""

from __future__ import annotations

import time

from reidx.pipeline.gallery import shards_dir
from reidx.pipeline.integrity import file_sha256
from reidx.pipeline.manifest import Source
from reidx.pipeline.persons import ModelSpec, persons_of_members
from reidx.pipeline.shards import image_key, write_shard


def _write(gallery: str, table, records: list[dict], seconds: dict) -> None:
    """Write a shard durably and name it (with its digest and rows) in the records that have persons."""
    clock = time.perf_counter()
    shard = write_shard(table, gallery)
    # the bytes as committed: readers and `reidx verify` check the file against them
    digest = file_sha256(shards_dir(gallery) / shard)
    seconds["write"] += time.perf_counter() - clock
    for record in records:
        if record.get("num_persons"):
            record.update(shard=shard, shard_sha256=digest, shard_rows=table.num_rows)


def process_batch(gallery: str, source: Source, members: list[str], spec: ModelSpec) -> dict:
    """Process images of one source (shard written durably first).

    Returns ``{"records": one ledger record per image, "seconds": time per stage}``.
    """
    persons = persons_of_members(source, members, spec)
    if persons.table is not None:
        _write(gallery, persons.table, persons.records, persons.seconds)
    return {"records": persons.records, "seconds": persons.seconds}


def _worker_address() -> str | None:
    """This Dask worker's address (the driver sends the video's next segment here), None outside Dask."""
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return None


def process_video_segment(gallery: str, source: Source, member: str, first_frame: int, tracks_state: str | None,
                          fingerprint: str | None, spec: ModelSpec) -> dict:
    """One segment of a video: shard and tracker state written durably first, both named in its records.

    ``tracks_state``: the state file its predecessor committed (None for a video's first segment).
    Returns ``{"records", "seconds", "frames", "reopened", "worker"}``.
    """
    from reidx.pipeline.video_persons import persons_of_video_segment, read_tracks_state, write_tracks_state

    key = image_key(source.name, member)
    try:
        state = read_tracks_state(gallery, tracks_state) if tracks_state else None
    except (OSError, ValueError, KeyError) as exc:  # deleted or damaged by hand: this video stops, recorded
        record = {"image_key": f"{key}@{first_frame}", "source": source.name, "member": member, "status": "failed",
                  "reason": f"tracker state {tracks_state} of the previous segment unreadable: {exc}",
                  "fingerprint": fingerprint, "frame_start": first_frame, "frame_stop": first_frame,
                  "video_end": True, "video": True}
        return {"records": [record], "seconds": {}, "frames": 0, "reopened": False, "worker": _worker_address()}
    persons = persons_of_video_segment(source, member, first_frame, state, spec, fingerprint)
    if persons.table is not None:
        _write(gallery, persons.table, persons.records[:1], persons.seconds)
    if persons.tracker_state is not None:
        clock = time.perf_counter()
        persons.records[0]["tracks_state"] = write_tracks_state(gallery, key, persons.records[0],
                                                                persons.tracker_state)
        persons.seconds["write"] += time.perf_counter() - clock
    return {"records": persons.records, "seconds": persons.seconds, "frames": persons.frames,
            "reopened": persons.reopened, "worker": _worker_address()}
