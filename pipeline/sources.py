"""Sources: list the image members of a folder, glob, tar/zip archive or fsspec URL; read their bytes.

Nothing is ever extracted to disk: members are read into memory by the worker that decodes
them. Archive members that could write or read outside the archive if extracted — absolute
names, ``..`` components, symlinks, hard links, devices, FIFOs — are never read; listing
returns them as *rejected* with the reason, so the ledger records them and the night goes on.

A member is named by its POSIX path relative to the source root (for a glob: relative to the
pattern's fixed leading folder); ``(source name, member)`` is an image's stable key.

Folder and glob sources likewise never follow a symbolic link out of the source root (a link
to /etc/passwd was read): such members are listed as rejected, and checked again when read.

Video sources list video files (``VIDEO_SUFFIXES``) instead of images; how a video is then read
(streamed from a file or URL, whole from an archive) is :mod:`reidx.pipeline.video_persons`.

A member is read into memory whole, so its size is capped first (``max_member_bytes`` in the
manifest, 256 MiB by default): the size an archive header declares (zip ``file_size``, tar
``size``) is checked when listing and reading, and reading itself stops one byte past the cap
(a lying header, or a plain file with no header at all); a refusal is recorded with its reason.

URL sources (fsspec) fail alone, never the night: an unknown protocol or a missing optional
package (``http://`` needs aiohttp: extra ``reidx[http]``) is a :class:`SourceError` saying what
to install, and every network operation — connecting, each listing step, opening, each read of
at most 1 MiB — must finish within the source's ``timeout_s``: the protocol's own timeouts are set
where fsspec takes them, and a thread deadline backs them up for any implementation.

Damaged archives never stop the night. Every decompression error (zlib, lzma, bz2, gzip CRC,
truncation, bad zip data) while reading a member is that member's recorded failure. When a tar
breaks while it is being listed, the members listed before the break are kept (a forward pass
reaches them before the damage) and the break itself is recorded once, as the pseudo-member
``(rest of archive)`` with the reason, so the operator sees it in the ledger and the summary;
tarfile stops silently at a damaged header, so what follows the last header is checked too.
"""

from __future__ import annotations

import fnmatch
import glob
import io
import lzma
import os
import stat
import struct
import tarfile
import threading
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterator

from reidx.pipeline.datasets import IMAGE_SUFFIXES
from reidx.pipeline.manifest import DEFAULT_TIMEOUT_S, Source
from reidx.pipeline.video import VIDEO_SUFFIXES

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
ARCHIVE_REST = "(rest of archive)"  # pseudo-member recording where a tar listing broke (no image suffix: no clash)
# What reading damaged archive bytes raises: zlib/lzma errors are not OSErrors, bz2 and gzip raise
# OSError, zipfile raises BadZipFile, NotImplementedError (unknown method), RuntimeError (encrypted).
ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError,
                  NotImplementedError, RuntimeError, ValueError, struct.error)


class SourceError(OSError):
    """A whole source cannot be listed (missing folder, unreadable archive); the night goes on."""


@dataclass
class Listing:
    """What a source holds: readable image members (sorted) and members refused with a reason.

    ``fingerprints`` (member → text) says cheaply whether a member's bytes changed since a night
    that saw them, without reading them: size and mtime for files, size and mtime for tar members,
    size and CRC for zip members (URL members have none). A failed image is retried when it changes.
    """

    members: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    fingerprints: dict[str, str] = field(default_factory=dict)


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


def _size_text(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def _too_large(size: int | None, source: Source) -> str | None:
    """The refusal for a member whose declared size is over the source's cap, or None."""
    if size is not None and size > source.max_member_bytes:
        return (f"member too large: {_size_text(size)} ({size} bytes) over max_member_bytes = "
                f"{source.max_member_bytes}; raise max_member_bytes in the manifest to index it")
    return None


def _read_capped(f, source: Source) -> tuple[bytes | None, str | None]:
    """Read a member, stopping one byte past the cap whatever its header said: (data, None) or (None, reason)."""
    cap, chunks, total = source.max_member_bytes, [], 0
    while chunk := f.read(min(1 << 20, cap + 1 - total)):
        chunks.append(chunk)
        total += len(chunk)
        if total > cap:
            return None, (f"member too large: more than max_member_bytes = {cap} bytes read (more than its "
                          f"header said); raise max_member_bytes in the manifest to index it")
    return b"".join(chunks), None


def _wanted(source: Source, member: str) -> bool:
    """An image member (a video member for video sources) that the include/exclude patterns keep."""
    suffixes = VIDEO_SUFFIXES if source.kind == "video" else IMAGE_SUFFIXES
    if PurePosixPath(member).suffix.lower() not in suffixes:
        return False
    if source.include and not any(fnmatch.fnmatch(member, p) for p in source.include):
        return False
    return not any(fnmatch.fnmatch(member, p) for p in source.exclude)


# Extras of reidx that bring a protocol's optional packages (fsspec names the package for others).
PROTOCOL_EXTRAS = {"http": "reidx[http]", "https": "reidx[http]"}


class NetworkTimeout(TimeoutError):
    """A network operation of a URL source got no answer within its ``timeout_s``."""


def _protocol(uri: str) -> str:
    return uri.split("://", 1)[0].lower()


def _deadline(call, timeout: float, what: str):
    """``call()`` in a daemon thread, abandoned after ``timeout`` s: a silent server holds that thread, not the night."""
    outcome: dict = {}

    def run():
        try:
            outcome["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="reidx-network", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise NetworkTimeout(f"no answer from {what} within {timeout:g} s; check the server or raise timeout_s "
                             f"in the manifest")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def _storage_options(uri: str, timeout: float) -> dict:
    """The protocol's own timeouts, where fsspec's implementation takes them (the deadline backs them up)."""
    protocol = _protocol(uri)
    if protocol in ("http", "https"):
        import aiohttp  # ImportError: reported with the extra to install

        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=timeout,
                                                                    sock_read=timeout)}}
    if protocol in ("ftp", "sftp", "ssh"):
        return {"timeout": timeout}
    if protocol in ("s3", "s3a"):
        return {"config_kwargs": {"connect_timeout": timeout, "read_timeout": timeout}}
    return {}


def _url_error(source: Source, exc: BaseException) -> SourceError:
    """An unknown protocol or a missing optional package, said as what to do."""
    protocol = _protocol(source.uri)
    if isinstance(exc, ImportError):
        extra = PROTOCOL_EXTRAS.get(protocol)
        hint = f"pip install '{extra}'" if extra else "install the package fsspec names"
        return SourceError(f"source {source.name}: {protocol}:// needs an optional package: {hint} ({exc})")
    return SourceError(f"source {source.name}: unknown protocol {protocol!r} in {source.uri}; use a folder, an "
                       f"archive or a URL fsspec knows (s3://, gs://, http://, ...)")


def _is_protocol_error(exc: BaseException) -> bool:
    return isinstance(exc, ImportError) or (isinstance(exc, ValueError) and "Protocol not known" in str(exc))


class _DeadlineReader(io.RawIOBase):
    """A remote file whose every read and seek must finish within the timeout."""

    def __init__(self, f, timeout: float, what: str):
        self.f, self.timeout, self.what = f, timeout, what

    def readable(self):
        return True

    def seekable(self):
        return True

    def readinto(self, buffer) -> int:
        data = _deadline(lambda: self.f.read(len(buffer)), self.timeout, self.what)
        buffer[:len(data)] = data
        return len(data)

    def seek(self, offset, whence=io.SEEK_SET):
        return _deadline(lambda: self.f.seek(offset, whence), self.timeout, self.what)

    def tell(self):
        return self.f.tell()

    def close(self):
        if not self.closed:
            try:
                _deadline(self.f.close, self.timeout, self.what)
            except Exception:  # noqa: BLE001 - closing a dead connection: nothing left to save
                pass
        super().close()


def _open_binary(uri: str, source: Source | None = None):
    if "://" in uri:
        import fsspec

        timeout = source.timeout_s if source is not None else DEFAULT_TIMEOUT_S
        options = _storage_options(uri, timeout)
        f = _deadline(lambda: fsspec.open(uri, "rb", **options).open(), timeout, uri)
        return io.BufferedReader(_DeadlineReader(f, timeout, uri), buffer_size=1 << 20)
    return open(uri, "rb")


def _list_url_folder(source: Source, listing: Listing) -> None:
    import fsspec

    timeout = source.timeout_s
    fs, root = _deadline(lambda: fsspec.core.url_to_fs(source.uri, **_storage_options(source.uri, timeout)),
                         timeout, source.uri)
    if not _deadline(lambda: fs.isdir(root), timeout, source.uri):
        raise SourceError(f"source {source.name}: {source.uri} does not exist")
    walk = iter(fs.walk(root, detail=False))
    while True:  # one directory listing per step, each within the timeout
        step = _deadline(lambda: next(walk, None), timeout, source.uri)
        if step is None:
            break
        folder, _, files = step
        for name in files:
            path = f"{folder.rstrip('/')}/{name}"
            member = PurePosixPath(path).relative_to(PurePosixPath(root)).as_posix()
            if _wanted(source, member):
                listing.members.append(member)


def _glob_root(pattern: str) -> Path:
    parts = []
    for part in Path(pattern).parts:
        if glob.has_magic(part):
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


def _local_root(uri: str) -> Path:
    """The folder members are relative to: a glob's fixed prefix, a single file's folder, or the folder."""
    if glob.has_magic(uri):
        return _glob_root(uri)
    path = Path(uri)
    return path.parent if path.is_file() else path


def _walks(uri: str) -> bool:
    """True for a folder or glob source (files found by walking), False for one named image file."""
    return glob.has_magic(uri) or not Path(uri).is_file()


def _link_reason(path: Path, real_root: str) -> str | None:
    """Why a walked file must not be read: a link whose target lies outside the source root."""
    real = os.path.realpath(path)
    if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
        return "link leads outside the source folder (never followed)"
    return None


def _local_files(source: Source) -> tuple[Path, list[Path]]:
    root = _local_root(source.uri)
    if glob.has_magic(source.uri):
        return root, [Path(p) for p in glob.glob(source.uri, recursive=True) if os.path.isfile(p)]
    if Path(source.uri).is_file():  # a single image (e.g. one query crop)
        return root, [Path(source.uri)]
    if not root.is_dir():
        raise SourceError(f"source {source.name}: {source.uri} does not exist")
    return root, [p for p in root.rglob("*") if p.is_file()]


def _tar_member_reason(info: tarfile.TarInfo) -> str | None:
    reason = unsafe_name_reason(info.name)
    if reason:
        return reason
    if info.issym() or info.islnk():
        return "link member (never followed)"
    if info.ischr() or info.isblk() or info.isfifo():
        return "device or FIFO member"
    return None if info.isfile() else "not a regular file"


def _zip_member_reason(info: zipfile.ZipInfo) -> str | None:
    reason = unsafe_name_reason(info.filename)
    if reason:
        return reason
    if stat.S_ISLNK(info.external_attr >> 16):
        return "link member (never followed)"
    return None


def _add_archive_entries(listing: Listing, entries: list[tuple[str, str | None, str]]) -> None:
    """Archive entries (name, refusal reason or None, fingerprint) into the listing, each name once.

    A name stored twice (zip and tar allow it) is refused in every copy: the copies may differ,
    and nobody can tell which one is the right image; indexing both gave one detection_id twice.
    """
    copies = Counter(name for name, _, _ in entries)
    refused: set[str] = set()
    for name, reason, fingerprint in entries:
        listing.fingerprints[name] = fingerprint
        if copies[name] > 1:
            if name not in refused:  # one ledger record for all copies
                refused.add(name)
                listing.rejected.append((name, f"duplicate member name in the archive ({copies[name]} copies): "
                                               f"which one is right cannot be told; rename them"))
        elif reason:
            listing.rejected.append((name, reason))
        else:
            listing.members.append(name)


def _tar_end_reason(tar: tarfile.TarFile) -> str | None:
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


def _errors(source: Source) -> tuple:
    """What reading this source may raise and must record: for a URL, anything its filesystem raises."""
    return (Exception,) if "://" in source.uri else ARCHIVE_ERRORS


def _list_tar(source: Source, listing: Listing) -> None:
    entries: list[tuple[str, str | None, str]] = []
    last = None
    try:
        with _open_binary(source.uri, source) as raw, tarfile.open(fileobj=raw, mode="r:*") as tar:
            for info in tar:
                last = info.name
                if not info.isdir() and _wanted(source, info.name):
                    entries.append((info.name, _tar_member_reason(info) or _too_large(info.size, source),
                                    f"tar:{info.size}:{info.mtime}"))
            broken = _tar_end_reason(tar)
    except FileNotFoundError:
        raise
    except _errors(source) as exc:
        if last is None:  # nothing could be listed: the whole source fails
            raise
        broken = f"{'zlib.error' if isinstance(exc, zlib.error) else type(exc).__name__}: {exc}"
    _add_archive_entries(listing, entries)
    if broken:
        where = f"after member {last!r}" if last is not None else "at its start"
        listing.rejected.append((ARCHIVE_REST, f"unreadable archive {where} ({broken}); the members before it "
                                               f"are indexed, replace the archive to index the rest"))


def list_source(source: Source) -> Listing:
    """List a source's image members; raise :class:`SourceError` if the source itself is missing."""
    listing = Listing()
    kind = archive_type(source.uri)
    try:
        if kind in ("tar", "tar.gz"):
            _list_tar(source, listing)
        elif kind == "zip":
            with _open_binary(source.uri, source) as raw, zipfile.ZipFile(raw) as archive:
                _add_archive_entries(listing, [(info.filename, _zip_member_reason(info)
                                                or _too_large(info.file_size, source),
                                                f"zip:{info.file_size}:{info.CRC:08x}")
                                               for info in archive.infolist()
                                               if not info.is_dir() and _wanted(source, info.filename)])
        elif "://" in source.uri:
            _list_url_folder(source, listing)
        else:
            root, files = _local_files(source)
            real_root = os.path.realpath(root)
            walks = _walks(source.uri)
            for path in files:
                member = path.relative_to(root).as_posix()
                if not _wanted(source, member):
                    continue
                reason = _link_reason(path, real_root) if walks else None
                (listing.rejected.append((member, reason)) if reason else listing.members.append(member))
                try:
                    stat_result = path.stat()
                    listing.fingerprints[member] = f"file:{stat_result.st_size}:{stat_result.st_mtime_ns}"
                except OSError:
                    pass  # vanished or unreadable: reading it records why
    except SourceError:
        raise
    except FileNotFoundError:
        raise SourceError(f"source {source.name}: {source.uri} does not exist") from None
    except NetworkTimeout as exc:
        raise SourceError(f"source {source.name}: {exc}") from None
    except Exception as exc:
        if "://" in source.uri and _is_protocol_error(exc):
            raise _url_error(source, exc) from None
        # a URL source's filesystem may raise anything (aiohttp, botocore, ...): that source fails, not the night
        if isinstance(exc, ARCHIVE_ERRORS) or "://" in source.uri:
            raise SourceError(f"source {source.name}: cannot read {source.uri}: {exc}") from None
        raise
    listing.members.sort()
    return listing


def read_members(source: Source, members: list[str]) -> Iterator[tuple[str, bytes | None, str | None]]:
    """Yield ``(member, data, None)`` or ``(member, None, reason)`` for each wanted member.

    Archives are opened once per call; a .tar.gz is read in one forward pass (it has no index).
    """
    wanted = set(members)
    kind = archive_type(source.uri)
    errors = _errors(source)
    if kind in ("tar", "tar.gz"):
        found: set[str] = set()
        try:
            with _open_binary(source.uri, source) as raw, tarfile.open(fileobj=raw, mode="r:*") as tar:
                for info in tar:
                    if info.name not in wanted or info.name in found:
                        continue
                    found.add(info.name)
                    reason = _tar_member_reason(info) or _too_large(info.size, source)
                    if reason:
                        yield info.name, None, reason
                        continue
                    try:
                        data, reason = _read_capped(tar.extractfile(info), source)
                    except errors as exc:
                        data, reason = None, f"unreadable archive member: {exc}"
                    yield info.name, data, reason  # outside the try: a consumer's error is not ours to record
                    if len(found) == len(wanted):
                        break
        except errors as exc:
            for member in sorted(wanted - found):
                yield member, None, f"unreadable archive: {exc}"
            return
        for member in sorted(wanted - found):
            yield member, None, "member not found in archive"
    elif kind == "zip":
        done: set[str] = set()
        try:
            with _open_binary(source.uri, source) as raw, zipfile.ZipFile(raw) as archive:
                copies = Counter(archive.namelist())
                for member in members:
                    done.add(member)
                    if copies[member] > 1:  # see _add_archive_entries
                        yield member, None, f"duplicate member name in the archive ({copies[member]} copies)"
                        continue
                    data = None
                    try:
                        info = archive.getinfo(member)
                        reason = _zip_member_reason(info) or _too_large(info.file_size, source)
                        if not reason:
                            with archive.open(info) as f:
                                data, reason = _read_capped(f, source)
                    except KeyError:
                        reason = "member not found in archive"
                    except errors as exc:
                        reason = f"unreadable archive member: {exc}"
                    yield member, data, reason
        except errors as exc:
            for member in members:
                if member not in done:
                    yield member, None, f"unreadable archive: {exc}"
    else:
        root = source.uri if "://" in source.uri else str(_local_root(source.uri))
        real_root = None if "://" in source.uri or not _walks(source.uri) else os.path.realpath(root)
        for member in members:
            reason = _link_reason(Path(root) / member, real_root) if real_root else None
            if reason:  # checked again here: the file may have become a link since it was listed
                yield member, None, reason
                continue
            data = None
            try:
                with _open_binary(f"{root.rstrip('/')}/{member}", source) as f:
                    size = os.fstat(f.fileno()).st_size if "://" not in root else None
                    reason = _too_large(size, source)
                    if not reason:
                        data, reason = _read_capped(f, source)
            except OSError as exc:
                reason = f"cannot read: {exc.strerror or exc}"
            except Exception as exc:
                if "://" not in root:
                    raise
                # a URL source's filesystem may raise anything: that member fails, not the batch
                reason = str(_url_error(source, exc)) if _is_protocol_error(exc) else f"cannot read: {exc}"
            yield member, data, reason
