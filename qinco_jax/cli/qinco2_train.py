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

    run.py task=train model=trained.pt output=new.pt trainset=xt.npy [ds.valset=...]

continues a trained QINCo2 model (the reference's files or ours): its architecture,
normalisation and IVF centroids come from the file (model keys given on the command
line must agree with it), there is no RQ initialisation, the schedule (data order,
learning rate, epoch limit) continues at the epoch after the file's last (the
reference's files record it; ours start at 0), and the optimizer starts afresh
(training.finetune.continue_training); a cosine schedule already over is an error.
`batch` is per device, as the reference's is per GPU.

`optimizer=adam|adamw`, `scheduler.name=cosine|reduce_lr_plateau` (with
scheduler.reduce_fact / patience / threshold_frac / lr_min_fact; its state is
checkpointed, so resume=true keeps it) and `grad_accumulate=N` (the mean gradient of N
batches makes one optimizer update; the rate of an update is its last batch's) are the
reference's knobs; `model_args=qinco1` (Adam, reduce-on-plateau, no ds.loop looping)
uses them.
"""

from __future__ import annotations

import os
import shutil

import numpy as np

from qinco_jax.cli import run_config
from qinco_jax.cli.qinco2_tasks import read_ivf_centroids, split_training_file
from qinco_jax.cli.run_config import RunConfig, RunConfigError


def _training_vectors(cfg: RunConfig) -> tuple[np.ndarray, np.ndarray]:
    xt, xval = split_training_file(cfg)
    # the training rows stay on disk (read batch by batch), the validation rows are read once
    return xt, np.asarray(xval, np.float32)


def _ivf_centroids(cfg: RunConfig, d: int) -> np.ndarray | None:
    if not cfg.ivf_centroids:
        return None
    c = read_ivf_centroids(cfg, d)
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


def train_config(cfg: RunConfig, n_devices: int = 1):
    """The training.TrainConfig the run's keys describe (QINCo2's recipe: optimizer=,
    scheduler.*, grad_accumulate=; the qinco1 preset's Adam and reduce-on-plateau). `batch`
    is per device, as in the reference: the global batch is batch x n_devices (the
    training mesh's devices, over all processes)."""
    from qinco_jax.training.loop import qinco2_train_config

    if cfg.grad_accumulate < 1:
        raise RunConfigError(f"grad_accumulate={cfg.grad_accumulate}: must be >= 1 (batches per optimizer update)")
    sc = cfg.scheduler
    plateau = sc.name == "reduce_lr_plateau"
    # the cosine run's length; reduce-on-plateau has none (stop_patience ends it)
    max_epochs = cfg.epochs + sc.stop_patience + 1 if not plateau else 1_000_000
    ngpu = 0 if cfg.cpu else -1
    try:
        return qinco2_train_config(
            lr=cfg.lr, weight_decay=cfg.wd, grad_clip=cfg.grad_clip, batch_size=cfg.batch * n_devices,
            epochs=cfg.epochs,
            ramp_epochs=cfg.scheduler.ramp_epochs, lr_min_fact=cfg.scheduler.lr_min_fact,
            stop_patience=cfg.scheduler.stop_patience, codebook_noise=cfg.codebook_noise_init, seed=cfg.seed,
            # The reference does not loop in qinco1_mode: every epoch is the whole set.
            epoch_size=None if cfg.qinco1_mode else cfg.ds.loop, ngpu=ngpu,
            dtype=run_config.PRECISIONS[cfg.precision], optimizer=cfg.optimizer.lower(), scheduler=sc.name,
            reduce_fact=sc.reduce_fact, patience=sc.patience, threshold_frac=sc.threshold_frac,
            grad_accumulate=cfg.grad_accumulate, max_epochs=max_epochs)
    except ValueError as e:
        raise RunConfigError(str(e)) from None


def train(cfg: RunConfig, log=print):
    """task=train: returns the training.TrainResult."""
    from qinco_jax.training import finetune, recipe

    run_config.check_task(cfg)
    if not cfg.output:
        raise RunConfigError("task=train needs output=<file.pt>")
    if cfg.model is not None and os.path.abspath(cfg.model) == os.path.abspath(cfg.output):
        raise RunConfigError(f"model={cfg.model} and output= are the same file: training writes output=, "
                             "give another name (or resume=true without model= to continue a run)")
    import jax

    from qinco_jax import distributed
    from qinco_jax.training.loop import make_mesh
    from qinco_jax.training.streaming import check_training_rows

    try:  # several processes (a launcher's variables): one mesh over all their devices
        distributed.start()
    except ValueError as e:
        raise RunConfigError(str(e)) from None
    n_devices = make_mesh(0 if cfg.cpu else -1).devices.size
    # everything is checked before the (long) data reading and training start
    start, start_epoch = _trained_model(cfg, log) if cfg.model is not None else (None, 0)
    spec = model_spec(cfg) if start is None else None
    tcfg = train_config(cfg, n_devices)
    if start_epoch >= tcfg.max_epochs:
        raise RunConfigError(f"model={cfg.model} stopped after epoch {start_epoch - 1}: its schedule (epochs="
                             f"{cfg.epochs} + scheduler.stop_patience={cfg.scheduler.stop_patience} + 1) is "
                             "over, nothing to train; give a larger epochs=")
    _check_tensorboard(cfg)
    if n_devices > 1:
        log(f"{n_devices} devices over {jax.process_count()} process(es): global batch "
            f"{tcfg.batch_size} = batch {cfg.batch} x {n_devices}")
    xt, xval = _training_vectors(cfg)
    try:
        check_training_rows(len(xt) + len(xval), len(xval), tcfg.batch_size, run_config.resolve_data(cfg).trainset)
    except ValueError as e:
        raise RunConfigError(str(e)) from None
    centroids = _ivf_centroids(cfg, xt.shape[1]) if start is None else None
    checkpoint_dir = cfg.output + ".checkpoint"
    if not cfg.resume and os.path.isdir(checkpoint_dir):
        log(f"resume=false: starting over, removing the old checkpoint {checkpoint_dir}")
        shutil.rmtree(checkpoint_dir)
    log(f"training on {len(xt)} vectors, validating on {len(xval)}")
    paths = dict(model_path=cfg.output, checkpoint_dir=checkpoint_dir, history_path=cfg.output + ".history.json")
    if start is not None and xt.shape[1] != start.d:
        raise RunConfigError(f"trainset vectors have dimension {xt.shape[1]}, model={cfg.model} needs {start.d}")
    with _monitor(cfg) as monitor:
        if start is not None:
            return finetune.continue_training(start, xt, xval, tcfg, log=log, monitor=monitor,
                                              start_epoch=start_epoch, **paths)
        return recipe.train_model(xt, xval, spec, tcfg, ivf_centroids=centroids, log=log, monitor=monitor, **paths)


def _trained_model(cfg: RunConfig, log):
    """(the QINCo2 model of model= to train further, the epoch its schedule continues
    at: the file's `epoch`, the number of epochs it completed, or 0), the model checked
    against the model keys the command line gives (qinco2_tasks.load_model: a
    different M, K, L, dh, de, ivf_K is an error naming the key)."""
    from qinco_jax.cli.qinco2_tasks import load_model
    from qinco_jax.formats.torch_pickle import CheckpointError

    try:
        model = load_model(cfg, log)
    except CheckpointError as e:
        raise RunConfigError(f"model={cfg.model} is not a QINCo2 checkpoint: {e}") from None
    if not model.config.is_qinco2:
        raise RunConfigError(f"model={cfg.model} is a {model.describe()}, not a QINCo2 model: task=train "
                             "continues QINCo2 models (train_qinco.py trains QINCo v1)")
    for key, of_model in (("A", model.config.A), ("B", model.config.B)):
        given = getattr(cfg, key)
        if given is not None and given != of_model:
            raise RunConfigError(f"{key}={given} given, but model={cfg.model} was trained with {key}={of_model}: "
                                 "continuing a model keeps its architecture")
    epoch = 0
    if str(cfg.model).endswith(".pt"):
        from qinco_jax.formats.torch_pickle import load_pt

        root = load_pt(cfg.model)
        saved = root.get("epoch") if isinstance(root, dict) else None
        if saved is not None:  # the reference's files record it (completed epochs); ours (no training state) hold None
            if not isinstance(saved, int) or isinstance(saved, bool) or saved < 0:
                raise RunConfigError(f"model={cfg.model} records epoch={saved!r}, not a number of epochs")
            epoch = saved
            log(f"model={cfg.model} stopped after epoch {epoch - 1}: training continues at epoch {epoch}")
    return model, epoch


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
