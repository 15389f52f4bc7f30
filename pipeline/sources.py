"""Sources: list the image members of a folder, glob, tar/zip archive or fsspec URL; read their bytes.

Nothing is ever extracted to disk: members are read into memory by the worker that decodes
them. Archive members that could write or read outside the archive if extracted — absolute
names, ``..`` components, symlinks, hard links, devices, FIFOs — are never read; listing
returns them as *rejected* with the reason, so the ledger records them and the night goes on.

A member is named by its POSIX path relative to the source root (for a glob: relative to the
pattern's fixed leading folder); ``(source name, member)`` is an image's stable key.

Folder and glob sources likewise never follow a symbolic link out of the source root (a link
to /etc/passwd was read): such members are listed as rejected, and checked again when read.

Video sources list video files (``VIDEO_SUFFIXES``) instead of images; :func:`open_video` says
where a video's bytes come from (streamed from a file or URL, whole from an archive) for the
nightly job (:mod:`reidx.pipeline.video_persons`) and the report's frames alike.

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
import os
import tarfile
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterator

from reidx.pipeline.archives import (ARCHIVE_ERRORS, ARCHIVE_REST, archive_type, read_capped,  # noqa: F401
                                     tar_end_reason, tar_member_reason, too_large, zip_member_reason)
from reidx.pipeline.datasets import IMAGE_SUFFIXES
from reidx.pipeline.remote import (PROTOCOL_EXTRAS, DeadlineReader, NetworkTimeout, deadline, is_protocol_error,
                                   protocol, storage_options)
from reidx.pipeline.manifest import DEFAULT_TIMEOUT_S, Source
from reidx.pipeline.video import VIDEO_SUFFIXES, VideoDecodeError, VideoInput

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


def _wanted(source: Source, member: str) -> bool:
    """An image member (a video member for video sources) that the include/exclude patterns keep."""
    suffixes = VIDEO_SUFFIXES if source.kind == "video" else IMAGE_SUFFIXES
    if PurePosixPath(member).suffix.lower() not in suffixes:
        return False
    if source.include and not any(fnmatch.fnmatch(member, p) for p in source.include):
        return False
    return not any(fnmatch.fnmatch(member, p) for p in source.exclude)


def _url_error(source: Source, exc: BaseException) -> SourceError:
    """An unknown protocol or a missing optional package, said as what to do."""
    scheme = protocol(source.uri)
    if isinstance(exc, ImportError):
        extra = PROTOCOL_EXTRAS.get(scheme)
        hint = f"pip install '{extra}'" if extra else "install the package fsspec names"
        return SourceError(f"source {source.name}: {scheme}:// needs an optional package: {hint} ({exc})")
    return SourceError(f"source {source.name}: unknown protocol {scheme!r} in {source.uri}; use a folder, an "
                       f"archive or a URL fsspec knows (s3://, gs://, http://, ...)")


def _open_binary(uri: str, source: Source | None = None):
    if "://" in uri:
        import fsspec

        timeout = source.timeout_s if source is not None else DEFAULT_TIMEOUT_S
        options = storage_options(uri, timeout)
        f = deadline(lambda: fsspec.open(uri, "rb", **options).open(), timeout, uri)
        return io.BufferedReader(DeadlineReader(f, timeout, uri), buffer_size=1 << 20)
    return open(uri, "rb")


def _list_url_folder(source: Source, listing: Listing) -> None:
    import fsspec

    timeout = source.timeout_s
    fs, root = deadline(lambda: fsspec.core.url_to_fs(source.uri, **storage_options(source.uri, timeout)),
                         timeout, source.uri)
    if not deadline(lambda: fs.isdir(root), timeout, source.uri):
        raise SourceError(f"source {source.name}: {source.uri} does not exist")
    walk = iter(fs.walk(root, detail=False))
    while True:  # one directory listing per step, each within the timeout
        step = deadline(lambda: next(walk, None), timeout, source.uri)
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
                    entries.append((info.name, tar_member_reason(info) or too_large(info.size, source),
                                    f"tar:{info.size}:{info.mtime}"))
            broken = tar_end_reason(tar)
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
                _add_archive_entries(listing, [(info.filename, zip_member_reason(info)
                                                or too_large(info.file_size, source),
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
    except TimeoutError:  # the protocol's own timeout fired before our deadline (a loaded machine)
        raise SourceError(f"source {source.name}: {NetworkTimeout.message(source.uri, source.timeout_s)}") from None
    except Exception as exc:
        if "://" in source.uri and is_protocol_error(exc):
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
                    reason = tar_member_reason(info) or too_large(info.size, source)
                    if reason:
                        yield info.name, None, reason
                        continue
                    try:
                        data, reason = read_capped(tar.extractfile(info), source)
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
                        reason = zip_member_reason(info) or too_large(info.file_size, source)
                        if not reason:
                            with archive.open(info) as f:
                                data, reason = read_capped(f, source)
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
                    reason = too_large(size, source)
                    if not reason:
                        data, reason = read_capped(f, source)
            except OSError as exc:
                reason = f"cannot read: {exc.strerror or exc}"
            except Exception as exc:
                if "://" not in root:
                    raise
                # a URL source's filesystem may raise anything: that member fails, not the batch
                reason = str(_url_error(source, exc)) if is_protocol_error(exc) else f"cannot read: {exc}"
            yield member, data, reason


def open_video(source: Source, member: str) -> tuple[VideoInput, object]:
    """A video member as :func:`reidx.pipeline.video.iter_video_frames` reads it, and a closer (or None).

    A file in a folder is passed by path (streamed) and one behind a URL as its fsspec file (streamed,
    each read within the timeout); a member of a tar/zip archive is read whole (capped by
    ``max_member_bytes``). The same checks as for images (links out of the folder, unsafe or
    oversized archive members); a refusal or read error is a :class:`VideoDecodeError` with the reason.
    """
    if archive_type(source.uri):
        ((_, data, reason),) = list(read_members(source, [member]))
        if reason:
            raise VideoDecodeError(reason)
        return data, None
    if "://" in source.uri:
        try:
            video = _open_binary(f"{source.uri.rstrip('/')}/{member}", source)
        except Exception as exc:  # noqa: BLE001 - a URL source's filesystem may raise anything: this video fails
            raise VideoDecodeError(f"cannot read: {exc}") from None
        return video, video.close
    root = _local_root(source.uri)
    reason = _link_reason(root / member, os.path.realpath(root)) if _walks(source.uri) else None
    if reason:
        raise VideoDecodeError(reason)
    return str(root / member), None  # iter_video_frames opens (and closes) it
