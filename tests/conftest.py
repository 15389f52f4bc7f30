"""Shared test fixtures: real weights and data from ../shared, real features cached per session.

Tests read ../shared (beside the repository) unless $REIDX_SHARED points elsewhere; weights are
found through the project's own lookup with $REIDX_MODEL_DIR set to its models folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("REIDX_SHARED", REPO.parent / "shared")).resolve()
os.environ.setdefault("REIDX_MODEL_DIR", str(SHARED / "models"))

HAVE_SHARED = (SHARED / "models").is_dir() and (SHARED / "data").is_dir()


def pytest_collection_modifyitems(config, items):
    """The real-data tests need ../shared; the hermetic unit layer (tests/unit/) runs without it."""
    unit = Path(__file__).resolve().parent / "unit"
    if not HAVE_SHARED and any(unit not in Path(str(item.fspath)).resolve().parents for item in items):
        raise pytest.UsageError(f"the tests need the shared weights and data at {SHARED} (set REIDX_SHARED); "
                                f"without them run the unit layer alone: pytest tests/unit")

CON_REID = SHARED / "data" / "con-reid"
SCENES = SHARED / "data" / "scenes"
MODELS = SHARED / "models"


def crops_manifest(path: Path, uri, extra: str = "") -> Path:
    """A manifest with one crops source named "crops" at ``uri``, labelled by Market-1501 naming."""
    path.write_text(f"""[[source]]
name = "crops"
uri = "{uri}"
kind = "crops"
camera = {{ regex = '_c(\\d+)' }}
labels = {{ person_id = '^(-?\\d+)_c' }}
{extra}""")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return SHARED


@pytest.fixture(scope="session")
def reference() -> dict:
    import json

    return json.loads((SHARED / "data" / "reference.json").read_text())


_SPLITS: dict = {}


def con_reid_split(weights: str):
    """(query, gallery) EmbeddedSplit of the Con-ReID evaluation split, embedded once per session."""
    if weights not in _SPLITS:
        from reidx.pipeline.labelled_split import embed_side
        from reidx.pipeline.embed import build_embedder

        embedder = build_embedder(weights)  # the shipped default path
        _SPLITS[weights] = (
            embed_side([str(CON_REID / "query")], embedder),
            embed_side([str(CON_REID / "bounding_box_test")], embedder),
        )
    return _SPLITS[weights]


@pytest.fixture(scope="session")
def msmt17_split():
    return con_reid_split("osnet_x0_25_msmt17")


@pytest.fixture(scope="session")
def market_split():
    return con_reid_split("osnet_x0_25_market1501")
