"""Building blocks of k-reciprocal and SIM re-ranking, on neighbour lists and sparse rows.

Everything here works on per-item neighbour lists (``(N, k)`` index tensors) and sparse rows
(``SparseRows``), never on N×N matrices, so the exact mode (``indexers.rerank``, which ranks
dense distance blocks) and a scalable mode (Faiss top-K plus a gallery kNN graph) can share
them. torch throughout: CPU, or CUDA when the tensors live there.

Tie rule: equal distances are ordered by item index (a stable sort), as in
``indexers.rerank_naive``, the loop-by-loop reference these are tested against.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

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
    index, by_index = index.sort(dim=1)
    values = values.gather(1, by_index)
    order = values.argsort(dim=1, stable=True)
    values, index = values.gather(1, order), index.gather(1, order)
    neighbours = index[:, :k].contiguous()
    if k < values.shape[1]:
        tied = torch.nonzero(values[:, k - 1] == values[:, k]).squeeze(1)
        if tied.numel():
            full = torch.cat([block[tied] for block in blocks], 1)
            full = key(full, tied) if key is not None else full
            neighbours[tied] = full.argsort(dim=1, stable=True)[:, :k]
    return neighbours


def reciprocal_mask(neighbours: torch.Tensor, k: int) -> torch.Tensor:
    """mask[i, a]: item neighbours[i, a] has i among its own k+1 nearest (membership of R(i, k)).

    ``neighbours`` lists every item's nearest items (itself usually first) in one index space.
    """
    forward = neighbours[:, : k + 1]
    mask = torch.empty(forward.shape, dtype=torch.bool, device=forward.device)
    for rows in chunks(forward.shape[0], forward.shape[1] ** 2):
        own = torch.arange(rows.start, rows.stop, device=forward.device)
        mask[rows] = (forward[forward[rows]] == own[:, None, None]).any(-1)
    return mask


def expanded_reciprocal_sets(neighbours: torch.Tensor, k1: int) -> torch.Tensor:
    """Each item's R(i, k1) with the 2/3 expansion, as ascending rows padded with the sentinel N:
    R(c, round(k1/2)) of a member c joins when more than 2/3 of it lies in R(i, k1)."""
    num_items = neighbours.shape[0]
    half = int(round(k1 / 2))
    forward, half_forward = neighbours[:, : k1 + 1], neighbours[:, : half + 1]
    is_reciprocal = reciprocal_mask(neighbours, k1)
    half_sets = torch.where(reciprocal_mask(neighbours, half), half_forward, num_items)
    half_set_sizes = (half_sets < num_items).sum(1)
    width, half_width = forward.shape[1], half_forward.shape[1]
    rows_out = []
    for rows in chunks(num_items, width * half_width * 4):
        members = torch.where(is_reciprocal[rows], forward[rows], num_items).sort(dim=1).values
        candidate_sets = half_sets[forward[rows]].flatten(1)  # (n, width·half_width), N where absent
        slot = torch.searchsorted(members, candidate_sets).clamp_(max=width - 1)
        found = (members.gather(1, slot) == candidate_sets) & (candidate_sets < num_items)
        inside = found.view(-1, width, half_width).sum(-1)
        size = half_set_sizes[forward[rows]]
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
    """V(i) ← mean of V over i's nearest items (``neighbours``: (N, k2), itself usually first)."""
    counts = torch.bincount(vectors.row, minlength=vectors.num_rows)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    source = neighbours.reshape(-1)
    position, pair = _segments(offsets[source], counts[source])
    key = (pair // neighbours.shape[1]) * vectors.num_cols + vectors.col[position]
    unique_key, slot = torch.unique(key, sorted=True, return_inverse=True)
    summed = torch.zeros(unique_key.numel(), dtype=vectors.value.dtype, device=key.device)
    summed.index_add_(0, slot, vectors.value[position])
    return SparseRows(unique_key // vectors.num_cols, unique_key % vectors.num_cols,
                      summed / neighbours.shape[1], vectors.num_rows, vectors.num_cols)


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
    query_mass = torch.zeros(query.num_rows, dtype=shared.dtype, device=device).index_add_(0, query.row, query.value)
    gallery_mass = torch.zeros(gallery.num_rows, dtype=shared.dtype, device=device).index_add_(
        0, gallery.row, gallery.value)
    union = query_mass[:, None] + gallery_mass[None, :] - shared
    return 1 - shared / union.clamp_min(torch.finfo(union.dtype).tiny)  # two empty rows: distance 1


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
