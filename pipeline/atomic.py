"""Atomic, durable file writes: the one way reidx writes a file that others may read.

Every writer goes to a temporary file beside the target, flushes and fsyncs it, renames it over
the target with ``os.replace`` and fsyncs the folder, so a reader sees the old file or the new
one, never half of one, and a crash or power cut after the call cannot lose it. Temporary names
start with ``.`` and end with ``.tmp``: crash recovery (:func:`reidx.pipeline.ledger.recover`)
removes exactly those.

Files get the permissions an ordinary ``open()`` would give (0666 less the process umask), not
``mkstemp``'s 0600: an investigator in the operations group must be able to read the gallery.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, BinaryIO


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename or a new file in ``folder`` durable (POSIX needs the folder itself synced)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, then publish it atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    return write_atomic(path, lambda f: f.write(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def write_parquet_atomic(table, path: str | os.PathLike) -> Path:
    """An Arrow table as a zstd-compressed Parquet file, atomically."""
    import pyarrow.parquet as pq

    return write_atomic(path, lambda f: pq.write_table(table, f, compression="zstd"))


def save_torch_atomic(obj, path: str | os.PathLike) -> Path:
    """A torch checkpoint (tensors and plain containers), atomically."""
    import torch

    return write_atomic(path, lambda f: torch.save(obj, f))
