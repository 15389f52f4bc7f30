"""Query inputs → the query persons: files, folders, globs or manifests, through the same
read → decode → detect → crop → embed composition as the nightly job (:mod:`reidx.pipeline.persons`),
with the gallery's own models.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from reidx.indexers.versions import GalleryIndex
from reidx.pipeline.gallery import DEFAULT_DETECTOR, read_config
from reidx.pipeline.imaging import DEFAULT_MAX_PIXELS
from reidx.pipeline.labels import MARKET_CAMERA, MARKET_PERSON
from reidx.pipeline.manifest import Source, load_manifest
from reidx.pipeline.models.weights import resolve_weights
from reidx.pipeline.persons import ModelSpec, persons_of_members
from reidx.pipeline.sources import SourceError, archive_type, list_source


def member_path(source: Source, member: str) -> str:
    """Where a member lives, for people and for the report: a file path, or ``archive::member``."""
    if archive_type(source.uri) or "://" in source.uri:
        return f"{source.uri}::{member}"
    root = Path(source.uri)
    return str(root / member) if root.is_dir() else str(root)


def query_sources(inputs: list[str], detect: bool) -> list[Source]:
    """Each input as a source: a ``.toml`` manifest gives its own sources; a folder, file or glob
    is one source of crops (or of full frames with ``detect``), labelled by Market-1501 naming."""
    kind = "frames" if detect else "crops"
    sources: list[Source] = []
    for number, item in enumerate(inputs, 1):
        if str(item).endswith(".toml"):
            for source in load_manifest(item).sources:
                sources.append(dataclasses.replace(source, kind=kind) if detect else source)
            continue
        uri = item if "://" in str(item) else str(Path(item).expanduser().resolve())
        if "://" not in uri and not archive_type(uri) and not any(c in uri for c in "*?[") and not Path(uri).exists():
            raise FileNotFoundError(f"query input {item} does not exist")
        sources.append(Source(name=f"query-{number}", uri=uri, kind=kind, camera_regex=MARKET_CAMERA,
                              person_id_regex=MARKET_PERSON))
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"query sources share a name ({names}); give each manifest source a unique name")
    return sources


def gallery_model_spec(gallery: Path, gallery_index: GalleryIndex, weights: str | None, backend: str, device: str,
                       detector: str | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> ModelSpec:
    """The models that made the gallery: its embedder (another one is an error) and its detector."""
    config = read_config(gallery)
    spec = weights or config.get("weights") or gallery_index.meta.embedder
    resolved = resolve_weights(spec)
    if resolved.sha256 != gallery_index.meta.embedder_sha256:
        raise ValueError(f"{gallery} was embedded with {gallery_index.meta.embedder} "
                         f"({gallery_index.meta.embedder_sha256[:12]}); --weights {spec} is another model "
                         f"({resolved.sha256[:12]}) whose vectors cannot be compared with it")
    detector = detector or config.get("detector", DEFAULT_DETECTOR)
    return ModelSpec(spec, backend=backend, device=device, max_pixels=max_pixels, detector=detector)


@dataclass
class QueryPersons:
    """Every query person (shard-schema rows + their image paths) and the images that gave none."""

    table: pa.Table | None
    paths: list[str]
    status_rows: list[dict]  # query_path, status (no_person | failed), reason


def largest_only(table: pa.Table) -> pa.Table:
    """Keep the largest box of each query image (the person the user most likely meant)."""
    keys = table["image_key"].to_pylist()
    area = ((table["x2"].to_numpy() - table["x1"].to_numpy()) * (table["y2"].to_numpy() - table["y1"].to_numpy()))
    best: dict[str, int] = {}
    for row, key in enumerate(keys):
        if key not in best or area[row] > area[best[key]]:
            best[key] = row
    return table.take(sorted(best.values()))


def collect_query_persons(sources: list[Source], spec: ModelSpec, largest: bool = False, batch_size: int = 64,
                          progress: bool = False) -> QueryPersons:
    from tqdm import tqdm

    tables, paths, status_rows = [], [], []
    listings = []
    for source in sources:
        try:
            listing = list_source(source)
        except SourceError as exc:
            raise FileNotFoundError(str(exc)) from None
        listings.append((source, listing))
        status_rows += [{"query_path": member_path(source, m), "status": "failed", "reason": r}
                        for m, r in listing.rejected]
    total = sum(len(listing.members) for _, listing in listings)
    if total == 0 and not status_rows:
        raise ValueError(f"no query images found in {', '.join(s.uri for s in sources)}")
    bar = tqdm(total=total, unit="img", desc="query images", disable=not progress)
    for source, listing in listings:
        for start in range(0, len(listing.members), batch_size):
            persons = persons_of_members(source, listing.members[start:start + batch_size], spec)
            for record in persons.records:
                if record["status"] == "failed" or not record.get("num_persons"):
                    status_rows.append({"query_path": member_path(source, record["member"]),
                                        "status": "failed" if record["status"] == "failed" else "no_person",
                                        "reason": record.get("reason")})
            if persons.table is not None:
                table = largest_only(persons.table) if largest else persons.table
                tables.append(table)
                paths += [member_path(source, m) for m in table["member"].to_pylist()]
            bar.update(len(persons.records))
    bar.close()
    table = pa.concat_tables(tables) if tables else None
    return QueryPersons(table, paths, status_rows)
