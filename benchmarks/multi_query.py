"""Multi-image queries: fused mAP beside single-query mAP on the Con-ReID split, same run.

    python benchmarks/multi_query.py [--weights osnet_x0_25_msmt17]

The 212 query crops (53 identities, 4 each, in 2–4 cameras) are searched in a flat index of the
5,295 gallery crops (real shards, ledger and ``build_index`` in a temporary gallery) through
``reidx.indexers.query.search_persons``, the code ``reidx query`` runs, with full-length lists
(top-k = the gallery), and scored by ``score_results`` (``--metrics``):

- ``single``: every crop its own query — Market-1501's single-query protocol (gallery items of the
  same id and camera ignored).
- ``person_id,camera`` groups (162 queries: Market-1501's multi-query convention, the images of
  one id in one camera): the junk rule is unchanged, so this is directly comparable to ``single``.
- ``person_id`` groups (53 queries, each over all of an id's query cameras): the junk rule then
  ignores the id's items in *every* camera of the group, so ``single`` is also scored under that
  rule (``single_group_junk``: each crop searched alone, its group's cameras ignored) — fusion's
  own gain is the difference to that row, not to ``single``.

Fusions: ``mean`` (the renormalised mean vector) and ``min`` (best-of: smallest distance to any
member). Features are the cached OSNet features of benchmarks/search.py. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search import CON_REID, real_features  # noqa: E402

from reidx.indexers.build import build_index  # noqa: E402
from reidx.indexers.query import search_persons  # noqa: E402
from reidx.indexers.query_inputs import QueryPersons  # noqa: E402
from reidx.indexers.results import score_results  # noqa: E402
from reidx.indexers.versions import load_index  # noqa: E402
from reidx.pipeline.datasets import list_images  # noqa: E402
from reidx.pipeline.embed import EmbedderInfo  # noqa: E402
from reidx.pipeline.labels import MARKET_CAMERA, MARKET_PERSON  # noqa: E402
from reidx.pipeline.ledger import append, ledger_rows  # noqa: E402
from reidx.pipeline.manifest import Source  # noqa: E402
from reidx.pipeline.models.weights import resolve_weights  # noqa: E402
from reidx.pipeline.persons import shard_table  # noqa: E402
from reidx.pipeline.shards import detection_id, image_key, write_shard  # noqa: E402


def crops(name: str, folder: Path, paths: list[Path], features: np.ndarray, info: EmbedderInfo) -> pa.Table:
    source = Source(name=name, uri=str(folder), kind="crops", camera_regex=MARKET_CAMERA,
                    person_id_regex=MARKET_PERSON)
    entries = [(detection_id(image_key(name, p.name), 0), image_key(name, p.name), p.name, 64, 128,
                0.0, 0.0, 64.0, 128.0, 1.0) for p in paths]
    return shard_table(source, entries, features, info)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="osnet_x0_25_msmt17")
    args = parser.parse_args()
    folders = ["bounding_box_train", "bounding_box_test", "query"]
    features, _ = real_features(args.weights, folders)
    listed = [list_images([CON_REID / f]) for f in folders]
    _, test, query = np.split(np.arange(len(features)), np.cumsum([len(x) for x in listed])[:-1])
    resolved = resolve_weights(args.weights)
    info = EmbedderInfo(args.weights, resolved.sha256, features.shape[1], "onnx")
    report = {"weights": args.weights, "gallery": len(test), "query_crops": len(query), "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        gallery = Path(tmp) / "gallery"
        table = crops("con-reid-gallery", CON_REID / "bounding_box_test", listed[1], features[test], info)
        shard = write_shard(table, gallery)
        append(gallery, ledger_rows([{"image_key": k, "source": "con-reid-gallery", "member": m, "status": "ok",
                                      "num_persons": 1, "shard": shard}
                                     for k, m in zip(table["image_key"].to_pylist(), table["member"].to_pylist())]))
        build_index(gallery, index_type="flat", knn_k=0)
        gi = load_index(gallery, gpu="off")
        q_table = crops("query-1", CON_REID / "query", listed[2], features[query], info)
        persons = QueryPersons(q_table, [str(p) for p in listed[2]], [])
        k = gi.count
        plans = [("single", (), "mean"), ("person_id,camera/mean", ("person_id", "camera"), "mean"),
                 ("person_id,camera/min", ("person_id", "camera"), "min"), ("person_id/mean", ("person_id",), "mean"),
                 ("person_id/min", ("person_id",), "min")]
        single = None
        for name, group_by, fusion in plans:
            started = time.perf_counter()
            results = search_persons(gi, persons, top_k=k, group_by=group_by, fusion=fusion)
            seconds = time.perf_counter() - started
            scores = score_results(results, gi.items)
            report["runs"][name] = {"queries": scores["queries"], "mAP": round(scores["mAP"], 2),
                                    "rank1": round(scores["rank1"], 2), "rank5": round(scores["rank5"], 2),
                                    "mINP": round(scores["mINP"], 2), "search_and_rows_s": round(seconds, 2)}
            if name == "single":
                single = results
            print(f"[multi_query] {name}: {report['runs'][name]}", file=sys.stderr, flush=True)
        # single queries under the person_id groups' junk rule (all of the id's query cameras ignored)
        pids, cams = q_table["person_id"].to_pylist(), q_table["camera"].to_pylist()
        group_cams = {p: sorted({c for pp, c in zip(pids, cams) if pp == p}) for p in set(pids)}
        by_query = dict(zip(q_table["detection_id"].to_pylist(), pids))
        widened = single.set_column(single.schema.get_field_index("query_cameras"), "query_cameras",
                                    pa.array([group_cams[by_query[q]] for q in single["query_id"].to_pylist()],
                                             pa.list_(pa.string())))
        scores = score_results(widened, gi.items)
        report["runs"]["single_group_junk"] = {"queries": scores["queries"], "mAP": round(scores["mAP"], 2),
                                               "rank1": round(scores["rank1"], 2), "rank5": round(scores["rank5"], 2),
                                               "mINP": round(scores["mINP"], 2)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
