"""Several images of one person as one query: group the query persons, fuse what they find.

Why: one crop is one pose, one camera, one lighting; an investigator usually has several
pictures of the person (a folder per person, or the same id across cameras) and wants one answer
for all of them, as users of the ReID libraries ask for ("multi-query").

Groups (``group_by``, one or more keys joined by commas): ``person_id`` (the label from
Market-1501 naming or a manifest), ``camera``, ``folder`` (the image's parent folder: a folder
per person), ``input`` (the QUERY argument it came from: one query folder per person).
``person_id,camera`` is Market-1501's multi-query convention (the images of one id in one
camera). A query person whose key is missing (an unlabelled image under ``person_id``) stays a
group of its own.

Fusion (``fusion``):

- ``mean``: the mean of the members' unit vectors, renormalised, searched once (cheap; the
  usual multi-query baseline).
- ``min``: best-of — a gallery item's distance is its smallest distance to any member. Each
  member is searched for its own top-k and the lists are merged: exact, because an item in the
  fused top-k at distance d from member m has fewer than k items closer than d to m, so it is in
  m's own top-k.

The fused unit keeps every member's cameras and images, so ``exclude_same_camera`` and
``exclude_self`` apply to all of them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import PurePath

import numpy as np
import pyarrow as pa

GROUP_KEYS = ("person_id", "camera", "folder", "input")
FUSIONS = ("mean", "min")


def parse_group_by(text: str | None) -> tuple[str, ...]:
    """``"person_id,camera"`` → ("person_id", "camera"); unknown keys are an error naming the known ones."""
    if not text:
        return ()
    keys = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [key for key in keys if key not in GROUP_KEYS]
    if unknown or not keys:
        raise ValueError(f"--group-by {text!r}: unknown key(s) {unknown}; use one or more of "
                         f"{', '.join(GROUP_KEYS)} joined by commas")
    return keys


@dataclass
class QueryUnits:
    """What is searched: one unit per query person, or one per group of them."""

    members: list[np.ndarray]  # rows of the query-persons table in each unit
    keys: list[str | None]  # the group's key as text ("person_id=1,camera=3"); None without grouping
    ids: list[str]  # the unit's query_id: the person's detection id, or "g-" + a digest of the members'

    def __len__(self) -> int:
        return len(self.members)


def _key_values(table: pa.Table, paths: list[str], key: str) -> list:
    if key in ("person_id", "camera"):
        return table[key].to_pylist()
    if key == "folder":
        return [str(PurePath(path.split("::")[-1]).parent) if "::" in path else str(PurePath(path).parent)
                for path in paths]
    return table["source"].to_pylist()  # input: the query source (one per QUERY argument)


def group_units(table: pa.Table, paths: list[str], group_by: tuple[str, ...]) -> QueryUnits:
    """Query persons → units, in the order each group's first member appears."""
    detection_ids = table["detection_id"].to_pylist()
    if not group_by:
        return QueryUnits([np.array([row]) for row in range(table.num_rows)], [None] * table.num_rows, detection_ids)
    columns = [_key_values(table, paths, key) for key in group_by]
    missing = object()  # a member without a key value is a group of its own
    groups: dict[tuple, list[int]] = {}
    for row in range(table.num_rows):
        values = tuple(column[row] for column in columns)
        groups.setdefault(values if None not in values else (missing, row), []).append(row)
    members, keys, ids = [], [], []
    for values, rows in groups.items():
        members.append(np.array(rows))
        keys.append(None if values[0] is missing else ",".join(f"{k}={v}" for k, v in zip(group_by, values)))
        digest = hashlib.sha1("\n".join(sorted(detection_ids[r] for r in rows)).encode()).hexdigest()[:20]
        ids.append(detection_ids[rows[0]] if len(rows) == 1 else f"g-{digest}")
    return QueryUnits(members, keys, ids)


def fuse_mean(vectors: np.ndarray, units: QueryUnits) -> np.ndarray:
    """One unit vector per unit: the members' mean, renormalised."""
    fused = np.stack([vectors[rows].mean(axis=0) for rows in units.members]).astype(np.float32)
    norms = np.linalg.norm(fused, axis=1, keepdims=True)
    return fused / np.maximum(norms, 1e-12)


def merge_min(distances: np.ndarray, ids: np.ndarray, units: QueryUnits, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Members' (distances, ids) (P, k') → each unit's top-k by the smallest distance to any member."""
    out_d = np.full((len(units), k), np.inf, np.float32)
    out_i = np.full((len(units), k), -1, np.int64)
    for unit, rows in enumerate(units.members):
        found, dist = ids[rows].ravel(), distances[rows].ravel()
        valid = found >= 0
        found, dist = found[valid], dist[valid]
        order = np.lexsort((found, dist))  # by distance, ties by id: deterministic
        found, dist = found[order], dist[order]
        _, first = np.unique(found, return_index=True)  # each item's best (first in distance order)
        first = np.sort(first)[:k]
        out_i[unit, :len(first)], out_d[unit, :len(first)] = found[first], dist[first]
    return out_d, out_i
