"""Training a trained model further: QINCo2's `run.py task=train model=<file>`.

The model file gives the architecture, the normalisation and the IVF centroids; there is
no RQ initialisation. The schedule starts at `start_epoch` (the reference's files record
the epoch after their last: its data order and learning rate continue from there); the
optimizer state starts afresh (our files carry none; the reference's is not read)."""

from __future__ import annotations

from typing import Callable

import numpy as np

from qinco_jax.data import validation
from qinco_jax.logs import quiet
from qinco_jax.models.qinco import QincoModel
from qinco_jax.training import loop as training
from qinco_jax.training import rq_init, streaming


def continue_training(model: QincoModel, xt: np.ndarray, xval: np.ndarray, cfg: training.TrainConfig, *,
                      model_path: str | None = None, checkpoint_dir: str | None = None,
                      history_path: str | None = None, log: Callable[[str], None] = quiet,
                      monitor=None, start_epoch: int = 0) -> training.TrainResult:
    """Train an already trained model further (QINCo2's `task=train model=<file>`: its
    architecture, normalisation and IVF centroids are the file's; no RQ
    initialisation). The schedule starts at start_epoch, the optimizer afresh; see
    training.fit for the paths, monitor and start_epoch."""
    xt = streaming.as_rows(xt)  # a memory map stays on disk: read in batches, converted to float32 per batch
    streaming.check_rows(xt, "training vectors")  # dtype and values, chunk by chunk
    xval = validation.as_finite_float32(xval, "validation vectors")  # read once
    if xt.ndim != 2 or xt.shape[1] != model.d or xval.ndim != 2 or xval.shape[1] != model.d:
        raise ValueError(f"training vectors {xt.shape} and validation vectors {xval.shape} must be (n, {model.d}) "
                         f"for the model ({model.describe()})")
    training.check_batch_size(cfg.batch_size, training.make_mesh(cfg.ngpu))
    assign = None
    if model.config.is_ivf:
        centroids = model.denormalise(np.asarray(model.params["codebook0"], np.float32))
        assign = rq_init.CentroidAssignment(centroids)  # each batch's rows, as they are read
    log(f"continuing the training of {model.config.describe()}")
    return training.fit(model, xt, xval, cfg, code0=assign, model_path=model_path,
                        checkpoint_dir=checkpoint_dir, history_path=history_path, log=log, monitor=monitor,
                        start_epoch=start_epoch)
