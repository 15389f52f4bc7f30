"""Embedding throughput: reidx's path vs a plain fp32 eager loop over the same images, same run.

    python benchmarks/embed.py [--images 1000] [--repeats 3] [--weights osnet_x0_25_msmt17]

Both paths include reading and decoding the files. The baseline is what a first script does:
for each image, decode, preprocess, run the unmodified fp32 torch model on a batch of one.
reidx's default path (``--backend auto`` on CPU) batches 32 crops, decodes the next batches in
threads, folds BatchNorm and runs the model through onnxruntime; the torch backend with the
same batching and folding, and bf16 autocast (opt-in), are measured too, with their fidelity. Repeats are interleaved and medians reported,
because this machine is noisy. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("REIDX_MODEL_DIR", str(REPO.parent / "shared" / "models"))

from reidx.pipeline.datasets import list_images  # noqa: E402
from reidx.pipeline.embed import TorchEmbedder, build_embedder, l2_normalise, resize_crop, to_input_tensor  # noqa: E402,E501
from reidx.pipeline.embed_files import embed_files  # noqa: E402
from reidx.pipeline.imaging import load_image  # noqa: E402


def plain_loop(model: torch.nn.Module, paths) -> np.ndarray:
    """The baseline: one image at a time, fp32 eager, no fusion, no threads."""
    features = []
    with torch.no_grad():
        for path in paths:
            x = to_input_tensor(resize_crop(load_image(path))[None])
            features.append(model(x).numpy())
    return l2_normalise(np.concatenate(features))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--weights", default="osnet_x0_25_msmt17")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "con-reid" / "bounding_box_test"))
    args = parser.parse_args()

    paths = list_images([args.data])[: args.images]
    baseline_model = TorchEmbedder(args.weights, fast=False).model
    default = build_embedder(args.weights)
    torch_fused = TorchEmbedder(args.weights)
    bf16 = TorchEmbedder(args.weights, precision="bf16")
    runs = {
        "plain_fp32_loop": lambda: plain_loop(baseline_model, paths),
        "reidx_default": lambda: embed_files(default, paths).embeddings,
        "reidx_torch_fp32": lambda: embed_files(torch_fused, paths).embeddings,
        "reidx_torch_bf16_opt_in": lambda: embed_files(bf16, paths).embeddings,
    }
    seconds = {name: [] for name in runs}
    features = {}
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            features[name] = run()
            seconds[name].append(time.perf_counter() - start)

    rate = {name: len(paths) / statistics.median(s) for name, s in seconds.items()}
    base = features["plain_fp32_loop"]
    result = {
        "benchmark": "embed",
        "images": len(paths),
        "repeats": args.repeats,
        "weights": args.weights,
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "images_per_s": {name: round(r, 1) for name, r in rate.items()},
        "seconds_all_repeats": {name: [round(x, 3) for x in s] for name, s in seconds.items()},
        "default_backend": default.info.backend,
        "ratio_vs_plain": {name: round(rate[name] / rate["plain_fp32_loop"], 2) for name in runs},
        "min_cosine_vs_plain": {name: float((features[name] * base).sum(1).min()) for name in runs},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
