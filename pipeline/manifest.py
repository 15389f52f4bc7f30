"""Manifests: which image archives the nightly job walks, validated with messages that say where.

A manifest is a TOML file with one ``[[source]]`` table per archive::

    version = 1

    [[source]]
    name = "con-reid-query"            # unique in the manifest; part of every image key
    uri = "../shared/data/con-reid/query"  # folder, glob, .tar/.tar.gz/.tgz/.zip, or fsspec URL;
                                        # relative paths are relative to the manifest file
    kind = "crops"                      # "crops": each image is one person; "frames": detect people;
                                        # "video": MP4/MKV/AVI/MPEG-TS files, frames detected and tracked
    camera = { regex = '_c(\\d+)' }     # or a constant: camera = "gate-3" / camera = 3
    timestamp = { regex = '(\\d{8}T\\d{6})', format = "%Y%m%dT%H%M%S" }   # optional, or a frame number:
    # timestamp = { regex = '_(\\d{6})\\.jpg$', frame_rate = 25, start = 2013-01-01T08:00:00 }
    labels = { person_id = '^(-?\\d+)_' }   # optional, for evaluation sets
    include = ["*.jpg"]                 # optional fnmatch patterns on the member path
    exclude = ["*/thumbs/*"]            # optional
    max_member_bytes = 268435456        # optional, also top-level for every source: larger files are refused
    timeout_s = 30                      # optional, also top-level: URL sources, seconds per network operation

Video sources (``kind = "video"``, docs/video.md) take four more keys, refused on other kinds::

    fps = 3                             # sample N frames per second of presentation time, or
    every = 5                           # every k-th decoded frame; neither: every frame
    segment_s = 60                      # seconds of video per ledger entry (resume point), default 60
    index = "detections"                # or "tracks": one vector per track and segment

and their ``timestamp`` is the video's *start* time (a frame's time adds its presentation time):
the regex/format above on the file name, or a TOML date-time constant such as
``timestamp = 2024-05-01T07:30:00`` (with an offset, ``...+02:00``, it is stored in UTC).

Regexes are searched in the member path (POSIX, relative to the source); each has exactly one
(group), the value (others are written ``(?:...)``). Errors name the file, the source and the key.

Labels are checked twice. When the manifest loads, person_id's group may capture only digits
and a sign (so ``(\\w+)`` fails at once, not in the workers after the night started). Per image,
a captured number that still is no int64 (``99999999999999999999_c1...``) makes that image fail
with a reason starting ``label:`` — not null: a gallery that declares labels is used to measure
accuracy, and an unlabelled image there would silently count as a distractor (the night goes on;
the ledger names the image). A name the regex does not match has no label (null).
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path

KINDS = ("crops", "frames", "video")
VIDEO_INDEX = ("detections", "tracks")  # what a video source stores per person: each detection, or each track
DEFAULT_SEGMENT_S = 60.0  # video seconds per ledger entry: a crash loses at most this much work per video
# A member is read into a worker's memory whole, so its size is capped before reading: a 1.5 MB
# zip held a 1.5 GiB member of zeros and the worker was killed. 256 MiB is far above any real
# image (an uncompressed 24-bit BMP at the 50-megapixel decode cap is 150 MB; camera JPEGs are a
# few MB) and still small enough for a worker to hold while it decodes.
DEFAULT_MAX_MEMBER_BYTES = 256 * 1024 * 1024
# A URL source's server that accepts a connection and never answers held the night for minutes:
# each network operation (connect, a listing step, one read) gets this long, then that source or
# member fails with a recorded reason. 30 s is far above a healthy server's answer time.
DEFAULT_TIMEOUT_S = 30.0
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # person_id is an int64 column of the shards
VIDEO_KEYS = {"fps", "every", "segment_s", "index"}  # kind = "video" only
SOURCE_KEYS = {"name", "uri", "kind", "camera", "timestamp", "labels", "include", "exclude", "max_member_bytes",
               "timeout_s"} | VIDEO_KEYS
DEFAULT_KEYS = {"max_member_bytes", "timeout_s"}  # also allowed at the top level, as every source's default
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
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
    timeout_s: float = DEFAULT_TIMEOUT_S
    timestamp_constant: datetime | None = None  # video sources: the start time of every video
    timestamp_frame_rate: float | None = None  # the regex captures a frame number: start + frame / rate;
    timestamp_start: datetime | None = None  # (recordings named by frame number, e.g. Market-1501's 25 frames/s)
    fps: float | None = None  # video sampling: frames per second of presentation time ...
    every: int | None = None  # ... or every k-th decoded frame (neither: all frames)
    segment_s: float = DEFAULT_SEGMENT_S
    video_index: str = "detections"

    def camera_of(self, member: str) -> str | None:
        if self.camera_constant is not None:
            return self.camera_constant
        match = self.camera_regex.search(member) if self.camera_regex else None
        return match.group(1) if match else None

    def timestamp_of(self, member: str) -> datetime | None:
        """The image's time; for a video its start time (frames add their presentation time)."""
        if self.timestamp_constant is not None:
            return self.timestamp_constant
        match = self.timestamp_regex.search(member) if self.timestamp_regex else None
        if not match or match.group(1) is None:
            return None
        try:
            if self.timestamp_frame_rate:
                return self.timestamp_start + timedelta(seconds=int(match.group(1)) / self.timestamp_frame_rate)
            return datetime.strptime(match.group(1), self.timestamp_format)
        except (ValueError, OverflowError):
            return None

    def _person_id(self, member: str) -> tuple[int | None, str | None]:
        """(label, None), (None, None) when the name carries none, or (None, reason "label: ...")."""
        match = self.person_id_regex.search(member) if self.person_id_regex else None
        if not match or match.group(1) is None:
            return None, None
        text = match.group(1)
        try:
            value = int(text)
        except ValueError:
            return None, (f"label: person_id {text[:40]!r} of this name is not an integer; "
                          f"fix labels.person_id in {self.manifest or 'the manifest'}")
        if not INT64_MIN <= value <= INT64_MAX:
            return None, (f"label: person_id {text[:40]} does not fit in 64 bits; rename the file or "
                          f"fix labels.person_id in {self.manifest or 'the manifest'}")
        return value, None

    def person_id_of(self, member: str) -> int | None:
        """The label, or None (no label, or one that is no int64: see :meth:`label_error`); never raises."""
        return self._person_id(member)[0]

    def label_error(self, member: str) -> str | None:
        """Why this member's label cannot be stored (the image is then recorded as failed), or None."""
        return self._person_id(member)[1]


@dataclass(frozen=True)
class Manifest:
    path: str
    sources: tuple[Source, ...] = field(default_factory=tuple)


def _regex(value, where: str, digits: bool = False) -> re.Pattern:
    if not isinstance(value, str):
        raise ManifestError(f"{where}: must be a regular expression string, got {type(value).__name__}")
    try:
        pattern = re.compile(value)
    except (re.error, OverflowError, RecursionError) as exc:
        raise ManifestError(f"{where}: invalid regular expression {value!r}: {exc}") from None
    if pattern.groups < 1:
        raise ManifestError(f"{where}: regular expression {value!r} needs a (group) capturing the value")
    if pattern.groups > 1:  # only the first would be used: say so instead of guessing
        raise ManifestError(f"{where}: regular expression {value!r} has {pattern.groups} (groups); keep the one "
                            f"capturing the value and write the others as (?:...)")
    if digits and _group_captures_only_digits(pattern) is False:
        raise ManifestError(f"{where}: the (group) of {value!r} may capture only digits and a sign, "
                            f"e.g. '^(-?\\d+)_'")
    return pattern


_DIGIT_CHARS = set("0123456789+-")


def _group_captures_only_digits(pattern: re.Pattern) -> bool | None:
    """Whether every character group 1 can capture is a digit or a sign; None where it cannot be told.

    Walks the parsed regex (the standard library's own parser): literals, classes, ranges,
    repeats, alternations and nested groups are followed; anything else (``.``, ``\\w``, negated
    classes, back-references) can capture a non-digit.
    """
    try:
        try:
            from re import _constants as sre, _parser as parser
        except ImportError:  # Python < 3.11
            import sre_constants as sre
            import sre_parse as parser
        parsed = parser.parse(pattern.pattern, pattern.flags)
    except Exception:  # noqa: BLE001 - an internal API: when it changes, the per-image check still holds
        return None

    def char_ok(code: int) -> bool:
        return chr(code) in _DIGIT_CHARS or chr(code).isdigit()

    def items_ok(items) -> bool:
        for op, av in items:
            if op is sre.LITERAL:
                ok = char_ok(av)
            elif op is sre.IN:
                ok = all((o is sre.LITERAL and char_ok(a)) or (o is sre.RANGE and all(map(char_ok, range(a[0], a[1] + 1))))
                         or (o is sre.CATEGORY and a is sre.CATEGORY_DIGIT) for o, a in av)
            elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT, getattr(sre, "POSSESSIVE_REPEAT", None)):
                ok = items_ok(av[2])
            elif op is sre.SUBPATTERN:
                ok = items_ok(av[-1])
            elif op is sre.BRANCH:
                ok = all(items_ok(branch) for branch in av[1])
            elif op is getattr(sre, "ATOMIC_GROUP", None):
                ok = items_ok(av)
            elif op in (sre.AT, sre.ASSERT, sre.ASSERT_NOT):
                ok = True  # anchors and look-arounds capture nothing
            else:
                ok = False
            if not ok:
                return False
        return True

    def find_group(items):
        for op, av in items:
            if op is sre.SUBPATTERN and av[0] == 1:
                return av[-1]
            children = ([av[2]] if op in (sre.MAX_REPEAT, sre.MIN_REPEAT, getattr(sre, "POSSESSIVE_REPEAT", None))
                        else [av[-1]] if op in (sre.SUBPATTERN, sre.ASSERT, sre.ASSERT_NOT)
                        else av[1] if op is sre.BRANCH else [av] if op is getattr(sre, "ATOMIC_GROUP", None) else [])
            for child in children:
                found = find_group(child)
                if found is not None:
                    return found
        return None

    try:
        group = find_group(parsed)
        return None if group is None else items_ok(group)
    except Exception:  # noqa: BLE001 - see above
        return None


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


def _positive(value, where: str, key: str) -> int | float:
    """max_member_bytes: a positive whole number; timeout_s: a positive number of seconds."""
    kinds = (int, float) if key == "timeout_s" else (int,)
    if isinstance(value, bool) or not isinstance(value, kinds) or not 0 < value < float("inf"):
        what = "number of seconds" if key == "timeout_s" else "whole number"
        raise ManifestError(f"{where}: must be a positive {what}, got {value!r}")
    return float(value) if key == "timeout_s" else value


def _resolve_uri(uri: str, base: Path) -> str:
    if "://" in uri:
        return uri
    path = Path(uri).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def _source(raw, index: int, file: str, base: Path, defaults: dict) -> Source:
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
    if isinstance(raw.get("timestamp"), (datetime, date, time)):
        fields["timestamp_constant"] = _start_time(raw["timestamp"], raw["kind"], f"{where}: key 'timestamp'")
    elif "timestamp" in raw:
        spec = _table(raw["timestamp"], f"{where}: key 'timestamp'", {"regex", "format", "frame_rate", "start"},
                      {"regex"})
        fields["timestamp_regex"] = _regex(spec["regex"], f"{where}: key 'timestamp.regex'")
        if "frame_rate" in spec or "start" in spec:
            rate, start = spec.get("frame_rate"), spec.get("start")
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or rate <= 0 or "format" in spec \
                    or not isinstance(start, datetime):
                raise ManifestError(f"{where}: key 'timestamp' with a frame number needs frame_rate (frames per "
                                    f"second, > 0) and start (a TOML date-time), and no format")
            fields.update(timestamp_frame_rate=float(rate), timestamp_start=start)
        else:
            if not isinstance(spec.get("format"), str) or "%" not in spec["format"]:
                raise ManifestError(f"{where}: key 'timestamp.format' must be a strptime format such as '%Y%m%d'")
            fields["timestamp_format"] = spec["format"]
    if "labels" in raw:
        spec = _table(raw["labels"], f"{where}: key 'labels'", {"person_id"}, {"person_id"})
        fields["person_id_regex"] = _regex(spec["person_id"], f"{where}: key 'labels.person_id'", digits=True)
    for key in ("include", "exclude"):
        if key in raw:
            fields[key] = _patterns(raw[key], f"{where}: key '{key}'")
    for key in DEFAULT_KEYS:
        if key in raw:
            fields[key] = _positive(raw[key], f"{where}: key '{key}'", key)
        elif key in defaults:
            fields[key] = defaults[key]
    fields.update(_video_fields(raw, where))
    return Source(name=name, uri=_resolve_uri(raw["uri"], base), kind=raw["kind"], manifest=file, **fields)


def _start_time(value, kind: str, where: str) -> datetime:
    """A constant timestamp: a video's start (UTC when it has an offset); a constant for stills would be wrong."""
    if kind != "video":
        raise ManifestError(f"{where}: a constant timestamp is only for kind = \"video\" (the videos' start time); "
                            f"for images give {{ regex = ..., format = ... }} on the file name")
    if not isinstance(value, datetime):
        raise ManifestError(f"{where}: must be a date and time such as 2024-05-01T07:30:00, got {value!r}")
    if value.tzinfo is not None:
        value = value.astimezone(timezone.utc).replace(tzinfo=None)
    return value


def _video_fields(raw: dict, where: str) -> dict:
    """fps / every / segment_s / index, validated; an error on any other kind of source."""
    given = sorted(VIDEO_KEYS & set(raw))
    if raw["kind"] != "video":
        if given:
            raise ManifestError(f"{where}: key(s) {given} are only for kind = \"video\" sources")
        return {}
    if "fps" in raw and "every" in raw:
        raise ManifestError(f"{where}: give 'fps' (frames per second) or 'every' (every k-th frame), not both")
    fields: dict = {}
    for key in ("fps", "segment_s"):
        if key in raw:
            value = raw[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ManifestError(f"{where}: key '{key}' must be a positive number of "
                                    f"{'frames per second' if key == 'fps' else 'seconds'}, got {value!r}")
            fields[key] = float(value)
    if "every" in raw:
        if isinstance(raw["every"], bool) or not isinstance(raw["every"], int) or raw["every"] < 1:
            raise ManifestError(f"{where}: key 'every' must be a whole number >= 1, got {raw['every']!r}")
        fields["every"] = raw["every"]
    if "index" in raw:
        if raw["index"] not in VIDEO_INDEX:
            raise ManifestError(f"{where}: key 'index' must be one of {list(VIDEO_INDEX)}, got {raw['index']!r}")
        fields["video_index"] = raw["index"]
    return fields


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
    unknown = set(data) - {"version", "source"} - DEFAULT_KEYS
    if unknown:
        raise ManifestError(f"{file}: unknown top-level key(s) {sorted(unknown)}; expected 'version', "
                            f"[[source]] and the defaults {sorted(DEFAULT_KEYS)}")
    defaults = {key: _positive(data[key], f"{file}: key '{key}'", key) for key in DEFAULT_KEYS if key in data}
    if data.get("version", 1) != 1:
        raise ManifestError(f"{file}: key 'version': this reidx reads version 1, got {data['version']!r}")
    raw_sources = data.get("source")
    if not isinstance(raw_sources, list) or not raw_sources:
        raise ManifestError(f"{file}: no [[source]] tables; a manifest lists at least one source")
    sources = tuple(_source(raw, i, file, path.parent.resolve(), defaults) for i, raw in enumerate(raw_sources))
    seen: set[str] = set()
    for source in sources:
        if source.name in seen:
            raise ManifestError(f"{file}: source name {source.name!r} is used twice; names must be unique")
        seen.add(source.name)
    return Manifest(file, sources)
