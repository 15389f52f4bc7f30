"""P identities × K images per batch, the sampling batch-hard triplet losses need.

A random batch of 64 crops from a few dozen identities rarely holds two crops of one person,
so a triplet loss would have no positives; P×K guarantees K positives per anchor and
(P−1)·K negatives. An epoch follows torchreid's ``RandomIdentitySampler``: each identity's
crops are shuffled and cut into groups of K (an identity with fewer than K crops is drawn with
replacement up to K), and batches take one group from each of P identities picked at random
among those with groups left, until fewer than P remain. So an epoch shows about every crop
once, and large identities are not over-sampled.

Batches are a pure function of (seed, epoch): a resumed run replays exactly the same batches.
"""

from __future__ import annotations

import numpy as np


class PKSampler:
    """``epoch(e)`` → list of index arrays, each P·K labelled indices (+ ``unlabelled`` extra)."""

    def __init__(self, targets: np.ndarray, p: int, k: int, seed: int = 0, unlabelled: int = 0):
        targets = np.asarray(targets)
        if p < 2 or k < 2:
            raise ValueError(f"P and K must both be at least 2 (a triplet needs a positive and a negative); "
                             f"got P={p}, K={k}")
        self.p, self.k, self.seed, self.unlabelled = p, k, seed, unlabelled
        classes = np.unique(targets[targets >= 0])
        self.groups = {int(c): np.flatnonzero(targets == c) for c in classes}
        self.unlabelled_indices = np.flatnonzero(targets < 0)
        if len(self.groups) < p:
            raise ValueError(f"P={p} identities per batch, but the training data has only {len(self.groups)} "
                             f"labelled identities; lower --p")

    def epoch(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        chunks: dict[int, list[np.ndarray]] = {}
        for cls, members in self.groups.items():
            members = rng.permutation(members)
            if len(members) < self.k:
                members = rng.choice(members, size=self.k, replace=True)
            usable = len(members) // self.k * self.k
            chunks[cls] = list(members[:usable].reshape(-1, self.k))
        batches = []
        while True:
            available = [c for c, left in chunks.items() if left]
            if len(available) < self.p:
                break
            picked = rng.choice(available, size=self.p, replace=False)
            batch = np.concatenate([chunks[int(c)].pop() for c in picked])
            if self.unlabelled and len(self.unlabelled_indices):
                extra = rng.choice(self.unlabelled_indices, size=self.unlabelled,
                                   replace=len(self.unlabelled_indices) < self.unlabelled)
                batch = np.concatenate([batch, extra])
            batches.append(batch)
        return batches
