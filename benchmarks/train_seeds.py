"""How much the fine-tuning acceptance figure moves with the seed alone: `benchmarks/train.py`
(today's `reidx train` defaults, 71 identities, 12 epochs) once per seed, then the median and
range of each figure over the seeds.

    python benchmarks/train_seeds.py [--seeds 0,1,2,3] [--workdir /tmp/reidx-seeds] [-- extra train options]

A seed's run writes ``WORKDIR/seed{S}.pth`` and resumes from ``seed{S}.resume.pth`` (a finished
training is only re-made at today's post-training defaults, without training again), and
`benchmarks/train.py` caches each evaluation by the weights' sha256, so a rerun does only what is
missing; two processes given disjoint ``--seeds`` share the work, and a last run over all seeds
only reads the caches. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

FIGURES = {  # name in the summary → path in benchmarks/train.py's "evaluation"
    "conreid_mAP": ("output", "conreid", "mAP"),
    "conreid_rank1": ("output", "conreid", "rank1"),
    "cuhk03_drop": ("output", "cuhk03_drop"),
    "tuned_alone_conreid_mAP": ("tuned_without_gate", "conreid", "mAP"),
    "tuned_alone_cuhk03_drop": ("tuned_without_gate", "cuhk03_drop"),
}


def figure(evaluation: dict, path: tuple[str, ...]) -> float:
    value = evaluation
    for key in path:
        value = value[key]
    return value


def run_seed(seed: int, args: argparse.Namespace) -> dict:
    """One acceptance run (or its cached result) for ``seed``."""
    command = [sys.executable, str(REPO / "benchmarks" / "train.py"), "--data", args.data,
               "--out", str(Path(args.workdir) / f"seed{seed}.pth"), "--", "--seed", str(seed), *args.train_options]
    print(f"seed {seed}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    process = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, text=True)
    if process.returncode != 0:
        raise SystemExit(f"seed {seed}: benchmarks/train.py failed with status {process.returncode}")
    result = json.loads(process.stdout)
    row = {"seed": seed, "train_wall_s": result.get("train_wall_s"), "resumed": result.get("resumed")}
    row.update({name: figure(result["evaluation"], path) for name, path in FIGURES.items()})
    return row


def summary(rows: list[dict]) -> dict:
    return {name: {"median": round(statistics.median(r[name] for r in rows), 2),
                   "mean": round(statistics.fmean(r[name] for r in rows), 2),
                   "min": min(r[name] for r in rows), "max": max(r[name] for r in rows),
                   "stdev": round(statistics.stdev(r[name] for r in rows), 2) if len(rows) > 1 else 0.0}
            for name in FIGURES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=lambda v: [int(s) for s in v.split(",")], default=[0, 1, 2, 3])
    parser.add_argument("--workdir", default="/tmp/reidx-seeds")
    parser.add_argument("--data", default="../shared/data/con-reid/bounding_box_train",
                        help="Training crops, as `reidx train --data` takes them (a resumed run needs the same "
                             "string).")
    parser.add_argument("train_options", nargs="*", help="Further `reidx train` options, after --.")
    args = parser.parse_args()
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    rows = [run_seed(seed, args) for seed in args.seeds]
    print(json.dumps({"benchmark": "train_seeds", "seeds": args.seeds, "train_options": args.train_options,
                      "runs": rows, "summary": summary(rows),
                      "runs_at_or_above_90": sum(r["conreid_mAP"] >= 90.0 for r in rows)}))


if __name__ == "__main__":
    main()
