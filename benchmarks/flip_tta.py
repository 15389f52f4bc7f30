"""Test-time flip: does averaging a crop's feature with its mirror image's raise mAP?

    python benchmarks/flip_tta.py [WEIGHTS ...] [--splits /tmp/reidx-train/splits]

Prints JSON: per weights file, mAP on Con-ReID (query vs bounding_box_test), cuhk03-train and, when
``--splits`` holds benchmarks/train.py's validation split, the held-out Con-ReID identities — each
plain and with the flip (the product's embedder, features l2-normalised after averaging). Nothing
to resume: one weights file takes ~2 min on two cores.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from reidx.indexers.evaluation import evaluate_split
from reidx.pipeline.embed import build_embedder, l2_normalise
from reidx.pipeline.labelled_split import embed_side

SHARED = Path(os.environ.get("REIDX_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights", nargs="*", default=["osnet_x0_25_msmt17"])
    parser.add_argument("--splits", default="/tmp/reidx-train/splits")
    args = parser.parse_args()
    data, splits = SHARED / "data", Path(args.splits)
    sets = {"conreid_test": (data / "con-reid" / "query", data / "con-reid" / "bounding_box_test"),
            "cuhk03": (data / "cuhk03-train" / "query", data / "cuhk03-train" / "gallery")}
    if (splits / "conreid-val-query").is_dir():
        sets["conreid_val"] = (splits / "conreid-val-query", splits / "conreid-val-gallery")
    result = {"benchmark": "flip-tta", "results": {}}
    for weights in args.weights:
        embedder = build_embedder(weights, threads=1)
        plain = embedder.embed
        row = {}
        for flip in (False, True):
            embedder.embed = (lambda c: l2_normalise(plain(c) + plain(np.ascontiguousarray(c[:, :, ::-1])))) \
                if flip else plain
            for name, (query, gallery) in sets.items():
                metrics = evaluate_split(embed_side([str(query)], embedder), embed_side([str(gallery)], embedder))
                row[f"{name}{'_flip' if flip else ''}_mAP"] = round(metrics.as_percent_dict()["mAP"], 2)
        result["results"][weights] = row
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
