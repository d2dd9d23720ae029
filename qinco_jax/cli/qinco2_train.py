"""QINCo2's `run.py` tasks `train` and `eval_valset` (dispatched by qinco_jax/cli/run.py).

    run.py task=train model_args=qinco2-S trainset=xt.npy ds.valset=10000 output=model.pt
    run.py task=eval_valset model=model.pt trainset=xt.npy ds.valset=10000

`train` trains with QINCo2's recipe (recipe.train_model on a QINCo2 ModelSpec, see
training.qinco2_train_config): the last `ds.valset` rows of the training file validate,
at most `ds.trainset` of the others train, `ds.loop` samples per epoch. The best model
is written to `output` (`.pt`: QINCo2's format) each time validation improves; the full
training state is checkpointed after every epoch in `<output>.checkpoint/`, and
`resume=true` continues from it (without `resume`, an old checkpoint there is replaced).
The history goes to `<output>.history.json`; `tensorboard=<dir>` also writes TensorBoard
event files there (training.monitor). `precision=bf16` trains in mixed precision.
"""

from __future__ import annotations

import os
import shutil

import numpy as np

from qinco_jax.cli import run_config
from qinco_jax.cli.run_config import RunConfig, RunConfigError


def _training_vectors(cfg: RunConfig) -> tuple[np.ndarray, np.ndarray]:
    from qinco_jax.training import qinco2_recipe as q2
    from qinco_jax.formats.vecs_io import read_vectors

    path = run_config.resolve_data(cfg).trainset
    x = read_vectors(path, mmap=True)
    if x.ndim != 2:
        raise RunConfigError(f"trainset={path}: expected a 2-D array of vectors, got shape {x.shape}")
    try:
        xt, xval = q2.split_validation(x, cfg.ds.valset, cfg.ds.trainset)
    except ValueError as e:
        raise RunConfigError(f"trainset={path}: {e}") from None
    return np.asarray(xt, np.float32), np.asarray(xval, np.float32)


def _ivf_centroids(cfg: RunConfig, d: int) -> np.ndarray | None:
    if not cfg.ivf_centroids:
        return None
    from qinco_jax.formats.vecs_io import read_vectors

    c = np.asarray(read_vectors(cfg.ivf_centroids, mmap=False), np.float32)
    if c.ndim != 2 or c.shape[1] != d:
        raise RunConfigError(f"ivf_centroids={cfg.ivf_centroids} has shape {c.shape}: its dimension must be "
                             f"the training vectors' d={d}")
    if cfg.ivf_K is not None and cfg.ivf_K != len(c):
        raise RunConfigError(f"ivf_K={cfg.ivf_K} but ivf_centroids={cfg.ivf_centroids} holds {len(c)} centroids")
    return c


def model_spec(cfg: RunConfig):
    """The recipe.ModelSpec the run's keys describe."""
    from qinco_jax.training.recipe import ModelSpec

    missing = [k for k in ("M", "K", "L", "dh", "A", "B") if getattr(cfg, k) is None]
    if missing:
        raise RunConfigError(f"task=train needs {', '.join(f'{k}=...' for k in missing)} (or model_args=...)")
    try:
        return ModelSpec(M=cfg.M, K=cfg.K, L=cfg.L, h=cfg.dh, variant="ivf" if cfg.ivf_centroids else "qinco",
                         seed=cfg.seed, arch="qinco2", de=cfg.de or 0, A=cfg.A, B=cfg.B,
                         qinco1_mode=bool(cfg.qinco1_mode))
    except ValueError as e:
        raise RunConfigError(str(e)) from None


def train_config(cfg: RunConfig):
    """The training.TrainConfig the run's keys describe (QINCo2's cosine recipe)."""
    from qinco_jax.training.loop import qinco2_train_config

    if cfg.optimizer != "adamw" or cfg.scheduler.name != "cosine":
        raise RunConfigError(f"optimizer={cfg.optimizer} scheduler.name={cfg.scheduler.name}: only QINCo2's "
                             "recipe (optimizer=adamw, scheduler.name=cosine) is implemented for task=train")
    if cfg.grad_accumulate != 1:
        raise RunConfigError(f"grad_accumulate={cfg.grad_accumulate}: only 1 is implemented")
    try:
        return qinco2_train_config(
            lr=cfg.lr, weight_decay=cfg.wd, grad_clip=cfg.grad_clip, batch_size=cfg.batch, epochs=cfg.epochs,
            ramp_epochs=cfg.scheduler.ramp_epochs, lr_min_fact=cfg.scheduler.lr_min_fact,
            stop_patience=cfg.scheduler.stop_patience, codebook_noise=cfg.codebook_noise_init, seed=cfg.seed,
            # The reference does not loop in qinco1_mode: every epoch is the whole set.
            epoch_size=None if cfg.qinco1_mode else cfg.ds.loop, ngpu=0 if cfg.cpu else -1,
            dtype=run_config.PRECISIONS[cfg.precision])
    except ValueError as e:
        raise RunConfigError(str(e)) from None


def train(cfg: RunConfig, log=print):
    """task=train: returns the training.TrainResult."""
    from qinco_jax.training import recipe

    run_config.check_task(cfg)
    if cfg.model is not None:
        raise RunConfigError("task=train from model=<file> is not implemented: use resume=true with the same "
                             "output= to continue an interrupted run")
    if not cfg.output:
        raise RunConfigError("task=train needs output=<file.pt>")
    spec, tcfg = model_spec(cfg), train_config(cfg)
    _check_tensorboard(cfg)  # before any work
    xt, xval = _training_vectors(cfg)
    centroids = _ivf_centroids(cfg, xt.shape[1])
    checkpoint_dir = cfg.output + ".checkpoint"
    if not cfg.resume and os.path.isdir(checkpoint_dir):
        log(f"resume=false: starting over, removing the old checkpoint {checkpoint_dir}")
        shutil.rmtree(checkpoint_dir)
    log(f"training on {len(xt)} vectors, validating on {len(xval)}")
    with _monitor(cfg) as monitor:
        return recipe.train_model(xt, xval, spec, tcfg, ivf_centroids=centroids, model_path=cfg.output,
                                  checkpoint_dir=checkpoint_dir, history_path=cfg.output + ".history.json",
                                  log=log, monitor=monitor)


def _check_tensorboard(cfg: RunConfig) -> None:
    """tensorboard=<dir> must be a directory we can write (created if missing)."""
    from qinco_jax.training.monitor import check_writable_dir

    if cfg.tensorboard is not None:
        try:
            check_writable_dir(cfg.tensorboard)
        except ValueError as e:
            raise RunConfigError(f"tensorboard={cfg.tensorboard}: {e}") from None


def _monitor(cfg: RunConfig):
    """tensorboard=<dir>: a TensorBoardMonitor writing there; else a NullMonitor."""
    from qinco_jax.training import monitor

    return monitor.TensorBoardMonitor(cfg.tensorboard) if cfg.tensorboard else monitor.NullMonitor()


def eval_valset(cfg: RunConfig, log=print) -> float:
    """task=eval_valset: the model's MSE on the last ds.valset rows of the training file
    (raw units x mse_scale), encoding with the model's own A and B unless A= / B= are
    given. Returns the MSE."""
    from qinco_jax.formats import checkpoint
    from qinco_jax.training import loop as training
    from qinco_jax.config import EncodeOptions

    run_config.check_task(cfg)
    model = checkpoint.load_model(cfg.model)
    _, xval = _training_vectors(cfg)
    if xval.shape[1] != model.d:
        raise RunConfigError(f"trainset vectors have dimension {xval.shape[1]}, model={cfg.model} needs {model.d}")
    options = EncodeOptions(beam=cfg.B, preselect=cfg.A)
    mse = training.validation_mse(model, xval, options) * run_config.resolve_data(cfg).mse_scale
    log(f"{model.describe()}: validation MSE {mse:g} on {len(xval)} vectors")
    return mse
