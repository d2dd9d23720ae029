"""Evaluating a model on a data set (the reference's eval_qinco.py): encode the database,
decode it, and measure the reconstruction MSE and the 1-recall@1/10/100 of exact search
of the queries among the decoded vectors against the data set's ground truth."""

from __future__ import annotations

import time
from typing import Callable

from qinco_jax import metrics
from qinco_jax.models import codec
from qinco_jax.data import datasets
from qinco_jax.config import EncodeOptions
from qinco_jax.models.qinco import AnyModel

SEARCH_K = 100


def _quiet(_msg: str) -> None:
    pass


def evaluate(model: AnyModel, ds, options: EncodeOptions | None = None, *,
             log: Callable[[str], None] = _quiet, progress: bool = False) -> dict:
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
