"""Batches with the next ones loading in threads: decoding overlaps inference.

Used by every loop that reads image files and runs a model on them (embedding crops, detecting
in frames), so the overlap, the order and the failure handling are the same everywhere.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Sequence, TypeVar

Item = TypeVar("Item")
Loaded = TypeVar("Loaded")


def batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def prefetch_batches(items: Sequence[Item], load: Callable[[Item], Loaded], batch_size: int, workers: int = 2,
                     ahead: int = 2) -> Iterator[tuple[int, list[Loaded]]]:
    """Yield ``(start, [load(item) for item in batch])`` in input order while the next ``ahead``
    batches load in ``workers`` threads. ``load`` must not raise for a bad item: it returns
    the item's failure (decode loops return ``(None, reason)``), so one file never stops a run.
    Memory holds at most ``ahead + 1`` loaded batches."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending: deque = deque()
        chunks = enumerate(batches(items, batch_size))

        def submit_next() -> None:
            nxt = next(chunks, None)
            if nxt is not None:
                index, chunk = nxt
                pending.append((index * batch_size, pool.map(load, chunk)))

        for _ in range(max(1, ahead)):
            submit_next()
        while pending:
            start, loaded = pending.popleft()
            loaded = list(loaded)
            submit_next()
            yield start, loaded
