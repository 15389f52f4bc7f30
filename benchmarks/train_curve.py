"""Con-ReID test mAP against the number of labelled identities fine-tuned on: how much a site gains
from labelling more people, with today's `reidx train` defaults (probe, gated p 0.05, WiSE-FT α 0.8,
BatchNorm as trained).

    python benchmarks/train_curve.py --folds-of 2 [--epochs 6] [--workdir /tmp/reidx-train] -- --threads 1
    python benchmarks/train_curve.py --folds-of 4 --epochs 12 --workdir /tmp/reidx-train-e12 -- --threads 1
    python benchmarks/train_curve.py --folds-of 1 --epochs 12 --workdir /tmp/reidx-train-e12 -- --threads 1

Each fold of :mod:`train_cv` (``--folds-of N``: fine-tuned on all but every N-th of the 71 training
identities, 35–36 for N 2, 53–54 for N 4; ``--folds-of 1``: on all 71, files
``fit.probe.all*``) is reused or fine-tuned as there, mixed at α 0.8, gated with the gate
`reidx train` would write (calibrated on that fold's training crops), and scored on Con-ReID's
query vs bounding_box_test and on the whole of cuhk03-train. This reads the reported split, so
nothing here chooses anything: it measures what more labels buy. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from train import SHARED, VARIANTS, fine_tune, make_splits  # noqa: E402
from train_cv import DEFAULT, embedded, fit_features, fold_tag, gated, mean_ap, run_name, write_mix  # noqa: E402

from reidx.pipeline.models.domain_gate import GATE_P, calibrate  # noqa: E402
from reidx.pipeline.models.weights import resolve_weights  # noqa: E402
from reidx.pipeline.training.data import load_training_set  # noqa: E402
from reidx.pipeline.training.retention import load_base  # noqa: E402

ALL_TRAINING = "../shared/data/con-reid/bounding_box_train"  # as the acceptance run names it (its resume checks it)


def fold_row(args, fold: int | None, base_model, cache: Path) -> dict:
    """One fine-tuning (``fold`` None: all 71 identities) at today's defaults, scored on the reported
    split and on cuhk03-train, gated and alone."""
    work = Path(args.workdir)
    recipe = DEFAULT["recipe"]
    if fold is None:
        fit_folder, name, tag = ALL_TRAINING, f"fit.{recipe}.all", "all"
    else:
        fit_folder = make_splits(work / "splits", fold, args.folds_of)["conreid-fit"]
        name, tag = run_name(recipe, args.folds_of, fold), fold_tag(args.folds_of, fold)
    out, training = fine_tune(args, work, name, fit_folder, VARIANTS[recipe])
    data = functools.cache(lambda: load_training_set(fit_folder))  # decoded only when something is not cached
    fit_arrays = fit_features(base_model, data, cache, args.init, tag)
    gate = calibrate(fit_arrays["features"], fit_arrays["targets"], p=GATE_P)
    run_hash = resolve_weights(str(out), ".pth").sha256[:12]
    mix = work / "cv" / f"{name}.{run_hash}.alpha{DEFAULT['alpha']:g}.{DEFAULT['batchnorm']}.pth"
    write_mix(mix, base_model.state_dict(), torch.load(out, weights_only=True)["state_dict"], DEFAULT["alpha"],
              DEFAULT["batchnorm"], data)
    conreid, cuhk = SHARED / "data" / "con-reid", SHARED / "data" / "cuhk03-train"
    sides = {"test-query": conreid / "query", "test-gallery": conreid / "bounding_box_test",
             "cuhk03-query": cuhk / "query", "cuhk03-gallery": cuhk / "gallery"}
    base = {side: embedded(args.init, side, str(folder), cache) for side, folder in sides.items()}
    tuned = {side: embedded(str(mix), side, str(folder), cache) for side, folder in sides.items()}
    targets = fit_arrays["targets"]
    row = {"fold": fold, "identities": len(np.unique(targets[targets >= 0])), "epochs": args.epochs,
           "training": training}
    for label, g in (("gated", gate), ("tuned_alone", None)):
        mixed = {side: gated(base[side], tuned[side], g) for side in sides}
        row[label] = {"conreid_test_mAP": mean_ap(mixed["test-query"], mixed["test-gallery"]),
                      "cuhk03_mAP": mean_ap(mixed["cuhk03-query"], mixed["cuhk03-gallery"])}
    row["base"] = {"conreid_test_mAP": mean_ap(base["test-query"], base["test-gallery"]),
                   "cuhk03_mAP": mean_ap(base["cuhk03-query"], base["cuhk03-gallery"])}
    print(f"{name}: {json.dumps({k: row[k] for k in ('identities', 'gated', 'tuned_alone')})}", file=sys.stderr,
          flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", default="osnet_x0_25_msmt17")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--workdir", default="/tmp/reidx-train")
    parser.add_argument("--folds-of", type=int, default=2, help="1: all 71 identities; N > 1: train_cv's N folds.")
    parser.add_argument("train_options", nargs="*", help="Further `reidx train` options, after --.")
    args = parser.parse_args()
    started = time.perf_counter()
    cache = Path(args.workdir) / "cv" / "features"
    cache.mkdir(parents=True, exist_ok=True)
    base_model = load_base(args.init)
    folds = [None] if args.folds_of == 1 else list(range(args.folds_of))
    rows = [fold_row(args, fold, base_model, cache) for fold in folds]
    result = {"benchmark": "train-curve", "folds_of": args.folds_of, "epochs": args.epochs, "defaults": DEFAULT,
              "rows": rows,
              "mean": {label: {key: round(statistics.fmean(r[label][key] for r in rows), 2)
                               for key in ("conreid_test_mAP", "cuhk03_mAP")} for label in ("gated", "tuned_alone")},
              "mean_identities": round(statistics.fmean(r["identities"] for r in rows), 1),
              "wall_s": round(time.perf_counter() - started, 1), "load_average": [round(v, 2) for v in os.getloadavg()]}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
