"""Reading and writing arrays of vectors in the formats of the ANN benchmarks.

Formats, chosen by the file's extension:

    .npy                    numpy array (n, d)
    .fvecs .ivecs .bvecs    TEXMEX (http://corpus-texmex.irisa.fr/): every row is an int32
                            d followed by d float32 / int32 / uint8 values
    .fbin .ibin .u8bin      big-ann-benchmarks: an int32 n and an int32 d, then n x d
                            float32 / int32 / uint8 values

Readers memory-map by default: rows are read when sliced. Every reader checks the
file's size against its header before mapping it, and a .fvecs/.ivecs/.bvecs reader
checks every row's dimension header (one vectorised pass over the map): a truncated
download or misaligned rows fail with a message naming the file and the row, instead
of a reshape error or silently wrong vectors. All formats are little-endian.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np

from qinco_jax.formats.io import atomic_path, save_npy

# extension -> element dtype of the TEXMEX "vecs" formats (row = int32 d + d elements)
VECS_DTYPES = {".fvecs": np.dtype("<f4"), ".ivecs": np.dtype("<i4"), ".bvecs": np.dtype("u1")}
# extension -> element dtype of the big-ann-benchmarks "bin" formats (header n, d)
BIN_DTYPES = {".fbin": np.dtype("<f4"), ".ibin": np.dtype("<i4"), ".u8bin": np.dtype("u1")}
EXTENSIONS = (".npy",) + tuple(VECS_DTYPES) + tuple(BIN_DTYPES)

_WRITE_CHUNK = 1 << 16  # rows per write: bounds the temporary copy for huge arrays
_HEADER_CHUNK_BYTES = 8 << 20  # file bytes whose row headers are checked per step (pages released after)


def _extension(path: str | os.PathLike) -> str:
    ext = Path(path).suffix.lower()
    if ext not in EXTENSIONS:
        raise ValueError(f"{path}: unknown vector file extension {ext or '(none)'!r}; "
                         f"supported: {' '.join(EXTENSIONS)}")
    return ext


def _file_size(path) -> int:
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory, not a vector file")
    return os.path.getsize(path)


def _a(kind: str) -> str:
    """'an fvecs', 'a bvecs': the article as the name is spoken."""
    return ("an " if kind[0] in "aefio" else "a ") + kind


def _read_header(path, count: int) -> np.ndarray:
    with open(path, "rb") as f:
        return np.frombuffer(f.read(4 * count), dtype="<i4")


def vectors_shape(path: str | os.PathLike) -> tuple[int, int]:
    """(n, d) of a vector file, from its header and size only (checked as read_vectors
    checks them)."""
    ext = _extension(path)
    if ext == ".npy":
        return read_vectors(path).shape  # a memory map: reads the header only
    if ext in VECS_DTYPES:
        return _vecs_layout(path, ext)[:2]
    return _bin_layout(path, ext)


def _vecs_layout(path, ext) -> tuple[int, int, int]:
    """n, d, row size in bytes of a .fvecs/.ivecs/.bvecs file."""
    size = _file_size(path)
    kind = ext[1:]
    if size == 0:
        raise ValueError(f"{path}: empty file, not {_a(kind)} file")
    if size < 4:
        raise ValueError(f"{path}: truncated or not {_a(kind)} file ({size} bytes)")
    d = int(_read_header(path, 1)[0])
    if d <= 0 or d > 1 << 20:
        raise ValueError(f"{path}: not {_a(kind)} file (first row claims dimension {d})")
    row = 4 + d * VECS_DTYPES[ext].itemsize
    if size % row:
        raise ValueError(f"{path}: truncated or not {_a(kind)} file: {size} bytes is not a "
                         f"multiple of the row size {row} (d={d})")
    return size // row, d, row


def _bin_layout(path, ext) -> tuple[int, int]:
    size = _file_size(path)
    kind = ext[1:]
    if size < 8:
        raise ValueError(f"{path}: truncated or not {_a(kind)} file ({size} bytes, the header alone is 8)")
    n, d = (int(v) for v in _read_header(path, 2))
    if n < 0 or d <= 0:
        raise ValueError(f"{path}: not {_a(kind)} file (header says n={n}, d={d})")
    expected = 8 + n * d * BIN_DTYPES[ext].itemsize
    if size != expected:
        what = "truncated or not" if size < expected else "has trailing bytes, or is not"
        raise ValueError(f"{path}: {what} {_a(kind)} file: header says {n} x {d}, which needs "
                         f"{expected} bytes, the file has {size}")
    return n, d


def read_vectors(path: str | os.PathLike, mmap: bool = True) -> np.ndarray:
    """The (n, d) array stored in `path`, in the file's own dtype.

    mmap=True returns a read-only memory map (for .fvecs/.ivecs/.bvecs a strided view
    that skips the per-row headers); mmap=False reads the file into memory."""
    path = os.fspath(path)
    ext = _extension(path)
    if ext == ".npy":
        _file_size(path)
        try:
            x = np.load(path, mmap_mode="r" if mmap else None)
        except ValueError as e:
            raise ValueError(f"{path}: not a readable .npy file ({e})") from None
        if x.ndim != 2:
            raise ValueError(f"{path}: expected a 2-D array of vectors, got shape {x.shape}")
        if x.dtype.kind not in "fiu" or x.dtype.fields is not None:  # complex, bool, object, strings...
            raise ValueError(f"{path}: holds elements of dtype {x.dtype}; vector files hold real numbers "
                             "(float or integer)")
        return x
    if ext in VECS_DTYPES:
        n, d, row = _vecs_layout(path, ext)
        raw = np.memmap(path, dtype="u1", mode="r") if mmap else np.fromfile(path, dtype="u1")
        rows = raw.reshape(n, row)
        _check_row_headers(path, rows, d)
        x = rows[:, 4:].view(VECS_DTYPES[ext]) if VECS_DTYPES[ext].itemsize > 1 else rows[:, 4:]
        return x if mmap else np.ascontiguousarray(x)
    n, d = _bin_layout(path, ext)
    dtype = BIN_DTYPES[ext]
    if mmap:
        if n == 0:
            return np.zeros((0, d), dtype)
        return np.memmap(path, dtype=dtype, mode="r", offset=8, shape=(n, d))
    return np.fromfile(path, dtype=dtype, offset=8).reshape(n, d)


def _check_row_headers(path, rows: np.ndarray, d: int) -> None:
    """Every row of a .fvecs/.ivecs/.bvecs file repeats d; a row that says otherwise
    means the rows are misaligned and every later vector would be misread silently.
    Checked through a strided view of the map, a few MB of the file at a time
    (vectorised; one sequential pass over the file's pages, released as it goes)."""
    heads = rows[:, :4]
    chunk = max(1, _HEADER_CHUNK_BYTES // rows.shape[1])
    for i0 in range(0, len(rows), chunk):
        dims = np.ascontiguousarray(heads[i0:i0 + chunk]).view("<i4").ravel()
        release(rows[i0:i0 + chunk])
        bad = np.flatnonzero(dims != d)
        if len(bad):
            r = i0 + int(bad[0])
            raise ValueError(f"{path}: row {r} says dimension {int(dims[bad[0]])}, the first row says {d}: "
                             f"rows of different dimensions, or a corrupt {Path(path).suffix[1:]} file")


def release(rows: np.ndarray) -> None:
    """Unmap the pages of rows of a read-only memory map once they have been read.

    Streaming a file larger than RAM through a map leaves every page read resident
    in the process (the kernel reclaims them only under pressure): the process's
    resident size grows to the file's. Releasing each batch once used keeps it to a
    few batches; the pages stay in the page cache and a later access reads them
    again. No-op for anything but a read-only np.memmap (a copy-on-write map would
    lose its changes)."""
    mm = getattr(rows, "_mmap", None)
    if not isinstance(rows, np.memmap) or mm is None or rows.mode != "r" or rows.size == 0 \
            or not hasattr(mm, "madvise"):
        return
    start = rows.__array_interface__["data"][0] - np.frombuffer(mm, np.uint8).ctypes.data
    span = (len(rows) - 1) * rows.strides[0] + rows.itemsize * int(np.prod(rows.shape[1:]))
    page = mmap.PAGESIZE
    first, last = start // page * page, -(-(start + span) // page) * page
    mm.madvise(mmap.MADV_DONTNEED, first, min(last, len(mm)) - first)


def _check_lossless(path, array: np.ndarray, dtype: np.dtype) -> None:
    """Raise if storing `array` as `dtype` would change values."""
    if array.size == 0 or array.dtype == dtype:
        return
    if dtype.kind in "iu":
        if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.bool_)):
            if not np.all(np.isfinite(array)) or np.any(np.floor(array) != array):
                raise ValueError(f"{path}: {Path(path).suffix} stores integers; the array has "
                                 f"non-integer values (dtype {array.dtype})")
        info = np.iinfo(dtype)
        lo, hi = array.min(), array.max()
        if lo < info.min or hi > info.max:
            raise ValueError(f"{path}: {Path(path).suffix} stores {dtype.name} in "
                             f"[{info.min}, {info.max}]; the array has values in [{lo}, {hi}]")


def write_vectors(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a 2-D array to `path` in the format its extension names, atomically.

    .npy keeps the array's dtype; the other formats convert to their element type and
    refuse values that would not survive the conversion (floats in .bvecs, codes
    above 2^31 in .ivecs)."""
    path = os.fspath(path)
    ext = _extension(path)
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"{path}: expected a 2-D array of vectors, got shape {array.shape}")
    if ext == ".npy":
        save_npy(path, array)
        return
    n, d = array.shape
    if d == 0:
        raise ValueError(f"{path}: cannot store vectors of dimension 0")
    dtype = VECS_DTYPES.get(ext, BIN_DTYPES.get(ext))
    _check_lossless(path, array, dtype)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        if ext in BIN_DTYPES:
            f.write(np.array([n, d], "<i4").tobytes())
        for i0 in range(0, n, _WRITE_CHUNK):
            block = array[i0:i0 + _WRITE_CHUNK].astype(dtype)
            if ext in VECS_DTYPES:
                rows = np.empty((len(block), 4 + d * dtype.itemsize), "u1")
                rows[:, :4] = np.full((len(block), 1), d, "<i4").view("u1")
                rows[:, 4:] = np.ascontiguousarray(block).view("u1").reshape(len(block), -1)
                block = rows
            f.write(np.ascontiguousarray(block).tobytes())


def write_random_bvecs(path: str, n: int, d: int, seed: int = 0, chunk: int = 1 << 16) -> None:
    """n random uint8 vectors of dimension d as a .bvecs file, a chunk at a time (bounded
    memory): the benchmarks' stand-in for BigANN-sized files."""
    rng = np.random.default_rng(seed)
    rows = np.empty((chunk, 4 + d), np.uint8)
    rows[:, :4] = np.full((chunk, 1), d, "<i4").view(np.uint8)
    with open(path, "wb") as f:
        for i0 in range(0, n, chunk):
            m = min(chunk, n - i0)
            rows[:m, 4:] = rng.integers(0, 256, (m, d), dtype=np.uint8)
            f.write(rows[:m].tobytes())
