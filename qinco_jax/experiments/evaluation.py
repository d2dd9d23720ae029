"""Evaluating a model (the reference's eval_qinco.py and run.py's eval tasks).

`evaluate` encodes a data set's database, decodes it, and measures the reconstruction
MSE and the 1-recall@1/10/100 of exact search of the queries among the decoded vectors
against the data set's ground truth; `reconstruction_error` measures the MSE and the
encoding / decoding time of any vectors, batch by batch."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np

from qinco_jax.logs import quiet
from qinco_jax import metrics
from qinco_jax.models import codec
from qinco_jax.data import datasets
from qinco_jax.config import EncodeOptions
from qinco_jax.models.qinco import AnyModel

SEARCH_K = 100


@dataclasses.dataclass(frozen=True)
class Reconstruction:
    """What `reconstruction_error` measured: the mean over vectors of the squared L2
    error (raw units), over n vectors, and the seconds spent encoding and decoding."""

    mse: float
    n: int
    t_encode: float
    t_decode: float


def reconstruction_error(model: AnyModel, x, options: EncodeOptions | None = None, *,
                         batch_size: int = 65536) -> Reconstruction:
    """Encode and decode `x` (n, d: an array or a memory map, read `batch_size` rows at a
    time, so a database larger than memory works) with `model`, and measure the mean
    squared reconstruction error (accumulated in float64) and the time of each half, as
    the reference's eval / eval_time tasks report them."""
    if len(x) == 0:
        raise ValueError("no vectors to evaluate")
    if np.ndim(x) != 2 or x.shape[1] != model.d:
        raise ValueError(f"the vectors have shape {tuple(np.shape(x))}, the model ({model.describe()}) "
                         f"needs (n, {model.d})")
    return _reconstruct(model, x, codec.resolve_options(model, options), batch_size)


def _reconstruct(model: AnyModel, x, opts: EncodeOptions, batch_size: int,
                 out: np.ndarray | None = None) -> Reconstruction:
    """Encode and decode x batch by batch (the reconstructions into `out` when given)."""
    total, t_encode, t_decode = 0.0, 0.0, 0.0
    step = max(1, int(batch_size))
    for i0 in range(0, len(x), step):
        batch = np.asarray(x[i0:i0 + step], dtype=np.float32)
        t0 = time.perf_counter()
        codes = codec.encode(model, batch, opts)
        t1 = time.perf_counter()
        recons = codec.decode(model, codes)
        t2 = time.perf_counter()
        total += float(np.sum((batch.astype(np.float64) - recons) ** 2))
        t_encode, t_decode = t_encode + t1 - t0, t_decode + t2 - t1
        if out is not None:
            out[i0:i0 + len(batch)] = recons
    return Reconstruction(mse=total / len(x), n=int(len(x)), t_encode=t_encode, t_decode=t_decode)


def decoded_database_recalls(model: AnyModel, xb, xq: np.ndarray, gt: np.ndarray,
                             options: EncodeOptions | None = None, *, batch_size: int = 65536,
                             k: int = SEARCH_K) -> dict:
    """The paper's Table 3 retrieval accuracy (the reference's task=search without an
    index): the database `xb` (array or memory map, encoded and decoded `batch_size`
    rows at a time) replaced by its reconstructions, the exact k nearest of each query
    among them, and the 1-recall@1/10/100 against ground truth `gt` (its first column is
    each query's nearest neighbour). Returns {recalls, mse, nb, nq, t_encode, t_decode,
    t_search} (mse: raw units, over the database)."""
    xq = np.asarray(xq, np.float32)
    gt = np.asarray(gt)
    if xq.ndim != 2 or xq.shape[1] != model.d:
        raise ValueError(f"queries have shape {xq.shape}, the model ({model.describe()}) needs (nq, {model.d})")
    if gt.ndim != 2 or len(gt) != len(xq):
        raise ValueError(f"ground truth of shape {gt.shape} for {len(xq)} queries: expected (nq, >= 1) ids")
    if np.ndim(xb) != 2 or xb.shape[1] != model.d:
        raise ValueError(f"the database has shape {tuple(np.shape(xb))}, the model needs (n, {model.d})")
    if gt.max(initial=0) >= len(xb):
        raise ValueError(f"the ground truth names database vector {int(gt.max())}, the database has {len(xb)}: "
                         "give the database it was computed on (ds.db cuts it)")
    recons = np.empty(xb.shape, np.float32)
    measured = _reconstruct(model, xb, codec.resolve_options(model, options), batch_size, out=recons)
    t0 = time.perf_counter()
    ids = datasets.exact_groundtruth(xq, recons, k)
    t_search = time.perf_counter() - t0
    return {"recalls": metrics.one_recall_at(ids, gt), "mse": measured.mse, "nb": measured.n, "nq": int(len(xq)),
            "t_encode": measured.t_encode, "t_decode": measured.t_decode, "t_search": t_search}


def evaluate(model: AnyModel, ds, options: EncodeOptions | None = None, *,
             log: Callable[[str], None] = quiet, progress: bool = False) -> dict:
    """Encode, decode and search data set `ds` (qinco_jax.data.datasets) with `model`.
    Returns {db, model, nb, nq, mse, recalls, beam, preselect, proxy, dtype, t_encode,
    t_decode, t_search}."""
    if model.d != ds.d:
        raise ValueError(f"the model ({model.describe()}) has dimension {model.d}, "
                         f"the data set {ds.name} has dimension {ds.d}")
    opts = codec.resolve_options(model, options)
    xb = ds.get_database()
    log(f"Encoding database vectors of size {xb.shape}")
    t0 = time.time()
    codes = codec.encode(model, xb, opts, progress="encoding" if progress else None)
    t_encode = time.time() - t0
    log(f"Encoding done in {t_encode:.2f} s; decoding")
    t0 = time.time()
    recons = codec.decode(model, codes, batch_size=opts.batch_size, dtype=opts.dtype,
                          progress="decoding" if progress else None)
    t_decode = time.time() - t0
    mse = metrics.mean_squared_error(xb, recons)
    log(f"Decoding done in {t_decode:.2f} s, MSE={mse:g}")
    log("Performing search")
    t0 = time.time()
    ids = datasets.exact_groundtruth(ds.get_queries(), recons, SEARCH_K)
    t_search = time.time() - t0
    recalls = metrics.one_recall_at(ids, ds.get_groundtruth())
    for rank, r in recalls.items():
        log(f"1-recall@{rank}: {r:.4f}")
    return {"db": ds.name, "model": model.describe(), "nb": int(ds.nb), "nq": int(ds.nq),
            "mse": mse, "recalls": recalls, "beam": opts.beam, "preselect": opts.preselect, "proxy": opts.proxy,
            "dtype": opts.dtype, "t_encode": t_encode, "t_decode": t_decode, "t_search": t_search}
