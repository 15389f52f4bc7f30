"""Index builds at scale (issue 12): out-of-core build, query, nightly increments — measured.

    python benchmarks/scale.py --counts 1000000 [--increments 5] [--workdir /tmp/reidx_scale]
    python benchmarks/scale.py --counts 1000000,5000000,10000000 --state /tmp/reidx_scale/state.json

For each gallery size N: synthetic detections with the real crops' neighbour structure
(``benchmarks/search.py --data crops``: each synthetic identity is every crop of one real
Con-ReID identity, moved by one random displacement, plus small per-crop noise) are written in
the real shard format (``pipeline/shards.write_shard``, float16 by default) with ledger rows,
50,000 detections per shard; 1,000 held-out crops of indexed identities are the queries.

Steps, each in a child process whose memory is watched (peak VmHWM as the child reads it, and
the peak anonymous / file-backed resident memory polled every 0.2 s from /proc):

- ``build``: ``reidx.indexers.build.build_index`` (default type: the memory budget decides),
  full, in one process (or ``--workers``);
- ``query``: a fresh process loads the published version and searches the 1,000 queries (3
  repeats, top-100, calibrated nprobe): QPS and recall@10 against exact top-10; then exact search
  of the same queries, streamed over the version's vectors (wall time, and compute-only time:
  the speed-up uses the compute-only time, the conservative choice);
- ``increment-i`` (``--increments``, N/10 new detections each): the nightly build, its time and
  memory, and after the last one the kNN graph's recall@30 on 1,000 sampled items against exact
  neighbours computed here from the stored vectors.

Resumable: every finished step is written to the state file (JSON) at once; a rerun skips
finished steps (a step that was cut short reruns from its start; generating data restarts that
size). Prints the whole state as one JSON object at the end. ``--keep`` keeps the galleries
(default: a size's gallery is deleted once all its steps are done, to free the disk).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The driver only generates data: one BLAS thread (on the shared 2 cores OpenBLAS' threads made
# generating a 50k-row shard take 33 s instead of 6 s). The measured children get the default.
_CHILD = "--child" in sys.argv
if not _CHILD and "OPENBLAS_NUM_THREADS" not in os.environ:
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    os.environ["REIDX_SCALE_SET_BLAS"] = "1"

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
SHARD_ROWS = 50_000


_PEAK = [0]  # the process's VmHWM over all phases (log() resets the kernel's between phases)


def log(message: str) -> None:
    """A timestamped line on stderr with this process's memory: ``peak`` is the resident peak
    since the previous line (the kernel's VmHWM, reset after each line through clear_refs), so
    each phase of a build shows its own peak; ``_status()`` still reports the whole run's."""
    status = _read_status()
    _PEAK[0] = max(_PEAK[0], status["VmHWM"])
    memory = " ".join(f"{'peak' if k == 'VmHWM' else k} {v >> 20}M" for k, v in status.items() if k != "VmRSS")
    print(f"[scale {time.strftime('%H:%M:%S')} {memory}] {message}", file=sys.stderr, flush=True)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


# ---------------------------------------------------------------- data


class Crops:
    """benchmarks/search.py's ``replicated_crops``, generated chunk by chunk (seeded per chunk)."""

    def __init__(self, seed: int, shift: float = 1.0, jitter: float = 0.1):
        from search import _sqrt_psd, real_features

        features, identity = real_features("osnet_x0_25_msmt17", ["bounding_box_train", "bounding_box_test", "query"])
        labelled = np.flatnonzero(identity > 0)
        ids, inverse = np.unique(identity[labelled], return_inverse=True)
        self.members = [labelled[inverse == i] for i in range(len(ids))]
        wide = features.astype(np.float64)
        means = np.stack([wide[m].mean(0) for m in self.members])
        self.spread = _sqrt_psd(np.cov(wide.T))
        self.noise = _sqrt_psd(np.cov((wide[labelled] - means[inverse]).T))
        self.features, self.seed, self.shift, self.jitter = features, seed, shift, jitter

    def chunk(self, index: int, rows: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, index])
        out = np.empty((rows, self.features.shape[1]), np.float32)
        filled = 0
        while filled < rows:
            crops = self.members[rng.integers(len(self.members))][: rows - filled]
            block = self.features[crops] + self.shift * (rng.standard_normal(self.features.shape[1], np.float32) @ self.spread.T)
            block += self.jitter * (rng.standard_normal(block.shape, np.float32) @ self.noise.T)
            np.maximum(block, 0, out=block)
            out[filled:filled + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
            filled += len(block)
        return out


def write_gallery_part(gallery: Path, crops: Crops, first_chunk: int, rows: int, tag: str, dtype: str,
                       queries_wanted: int = 0) -> np.ndarray:
    """``rows`` detections as shards + ledger rows (SHARD_ROWS per shard); returns held-out queries."""
    import pyarrow as pa

    from reidx.pipeline.ledger import append, ledger_rows
    from reidx.pipeline.shards import detection_id, shard_schema, write_shard

    chunks = -(-rows // SHARD_ROWS)
    per_chunk = -(-queries_wanted // chunks) if queries_wanted else 0
    queries = []
    for c in range(chunks):
        n = min(SHARD_ROWS, rows - c * SHARD_ROWS)
        vectors = crops.chunk(first_chunk + c, n + per_chunk)
        if per_chunk:
            held = np.random.default_rng([crops.seed, first_chunk + c, 1]).choice(len(vectors), per_chunk, replace=False)
            mask = np.zeros(len(vectors), bool)
            mask[held] = True
            queries.append(vectors[mask])
            vectors = vectors[~mask]
        keys = [f"synthetic/{tag}/{c:06d}/{i:06d}.jpg" for i in range(n)]
        dim = vectors.shape[1]
        table = pa.table({
            "detection_id": [detection_id(k, 0) for k in keys], "image_key": keys, "source": ["synthetic"] * n,
            "source_uri": ["file:///synthetic"] * n, "member": [k[10:] for k in keys], "camera": ["1"] * n,
            "timestamp": pa.nulls(n, pa.timestamp("ms")), "frame_width": [64] * n, "frame_height": [128] * n,
            "x1": [0.0] * n, "y1": [0.0] * n, "x2": [64.0] * n, "y2": [128.0] * n, "score": [1.0] * n,
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim),
            "embedder": ["osnet_x0_25_msmt17"] * n, "embedder_sha256": ["synthetic"] * n,
            "detector": pa.nulls(n, pa.string()), "detector_sha256": pa.nulls(n, pa.string()),
            "person_id": pa.nulls(n, pa.int64()), "frame_index": pa.nulls(n, pa.int32()),
            "track_id": pa.nulls(n, pa.string())}, schema=shard_schema(dim))
        shard = write_shard(table, gallery, name=f"part-{tag}-{c:06d}.parquet", dtype=dtype)
        append(gallery, ledger_rows([{"image_key": k, "source": "synthetic", "member": k[10:], "status": "ok",
                                      "num_persons": 1, "shard": shard} for k in keys]))
    return np.concatenate(queries)[:queries_wanted] if queries else np.zeros((0, 512), np.float32)


# ---------------------------------------------------------------- children (measured processes)


def _read_status() -> dict:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def _status() -> dict:
    """VmHWM (the peak since the process started, whatever log() reset), VmRSS, RssAnon, RssFile."""
    fields = _read_status()
    _PEAK[0] = fields["VmHWM"] = max(_PEAK[0], fields["VmHWM"])
    return fields


def child_build(args) -> dict:
    from reidx.indexers.build import build_index

    summary = build_index(args.gallery, index_type=args.type, memory_budget=args.memory_budget,
                          workers=args.workers or None, knn_k=30, log=log)
    return {"summary": summary, "status": _status()}


def child_query(args) -> dict:
    from reidx.indexers.faiss_ops import recall
    from reidx.indexers.vector_store import VectorStore, exact_search
    from reidx.indexers.versions import load_index

    queries = np.load(args.queries)
    started = time.perf_counter()
    gi = load_index(args.gallery, gpu="off")
    load_s = time.perf_counter() - started
    times = []
    for _ in range(3):
        t = time.perf_counter()
        _, found = gi.search(queries, 100)
        times.append(time.perf_counter() - t)
    search_status = _status()
    store = VectorStore(gi.folder, gi.meta.vector_segments)
    import faiss

    compute = [0.0]
    real_knn = faiss.knn

    def timed_knn(*a, **kw):
        t = time.perf_counter()
        out = real_knn(*a, **kw)
        compute[0] += time.perf_counter() - t
        return out

    faiss.knn = timed_knn
    t = time.perf_counter()
    _, truth = exact_search(store, queries, 100)
    exact_wall = time.perf_counter() - t
    faiss.knn = real_knn
    ivf_s = float(np.median(times))
    return {"index_type": gi.meta.type, "nlist": gi.meta.nlist, "nprobe": gi.meta.nprobe, "count": gi.count,
            "load_s": round(load_s, 2), "queries": len(queries), "search_s": [round(x, 3) for x in times],
            "qps": round(len(queries) / ivf_s, 1), "recall_at_10": round(recall(found, truth, 10), 4),
            "recall_at_100": round(recall(found, truth, 100), 4),
            "exact_wall_s": round(exact_wall, 2), "exact_compute_s": round(compute[0], 2),
            "exact_qps_compute": round(len(queries) / compute[0], 1), "exact_qps_wall": round(len(queries) / exact_wall, 1),
            "speedup_vs_exact_compute": round(compute[0] / ivf_s, 1), "speedup_vs_exact_wall": round(exact_wall / ivf_s, 1),
            "status_after_search": search_status, "status_end": _status()}


def child_graph(args) -> dict:
    from reidx.indexers.knn_graph import graph_recall
    from reidx.indexers.vector_store import VectorStore, exact_search
    from reidx.indexers.versions import load_index

    gi = load_index(args.gallery, gpu="off")
    store = VectorStore(gi.folder, gi.meta.vector_segments)
    sample = np.sort(np.random.default_rng(7).choice(gi.count, 1000, replace=False))
    _, truth = exact_search(store, store.get(sample), 30)
    rows, _ = gi.knn_graph().lookup(sample)
    new = sample >= gi.meta.trained_count
    return {"knn_k": gi.meta.knn_k, "recall_at_30": round(graph_recall(rows, truth, 30), 4),
            "recall_at_30_new_items": round(graph_recall(rows[new], truth[new], 30), 4) if new.any() else None,
            "sampled_new_items": int(new.sum()), "stored_knn_recall": gi.meta.knn_recall,
            "generation": gi.meta.build.get("generation"), "repaired": gi.meta.build.get("knn_repaired")}


def run_child(kind: str, args, extra: list[str]) -> dict:
    """Run a measured step in a child process; returns its JSON plus polled memory peaks."""
    command = [sys.executable, __file__, "--child", kind, *extra]
    env = dict(os.environ)
    if env.pop("REIDX_SCALE_SET_BLAS", None):
        env.pop("OPENBLAS_NUM_THREADS", None)
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    peaks = {"RssAnon": 0, "RssFile": 0}

    def poll():
        while proc.poll() is None:
            try:
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    key, _, value = line.partition(":")
                    if key in peaks:
                        peaks[key] = max(peaks[key], int(value.split()[0]) * 1024)
            except (FileNotFoundError, ProcessLookupError, ValueError):
                pass
            time.sleep(0.2)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    out, _ = proc.communicate()
    watcher.join()
    if proc.returncode:
        raise RuntimeError(f"{kind} child failed with exit status {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    result["wall_s"] = round(time.perf_counter() - started, 2)
    result["load_at_end"] = [round(x, 2) for x in os.getloadavg()]  # the machine is shared: say how busy
    result["peak_rss_anon_polled"], result["peak_rss_file_polled"] = peaks["RssAnon"], peaks["RssFile"]
    return result


# ---------------------------------------------------------------- driver


def folder_bytes(folder: Path, prefix: str = "") -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name.startswith(prefix))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="1000000")
    parser.add_argument("--increments", type=int, default=5)
    parser.add_argument("--increment-fraction", type=float, default=0.1)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    parser.add_argument("--type", default="auto")
    parser.add_argument("--memory-budget", default=None)
    parser.add_argument("--workers", type=int, default=0, help="0: build in one process (memory measured there)")
    parser.add_argument("--workdir", default="/tmp/reidx_scale")
    parser.add_argument("--state", default=None, help="[default: WORKDIR/state.json]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--gallery", help=argparse.SUPPRESS)
    parser.add_argument("--queries-file", dest="queries_path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    # the machine is shared and twice a stray SIGTERM ended a measured step: ignore it (SIGKILL
    # still stops us; a step that dies anyway is retried, see run_step)
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.child:
        args.queries = args.queries_path
        result = {"build": child_build, "query": child_query, "graph": child_graph}[args.child](args)
        print(json.dumps(result))
        return

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    state_path = Path(args.state or workdir / "state.json")
    state = json.loads(state_path.read_text()) if state_path.exists() else {}

    def save():
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, state_path)

    state.setdefault("machine", {"cpus": os.cpu_count(), "load_at_start": os.getloadavg(),
                                 "mem_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")})
    crops = None
    for count in [int(c) for c in args.counts.split(",") if c]:
        key = str(count)
        run = state.setdefault(key, {})
        gallery, queries_file = workdir / f"g{count}", workdir / f"q{count}.npy"
        common = ["--gallery", str(gallery), "--type", args.type, "--workers", str(args.workers)]
        if args.memory_budget:
            common += ["--memory-budget", args.memory_budget]
        steps = ["generate", "build", "query"] + [f"increment-{i}" for i in range(1, args.increments + 1)]
        steps += ["graph"] if args.increments else []
        if all(s in run for s in steps):
            continue
        if "generate" not in run:
            shutil.rmtree(gallery, ignore_errors=True)
            crops = crops or Crops(args.seed)
            log(f"writing {count:,} detections ({args.dtype}) as shards")
            t = time.perf_counter()
            queries = write_gallery_part(gallery, crops, 0, count, "base", args.dtype, args.queries)
            np.save(queries_file, queries)
            run["generate"] = {"seconds": round(time.perf_counter() - t, 1), "shard_bytes": folder_bytes(gallery / "shards"),
                               "dtype": args.dtype, "queries": len(queries)}
            save()
        for step in steps[1:]:
            if step in run:
                continue
            if step.startswith("increment-"):
                i = int(step.split("-")[1])
                crops = crops or Crops(args.seed)
                size = int(count * args.increment_fraction)
                log(f"{count:,}: writing increment {i} ({size:,} detections)")
                write_gallery_part(gallery, crops, 10_000 * i, size, f"inc{i:02d}", args.dtype)
            log(f"{count:,}: {step}")
            kind = {"build": "build", "query": "query", "graph": "graph"}.get(step, "build")
            extra = common + (["--queries-file", str(queries_file)] if kind == "query" else [])
            for attempt in range(3):
                try:
                    result = run_child(kind, args, extra)
                    break
                except RuntimeError as error:
                    if attempt == 2:
                        raise
                    log(f"{error}: retrying {step} from its start")
                    run.setdefault("retries", []).append(f"{step}: {error}")
            if kind == "build":
                from reidx.indexers.versions import current_version

                folder = current_version(gallery)
                result["bytes"] = {"index": folder_bytes(folder, "index") + folder_bytes(folder, "delta"),
                                   "vectors": folder_bytes(folder, "vectors"), "items": folder_bytes(folder, "items"),
                                   "knn": folder_bytes(folder, "knn"), "shards": folder_bytes(gallery / "shards"),
                                   "graph_codes": folder_bytes(folder, "graph") + folder_bytes(folder, "lists")}
                n = result["summary"]["persons_added"]
                result["per_item"] = {"build_us": round(1e6 * result["summary"]["wall_s"] / max(1, n), 2),
                                      "index_bytes": round(result["bytes"]["index"] / result["summary"]["persons"], 1),
                                      "disk_bytes": round(sum(result["bytes"].values()) / result["summary"]["persons"], 1)}
                if step.startswith("increment-") and "build" in run:
                    result["cost_vs_full_build"] = round(result["summary"]["wall_s"] / run["build"]["summary"]["wall_s"], 3)
            run[step] = result
            save()
            log(f"{count:,}: {step} done: {json.dumps(result)[:400]}")
        if not args.keep:
            shutil.rmtree(gallery, ignore_errors=True)
    print(json.dumps(state))


if __name__ == "__main__":
    main()
