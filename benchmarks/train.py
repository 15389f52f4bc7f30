"""Fine-tuning acceptance run: `reidx train` on Con-ReID's bounding_box_train, then mAP/rank-1 of
the initial and the trained weights on the Con-ReID split (query vs bounding_box_test).

    python benchmarks/train.py [--out /tmp/reidx-train/osnet_x0_25_con_reid.pth] [--epochs 12] [-- extra train options]
    python benchmarks/train.py --speed   # training steps/s only: fp32 vs bf16, 1 vs 2 threads

The training runs as its own process (`python -m cli train ... --json`), so the wall time is
everything `reidx train` does: listing, decoding, training, checkpoints. Both evaluations use
`indexers.evaluation` with the default embedder, the code behind `reidx evaluate`. The
training identities (bounding_box_train) are disjoint from the evaluation split's. Prints one
JSON object; the machine's load average is recorded because it is shared.

``--speed`` measures training steps alone (P16×K4 batches of real augmented crops, forward,
id+triplet loss, backward, Adam) for fp32 and bf16 autocast with 1 and 2 threads, interleaved
over repeats with medians, so that a busy neighbour slows every variant alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("REIDX_SHARED", REPO.parent / "shared"))
os.environ.setdefault("REIDX_MODEL_DIR", str(SHARED / "models"))
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from reidx.indexers.evaluation import evaluate_split
from reidx.pipeline.labelled_split import embed_side  # noqa: E402
from reidx.pipeline.embed import build_embedder  # noqa: E402


def evaluate(weights: str, query: str, gallery: str) -> dict:
    """mAP / CMC in percent, as `reidx evaluate --json` reports them."""
    embedder = build_embedder(weights)
    metrics = evaluate_split(embed_side([query], embedder), embed_side([gallery], embedder)).as_percent_dict()
    return {k: metrics[k] for k in ("mAP", "rank1", "rank5", "mINP")}


def step_speed(data: str, init: str, repeats: int = 3, steps: int = 4) -> dict:
    """Training images/s per (precision, threads), interleaved repeats, medians."""
    import statistics

    import numpy as np

    from reidx.pipeline.training.augment import Augment
    from reidx.pipeline.training.data import load_training_set
    from reidx.pipeline.training.loop import TrainConfig, build_model
    from reidx.pipeline.training.losses import BatchHardTripletLoss, IdentityLoss
    from reidx.pipeline.training.sampler import PKSampler

    crops = load_training_set(data)
    model, _ = build_model(TrainConfig(data=data, out="", init=init), crops.num_classes)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    batches = PKSampler(crops.targets, 16, 4).epoch(0)
    augment, rng = Augment(), np.random.default_rng(0)

    def step(batch, bf16: bool) -> None:
        x, y = augment(crops.crops(batch), rng), torch.from_numpy(crops.targets[batch])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            features = model(x)
            logits = model.classifier(features)
        loss = IdentityLoss()(logits.float(), y) + BatchHardTripletLoss()(features.float(), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    variants = [(precision, threads) for threads in (1, 2) for precision in ("fp32", "bf16")]
    rates: dict = {v: [] for v in variants}
    for _ in range(repeats):
        for precision, threads in variants:
            torch.set_num_threads(threads)
            step(batches[0], precision == "bf16")  # warm-up: kernels for this precision
            start = time.perf_counter()
            for batch in batches[1:steps + 1]:
                step(batch, precision == "bf16")
            rates[(precision, threads)].append(steps * len(batches[0]) / (time.perf_counter() - start))
    return {f"{p}_{t}_threads": round(statistics.median(r), 1) for (p, t), r in rates.items()}


def train_command() -> list[str]:
    """`reidx train` as a process."""
    return [sys.executable, "-m", "reidx.cli", "train"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = SHARED / "data" / "con-reid"
    parser.add_argument("--data", default=str(data / "bounding_box_train"))
    parser.add_argument("--query", default=str(data / "query"))
    parser.add_argument("--gallery", default=str(data / "bounding_box_test"))
    parser.add_argument("--init", default="osnet_x0_25_msmt17")
    parser.add_argument("--out", default="/tmp/reidx-train/osnet_x0_25_con_reid.pth")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--skip-baseline", action="store_true", help="Do not evaluate the initial weights.")
    parser.add_argument("--skip-training", action="store_true", help="Only evaluate an existing --out.")
    parser.add_argument("--speed", action="store_true", help="Only measure training steps (see above).")
    parser.add_argument("train_options", nargs="*", help="Further `reidx train` options, after --.")
    args = parser.parse_args()

    result = {"benchmark": "train", "data": args.data, "init": args.init, "out": args.out,
              "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
              "torch_threads": torch.get_num_threads(), "torch": str(torch.__version__),
              "load_average_before": [round(v, 2) for v in os.getloadavg()]}
    if args.speed:
        result["train_step_images_per_s"] = step_speed(args.data, args.init)
        result["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
        print(json.dumps(result))
        return
    if not args.skip_baseline:
        result["before"] = evaluate(args.init, args.query, args.gallery)
        print(f"before: {result['before']}", file=sys.stderr)
    if not args.skip_training:
        options = ["--data", args.data, "--init", args.init, "--out", args.out, "--epochs", str(args.epochs),
                   *args.train_options]
        result["command"] = " ".join(["reidx", "train", *options])
        start = time.perf_counter()
        process = subprocess.run(train_command() + options + ["--json"], cwd=REPO, stdout=subprocess.PIPE, text=True)
        result["train_wall_s"] = round(time.perf_counter() - start, 1)
        if process.returncode != 0:
            raise SystemExit(f"reidx train failed with status {process.returncode}")
        result["train"] = json.loads(process.stdout)
        result["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    result["after"] = evaluate(args.out, args.query, args.gallery)
    if "before" in result:
        result["delta_mAP"] = round(result["after"]["mAP"] - result["before"]["mAP"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
