"""Checks on what enters the library: vectors (dtype, shape, finite values) and faiss.

A billion vectors are compressed over days: a NaN in one row, complex numbers cast
to real, or a faiss assertion deep in C++ must stop the run with a message that names
the input, the row and the reason, never turn into silent garbage codes.

Checks run per batch as the data streams (`check_finite` on the batch already in
memory), so a memory-mapped database is still read once. Errors are ValueErrors, so
the command-line programs print them as one line (qinco_jax.cli.run_main).
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Iterator

import numpy as np

from qinco_jax.formats import vecs_io

__all__ = ["VectorInputError", "FaissStepError", "source_of", "check_dtype", "check_vectors", "check_finite",
           "check_all_finite", "as_finite_float32", "faiss_step"]

CHECK_ROWS = 1 << 16  # rows per batch when a whole array is checked or converted


class VectorInputError(ValueError):
    """Vectors the library cannot use: unsupported dtype, wrong shape, NaN or Inf."""


class FaissStepError(ValueError):
    """A faiss call failed: which step, on which input, and faiss's reason."""


def source_of(x) -> str | None:
    """The file behind a memory-mapped array (slices keep it), else None."""
    name = getattr(x, "filename", None) if isinstance(x, np.memmap) else None
    return os.fspath(name) if name else None


def _label(what: str, x=None, source: str | None = None) -> str:
    source = source or (source_of(x) if x is not None else None)
    return f"{what} of {source}" if source and source not in what else what


def check_dtype(x: np.ndarray, what: str = "vectors", source: str | None = None) -> None:
    """Refuse element types that are not real numbers (complex, object, bool, strings...)."""
    dt = np.asarray(x[:0]).dtype if isinstance(x, np.ndarray) else np.asarray(x).dtype
    if dt.kind not in "fiu" or dt.fields is not None:
        raise VectorInputError(f"{_label(what, x, source)}: elements of dtype {dt} are not supported "
                               "(vectors must hold real numbers: float or integer)")


def check_vectors(x, what: str = "vectors", expected_d: int | None = None) -> np.ndarray:
    """x as an (n, d) array of a supported dtype (a memory map stays one: nothing is read)."""
    x = np.asanyarray(x)
    check_dtype(x, what)
    if x.ndim != 2:
        raise VectorInputError(f"{_label(what, x)}: expected a 2-D array of vectors, got shape {x.shape}")
    if expected_d is not None and x.shape[1] != expected_d:
        raise VectorInputError(f"{_label(what, x)}: vectors have dimension {x.shape[1]}, expected d={expected_d}")
    return x


def check_finite(batch: np.ndarray, what: str = "vectors", first_row: int = 0, source: str | None = None) -> None:
    """Raise VectorInputError naming the first row of `batch` (numbered from
    `first_row`) that holds a NaN or an infinity. Integer batches pass at no cost."""
    batch = np.asarray(batch)
    if batch.dtype.kind != "f" or batch.size == 0:
        return
    with np.errstate(all="ignore"):  # fast path: a float64 sum is finite iff every value is (overflow aside)
        if np.isfinite(np.sum(batch, dtype=np.float64)):
            return
    bad_values = ~np.isfinite(batch)
    rows = bad_values.reshape(len(batch), -1).any(axis=1) if batch.ndim > 1 else bad_values
    if not rows.any():
        return  # the sum overflowed on finite float64 values
    row = int(np.argmax(rows))
    values = np.atleast_1d(batch[row])
    col = int(np.argmax(~np.isfinite(values)))
    raise VectorInputError(f"{_label(what, batch, source)}: row {first_row + row} holds a non-finite value "
                           f"({values[col]} in column {col}); NaN and Inf cannot be encoded or trained on")


def check_all_finite(x, what: str = "vectors", first_row: int = 0, batch_rows: int = CHECK_ROWS) -> None:
    """check_dtype, then check_finite batch by batch over all of x (a memory map is read
    once, batch_rows at a time)."""
    check_dtype(x, what)
    source = source_of(x)
    for i0 in range(0, len(x), batch_rows):
        check_finite(np.asarray(x[i0:i0 + batch_rows]), what, first_row + i0, source)
        vecs_io.release(x[i0:i0 + batch_rows])


def as_finite_float32(x, what: str = "vectors", first_row: int = 0, batch_rows: int = CHECK_ROWS) -> np.ndarray:
    """A contiguous float32 copy of x, checked (dtype, finite values) batch by batch as
    it is copied: one read of a memory map, no float64 or full-size temporary."""
    x = np.asanyarray(x)
    check_dtype(x, what)
    source = source_of(x)
    out = np.empty(x.shape, np.float32)
    for i0 in range(0, len(x), batch_rows):
        batch = np.asarray(x[i0:i0 + batch_rows])
        check_finite(batch, what, first_row + i0, source)
        out[i0:i0 + batch_rows] = batch
        vecs_io.release(x[i0:i0 + batch_rows])
    return out


def faiss_reason(e: BaseException) -> str:
    """What a faiss C++ exception says is wrong, without the C++ location."""
    text = str(e).strip()
    found = re.findall(r"Error: (.*)", text)
    reason = found[-1] if found else (text.splitlines()[-1] if text else type(e).__name__)
    return reason.strip()


@contextlib.contextmanager
def faiss_step(step: str, on: str | None = None) -> Iterator[None]:
    """Turn a faiss failure inside the block into a FaissStepError naming the step
    (e.g. "k-means of the IVF centroids"), the input and faiss's reason."""
    try:
        yield
    except (RuntimeError, AssertionError) as e:  # C++ exceptions arrive as RuntimeError
        where = f" on {on}" if on else ""
        raise FaissStepError(f"{step}{where} failed in faiss: {faiss_reason(e)}") from None
