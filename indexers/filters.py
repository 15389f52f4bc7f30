"""Search filters investigators ask for — time window, cameras, not the query's own camera or
image, minimum detection score — applied inside the search, never after the top-k cut.

Why inside: filtering a cut list returns fewer than k rows, often none (a 1-in-6 camera subset
keeps about 17 of 100, a one-hour window of a month's footage about none). Here every query gets
its k best gallery items *among those that pass*.

How (measured in ``benchmarks/filtered_search.py``, figures in docs/query.md): the ids of the
gallery items that pass become a Faiss ``IDSelectorBitmap`` handed to the search
(``SearchParameters``/``SearchParametersIVF(sel=...)``), so Faiss skips the other items while it
scans. Exact for flat indexes. For IVF the result is the top-k among the allowed items of the
probed lists: the calibrated nprobe is divided by the fraction of items passing (the allowed
neighbours lie that much deeper), and a query left with fewer than k while more allowed items
exist is searched again with nprobe doubled (up to nlist), so a selective filter does not
silently return short lists.
The alternative, a widening search (ask for ~k / fraction passing, filter, double until k
pass), cost the same at 83 % passing and 2–80× more CPU for filters passing 17 % … 0.14 % of a
200,000-vector gallery (flat and IVF); it remains the path for GPU indexes, where Faiss takes no
selector, and for HNSW, and is kept selectable for the benchmark. On an in-memory CPU index
(flat, hnsw) the passing items are scored exactly (their vectors are in the index) where that
costs fewer distance computations than the widened search, or where the search left a query
short: a one-hour window then costs its few hundred items, not a graph walk k / fraction passing
deep, and a camera filter on an HNSW graph returns full, exact lists (see ``_widening_search``).

Per-query parts. ``exclude_same_camera`` depends on the query's camera(s): queries are grouped by
their camera set, one selector per group (at most one group per camera for single queries); a
query without a camera (a name that gives none) has nothing to exclude.
``exclude_self`` depends on the query's image: the gallery items of a query's own image are few
(one per detected person), so the search asks for k + that many and drops them — exact, and the
bulk query stays one batched search per group. The whole own image is excluded, not only the
query's box: the same person appears once in a frame, so the image's other detections are other
people anyway, and a query crop cut from a gallery frame does not match a gallery box exactly.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import asdict, dataclass
from datetime import datetime

import faiss
import numpy as np
import pyarrow as pa

from reidx.indexers.faiss_ops import HNSW_M, IN_MEMORY_TYPES

MECHANISMS = ("selector", "widen")


@dataclass(frozen=True)
class SearchFilter:
    """What a gallery item must satisfy to be returned (all given conditions together).

    ``since``/``until``: inclusive, naive times like the gallery's (an item without a timestamp
    fails a time window: it cannot be shown to be inside it). ``cameras``: allowed cameras as
    strings. ``min_score``: detection score ≥ this (crop sources have 1.0).
    """

    since: datetime | None = None
    until: datetime | None = None
    cameras: tuple[str, ...] = ()
    exclude_same_camera: bool = False
    exclude_self: bool = False
    min_score: float | None = None

    def __post_init__(self):
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None and value.tzinfo is not None:
                raise ValueError(f"--{name} {value.isoformat()}: gallery times carry no time zone; give the "
                                 f"cameras' local time without an offset")
        if self.since and self.until and self.since > self.until:
            raise ValueError(f"--since {self.since} is after --until {self.until}")
        object.__setattr__(self, "cameras", tuple(str(c) for c in self.cameras))

    @property
    def active(self) -> bool:
        return self != SearchFilter()

    @property
    def per_item(self) -> bool:
        """Conditions that are the same for every query."""
        return bool(self.since or self.until or self.cameras or self.min_score is not None)

    def describe(self) -> dict:
        """JSON-ready form (results metadata, summaries)."""
        out = {k: v for k, v in asdict(self).items() if v not in (None, (), False)}
        for key in ("since", "until"):
            if key in out:
                out[key] = out[key].isoformat()
        if "cameras" in out:
            out["cameras"] = list(out["cameras"])
        return out


def parse_time(text: str | None, option: str) -> datetime | None:
    """``--since``/``--until`` text (ISO 8601: ``2024-05-01``, ``2024-05-01T08:30``) → datetime."""
    if text is None:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{option} {text!r} is not a date or time like 2024-05-01T08:30:00") from None


def item_mask(items: pa.Table, search_filter: SearchFilter) -> np.ndarray:
    """(N,) bool: the gallery items passing the per-item conditions."""
    mask = np.ones(items.num_rows, bool)
    if search_filter.since or search_filter.until:
        times = items["timestamp"].cast(pa.timestamp("ms")).to_numpy(zero_copy_only=False)
        mask &= ~np.isnat(times)
        if search_filter.since:
            mask &= times >= np.datetime64(search_filter.since, "ms")
        if search_filter.until:
            mask &= times <= np.datetime64(search_filter.until, "ms")
    if search_filter.cameras:
        mask &= camera_codes(items, search_filter.cameras)
    if search_filter.min_score is not None:
        mask &= items["score"].to_numpy(zero_copy_only=False) >= search_filter.min_score
    return mask


def camera_codes(items: pa.Table, cameras) -> np.ndarray:
    """(N,) bool: the item's camera is one of ``cameras`` (dictionary-encoded once, compared as codes)."""
    encoded = items["camera"].combine_chunks().dictionary_encode()
    names = encoded.dictionary.to_pylist()
    wanted = np.array([name in set(cameras) for name in names] + [False], bool)
    codes = encoded.indices.fill_null(len(names)).to_numpy(zero_copy_only=False)
    return wanted[codes]


def image_identity(uri: str, member: str, _roots: dict = {}) -> str:  # noqa: B006 - a per-process cache
    """One name per image file whatever the source that listed it: the real path of a local file,
    ``uri::member`` inside archives and at URLs (a query of a gallery image finds it again)."""
    from reidx.pipeline.sources import archive_type

    if "://" in uri or archive_type(uri):
        return f"{uri}::{member}"
    if uri not in _roots:
        import glob as _glob

        root = uri
        if _glob.has_magic(uri):  # members are relative to the pattern's fixed prefix (pipeline/sources.py)
            parts = []
            for part in uri.split(os.sep):
                if _glob.has_magic(part):
                    break
                parts.append(part)
            root = os.sep.join(parts) or os.sep
        elif os.path.isfile(uri):
            root = os.path.dirname(uri)
        _roots[uri] = os.path.realpath(root)
    return os.path.join(_roots[uri], member)


def self_items(items: pa.Table, images: set[str]) -> dict[str, np.ndarray]:
    """{image identity: gallery ids of that image's detections} for the given query images."""
    names = {image.rpartition("/")[2] for image in images}
    found: dict[str, list[int]] = defaultdict(list)
    uris = items["source_uri"].to_pylist()
    for row, member in enumerate(items["member"].to_pylist()):
        if member.rpartition("/")[2] in names:  # cheap pre-check before resolving the path
            identity = image_identity(uris[row], member)
            if identity in images:
                found[identity].append(row)
    return {key: np.array(rows, np.int64) for key, rows in found.items()}


def _scaled_nprobe(nprobe: int | None, allowed: int, total: int, nlist: int | None) -> int | None:
    """IVF lists to probe when only ``allowed`` of ``total`` items may be returned: the calibrated
    nprobe over the fraction passing (capped at nlist). The k-th allowed neighbour lies about
    total/allowed times deeper in the unfiltered ranking, so the calibrated nprobe alone lost recall:
    0.71 instead of 0.95 for a 1-in-6 camera filter (benchmarks/filtered_search.py)."""
    if nprobe is None or nlist is None or allowed >= total:
        return nprobe
    return int(min(nlist, np.ceil(nprobe * total / max(allowed, 1))))


def _selector_search(index: faiss.Index, vectors: np.ndarray, k: int, mask: np.ndarray | None,
                     nprobe: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k among ``mask`` by inner product with a bitmap selector; IVF: nprobe doubled for short lists."""
    ivf = faiss.try_extract_index_ivf(index) if hasattr(faiss, "try_extract_index_ivf") else None
    allowed = int(mask.sum()) if mask is not None else index.ntotal
    k = min(k, allowed)
    if k == 0:
        return np.full((len(vectors), 0), np.inf, np.float32), np.zeros((len(vectors), 0), np.int64)
    bits = np.packbits(mask, bitorder="little") if mask is not None else None
    selector = faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits)) if bits is not None else None
    probes = _scaled_nprobe(nprobe or (ivf.nprobe if ivf is not None else None), allowed, index.ntotal,
                            ivf.nlist if ivf is not None else None)
    distances = np.full((len(vectors), k), np.inf, np.float32)
    ids = np.full((len(vectors), k), -1, np.int64)
    todo = np.arange(len(vectors))
    while len(todo):
        if ivf is not None:
            params = faiss.SearchParametersIVF(sel=selector, nprobe=int(probes)) if selector is not None else \
                faiss.SearchParametersIVF(nprobe=int(probes))
        else:
            params = faiss.SearchParameters(sel=selector) if selector is not None else None
        sims, found = index.search(np.ascontiguousarray(vectors[todo], np.float32), k, params=params)
        distances[todo], ids[todo] = np.where(found >= 0, 1.0 - sims, np.inf), found
        short = (found < 0).any(axis=1)
        if ivf is None or not short.any() or probes >= ivf.nlist:
            break
        todo, probes = todo[short], min(ivf.nlist, probes * 2)
    del bits  # the selector reads it until here
    return distances, ids


def _widening_search(gallery_index, vectors: np.ndarray, k: int, mask: np.ndarray | None,
                     nprobe: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Ask for more than k, keep the allowed, double the depth for queries still short of k (and,
    for IVF, nprobe once the probed lists run out: a deeper list cannot reach other lists).

    An in-memory CPU index (flat, hnsw) holds every vector, so the passing items are scored
    exactly where that costs fewer distance computations than the widened search (flat: always;
    HNSW: a walk to depth d computes about d × 2M, its layer-0 degree), or where a query is still
    short after the walk (it does not reach far outside the query's neighbourhood: measured, 77 %
    of queries short of 100 with a 17 % camera filter even when widened to the whole gallery)."""
    total = gallery_index.count
    allowed = int(mask.sum()) if mask is not None else total
    k = min(k, allowed)
    distances = np.full((len(vectors), k), np.inf, np.float32)
    ids = np.full((len(vectors), k), -1, np.int64)
    if k == 0:
        return distances, ids
    in_memory = _vectors_in_memory(gallery_index)
    depth = min(total, int(np.ceil(k * total / allowed * 1.2)) + 8)
    walk = depth * 2 * HNSW_M if getattr(gallery_index.meta, "type", None) == "hnsw" else total
    if mask is not None and in_memory and allowed <= walk:
        return _exact_among(gallery_index.index, vectors, k, mask)
    nlist = getattr(gallery_index.meta, "nlist", None)
    probes = _scaled_nprobe(nprobe or gallery_index.meta.nprobe, allowed, total, nlist)
    todo = np.arange(len(vectors))
    while len(todo):
        dist, found = gallery_index.search(vectors[todo], depth, nprobe=probes)
        ok = found >= 0
        if mask is not None:
            ok &= mask[np.maximum(found, 0)]
        for row, query in enumerate(todo):
            keep = np.flatnonzero(ok[row])[:k]
            ids[query, :len(keep)], distances[query, :len(keep)] = found[row, keep], dist[row, keep]
        short = ok.sum(axis=1) < k
        if in_memory and short.any():
            todo = todo[short]
            distances[todo], ids[todo] = _exact_among(gallery_index.index, vectors[todo], k, mask)
            break
        ran_out = nlist and probes and probes < nlist and (found[short] < 0).any()
        if not short.any() or (depth >= total and not ran_out):
            break
        todo = todo[short]
        if ran_out:
            probes = min(nlist, probes * 2)
        else:
            depth = min(total, depth * 2)
    return distances, ids


def _vectors_in_memory(gallery_index) -> bool:
    """A CPU flat or HNSW index: it holds every vector, so any subset can be read back (ids = rows)."""
    return not getattr(gallery_index, "on_gpu", False) and getattr(gallery_index.meta, "type", None) in IN_MEMORY_TYPES


def _exact_among(index, vectors: np.ndarray, k: int, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k among the rows ``mask`` allows (all: None) as (cosine distances, ids), reading
    their vectors from the index."""
    allowed = np.flatnonzero(mask) if mask is not None else np.arange(index.ntotal)
    subset = index.reconstruct_batch(allowed)
    sims, rows = faiss.knn(np.ascontiguousarray(vectors, np.float32), subset, k, metric=faiss.METRIC_INNER_PRODUCT)
    ids = np.where(rows >= 0, allowed[np.maximum(rows, 0)], -1)
    return np.where(rows >= 0, 1.0 - sims, np.inf).astype(np.float32), ids


def filtered_search(gallery_index, vectors: np.ndarray, k: int, search_filter: SearchFilter,
                    query_cameras: list[frozenset], query_excluded: list[np.ndarray] | None = None, *,
                    nprobe: int | None = None, mechanism: str | None = None,
                    batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Each vector's top-k gallery items among those passing ``search_filter`` →
    (cosine distances, ids) (Q, k) in rank order; id -1 / distance inf where fewer pass.

    ``query_cameras[i]``: the camera(s) of query i (several for a fused group), for
    ``exclude_same_camera``. ``query_excluded[i]``: gallery ids query i must not return (its own
    image's detections for ``exclude_self``, see :func:`self_items`; any short per-query list): the
    search asks for k + their number and drops them, which is exact.
    ``mechanism``: ``selector`` (default on CPU) or ``widen`` (default for GPU and hnsw indexes).
    """
    # widening for GPU indexes (Faiss takes no selector there) and HNSW (a selector hides nodes from
    # the result, not from the graph walk, so efSearch would have to grow with 1 / fraction passing)
    mechanism = mechanism or ("widen" if getattr(gallery_index, "on_gpu", False)
                              or getattr(gallery_index.meta, "type", None) == "hnsw" else "selector")
    if mechanism not in MECHANISMS:
        raise ValueError(f"unknown filter mechanism {mechanism!r}; one of {MECHANISMS}")
    items = gallery_index.items
    k = min(k, gallery_index.count)
    base = item_mask(items, search_filter) if search_filter.per_item else None
    groups: dict[frozenset, list[int]] = defaultdict(list)
    for row, cameras in enumerate(query_cameras):
        groups[frozenset(cameras) if search_filter.exclude_same_camera else frozenset()].append(row)
    distances = np.full((len(vectors), k), np.inf, np.float32)
    ids = np.full((len(vectors), k), -1, np.int64)
    for cameras, rows in groups.items():
        mask = base
        if cameras:
            other = ~camera_codes(items, cameras)
            mask = other if mask is None else mask & other
        rows = np.array(rows)
        excluded = [np.asarray(query_excluded[r], np.int64) if query_excluded is not None else np.zeros(0, np.int64)
                    for r in rows]
        if mask is not None:
            excluded = [e[mask[e]] for e in excluded]
        for start in range(0, len(rows), batch_size):
            chunk, drop = rows[start:start + batch_size], excluded[start:start + batch_size]
            extra = max((len(e) for e in drop), default=0)
            if mechanism == "selector":
                dist, found = _selector_search(gallery_index.index, vectors[chunk], k + extra, mask,
                                               nprobe or gallery_index.meta.nprobe)
            else:
                dist, found = _widening_search(gallery_index, vectors[chunk], k + extra, mask, nprobe)
            for offset, query in enumerate(chunk):
                keep = found[offset] >= 0
                if len(drop[offset]):
                    keep &= ~np.isin(found[offset], drop[offset])
                keep = np.flatnonzero(keep)[:k]
                ids[query, :len(keep)], distances[query, :len(keep)] = found[offset, keep], dist[offset, keep]
    return distances, ids
