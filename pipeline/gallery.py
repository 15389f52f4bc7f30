"""A gallery folder's layout and its config: the one place that knows where things live.

::

    GALLERY/
        gallery.json      which embedder (and detector) made its vectors (this module)
        .lock             held by the one job that may write (pipeline/lock.py)
        shards/           part-*.parquet: detections + embeddings (pipeline/shards.py)
        ledger/           part-*.parquet: what each image became, the commit record (pipeline/ledger.py)
        index/            CURRENT + v-*/ Faiss index versions (indexers/versions.py)

Stages ask this module for paths instead of joining folder names themselves, so the layout can
change in one file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from reidx.pipeline.atomic import write_text_atomic

SHARDS_DIR = "shards"
LEDGER_DIR = "ledger"
INDEX_DIR = "index"
CONFIG_FILE = "gallery.json"
DEFAULT_DETECTOR = "yolox_nano.onnx"


def shards_dir(gallery: str | os.PathLike) -> Path:
    return Path(gallery) / SHARDS_DIR


def ledger_dir(gallery: str | os.PathLike) -> Path:
    return Path(gallery) / LEDGER_DIR


def index_dir(gallery: str | os.PathLike) -> Path:
    return Path(gallery) / INDEX_DIR


def is_gallery(gallery: str | os.PathLike) -> bool:
    return shards_dir(gallery).is_dir()


def read_config(gallery: str | os.PathLike) -> dict:
    """The gallery's config (embedder name, weights sha256, how to find the weights, detector); {} if none."""
    path = Path(gallery) / CONFIG_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def check_or_write_config(gallery: str | os.PathLike, weights: str, embedding_dtype: str | None = None) -> dict:
    """A gallery holds one embedder's vectors: record it on first use; another one later is an error.

    ``embedding_dtype`` (float32/float16), when given, is recorded as the type new shards store
    embeddings in (shards of either type read back as float32, so a gallery may hold both)."""
    from reidx.pipeline.models.weights import resolve_weights

    resolved = resolve_weights(weights)
    existing = read_config(gallery)
    if existing:
        if existing.get("weights_sha256") != resolved.sha256:
            raise ValueError(f"{gallery} holds embeddings of {existing.get('embedder')} "
                             f"({existing.get('weights_sha256', '?')[:12]}); --weights {weights} is another model")
        if embedding_dtype and existing.get("embedding_dtype", "float32") != embedding_dtype:
            existing = {**existing, "embedding_dtype": embedding_dtype}
            write_text_atomic(Path(gallery) / CONFIG_FILE, json.dumps(existing, indent=2))
        return existing
    # "weights" is how to find the model again (`reidx query` embeds with it): a known name or the file's path;
    # "detector": what frames sources were detected with, so `reidx query --detect` uses the same
    config = {"embedder": resolved.model_name, "weights_sha256": resolved.sha256,
              "weights": str(resolved.path) if resolved.known is None else resolved.known.name,
              "detector": DEFAULT_DETECTOR}
    if embedding_dtype:
        config["embedding_dtype"] = embedding_dtype
    write_text_atomic(Path(gallery) / CONFIG_FILE, json.dumps(config, indent=2))
    return config


def register_sources(gallery: str | os.PathLike, sources: dict[str, str], allow_uri_change: bool = False) -> None:
    """Remember each source name's uri in the config; a known name with another uri is an error.

    Images are keyed by ``<source name>/<member>``: if a name silently pointed elsewhere, the new
    archive's images would be skipped as "already indexed" (same keys) or mixed with the old ones.
    ``allow_uri_change`` accepts a moved source (say, a remounted share) on purpose.
    """
    config = read_config(gallery)
    known = dict(config.get("sources", {}))
    changed = {name: (known[name], uri) for name, uri in sources.items() if name in known and known[name] != uri}
    if changed and not allow_uri_change:
        name, (old, new) = next(iter(changed.items()))
        raise ValueError(f"source {name!r} was indexed from {old}, the manifest now says {new}: give the new "
                         f"archive another source name, or pass --allow-uri-change if it is the same data moved")
    if changed or set(sources) - set(known):
        known.update(sources)
        config["sources"] = known
        write_text_atomic(Path(gallery) / CONFIG_FILE, json.dumps(config, indent=2))
