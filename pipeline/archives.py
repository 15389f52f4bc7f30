"""Archive members: which names and kinds are safe, how big a member may be, how a damaged tar ends.

Nothing is ever extracted to disk: members are read into memory, so their names are only keys,
and their declared sizes are checked against ``max_member_bytes`` before and while reading.
"""

from __future__ import annotations

import lzma
import stat
import struct
import tarfile
import zipfile
import zlib
from pathlib import PurePosixPath

from reidx.pipeline.manifest import Source

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
ARCHIVE_REST = "(rest of archive)"  # pseudo-member recording where a tar listing broke (no image suffix: no clash)
# What reading damaged archive bytes raises: zlib/lzma errors are not OSErrors, bz2 and gzip raise
# OSError, zipfile raises BadZipFile, NotImplementedError (unknown method), RuntimeError (encrypted).
ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError,
                  NotImplementedError, RuntimeError, ValueError, struct.error)


def archive_type(uri: str) -> str | None:
    lower = uri.lower()
    if lower.endswith((".tar.gz", ".tgz")):
        return "tar.gz"
    if lower.endswith(".tar"):
        return "tar"
    if lower.endswith(".zip"):
        return "zip"
    return None


def unsafe_name_reason(name: str) -> str | None:
    """Why an archive member name is unsafe to use as a path, or None."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "absolute member name"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "member name contains '..'"
    return None


def size_text(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def too_large(size: int | None, source: Source) -> str | None:
    """The refusal for a member whose declared size is over the source's cap, or None."""
    if size is not None and size > source.max_member_bytes:
        return (f"member too large: {size_text(size)} ({size} bytes) over max_member_bytes = "
                f"{source.max_member_bytes}; raise max_member_bytes in the manifest to index it")
    return None


def read_capped(f, source: Source) -> tuple[bytes | None, str | None]:
    """Read a member, stopping one byte past the cap whatever its header said: (data, None) or (None, reason)."""
    cap, chunks, total = source.max_member_bytes, [], 0
    while chunk := f.read(min(1 << 20, cap + 1 - total)):
        chunks.append(chunk)
        total += len(chunk)
        if total > cap:
            return None, (f"member too large: more than max_member_bytes = {cap} bytes read (more than its "
                          f"header said); raise max_member_bytes in the manifest to index it")
    return b"".join(chunks), None


def tar_member_reason(info: tarfile.TarInfo) -> str | None:
    reason = unsafe_name_reason(info.name)
    if reason:
        return reason
    if info.issym() or info.islnk():
        return "link member (never followed)"
    if info.ischr() or info.isblk() or info.isfifo():
        return "device or FIFO member"
    return None if info.isfile() else "not a regular file"


def zip_member_reason(info: zipfile.ZipInfo) -> str | None:
    reason = unsafe_name_reason(info.filename)
    if reason:
        return reason
    if stat.S_ISLNK(info.external_attr >> 16):
        return "link member (never followed)"
    return None


def tar_end_reason(tar: tarfile.TarFile) -> str | None:
    """Why the tar did not end where tarfile stopped listing, or None.

    tarfile ends its listing silently at a damaged header after the first member; a real end is
    zero blocks up to the end of the stream. Reading on to the end also makes gzip check its CRC.
    """
    stream = tar.fileobj
    stream.seek(tar.offset)
    while block := stream.read(1 << 20):
        if block.strip(b"\0"):
            return f"damaged tar header at byte {tar.offset}"
    return None
