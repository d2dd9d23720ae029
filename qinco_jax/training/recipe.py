"""Training a QINCo model from data, the paper's recipe:

    residual quantizer (faiss RQ; IVF-QINCo: on the residuals to the IVF centroids)
      -> initial parameters (the RQ codebooks, db_scale = max of the training set)
      -> `training.fit`.

    from qinco_jax.training.recipe import ModelSpec, train_model
    result = train_model(xt, xval, ModelSpec(M=8, L=2, h=256), TrainConfig(lr=1e-3))
    model = result.best

`train/train_qinco.py` (qinco-train) is this function over command-line flags.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from qinco_jax.logs import quiet
from qinco_jax.training import qinco2_recipe as q2
from qinco_jax.training import rq_init, streaming
from qinco_jax.training import loop as training
from qinco_jax.data import validation
from qinco_jax.config import QincoArch, QincoConfig
from qinco_jax.models.qinco import QincoModel, init_params


INITS = ("random", "rq_exact")
# QINCo v1's RQ initialisation trains on at most this many vectors: the reference's
# train_qinco.py trains it on its --nt training vectors, 500k by default.
V1_RQ_MAX_ROWS = 500_000


@dataclasses.dataclass(frozen=True)
class ModelSpec(QincoArch):
    """The model to train: a QincoConfig's architecture (QincoArch's fields, with their
    defaults: keyword-only) without what the data decides (d, K_IVF; db_scale unless
    forced), plus how it starts:

    db_scale: QINCo v1's input scale; None: the maximum of the training set (the reference).
    init: "random" (the reference's network initialisation) or "rq_exact" (the untrained
        model decodes exactly as the RQ, so training starts at its error).
    rq_beam_size: beam of the initial faiss residual quantizer (QINCo v1).
    seed: the network initialisation's.

    `spec.config(d, K_IVF, db_scale)` is the QincoConfig it trains; QincoConfig's checks
    apply. The command lines keep the reference's own defaults (e.g. train_qinco.py's
    L=4) in their flags."""

    db_scale: float | None = None
    init: str = "random"
    rq_beam_size: int = 1
    seed: int = 1234

    def __post_init__(self):
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.rq_beam_size < 1:
            raise ValueError(f"rq_beam_size must be >= 1, got {self.rq_beam_size}")
        if self.db_scale is not None and not self.db_scale > 0:
            raise ValueError(f"db_scale must be > 0 (or None: the maximum of the training set), got {self.db_scale}")
        if self.is_qinco2 and self.db_scale is not None:
            raise ValueError("db_scale is a QINCo v1 setting: a QINCo2 model normalises with the "
                             "training set's mean and std")
        if self.is_qinco2 and self.A > self.K:
            raise ValueError(f"need A <= K, got A={self.A} K={self.K}")
        if self.M < (1 if self.variant == "ivf" else 2):
            raise ValueError(f"M must be >= {1 if self.variant == 'ivf' else 2}, got {self.M}")
        rq_init.codebook_bits(self.K)
        # every other check is QincoConfig's: a config of this spec on stand-in data
        self.config(d=self.de + 1, K_IVF=1 if self.variant == "ivf" else 0)

    def config(self, d: int, K_IVF: int = 0, db_scale: float = 1.0) -> QincoConfig:
        """The QincoConfig of this spec on data of dimension d (de = d is stored as 0)."""
        arch = {f.name: getattr(self, f.name) for f in dataclasses.fields(QincoArch)}
        arch["de"] = 0 if arch["de"] == d else arch["de"]
        return QincoConfig(d=d, K_IVF=K_IVF, db_scale=db_scale, **arch)


def check_ivf_centroids(spec: ModelSpec, centroids: np.ndarray | None, d: int) -> np.ndarray | None:
    if not spec.is_ivf:
        if centroids is not None:
            raise ValueError(f"IVF centroids given for a {spec.variant!r} model")
        return None
    if centroids is None:
        raise ValueError("an IVF-QINCo model needs IVF centroids (K_IVF x d)")
    c = validation.as_finite_float32(centroids, "IVF centroids")
    if c.ndim != 2 or c.shape[1] != d:
        raise ValueError(f"IVF centroids have shape {c.shape}: their dimension must be the training vectors' d={d}")
    return c


def train_rq_codebooks(xt: np.ndarray, spec: ModelSpec, xval: np.ndarray | None = None,
                       ivf_centroids: np.ndarray | None = None,
                       log: Callable[[str], None] = quiet, max_rows: int | None = V1_RQ_MAX_ROWS) -> np.ndarray:
    """The initial RQ codebooks (M, K, d), raw units: on the first `max_rows` vectors
    (None: all), or for IVF-QINCo on their residuals to their nearest IVF centroid.
    xval, if given, is only measured (its MSE is logged). xt may be a memory map: only
    the sample is read."""
    centroids = check_ivf_centroids(spec, ivf_centroids, xt.shape[1])
    sample = streaming.head(xt, max_rows)
    if len(sample) < len(xt):
        log(f"the RQ initialisation trains on the first {len(sample)} of {len(xt)} training vectors")
    if centroids is None:
        return rq_init.train_rq(sample, spec.M, spec.K, spec.rq_beam_size, xval, log=log)
    res_t = rq_init.ivf_residuals(sample, centroids, rq_init.assign_to_centroids(sample, centroids))
    res_v = None if xval is None else rq_init.ivf_residuals(xval, centroids,
                                                            rq_init.assign_to_centroids(xval, centroids))
    return rq_init.train_rq(res_t, spec.M, spec.K, spec.rq_beam_size, res_v, log=log)


def initial_model(xt: np.ndarray, spec: ModelSpec, rq_codebooks: np.ndarray | None,
                  ivf_centroids: np.ndarray | None = None) -> QincoModel:
    """The model before training: config from the spec and the data, codebooks from the
    RQ (None: random, e.g. when a checkpoint will replace them), IVF centroids frozen."""
    d = xt.shape[1]
    centroids = check_ivf_centroids(spec, ivf_centroids, d)
    db_scale = float(spec.db_scale) if spec.db_scale is not None else streaming.extremes(xt)[1]
    if not db_scale > 0:
        raise ValueError(f"db_scale = max of the training set = {db_scale}: it must be > 0, set it explicitly")
    config = spec.config(d, len(centroids) if centroids is not None else 0, db_scale)
    scale = np.float32(db_scale)
    kwargs = {}
    if rq_codebooks is not None:
        kwargs["codebooks"] = np.asarray(rq_codebooks, np.float32) / scale
    if centroids is not None:
        kwargs["codebook0"] = centroids / scale
    params = init_params(config, jax.random.key(spec.seed), **kwargs)
    if spec.init == "rq_exact":
        params = rq_init.zero_network_init(params)
    return QincoModel(config, params)


def qinco2_initial_model(xt: np.ndarray, spec: ModelSpec, cfg: training.TrainConfig, *,
                         xval: np.ndarray | None = None, ivf_centroids: np.ndarray | None = None,
                         rq_codebooks: np.ndarray | None = None, log: Callable[[str], None] = quiet
                         ) -> tuple[QincoModel, float | None]:
    """QINCo2's model before training, as its reference builds it: normalisation
    statistics of the training set; an RQ (k-means per step, `cfg.seed`) trained on the
    rows the first epoch sees (raw units; given `rq_codebooks` (M, K, d) skip it); its
    codebooks normalised, with Gaussian noise of `cfg.codebook_noise` x their std, in
    the steps' codebooks and substep codebooks; concat and `down` layers zero (outer
    skip), so an untrained network step adds 2c (de = d) or c + P_out P_in c.
    `spec.init == "rq_exact"`: no noise and `rq_init.qinco2_exact_init`, so that the
    untrained model decodes exactly as the RQ and training starts at its error.
    Returns the model and the RQ's validation MSE (None if not trained here)."""
    d = xt.shape[1]
    centroids = check_ivf_centroids(spec, ivf_centroids, d)
    mean, std = q2.normalisation_stats(xt if spec.qinco1_mode else streaming.head(xt, q2.STATS_ROWS),
                                       spec.qinco1_mode)
    rq_val = None
    if rq_codebooks is None:
        order = q2.DataOrder.for_run(len(xt), cfg.epoch_size, cfg.seed, spec.qinco1_mode)
        rows = order.rq_rows(cfg.batch_size)
        log(f"training the RQ initialisation on {len(rows)} vectors (M={spec.M}, K={spec.K})")
        rq = q2.train_rq_init(streaming.gather(xt, rows),
                              spec.M, spec.K, ivf_centroids=centroids, xval=xval, seed=cfg.seed,
                              qinco1_mode=spec.qinco1_mode)
        rq_codebooks, rq_val = rq.codebooks, rq.val_mse
        log(f"RQ initialisation: train MSE {rq.train_mse:g}" + (f", val MSE {rq_val:g}" if rq_val else ""))
    exact = spec.init == "rq_exact"
    books = q2.initial_codebooks(rq_codebooks, mean, std, ivf=centroids is not None,
                                 key=jax.random.key(cfg.seed), noise=0.0 if exact else cfg.codebook_noise,
                                 qinco1_mode=spec.qinco1_mode)
    config = spec.config(d, len(centroids) if centroids is not None else 0)
    kwargs = {"codebooks": books}
    if centroids is not None:
        kwargs["codebook0"] = (centroids - mean) / np.float32(std)
    params = init_params(config, jax.random.key(spec.seed), **kwargs)
    if config.has_substep:  # each substep codebook starts as its step's (noisy) codebook
        params["steps"]["substep_codebook"] = params["steps"]["codebook"]
    params["normalisation"] = {"mean": jnp.asarray(mean), "std": jnp.asarray(std, jnp.float32)}
    if exact:
        params = rq_init.qinco2_exact_init(params, config)
    return QincoModel(config, params), rq_val


def count_trainable(model: QincoModel) -> int:
    """Parameters the optimizer updates (IVF centroids are frozen)."""
    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(model.params["steps"]))  # frozen: not in steps
    return n + (0 if model.config.is_ivf else int(np.prod(model.params["codebook0"].shape)))


def will_resume(checkpoint_dir: str | None) -> bool:
    """Whether `checkpoint_dir` holds a finished epoch to resume from."""
    if not checkpoint_dir:
        return False
    ckpt = training.TrainCheckpointer(checkpoint_dir)
    try:
        return ckpt.latest_epoch() is not None
    finally:
        ckpt.close()


def train_model(xt: np.ndarray, xval: np.ndarray, spec: ModelSpec, cfg: training.TrainConfig, *,
                ivf_centroids: np.ndarray | None = None, rq_codebooks: np.ndarray | None = None,
                model_path: str | None = None, checkpoint_dir: str | None = None,
                history_path: str | None = None, log: Callable[[str], None] = quiet,
                monitor=None) -> training.TrainResult:
    """Train a model of `spec` on raw vectors xt (validation xval), from a residual
    quantizer: `rq_codebooks` if given, else trained here (skipped when resuming from
    `checkpoint_dir`). See training.fit for model_path, checkpoint_dir, history_path
    and monitor."""
    xt = streaming.as_rows(xt)  # a memory map stays on disk: read in batches, converted to float32 per batch
    streaming.check_rows(xt, "training vectors")  # dtype and values, chunk by chunk
    xval = validation.as_finite_float32(xval, "validation vectors")  # read once
    if xt.ndim != 2 or xval.ndim != 2 or xt.shape[1] != xval.shape[1]:
        raise ValueError(f"training vectors {xt.shape} and validation vectors {xval.shape} must be 2-D "
                         f"with the same dimension")
    training.check_batch_size(cfg.batch_size, training.make_mesh(cfg.ngpu))  # fail before the RQ
    centroids = check_ivf_centroids(spec, ivf_centroids, xt.shape[1])
    # IVF: each batch's rows are assigned to their nearest centroid as they are read
    # (no array of len(xt) assignments; the RQ sample assigns its own rows)
    assign = None if centroids is None else rq_init.CentroidAssignment(centroids)
    resuming = will_resume(checkpoint_dir)
    if resuming:
        log(f"checkpoint {checkpoint_dir} exists: resuming, the RQ initialisation is not needed")
    if spec.is_qinco2:
        if resuming:  # the checkpoint replaces the codebooks: any of the right shape will do
            rq_codebooks = np.zeros((spec.M, spec.K, xt.shape[1]), np.float32)
        model, _ = qinco2_initial_model(xt, spec, cfg, xval=xval, ivf_centroids=centroids,
                                        rq_codebooks=rq_codebooks, log=log)
    else:
        if resuming:
            rq_codebooks = None
        elif rq_codebooks is None:
            rq_codebooks = train_rq_codebooks(xt, spec, xval, centroids, log=log)
        model = initial_model(xt, spec, rq_codebooks, centroids)
    log(f"model {model.config.describe()}")
    log(f"   nb trainable parameters {count_trainable(model)}")
    return training.fit(model, xt, xval, cfg, code0=assign, model_path=model_path,
                        checkpoint_dir=checkpoint_dir, history_path=history_path, log=log, monitor=monitor)
