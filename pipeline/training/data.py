"""Labelled training crops: listed and labelled like every other reidx input, decoded once.

``--data`` is an image folder/glob in Market-1501 naming or a CSV/Parquet label table
(``path, person_id, camera``), read by :mod:`pipeline.datasets`. Person ids ≤ 0 (Market junk
−1 and distractors 0) are kept as *unlabelled* crops (OIM's queue can use them); images with no
label at all or that do not decode are left out and counted.

Every crop is decoded and resized (:func:`pipeline.embed.resize_crop`, as at inference) once,
before training, and kept in memory while it fits a budget (~98 KB a crop): decoding is then
paid once instead of every epoch. Beyond the budget crops are decoded again when drawn.

The data hash (sha256 over each image's content hash and its labels, in path order) goes into
the checkpoint, so a model says what it was trained on independently of where the files lie.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from reidx.pipeline.datasets import DatasetError, label_crops, list_images, read_label_table
from reidx.pipeline.embed import INPUT_HEIGHT, INPUT_WIDTH, resize_crop
from reidx.pipeline.imaging import ImageDecodeError, decode_image, load_image
from reidx.pipeline.training.losses import UNLABELLED

TABLE_SUFFIXES = {".csv", ".parquet"}
CROP_BYTES = INPUT_HEIGHT * INPUT_WIDTH * 3


@dataclass
class TrainingSet:
    """Decodable labelled crops. ``targets``: class index 0..C-1, or −1 (unlabelled)."""

    paths: list[str]
    targets: np.ndarray  # int64 (N,)
    cameras: np.ndarray  # str (N,), see reidx.pipeline.labels
    person_ids: list[int]  # class index → person id in the data
    data_hash: str
    skipped: dict[str, int] = field(default_factory=dict)  # reason → count
    cache: np.ndarray | None = None  # uint8 (N, 256, 128, 3) when it fits the budget

    @property
    def num_classes(self) -> int:
        return len(self.person_ids)

    def crops(self, indices) -> np.ndarray:
        """uint8 (len(indices), 256, 128, 3), resized exactly as the embedder does."""
        if self.cache is not None:
            return self.cache[np.asarray(indices)]
        return np.stack([resize_crop(load_image(self.paths[i])) for i in indices])


def _read(path: str):
    """(content sha256, resized crop) or (None, reason)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        return hashlib.sha256(data).hexdigest(), resize_crop(decode_image(data))
    except (ImageDecodeError, OSError) as exc:
        return None, str(exc)


def load_training_set(data: str | os.PathLike, max_cache_bytes: int = 4 << 30, workers: int = 2,
                      progress: bool = False) -> TrainingSet:
    """List, label, verify and (within ``max_cache_bytes``) decode the training crops."""
    from tqdm import tqdm

    data = Path(data)
    if data.is_file() and data.suffix.lower() in TABLE_SUFFIXES:
        paths = sorted(read_label_table(data))
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{data}: {len(missing)} listed image(s) do not exist, e.g. {missing[0]}")
        table = label_crops(paths, data)
    else:
        table = label_crops(list_images([data]))
    if table.num_rows == 0:
        raise DatasetError(f"{data}: no images to train on")

    skipped: dict[str, int] = {}
    rows = list(zip(*(table.column(c).to_pylist() for c in ("path", "person_id", "camera"))))
    labelled_rows = [r for r in rows if r[1] is not None]
    if len(labelled_rows) < len(rows):
        skipped["no person id (not Market-1501 naming; give a label table)"] = len(rows) - len(labelled_rows)
    cache_all = len(labelled_rows) * CROP_BYTES <= max_cache_bytes
    cache = np.empty((len(labelled_rows), INPUT_HEIGHT, INPUT_WIDTH, 3), np.uint8) if cache_all else None
    kept, digest = [], hashlib.sha256()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(_read, [r[0] for r in labelled_rows], chunksize=64)
        for row, (sha, crop) in tqdm(zip(labelled_rows, results), total=len(labelled_rows), unit="img",
                                     desc="decode", disable=not progress):
            if sha is None:
                reason = f"undecodable: {crop}"
                skipped[reason] = skipped.get(reason, 0) + 1
                continue
            if cache is not None:
                cache[len(kept)] = crop
            kept.append(row)
            digest.update(f"{sha} {row[1]} {row[2]}\n".encode())

    person_ids = sorted({pid for _, pid, _ in kept if pid > 0})
    if not person_ids:
        raise DatasetError(f"{data}: no labelled identity (person id > 0) among {len(rows)} images")
    index = {pid: i for i, pid in enumerate(person_ids)}
    targets = np.array([index[pid] if pid > 0 else UNLABELLED for _, pid, _ in kept], np.int64)
    return TrainingSet(
        paths=[p for p, _, _ in kept],
        targets=targets,
        cameras=np.array([cam for _, _, cam in kept], dtype=object),
        person_ids=person_ids,
        data_hash=digest.hexdigest(),
        skipped=skipped,
        cache=None if cache is None else cache[: len(kept)],
    )
