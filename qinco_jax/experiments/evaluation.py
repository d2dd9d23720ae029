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
    opts = codec.resolve_options(model, options)
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
    return Reconstruction(mse=total / len(x), n=int(len(x)), t_encode=t_encode, t_decode=t_decode)


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
