"""Encoded vectors on disk in QINCo2's format: a header `.npz` plus one `.part_<i>.npz`
per encoding process.

QINCo2's `run.py task=encode output=codes.npz` writes
  codes.npz          keys n_parts, K, M, D (0-d int64): the number of part files, the
                     codebook size and number of neural steps of the model (an IVF model's
                     codes have M + 1 columns, the IVF list first) and the vector dimension;
  codes.part_<i>.npz key `codes`: (n_i, W) int64, the codes of rows [start_i, end_i) of
                     the encoded set, part i written by process i of n_parts;
all compressed (zip deflate). Process i of P encodes rows [i * (n // P), (i + 1) * (n // P)),
the last one also the remainder (`part_rows`). Reading the parts in order gives the rows in
order (`read_codes`), which is how the reference's index building reads them back.

Writers stream: a part is written batch by batch into its zip member (memory bounded by
one batch, whatever the part's size), to a temporary name renamed into place when complete
(qinco_jax.formats.io), so a crash never leaves a truncated part under the final name.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from qinco_jax.logs import quiet
from qinco_jax.formats.io import atomic_path

CODE_DTYPE = np.dtype("<i8")  # the reference stores torch's int64 indices as they are
HEADER_KEYS = ("n_parts", "K", "M", "D")


class CodeFileError(ValueError):
    """A code file that is not in the expected format, or parts that do not match it."""


@dataclasses.dataclass(frozen=True)
class CodeFileHeader:
    """What the header `.npz` says: n_parts part files; K codewords per step; M neural
    steps; D the encoded vectors' dimension."""

    n_parts: int
    K: int
    M: int
    D: int

    def __post_init__(self):
        for name in HEADER_KEYS:
            if getattr(self, name) < 1:
                raise CodeFileError(f"code header {name} must be >= 1, got {getattr(self, name)}")


def _check_npz_name(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not path.endswith(".npz"):
        raise CodeFileError(f"{path}: an encoded set is written as a .npz header (+ .part_<i>.npz files); "
                            "name it <something>.npz")
    return path


def part_path(path: str | os.PathLike, i: int) -> Path:
    """The file of part i: `x.npz` -> `x.part_<i>.npz`."""
    return Path(_check_npz_name(path)[:-4] + f".part_{i}.npz")


def part_rows(n: int, n_parts: int, i: int) -> tuple[int, int]:
    """Rows [start, end) that part i of n_parts holds: equal blocks of n // n_parts, the
    last part taking the remainder (the reference's split)."""
    if not 0 <= i < n_parts:
        raise ValueError(f"part {i} out of range for {n_parts} parts")
    per = n // n_parts
    return per * i, (n if i == n_parts - 1 else per * (i + 1))


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def write_code_header(path: str | os.PathLike, header: CodeFileHeader) -> None:
    """The header `.npz` (atomically)."""
    path = _check_npz_name(path)
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **{k: np.int64(getattr(header, k)) for k in HEADER_KEYS})


def write_code_part(path: str | os.PathLike, i: int, batches: Iterable[np.ndarray], width: int,
                    n_rows: int) -> Path:
    """Part i of the encoded set `path` (the header's name), streamed from `batches` of
    codes (rows, width); they must hold exactly n_rows rows. Returns the part's path."""
    out = part_path(path, i)
    with atomic_path(out, suffix=".npz") as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
            with zf.open("codes.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(
                    member, {"descr": np.lib.format.dtype_to_descr(CODE_DTYPE), "fortran_order": False,
                             "shape": (int(n_rows), int(width))})
                written = 0
                for batch in batches:
                    batch = np.asarray(batch)
                    if batch.ndim != 2 or batch.shape[1] != width:
                        raise CodeFileError(f"code batch of shape {batch.shape}, expected (rows, {width})")
                    if batch.size and batch.min() < 0:
                        raise CodeFileError("negative codes cannot be stored")
                    member.write(np.ascontiguousarray(batch, dtype=CODE_DTYPE).tobytes())
                    written += len(batch)
                if written != n_rows:
                    raise CodeFileError(f"part {i} of {path}: {written} rows written, {n_rows} announced")
    return out


def write_code_parts(path: str | os.PathLike, codes: np.ndarray, *, K: int, M: int, D: int,
                     n_parts: int = 1) -> None:
    """All parts and the header of an encoded set held in memory (one process)."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise CodeFileError(f"codes must be (n, width), got shape {codes.shape}")
    if not 1 <= n_parts <= max(1, len(codes)):
        raise CodeFileError(f"cannot split {len(codes)} rows into {n_parts} parts")
    for i in range(n_parts):
        start, end = part_rows(len(codes), n_parts, i)
        write_code_part(path, i, [codes[start:end]], codes.shape[1], end - start)
    write_code_header(path, CodeFileHeader(n_parts, K, M, D))


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise CodeFileError(f"{path}: not a readable .npz file ({e})") from None


def read_code_header(path: str | os.PathLike) -> CodeFileHeader:
    """The header of an encoded set written by QINCo2's encode task (or write_code_parts)."""
    path = Path(_check_npz_name(path))
    z = _load_npz(path)
    missing = [k for k in HEADER_KEYS if k not in z]
    if missing:
        raise CodeFileError(f"{path}: not a code header (no {', '.join(missing)}; keys: {', '.join(z)})")
    bad = [k for k in HEADER_KEYS if z[k].shape != () or not np.issubdtype(z[k].dtype, np.integer)]
    if bad:
        raise CodeFileError(f"{path}: header entries {', '.join(bad)} must be integer scalars")
    return CodeFileHeader(**{k: int(z[k]) for k in HEADER_KEYS})


def _part_codes(path: str | os.PathLike, i: int) -> np.ndarray:
    p = part_path(path, i)
    if not p.is_file():
        raise CodeFileError(f"{p} not found: part {i} of the encoded set {path} is missing "
                            "(was every encoding process finished?)")
    z = _load_npz(p)
    if "codes" not in z:
        raise CodeFileError(f"{p}: no 'codes' array (keys: {', '.join(z)})")
    return z["codes"]


def iter_code_parts(path: str | os.PathLike) -> Iterator[np.ndarray]:
    """The codes of each part in order (one part in memory at a time), checked against
    the header: 2-D, non-negative integers, one width, M or M + 1 (IVF) columns below K."""
    header = read_code_header(path)
    width = None
    for i in range(header.n_parts):
        codes = _part_codes(path, i)
        p = part_path(path, i)
        if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
            raise CodeFileError(f"{p}: codes must be a 2-D integer array, got {codes.dtype} {codes.shape}")
        if width is None:
            width = codes.shape[1]
            if width not in (header.M, header.M + 1):
                raise CodeFileError(f"{p}: {width} code columns, the header says M={header.M} "
                                    f"(expected {header.M}, or {header.M + 1} with an IVF column)")
        elif codes.shape[1] != width:
            raise CodeFileError(f"{p}: {codes.shape[1]} code columns, part 0 has {width}")
        if codes.size:
            neural = codes[:, width - header.M:]
            if codes.min() < 0 or neural.max() >= header.K:
                raise CodeFileError(f"{p}: codes outside [0, K={header.K})")
        yield codes


def read_codes(path: str | os.PathLike) -> np.ndarray:
    """All codes (n, W) int64 of an encoded set: a QINCo2 header `.npz` with its parts, a
    single `.npz` holding `codes`, or a `.npy` array."""
    path = os.fspath(path)
    if path.endswith(".npy"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found")
        codes = np.load(path, allow_pickle=False)
        if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
            raise CodeFileError(f"{path}: codes must be a 2-D integer array, got {codes.dtype} {codes.shape}")
        return codes.astype(CODE_DTYPE, copy=False)
    z = _load_npz(Path(_check_npz_name(path)))
    if "codes" in z and "n_parts" not in z:
        codes = z["codes"]
        if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
            raise CodeFileError(f"{path}: codes must be a 2-D integer array, got {codes.dtype} {codes.shape}")
        return codes.astype(CODE_DTYPE, copy=False)
    parts = list(iter_code_parts(path))
    return np.concatenate(parts, axis=0).astype(CODE_DTYPE, copy=False)


# --------------------------------------------------------------------------------------
# Encoding a large set over several processes
# --------------------------------------------------------------------------------------


def encode_to_parts(path: str | os.PathLike, vectors: np.ndarray, encode_batch: Callable[[np.ndarray], np.ndarray],
                    *, width: int, header: CodeFileHeader, process_index: int = 0, process_count: int = 1,
                    batch_size: int = 65536, barrier: Callable[[str], None] | None = None,
                    log: Callable[[str], None] = quiet) -> Path:
    """Encode this process's share of `vectors` (n, D) (rows part_rows(n, process_count,
    process_index)) in batches of batch_size with `encode_batch` (raw vectors -> codes
    (rows, width)) and write it as part `process_index`; process 0 then writes the
    header (n_parts = process_count), after `barrier` (all processes' parts written) when
    one is given. vectors may be a memory map: only one batch is read at a time."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process index {process_index} out of range for {process_count} processes")
    if header.n_parts != process_count:
        raise ValueError(f"header says {header.n_parts} parts for {process_count} processes")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    n = len(vectors)
    if n < process_count:
        raise ValueError(f"{n} vectors cannot be split over {process_count} processes")
    start, end = part_rows(n, process_count, process_index)
    n_batches = -(-(end - start) // batch_size)

    def batches():
        for b, i0 in enumerate(range(start, end, batch_size)):
            i1 = min(end, i0 + batch_size)
            log(f"process {process_index}/{process_count}: encoding batch {b + 1}/{n_batches} (rows {i0}:{i1})")
            yield encode_batch(np.asarray(vectors[i0:i1], dtype=np.float32))

    out = write_code_part(path, process_index, batches(), width, end - start)
    log(f"process {process_index}/{process_count}: stored {end - start} codes in {out}")
    if barrier is not None:
        barrier("qinco_encode_parts_written")
    if process_index == 0:
        write_code_header(path, header)
        log(f"stored the header of {process_count} part(s) in {path}")
    return out


# --------------------------------------------------------------------------------------
# Streaming reads: a part's shape from its header, its rows chunk by chunk
# --------------------------------------------------------------------------------------

_CODES_MEMBER = "codes.npy"


def _open_codes_member(zf: zipfile.ZipFile, path: Path):
    """The `codes.npy` member of an open part, positioned after its .npy header, with the
    array's (shape, dtype)."""
    if _CODES_MEMBER not in zf.namelist():
        raise CodeFileError(f"{path}: no 'codes' array (members: {', '.join(zf.namelist())})")
    member = zf.open(_CODES_MEMBER)
    try:
        version = np.lib.format.read_magic(member)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise CodeFileError(f"{path}: .npy format version {version} of its codes is not supported")
        shape, fortran, dtype = read_header(member)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        member.close()
        raise CodeFileError(f"{path}: the codes' .npy header cannot be read ({e})") from None
    if len(shape) != 2 or not np.issubdtype(dtype, np.integer) or fortran:
        member.close()
        raise CodeFileError(f"{path}: codes must be a 2-D C-ordered integer array, got {dtype} {shape}"
                            f"{' (Fortran order)' if fortran else ''}")
    return member, shape, dtype


def _open_zip(path: Path) -> zipfile.ZipFile:
    if not path.is_file():
        raise CodeFileError(f"{path} not found")
    try:
        return zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise CodeFileError(f"{path}: not a readable .npz file ({e})") from None


def npz_codes_shape(path: str | os.PathLike) -> tuple[tuple[int, int], np.dtype, int]:
    """(shape, dtype, crc32) of the codes of a part (or of any .npz holding `codes`), read
    from the headers alone: nothing but the first bytes of the array is decompressed. The
    CRC-32 of the uncompressed array (the zip directory's) tells identical parts apart."""
    path = Path(path)
    with _open_zip(path) as zf:
        member, shape, dtype = _open_codes_member(zf, path)
        member.close()
        crc = zf.getinfo(_CODES_MEMBER).CRC
    return (int(shape[0]), int(shape[1])), dtype, int(crc)


def iter_npz_rows(path: str | os.PathLike, ranges: Iterable[tuple[int, int]]) -> Iterator[np.ndarray]:
    """The codes of rows [start, end) of a part (or a .npz holding `codes`) for each range,
    in order (ranges increasing, not overlapping), decompressed as a stream: memory is
    bounded by one range, whatever the part's size. Rows before a range are read and
    dropped (a deflate stream cannot be entered in the middle)."""
    path = Path(path)
    with _open_zip(path) as zf:
        member, shape, dtype = _open_codes_member(zf, path)
        with member:
            row_bytes = int(shape[1]) * dtype.itemsize
            at = 0
            for start, end in ranges:
                if not at <= start <= end <= shape[0]:
                    raise ValueError(f"{path}: rows [{start}, {end}) out of order or out of its {shape[0]} rows")
                skip = (start - at) * row_bytes
                while skip:
                    skip -= len(member.read(min(skip, 1 << 24)))
                want = (end - start) * row_bytes
                try:
                    data = member.read(want)
                except (zipfile.BadZipFile, OSError, EOFError) as e:
                    raise CodeFileError(f"{path}: rows [{start}, {end}) cannot be read ({e})") from None
                if len(data) != want:
                    raise CodeFileError(f"{path}: truncated, rows [{start}, {end}) announced but missing")
                at = end
                yield np.frombuffer(data, dtype=dtype).reshape(end - start, shape[1])
