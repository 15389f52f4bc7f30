"""The sample check of an index version: sampled items and their exact top-100, kept from night to night.

A build calibrates its search breadths (queries' nprobe, the graph rows' breadth) and measures
the kNN graph's recall against the exact neighbours of CHECK_SAMPLE sampled items. Computing
those neighbours is a pass over every stored vector, so a nightly that recomputed them would
cost O(N). Instead each version keeps its sample with its exact top-100 (``check-g<n>.npz``);
a nightly

- updates the kept items' top-100 from the new rows only (an old item's exact neighbours among
  old ∪ new are the best of its stored ones and its best among the new: O(new)),
- keeps the sample uniform over the grown gallery (reservoir: as many new members as a fresh
  uniform sample of the grown gallery holds, replacing old members chosen at random),
- and searches, exactly, only NEW_CHECK_SAMPLE sampled new items (the new members among them)
  against the whole store: one streamed read of the vectors with a few hundred queries, the one
  step of a nightly that still reads O(N) bytes (benchmarks/scale.py measures it).

Schema of ``check-g<n>.npz``: ``ids`` (m,) int64 ascending, ``truth_ids`` (m, TRUTH_K) int64 and
``truth_dist`` (m, TRUTH_K) float32 cosine distances, best first (-1 / inf past the gallery's size).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reidx.indexers.vector_store import VectorStore, exact_search

CHECK_SAMPLE = 1000  # sampled items for calibration and the graph drift check
TUNE_SAMPLE = 500  # other sampled items the graph breadth is tuned on (a full build)
NEW_CHECK_SAMPLE = 250  # new items a nightly tunes the new graph rows on (others join the check sample)
TRUTH_K = 100


def check_name(generation: int) -> str:
    return f"check-g{generation}.npz"


def sample_ids(count: int, seed, size: int = CHECK_SAMPLE) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(count, size=min(size, count), replace=False))


@dataclass
class CheckSample:
    ids: np.ndarray  # (m,) int64, ascending
    truth_ids: np.ndarray  # (m, TRUTH_K) int64, exact neighbours best first
    truth_dist: np.ndarray  # (m, TRUTH_K) float32 cosine distances

    def save(self, path: Path) -> None:
        """Written whole and fsynced (the version folder is published only after)."""
        import os

        with open(path, "wb") as f:
            np.savez(f, ids=self.ids, truth_ids=self.truth_ids, truth_dist=self.truth_dist)
            f.flush()
            os.fsync(f.fileno())

    def rows(self, picked: np.ndarray) -> "CheckSample":
        return CheckSample(self.ids[picked], self.truth_ids[picked], self.truth_dist[picked])

    @classmethod
    def load(cls, path: Path) -> "CheckSample":
        with np.load(path, allow_pickle=False) as data:
            return cls(data["ids"].astype(np.int64), data["truth_ids"].astype(np.int64),
                       data["truth_dist"].astype(np.float32))


def exact_check(store: VectorStore, ids: np.ndarray, k: int = TRUTH_K) -> CheckSample:
    """``ids`` with their exact top-k over the whole store (one streamed pass)."""
    distances, found = exact_search(store, store.get(ids), k)
    return CheckSample(np.asarray(ids, np.int64), found, distances)


def first_check(store: VectorStore, seed) -> tuple[CheckSample, CheckSample]:
    """(the check sample, the tuning sample) of a full build, disjoint, from one exact pass: the
    graph breadth is tuned on the second and the graph's recall measured on the first (measured
    on the sample it was tuned on, the smallest passing breadth reads high: 0.954 there against
    0.936 on fresh items, 7.5M). A gallery smaller than both samples uses all items for both."""
    ids = sample_ids(store.count, seed, CHECK_SAMPLE + TUNE_SAMPLE)
    both = exact_check(store, ids)
    if len(ids) < CHECK_SAMPLE + TUNE_SAMPLE:
        return both, both
    check = np.sort(np.random.default_rng(seed).choice(len(ids), CHECK_SAMPLE, replace=False))
    tune = np.setdiff1d(np.arange(len(ids)), check)
    return both.rows(check), both.rows(tune)


def merge_top(a: CheckSample, b_dist: np.ndarray, b_ids: np.ndarray, k: int = TRUTH_K) -> CheckSample:
    """Per row, the k best of a's neighbours and (b_dist, b_ids) — ids disjoint — by distance,
    a's first among equals (the order one pass over the ids in ascending order gives)."""
    dist = np.concatenate([a.truth_dist, b_dist], axis=1)
    ids = np.concatenate([a.truth_ids, b_ids], axis=1)
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return CheckSample(a.ids, np.take_along_axis(ids, order, 1), np.take_along_axis(dist, order, 1))


def extend_check(store: VectorStore, old: CheckSample, old_count: int, seed) -> tuple[CheckSample, CheckSample]:
    """(the grown gallery's check sample, sampled new items to tune the new rows on) with exact
    top-100s, for a store that holds ``old_count`` items already checked by ``old`` and new ones
    past them. The new members of the check sample are not among the tuning items (unless the
    night added fewer items than both need)."""
    rng = np.random.default_rng(seed)
    total, new_count = store.count, store.count - old_count
    size = min(CHECK_SAMPLE, total)
    # how many new items a fresh uniform sample of the grown gallery holds (hypergeometric; drawn
    # this way because numpy's hypergeometric refuses populations of 10⁹ and more)
    joining = int((rng.choice(total, size, replace=False) >= old_count).sum()) if new_count else 0
    new = exact_check(store, old_count + sample_ids(new_count, rng, joining + NEW_CHECK_SAMPLE))
    staying = np.sort(rng.choice(len(old.ids), size - joining, replace=False))
    kept = old.rows(staying)
    if len(kept.ids) and new_count:
        dist, found = exact_search(store, store.get(kept.ids), TRUTH_K, start=old_count)
        kept = merge_top(kept, dist, found)
    shuffled = rng.permutation(len(new.ids))
    members, tune = np.sort(shuffled[:joining]), np.sort(shuffled[joining:])
    check = CheckSample(*(np.concatenate([x, y[members]]) for x, y in
                          ((kept.ids, new.ids), (kept.truth_ids, new.truth_ids), (kept.truth_dist, new.truth_dist))))
    order = np.argsort(check.ids, kind="stable")
    return check.rows(order), new.rows(tune if len(tune) else members)
