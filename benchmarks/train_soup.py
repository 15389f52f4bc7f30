"""Two cheap additions to a finished fine-tuning, measured for the Con-ReID 90 target: a weight
soup of runs that differ only in their seed (Wortsman et al. 2022, "Model soups"), and BatchNorm
statistics re-estimated on the un-augmented training crops (training saw only augmented ones).

    reidx train --data ../shared/data/con-reid/bounding_box_train --out /tmp/probe/seed1.pth \\
        --threads 1 --seed 1 --wise-alpha 1 --no-domain-gate          # a second run (seed 0: the acceptance run)
    python benchmarks/train_soup.py --runs /tmp/probe/full.resume.pth,/tmp/probe/seed1.resume.pth

``--runs`` are `reidx train` resume checkpoints (``*.resume.pth``: the last epoch's tuned network,
before any WiSE-FT mix). For each run alone and for their soup (the mean of their tensors), at
each WiSE-FT α of ``--alphas``, with the statistics as trained and re-estimated, it scores Con-ReID
(query vs bounding_box_test) and cuhk03-train with the code behind `reidx evaluate` (no domain
gate: these are the tuned networks the gate would wrap). Prints one JSON object; evaluations are
cached in ``--workdir``/scores.json, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from train import SHARED, Scores, with_recomputed_batchnorm  # noqa: E402

from reidx.pipeline.training.data import load_training_set  # noqa: E402
from reidx.pipeline.training.retention import load_base, soup, wise_interpolate  # noqa: E402


def tuned_state(path: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in torch.load(path, weights_only=True)["state_dict"].items()
            if not k.startswith("classifier.")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    con = SHARED / "data" / "con-reid"
    parser.add_argument("--runs", required=True, type=lambda v: v.split(","), help="Resume checkpoints, comma-separated.")
    parser.add_argument("--data", default=str(con / "bounding_box_train"), help="The runs' training crops.")
    parser.add_argument("--init", default="osnet_x0_25_msmt17", help="The runs' base (WiSE-FT's α 0).")
    parser.add_argument("--alphas", type=lambda v: [float(a) for a in v.split(",")], default=[1.0, 0.6])
    parser.add_argument("--workdir", default="/tmp/reidx-soup")
    args = parser.parse_args()
    started = time.perf_counter()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    scores = Scores(work / "scores.json")
    base = load_base(args.init).state_dict()
    data = load_training_set(args.data)
    candidates = {f"run{i}": tuned_state(path) for i, path in enumerate(args.runs)}
    if len(args.runs) > 1:
        candidates["soup"] = soup(list(candidates.values()))
    cuhk = SHARED / "data" / "cuhk03-train"
    rows = []
    for name, state in candidates.items():
        for alpha in args.alphas:
            mixed = wise_interpolate(base, state, alpha)
            for statistics in ("trained", "re-estimated"):
                path = work / f"{name}.alpha{alpha:g}.{statistics}.pth"
                if not path.is_file():
                    weights = mixed if statistics == "trained" else with_recomputed_batchnorm(mixed, data)
                    torch.save({"state_dict": weights}, path.with_suffix(".tmp"))
                    path.with_suffix(".tmp").replace(path)
                conreid = scores(str(path), "conreid-test", str(con / "query"), str(con / "bounding_box_test"))
                other = scores(str(path), "cuhk03", str(cuhk / "query"), str(cuhk / "gallery"))
                rows.append({"weights": name, "alpha": alpha, "batchnorm": statistics,
                             "conreid_mAP": conreid["all"]["mAP"], "conreid_rank1": conreid["all"]["rank1"],
                             "cuhk03_mAP": other["all"]["mAP"]})
    print(json.dumps({"benchmark": "train-soup", "runs": args.runs, "data": args.data, "rows": rows,
                      "wall_s": round(time.perf_counter() - started, 1),
                      "load_average": [round(v, 2) for v in os.getloadavg()]}))


if __name__ == "__main__":
    main()
