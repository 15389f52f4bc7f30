"""Manifests: which image archives the nightly job walks, validated with messages that say where.

A manifest is a TOML file with one ``[[source]]`` table per archive::

    version = 1

    [[source]]
    name = "con-reid-query"            # unique in the manifest; part of every image key
    uri = "../shared/data/con-reid/query"  # folder, glob, .tar/.tar.gz/.tgz/.zip, or fsspec URL;
                                        # relative paths are relative to the manifest file
    kind = "crops"                      # "crops": each image is one person; "frames": detect people
    camera = { regex = '_c(\\d+)' }     # or a constant: camera = "gate-3" / camera = 3
    timestamp = { regex = '(\\d{8}T\\d{6})', format = "%Y%m%dT%H%M%S" }   # optional
    labels = { person_id = '^(-?\\d+)_' }   # optional, for evaluation sets
    include = ["*.jpg"]                 # optional fnmatch patterns on the member path
    exclude = ["*/thumbs/*"]            # optional

Regexes are searched in the member path (POSIX, relative to the source); the first group is
the value. Every error names the file, the source and the key.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

KINDS = ("crops", "frames")
SOURCE_KEYS = {"name", "uri", "kind", "camera", "timestamp", "labels", "include", "exclude"}
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ManifestError(ValueError):
    """A manifest is invalid; the message names the file, the source and the key."""


@dataclass(frozen=True)
class Source:
    """One validated source of a manifest."""

    name: str
    uri: str  # absolute local path / pattern, or an fsspec URL
    kind: str
    camera_constant: str | None = None
    camera_regex: re.Pattern | None = None
    timestamp_regex: re.Pattern | None = None
    timestamp_format: str | None = None
    person_id_regex: re.Pattern | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    manifest: str = ""

    def camera_of(self, member: str) -> str | None:
        if self.camera_constant is not None:
            return self.camera_constant
        match = self.camera_regex.search(member) if self.camera_regex else None
        return match.group(1) if match else None

    def timestamp_of(self, member: str) -> datetime | None:
        match = self.timestamp_regex.search(member) if self.timestamp_regex else None
        if not match:
            return None
        try:
            return datetime.strptime(match.group(1), self.timestamp_format)
        except ValueError:
            return None

    def person_id_of(self, member: str) -> int | None:
        match = self.person_id_regex.search(member) if self.person_id_regex else None
        return int(match.group(1)) if match else None


@dataclass(frozen=True)
class Manifest:
    path: str
    sources: tuple[Source, ...] = field(default_factory=tuple)


def _regex(value, where: str) -> re.Pattern:
    if not isinstance(value, str):
        raise ManifestError(f"{where}: must be a regular expression string, got {type(value).__name__}")
    try:
        pattern = re.compile(value)
    except re.error as exc:
        raise ManifestError(f"{where}: invalid regular expression {value!r}: {exc}") from None
    if pattern.groups < 1:
        raise ManifestError(f"{where}: regular expression {value!r} needs a (group) capturing the value")
    return pattern


def _table(value, where: str, keys: set[str], required: set[str]) -> dict:
    if not isinstance(value, dict):
        raise ManifestError(f"{where}: must be a table like {{ {', '.join(sorted(required))} = ... }}")
    unknown = set(value) - keys
    if unknown:
        raise ManifestError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(keys)}")
    missing = required - set(value)
    if missing:
        raise ManifestError(f"{where}: missing key(s) {sorted(missing)}")
    return value


def _patterns(value, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ManifestError(f"{where}: must be a list of patterns such as [\"*.jpg\"]")
    return tuple(value)


def _resolve_uri(uri: str, base: Path) -> str:
    if "://" in uri:
        return uri
    path = Path(uri).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def _source(raw, index: int, file: str, base: Path) -> Source:
    where = f"{file}: source[{index}]"
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: must be a table ([[source]])")
    name = raw.get("name")
    if isinstance(name, str):
        where = f"{file}: source[{index}] ({name})"
    unknown = set(raw) - SOURCE_KEYS
    if unknown:
        raise ManifestError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(SOURCE_KEYS)}")
    for key in ("name", "uri", "kind"):
        if key not in raw:
            raise ManifestError(f"{where}: missing required key '{key}'")
        if not isinstance(raw[key], str) or not raw[key]:
            raise ManifestError(f"{where}: key '{key}' must be a non-empty string")
    if not NAME_PATTERN.match(name):
        raise ManifestError(f"{where}: key 'name' {name!r} may use letters, digits, '.', '_' and '-' only")
    if raw["kind"] not in KINDS:
        raise ManifestError(f"{where}: key 'kind' must be one of {list(KINDS)}, got {raw['kind']!r}")

    fields: dict = {}
    camera = raw.get("camera")
    if isinstance(camera, (str, int)) and not isinstance(camera, bool):
        fields["camera_constant"] = str(camera)
    elif camera is not None:
        spec = _table(camera, f"{where}: key 'camera'", {"regex"}, {"regex"})
        fields["camera_regex"] = _regex(spec["regex"], f"{where}: key 'camera.regex'")
    if "timestamp" in raw:
        spec = _table(raw["timestamp"], f"{where}: key 'timestamp'", {"regex", "format"}, {"regex", "format"})
        fields["timestamp_regex"] = _regex(spec["regex"], f"{where}: key 'timestamp.regex'")
        if not isinstance(spec["format"], str) or "%" not in spec["format"]:
            raise ManifestError(f"{where}: key 'timestamp.format' must be a strptime format such as '%Y%m%d'")
        fields["timestamp_format"] = spec["format"]
    if "labels" in raw:
        spec = _table(raw["labels"], f"{where}: key 'labels'", {"person_id"}, {"person_id"})
        fields["person_id_regex"] = _regex(spec["person_id"], f"{where}: key 'labels.person_id'")
    for key in ("include", "exclude"):
        if key in raw:
            fields[key] = _patterns(raw[key], f"{where}: key '{key}'")
    return Source(name=name, uri=_resolve_uri(raw["uri"], base), kind=raw["kind"], manifest=file, **fields)


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Read and validate a manifest; raise :class:`ManifestError` naming file, source and key."""
    path = Path(path)
    file = str(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{file}: no such manifest") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{file}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"{file}: not valid TOML: {exc}") from None
    unknown = set(data) - {"version", "source"}
    if unknown:
        raise ManifestError(f"{file}: unknown top-level key(s) {sorted(unknown)}; expected 'version' and [[source]]")
    if data.get("version", 1) != 1:
        raise ManifestError(f"{file}: key 'version': this reidx reads version 1, got {data['version']!r}")
    raw_sources = data.get("source")
    if not isinstance(raw_sources, list) or not raw_sources:
        raise ManifestError(f"{file}: no [[source]] tables; a manifest lists at least one source")
    sources = tuple(_source(raw, i, file, path.parent.resolve()) for i, raw in enumerate(raw_sources))
    seen: set[str] = set()
    for source in sources:
        if source.name in seen:
            raise ManifestError(f"{file}: source name {source.name!r} is used twice; names must be unique")
        seen.add(source.name)
    return Manifest(file, sources)
