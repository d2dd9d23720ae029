"""The pairwise decoder of an IVF model (QINCo2 or v1), for the middle search stage.

`train_for_model` trains a `qinco_jax.models.pairwise` decoder from a model, its IVF centroids
(raw units; by default the model's own), training vectors and their model codes (encoded
here unless given); `middle_stage` checks that a decoder fits a model and wraps it in the
jitted `rerank.PairwiseReranker`. Everything is in raw units whatever the model's
normalisation (QINCo2 mean/std, v1 db_scale): the decoder's tables approximate
x - centroid[list] for raw x and raw centroids, so its reconstructions meet raw queries.
"""

from __future__ import annotations

import os

import numpy as np

from qinco_jax.models import codec
from qinco_jax.models import pairwise
from qinco_jax.config import EncodeOptions
from qinco_jax.models.qinco import QincoModel
from qinco_jax.search import provenance
from qinco_jax.search.index import check_model_codes, ivf_centroids as model_ivf_centroids, require_ivf_model
from qinco_jax.search.rerank import PairwiseReranker


def check_decoder_fits(decoder: pairwise.PairwiseDecoder, model: QincoModel, what: str = "the pairwise decoder") -> None:
    """A ValueError naming the first property of `decoder` that does not fit `model`."""
    c = require_ivf_model(model).config
    if decoder.d != c.d:
        raise ValueError(f"{what} reconstructs vectors of dimension {decoder.d}, the model ({c.describe()}) has d={c.d}")
    if decoder.nlist != c.K_IVF:
        raise ValueError(f"{what} covers {decoder.nlist} IVF lists, the model has K_IVF={c.K_IVF}")
    if decoder.K != c.K:
        raise ValueError(f"{what} has tables of {decoder.K}x{decoder.K} rows (K={decoder.K}), the model has K={c.K}")
    if decoder.min_code_width > c.code_width:
        raise ValueError(f"{what} reads code streams up to {int(np.max(decoder.pairs))}, beyond the model's "
                         f"M={c.M} codes plus {pairwise.IVF_SUBCODE_STAGES} IVF sub-codes")


# A compact storage (pairwise.compact) is used by default when its reconstructions are
# within this relative MSE of the float32 tables' (`choose_table_dtype`); the number of
# stored entries that measure it.
COMPACT_MSE_TOLERANCE = 1e-3
COMPACT_CHECK_SAMPLE = 2048


def choose_table_dtype(decoder: pairwise.PairwiseDecoder, model: QincoModel, codes: np.ndarray,
                       ivf_centroids: np.ndarray | None = None, *,
                       tolerance: float = COMPACT_MSE_TOLERANCE) -> tuple[str, dict[str, float]]:
    """(storage, {storage: MSE}): the smallest table storage (int8, then float16) whose
    reconstructions of `codes` (n, 1 + M), e.g. a sample of an index's stored entries,
    are within `tolerance` (relative) of the float32 tables' MSE; float32 when neither
    is. The MSE is measured against the model's own decodings of the codes (the only
    reconstruction known without the vectors, and the one the final stage ranks with);
    the compact tables' rounding is a larger share of that error than of the error
    against the vectors, so the rule is the stricter of the two."""
    check_decoder_fits(decoder, model)
    codes = np.asarray(codes)
    centroids = model_ivf_centroids(model) if ivf_centroids is None else np.asarray(ivf_centroids, np.float32)
    target = codec.decode(model, codes)
    mse = {}
    for dtype in ("float32", "int8", "float16"):
        xhat = pairwise.decode(pairwise.compact(decoder, dtype), codes, centroids)
        mse[dtype] = float(np.mean(np.sum((xhat.astype(np.float64) - target) ** 2, axis=1)))
    for dtype in ("int8", "float16"):
        if mse[dtype] <= mse["float32"] * (1 + tolerance):
            return dtype, mse
    return "float32", mse


def load_for_model(path: str | os.PathLike, model: QincoModel,
                   table_dtype: str = "float32") -> pairwise.PairwiseDecoder:
    """Read a pairwise decoder file (the reference's format), check it fits `model`
    and store its tables as `table_dtype` (see `pairwise.compact`)."""
    decoder = pairwise.load_pairwise_decoder(path)
    check_decoder_fits(decoder, model, f"pairwise decoder {os.fspath(path)}")
    return pairwise.compact(decoder, table_dtype)


def load_checked(path: str | os.PathLike, model: QincoModel, index, *, table_dtype: str | None = None,
                 model_path: str | os.PathLike | None = None, allow_mismatch: bool = False,
                 override_hint: str = "allow_mismatch=True", log=None) -> pairwise.PairwiseDecoder:
    """`load_for_model`, then a check that the decoder belongs to `model` (the model
    fingerprint its file records, else its reconstructions of a sample of the stored
    entries of `index` against the model's: `provenance.check_decoder_belongs`).
    table_dtype None (the default): the storage `choose_table_dtype` picks on a sample
    of the index's stored entries, said through `log`; the result's `table_dtype`
    says which."""
    decoder = load_for_model(path, model, table_dtype or "float32")
    provenance.check_decoder_belongs(decoder, model, provenance.stored_codes_sample(index), decoder_path=path,
                                     model_path=model_path, recorded_fingerprint=pairwise.read_model_fingerprint(path),
                                     allow_mismatch=allow_mismatch, override_hint=override_hint, log=log)
    if table_dtype is None:
        sample = provenance.stored_codes_sample(index, COMPACT_CHECK_SAMPLE)
        if len(sample):
            table_dtype, mse = choose_table_dtype(decoder, model, sample)
            if log is not None:
                log(f"pairwise tables stored as {table_dtype}: MSE against the model's decodings of "
                    f"{len(sample)} stored entries " + ", ".join(f"{k} {v:.6g}" for k, v in mse.items())
                    + f" (a compact storage is used within {COMPACT_MSE_TOLERANCE:.1%} of float32)")
            decoder = pairwise.compact(decoder, table_dtype)
    return decoder


def middle_stage(decoder: pairwise.PairwiseDecoder, model: QincoModel,
                 ivf_centroids: np.ndarray | None = None, *, table_dtype: str | None = None) -> PairwiseReranker:
    """The jitted middle re-ranking stage of `decoder` for `model`'s codes; the IVF
    centroids default to the model's own (raw units). table_dtype: the tables'
    storage in the stage (one of pairwise.TABLE_DTYPES; None: the decoder's own)."""
    check_decoder_fits(decoder, model)
    if table_dtype is not None:
        decoder = pairwise.compact(decoder, table_dtype)
    centroids = model_ivf_centroids(model) if ivf_centroids is None else np.asarray(ivf_centroids, np.float32)
    return PairwiseReranker(decoder, centroids)


def train_for_model(model: QincoModel, xt: np.ndarray, xt_codes: np.ndarray | None = None, *,
                    ivf_centroids: np.ndarray | None = None, n_tables_per_code: int = pairwise.DEFAULT_TABLES_PER_CODE,
                    options: EncodeOptions | None = None, seed: int = 0, shrinkage: float | None = None,
                    progress: bool = True) -> pairwise.PairwiseTraining:
    """Train the pairwise decoder of an IVF model on raw training vectors xt (n, d):
    their model codes `xt_codes` (n, 1 + M) are encoded here (with `options`) unless
    given; `ivf_centroids` (raw units) default to the model's. n_tables_per_code * M
    tables (the reference's n_pairwise_codebooks, default 2). Works with any number of
    IVF lists, fewer than K included; `shrinkage`: see `pairwise.train_pairwise_decoder`
    (None, the default: chosen on held-out training rows; 0: the reference's plain means)."""
    model = require_ivf_model(model)
    xt = np.asarray(xt, np.float32)
    if xt.ndim != 2 or xt.shape[1] != model.d:
        raise ValueError(f"training vectors have shape {xt.shape}, the model ({model.describe()}) needs (n, {model.d})")
    if n_tables_per_code < 1:
        raise ValueError(f"n_pairwise_codebooks (tables per code) must be >= 1, got {n_tables_per_code}")
    if xt_codes is None:
        xt_codes = codec.encode(model, xt, options, progress="encode train" if progress else None)
    xt_codes = check_model_codes(model, xt_codes, len(xt), "training codes")
    centroids = model_ivf_centroids(model) if ivf_centroids is None else np.asarray(ivf_centroids, np.float32)
    if centroids.shape != (model.config.K_IVF, model.d):
        raise ValueError(f"IVF centroids of shape {centroids.shape}, the model needs ({model.config.K_IVF}, {model.d})")
    return pairwise.train_pairwise_decoder(xt, xt_codes, centroids, model.config.K,
                                           n_tables=n_tables_per_code * model.config.M, seed=seed,
                                           shrinkage=shrinkage, progress=progress)


def describe_shrinkage(training: pairwise.PairwiseTraining) -> str:
    """One line saying which shrinkage the tables were trained with and why."""
    if not training.shrinkage_chosen:
        return f"pairwise shrinkage {training.shrinkage:g} (given)"
    if not training.validation_mse:
        return (f"pairwise shrinkage {training.shrinkage:g} (too few training rows to hold any out "
                f"for a choice: plain means)")
    tried = ", ".join(f"{lam:g}: {mse:.6g}" for lam, mse in training.validation_mse)
    return (f"pairwise shrinkage {training.shrinkage:g}, chosen on held-out training rows "
            f"(held-out MSE per shrinkage {tried})")
