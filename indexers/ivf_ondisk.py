"""IVF indexes whose inverted lists live on disk: built in parts, merged by streaming, searched memory-mapped.

Every IVF file here is an ordinary Faiss index file (``faiss.write_index`` layout, inverted lists
as one contiguous block at the end: per list its codes, then its ids), so
``faiss.read_index(path, faiss.IO_FLAG_MMAP)`` maps the lists instead of reading them and nothing
but the coarse quantizer is loaded. No absolute paths are stored (unlike ``OnDiskInvertedLists``
files), so a version folder can be renamed, moved or hard-linked.

- A *part* is an empty copy of the trained index (the *template*) filled with some shards'
  vectors under their global Faiss ids (``add_part``): what each Dask worker writes.
- :func:`merge_parts` concatenates parts list by list into one file with plain sequential reads
  and writes (no mmap, so the build's resident memory stays one chunk of lists, whatever N).
  Parts are merged in id order, so every list holds its ids ascending: the same lists, in the
  same order, as one process adding every vector in order.
- :func:`open_ivf` maps a base file and the nightly *delta* files and stacks their lists
  (``HStackInvertedLists``): a nightly adds a delta file instead of rewriting the base.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import faiss
import numpy as np

_TAIL = 32  # an empty index ends with: b"ilar", nlist u64, code_size u64, b"sprs", 0 u64
MERGE_CHUNK_BYTES = 64 << 20  # lists merged per step: about this many bytes read from all parts


def template_bytes(index: faiss.Index) -> bytes:
    """The trained, empty index serialised: what workers copy, and the header of every merged file."""
    if index.ntotal:
        raise ValueError("the template must be an empty (trained) index")
    data = faiss.serialize_index(index).tobytes()
    ivf = faiss.extract_index_ivf(index)
    expected = b"ilar" + struct.pack("<QQ", ivf.nlist, ivf.code_size) + b"sprs" + struct.pack("<Q", 0)
    if data[-_TAIL:] != expected:
        raise ValueError("unexpected Faiss serialisation of an empty IVF index (inverted lists not last)")
    return data


def add_part(templates: list[bytes], batches, paths: list[Path], nearest: int = 1) -> np.ndarray:
    """Fill an empty copy of each template with ``(ids, vectors)`` batches and write it to the
    matching path (fsynced); returns each vector's ``nearest`` lists by the first template's
    quantizer, (n, nearest) int32, best first: column 0 is the list it was added to. The lists are
    assigned once (as that template's ``add_with_ids`` would) and every template is filled with
    that assignment: the kNN-graph codes (``indexers.graph_codes``) share the index's lists, and
    a nightly's new graph rows reuse the other columns as their probes (the coarse search done
    once). Memory: the parts' codes plus one batch."""
    indexes = [faiss.deserialize_index(np.frombuffer(t, np.uint8)) for t in templates]
    quantizer = faiss.extract_index_ivf(indexes[0]).quantizer
    assigned = []
    for ids, vectors in batches:
        vectors = np.ascontiguousarray(vectors, np.float32)
        ids = np.ascontiguousarray(ids, np.int64)
        top = quantizer.assign(vectors, nearest).reshape(len(vectors), nearest)
        lists = np.ascontiguousarray(top[:, 0], np.int64)
        for index in indexes:
            index.add_core(len(ids), faiss.swig_ptr(vectors), faiss.swig_ptr(ids), faiss.swig_ptr(lists))
        assigned.append(top.astype(np.int32))
    for index, path in zip(indexes, paths):
        faiss.write_index(index, str(path))
        _fsync(path)
    return np.concatenate(assigned) if assigned else np.zeros((0, nearest), np.int32)


class IvfListsFile:
    """The inverted lists of an IVF index file, read with plain reads (no mapping, no Faiss)."""

    def __init__(self, path: Path, header_len: int):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            f.seek(header_len)
            head = f.read(24)
            if head[:4] != b"ilar":
                raise ValueError(f"{path}: not an IVF index file with array inverted lists")
            self.nlist, self.code_size = struct.unpack("<QQ", head[4:20])
            kind = head[20:24]
            (count,) = struct.unpack("<Q", f.read(8))
            values = np.frombuffer(f.read(8 * count), "<u8").astype(np.int64)
            self.data_start = f.tell()
        if kind == b"full":
            self.sizes = values
        elif kind == b"sprs":
            self.sizes = np.zeros(self.nlist, np.int64)
            self.sizes[values[0::2]] = values[1::2]
        else:
            raise ValueError(f"{path}: unknown inverted-list layout {kind!r}")
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes * (self.code_size + 8))]) + self.data_start

    def read_lists(self, first: int, last: int) -> list[tuple[bytes, bytes]]:
        """``(codes, ids)`` bytes of lists first..last-1, one read."""
        with open(self.path, "rb") as f:
            f.seek(int(self.offsets[first]))
            block = f.read(int(self.offsets[last] - self.offsets[first]))
        out, at = [], 0
        for size in self.sizes[first:last]:
            codes = int(size) * self.code_size
            out.append((block[at:at + codes], block[at + codes:at + codes + 8 * int(size)]))
            at += codes + 8 * int(size)
        return out


def header_length(template: bytes) -> int:
    return len(template) - _TAIL


def merge_parts(template: bytes, parts: list[Path], out: Path) -> int:
    """Write one IVF index file holding the lists of ``parts`` concatenated in the given order
    (fsynced); returns its vector count. Streams: memory is one chunk of lists."""
    header = header_length(template)
    files = [IvfListsFile(p, header) for p in parts]
    index_template = faiss.deserialize_index(np.frombuffer(template, np.uint8))
    ivf = faiss.extract_index_ivf(index_template)
    nlist, code_size = int(ivf.nlist), int(ivf.code_size)
    if any(f.nlist != nlist or f.code_size != code_size for f in files):
        raise ValueError("parts of different indexes cannot be merged")
    sizes = np.sum([f.sizes for f in files], axis=0).astype(np.int64) if files else np.zeros(nlist, np.int64)
    total = int(sizes.sum())
    per_list = max(1.0, float(sizes.mean()) * (code_size + 8))
    step = max(1, int(MERGE_CHUNK_BYTES // per_list))
    with open(out, "wb") as f:
        f.write(template[:8] + struct.pack("<q", total) + template[16:header])
        f.write(b"ilar" + struct.pack("<QQ", nlist, code_size) + b"full" + struct.pack("<Q", nlist))
        f.write(sizes.astype("<u8").tobytes())
        for first in range(0, nlist, step):
            last = min(nlist, first + step)
            chunks = [p.read_lists(first, last) for p in files]
            for j in range(last - first):
                f.write(b"".join(c[j][0] for c in chunks))
                f.write(b"".join(c[j][1] for c in chunks))
        f.flush()
        os.fsync(f.fileno())
    return total


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


class MappedIvf:
    """A base IVF file and its delta files, memory-mapped, searched as one index (``.index``).

    Holds the component indexes: Faiss does not own the stacked lists, Python must keep them alive.
    """

    def __init__(self, paths: list[Path]):
        self.index = faiss.read_index(str(paths[0]), faiss.IO_FLAG_MMAP)
        self.parts = []
        if len(paths) > 1:
            # the shell (self.index) owns the stack; the stack only points at the parts' lists,
            # which self.parts keeps alive as long as this object
            self.parts = [faiss.read_index(str(p), faiss.IO_FLAG_MMAP) for p in paths]
            self._vector = faiss.InvertedListsPtrVector()
            for part in self.parts:
                self._vector.push_back(faiss.extract_index_ivf(part).invlists)
            stack = faiss.HStackInvertedLists(self._vector.size(), self._vector.data())
            ivf = faiss.extract_index_ivf(self.index)
            ivf.replace_invlists(stack, True)
            stack.this.disown()
            ivf.ntotal = self.index.ntotal = sum(int(p.ntotal) for p in self.parts)


def open_ivf(paths: list[Path]) -> MappedIvf:
    return MappedIvf([Path(p) for p in paths])


def release_pages(paths: list[Path]) -> int:
    """Drop this process's resident pages of every mapping of these files (Linux
    ``madvise(MADV_DONTNEED)``; elsewhere nothing): they stay in the page cache, so touching them
    again is a minor fault, but they stop counting in the process's resident memory. Faiss maps
    a whole index file and keeps no handle Python could unmap, so a build that searches it
    (calibration) calls this between query chunks. Mappings are found by inode (hard links and
    renamed folders included) or by path (overlay filesystems show the lower file's device and
    inode there, not what ``stat`` returns). Returns the bytes advised."""
    import ctypes

    try:
        wanted = {(os.stat(p).st_dev, os.stat(p).st_ino) for p in paths}
        names = {os.path.realpath(p) for p in paths}
        with open("/proc/self/maps") as f:
            lines = f.readlines()
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return 0
    advised = 0
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or fields[4] == "0":
            continue
        major, minor = (int(x, 16) for x in fields[3].split(":"))
        if (os.makedev(major, minor), int(fields[4])) not in wanted and fields[5].strip() not in names:
            continue
        low, high = (int(x, 16) for x in fields[0].split("-"))
        if libc.madvise(ctypes.c_void_p(low), ctypes.c_size_t(high - low), 4) == 0:  # MADV_DONTNEED
            advised += high - low
    return advised


def list_sizes(paths: list[Path], template: bytes) -> np.ndarray:
    """Vectors per list over all files (list balance, without mapping anything)."""
    header = header_length(template)
    return np.sum([IvfListsFile(p, header).sizes for p in paths], axis=0)
