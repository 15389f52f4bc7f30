"""Detector throughput: our torch YOLOX against onnxruntime running the same ONNX file, same run.

    python benchmarks/detect.py [--repeats 5] [--batch-size 8] [--sizes 416 640] [--threads N]

Both engines get the same 16 full-HD frames (decoded once, outside the timing), the same
letterbox and the same decoding/NMS; only the network differs. Timed per input size:

- ``torch``: reidx's default torch path (BatchNorm folded, channels-last, convolution + SiLU
  fused into one oneDNN call where the check at start-up passes), fp32;
- ``torch_eager``: the same weights in plain NCHW eager fp32 (what a first script gets);
- ``torch_bf16``: bf16 autocast, channels-last (opt-in only; its box fidelity is printed);
- ``onnxruntime``: the ONNX file with batch/height/width made symbolic (the export fixes them
  to 1×416×416), all graph optimisations, as many threads as torch uses.

``frames_per_s`` counts end-to-end ``Detector.detect`` (letterbox + network + decoding);
``network_ms_per_batch`` the network alone. Repeats are interleaved and medians reported,
because this machine is shared and noisy. Box fidelity of each engine is measured against
``torch`` fp32: same count per frame and the lowest IoU of matched boxes. Prints one JSON object.
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

from reidx.pipeline.boxes import box_iou  # noqa: E402
from reidx.pipeline.detect import Detector, letterbox  # noqa: E402
from reidx.pipeline.imaging import load_image  # noqa: E402


def fidelity(reference: list[np.ndarray], other: list[np.ndarray]) -> dict:
    """Same number of boxes per frame, and the lowest best-match IoU over all boxes of both sides."""
    same_count = all(len(a) == len(b) for a, b in zip(reference, other))
    worst = 1.0
    for a, b in zip(reference, other):
        if len(a) and len(b):
            iou = box_iou(a[:, :4], b[:, :4])
            worst = min(worst, float(iou.max(1).min()), float(iou.max(0).min()))
        elif len(a) != len(b):
            worst = 0.0
    return {"same_count_every_frame": same_count, "min_matched_iou": round(worst, 4),
            "boxes": int(sum(len(b) for b in other))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", default=str(REPO.parent / "shared" / "data" / "scenes" / "frames"))
    parser.add_argument("--weights", default="yolox_nano.onnx")
    parser.add_argument("--sizes", type=int, nargs="+", default=[416, 640])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch and onnxruntime threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # onnxruntime sessions take torch's count

    paths = sorted(Path(args.frames).glob("*.jpg"))
    frames = [np.asarray(load_image(p)) for p in paths]
    chunks = [frames[i:i + args.batch_size] for i in range(0, len(frames), args.batch_size)]
    result = {
        "benchmark": "detect", "frames": len(frames), "frame_size": f"{frames[0].shape[1]}x{frames[0].shape[0]}",
        "batch_size": args.batch_size, "repeats": args.repeats, "weights": args.weights,
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "by_input_size": {},
    }
    for size in args.sizes:
        engines = {
            "torch": Detector(args.weights, input_size=size),
            "torch_eager": Detector(args.weights, input_size=size, channels_last=False, fuse=False),
            "torch_bf16": Detector(args.weights, input_size=size, precision="bf16"),
            "onnxruntime": Detector(args.weights, input_size=size, backend="onnx"),
        }
        batch, _ = letterbox(chunks[0], size)
        end_to_end = {name: [] for name in engines}
        cpu = {name: [] for name in engines}
        network = {name: [] for name in engines}
        boxes = {}
        for name, engine in engines.items():  # warm-up: oneDNN / onnxruntime pick kernels on first call
            engine.detect(chunks[0])
        for _ in range(args.repeats):
            for name, engine in engines.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                boxes[name] = [b for chunk in chunks for b in engine.detect(chunk)]
                end_to_end[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
                start = time.perf_counter()
                engine.raw(batch)
                network[name].append(time.perf_counter() - start)
        fps = {name: len(frames) / statistics.median(s) for name, s in end_to_end.items()}
        cpu_ms = {name: 1000 * statistics.median(s) / len(frames) for name, s in cpu.items()}
        result["by_input_size"][str(size)] = {
            "frames_per_s": {name: round(v, 1) for name, v in fps.items()},
            "torch_vs_onnxruntime": round(fps["torch"] / fps["onnxruntime"], 2),
            # CPU seconds the process spent per frame: with one thread, a measure of work that
            # other jobs on the machine disturb far less than wall time (threads that spin-wait
            # inflate it, so compare it only at --threads 1)
            "cpu_ms_per_frame": {name: round(v, 1) for name, v in cpu_ms.items()},
            "torch_vs_onnxruntime_by_cpu_time": round(cpu_ms["onnxruntime"] / cpu_ms["torch"], 2),
            "network_ms_per_batch": {name: round(1000 * statistics.median(s), 1) for name, s in network.items()},
            "seconds_all_repeats": {name: [round(x, 3) for x in s] for name, s in end_to_end.items()},
            "torch_fused_conv_silu": engines["torch"].fused,
            "fidelity_vs_torch_fp32": {name: fidelity(boxes["torch"], boxes[name])
                                       for name in engines if name != "torch"},
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
