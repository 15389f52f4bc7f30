"""One job per gallery: an exclusive lock file that a dead holder cannot keep.

``GALLERY/.lock`` holds ``<hostname> <pid>``, created with O_EXCL. A second job exits at once
with a message naming the holder. A lock whose process no longer runs on this host is stale
(the holder was killed) and is taken over.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


class GalleryLockedError(RuntimeError):
    """Another live job holds the gallery."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class GalleryLock:
    def __init__(self, gallery: str | os.PathLike):
        self.path = Path(gallery) / ".lock"
        self.took_over: str | None = None

    def __enter__(self) -> "GalleryLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = f"{socket.gethostname()} {os.getpid()}"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.path.read_text().strip() if self.path.exists() else ""
                host, _, pid = holder.partition(" ")
                if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    self.took_over = holder
                    continue
                raise GalleryLockedError(
                    f"{self.path.parent} is being indexed by another job ({holder or 'unknown'}); "
                    f"wait for it, or remove {self.path} if that process is gone") from None
            with os.fdopen(fd, "w") as f:
                f.write(me)
            return self
        raise GalleryLockedError(f"could not take the lock {self.path}")

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)
