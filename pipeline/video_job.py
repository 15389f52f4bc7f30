"""The driver's view of videos: which segment of each video comes next, read from the ledger.

A video is a chain of segments (:mod:`reidx.pipeline.video_persons`), each one ledger entry keyed
``<source>/<member>@<first frame>``. Walking a video's entries from frame 0 — each ``ok`` entry
says where the next segment starts (``frame_stop``) and names the tracker state it ends with —
finds the first segment not yet done and the state it must start from. The segments of one video
run one after the other (the tracker's state flows from each to the next); different videos and
image batches run side by side.

A segment is to do when the ledger has no entry for it, when its entry is ``requeued`` (its shard
went missing or was damaged), or when it ``failed`` and is retried (``--retry-failed``, or the
video's bytes changed since: a file still being uploaded). A video is done at an ``ok`` entry
with ``video_end`` or at a failure that is not retried. Within one run each segment is tried once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from reidx.pipeline.manifest import Source
from reidx.pipeline.shards import image_key
from reidx.pipeline.video_persons import segment_key

_COLUMNS = ("status", "frame_stop", "video_end", "tracks_state", "fingerprint")


def video_entries(latest) -> dict[str, dict]:
    """The latest ledger row of every video segment key (``...@<n>``), as dicts of the walk's columns."""
    keys = latest["image_key"].to_pylist() if latest.num_rows else []
    columns = [latest[c].to_pylist() for c in _COLUMNS] if latest.num_rows else []
    return {key: dict(zip(_COLUMNS, values)) for key, *values in zip(keys, *columns) if "@" in key}


@dataclass
class VideoChain:
    """One video of a source, as the driver schedules it: the next segment, then the next."""

    source: Source
    member: str
    fingerprint: str | None = None
    tried: set = field(default_factory=set)  # segment keys sent in this run

    @property
    def key(self) -> str:
        return image_key(self.source.name, self.member)

    def next_segment(self, entries: dict[str, dict], retry_failed: bool = False) -> tuple[int, str | None] | None:
        """``(first frame, tracker state file or None)`` of the segment to do next, or None when done."""
        frame, state, seen = 0, None, set()
        while frame not in seen:
            seen.add(frame)
            key = segment_key(self.key, frame)
            entry = entries.get(key)
            if entry is None or entry["status"] == "requeued":
                return self._todo(key, frame, state)
            if entry["status"] == "failed":
                was = entry["fingerprint"]
                changed = was is not None and self.fingerprint is not None and was != self.fingerprint
                return self._todo(key, frame, state) if retry_failed or changed else None
            if entry["video_end"] or entry["frame_stop"] is None:
                return None
            frame, state = entry["frame_stop"], entry["tracks_state"]
        return None  # a loop in the ledger (a segment ending where it began): nothing sensible to do

    def _todo(self, key: str, frame: int, state: str | None):
        if key in self.tried:  # tried in this run already (and failed again): done for tonight
            return None
        self.tried.add(key)
        return frame, state
