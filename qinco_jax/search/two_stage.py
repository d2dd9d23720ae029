"""Flat two-stage search (the paper's Table 4): an exhaustive search of the database's
AQ reconstructions gives a shortlist, QINCo decoding re-ranks it."""

from __future__ import annotations

import time
from typing import Callable, Sequence

import faiss
import numpy as np

from qinco_jax.logs import quiet
from qinco_jax import metrics
from qinco_jax.search import aq
from qinco_jax.models import codec
from qinco_jax.search import report
from qinco_jax.config import EncodeOptions
from qinco_jax.models.qinco import QincoModel
from qinco_jax.search.index import check_model_codes, ivf_centroids
from qinco_jax.search.rerank import Reranker, shortlist_and_rerank
from qinco_jax.search.sweep import check_queries, operating_point

# --------------------------------------------------------------------------------------
# Flat two-stage search (the paper's Table 4): AQ shortlist over the whole database
# --------------------------------------------------------------------------------------


def require_flat_model(model) -> QincoModel:
    if not isinstance(model, QincoModel):
        raise ValueError(f"two-stage search needs a QINCo, QINCo-LR or IVF-QINCo model, got {model.describe()}")
    return model


def fit_flat_aq(model: QincoModel, x: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """AQ codebooks approximating the model's decoder for these codes: over all M code
    columns (QINCo, QINCo-LR, as the reference), or over the M steps on the residuals to
    the IVF centroids (IVF-QINCo, whose first column has K_IVF values)."""
    model = require_flat_model(model)
    codes = check_model_codes(model, codes, len(x), "codes")
    x = np.asarray(x, np.float32)
    if model.config.is_ivf:
        return aq.fit_codebooks(x - ivf_centroids(model)[codes[:, 0]], codes[:, 1:], model.config.K)
    return aq.fit_codebooks(x, codes, model.config.K)


def flat_aq_reconstruct(model: QincoModel, codes: np.ndarray, codebooks: np.ndarray) -> np.ndarray:
    if model.config.is_ivf:
        return ivf_centroids(model)[codes[:, 0]] + aq.reconstruct(codes[:, 1:], codebooks)
    return aq.reconstruct(codes, codebooks)


def two_stage_search(model: QincoModel, xq: np.ndarray, gt: np.ndarray, xb_codes: np.ndarray,
                     xb_aq: np.ndarray, nshort: Sequence[int], reranker: Reranker | None = None,
                     log: Callable[[str], None] = print) -> list[dict]:
    """For every nshort: exhaustive search of the AQ reconstructions xb_aq (faiss, L2),
    then QINCo decoding of the shortlist and exact re-ranking. Same result format as
    `explore`."""
    model = require_flat_model(model)
    check_queries(model, xq, gt)
    xb_aq = np.ascontiguousarray(xb_aq, np.float32)
    xb_codes = check_model_codes(model, xb_codes, len(xb_aq), "database codes")
    reranker = reranker or Reranker(model)
    flat = faiss.IndexFlatL2(xb_aq.shape[1])
    flat.add(xb_aq)

    def shortlist(q, ns):
        return flat.search(q, ns)[1], None

    def to_codes(I, _):
        valid = I >= 0
        return xb_codes[np.where(valid, I, 0)], valid

    results = []
    log(report.format_header(["nshort"]))
    for ns in nshort:
        ns = int(ns)
        if not 1 <= ns <= len(xb_aq):
            raise ValueError(f"nshort={ns} must lie in [1, {len(xb_aq)}] (the database size)")
        r = shortlist_and_rerank(shortlist, to_codes, xq, ns, reranker)
        res = operating_point({"nshort": ns}, r, gt)
        results.append(res)
        log(report.format_row(res, ["nshort"], len(xq)))
    return results



def run_two_stage(model: QincoModel, xt: np.ndarray, xb: np.ndarray, xq: np.ndarray, gt: np.ndarray,
                  nshort: Sequence[int], options: EncodeOptions | None = None,
                  log: Callable[[str], None] = quiet) -> tuple[list[dict], dict]:
    """The whole pipeline of the paper's Table 4: encode the training set, fit the AQ
    codebooks to its codes, encode the database, then `two_stage_search` for every
    nshort. Returns (results, stats: MSE_train, MSE_train_AQ, MSE_db, MSE_db_AQ,
    t_train_codebook)."""
    model = require_flat_model(model)
    opts = codec.resolve_options(model, options)
    if max(nshort) > len(xb):
        raise ValueError(f"nshort {max(nshort)} is larger than the database ({len(xb)} vectors)")
    dec = dict(batch_size=opts.batch_size, dtype=opts.dtype)
    stats: dict = {}
    log(f"encode the training set {np.shape(xt)}")
    xt_codes = codec.encode(model, xt, opts, progress="encode train")
    stats["MSE_train"] = metrics.mean_squared_error(xt, codec.decode(model, xt_codes, **dec))
    log(f"xt decoded MSE={stats['MSE_train']:g}")
    t0 = time.time()
    codebooks = fit_flat_aq(model, xt, xt_codes)
    stats["t_train_codebook"] = time.time() - t0
    stats["MSE_train_AQ"] = metrics.mean_squared_error(xt, flat_aq_reconstruct(model, xt_codes, codebooks))
    log(f"AQ codebooks fitted in {stats['t_train_codebook']:.2f} s, MSE on the training set "
        f"{stats['MSE_train_AQ']:g}")
    log(f"encode the database {np.shape(xb)}")
    xb_codes = codec.encode(model, xb, opts, progress="encode db")
    xb_aq = flat_aq_reconstruct(model, xb_codes, codebooks)
    stats["MSE_db"] = metrics.mean_squared_error(xb, codec.decode(model, xb_codes, progress="decode db", **dec))
    stats["MSE_db_AQ"] = metrics.mean_squared_error(xb, xb_aq)
    log(f"database MSE: QINCo {stats['MSE_db']:g}, AQ {stats['MSE_db_AQ']:g}")
    results = two_stage_search(model, xq, gt, xb_codes, xb_aq, nshort, Reranker(model, dtype=opts.dtype), log=log)
    return results, stats
