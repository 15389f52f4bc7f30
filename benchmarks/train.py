"""Fine-tuning acceptance run: `reidx train` on Con-ReID's bounding_box_train, then mAP/rank-1 of
the initial and the trained weights on the Con-ReID split (query vs bounding_box_test) and on
cuhk03-train (a second campus: what fine-tuning costs elsewhere), and, for an output with a domain
gate, of its tuned network alone.

    python benchmarks/train.py [--out /tmp/reidx-train/osnet_x0_25_con_reid.pth] [--epochs 12] [-- extra train options]
    python benchmarks/train.py --speed   # training steps/s only: fp32 vs bf16, 1 vs 2 threads
    python benchmarks/train.py --forgetting [--report-all] -- --threads 1   # fine-tuning without forgetting

The training runs as its own process (`python -m cli train ... --json`), so the wall time is
everything `reidx train` does: listing, decoding, training, checkpoints. Both evaluations use
`indexers.evaluation` with the default embedder, the code behind `reidx evaluate`. The
training identities (bounding_box_train) are disjoint from the evaluation split's. Prints one
JSON object; the machine's load average is recorded because it is shared. Evaluations are cached
in ``scores.json`` beside ``--out`` (keyed by the weights' sha256) and an interrupted training is
resumed, so a rerun does only what is missing.

``--forgetting`` measures what fine-tuning costs on a second domain and picks the fine-tuning
(``--variants``: plain, distilled, …) and its WiSE-FT α by a rule fixed in advance, on data it never
reports: it fine-tunes on 54 of Con-ReID's 71 training identities (each variant), scores every
candidate on the 17 held-out training identities and on cuhk03-train's even person ids, picks
(:func:`pick`), and reports the base, the plain fine-tuning and the pick (``--report-all``: every
candidate) on Con-ReID's query vs bounding_box_test and on the whole of cuhk03-train and its odd
person ids. Finished trainings and evaluations are reused (``scores.json`` in ``--workdir``,
keyed by the weights' sha256), so a rerun only does what is missing; two processes sweeping the
candidates in opposite orders (``--alphas 1,0.8,…``) share the work.

``--speed`` measures training steps alone (P16×K4 batches of real augmented crops, forward,
id+triplet loss, backward, Adam) for fp32 and bf16 autocast with 1 and 2 threads, interleaved
over repeats with medians, so that a busy neighbour slows every variant alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("REIDX_SHARED", REPO.parent / "shared"))
os.environ.setdefault("REIDX_MODEL_DIR", str(SHARED / "models"))
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from reidx.indexers.evaluation import evaluate_split  # noqa: E402
from reidx.pipeline.labelled_split import embed_side  # noqa: E402
from reidx.pipeline.embed import build_embedder  # noqa: E402


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


def make_splits(root: Path, fold: int = 3, of: int = 4) -> dict[str, str]:
    """Con-ReID's training identities split for choosing, as folders of symbolic links (Market
    naming kept; deterministic):

    - ``conreid-fit``: bounding_box_train without every 4th identity in sorted person-id order
      (those from the ``fold``-th on, so folds 0–3 hold out each identity once; 53 or 54 of 71
      are left), to fine-tune on;
    - ``conreid-val-query`` / ``conreid-val-gallery``: the 17–18 held-out identities, the first
      image of each (person, camera) as a query, the rest as the gallery.

    Fold 3 is the split every earlier choice used; other folds' folder names end in ``-fold<k>``
    (:mod:`train_cv` uses all four). ``of`` = N holds out every N-th identity instead (N folds,
    folders ``-of<N>-fold<k>``): fewer, larger held-out sets, whose galleries hold more people.

    cuhk03-train is halved by person-id parity where it is scored (:class:`Scores`). No image of
    Con-ReID's query/bounding_box_test is used for any choice."""
    train_dir = SHARED / "data" / "con-reid" / "bounding_box_train"
    files = sorted(train_dir.glob("*.jpg"))
    pids = sorted({f.name.split("_")[0] for f in files})
    held_out = set(pids[fold::of])
    suffix = "" if (of, fold) == (4, 3) else f"-fold{fold}" if of == 4 else f"-of{of}-fold{fold}"
    seen: set = set()
    split: dict[str, list[Path]] = {"conreid-fit": [], "conreid-val-query": [], "conreid-val-gallery": []}
    for f in files:
        pid, cam = f.name.split("_")[0], f.name.split("_")[1][:2]
        if pid not in held_out:
            split["conreid-fit"].append(f)
        elif (pid, cam) not in seen:
            seen.add((pid, cam))
            split["conreid-val-query"].append(f)
        else:
            split["conreid-val-gallery"].append(f)
    folders = {}
    for name, members in split.items():
        folder = root / f"{name}{suffix}"
        if not folder.is_dir():
            tmp = root / f".{name}{suffix}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for f in members:
                (tmp / f.name).symlink_to(f)
            tmp.rename(folder)
        folders[name] = str(folder)
    return folders


def subset(side, keep):
    """The rows of an embedded split whose person id passes ``keep``."""
    from reidx.pipeline.labelled_split import EmbeddedSplit

    mask = np.array([keep(pid) for pid in side.table["person_id"].to_pylist()])
    return EmbeddedSplit(side.table.filter(pa.array(mask)), side.features[mask], side.num_failed)


class Scores:
    """mAP & co. per (weights file, evaluation set), cached in a JSON file keyed by the weights'
    sha256, so a rerun reuses every finished evaluation."""

    def __init__(self, path: Path):
        self.path = path
        self.cache = json.loads(path.read_text()) if path.is_file() else {}

    def __call__(self, weights: str, name: str, query: str, gallery: str, halves: bool = False) -> dict:
        from reidx.pipeline.models.weights import resolve_weights

        key = f"{resolve_weights(weights, '.pth').sha256} {name}"
        if key not in self.cache and self.path.is_file():  # another process may have scored it meanwhile
            self.cache = json.loads(self.path.read_text())
        if key not in self.cache:
            embedder = build_embedder(weights, threads=1)  # the machine is shared
            q, g = embed_side([query], embedder), embed_side([gallery], embedder)
            result = {"all": percent(evaluate_split(q, g))}
            if halves:  # cuhk03: even person ids = the selection half, odd = the report half
                for half, parity in (("select", 0), ("report", 1)):
                    keep = lambda pid, parity=parity: pid % 2 == parity  # noqa: E731
                    result[half] = percent(evaluate_split(subset(q, keep), subset(g, keep)))
            # merge with what other processes (sweeping other α at the same time) wrote meanwhile
            self.cache = {**(json.loads(self.path.read_text()) if self.path.is_file() else {}), key: result}
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.cache, indent=1))
            tmp.replace(self.path)
            print(f"{Path(weights).name} on {name}: {result}", file=sys.stderr)
        return self.cache[key]


def percent(metrics) -> dict:
    report = metrics.as_percent_dict()
    return {k: report[k] for k in ("mAP", "rank1", "mINP")}


def pick(rows: list[dict], max_drop: float, variants: list[str]) -> dict:
    """The rule fixed before any measurement: among the candidates whose cuhk03 *selection-half*
    mAP is at most ``max_drop`` below the base's (α = 0, the base itself, always is), the one with
    the best Con-ReID *validation* mAP; ties go to the smaller α, then to the variant listed first."""
    ok = [r for r in rows if r["cuhk03_select_drop"] <= max_drop]
    return max(ok, key=lambda r: (r["conreid_val_mAP"], -r["alpha"], -variants.index(r["variant"])))


def with_recomputed_batchnorm(state: dict, data) -> dict:
    """``state`` with its BatchNorm statistics recomputed on ``data``'s crops as `reidx train
    --recompute-bn` does; every other tensor (a classifier too) as it is."""
    from reidx.pipeline.models.osnet import build_osnet, infer_osnet_arch, load_osnet_state
    from reidx.pipeline.training.retention import recompute_batchnorm

    model = build_osnet(infer_osnet_arch(state))
    load_osnet_state(model, state)
    recompute_batchnorm(model, data)
    return {**state, **model.state_dict()}


def fine_tune(args, work: Path, name: str, data: str, extra: list[str]) -> tuple[Path, dict]:
    """`reidx train` into ``work/name.pth`` (a finished run is reused, an interrupted one resumed);
    its --json summary and wall time are kept in ``work/name.train.json``."""
    from reidx.pipeline.training.loop import resume_path

    out, summary_path = work / f"{name}.pth", work / f"{name}.train.json"
    # --head-init random: the variants were defined before the probe became the default (a variant's own
    # --head-init comes later and wins)
    options = ["--data", data, "--init", args.init, "--out", str(out), "--epochs", str(args.epochs),
               "--wise-alpha", "1", "--no-domain-gate", "--no-recompute-bn", "--head-init", "random",
               *extra, *args.train_options]
    if not out.is_file():
        resume = ["--resume"] if resume_path(out).is_file() else []
        start = time.perf_counter()
        process = subprocess.run(train_command() + options + resume + ["--json"], cwd=REPO, stdout=subprocess.PIPE,
                                 text=True)
        if process.returncode != 0:
            raise SystemExit(f"reidx train failed with status {process.returncode}")
        summary = {"command": " ".join(["reidx", "train", *options]), "resumed": bool(resume),
                   "train_wall_s": round(time.perf_counter() - start, 1), "train": json.loads(process.stdout)}
        summary_path.write_text(json.dumps(summary))
    summary = json.loads(summary_path.read_text())
    history = summary["train"]["history"]
    seconds = sum(e["seconds"] for e in history)
    return out, {"command": summary["command"], "train_wall_s": summary["train_wall_s"],
                 "resumed": summary.get("resumed", False), "train_epoch_seconds_total": round(seconds, 1),
                 "train_images_per_s": round(sum(e["images"] for e in history) / seconds, 1)}


# The fine-tunings --forgetting compares: name → `reidx train` options beyond the shared ones. "plain"
# and "distill1" are the first grid's; "photometric5" holds the base on strongly re-coloured, blurred
# copies of each batch; "stem" trains only OSNet's first convolution (surgical fine-tuning).
VARIANTS = {
    "plain": ["--distill-weight", "0"],
    "distill1": ["--distill-weight", "1"],
    "photometric1": ["--distill-weight", "1", "--distill-view", "photometric"],
    "photometric5": ["--distill-weight", "5", "--distill-view", "photometric"],
    "stem": ["--distill-weight", "0", "--train-stages", "conv1"],
    "no-conv2": ["--distill-weight", "0", "--train-stages", "conv1,conv3,conv4,conv5,fc"],
    "oim": ["--distill-weight", "0", "--loss", "oim+triplet"],
    "lr1e-4": ["--distill-weight", "0", "--lr", "1e-4"],
    "probe": ["--distill-weight", "0", "--head-init", "probe"],
}
# session 16's recipe candidates, each the default recipe (probe) with one change (train_cv.py --recipes);
# probe-seed<N>: the default recipe with another seed (session 18: soups of seeds)
VARIANTS.update({f"probe-{label}": [*VARIANTS["probe"], *change] for label, change in {
    "lr7e-4": ["--lr", "7e-4"], "p8k8": ["--p", "8", "--k", "8"], "wd5e-5": ["--weight-decay", "5e-5"],
    "warmup0": ["--warmup-epochs", "0"], "cosface": ["--id-margin", "0.35"],
    "unit-triplet": ["--triplet-normalise"], **{f"seed{seed}": ["--seed", str(seed)] for seed in (1, 2, 3)}}.items()})
RUN_NAMES = {"plain": "fit", "distill1": "fit.distill1"}  # the first grid's file names, kept so they are reused
# Candidates that are another variant's WiSE-FT mix with a domain gate (not trained again): "gated" is
# the plain fine-tuning's, "gated-<variant>" that variant's; a "-bn" suffix also recomputes the mix's
# BatchNorm statistics on the fit split's crops (`reidx train --recompute-bn`).
GATED = {f"gated{'' if variant == 'plain' else '-' + variant}{bn}": variant
         for variant in VARIANTS for bn in ("", "-bn")}


def forgetting(args) -> dict:
    """Fine-tune on `conreid-fit` (each of ``--variants``), choose (variant, α) on held-out data,
    report on Con-ReID's test split and cuhk03-train."""
    import torch

    from reidx.pipeline.models.weights import resolve_weights
    from reidx.pipeline.training.data import load_training_set
    from reidx.pipeline.training.retention import domain_gate_entry, load_base, wise_interpolate

    if 0.0 not in args.alphas:  # the base is the reference (and always a candidate)
        args.alphas = [0.0, *args.alphas]
    unknown = set(args.variants) - set(VARIANTS) - set(GATED)
    if unknown:
        raise SystemExit(f"unknown --variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    if "plain" not in args.variants:  # it carries the base (α 0) and the plain WiSE-FT curve
        args.variants = ["plain", *args.variants]
    trained = dict.fromkeys(GATED.get(variant, variant) for variant in args.variants)  # the fine-tunings to run
    work = Path(args.workdir)
    splits = make_splits(work / "splits")
    scores = Scores(work / "scores.json")
    base_model = load_base(args.init)
    base_state = base_model.state_dict()
    runs = {variant: fine_tune(args, work, RUN_NAMES.get(variant, f"fit.{variant}"), splits["conreid-fit"],
                               VARIANTS[variant]) for variant in trained}
    gates: dict = {}
    result: dict = {"benchmark": "train-forgetting", "splits": splits,
                    "training": {variant: {"out": str(out), **info} for variant, (out, info) in runs.items()}}

    def mixed(variant: str, alpha: float) -> str:
        """The WiSE-FT mix of a run's output; the file name carries the run's hash (no stale reuse)."""
        if alpha == 0.0:
            return args.init
        out = runs[GATED.get(variant, variant)][0]
        gated = ".gated" if variant in GATED else ""
        bn = ".bn" if variant.endswith("-bn") else ""
        path = work / f"{out.stem}.{resolve_weights(str(out), '.pth').sha256[:12]}.alpha{alpha:g}{gated}{bn}.pth"
        if not path.is_file():  # atomically: a second process sweeping the other way may read it
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tuned = torch.load(out, weights_only=True)["state_dict"]
            checkpoint = {"state_dict": wise_interpolate(base_state, tuned, alpha)}
            if (gated or bn) and "fit" not in gates:  # the fine-tuning crops, loaded once
                gates["fit"] = load_training_set(splits["conreid-fit"])
            if bn:
                checkpoint["state_dict"] = with_recomputed_batchnorm(checkpoint["state_dict"], gates["fit"])
            if gated:  # the gate `reidx train` writes, from the fine-tuning crops (computed once)
                if "entry" not in gates:
                    gates["entry"] = domain_gate_entry(base_model, gates["fit"])
                checkpoint["domain_gate"] = gates["entry"]
            torch.save(checkpoint, tmp)
            tmp.replace(path)
        return str(path)

    con, cuhk = SHARED / "data" / "con-reid", SHARED / "data" / "cuhk03-train"
    val = ("conreid-val", splits["conreid-val-query"], splits["conreid-val-gallery"])
    test = ("conreid-test", str(con / "query"), str(con / "bounding_box_test"))
    other = ("cuhk03", str(cuhk / "query"), str(cuhk / "gallery"))
    base_val, base_other = scores(args.init, *val), scores(args.init, *other, halves=True)
    candidates = [(variant, a) for variant in args.variants
                  for a in (args.alphas if variant == "plain" else args.variant_alphas)]
    rows = []
    for variant, alpha in candidates:  # selection: Con-ReID's held-out training identities, cuhk03's even ids
        v, o = scores(mixed(variant, alpha), *val), scores(mixed(variant, alpha), *other, halves=True)
        rows.append({"variant": variant, "alpha": alpha, "conreid_val_mAP": v["all"]["mAP"],
                     "conreid_val_gain": round(v["all"]["mAP"] - base_val["all"]["mAP"], 2),
                     "cuhk03_select_mAP": o["select"]["mAP"],
                     "cuhk03_select_drop": round(base_other["select"]["mAP"] - o["select"]["mAP"], 2)})
    chosen = pick(rows, args.max_drop, args.variants)
    result.update(selection=rows, chosen={k: chosen[k] for k in ("variant", "alpha")},
                  base_conreid_val=base_val["all"], base_cuhk03_select=base_other["select"])
    report = []
    for variant, alpha in candidates:
        if args.report_all or alpha in (0.0, 1.0) or (variant, alpha) == (chosen["variant"], chosen["alpha"]):
            t, o = scores(mixed(variant, alpha), *test), scores(mixed(variant, alpha), *other, halves=True)
            report.append({"variant": variant, "alpha": alpha, "conreid_test": t["all"], "cuhk03": o["all"],
                           "cuhk03_report_half": o["report"]})
    base = next(r for r in report if r["alpha"] == 0.0)
    for row in report:
        row["cuhk03_drop"] = round(base["cuhk03"]["mAP"] - row["cuhk03"]["mAP"], 2)
        row["cuhk03_report_half_drop"] = round(base["cuhk03_report_half"]["mAP"] - row["cuhk03_report_half"]["mAP"], 2)
    order = {variant: i for i, variant in enumerate(args.variants)}
    result["report"] = sorted(report, key=lambda r: (order[r["variant"]], r["alpha"]))
    final = next(r for r in report if (r["variant"], r["alpha"]) == (chosen["variant"], chosen["alpha"]))
    result["acceptance"] = {"conreid_test_mAP": final["conreid_test"]["mAP"], "cuhk03_drop": final["cuhk03_drop"],
                            "met": final["conreid_test"]["mAP"] >= 90.0 and final["cuhk03_drop"] <= 2.0}
    return result


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
    parser.add_argument("--epochs", type=int, default=None, help="[default: 12; with --forgetting 6]")
    parser.add_argument("--skip-training", action="store_true", help="Only evaluate an existing --out.")
    parser.add_argument("--speed", action="store_true", help="Only measure training steps (see above).")
    parser.add_argument("--forgetting", action="store_true",
                        help="Fine-tuning without forgetting: WiSE-FT α chosen on held-out data (see make_splits), "
                             "reported on Con-ReID's split and cuhk03-train.")
    parser.add_argument("--workdir", default="/tmp/reidx-train", help="--forgetting: splits, checkpoints, cache.")
    parser.add_argument("--alphas", type=lambda v: [float(a) for a in v.split(",")],
                        default=[0.0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0])
    parser.add_argument("--variants", type=lambda v: [name for name in v.split(",") if name],
                        default=["plain", "distill1"],
                        help=f"--forgetting: the fine-tunings to compare ({', '.join(VARIANTS)}; gated: "
                             f"plain's mixes with a domain gate, gated-<variant> that variant's, a -bn suffix with "
                             f"the BatchNorm statistics recomputed); plain is the reference.")
    parser.add_argument("--variant-alphas", type=lambda v: [float(a) for a in v.split(",")],
                        default=[0.3, 0.4, 0.6, 1.0], help="--forgetting: WiSE-FT α of the fine-tunings but plain "
                                                           "(plain takes --alphas).")
    parser.add_argument("--max-drop", type=float, default=2.0, help="--forgetting: allowed cuhk03 mAP drop.")
    parser.add_argument("--report-all", action="store_true", help="--forgetting: every α on the report sets.")
    parser.add_argument("train_options", nargs="*", help="Further `reidx train` options, after --.")
    args = parser.parse_args()
    if args.epochs is None:
        args.epochs = 6 if args.forgetting else 12
    if args.forgetting:
        started = time.perf_counter()
        result = forgetting(args)
        result.update(wall_s=round(time.perf_counter() - started, 1),
                      load_average=[round(v, 2) for v in os.getloadavg()])
        print(json.dumps(result))
        return

    result = {"benchmark": "train", "data": args.data, "init": args.init, "out": args.out,
              "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
              "torch_threads": torch.get_num_threads(), "torch": str(torch.__version__),
              "load_average_before": [round(v, 2) for v in os.getloadavg()]}
    if args.speed:
        result["train_step_images_per_s"] = step_speed(args.data, args.init)
        result["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
        print(json.dumps(result))
        return
    if not args.skip_training:
        options = ["--data", args.data, "--init", args.init, "--out", args.out, "--epochs", str(args.epochs),
                   *args.train_options]
        result["command"] = " ".join(["reidx", "train", *options])
        start = time.perf_counter()
        from reidx.pipeline.training.checkpoint import resume_path

        resume = ["--resume"] if resume_path(args.out).is_file() else []
        process = subprocess.run(train_command() + options + resume + ["--json"], cwd=REPO, stdout=subprocess.PIPE,
                                 text=True)
        result["train_wall_s"], result["resumed"] = round(time.perf_counter() - start, 1), bool(resume)
        if process.returncode != 0:
            raise SystemExit(f"reidx train failed with status {process.returncode}")
        result["train"] = json.loads(process.stdout)
        result["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    result["evaluation"] = acceptance(args, Scores(Path(args.out).parent / "scores.json"))
    result["embedding_cost"] = embedding_cost(args.init, args.out)
    print(json.dumps(result))


def embedding_cost(base: str, out: str, crops_per_side: int = 512, repeats: int = 3) -> dict:
    """Embedding time of the output against the base on crops of the training site (Con-ReID's
    test images) and of another (cuhk03): a gated output runs both networks on batches with a
    crop of the site and the base alone on batches wholly off it. Crops are decoded beforehand;
    the embedders (onnx and torch backends) alternate within each repeat (the machine is shared),
    medians reported; for a gated output also the gate's weights on each side."""
    import statistics

    from reidx.pipeline.embed import resize_crop
    from reidx.pipeline.imaging import load_image
    from reidx.pipeline.runtime import onnxruntime_available

    sides = {"site": SHARED / "data" / "con-reid" / "bounding_box_test", "other": SHARED / "data" / "cuhk03-train" / "query"}
    backends = ["onnx", "torch"] if onnxruntime_available() else ["torch"]
    embedders = {f"{name}_{backend}": build_embedder(weights, backend=backend, threads=1)
                 for backend in backends for name, weights in (("base", base), ("output", out))}
    result = {}
    for side, folder in sides.items():
        files = sorted(folder.glob("*.jpg"))
        files = files[:: max(1, len(files) // crops_per_side)][:crops_per_side]
        crops = [resize_crop(load_image(f)) for f in files]
        seconds: dict[str, list[float]] = {name: [] for name in embedders}
        for _ in range(repeats):
            for name, embedder in embedders.items():
                start = time.perf_counter()
                embedder.embed_batches(crops)
                seconds[name].append(time.perf_counter() - start)
        medians = {name: statistics.median(values) for name, values in seconds.items()}
        result[side] = {"crops": len(crops), **{f"{n}_crops_per_s": round(len(crops) / t, 1) for n, t in medians.items()},
                        **{f"output_time_ratio_{b}": round(medians[f"output_{b}"] / medians[f"base_{b}"], 2)
                           for b in backends}, **gate_weights(out, crops)}
    return result


def gate_weights(weights: str, crops: list) -> dict:
    """How much of the tuned feature a gated output gives these crops (mean, and the shares of 0 and 1)."""
    import torch

    from reidx.pipeline.embed import to_input_tensor
    from reidx.pipeline.models.domain_gate import DomainGatedOSNet
    from reidx.pipeline.models.registry import load_model

    model = load_model(weights, "osnet", fold=True).module
    if not isinstance(model, DomainGatedOSNet):
        return {}
    with torch.inference_mode():
        a = torch.cat([model.tuned_share(to_input_tensor(crops[i:i + 64])) for i in range(0, len(crops), 64)]).numpy()
    return {"gate_weight_mean": round(float(a.mean()), 3), "gate_weight_0_share": round(float((a == 0).mean()), 3),
            "gate_weight_1_share": round(float((a == 1).mean()), 3)}


def acceptance(args, scores: "Scores") -> dict:
    """The base, the output and, for a gated output, its tuned network alone, on Con-ReID's split
    (query vs bounding_box_test) and on cuhk03-train (all, and its halves by person-id parity),
    with the issue's acceptance test: Con-ReID ≥ 90.0 mAP and cuhk03 ≤ 2.0 below the base."""
    import torch

    from reidx.pipeline.models.weights import load_checkpoint

    cuhk = SHARED / "data" / "cuhk03-train"
    weights = {"base": args.init, "output": args.out}
    checkpoint = load_checkpoint(args.out)
    if "domain_gate" in checkpoint:  # what the output's tuned network gives without the gate
        alone = Path(args.out).with_name(Path(args.out).stem + ".without-gate.pth")
        torch.save({"state_dict": checkpoint["state_dict"]}, alone)
        weights["tuned_without_gate"] = str(alone)
    rows = {}
    for name, w in weights.items():
        cuhk03 = scores(w, "cuhk03", str(cuhk / "query"), str(cuhk / "gallery"), halves=True)
        rows[name] = {"conreid": scores(w, "conreid-test", args.query, args.gallery)["all"], "cuhk03": cuhk03["all"],
                      "cuhk03_even_ids": cuhk03["select"], "cuhk03_odd_ids": cuhk03["report"]}
    for row in rows.values():
        row["conreid_gain"] = round(row["conreid"]["mAP"] - rows["base"]["conreid"]["mAP"], 2)
        row["cuhk03_drop"] = round(rows["base"]["cuhk03"]["mAP"] - row["cuhk03"]["mAP"], 2)
    out = rows["output"]
    return {**rows, "acceptance": {"conreid_mAP": out["conreid"]["mAP"], "cuhk03_drop": out["cuhk03_drop"],
                                   "met": out["conreid"]["mAP"] >= 90.0 and out["cuhk03_drop"] <= 2.0}}


if __name__ == "__main__":
    main()
