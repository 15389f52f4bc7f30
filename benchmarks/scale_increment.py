"""One more nightly increment into a gallery kept by ``benchmarks/scale.py --keep``, timed and logged per phase.

    python benchmarks/scale_increment.py --gallery /tmp/reidx_scale_v2/g5000000 --rows 500000 \\
        --tag inc06 --chunk 60000 --full-build-s 1830.26

Writes ``--rows`` more synthetic detections (scale.py's generator, from chunk ``--chunk`` on: new
people), runs the incremental build in this process with scale.py's log (each line shows the
resident peak of the phase before it) and prints JSON: the build summary, the process's memory,
and the wall time as a share of ``--full-build-s`` (the gallery's full build, from its state.json).
Run it once per tag: a second run with the same tag would overwrite shards the index holds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gallery", required=True)
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--tag", required=True, help="shard name tag, new for every run (e.g. inc06)")
    parser.add_argument("--chunk", type=int, required=True, help="first generator chunk (distinct per run)")
    parser.add_argument("--full-build-s", type=float, default=None)
    parser.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    args = parser.parse_args()
    gallery = Path(args.gallery)
    if list((gallery / "shards").glob(f"part-{args.tag}-*")):
        raise SystemExit(f"{gallery} already holds shards tagged {args.tag}: choose another --tag")
    started = time.perf_counter()
    scale.log(f"writing {args.rows:,} detections ({args.tag})")
    scale.write_gallery_part(gallery, scale.Crops(0), args.chunk, args.rows, args.tag, args.dtype)
    scale.log(f"written in {time.perf_counter() - started:.0f} s; building")
    from reidx.indexers.build import build_index

    summary = build_index(gallery, knn_k=30, log=scale.log)
    out = {"summary": summary, "status": scale._status()}
    if args.full_build_s:
        out["cost_vs_full_build"] = round(summary["wall_s"] / args.full_build_s, 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
