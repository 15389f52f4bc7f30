"""End-to-end indexing throughput: the nightly job on the Con-ReID crops with 1 and 2 worker
processes (same run, alternating, medians), and the share of worker time per stage.

    python benchmarks/index.py [--repeats 2] [--manifest data_manifests/con-reid.toml]

Each run indexes into a fresh temporary gallery and includes starting the Dask cluster.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("REIDX_MODEL_DIR", str(REPO.parent / "shared" / "models"))

from reidx.pipeline.job import run_index  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", default=str(REPO / "data_manifests" / "con-reid.toml"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--weights", default="osnet_x0_25_msmt17")
    args = parser.parse_args()

    rates: dict[int, list[float]] = {1: [], 2: []}
    shares: dict[int, dict] = {}
    for _ in range(args.repeats):
        for workers in rates:
            with tempfile.TemporaryDirectory() as gallery:
                summary = run_index([args.manifest], gallery, weights=args.weights, workers=workers, log=lambda _: None)
            rates[workers].append(summary["images_new"] / summary["wall_s"])
            total = sum(summary["stage_seconds"].values()) or 1.0
            shares[workers] = {k: round(v / total, 3) for k, v in summary["stage_seconds"].items()}
            images = summary["images_new"]
    medians = {w: statistics.median(r) for w, r in rates.items()}
    print(json.dumps({
        "benchmark": "index",
        "images": images,
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "images_per_s_median": {f"{w}_workers": round(m, 1) for w, m in medians.items()},
        "images_per_s_all": {f"{w}_workers": [round(x, 1) for x in r] for w, r in rates.items()},
        "ratio_2_vs_1_workers": round(medians[2] / medians[1], 2),
        "worker_time_share_by_stage": {f"{w}_workers": s for w, s in shares.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
