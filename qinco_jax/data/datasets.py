"""Data sets: training, database and query vectors and the exact ground truth.

The interface is the one of faiss.contrib.datasets, which the reference uses:

    ds = get_dataset("bigann1M")
    ds.d, ds.nt, ds.nb, ds.nq, ds.metric
    ds.get_train(maxtrain=None)   first maxtrain training vectors, float32 (n, d)
    ds.get_database()             the nb database vectors, float32
    ds.database_iterator(bs, split=(nsplit, rank))
    ds.get_queries()              the nq queries, float32
    ds.get_groundtruth(k=None)    (nq, k) ids of the exact nearest neighbours

Names:
  * the reference's bigann1M ... bigann1B, deep1M ... deep1B, FB_ssnpp1M, Contriever1M,
    with the file layout its download scripts produce, under the data root ($QINCO_DATA,
    default ./data): bigann/bigann_{learn,base,query}.bvecs + bigann/gnd/idx_{N}M.ivecs;
    deep1b/{learn,base}.fvecs, deep1b/deep1B_queries.fvecs, deep1b/deep{N}_groundtruth.ivecs;
    fb_ssnpp/{training_set10010k,database1M,queries,ground_truth1M}.npy;
    contriever/{training_set,database1M,queries,ground_truth1M}.npy (float16 on disk).
  * a folder holding base.* and query.* (and optionally learn.*, gt.*), in any format
    of qinco_jax.formats.vecs_io; without a ground-truth file it is computed exactly.
  * "synthetic" and "synthetic_small": a built-in, deterministic Gaussian mixture (the
    one the test fixtures were made from), generated in memory.
  * "sift_images": real SIFT descriptors (128-d uint8, like BigANN) of the images that
    scikit-image bundles, built on first use under the data root (qinco_jax.data.image_sift).
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import numpy as np

from qinco_jax.data import image_sift, validation
from qinco_jax.data.groundtruth import GT_K, exact_groundtruth  # noqa: F401 - datasets.exact_groundtruth, as before
from qinco_jax.formats import vecs_io

DEFAULT_DATA_ROOT = "data"

# Synthetic data sets: (nt, nb, nq). "synthetic" is sized for the main job (a model
# trains on 100k vectors in minutes on a CPU); "synthetic_small" for tests.
SYNTHETIC_SIZES = {
    "synthetic": (100_000, 50_000, 1_000),
    "synthetic_small": (5_000, 2_000, 100),
}

REFERENCE_NAMES = ("bigann1M", "bigann10M", "bigann100M", "bigann1B", "deep1M", "deep10M",
                   "deep100M", "deep1B", "FB_ssnpp1M", "Contriever1M")
BUILT_IN_REAL_NAMES = ("sift_images",)  # image_sift.NAMED_SPECS, opened by sift_images_dataset
AVAILABLE_NAMES = REFERENCE_NAMES + tuple(SYNTHETIC_SIZES) + BUILT_IN_REAL_NAMES

# The reference's (and faiss's) guard: beyond this, get_database() would need hundreds
# of GB; database_iterator() streams instead.
MAX_DATABASE_IN_MEMORY = 100_000_000


def data_root() -> Path:
    return Path(os.environ.get("QINCO_DATA", DEFAULT_DATA_ROOT))


def _float32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


class Dataset:
    """Base class: subclasses set d, nt, nb, nq and implement the getters."""

    name = "dataset"
    metric = "L2"
    d = nt = nb = nq = -1

    def get_train(self, maxtrain: int | None = None) -> np.ndarray:
        raise NotImplementedError

    def get_database(self) -> np.ndarray:
        raise NotImplementedError

    def get_queries(self) -> np.ndarray:
        raise NotImplementedError

    def get_groundtruth(self, k: int | None = None) -> np.ndarray:
        raise NotImplementedError

    def database_iterator(self, bs: int = 128, split: tuple[int, int] = (1, 0)):
        """Database vectors in float32 batches of bs; split=(nsplit, rank) yields only the
        rank-th of nsplit equal shards."""
        xb = self.get_database()
        yield from _iterate(xb, self.nb, bs, split)

    def database_rows(self, start: int, end: int) -> np.ndarray:
        """Database vectors [start, end) in float32 (read from the file alone when the
        database is one: the index builders read their share of it this way)."""
        return validation.as_finite_float32(self.get_database()[start:end], "database vectors", first_row=start)

    def __str__(self):
        return (f"{self.name}: dimension {self.d}, metric {self.metric}, "
                f"size: Q {self.nq} B {self.nb} T {self.nt}")

    __repr__ = __str__


def _iterate(x, nb, bs, split):
    nsplit, rank = split
    i0, i1 = nb * rank // nsplit, nb * (rank + 1) // nsplit
    for j0 in range(i0, i1, bs):
        yield validation.as_finite_float32(x[j0:min(j0 + bs, i1)], "database vectors", first_row=j0)


def _slice_gt(gt: np.ndarray, k: int | None, name: str) -> np.ndarray:
    if k is None:
        return gt
    if k > gt.shape[1]:
        raise ValueError(f"{name}: asked for {k} ground-truth neighbours, only {gt.shape[1]} are available")
    return gt[:, :k]


# --------------------------------------------------------------------------------------
# Synthetic
# --------------------------------------------------------------------------------------


def gaussian_mixture(n: int, d: int = 32, seed: int = 0, centres: int = 50) -> np.ndarray:
    """The test fixtures' data: a 50-centre Gaussian mixture folded to non-negative
    values, centres uniform in [0, 100)^d, noise std 8. For seed 0 this is exactly the
    fixtures' `mixture(n, d)`."""
    rs = np.random.RandomState(seed)
    # float32 arithmetic throughout, as the fixtures were made: bit-identical vectors
    c = rs.rand(centres, d).astype(np.float32) * np.float32(100)
    labels = rs.randint(centres, size=n)
    return np.abs(c[labels] + rs.randn(n, d).astype(np.float32) * np.float32(8))


class SyntheticDataset(Dataset):
    """Train, database and queries drawn from one Gaussian mixture, in that order; the
    ground truth is computed exactly on first use and kept."""

    def __init__(self, nt: int, nb: int, nq: int, d: int = 32, seed: int = 0, name: str | None = None):
        for key, v in (("nt", nt), ("nb", nb), ("nq", nq), ("d", d)):
            if v < (1 if key in ("nb", "nq", "d") else 0):
                raise ValueError(f"synthetic data set: {key} must be positive, got {v}")
        self.nt, self.nb, self.nq, self.d, self.seed = nt, nb, nq, d, seed
        self.name = name or f"synthetic(nt={nt}, nb={nb}, nq={nq}, d={d}, seed={seed})"
        x = gaussian_mixture(nt + nb + nq, d, seed)
        x.flags.writeable = False  # shared by every caller of the cached instance
        self._xt, self._xb, self._xq = x[:nt], x[nt:nt + nb], x[nt + nb:]
        self._gt = None

    def get_train(self, maxtrain=None):
        if maxtrain is not None and maxtrain > self.nt:
            raise ValueError(f"{self.name}: asked for {maxtrain} training vectors, it has {self.nt}")
        return self._xt[:maxtrain]

    def get_database(self):
        return self._xb

    def get_queries(self):
        return self._xq

    def get_groundtruth(self, k=None):
        if self._gt is None:
            gt = exact_groundtruth(self._xq, self._xb)
            gt.flags.writeable = False
            self._gt = gt
        return _slice_gt(self._gt, k, self.name)


@functools.lru_cache(maxsize=None)
def _named_synthetic(name: str) -> SyntheticDataset:
    # cached: one generation and one ground-truth computation per process
    return SyntheticDataset(*SYNTHETIC_SIZES[name], name=name)


# --------------------------------------------------------------------------------------
# Data sets stored in files
# --------------------------------------------------------------------------------------


class FileDataset(Dataset):
    """Vectors in files. `files` maps a role (train, base, query, gt) to the paths to
    try, in order; the first that exists is used. nb may be smaller than the base file
    (bigann1M reads the first million rows of the billion)."""

    def __init__(self, name: str, files: dict[str, list[Path]], *, d: int | None = None,
                 nt: int | None = None, nb: int | None = None, nq: int | None = None,
                 how_to_get: str = "", compute_missing_gt: bool = False):
        self.name, self._files, self._how = name, files, how_to_get
        self._compute_missing_gt = compute_missing_gt
        self._gt = None
        # Sizes come from the files that exist, else from what the data set should hold.
        base, query, train = self._shape("base"), self._shape("query"), self._shape("train")
        self.d = base[1] if base else (query[1] if query else d)
        self.nb = nb if nb is not None else (base[0] if base else -1)
        self.nq = query[0] if query else (nq if nq is not None else -1)
        if train:
            self.nt = train[0] if nt is None else min(nt, train[0])
        else:
            self.nt = nt or 0
        for role, shape in (("query", query), ("train", train)):
            if shape and shape[1] != self.d:
                raise ValueError(f"{name}: {self._find(role)} has dimension {shape[1]}, "
                                 f"the database vectors {self.d}")

    def _find(self, role: str) -> Path | None:
        for p in self._files.get(role, []):
            if p.exists():
                return p
        return None

    def path_of(self, role: str) -> Path | None:
        """The file of a role (train, base, query, gt): the first candidate that exists,
        else where the first is expected; None if the data set has no such file."""
        candidates = self._files.get(role, [])
        return self._find(role) or (candidates[0] if candidates else None)

    def _require(self, role: str) -> Path:
        p = self._find(role)
        if p is None:
            candidates = self._files.get(role, [])
            if not candidates:
                raise FileNotFoundError(f"{self.name} has no {role} vectors")
            also = f" (or {', '.join(map(str, candidates[1:]))})" if len(candidates) > 1 else ""
            raise FileNotFoundError(f"{candidates[0]} not found{also}: data set {self.name} needs it. "
                                    f"{self._how}".rstrip())
        return p

    def _shape(self, role: str):
        p = self._find(role)
        return vecs_io.vectors_shape(p) if p is not None else None

    def get_train(self, maxtrain=None):
        path = self._require("train")
        xt = vecs_io.read_vectors(path)
        n = self.nt if maxtrain is None else maxtrain
        if n > len(xt):
            raise ValueError(f"{self.name}: asked for {n} training vectors, {path} holds {len(xt)}")
        return validation.as_finite_float32(xt[:n], "training vectors")

    def _base(self):
        path = self._require("base")
        xb = vecs_io.read_vectors(path)
        if len(xb) < self.nb:
            raise ValueError(f"{self.name} needs {self.nb} database vectors, {path} holds only {len(xb)} "
                             f"(a partial download?)")
        return xb

    def get_database(self):
        if self.nb > MAX_DATABASE_IN_MEMORY:
            raise ValueError(f"{self.name}: {self.nb} database vectors are too many to load at once; "
                             f"use database_iterator()")
        return validation.as_finite_float32(self._base()[:self.nb], "database vectors")

    def database_iterator(self, bs=128, split=(1, 0)):
        yield from _iterate(self._base(), self.nb, bs, split)

    def database_rows(self, start, end):
        if not 0 <= start <= end <= self.nb:
            raise ValueError(f"{self.name}: rows [{start}, {end}) out of its {self.nb} database vectors")
        return validation.as_finite_float32(self._base()[start:end], "database vectors", first_row=start)

    def get_queries(self):
        return validation.as_finite_float32(vecs_io.read_vectors(self._require("query")), "queries")

    def get_groundtruth(self, k=None):
        if self._gt is None:
            path = self._find("gt")
            if path is not None:
                gt = np.asarray(vecs_io.read_vectors(path, mmap=False))
                if not np.issubdtype(gt.dtype, np.integer):
                    raise ValueError(f"{path}: ground truth must hold integer ids, got dtype {gt.dtype}")
                if self.nq >= 0 and len(gt) != self.nq:
                    raise ValueError(f"{path} has {len(gt)} rows for {self.nq} queries")
            elif self._compute_missing_gt:
                gt = exact_groundtruth(self.get_queries(), self.get_database())
            else:
                self._require("gt")  # a published ground truth is expected: say where
            self._gt = gt
        return _slice_gt(self._gt, k, self.name)


# --------------------------------------------------------------------------------------
# The reference's named data sets
# --------------------------------------------------------------------------------------

_BIGANN_SIZES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
_DEEP_SUFFIX = {"100k": 10**5, "1M": 10**6, "10M": 10**7, "100M": 10**8, "1B": 10**9}
_SET_ROOT = "Set QINCO_DATA to the folder that holds it (default ./data)."


def _bigann(nb_M: int) -> FileDataset:
    root = data_root() / "bigann"
    how = ("BigANN (ANN_SIFT1B) is at http://corpus-texmex.irisa.fr/ (the reference's "
           "data/bigann/download_data.sh fetches it; -small: 10M train, 1M base). " + _SET_ROOT)
    name = "bigann1B" if nb_M == 1000 else f"bigann{nb_M}M"
    return FileDataset(name, {
        "train": [root / "bigann_learn.bvecs"],
        "base": [root / "bigann_base.bvecs"],
        "query": [root / "bigann_query.bvecs"],
        "gt": [root / "gnd" / f"idx_{nb_M}M.ivecs"],
    }, d=128, nt=10**8, nb=nb_M * 10**6, nq=10_000, how_to_get=how)


def _deep(suffix: str) -> FileDataset:
    root = data_root() / "deep1b"
    how = ("Deep1B: see https://github.com/facebookresearch/faiss/tree/main/benchs#getting-deep1b "
           "or the reference's data/deep1b/download_data.sh (the .fbin files of big-ann-benchmarks "
           "are read too). " + _SET_ROOT)
    return FileDataset(f"deep{suffix}", {
        "train": [root / "learn.fvecs", root / "learn.350M.fbin"],
        "base": [root / "base.fvecs", root / "base.1B.fbin"],
        "query": [root / "deep1B_queries.fvecs", root / "query.public.10K.fbin"],
        "gt": [root / f"deep{suffix}_groundtruth.ivecs"],
    }, d=96, nt=358_480_000, nb=_DEEP_SUFFIX[suffix], nq=10_000, how_to_get=how)


def _npy_set(name: str, folder: str, d: int, nt: int, train_file: str, url: str) -> FileDataset:
    """FB-ssnpp and Contriever: .npy files (Contriever's are float16, read as float32)."""
    root = data_root() / folder
    how = f"Download its files from {url} (the reference's data/{folder}/download_data.sh). " + _SET_ROOT
    return FileDataset(name, {
        "train": [root / train_file],
        "base": [root / "database1M.npy"],
        "query": [root / "queries.npy"],
        "gt": [root / "ground_truth1M.npy"],
    }, d=d, nt=nt, nb=10**6, nq=10_000, how_to_get=how)


def _reference_dataset(name: str) -> FileDataset | None:
    m = re.fullmatch(r"bigann(\d+)M|bigann1B", name)
    if m:
        nb_M = 1000 if name == "bigann1B" else int(m.group(1))
        if nb_M not in _BIGANN_SIZES:
            raise ValueError(f"bigann sizes are {', '.join(f'{s}M' for s in _BIGANN_SIZES[:-1])} and 1B, got {name!r}")
        return _bigann(nb_M)
    m = re.fullmatch(r"deep(\w+)", name)
    if m and m.group(1) in _DEEP_SUFFIX:
        return _deep(m.group(1))
    if name == "FB_ssnpp1M":
        return _npy_set(name, "fb_ssnpp", 256, 10**7, "training_set10010k.npy",
                        "https://dl.fbaipublicfiles.com/QINCo/datasets/FB_ssnpp/")
    if name == "Contriever1M":
        return _npy_set(name, "contriever", 768, 20 * 10**6, "training_set.npy",
                        "https://dl.fbaipublicfiles.com/QINCo/datasets/ContrieverEmb/")
    return None


# --------------------------------------------------------------------------------------
# A folder of files
# --------------------------------------------------------------------------------------

FOLDER_ROLES = {
    "train": ("learn", "train", "training_set"),
    "base": ("base", "database"),
    "query": ("query", "queries"),
    "gt": ("gt", "groundtruth", "ground_truth"),
}


def folder_dataset(folder: str | os.PathLike) -> FileDataset:
    """A data set from a folder holding base.* and query.*, optionally learn.* and gt.*
    (or the other names in FOLDER_ROLES), in any format vecs_io reads."""
    folder = Path(folder)
    files: dict[str, list[Path]] = {}
    for role, stems in FOLDER_ROLES.items():
        found = [p for p in sorted(folder.iterdir())
                 if p.is_file() and p.suffix.lower() in vecs_io.EXTENSIONS and p.stem.lower() in stems]
        if len(found) > 1:
            raise ValueError(f"{folder}: several {role} files ({', '.join(p.name for p in found)}); keep one")
        files[role] = found
    for role in ("base", "query"):
        if not files[role]:
            names = " or ".join(f"{s}.*" for s in FOLDER_ROLES[role])
            raise FileNotFoundError(f"{folder} has no {role} vectors: expected a file named {names} "
                                    f"({', '.join(vecs_io.EXTENSIONS)})")
    return FileDataset(str(folder), files, compute_missing_gt=True)


def sift_images_dataset(name: str = "sift_images", spec: image_sift.SiftImagesSpec | None = None,
                        root: str | os.PathLike | None = None) -> FileDataset:
    """The built-in real data set `name` (see image_sift.NAMED_SPECS) as a FileDataset,
    built under the data root (`<root>/<name>`) on first use."""
    if spec is None:
        if name not in image_sift.NAMED_SPECS:
            raise ValueError(f"unknown sift_images data set {name!r}: use one of {', '.join(image_sift.NAMED_SPECS)}")
        spec = image_sift.NAMED_SPECS[name]
    folder = Path(root if root is not None else data_root()) / name
    ds = folder_dataset(image_sift.ensure_built(folder, spec))
    ds.name = name
    return ds


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------


def get_dataset(name_or_folder: str | os.PathLike) -> Dataset:
    """The data set of this name (see the module docstring) or in this folder."""
    name = os.fspath(name_or_folder)
    if name in SYNTHETIC_SIZES:
        return _named_synthetic(name)
    if name in BUILT_IN_REAL_NAMES:
        return sift_images_dataset(name)
    ds = _reference_dataset(name)
    if ds is not None:
        return ds
    if os.path.isdir(name):
        return folder_dataset(name)
    raise ValueError(f"unknown data set {name!r}: use one of {', '.join(AVAILABLE_NAMES)}, "
                     f"or a folder holding base.* and query.* vector files")
