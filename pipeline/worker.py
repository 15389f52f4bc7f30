"""What a Dask worker process does with one task: the persons of a batch of images, written as
one shard (durably, before the driver commits the batch's ledger rows).

The stages themselves are :func:`reidx.pipeline.persons.persons_of_members`; this module only
adds the write, so the distribution (Dask, here) stays apart from the stage code.
"""

from __future__ import annotations

import time

from reidx.pipeline.gallery import shards_dir
from reidx.pipeline.integrity import file_sha256
from reidx.pipeline.manifest import Source
from reidx.pipeline.persons import ModelSpec, persons_of_members
from reidx.pipeline.shards import write_shard


def process_batch(gallery: str, source: Source, members: list[str], spec: ModelSpec) -> dict:
    """Process images of one source (shard written durably first).

    Returns ``{"records": one ledger record per image, "seconds": time per stage}``.
    """
    persons = persons_of_members(source, members, spec)
    if persons.table is not None:
        clock = time.perf_counter()
        shard = write_shard(persons.table, gallery)
        # the bytes as committed: readers and `reidx verify` check the file against them
        digest = file_sha256(shards_dir(gallery) / shard)
        persons.seconds["write"] += time.perf_counter() - clock
        for record in persons.records:
            if record.get("num_persons"):
                record.update(shard=shard, shard_sha256=digest, shard_rows=persons.table.num_rows)
    return {"records": persons.records, "seconds": persons.seconds}
