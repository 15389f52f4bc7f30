"""Building blocks of k-reciprocal and SIM re-ranking, on neighbour lists and sparse rows.

Everything here works on per-item neighbour lists (``(N, k)`` index tensors) and sparse rows
(``SparseRows``), never on N×N matrices, so the exact mode (``indexers.rerank``, which ranks
dense distance blocks) and a scalable mode (Faiss top-K plus a gallery kNN graph) can share
them. torch throughout: CPU, or CUDA when the tensors live there.

Tie rule: equal distances are ordered by item index (a stable sort), as in
``tests/rerank_oracle.py``, the loop-by-loop reference these are tested against.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch

# Budget (elements) for the temporary tensors of one chunk, so memory stays bounded at any size.
CHUNK_ELEMENTS = 1 << 24

# key(values, rows) → ranking keys; must be monotone non-decreasing in values within each row.
RowKey = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class SparseRows(NamedTuple):
    """Row-sorted COO rows of a (num_rows, num_cols) matrix: the papers' V vectors."""

    row: torch.Tensor  # (nnz,) long, non-decreasing
    col: torch.Tensor  # (nnz,) long
    value: torch.Tensor  # (nnz,) float
    num_rows: int
    num_cols: int

    def split(self, first_rows: int) -> tuple["SparseRows", "SparseRows"]:
        """Rows [0, first_rows) and the rest (renumbered from 0)."""
        first = self.row < first_rows
        return (SparseRows(self.row[first], self.col[first], self.value[first], first_rows, self.num_cols),
                SparseRows(self.row[~first] - first_rows, self.col[~first], self.value[~first],
                           self.num_rows - first_rows, self.num_cols))


def chunks(num_rows: int, elements_per_row: int):
    """Row slices whose temporaries hold about CHUNK_ELEMENTS elements."""
    step = max(1, CHUNK_ELEMENTS // max(1, elements_per_row))
    for start in range(0, num_rows, step):
        yield slice(start, min(num_rows, start + step))


def sort_rows(values: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's (value, index) pairs in ascending value order, equal values by index: the tie rule.

    ``values`` are float32 ≥ 0 (inf allowed), ``index`` in [-1, 2³² − 1). One int64 sort: the bits
    of a non-negative float32 order as the float does, so (bits << 32) | (index + 1) orders pairs
    as (value, index) do — 2-3× faster than a sort by index and a stable argsort by value.
    """
    bits = (values.float() + 0.0).view(torch.int32).long()  # + 0.0 turns -0.0 into +0.0
    packed = (bits << 32) | (index + 1)
    packed = packed.sort(dim=1).values
    values = (packed >> 32).int().view(torch.float32)
    return values, (packed & 0xFFFFFFFF) - 1


def nearest_neighbours(blocks: Sequence[torch.Tensor], k: int, key: RowKey | None = None) -> torch.Tensor:
    """(N, min(k, M)) column indices of each row's k smallest key(d), nearest first, ties by index.

    ``blocks`` are row-aligned matrices read side by side (views such as transposes are fine:
    nothing is concatenated). Each block gives its k+1 smallest; the union is put in (key,
    index) order. Any row whose k-th and (k+1)-th keys tie is re-sorted stably in full: that
    check also catches every case where an unselected entry would tie into the top k.
    """
    width = sum(block.shape[1] for block in blocks)
    k = min(k, width)
    values, index, offset = [], [], 0
    for block in blocks:
        # In row slabs: topk copies a strided (transposed) input, so memory stays one slab's worth.
        slabs = [torch.topk(block[rows], min(k + 1, block.shape[1]), dim=1, largest=False, sorted=False)
                 for rows in chunks(block.shape[0], block.shape[1] * 4)]
        values.append(torch.cat([slab.values for slab in slabs]))
        index.append(torch.cat([slab.indices for slab in slabs]) + offset)
        offset += block.shape[1]
    values, index = torch.cat(values, 1), torch.cat(index, 1)
    all_rows = torch.arange(values.shape[0], device=values.device)
    if key is not None:
        values = key(values, all_rows)
    values, index = sort_rows(values, index)
    neighbours = index[:, :k].contiguous()
    if k < values.shape[1]:
        tied = torch.nonzero(values[:, k - 1] == values[:, k]).squeeze(1)
        if tied.numel():
            full = torch.cat([block[tied] for block in blocks], 1)
            full = key(full, tied) if key is not None else full
            neighbours[tied] = full.argsort(dim=1, stable=True)[:, :k]
    return neighbours


def reciprocal_mask(neighbours: torch.Tensor, k: int, items: torch.Tensor | None = None) -> torch.Tensor:
    """mask[i, a]: item neighbours[i, a] has i among its own k+1 nearest (membership of R(i, k)).

    ``neighbours`` lists every item's nearest items (itself usually first) in one index space;
    ``items`` (default: all) are the rows wanted, so a caller pays only for the items it reads.
    """
    forward = neighbours[:, : k + 1]
    num = forward.shape[0] if items is None else items.numel()
    mask = torch.empty((num, forward.shape[1]), dtype=torch.bool, device=forward.device)
    for rows in chunks(num, forward.shape[1] ** 2):
        own = torch.arange(rows.start, rows.stop, device=forward.device) if items is None else items[rows]
        mask[rows] = (forward[forward[own]] == own[:, None, None]).any(-1)
    return mask


def expanded_reciprocal_sets(neighbours: torch.Tensor, k1: int, items: torch.Tensor | None = None) -> torch.Tensor:
    """Each item's R(i, k1) with the 2/3 expansion, as ascending rows padded with the sentinel N:
    R(c, round(k1/2)) of a member c joins when more than 2/3 of it lies in R(i, k1).

    ``items`` (default: all) are the items whose sets are wanted, one output row each; then only
    their lists, their members' lists and those members' half lists are read.
    """
    num_items = neighbours.shape[0]
    half = int(round(k1 / 2))
    forward, half_forward = neighbours[:, : k1 + 1], neighbours[:, : half + 1]
    is_reciprocal = reciprocal_mask(neighbours, k1, items)
    if items is None:
        half_sets = torch.where(reciprocal_mask(neighbours, half), half_forward, num_items)
    else:  # half sets of the listed members only
        listed = forward[items].unique()
        half_sets = torch.full_like(half_forward, num_items)
        half_sets[listed] = torch.where(reciprocal_mask(neighbours, half, listed), half_forward[listed], num_items)
    half_set_sizes = (half_sets < num_items).sum(1)
    width, half_width = forward.shape[1], half_forward.shape[1]
    num_out = num_items if items is None else items.numel()
    rows_out = []
    for rows in chunks(num_out, width * half_width * 4):
        own_forward = forward[rows] if items is None else forward[items[rows]]
        members = torch.where(is_reciprocal[rows], own_forward, num_items).sort(dim=1).values
        candidate_sets = half_sets[own_forward].flatten(1)  # (n, width·half_width), N where absent
        slot = torch.searchsorted(members, candidate_sets).clamp_(max=width - 1)
        found = (members.gather(1, slot) == candidate_sets) & (candidate_sets < num_items)
        inside = found.view(-1, width, half_width).sum(-1)
        size = half_set_sizes[own_forward]
        accepted = is_reciprocal[rows] & (3 * inside > 2 * size)  # exactly "inside > 2/3·size"
        extra = torch.where(accepted.repeat_interleave(half_width, dim=1), candidate_sets, num_items)
        joined = torch.cat([members, extra], dim=1).sort(dim=1).values
        keep = joined < num_items
        keep[:, 1:] &= joined[:, 1:] != joined[:, :-1]
        # Compact the kept (unique, ascending) entries to the left; the rest go to a spare column.
        slot = torch.where(keep, keep.cumsum(1) - 1, joined.shape[1])
        compact = torch.full((joined.shape[0], joined.shape[1] + 1), num_items, dtype=joined.dtype,
                             device=joined.device)
        rows_out.append(compact.scatter_(1, slot, joined)[:, :-1])
    sets = torch.cat(rows_out)
    width = int((sets < num_items).sum(1).max()) if sets.numel() else 0
    return sets[:, :width]


def gaussian_weights(members: torch.Tensor, num_cols: int,
                     pair_distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> SparseRows:
    """V(i, ·) = exp(−d(i, ·)) on i's members (entries < num_cols), normalised to sum 1.

    ``pair_distance(rows, cols)`` gives the distances of just those pairs.
    """
    valid = members < num_cols
    row = torch.arange(members.shape[0], device=members.device)[:, None].expand_as(members)[valid]
    col = members[valid]
    weight = torch.exp(-pair_distance(row, col))
    total = torch.zeros(members.shape[0], dtype=weight.dtype, device=weight.device).index_add_(0, row, weight)
    return SparseRows(row, col, weight / total[row], members.shape[0], num_cols)


def _segments(starts: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat positions of the ranges [start, start + length) and which range each came from."""
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
    first = torch.cumsum(lengths, 0) - lengths
    position = starts[segment] + torch.arange(segment.numel(), device=lengths.device) - first[segment]
    return position, segment


def local_query_expansion(vectors: SparseRows, neighbours: torch.Tensor) -> SparseRows:
    """Row i of the output: mean of V over the rows ``neighbours[i]`` (i's k2 nearest, itself
    usually first), so it may expand any subset of the items V holds."""
    counts = torch.bincount(vectors.row, minlength=vectors.num_rows)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    source = neighbours.reshape(-1)
    position, pair = _segments(offsets[source], counts[source])
    key = (pair // neighbours.shape[1]) * vectors.num_cols + vectors.col[position]
    unique_key, slot = torch.unique(key, sorted=True, return_inverse=True)
    summed = torch.zeros(unique_key.numel(), dtype=vectors.value.dtype, device=key.device)
    summed.index_add_(0, slot, vectors.value[position])
    return SparseRows(unique_key // vectors.num_cols, unique_key % vectors.num_cols,
                      summed / neighbours.shape[1], neighbours.shape[0], vectors.num_cols)


def jaccard_distance(query: SparseRows, gallery: SparseRows) -> torch.Tensor:
    """(Q, G) 1 − Σ min(V_q, V_g) / Σ max(V_q, V_g), through an inverted index over columns.

    Only pairs sharing a column cost anything; Σ max = Σ V_q + Σ V_g − Σ min.
    """
    device = query.value.device
    by_column = torch.argsort(gallery.col, stable=True)
    gallery_row, gallery_value = gallery.row[by_column], gallery.value[by_column]
    column_counts = torch.bincount(gallery.col, minlength=gallery.num_cols)
    column_start = torch.cumsum(column_counts, 0) - column_counts
    pairs_per_entry = column_counts[query.col]
    pairs_before = torch.cumsum(pairs_per_entry, 0)
    shared = torch.zeros(query.num_rows * gallery.num_rows, dtype=query.value.dtype, device=device)
    start = 0
    while start < query.col.numel():  # chunks of query entries with about CHUNK_ELEMENTS pairs
        limit = (pairs_before[start - 1] if start else pairs_before.new_zeros(())) + CHUNK_ELEMENTS
        stop = max(start + 1, int(torch.searchsorted(pairs_before, limit.reshape(1), right=True)))
        position, entry = _segments(column_start[query.col[start:stop]], pairs_per_entry[start:stop])
        overlap = torch.minimum(query.value[start:stop][entry], gallery_value[position])
        shared.index_add_(0, query.row[start:stop][entry] * gallery.num_rows + gallery_row[position], overlap)
        start = stop
    shared = shared.view(query.num_rows, gallery.num_rows)
    union = row_masses(query)[:, None] + row_masses(gallery)[None, :] - shared
    return 1 - shared / union.clamp_min(torch.finfo(union.dtype).tiny)  # two empty rows: distance 1


def row_masses(vectors: SparseRows) -> torch.Tensor:
    """Σ V(i, ·) of every row."""
    return torch.zeros(vectors.num_rows, dtype=vectors.value.dtype, device=vectors.value.device).index_add_(
        0, vectors.row, vectors.value)


def paired_jaccard_distance(left: SparseRows, left_rows: torch.Tensor, right: SparseRows,
                            right_rows: torch.Tensor) -> torch.Tensor:
    """(P,) Jaccard distances of the row pairs (left_rows[p], right_rows[p]) only, for callers
    that need a few pairs per query rather than every query-gallery pair (same formula as
    ``jaccard_distance``). Each left entry is looked up in the right rows by (row, column) key."""
    if left.num_cols != right.num_cols:
        raise ValueError("paired rows must share one column space")
    right_key = right.row * right.num_cols + right.col
    right_key, order = right_key.sort()
    right_value = right.value[order]
    counts = torch.bincount(left.row, minlength=left.num_rows)
    starts = torch.cumsum(counts, 0) - counts
    shared = torch.zeros(left_rows.numel(), dtype=left.value.dtype, device=left.value.device)
    pairs_per_row = max(1, int(counts.max())) if counts.numel() else 1
    for pairs in chunks(left_rows.numel(), pairs_per_row):
        position, pair = _segments(starts[left_rows[pairs]], counts[left_rows[pairs]])
        key = right_rows[pairs][pair] * right.num_cols + left.col[position]
        slot = torch.searchsorted(right_key, key).clamp_(max=max(right_key.numel() - 1, 0))
        found = right_key[slot] == key if right_key.numel() else torch.zeros_like(key, dtype=torch.bool)
        overlap = torch.where(found, torch.minimum(left.value[position], right_value[slot]), 0)
        shared[pairs] = torch.zeros_like(shared[pairs]).index_add_(0, pair, overlap)
    union = row_masses(left)[left_rows] + row_masses(right)[right_rows] - shared
    return 1 - shared / union.clamp_min(torch.finfo(union.dtype).tiny)  # two empty rows: distance 1


def mean_of_smallest(paths: np.ndarray, k: int) -> np.ndarray:
    """Mean of the k smallest along the last axis (SIM's path average), partitioning ``paths``
    in place. NumPy's partition beats torch.topk ~3× on rows this short; float64 sums of these
    float32 values are exact, so the mean rounds as NumPy's mean does."""
    if k < paths.shape[-1]:
        paths.partition(k - 1, axis=-1)
    return paths[..., :k].sum(axis=-1, dtype=np.float64) / k


class NormalisedSquares:
    """The published 'original' distance without building it: d², each row divided by its maximum.

    ``bands`` is a grid of blocks (views allowed): band b holds rows, its blocks sit side by
    side. The published code divides each column of its joint matrix and then transposes, so
    callers pass the transposed blocks (e.g. ``[[q_q.T, q_g], [q_g.T, g_g.T]]``).
    """

    def __init__(self, bands: Sequence[Sequence[torch.Tensor]]):
        self.bands = [list(band) for band in bands]
        self.band_starts = [0]
        for band in self.bands:
            self.band_starts.append(self.band_starts[-1] + band[0].shape[0])
        self.col_starts = [0]
        for block in self.bands[0]:
            self.col_starts.append(self.col_starts[-1] + block.shape[1])
        # Distances are ≥ 0, so the maximum of d² is the square of the maximum of d.
        maxima = torch.cat([torch.stack([block.amax(dim=1) for block in band]).amax(0) for band in self.bands])
        maxima = maxima * maxima
        self.maxima = maxima.clamp_min(torch.finfo(maxima.dtype).tiny)  # an all-zero row stays 0

    @property
    def shape(self) -> tuple[int, int]:
        return self.band_starts[-1], self.col_starts[-1]

    def key(self, band: int) -> RowKey:
        """The normalisation of band ``band`` as a ranking key for ``nearest_neighbours``."""
        maxima = self.maxima[self.band_starts[band]: self.band_starts[band + 1]]
        return lambda values, rows: values * values / maxima[rows][:, None]

    def neighbours(self, k: int) -> torch.Tensor:
        """(N, k) nearest items of every row, exact, from each block's own top-k."""
        return torch.cat([nearest_neighbours(band, k, self.key(b)) for b, band in enumerate(self.bands)])

    def block(self, band: int, col_block: int) -> torch.Tensor:
        """One block, normalised (dense)."""
        values = self.bands[band][col_block]
        return self.key(band)(values, torch.arange(values.shape[0], device=values.device))

    def pairs(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Normalised values at (rows, cols), gathered block by block."""
        out = torch.empty(rows.shape, dtype=self.maxima.dtype, device=rows.device)
        band_of = torch.bucketize(rows, torch.tensor(self.band_starts[1:], device=rows.device), right=True)
        col_of = torch.bucketize(cols, torch.tensor(self.col_starts[1:], device=rows.device), right=True)
        for b, band in enumerate(self.bands):
            for c, block in enumerate(band):
                where = torch.nonzero((band_of == b) & (col_of == c)).squeeze(1)
                values = block[rows[where] - self.band_starts[b], cols[where] - self.col_starts[c]]
                out[where] = values * values / self.maxima[rows[where]]
        return out
