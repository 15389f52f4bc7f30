"""Labelled person-crop sets: listing image files and reading their identity labels.

A crop set is returned as an Arrow-friendly dict of columns (see :data:`CROP_COLUMNS`):

- ``path`` (str): absolute path of the image file
- ``person_id`` (int64 or null): identity label; ``-1`` marks junk (Market-1501), ``0`` distractors
- ``camera`` (string or null): camera as written in the name (``"1"`` in Market naming; see :mod:`reidx.pipeline.labels`)

Labels come from Market-1501 file naming (``PPPP_cCsS_FFFFFF_NN.jpg``) or from a CSV/Parquet
table with the columns ``path``, ``person_id``, ``camera`` for data named otherwise.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pyarrow as pa

from reidx.pipeline.labels import parse_market_name

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
CROP_COLUMNS = ("path", "person_id", "camera")


class DatasetError(ValueError):
    """Inputs could not be listed or labelled; the message names the file and the problem."""


def list_images(inputs: list[str | os.PathLike]) -> list[Path]:
    """Expand files, folders (recursively) and glob patterns into a sorted, de-duplicated list."""
    found: dict[Path, None] = {}
    for item in inputs:
        item = os.fspath(item)
        if glob.has_magic(item):
            matches = [Path(m) for m in sorted(glob.glob(item, recursive=True))]
            if not matches:
                raise DatasetError(f"{item}: the pattern matches no file")
            candidates = matches
        elif Path(item).is_dir():
            candidates = sorted(p for p in Path(item).rglob("*") if p.is_file())
        elif Path(item).is_file():
            candidates = [Path(item)]
        else:
            raise DatasetError(f"{item}: no such file or folder")
        for path in candidates:
            if path.is_file() and (path.suffix.lower() in IMAGE_SUFFIXES or Path(item) == path):
                found.setdefault(path.resolve(), None)
    return sorted(found)


def read_label_table(path: str | os.PathLike) -> dict[Path, tuple[int, str]]:
    """Read a CSV or Parquet label table: absolute path → (person_id, camera).

    Relative paths in the table are taken relative to the table's own folder.
    """
    path = Path(path)
    try:
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        else:
            import pyarrow.csv as pacsv

            table = pacsv.read_csv(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise DatasetError(f"{path}: cannot read label table: {exc}") from None
    missing = [c for c in CROP_COLUMNS if c not in table.column_names]
    if missing:
        raise DatasetError(f"{path}: label table lacks column(s) {missing}; it needs {list(CROP_COLUMNS)}")
    labels = {}
    for row_path, pid, cam in zip(*(table.column(c).to_pylist() for c in CROP_COLUMNS)):
        if row_path is None or pid is None or cam is None:
            raise DatasetError(f"{path}: a row has an empty path, person_id or camera")
        full = Path(row_path) if os.path.isabs(row_path) else path.parent / row_path
        labels[full.resolve()] = (int(pid), str(cam))
    return labels


def label_crops(paths: list[Path], label_table: str | os.PathLike | None = None, require: bool = False) -> pa.Table:
    """Attach (person_id, camera) to each path from a label table, else from Market naming.

    With ``require=True`` an unlabelled image is an error (evaluation needs every label).
    """
    table_labels = read_label_table(label_table) if label_table else {}
    pids, cams = [], []
    for p in paths:
        label = table_labels.get(p) if table_labels else parse_market_name(p.name)
        if label is None and require:
            source = f"label table {label_table}" if label_table else "Market-1501 naming (PPPP_cC…)"
            raise DatasetError(f"{p}: no person id/camera from {source}; pass --labels TABLE")
        pids.append(label[0] if label else None)
        cams.append(label[1] if label else None)
    return pa.table(
        {
            "path": pa.array([str(p) for p in paths], pa.string()),
            "person_id": pa.array(pids, pa.int64()),
            "camera": pa.array(cams, pa.string()),
        }
    )
