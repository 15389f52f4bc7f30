"""Person search with re-ranking (issue 15): does the default lower the query's AP on the 16 scene frames?

    python benchmarks/rerank_person_search.py

Gallery: every detection of the default detector (``Detector()``, as `reidx index` runs it) in
the 16 frames of ../shared/data/scenes/frames, cropped and embedded with each weights. A
detection is the query person (0001, the woman in the white dress) when its IoU with her
hand-checked box (tests/data/scene_person_boxes.json, docs/detection.md) is ≥ 0.5. Queries: the
two crops in scenes/queries, each searched on its own. AP (all-point, over the whole gallery,
ties by gallery order) of plain ranking and of each method with each preset, in exact mode
(`reidx evaluate`) and in scalable mode as `reidx query` runs it (top 400 candidates, a 30-wide
graph: both cover this gallery). Prints one JSON object; detections and features are cached in
the temp folder.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("REIDX_MODEL_DIR", str(REPO.parent / "shared" / "models"))
SCENES = REPO.parent / "shared" / "data" / "scenes"
TRUTH = REPO / "tests" / "data" / "scene_person_boxes.json"
WEIGHTS = ("osnet_x0_25_msmt17", "osnet_x0_25_market1501")
METHODS = ("k-reciprocal", "sim-graph", "sim")
PRESETS = ("adaptive", "safe", "published")
NOTE = "query person 0001"


def detections() -> tuple[list[str], list[np.ndarray]]:
    """Frame names and the default detector's boxes (n, 5) per frame, cached."""
    cache = Path(tempfile.gettempdir()) / "reidx_person_search_boxes.npz"
    frames = sorted((SCENES / "frames").glob("*.jpg"))
    if not cache.exists():
        from reidx.pipeline.detect import Detector
        from reidx.pipeline.imaging import load_image

        detector, images = Detector(), [np.asarray(load_image(p)) for p in frames]
        boxes = [b for i in range(0, len(images), 8) for b in detector.detect(images[i:i + 8])]
        np.savez(cache, **{p.name: b for p, b in zip(frames, boxes)})
    stored = np.load(cache)
    return [p.name for p in frames], [stored[p.name] for p in frames]


def features(weights: str, names: list[str], boxes: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(queries, gallery) unit features, cached per weights."""
    cache = Path(tempfile.gettempdir()) / f"reidx_person_search_{weights}.npz"
    if not cache.exists():
        from PIL import Image

        from reidx.pipeline.boxes import crop_boxes
        from reidx.pipeline.embed import TorchEmbedder, resize_crop
        from reidx.pipeline.imaging import load_image

        embedder = TorchEmbedder(weights)
        queries = embedder.embed(np.stack([resize_crop(load_image(p))
                                           for p in sorted((SCENES / "queries").glob("*.jpg"))]))
        crops = [resize_crop(Image.fromarray(c)) for name, b in zip(names, boxes)
                 for c in crop_boxes(np.asarray(load_image(SCENES / "frames" / name)), b)]
        np.savez(cache, query=queries, gallery=embedder.embed(np.stack(crops)))
    stored = np.load(cache)
    return stored["query"], stored["gallery"]


def is_her(names: list[str], boxes: list[np.ndarray]) -> np.ndarray:
    from reidx.pipeline.boxes import box_iou

    truth = json.loads(TRUTH.read_text())["frames"]
    found = []
    for name, frame_boxes in zip(names, boxes):
        (box,) = [p["box"] for p in truth[name] if NOTE in p["note"]]
        found.append(box_iou(np.array([box], np.float64), frame_boxes)[0] >= 0.5 if len(frame_boxes)
                     else np.zeros(0, bool))
    return np.concatenate(found)


def average_precision(distances: np.ndarray, relevant: np.ndarray) -> float:
    """All-point AP of one ranking (stable: ties by gallery order)."""
    hits = relevant[np.argsort(distances, kind="stable")]
    if not hits.any():
        return 0.0
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].mean())


def main() -> None:
    import torch

    from reidx.indexers.distances import unit_euclidean
    from reidx.indexers.rerank import default_params, exact_strengths, rerank
    from reidx.indexers.rerank_lists import rerank_features_scalable

    torch.set_num_threads(1)
    start = time.perf_counter()
    names, boxes = detections()
    relevant = is_her(names, boxes)
    result = {"benchmark": "rerank_person_search", "frames": len(names), "gallery": int(sum(map(len, boxes))),
              "query_person_detections": int(relevant.sum()), "metric": "AP (percent) of each query crop",
              "results": {}}
    for weights in WEIGHTS:
        q, g = features(weights, names, boxes)
        q_g, q_q, g_g = unit_euclidean(q, g), unit_euclidean(q, q), unit_euclidean(g, g)
        profile, strength = exact_strengths(q_g, g_g)
        row = {"gallery_profile": profile, "query_strengths": [round(float(s), 3) for s in strength],
               "plain": [round(100 * average_precision(d, relevant), 2) for d in q_g]}
        for method in METHODS:
            for preset in PRESETS:
                params = default_params(method, preset)
                for mode, ranked in (("exact", rerank(method, q_g, q_q, g_g, params)),
                                     ("scalable", rerank_features_scalable(method, q, g, params))):
                    row[f"{method} {preset} {mode}"] = [round(100 * average_precision(d, relevant), 2) for d in ranked]
        result["results"][weights.removeprefix("osnet_x0_25_")] = row
    result["default_never_below_plain"] = all(
        a >= p for w in result["results"].values() for k, v in w.items() if "adaptive" in k
        for a, p in zip(v, w["plain"]))
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
