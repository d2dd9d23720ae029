"""The files a training or IVF step reads beside its model: the training file split into
training and validation vectors as the references split it (and those rows end to end
again, `ConcatenatedRows`, to encode them), and IVF centroid files.

Both read any vector file `qinco_jax.formats.vecs_io` reads; errors are ValueErrors
that name the file (programs add the flag or key that named it)."""

from __future__ import annotations

import os

import numpy as np

from qinco_jax.data import validation
from qinco_jax.formats import vecs_io


def split_validation(x, valset: int, trainset: int | None = None):
    """(train, validation) views of one training file, as the reference splits it: the
    last `valset` rows validate, and at most `trainset` of the first ones train."""
    n = len(x)
    if valset < 1:
        raise ValueError(f"ds.valset must be >= 1, got {valset}")
    if valset > n // 2:
        raise ValueError(f"ds.valset={valset} is more than half of the {n} training vectors")
    xt, xval = x[:n - valset], x[n - valset:]
    if trainset is not None:
        if trainset < 1:
            raise ValueError(f"ds.trainset must be >= 1 or null, got {trainset}")
        xt = xt[:min(trainset, len(xt))]
    return xt, xval


def read_vector_file(path: str | os.PathLike | None, role: str) -> np.ndarray:
    """The vectors of a file (memory-mapped where the format allows); an error naming
    the role when no file is given or it does not exist."""
    if not path:
        raise ValueError(f"no {role} file given")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{role} file {os.fspath(path)} not found")
    x = vecs_io.read_vectors(path, mmap=True)
    if x.ndim != 2:
        raise ValueError(f"{role} file {os.fspath(path)}: expected a 2-D array of vectors, got shape {x.shape}")
    return x


def read_training_split(path: str | os.PathLike | None, valset: int, trainset: int | None = None):
    """(train, validation) memory-mapped views of training file `path`, split by
    `split_validation`."""
    x = read_vector_file(path, "training")
    try:
        return split_validation(x, valset, trainset)
    except ValueError as e:
        raise ValueError(f"trainset={os.fspath(path)}: {e}") from None


def read_ivf_centroids(path: str | os.PathLike, *, d: int | None = None, count: int | None = None) -> np.ndarray:
    """IVF centroids (nlist, d) float32, raw units, from any vector file (.npy as the
    references write them); checked finite, of dimension `d` and `count` rows when given."""
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise FileNotFoundError(f"IVF centroids file {name} not found")
    c = vecs_io.read_vectors(name)  # a memory map: a bad value is named with its file and row
    if c.ndim != 2:
        raise ValueError(f"IVF centroids file {name} holds an array of shape {c.shape}, not (nlist, d)")
    c = validation.as_finite_float32(c, "IVF centroids")
    if d is not None and c.shape[1] != d:
        raise ValueError(f"IVF centroids {name} have shape {c.shape}: their dimension must be the "
                         f"training vectors' d={d}")
    if count is not None and count != len(c):
        raise ValueError(f"IVF centroids {name} hold {len(c)} centroids, {count} expected")
    return c


class ConcatenatedRows:
    """Rows of several arrays (or memory maps) end to end, sliced without copying them
    all: the encoded training set of run.py is the training vectors then the validation
    vectors, the file's rows in their order."""

    def __init__(self, *arrays: np.ndarray):
        self.arrays = arrays
        self.shape = (sum(len(a) for a in arrays), arrays[0].shape[1])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(len(self))
        out, offset = [], 0
        for a in self.arrays:
            lo, hi = max(start - offset, 0), min(stop - offset, len(a))
            if lo < hi:
                out.append(np.asarray(a[lo:hi]))
            offset += len(a)
        return np.concatenate(out) if out else np.zeros((0, self.shape[1]), np.float32)
