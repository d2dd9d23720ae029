"""Packing integer codes into bit strings, byte for byte as faiss.pack_bitstrings.

A vector's codes (c_0, ..., c_{M-1}) with widths (b_0, ..., b_{M-1}) bits become one
bit string of ceil(sum b_j / 8) bytes: bit t of c_j is bit number o_j + t of the string,
where o_j = b_0 + ... + b_{j-1}, and bit number p lives in byte p // 8 at position
p % 8 (least significant first). This is faiss's BitstringWriter layout, so packed
files are interchangeable with faiss's and with the reference's `codec_qinco.py --raw`.

Implemented with numpy bit operations on whole arrays, in row chunks that bound the
temporary (n, sum b) bit matrix.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

_CHUNK_BITS = 1 << 26  # bits expanded at once (64 MiB of uint8 temporaries)


def bits_for(size: int) -> int:
    """Bits needed to store values in [0, size): ceil(log2(size)), as the reference."""
    if size < 1:
        raise ValueError(f"a code column must have at least one possible value, got {size}")
    return int(math.ceil(math.log2(size))) if size > 1 else 0


def code_nbits(code_sizes: Sequence[int]) -> list[int]:
    """Per-column bit widths for codes whose column j takes code_sizes[j] values.

    For QINCo (K per column) this is the reference's log2(K) for every column; an IVF
    model's first column (the list number) gets log2(K_IVF) bits."""
    return [bits_for(int(k)) for k in code_sizes]


def _nbits_per_column(nbits, M: int) -> np.ndarray:
    if np.ndim(nbits) == 0:
        nb = np.full(M, int(nbits), np.int64)
    else:
        nb = np.asarray(list(nbits), np.int64)
        if nb.shape != (M,):
            raise ValueError(f"{len(nb)} bit widths given for {M} code columns")
    if np.any(nb < 0) or np.any(nb > 32):
        raise ValueError(f"bit widths must lie in [0, 32], got {nb.tolist()}")
    return nb


def code_size(nbits, M: int | None = None) -> int:
    """Bytes per packed vector: ceil(total bits / 8)."""
    if np.ndim(nbits) == 0:
        if M is None:
            raise ValueError("code_size needs M when nbits is a single width")
        return (int(nbits) * M + 7) // 8
    return (int(sum(nbits)) + 7) // 8


def _bit_layout(nb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every bit of the string: the column it belongs to and its rank in that column."""
    column = np.repeat(np.arange(len(nb)), nb)
    rank = np.arange(int(nb.sum())) - np.repeat(np.cumsum(nb) - nb, nb)
    return column, rank


def pack_codes(codes: np.ndarray, nbits) -> np.ndarray:
    """(n, M) integer codes -> (n, code_size) uint8, equal to faiss.pack_bitstrings.

    nbits: one width for all columns or a sequence of M widths. Values must fit their
    width (faiss would silently keep only the low bits)."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be a 2-D (n, M) array, got shape {codes.shape}")
    if codes.size and not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
    n, M = codes.shape
    nb = _nbits_per_column(nbits, M)
    total = int(nb.sum())
    nbytes = (total + 7) // 8
    if n and M:
        too_big = codes.max(axis=0).astype(np.int64) >= (np.int64(1) << nb)
        if codes.min() < 0 or np.any(too_big):
            j = int(np.argmax(too_big | (codes.min(axis=0) < 0)))
            raise ValueError(f"code column {j} has values outside [0, 2^{nb[j]}) and cannot be "
                             f"packed in {nb[j]} bits")
    out = np.empty((n, nbytes), np.uint8)
    if n == 0 or total == 0:
        out[:] = 0
        return out
    if np.all(nb % 8 == 0):
        # Byte-aligned widths (8 bits in every published model): the string is each
        # code's low bytes, little-endian, one column after the other.
        le = codes.astype("<u4").view(np.uint8).reshape(n, M, 4)
        return np.ascontiguousarray(np.concatenate([le[:, j, :nb[j] // 8] for j in range(M)], axis=1))
    column, rank = _bit_layout(nb)
    pad = nbytes * 8 - total
    step = max(1, _CHUNK_BITS // max(total, 1))
    for i0 in range(0, n, step):
        c = codes[i0:i0 + step].astype(np.uint32)
        bits = ((c[:, column] >> rank.astype(np.uint32)) & 1).astype(np.uint8)
        if pad:
            bits = np.concatenate([bits, np.zeros((len(bits), pad), np.uint8)], axis=1)
        out[i0:i0 + step] = np.packbits(bits, axis=1, bitorder="little")
    return out


def unpack_codes(data: np.ndarray, n: int | None, nbits, M: int | None = None) -> np.ndarray:
    """Packed bit strings -> (n, M) int32 codes, equal to faiss.unpack_bitstrings.

    data: (n, code_size) uint8, or flat bytes (a raw codes file) that are cut into rows
      of code_size bytes; n: the number of vectors, or None to infer it from the size.
    nbits: a sequence of per-column widths, or one width together with M.
    Rows wider than code_size (padding) are accepted, as faiss does."""
    if np.ndim(nbits) == 0:
        if M is None:
            raise ValueError("unpack_codes needs M when nbits is a single width")
    else:
        M = len(list(nbits))
    nb = _nbits_per_column(nbits, M)
    size = code_size(nb.tolist())
    data = np.asarray(data)
    if data.dtype != np.uint8:
        raise ValueError(f"packed codes must be uint8 bytes, got dtype {data.dtype}")
    if data.ndim == 1:
        if size == 0:
            raise ValueError("cannot cut flat data into rows of 0 bytes")
        if len(data) % size:
            raise ValueError(f"{len(data)} bytes is not a whole number of codes of {size} bytes "
                             f"({M} codes of {nb.tolist()} bits)")
        data = data.reshape(-1, size)
    elif data.ndim != 2:
        raise ValueError(f"packed codes must be 1-D bytes or a 2-D (n, code_size) array, got shape {data.shape}")
    if data.shape[1] < size:
        raise ValueError(f"packed rows have {data.shape[1]} bytes, {M} codes of {nb.tolist()} bits need {size}")
    if n is not None and n != len(data):
        raise ValueError(f"expected {n} packed codes, got {len(data)}")
    n = len(data)
    out = np.zeros((n, M), np.int32)
    total = int(nb.sum())
    if n == 0 or total == 0:
        return out
    if np.all(nb % 8 == 0):
        le = np.zeros((n, M, 4), np.uint8)
        starts = (np.cumsum(nb) - nb) // 8
        for j in range(M):
            le[:, j, :nb[j] // 8] = data[:, starts[j]:starts[j] + nb[j] // 8]
        out[:] = le.view("<u4").reshape(n, M).view(np.int32)
        return out
    _, rank = _bit_layout(nb)
    weight = (np.uint32(1) << rank.astype(np.uint32))
    # Columns are contiguous runs of the bit string: sum each run (empty runs have no bits).
    nonempty = nb > 0
    starts = (np.cumsum(nb) - nb)[nonempty]
    step = max(1, _CHUNK_BITS // max(size * 8, 1))
    for i0 in range(0, n, step):
        bits = np.unpackbits(data[i0:i0 + step, :size], axis=1, bitorder="little")[:, :total]
        vals = bits.astype(np.uint32) * weight
        sums = np.add.reduceat(vals, starts, axis=1)
        out[i0:i0 + step, nonempty] = sums.astype(np.uint32).view(np.int32)
    return out


# --------------------------------------------------------------------------------------
# Code files: a vector file of integer codes (.npy .ivecs .ibin), or raw packed bits
# --------------------------------------------------------------------------------------


def _is_raw(path, raw: bool | None) -> bool:
    from qinco_jax.formats import vecs_io

    return raw if raw is not None else Path(path).suffix.lower() not in vecs_io.EXTENSIONS


def count_codes_file(path, model, raw: bool | None = None) -> int:
    """Number of codes in a codes file of `model`, after checking its width, from its
    header or size alone. raw: packed bits (None: decided by the extension)."""
    from qinco_jax.formats import vecs_io

    if not os.path.isfile(path):
        raise FileNotFoundError(f"codes file {path}: no such file")
    if not _is_raw(path, raw):
        n, w = vecs_io.vectors_shape(path)
        if w != model.code_width:
            raise ValueError(f"codes file {path} has {w} columns, the model ({model.describe()}) gives codes of "
                             f"{model.code_width} columns")
        return n
    size = code_size(code_nbits(model.code_sizes))
    nbytes = os.path.getsize(path)
    if nbytes % size:
        raise ValueError(f"raw codes file {path}: {nbytes} bytes is not a whole number of {size}-byte codes "
                         f"({model.describe()}); wrong model or not a raw codes file?")
    return nbytes // size


def read_codes_file(path, model, raw: bool | None = None) -> np.ndarray:
    """The codes (n, code_width) of a codes file of `model` (see count_codes_file)."""
    from qinco_jax.formats import vecs_io

    count_codes_file(path, model, raw)
    if not _is_raw(path, raw):
        codes = np.asarray(vecs_io.read_vectors(path, mmap=False))
        if not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"codes file {path} holds {codes.dtype} values, not integer codes")
        return codes
    return unpack_codes(np.fromfile(path, dtype=np.uint8), None, code_nbits(model.code_sizes))
