"""IVF-QINCo indexes at scale: database codes added in bounded chunks, inverted lists on
disk, built by several processes and merged on disk into one index.

A database of a billion codes does not fit in memory, and neither do its inverted lists.
Here:

- the codes come from *sources*, one per file (the `.part_<i>.npz` parts of an encoded
  set, `.npy` / `.ivecs` / packed code files, or vectors encoded on the fly), and are read
  chunk by chunk: at most `chunk_rows` codes (the reference's 1M) are in memory at a time.
  Each source is cut into chunks on its own, as the reference's add loop cuts each part,
  so a chunk never spans two files and the lists get the reference's order;
- with `ondisk`, the lists live in `<index>.ivfdata` beside `<index>.faissindex` (faiss's
  `OnDiskInvertedLists`, memory-mapped), so neither building nor searching holds them
  in RAM;
- on P processes, the chunks are split into P contiguous blocks (balanced by rows);
  process p adds its block to its own on-disk lists, the *shard*
  `<index>.shard<p>of<P>.{faissindex,ivfdata,json}` (the `.json` manifest, written
  last, says which rows the shard holds and what it was built from), and the lists of
  all shards are then concatenated list by list into the final `.ivfdata` (faiss's
  merge-on-disk). Since shard p holds the rows that come before shard p + 1's, every
  list holds the same entries in the same order as a one-process build: searches return
  exactly the same results. A one-process on-disk build is the same with P = 1 (the
  merge then compacts the lists).

Who merges: with a barrier (JAX's multi-process runtime), process 0 after all shards are
written; without one (processes numbered by QINCO_PROCESS_INDEX / COUNT), the process
that finds all P manifests written when it finishes its own (a lock file makes it one).
`merge_shards` can also be run on its own, once every shard is written.

Every file is written under a temporary name and renamed into place when complete (the
`.ivfdata` before the `.faissindex` that names it); bad input (missing, duplicated or
overlapping parts or shards, parts of another model, shards of another index) is refused
before anything is renamed into place, with an error naming the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import faiss
import numpy as np

from qinco_jax.formats import code_parts
from qinco_jax.formats.io import atomic_path
from qinco_jax.search import index as ivf
from qinco_jax.search.index_files import (IndexBuildError, check_ivfdata, ivfdata_path, ondisk_lists,
                                          read_ondisk_index)

ADD_CHUNK = 1_000_000  # codes read and added at a time (the reference's add batch)
Log = Callable[[str], None]


# --------------------------------------------------------------------------------------
# Sources of database codes
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CodeSource:
    """One file of database codes (or an array): `n_rows` codes of `width` columns.

    `read(ranges)` yields the codes of each row range [start, end) in turn (ranges
    increasing); `identity` is what two sources with the same content share (None: not
    checked) — it finds a part given twice or copied under another name."""

    name: str
    n_rows: int
    width: int
    read: Callable[[Sequence[tuple[int, int]]], Iterator[np.ndarray]] = dataclasses.field(compare=False, repr=False)
    identity: tuple | None = None

    def describe(self) -> dict:
        return {"name": self.name, "n_rows": self.n_rows, "width": self.width,
                "identity": list(self.identity) if self.identity else None}


def _slices(array) -> Callable[[Sequence[tuple[int, int]]], Iterator[np.ndarray]]:
    def read(ranges):
        for start, end in ranges:
            yield np.asarray(array[start:end])
    return read


def array_source(codes: np.ndarray, name: str = "codes") -> CodeSource:
    """Codes (n, width) already in memory (or a memory map)."""
    if codes.ndim != 2:
        raise IndexBuildError(f"{name}: codes must be (n, width), got shape {codes.shape}")
    return CodeSource(name, len(codes), codes.shape[1], _slices(codes))


def _file_identity(path: str, kind: str) -> tuple:
    """Size and a hash of the file's first and last MiB: cheap, and enough to find a file
    given twice or copied (codes of different vectors differ there)."""
    size = os.path.getsize(path)
    h = hashlib.sha1()
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(size - (1 << 20))
            h.update(f.read())
    return (kind, size, h.hexdigest())


def npy_source(path: str | os.PathLike) -> CodeSource:
    """A `.npy` array of codes (n, width), memory-mapped."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"codes file {path} not found")
    try:
        codes = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise IndexBuildError(f"codes file {path} is not a readable .npy array ({e})") from None
    if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
        raise IndexBuildError(f"codes file {path} holds {codes.dtype} {codes.shape}, not integer codes (n, width)")
    return CodeSource(path, len(codes), codes.shape[1], _slices(codes), _file_identity(path, "npy"))


def npz_source(path: str | os.PathLike) -> CodeSource:
    """The codes of one `.npz` file (a part, or a single file holding `codes`), read as a
    stream."""
    path = os.fspath(path)
    (n, width), _dtype, crc = code_parts.npz_codes_shape(path)
    return CodeSource(path, n, width, lambda ranges: code_parts.iter_npz_rows(path, ranges), ("npz", n, width, crc))


def code_file_source(path: str | os.PathLike, width: int, nbits: Sequence[int] | None = None) -> CodeSource:
    """A file of codes (n, width) as search_ivf.py's --xb_codes reads them: `.npy`,
    `.ivecs`, `.ibin`, ... (memory-mapped), or, with nbits (per-column bit widths),
    packed bit strings (qinco-codec --raw), unpacked chunk by chunk."""
    from qinco_jax.formats import packing, vecs_io

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"codes file {path}: no such file")
    if Path(path).suffix.lower() in vecs_io.EXTENSIONS:
        codes = vecs_io.read_vectors(path, mmap=True)
        if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
            raise IndexBuildError(f"codes file {path} holds {codes.dtype} {codes.shape}, not integer codes")
        return CodeSource(path, len(codes), codes.shape[1], _slices(codes), _file_identity(path, "vecs"))
    if nbits is None:
        raise IndexBuildError(f"codes file {path}: not a vector file ({', '.join(vecs_io.EXTENSIONS)}), and "
                              "packed codes need their bit widths")
    size = packing.code_size(list(nbits))
    nbytes = os.path.getsize(path)
    if nbytes % size:
        raise IndexBuildError(f"raw codes file {path}: {nbytes} bytes is not a whole number of {size}-byte codes")
    packed = np.memmap(path, dtype=np.uint8, mode="r", shape=(nbytes // size, size)) if nbytes else \
        np.zeros((0, size), np.uint8)

    def read(ranges):
        for start, end in ranges:
            yield packing.unpack_codes(np.asarray(packed[start:end]), end - start, list(nbits))

    return CodeSource(path, len(packed), len(nbits), read, _file_identity(path, "raw"))


def encoded_source(rows: Callable[[int, int], np.ndarray], n: int, width: int,
                   encode: Callable[[np.ndarray], np.ndarray], name: str = "database") -> CodeSource:
    """Vectors encoded as they are read: rows(start, end) gives vectors [start, end)
    (a memory map's slice), encode turns them into codes (rows, width)."""
    def read(ranges):
        for start, end in ranges:
            yield encode(rows(start, end))
    return CodeSource(name, int(n), int(width), read)


def encoded_set_sources(path: str | os.PathLike) -> tuple[list[CodeSource], code_parts.CodeFileHeader | None]:
    """The sources of an encoded set (QINCo2's `encoded_db=`): a header `.npz` and its
    `.part_<i>.npz` files (one source per part, checked: all present, none left over from
    another split, row counts as the encoding processes split them), a single `.npz`
    holding `codes`, or a `.npy` array. Returns (sources, header or None)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"codes file {path} not found")
    if path.endswith(".npy"):
        return [npy_source(path)], None
    try:
        with np.load(path, allow_pickle=False) as z:
            is_header = "n_parts" in z.files
    except (ValueError, OSError) as e:
        raise IndexBuildError(f"{path}: not a readable .npz file ({e})") from None
    if not is_header:
        return [npz_source(path)], None
    header = code_parts.read_code_header(path)
    parts = [code_parts.part_path(path, i) for i in range(header.n_parts)]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise IndexBuildError(f"encoded set {path}: its header announces {header.n_parts} parts, "
                              f"{', '.join(missing)} missing (was every encoding process finished?)")
    extra = code_parts.part_path(path, header.n_parts)
    if extra.is_file():
        raise IndexBuildError(f"encoded set {path}: its header announces {header.n_parts} parts, but {extra} "
                              "exists too (left over from an encoding on more processes?): remove the stale "
                              "parts or encode again")
    sources = [npz_source(p) for p in parts]
    # the encoding processes split the rows as part_rows does: equal parts, the last
    # with the remainder; a part of another size overlaps its neighbour or leaves a gap
    n = sum(s.n_rows for s in sources)
    for i, s in enumerate(sources):
        start, end = code_parts.part_rows(n, header.n_parts, i)
        if s.n_rows != end - start:
            raise IndexBuildError(f"{s.name} holds {s.n_rows} codes, but part {i} of {header.n_parts} parts of "
                                  f"{n} codes holds {end - start}: the parts overlap or leave a gap (mixed "
                                  "from different encodings?)")
    return sources, header


def first_rows(sources: Sequence[CodeSource], n: int) -> list[CodeSource]:
    """The sources cut to the database's first n rows (e.g. the 1M data sets' limit)."""
    out, left = [], max(0, int(n))
    for s in sources:
        if left <= 0:
            break
        out.append(dataclasses.replace(s, n_rows=min(s.n_rows, left)))
        left -= out[-1].n_rows
    return out


def check_sources(sources: Sequence[CodeSource], index=None, *, header: code_parts.CodeFileHeader | None = None,
                  header_path: str = "") -> None:
    """Raise an IndexBuildError naming the file if a source cannot fill `index`: header
    K / M / D of another model, codes of another width, or a file given twice (index
    None: that last check only)."""
    _check_distinct(sources)
    if index is None:
        return
    M, K = index.rq.M, 1 << ivf.rq_nbits(index)[0]
    if header is not None:
        if (header.K, header.M, header.D) != (K, M, index.d):
            raise IndexBuildError(f"encoded set {header_path}: its header says K={header.K}, M={header.M}, "
                                  f"D={header.D}; the index needs K={K}, M={M}, D={index.d} (codes of another "
                                  "model?)")
    for s in sources:
        if s.width != M + 1:
            raise IndexBuildError(f"{s.name} has {s.width} columns, the index needs codes of {M + 1} columns "
                                  f"(IVF list + {M} steps)")


def _check_distinct(sources: Sequence[CodeSource]) -> None:
    real = [s.name for s in sources if os.path.exists(s.name)]
    for i, a in enumerate(real):
        for b in real[i + 1:]:
            if os.path.samefile(a, b):
                raise IndexBuildError(f"{a} and {b} are the same file: a part given twice")
    seen: dict = {}
    for s in sources:
        key = s.identity
        if key is None:
            continue
        if key in seen:
            raise IndexBuildError(f"{s.name} holds the same codes as {seen[key]}: a part given twice "
                                  "(or copied)?")
        seen[key] = s.name


# --------------------------------------------------------------------------------------
# Chunks and process shares
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Rows [start, end) of source `source`, which are database ids first_id, ..."""

    source: int
    start: int
    end: int
    first_id: int


def plan_chunks(sources: Sequence[CodeSource], chunk_rows: int = ADD_CHUNK) -> list[Chunk]:
    """Every source cut into chunks of at most chunk_rows rows, in order; ids run on
    from one source to the next."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    chunks, first = [], 0
    for i, s in enumerate(sources):
        for start in range(0, s.n_rows, chunk_rows):
            end = min(s.n_rows, start + chunk_rows)
            chunks.append(Chunk(i, start, end, first + start))
        first += s.n_rows
    return chunks


def process_share(chunks: Sequence[Chunk], process_index: int, process_count: int) -> list[Chunk]:
    """The contiguous block of chunks of process process_index of process_count: cut
    where the rows before reach p / P of all rows (chunk boundaries only)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process index {process_index} out of range for {process_count} processes")
    ends = np.cumsum([c.end - c.start for c in chunks])
    total = int(ends[-1]) if len(ends) else 0

    def cut(p):  # index of the first chunk of process p
        return int(np.searchsorted(ends, total * p / process_count, side="right")) if 0 < p < process_count \
            else (0 if p == 0 else len(chunks))

    return list(chunks[cut(process_index):cut(process_index + 1)])


def iter_chunk_codes(sources: Sequence[CodeSource], chunks: Sequence[Chunk]) -> Iterator[tuple[Chunk, np.ndarray]]:
    """(chunk, its codes) for each chunk, each source read once, in order."""
    i = 0
    while i < len(chunks):
        j = i
        while j < len(chunks) and chunks[j].source == chunks[i].source:
            j += 1
        group = chunks[i:j]
        for chunk, codes in zip(group, sources[chunks[i].source].read([(c.start, c.end) for c in group])):
            if len(codes) != chunk.end - chunk.start:
                raise IndexBuildError(f"{sources[chunk.source].name}: rows [{chunk.start}, {chunk.end}) gave "
                                      f"{len(codes)} codes")
            yield chunk, codes
        i = j


def add_chunks(index, sources: Sequence[CodeSource], chunks: Sequence[Chunk], log: Log = print) -> int:
    """Add the chunks' codes to `index` (in-memory or on-disk lists), ids = database
    rows; returns the number added. One chunk in memory at a time."""
    codebooks = ivf.index_codebooks(index)
    total, added = sum(c.end - c.start for c in chunks), 0
    for chunk, codes in iter_chunk_codes(sources, chunks):
        what = f"codes of {sources[chunk.source].name} rows [{chunk.start}, {chunk.end})"
        try:
            ivf.add_codes(index, None, ivf.check_index_codes(index, codes, what), first_id=chunk.first_id,
                          codebooks=codebooks)
        except ValueError as e:
            raise IndexBuildError(str(e)) from None
        added += len(codes)
        log(f"  added {added} / {total} codes ({sources[chunk.source].name} rows {chunk.start}:{chunk.end})")
    return added


def build_in_memory(index, sources: Sequence[CodeSource], *, chunk_rows: int = ADD_CHUNK, log: Log = print):
    """Fill the empty trained `index` (in-memory lists) from the sources, chunk by chunk."""
    _require_empty(index)
    add_chunks(index, sources, plan_chunks(sources, chunk_rows), log)
    return index


def _require_empty(index) -> None:
    if index.ntotal:
        raise IndexBuildError(f"the trained index already holds {index.ntotal} vectors; building needs an empty one")


# --------------------------------------------------------------------------------------
# On-disk files
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ShardFiles:
    index: Path
    ivfdata: Path
    manifest: Path


def shard_files(index_path: str | os.PathLike, process_index: int, process_count: int) -> ShardFiles:
    base = Path(index_path)
    stem = base.with_suffix("").name + f".shard{process_index}of{process_count}"
    return ShardFiles(base.with_name(stem + ".faissindex"), base.with_name(stem + ".ivfdata"),
                      base.with_name(stem + ".json"))


def trained_fingerprint(index) -> str:
    """What every shard's trained index must share for its lists to be merged: layout,
    IVF centroids, RQ codebooks and norm quantizer (not the HNSW graph of the coarse
    quantizer, which multi-threaded construction may order differently)."""
    h = hashlib.sha256()
    h.update(np.array([index.d, index.nlist, index.code_size, index.rq.M, index.rq.search_type], np.int64).tobytes())
    h.update(np.ascontiguousarray(ivf.coarse_quantizer(index).reconstruct_n(0, index.nlist)).tobytes())
    h.update(faiss.vector_to_array(index.rq.codebooks).tobytes())
    h.update(np.array([index.rq.norm_min, index.rq.norm_max], np.float64).tobytes())
    h.update(faiss.vector_to_array(index.rq.qnorm.codes).tobytes() if index.rq.qnorm.ntotal else b"")
    return h.hexdigest()


def _with_ondisk_lists(trained, data_path: Path):
    index = ivf.as_ivf_index(faiss.clone_index(trained))
    lists = faiss.OnDiskInvertedLists(index.nlist, index.code_size, str(data_path))
    index.replace_invlists(lists, True)
    lists.this.disown()
    return index


def _write_ondisk(index, index_path: Path, data_tmp: Path, data_path: Path) -> None:
    """Write the index that names the lists' final file under a temporary name, then
    rename the lists and the index into place, one right after the other: a failed write
    leaves the files written before as they were."""
    lists = ondisk_lists(index)
    lists.filename = str(data_path.resolve())
    with atomic_path(index_path) as tmp:
        faiss.write_index(index, str(tmp))
        os.replace(data_tmp, data_path)


def _tmp_beside(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


# --------------------------------------------------------------------------------------
# Building on disk: shards, merge
# --------------------------------------------------------------------------------------


def build_shard(trained, sources: Sequence[CodeSource], index_path: str | os.PathLike, *, process_index: int = 0,
                process_count: int = 1, chunk_rows: int = ADD_CHUNK, log: Log = print) -> ShardFiles:
    """Process process_index's share of the chunks added to its own on-disk lists (the
    shard's `.ivfdata` / `.faissindex`), then its manifest, written last."""
    _require_empty(trained)
    chunks = plan_chunks(sources, chunk_rows)
    if not chunks:
        raise IndexBuildError(f"no database codes to add to {index_path} (faiss cannot map empty on-disk lists)")
    mine = process_share(chunks, process_index, process_count)
    files = shard_files(index_path, process_index, process_count)
    first = mine[0].first_id if mine else (chunks[0].first_id if chunks and process_index == 0 else None)
    if first is None:  # an empty share: its place is where the next process's starts
        later = [c for p in range(process_index + 1, process_count) for c in process_share(chunks, p, process_count)]
        first = later[0].first_id if later else sum(s.n_rows for s in sources)
    end = first + sum(c.end - c.start for c in mine)
    log(f"process {process_index}/{process_count}: adding database rows [{first}, {end}) in {len(mine)} chunk(s) "
        f"to {files.ivfdata}")
    files.index.parent.mkdir(parents=True, exist_ok=True)
    ntotal = 0
    if mine:  # an empty share writes its manifest alone (faiss cannot map empty lists)
        tmp = _tmp_beside(files.ivfdata)
        try:
            shard = _with_ondisk_lists(trained, tmp)
            ntotal = add_chunks(shard, sources, mine, log)
            _write_ondisk(shard, files.index, tmp, files.ivfdata)
        finally:
            if tmp.exists():
                tmp.unlink()
    manifest = {"process_index": process_index, "process_count": process_count, "rows": [first, end],
                "total_rows": sum(s.n_rows for s in sources), "ntotal": int(ntotal),
                "trained": trained_fingerprint(trained), "sources": [s.describe() for s in sources],
                "chunk_rows": chunk_rows}
    with atomic_path(files.manifest) as t:
        t.write_text(json.dumps(manifest, indent=1))
    log(f"process {process_index}/{process_count}: shard of {ntotal} vectors in {files.index}")
    return files


def _read_manifest(files: ShardFiles, process_index: int, process_count: int) -> dict:
    if not files.manifest.is_file():
        raise IndexBuildError(f"shard {process_index} of {process_count} is missing: {files.manifest} not found "
                              "(has that process finished?)")
    try:
        m = json.loads(files.manifest.read_text())
    except (OSError, ValueError) as e:
        raise IndexBuildError(f"{files.manifest}: not a readable shard manifest ({e})") from None
    if (m.get("process_index"), m.get("process_count")) != (process_index, process_count):
        raise IndexBuildError(f"{files.manifest} describes shard {m.get('process_index')} of "
                              f"{m.get('process_count')}, not {process_index} of {process_count}")
    return m


def merge_shards(index_path: str | os.PathLike, process_count: int, *, remove_shards: bool = True,
                 log: Log = print):
    """Merge the P shards of `index_path` into `<index>.faissindex` + `<index>.ivfdata`:
    each list is shard 0's entries of it, then shard 1's, ... After checking that the
    shards are all there, built from the same sources and trained index, and hold rows
    that tile the database without overlap. Returns the merged index (lists on disk)."""
    index_path = Path(index_path)
    files = [shard_files(index_path, p, process_count) for p in range(process_count)]
    manifests = [_read_manifest(f, p, process_count) for p, f in enumerate(files)]
    def content(m):  # the sources' contents, not their paths (mounted elsewhere on another machine)
        return {"sources": [(s["n_rows"], s["width"], s["identity"]) for s in m["sources"]],
                "trained": m["trained"], "total_rows": m["total_rows"]}

    for f, m in zip(files[1:], manifests[1:]):
        for key, what in (("sources", "from other codes"), ("trained", "from another trained index"),
                          ("total_rows", "from a database of another size")):
            if content(m)[key] != content(manifests[0])[key]:
                raise IndexBuildError(f"{f.manifest} was built {what} than {files[0].manifest}: shards of "
                                      "different builds cannot be merged")
    at = 0
    for f, m in zip(files, manifests):
        start, end = m["rows"]
        if start != at:
            raise IndexBuildError(f"{f.manifest} holds database rows [{start}, {end}) but the shards before it end "
                                  f"at row {at}: the shards {'overlap' if start < at else 'leave a gap'}")
        at = end
    if at != manifests[0]["total_rows"]:
        raise IndexBuildError(f"the shards hold rows [0, {at}) of {manifests[0]['total_rows']}")
    shards = []
    for f, m in zip(files, manifests):
        if m["ntotal"] == 0:
            continue  # an empty share: no lists
        shard = ivf.as_ivf_index(read_ondisk_index(f.index, "shard"))
        if shard.ntotal != m["ntotal"] or ondisk_lists(shard) is None:
            raise IndexBuildError(f"{f.index} holds {shard.ntotal} vectors, its manifest {f.manifest} says "
                                  f"{m['ntotal']}")
        if trained_fingerprint(shard) != m["trained"]:
            raise IndexBuildError(f"{f.index} is not the shard its manifest {f.manifest} describes")
        shards.append(shard)

    data_path = ivfdata_path(index_path)
    tmp = _tmp_beside(data_path)
    try:
        merged = faiss.OnDiskInvertedLists(shards[0].nlist, shards[0].code_size, str(tmp))
        pointers = faiss.InvertedListsPtrVector()
        for s in shards:
            pointers.push_back(s.invlists)
        ntotal = merged.merge_from_multiple(pointers.data(), pointers.size(), False, False)
        out = shards[0]  # its quantizer and codebooks, the merged lists in place of its own
        out.replace_invlists(merged, True)  # frees shard 0's lists object: read by the merge already
        merged.this.disown()
        out.ntotal = ntotal
        _write_ondisk(out, index_path, tmp, data_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    log(f"merged {process_count} shard(s), {ntotal} vectors, into {index_path} + {data_path}")
    del shards
    if remove_shards:
        for f in files:
            for p in (f.manifest, f.index, f.ivfdata):  # manifest first: a half-removed shard is not complete
                p.unlink(missing_ok=True)
    return read_ondisk_index(index_path)


def build_ondisk(trained, sources: Sequence[CodeSource], index_path: str | os.PathLike, *, process_index: int = 0,
                 process_count: int = 1, barrier: Callable[[str], None] | None = None, chunk_rows: int = ADD_CHUNK,
                 log: Log = print):
    """Build the on-disk index `index_path` from the sources on process process_index of
    process_count: add this process's share to its shard, then merge (see the module
    docstring for who merges). Returns the merged index on the process that merged it,
    else None."""
    build_shard(trained, sources, index_path, process_index=process_index, process_count=process_count,
                chunk_rows=chunk_rows, log=log)
    if barrier is not None:
        barrier("qinco_index_shards_written")
        merged = merge_shards(index_path, process_count, log=log) if process_index == 0 else None
        barrier("qinco_index_merged")
        return merged
    return merge_if_last(index_path, process_count, log=log)


def merge_if_last(index_path: str | os.PathLike, process_count: int, log: Log = print):
    """Merge the shards if they are all written and no other process is merging them
    (a lock file beside the index); else return None and leave it to the last one."""
    files = [shard_files(index_path, p, process_count) for p in range(process_count)]
    waiting = [str(f.manifest) for f in files if not f.manifest.is_file()]
    if waiting:
        log(f"shards still being built ({', '.join(waiting)} not yet written): the last process merges")
        return None
    lock = Path(index_path).with_suffix(".merge_lock")
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        log(f"another process is merging the shards ({lock} exists; if none is, a merge was interrupted: "
            "remove it and run any one process again)")
        return None
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        if not all(f.manifest.is_file() for f in files):
            return None  # merged by another process between the look and the lock
        return merge_shards(index_path, process_count, log=log)
    finally:
        lock.unlink(missing_ok=True)
