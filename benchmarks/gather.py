"""Gathering stored vectors window by window against one mapped gather: time and resident peak.

    python benchmarks/gather.py --gallery /tmp/reidx_scale_1m_new/g1000000 [--repeats 7]

The graph step re-scores each 512 rows' shortlists against the exact vectors (``GraphCodes.refine``:
about 60,000 distinct ids spread over the whole store), and calibration re-ranks shortlists the
same way. ``VectorStore.get`` gathers them through ``MappedRows``, which drops each
``GATHER_WINDOW_BYTES`` window's pages once gathered (a fault maps a whole large page-cache folio,
so a mapped gather spread over the store made the store resident). This measures, on the live
version of a kept ``benchmarks/scale.py`` gallery, for the window sizes given and for one window
(no drops: the mapped gather as before): the median time of one gather and the gather's own
resident peak (VmHWM reset through /proc/self/clear_refs before each gather, minus the resident
size then; the 60,000 × 512 float32 result, 123 MB, is part of it). Repeats interleave the
variants, so machine load hits them alike; ratios are against the one-window gather of the same
run. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gallery", required=True)
    parser.add_argument("--ids", type=int, default=60_000, help="distinct ids per gather (a graph step's)")
    parser.add_argument("--windows-mib", default="16,64,256")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    from reidx.indexers import vector_store
    from reidx.indexers.versions import current_version, read_meta

    folder = current_version(Path(args.gallery))
    meta = read_meta(folder)
    store = vector_store.VectorStore(folder, meta.vector_segments)
    variants = {f"{w} MiB": int(w) << 20 for w in args.windows_mib.split(",")} | {"one window": 1 << 62}
    rng = np.random.default_rng(0)
    times = {name: [] for name in variants}
    peaks = {name: [] for name in variants}
    checksum = {}
    for repeat in range(args.repeats):
        ids = np.sort(rng.choice(store.count, args.ids, replace=False))
        for name, window in variants.items():
            vector_store.GATHER_WINDOW_BYTES = window
            store.release()
            Path("/proc/self/clear_refs").write_text("5")
            before = _status("VmRSS")
            start = time.perf_counter()
            rows = store.get(ids)
            times[name].append(time.perf_counter() - start)
            peaks[name].append(_status("VmHWM") - before)
            checksum[name] = float(rows[:, :8].sum())
            del rows
    base = statistics.median(times["one window"])
    print(json.dumps({
        "gallery": args.gallery, "version": folder.name, "stored": store.count,
        "store_bytes": int(sum(p.stat().st_size for p in store.paths)), "ids_per_gather": args.ids,
        "repeats": args.repeats, "same_rows": len(set(checksum.values())) == 1,
        "variants": {name: {"median_s": round(statistics.median(times[name]), 4),
                            "time_vs_one_window": round(statistics.median(times[name]) / base, 3),
                            "median_peak_mb": round(statistics.median(peaks[name]) / 1e6, 1),
                            "max_peak_mb": round(max(peaks[name]) / 1e6, 1)} for name in variants},
    }, indent=1))


if __name__ == "__main__":
    main()
