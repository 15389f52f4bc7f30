"""Issue 12: out-of-core, Dask-parallel index builds and O(new) nightly updates, on small galleries.

Galleries are synthetic vectors written as real shards and ledger rows (the job's own
``write_shard`` and ``ledger.append``); indexes are real Faiss files, Dask runs real worker
processes. Sizes are small so the tests run in seconds; benchmarks/scale.py runs the same code
at millions.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pytest

from reidx.indexers import build_steps
from reidx.indexers.build import TEMPLATE, build_index
from reidx.indexers.bulk_query import bulk_search
from reidx.indexers.check_sample import CheckSample, first_check
from reidx.indexers.distributed import Executor
from reidx.indexers.faiss_ops import choose_type, exact_neighbours, recall
from reidx.indexers.graph_codes import GraphCodes
from reidx.indexers.knn_graph import graph_recall
from reidx.indexers.vector_store import VectorStore
from reidx.indexers.versions import current_version, load_index, read_meta
from reidx.pipeline.ledger import append, ledger_rows
from reidx.pipeline.shards import detection_id, iter_shard_batches, shard_schema, shards_dir, write_shard

DIM = 64


def clustered(n: int, seed: int, clusters: int = 400, spread: float = 0.25) -> np.ndarray:
    """Unit vectors around fixed cluster centres (the same centres for every seed: later batches
    are new sightings of the same people)."""
    centres = np.random.default_rng(1234).standard_normal((clusters, DIM)).astype(np.float32)
    rng = np.random.default_rng(seed)
    v = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, DIM)).astype(np.float32)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def add_shards(gallery: Path, vectors: np.ndarray, tag: str, per_shard: int = 2500, dtype: str = "float32",
               cameras: int = 1, scores: np.ndarray | None = None) -> None:
    """Commit vectors as shards + ledger rows, as the nightly job does (item i seen by camera
    ``i % cameras + 1``, detection score ``scores[i]``, default 1)."""
    for start in range(0, len(vectors), per_shard):
        chunk = vectors[start:start + per_shard]
        n = len(chunk)
        keys = [f"syn/{tag}/{start + i}.jpg" for i in range(n)]
        table = pa.table({
            "detection_id": [detection_id(k, 0) for k in keys], "image_key": keys, "source": ["syn"] * n,
            "source_uri": ["file:///syn"] * n, "member": [k[4:] for k in keys],
            "camera": [str((start + i) % cameras + 1) for i in range(n)],
            "timestamp": [None] * n, "frame_width": [64] * n, "frame_height": [128] * n, "x1": [0.0] * n,
            "y1": [0.0] * n, "x2": [64.0] * n, "y2": [128.0] * n,
            "score": [1.0] * n if scores is None else scores[start:start + n].tolist(),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(chunk.reshape(-1)), DIM),
            "embedder": ["synthetic"] * n, "embedder_sha256": ["0" * 64] * n, "detector": [None] * n,
            "detector_sha256": [None] * n, "person_id": [None] * n, "frame_index": [None] * n,
            "track_id": [None] * n}, schema=shard_schema(DIM))
        shard = write_shard(table, gallery, name=f"part-{tag}-{start:08d}.parquet", dtype=dtype)  # ids in write order
        append(gallery, ledger_rows([{"image_key": k, "source": "syn", "member": k[4:], "status": "ok",
                                      "num_persons": 1, "shard": shard} for k in keys]))


def test_shards_stream_in_bounded_batches_and_float16_halves_them(tmp_path):
    x = clustered(5000, 0)
    add_shards(tmp_path / "f32", x, "a")
    add_shards(tmp_path / "f16", x, "a", dtype="float16")
    for name in ("f32", "f16"):
        names = sorted(p.name for p in shards_dir(tmp_path / name).iterdir())
        batches = list(iter_shard_batches(tmp_path / name, names, batch_rows=700))
        assert max(len(v) for _, _, v in batches) <= 700 and all(v.dtype == np.float32 for _, _, v in batches)
        got = np.concatenate([v for _, _, v in batches])
        assert np.abs(got - x).max() < (1e-7 if name == "f32" else 1e-3)
    size = {n: sum(p.stat().st_size for p in shards_dir(tmp_path / n).iterdir()) for n in ("f32", "f16")}
    assert size["f16"] < 0.6 * size["f32"]


def _ivf_lists(folder: Path, meta) -> list[np.ndarray]:
    """Each list's ids over base + deltas, read through Faiss."""
    from reidx.indexers.searcher import Searcher

    from dataclasses import asdict

    searcher = Searcher(folder, asdict(meta))  # owns the index: keep it alive while reading
    ivf = faiss.extract_index_ivf(searcher.index)
    return [faiss.rev_swig_ptr(ivf.invlists.get_ids(i), ivf.invlists.list_size(i)).copy() if ivf.invlists.list_size(i)
            else np.zeros(0, np.int64) for i in range(ivf.nlist)]


@pytest.fixture(scope="module")
def parallel_pair(tmp_path_factory):
    """The same 24k-vector gallery built in this process and on a 2-worker Dask cluster (8 tasks)."""
    root = tmp_path_factory.mktemp("pair")
    x = clustered(24000, 1)
    built = {}
    for name, workers in (("single", None), ("dask", 2)):
        add_shards(root / name, x, "a", per_shard=1000)
        build_index(root / name, index_type="ivf-sq8", knn_k=10, workers=workers, task_rows=3000)
        built[name] = load_index(root / name, gpu="off")
    return x, built


def test_out_of_core_ivf_equals_one_in_memory_add(parallel_pair):
    """Parts added separately and merged on disk = the template filled in one process, in order."""
    x, built = parallel_pair
    gi = built["single"]
    assert gi.meta.layout == 2 and gi.meta.ivf_files == ["index.faiss"] and len(gi.meta.vector_segments) == 8
    reference = faiss.read_index(str(gi.folder / TEMPLATE))
    reference.add(x)
    lists = _ivf_lists(gi.folder, gi.meta)
    ref_ivf = faiss.extract_index_ivf(reference)
    for i in range(ref_ivf.nlist):
        size = ref_ivf.invlists.list_size(i)
        expected = faiss.rev_swig_ptr(ref_ivf.invlists.get_ids(i), size) if size else np.zeros(0)
        assert np.array_equal(lists[i], expected)
    faiss.ParameterSpace().set_index_parameter(reference, "nprobe", gi.meta.nprobe)
    sims, ids = reference.search(x[:500], 20)
    distances, found = gi.search(x[:500], 20)
    assert np.array_equal(found, ids) and np.allclose(distances, 1 - sims, atol=1e-6)
    # memory-mapped: the lists are not in the process's heap, the index file backs them
    maps = Path("/proc/self/maps").read_text()
    assert str(gi.folder / "index.faiss") in maps


def _mapped_rss(path: Path) -> int:
    """Resident bytes of this process's mappings of ``path`` (from /proc/self/smaps)."""
    inode, rss, inside = str(os.stat(path).st_ino), 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:
            inside = fields[4] == inode
        elif inside and fields[0] == "Rss:":
            rss += int(fields[1]) * 1024
    return rss


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="resident pages are read from Linux /proc")
def test_calibration_search_keeps_mapped_pages_bounded_and_results_equal(parallel_pair):
    """A searcher with a resident budget searches in chunks and drops the mapped lists' pages after
    each: same results as one batch, and the index file's pages no longer count as resident."""
    from dataclasses import asdict

    from reidx.indexers.searcher import Searcher

    x, built = parallel_pair
    gi = built["single"]
    path = gi.folder / "index.faiss"
    whole = Searcher(gi.folder, asdict(gi.meta))
    expected = whole.search(x[:600], 30, 8)
    touched = _mapped_rss(path)
    assert touched > path.stat().st_size // 2
    whole.release()
    assert _mapped_rss(path) == 0
    chunked = Searcher(gi.folder, asdict(gi.meta), resident_bytes=64 << 10)
    found = chunked.search(x[:600], 30, 8)
    assert len(chunked.chunk_rows) > 2 and sum(chunked.chunk_rows) >= 600
    assert np.array_equal(found[1], expected[1]) and np.array_equal(found[0], expected[0])
    # a few 64 KB fault-around blocks may be mapped again right after the last release (seen
    # with Faiss' OpenMP threads), never the lists the search went through
    assert _mapped_rss(path) < touched // 2


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="resident pages are read from Linux /proc")
def test_store_gathers_window_by_window_and_drop_their_pages(tmp_path, monkeypatch):
    """Random rows spread over a whole segment come back equal to plain reads, and the gather's
    resident peak stays about one window (a fault maps a whole large folio or a 64 KB fault-around
    block: without the windows, gathers spread over a store made all of it resident)."""
    from reidx.indexers import vector_store
    from reidx.indexers.vector_store import SegmentWriter, segment_name

    rng = np.random.default_rng(0)
    rows = 16384  # 16 MiB of float16 × 512
    writer = SegmentWriter(tmp_path / segment_name(0), rows, 512, np.float16)
    for a in range(0, rows, 4096):
        writer.write(rng.standard_normal((4096, 512)).astype(np.float16))
    writer.close()
    store = VectorStore(tmp_path, [0])
    plain = store.read(0, rows)
    ids = rng.integers(-1, rows, size=(100, 4))  # 400 rows: 0.8 MB gathered
    expected = plain[np.maximum(ids, 0)]
    expected[ids < 0] = 0
    del plain

    def gather_peak(window: int) -> int:
        monkeypatch.setattr(vector_store, "GATHER_WINDOW_BYTES", window)
        store.release()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        except OSError:
            pytest.skip("this kernel does not let a process reset its VmHWM")
        rss = _status_bytes("VmRSS")
        got = store.get(ids)
        assert np.array_equal(got, expected)
        assert _mapped_rss(tmp_path / segment_name(0)) <= 2 << 20  # dropped after the gather either way
        return _status_bytes("VmHWM") - rss

    assert gather_peak(1 << 40) > 8 << 20  # one window: the whole segment was resident at once
    assert gather_peak(1 << 20) < 5 << 20  # 1 MiB windows (plus folio edges and the 0.8 MB out)
    rows = vector_store.MappedRows(tmp_path / segment_name(0))
    with pytest.raises(IndexError):
        rows.take(np.array([5, rows.shape[0]]))
    with pytest.raises(IndexError):
        rows.take(np.array([-1, 3]))
    np.save(tmp_path / "fortran.npy", np.asfortranarray(np.ones((4, 3))))
    with pytest.raises(ValueError, match="C-ordered"):
        vector_store.MappedRows(tmp_path / "fortran.npy")


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def test_reverse_edges_in_blocks_equal_one_pass_and_write_a_readable_layer(tmp_path):
    """Old rows updated block by block (bounded memory) are the rows one pass gives, and the
    layer written without knowing its row count up front reads back through KnnGraph."""
    from reidx.indexers.knn_graph import reverse_edges
    from reidx.indexers.knn_store import DenseLayerWriter, KnnGraph, SparseLayerWriter

    rng = np.random.default_rng(3)
    x = rng.standard_normal((3000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    k, old = 10, 2400
    d_old, i_old = faiss.knn(x[:old], x[:old], k, metric=faiss.METRIC_INNER_PRODUCT)
    d_new, i_new = faiss.knn(x[old:], x, k, metric=faiss.METRIC_INNER_PRODUCT)
    writer = DenseLayerWriter(tmp_path, "knn-g0", 0, old, k)
    writer.write(i_old, 1 - d_old)
    writer.close()
    graph = KnnGraph(tmp_path, ["knn-g0"], old, k)
    whole = list(reverse_edges(graph.lookup, i_new, 1 - d_new, old, block_rows=1 << 30))
    blocks = list(reverse_edges(graph.lookup, i_new, 1 - d_new, old, block_rows=97))
    assert len(whole) == 1 and len(blocks) > 5
    rows, ids, dist = (np.concatenate(parts) for parts in zip(*blocks))
    assert all(np.array_equal(a, b) for a, b in zip((rows, ids, dist), whole[0]))
    assert 100 < len(rows) < old and np.all(np.diff(rows) > 0)
    # each changed row gained a new item closer than its old k-th
    assert np.all((ids >= old).any(axis=1))
    sparse = SparseLayerWriter(tmp_path, "knn-g1r", k)
    for block in blocks:
        sparse.write(*block)
    sparse.close()
    layered = KnnGraph(tmp_path, ["knn-g0", "knn-g1r"], old, k)
    assert np.array_equal(layered.lookup(rows)[0], ids) and np.array_equal(layered.lookup(rows)[1], dist)
    with pytest.raises(ValueError, match="ascend"):
        SparseLayerWriter(tmp_path, "bad", k).write(rows[::-1], ids, dist)
    with pytest.raises(ValueError, match="rows of"):
        SparseLayerWriter(tmp_path, "bad", k).write(rows, ids[:, :3], dist)


# recall@30 of graph rows against breadth, measured by benchmarks/graph_breadth.py (shortlist 4·k)
CURVE_1M = {1: 0.8732, 2: 0.9439, 3: 0.9582, 5: 0.9763, 8: 0.9826, 12: 0.9851, 18: 0.9864, 27: 0.9877,
            41: 0.988, 62: 0.9881, 93: 0.9881, 128: 0.9881}
CURVE_10M = {1: 0.6549, 2: 0.7666, 3: 0.8141, 5: 0.8637, 8: 0.9027, 12: 0.9234, 18: 0.9385, 27: 0.9457,
             41: 0.95, 62: 0.9518, 93: 0.9524, 128: 0.9525}


def test_graph_breadth_stops_at_the_target_or_where_the_curve_flattens():
    from reidx.indexers.build_steps import choose_breadth

    asked = []

    def on(curve, shift=0.0):
        asked.clear()
        return lambda breadth: asked.append(breadth) or curve[breadth] + shift

    assert choose_breadth(on(CURVE_1M), 1, 128) == (3, 0.9582)
    assert choose_breadth(on(CURVE_10M), 1, 128) == (41, 0.95)
    # a sample that reads 0.008 lower never reaches 0.95: no longer searched up to the cap
    assert choose_breadth(on(CURVE_10M, -0.008), 1, 128) == (41, 0.942)
    assert asked == [1, 2, 3, 5, 8, 12, 18, 27, 41, 62]
    # without the flat rule it went to the cap, as the 10M build did
    assert choose_breadth(on(CURVE_10M, -0.008), 1, 128, flat_gain=0.0)[0] == 128
    assert choose_breadth(on(CURVE_10M), 8, 12) == (12, 0.9234)  # the limit still binds


def test_two_worker_dask_build_equals_single_process_build(parallel_pair):
    x, built = parallel_pair
    single, dask = built["single"], built["dask"]
    assert dask.meta.build["workers"] == 2 and single.meta.build["workers"] == 0
    assert (single.meta.nlist, single.meta.nprobe) == (dask.meta.nlist, dask.meta.nprobe)
    assert all(np.array_equal(a, b) for a, b in zip(_ivf_lists(single.folder, single.meta),
                                                    _ivf_lists(dask.folder, dask.meta)))
    assert (single.folder / "index.faiss").read_bytes() == (dask.folder / "index.faiss").read_bytes()
    d1, i1 = single.search(x[:2000], 30)
    d2, i2 = dask.search(x[:2000], 30)
    assert np.array_equal(i1, i2) and np.array_equal(d1, d2)
    assert np.array_equal(single.knn()[0], dask.knn()[0])
    assert single.items["detection_id"].to_pylist() == dask.items["detection_id"].to_pylist()
    # bulk query on the workers = one process
    with Executor(workers=2) as executor:
        bd, bi = bulk_search(dask, x[:5000], 20, executor=executor, chunk=700)
    sd, si = single.search(x[:5000], 20)
    assert np.array_equal(bi, si) and np.allclose(bd, sd)


def test_nightly_adds_only_new_and_keeps_the_graph_accurate(tmp_path):
    """Five increments: old files are hard links of the previous version's (nothing old is
    rewritten), new items get rows, old rows gain new neighbours from reverse edges, the sampled
    graph recall is measured each time and stays ≥ 0.9 against exact neighbours."""
    gallery = tmp_path / "g"
    first = clustered(20000, 2)
    add_shards(gallery, first, "base")
    build_index(gallery, index_type="ivf-flat", knn_k=15)
    built = load_index(gallery, gpu="off")
    check, tune = first_check(VectorStore(built.folder, built.meta.vector_segments), 0)
    assert (len(check.ids), len(tune.ids)) == (1000, 500) and not set(check.ids) & set(tune.ids)
    assert np.array_equal(CheckSample.load(built.folder / built.meta.check_file).ids, check.ids)
    everything = [first]
    for night in range(1, 6):
        before = load_index(gallery, gpu="off")
        batch = clustered(2000, 10 + night)
        everything.append(batch)
        add_shards(gallery, batch, f"night{night}")
        summary = build_index(gallery, index_type="ivf-flat", knn_k=15)
        assert summary["mode"] == "incremental" and summary["persons_added"] == 2000
        after = load_index(gallery, gpu="off")
        for name in before.meta.vector_segments[:1]:
            seg = f"vectors-{name:012d}.npy"
            assert os.stat(before.folder / seg).st_ino == os.stat(after.folder / seg).st_ino
        assert os.stat(before.folder / "index.faiss").st_ino == os.stat(after.folder / "index.faiss").st_ino
        assert after.meta.ivf_files[-1] == f"delta-g{night}.faiss" and after.meta.build["knn_rows_updated"] > 0
        assert after.meta.knn_recall >= 0.9
    x = np.concatenate(everything)
    gi = load_index(gallery, gpu="off")
    assert gi.count == len(x) == gi.items.num_rows and gi.meta.build["generation"] == 5
    _, found = gi.search(x[-2000:], 1)
    assert (found[:, 0] == np.arange(len(x) - 2000, len(x))).mean() > 0.99
    # the graph against exact neighbours, measured independently here
    sample = np.random.default_rng(5).choice(len(x), 500, replace=False)
    rows, _ = gi.knn_graph().lookup(sample)
    assert graph_recall(rows, exact_neighbours(x[sample], x, 15), 15) >= 0.9
    assert (rows[:, 0] == sample).all()
    # the kept check sample, updated from new rows only each night, is still the exact top-100 of
    # a uniform sample of the whole gallery (about a third of it drawn from the 10,000 added)
    check = CheckSample.load(gi.folder / gi.meta.check_file)
    assert gi.meta.check_file == "check-g5.npz" and sorted(os.listdir(gi.folder)).count("check-g4.npz") == 0
    assert len(check.ids) == 1000 and len(np.unique(check.ids)) == 1000 and 200 < (check.ids >= 20000).sum() < 470
    sims = x[check.ids] @ x.T
    exact = np.argsort(-sims, axis=1, kind="stable")[:, :100]
    assert np.mean([len(set(a) & set(b)) for a, b in zip(exact, check.truth_ids)]) > 99.9
    np.testing.assert_allclose(1 - check.truth_dist, np.take_along_axis(sims, exact, 1), atol=1e-5)


def test_graph_codes_give_batch_independent_rows_and_merge_with_the_deltas(tmp_path, monkeypatch):
    """Graph rows are searched in the graph codes (4-bit fast-scan in the index's own lists, exact
    refine): the same rows however they are batched; each nightly adds a graph-codes delta beside
    the index's, and past MAX_DELTAS both are merged into a new base, rows still accurate."""
    from dataclasses import asdict

    monkeypatch.setattr(build_steps, "MAX_DELTAS", 2)
    gallery = tmp_path / "g"
    parts = [clustered(6000, 3)]
    add_shards(gallery, parts[0], "base")
    build_index(gallery, index_type="ivf-sq8", knn_k=15)
    gi = load_index(gallery, gpu="off")
    assert gi.meta.graph_files == ["graph.faiss"] and gi.meta.build["knn_breadth"] >= 1
    codes = GraphCodes(gi.folder, asdict(gi.meta))
    ids = np.arange(0, 6000, 7)
    vectors = VectorStore(gi.folder, gi.meta.vector_segments).get(ids)
    whole = codes.search(ids, vectors, 16, 4)
    halves = [codes.search(ids[p], vectors[p], 16, 4) for p in (np.s_[300:], np.s_[:300])]
    assert np.array_equal(whole[1], np.concatenate([halves[1][1], halves[0][1]]))
    assert np.array_equal(whole[0], np.concatenate([halves[1][0], halves[0][0]]))
    for night in range(1, 4):
        parts.append(clustered(600, 20 + night))
        add_shards(gallery, parts[-1], f"night{night}")
        assert build_index(gallery, index_type="ivf-sq8", knn_k=15)["mode"] == "incremental"
    meta = read_meta(current_version(gallery))
    assert meta.ivf_files == ["index-g3.faiss"] and meta.graph_files == ["graph-g3.faiss"]
    assert all((current_version(gallery) / f).exists() for f in meta.files())
    x = np.concatenate(parts)
    gi = load_index(gallery, gpu="off")
    sample = np.random.default_rng(2).choice(len(x), 400, replace=False)
    rows, _ = gi.knn_graph().lookup(sample)
    assert meta.knn_recall >= 0.9 and graph_recall(rows, exact_neighbours(x[sample], x, 15), 15) >= 0.9
    # a nightly's new rows probe the lists its add step kept (probes-*.npy, deleted once used):
    # the same rows as searching the quantizer again
    from reidx.indexers.graph_codes import PROBES_KEPT, probes_name
    from reidx.indexers.ivf_ondisk import add_part

    folder, last = current_version(gallery), meta.vector_segments[-1]
    assert not list(folder.glob("probes-*.npy"))
    ids = np.arange(last, meta.count)
    vectors = VectorStore(folder, meta.vector_segments).get(ids)
    nearest = add_part([(folder / TEMPLATE).read_bytes()], [(ids, vectors)], [tmp_path / "part.faiss"], PROBES_KEPT)
    searched = GraphCodes(folder, asdict(meta)).search(ids, vectors, 16, 8, exact_coarse=True)
    np.save(folder / probes_name(last), nearest)
    codes = GraphCodes(folder, asdict(meta))
    assert codes.kept_probes_of(ids, vectors, 8) is not None and codes.kept_probes_of(ids, vectors, 64) is None
    kept = codes.search(ids, vectors, 16, 8, exact_coarse=True)
    assert np.array_equal(kept[1], searched[1]) and np.array_equal(kept[0], searched[0])


def test_a_nightly_hashes_only_new_files_and_still_catches_a_changed_one(tmp_path):
    """file_records of hard-linked files are carried from the version they came from; the nightly
    hashes the files the live version wrote itself (a flipped byte there forces a full rebuild) and
    only sizes the older ones, which `reidx verify`'s full check covers."""
    from reidx.pipeline.integrity import version_problem

    gallery = tmp_path / "g"
    add_shards(gallery, clustered(5000, 4), "base")
    build_index(gallery, index_type="ivf-flat", knn_k=10)
    first = read_meta(current_version(gallery))
    add_shards(gallery, clustered(500, 5), "night1")
    assert build_index(gallery, index_type="ivf-flat", knn_k=10)["mode"] == "incremental"
    folder = current_version(gallery)
    meta = read_meta(folder)
    records = meta.file_records
    assert records["index.faiss"] == first.file_records["index.faiss"]  # carried, not hashed again
    assert records["index.faiss"]["written_by"] == first.version
    assert records["delta-g1.faiss"]["written_by"] == meta.version
    for name, change in (("index.faiss", "old"), ("delta-g1.faiss", "own")):
        data = bytearray((folder / name).read_bytes())
        data[-9] ^= 0xFF  # same size, one byte changed (in an id: the file still reads)
        (folder / name).write_bytes(bytes(data))
        quick, full = version_problem(folder, own_files_only=True), version_problem(folder)
        assert "checksum" in full
        assert (quick is None) if change == "old" else ("checksum" in quick)
    add_shards(gallery, clustered(500, 6), "night2")
    assert build_index(gallery, index_type="ivf-flat", knn_k=10)["reason"] and \
        read_meta(current_version(gallery)).build["mode"] == "full"


def test_memory_budget_chooses_the_index_and_is_recorded(tmp_path):
    assert choose_type("auto", 50_000, 512, 1 << 30)[0] == "flat"
    assert choose_type("auto", 50_000, 512, 50 << 20)[0] == "ivf-sq8"
    assert choose_type("auto", 10_000_000, 512, 4 << 30)[0] == "ivf-pq"
    assert choose_type("auto", 10_000_000, 512, 8 << 30)[0] == "ivf-sq8"
    gallery = tmp_path / "g"
    x = clustered(20000, 3)
    add_shards(gallery, x, "a")
    summary = build_index(gallery, knn_k=5, memory_budget="1M")  # sq8 would take 1.5 MB: PQ + re-ranking
    meta = read_meta(current_version(gallery))
    assert summary["index_type"] == meta.type == "ivf-pq" and meta.refine_factor
    assert meta.memory_budget == 1 << 20 and meta.expected_bytes <= 1 << 20 and "budget" in meta.choice
    gi = load_index(gallery, gpu="off")
    _, found = gi.search(x[:1000], 10)
    assert recall(found, exact_neighbours(x[:1000], x, 10), 10) >= 0.9  # exact re-ranking of the shortlist
    assert build_index(gallery, knn_k=5, memory_budget="1G")["index_type"] == "flat"


def test_a_nightly_past_the_budget_keeps_the_type_until_the_next_retrain(tmp_path):
    """One night's growth past the budget keeps the live IVF type (an O(new) nightly, the choice
    recorded as kept) instead of a full rebuild; a changed budget chooses again at once."""
    from reidx.indexers.faiss_ops import default_nlist, expected_bytes

    gallery = tmp_path / "g"
    add_shards(gallery, clustered(8000, 5), "a")
    budget = expected_bytes("ivf-sq8", 8000, DIM, default_nlist(8000)) + 1024  # sq8 fits 8,000, not 9,000
    assert choose_type("auto", 9000, DIM, budget)[0] == "ivf-pq"
    assert build_index(gallery, knn_k=5, memory_budget=str(budget))["index_type"] == "ivf-sq8"
    add_shards(gallery, clustered(1000, 6), "b")
    summary = build_index(gallery, knn_k=5, memory_budget=str(budget))
    meta = read_meta(current_version(gallery))
    assert summary["mode"] == "incremental" and summary["index_type"] == meta.type == "ivf-sq8"
    assert meta.count == 9000 and meta.choice.startswith("ivf-sq8: kept until the next retrain")
    assert meta.expected_bytes > budget  # over the budget, and saying so
    add_shards(gallery, clustered(500, 7), "c")
    summary = build_index(gallery, knn_k=5, memory_budget=str(budget - 1))  # the budget changed: choose now
    assert summary["mode"] == "full" and summary["index_type"] == "ivf-pq"
    assert summary["reason"] == "index type changes from ivf-sq8 to ivf-pq"


def test_hnsw_index_on_data_without_clusters(tmp_path):
    """Issue 12 item 6: `--type hnsw` on unclustered vectors (Gaussian, the case IVF handles worst):
    efSearch calibrated to recall@100 ≥ 0.95 and recorded as the version's search breadth; a nightly
    inserts only the new rows into the stored graph; filtered searches (widened) return only allowed
    items; the kNN graph stays accurate."""
    gallery = tmp_path / "g"
    rng = np.random.default_rng(7)
    x = rng.standard_normal((12000, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    scores = np.where(np.arange(10000) % 100 == 7, 1.0, 0.5)  # 1 % of the items pass min_score 0.9
    add_shards(gallery, x[:10000], "base", cameras=4, scores=scores)
    summary = build_index(gallery, index_type="hnsw", knn_k=10)
    meta = read_meta(current_version(gallery))
    assert summary["index_type"] == meta.type == "hnsw" and meta.nlist is None and meta.quantizer == "none"
    assert meta.nprobe >= 128 and meta.recall_at_100 >= 0.95 and meta.knn_recall >= 0.9
    assert "template.faiss" not in os.listdir(current_version(gallery))
    gi = load_index(gallery, gpu="auto")
    assert not gi.on_gpu and isinstance(faiss.downcast_index(gi.index), faiss.IndexHNSWFlat)
    queries = x[10000:10500]
    _, found = gi.search(queries, 10)
    assert recall(found, exact_neighbours(queries, x[:10000], 10), 10) >= 0.95

    from reidx.indexers.filters import SearchFilter, filtered_search

    allowed = SearchFilter(cameras=("2",))
    _, found = filtered_search(gi, queries, 10, allowed, [frozenset()] * len(queries))
    camera_two = np.flatnonzero(np.arange(10000) % 4 == 1)
    assert (found >= 0).all() and (found % 4 == 1).all()
    truth = camera_two[exact_neighbours(queries, x[camera_two], 10)]
    assert recall(found, truth, 10) >= 0.9
    # 100 items pass: fewer than a widened walk would visit (~10 / 1 % deep), so they are scored exactly
    _, found = filtered_search(gi, queries, 10, SearchFilter(min_score=0.9), [frozenset()] * len(queries))
    passing = np.flatnonzero(scores > 0.9)
    assert np.array_equal(found, passing[exact_neighbours(queries, x[passing], 10)])

    add_shards(gallery, x[10000:], "night1", cameras=4)
    summary = build_index(gallery, index_type="hnsw", knn_k=10)
    assert summary["mode"] == "incremental" and summary["persons_added"] == 2000 and summary["persons"] == 12000
    gi = load_index(gallery, gpu="off")
    assert gi.meta.knn_recall >= 0.9 and gi.meta.build["knn_rows_updated"] > 0
    _, found = gi.search(x[10000:], 1)
    assert (found[:, 0] == np.arange(10000, 12000)).mean() > 0.99


def test_hnsw_filtered_queries_get_full_exact_lists_on_clustered_data(tmp_path):
    """A graph walk stays near the query: on tight clusters with a 1-in-6 camera filter a widened
    HNSW search left every query short of k (recall 0.35, measured without the fallback); the
    passing items are then scored exactly, so every query gets its true top-k."""
    from reidx.indexers.filters import SearchFilter, filtered_search

    gallery = tmp_path / "g"
    x = clustered(10300, 3, clusters=60, spread=0.1)
    add_shards(gallery, x[:10000], "base", cameras=6)
    build_index(gallery, index_type="hnsw", knn_k=10)
    gi = load_index(gallery, gpu="off")
    queries = x[10000:]
    _, found = filtered_search(gi, queries, 100, SearchFilter(cameras=("3",)), [frozenset()] * len(queries))
    camera_three = np.flatnonzero(np.arange(10000) % 6 == 2)
    assert (found >= 0).all() and np.isin(found, camera_three).all()
    assert recall(found, camera_three[exact_neighbours(queries, x[camera_three], 100)], 100) >= 0.999


BUILD = ("import sys; from reidx.indexers.build import build_index; "
         "build_index(sys.argv[1], index_type='ivf-sq8', knn_k=10, task_rows=4000, rebuild=sys.argv[2] == 'full')")


def test_a_killed_build_or_nightly_leaves_the_live_version_intact(tmp_path):
    gallery = tmp_path / "g"
    x = clustered(24000, 4)
    add_shards(gallery, x[:16000], "a")
    build_index(gallery, index_type="ivf-sq8", knn_k=10, task_rows=4000)
    live = load_index(gallery, gpu="off")
    expected = live.search(x[:200], 10)
    add_shards(gallery, x[16000:], "b")
    env = dict(os.environ)  # the subprocess imports the reidx under test (PYTHONPATH as given)
    for mode, delay in (("nightly", 0.8), ("nightly", 2.0), ("full", 1.5), ("full", 4.0)):
        proc = subprocess.Popen([sys.executable, "-c", BUILD, str(gallery), mode], env=env)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        gi = load_index(gallery, gpu="off")
        if gi.meta.version == live.meta.version:  # the kill came before the swap: the old version serves
            got = gi.search(x[:200], 10)
            assert np.array_equal(got[1], expected[1])
        else:  # the swap happened: the new version is complete
            assert gi.count == 24000 == gi.items.num_rows
    summary = build_index(gallery, index_type="ivf-sq8", knn_k=10, task_rows=4000)
    gi = load_index(gallery, gpu="off")
    assert gi.count == 24000 == gi.items.num_rows and summary["persons"] == 24000
    root = gallery / "index"
    assert not list(root.glob(".v-*.tmp")) and len(list(root.glob("v-*"))) <= 2
    _, found = gi.search(x[16000:16500], 1)
    assert (found[:, 0] == np.arange(16000, 16500)).mean() > 0.99


def test_float16_shards_keep_con_reid_map(msmt17_split):
    """Issue 12 item 7: gallery vectors stored as float16 (the shard column as write_shard stores
    it) and read back as the index reads them move Con-ReID mAP far less than the 0.05 allowed."""
    import dataclasses

    from reidx.indexers.evaluation import evaluate_split
    from reidx.pipeline.embedding_table import embeddings_to_numpy
    from reidx.pipeline.shards import with_embedding_dtype

    query, gallery = msmt17_split
    dim = gallery.features.shape[1]
    table = pa.table({"embedding": pa.FixedSizeListArray.from_arrays(pa.array(gallery.features.reshape(-1)), dim)})
    stored = with_embedding_dtype(table, "float16")
    assert stored.schema.field("embedding").type.value_type == pa.float16()
    read_back = embeddings_to_numpy(stored["embedding"])
    assert read_back.dtype == np.float32 and read_back.shape == gallery.features.shape
    full = evaluate_split(query, gallery)
    half = evaluate_split(query, dataclasses.replace(gallery, features=read_back))
    print(f"Con-ReID mAP float32 {full.mAP:.5f}, float16 gallery {half.mAP:.5f}; "
          f"rank-1 {full.rank(1):.5f} / {half.rank(1):.5f}")
    assert abs(full.mAP - half.mAP) < 0.005  # the issue allows 0.05
