"""Reading a training set that stays on disk.

Training takes its vectors as any (n, d) array; a memory map of a vector file
(`formats.vecs_io.read_vectors`: bvecs, fvecs, ivecs, fbin, u8bin, ibin, npy) stays a
memory map throughout: every pass over it reads bounded chunks, converts them to
float32 and releases the pages it touched (`vecs_io.release`), so the process's
resident memory does not grow with the file. What training needs from the whole set:

    extremes(x)                 min and max (QINCo v1's db_scale, QINCo2's qinco1_mode)
    head(x, n)                  the first n rows, float32 (bounded initialisation samples)
    gather(x, rows)             rows in any order, float32 (one batch)
    kmeans_sample(x, k)         the rows faiss's k-means would train on, float32
    faiss_sample(x, m)          the rows faiss's OPQ (any `fvecs_maybe_subsample`) trains on
    RowMap(x, fn, d)            x's rows transformed when read (PQ-QINCo's rotated sub-vectors)
    check_training_rows(...)    enough rows for the validation set plus one batch
"""

from __future__ import annotations

import numpy as np

from qinco_jax.data import validation
from qinco_jax.formats import vecs_io

CHUNK_ROWS = 65_536   # rows per chunk of a pass over the whole set
GATHER_ROWS = 16      # rows read between two releases when gathering a batch


def _name(x) -> str:
    source = validation.source_of(x)
    return f" ({source})" if source else ""


def extremes(x, chunk_rows: int = CHUNK_ROWS) -> tuple[float, float]:
    """(min, max) over every element of x, read chunk by chunk (pages released)."""
    if len(x) == 0:
        raise ValueError(f"no vectors{_name(x)}")
    lo, hi = np.inf, -np.inf
    for i0 in range(0, len(x), chunk_rows):
        chunk = np.asarray(x[i0:i0 + chunk_rows])
        lo, hi = min(lo, float(chunk.min())), max(hi, float(chunk.max()))
        vecs_io.release(x[i0:i0 + chunk_rows])
    return lo, hi


def head(x, n: int | None, chunk_rows: int = CHUNK_ROWS) -> np.ndarray:
    """The first n rows of x (all if None) as a contiguous float32 array, read and
    converted chunk by chunk (no full-size temporary in the file's dtype)."""
    n = len(x) if n is None else min(int(n), len(x))
    out = np.empty((n, x.shape[1]), np.float32)
    for i0 in range(0, n, chunk_rows):
        i1 = min(i0 + chunk_rows, n)
        out[i0:i1] = x[i0:i1]
        vecs_io.release(x[i0:i1])
    return out


def gather(x, rows: np.ndarray, chunk_rows: int = GATHER_ROWS) -> np.ndarray:
    """x[rows] as float32 (rows in any order): only those rows are read.

    From a memory map the rows are read in ascending order, `chunk_rows` at a time, and
    the pages of each chunk's span released before the next: a page fault maps the
    whole cached folio around it (measured: ~400 kB per row read on this machine's
    kernel), so a batch of rows scattered over a large file would otherwise map
    hundreds of MB at once."""
    rows = np.asarray(rows)
    if not isinstance(x, np.memmap):
        return np.asarray(x[rows], np.float32)
    order = np.argsort(rows, kind="stable")
    out = np.empty((len(rows), x.shape[1]), np.float32)
    for i0 in range(0, len(rows), chunk_rows):
        at = order[i0:i0 + chunk_rows]
        span = rows[at]
        out[at] = x[span]
        vecs_io.release(x[int(span[0]):int(span[-1]) + 1])
    return out


def faiss_permutation_prefix(n: int, m: int, seed: int) -> np.ndarray:
    """The first m entries of faiss's `rand_perm(n, seed)` (int64), in memory O(m):
    faiss's Fisher-Yates shuffle (swap i with i + rand_int(n - i), its own RNG) run for
    m steps, the swapped positions kept in a dict. For n not much larger than m, faiss's
    own full permutation (4 n bytes) is faster and as small."""
    import faiss

    m = min(m, n)
    if n <= 16 * m:
        perm = np.empty(n, np.int32)
        faiss.rand_perm(faiss.swig_ptr(perm), n, seed)
        return perm[:m].astype(np.int64)
    rng = faiss.RandomGenerator(seed)
    moved: dict[int, int] = {}
    out = np.empty(m, np.int64)
    for i in range(m):
        j = i + rng.rand_int(n - i)
        out[i] = moved.get(j, j)
        moved[j] = moved.get(i, i)
    return out


def faiss_sample(x, max_rows: int, seed: int = 1234) -> np.ndarray:
    """The rows faiss's `fvecs_maybe_subsample` keeps (OPQ training, ...), float32, in
    faiss's order: all of x if it has at most max_rows rows, else the first max_rows of
    its rand_perm(n, seed). Only those rows are read."""
    if len(x) <= max_rows:
        return head(x, None)
    return gather(x, faiss_permutation_prefix(len(x), max_rows, seed))


def kmeans_sample(x, k: int, max_points_per_centroid: int = 256, seed: int = 1234) -> np.ndarray:
    """The training rows of faiss's k-means of k centroids on x, float32, in the order
    faiss uses them: all of x if it has at most k * max_points_per_centroid rows, else
    faiss's random subsample of that many (its rand_perm, seed as faiss.Kmeans's
    default). Training faiss.Kmeans on this sample gives the centroids it gives on all
    of x, reading only the sample from a memory-mapped file."""
    n, m = len(x), k * max_points_per_centroid
    if n <= m:
        return head(x, None)
    return gather(x, faiss_permutation_prefix(n, m, seed))


class RowMap:
    """The rows of x transformed by fn when read: an (n, d) float32 array-like whose
    rows are computed batch by batch (`fn` maps float32 rows (b, x's d) to (b, d)), so
    a transformed training set never exists whole. Reads: `rm[i0:i1]`, `rm[rows]`.
    Its values are checked where x is read (x is assumed checked)."""

    ndim = 2
    dtype = np.dtype(np.float32)

    def __init__(self, x, fn, d: int):
        self.x, self.fn = x, fn
        self.shape = (len(x), int(d))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise IndexError("RowMap reads contiguous slices or row indices")
            rows = head(self.x[start:stop], None)
        else:
            rows = gather(self.x, np.asarray(key))
        return np.ascontiguousarray(self.fn(rows), np.float32)


def as_rows(x):
    """x as training reads it: a RowMap or a memory map stays as is, anything else an array."""
    return x if isinstance(x, RowMap) else np.asanyarray(x)


def check_rows(x, what: str) -> None:
    """Element type and finite values, chunk by chunk (a RowMap's source is checked)."""
    if not isinstance(x, RowMap):
        validation.check_all_finite(x, what)


def check_training_rows(n_total: int, nval: int, batch_size: int, source: str | None = None) -> None:
    """A training file must hold the validation set plus at least one batch."""
    if n_total < nval + batch_size:
        where = f"{source}: " if source else ""
        raise ValueError(f"{where}{n_total} vectors is too few: training needs the {nval} validation vectors "
                         f"plus at least one batch of {batch_size}")
