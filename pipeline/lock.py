"""One job per gallery: ``fcntl.flock`` on ``GALLERY/.lock``, which the kernel releases when the holder dies.

Why flock and not a pid file: taking over a "stale" pid file (read, check the pid, unlink,
O_EXCL create) is not atomic — racing jobs both took it over — and a write that failed on a
full disk left an empty file that blocked every later night. A flock is held by the open file
itself: the kernel drops it the moment the holder exits or is SIGKILLed, so there is no stale
lock to detect, and a leftover file that nobody has locked blocks nothing.

The file also holds ``<hostname> <pid>`` of the holder, only so that the error a second job
prints names who holds the gallery (best effort: a failed write does not stop the job). A
clean exit removes the file, so finding one with a holder written in it means that holder died
(reported as :attr:`GalleryLock.took_over`). The descriptor is close-on-exec; a child made by
a bare ``fork`` (no exec) would share the lock, which reidx never does (Dask workers spawn).
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path


class GalleryLockedError(RuntimeError):
    """Another live job holds the gallery."""


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 256, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""


class GalleryLock:
    def __init__(self, gallery: str | os.PathLike):
        self.path = Path(gallery) / ".lock"
        # the holder a previous job left written in the file when it died without releasing; None otherwise
        self.took_over: str | None = None
        self._fd: int | None = None

    def __enter__(self) -> "GalleryLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise GalleryLockedError(
                    f"{self.path.parent} is being indexed by another job ({holder or 'unknown'}); "
                    f"wait for it to finish") from None
            except BaseException:
                os.close(fd)
                raise
            # The previous holder unlinks the file before releasing it: if we locked that unlinked
            # file, the lock is worthless (a third job may have created and locked a new one). Retry.
            try:
                current = os.stat(self.path)
                opened = os.fstat(fd)
                same = (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino)
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.took_over = _read_holder(fd) or None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{socket.gethostname()} {os.getpid()}".encode(), 0)
        except OSError:
            pass  # disk full: the flock is the lock; the text only names the holder in errors
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # still holding the lock: see the inode check in __enter__
        finally:
            os.close(self._fd)  # releases the lock
            self._fd = None
