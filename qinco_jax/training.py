"""QINCo training: the reference's loop, one compiled data-parallel step, resumable.

Semantics follow the reference (qinco_v1/train_qinco.py):

* every epoch visits the training vectors in the order of
  `np.random.RandomState(data_seed + epoch).permutation(n)` (data_seed = 123), in
  batches of `batch_size`; the last, smaller batch is kept (single-GPU reference);
* a batch's codes come from an encode without gradient; the loss is the sum over
  steps of the squared error of the partial reconstructions, divided by the number
  of vectors and by d;
* Adam (torch defaults = optax defaults), rebuilt at every epoch with the scheduler's
  learning rate unless `persistent_optimizer` (then moments and step count carry over
  and only the learning rate changes);
* after every epoch the validation MSE (raw units) feeds the Scheduler (lr / 10 after
  10 epochs without a new best, stop after 50 or when lr < 2e-6), and the best model
  is written, atomically, whenever it improves.
* IVF-QINCo: codebook0 (the IVF centroids) is frozen: it is not a trainable
  parameter and has no optimizer state; the first code of each training vector is its
  precomputed nearest centroid.

Data parallelism: the train step is one `jax.jit` over a 1-D mesh ("data") of devices.
The global batch is sharded along its rows, parameters and optimizer state are
replicated; the loss is the mean over the whole global batch, so XLA inserts the
gradient all-reduce and every device applies the same update. The partial last batch
is padded to the full shape with zero-weight rows, so a single compilation serves the
whole run and any number of devices computes the same update as one.

The learning rate is a traced argument (optax.inject_hyperparams): changing it never
recompiles.

Multi-host: call `jax.distributed.initialize()` before anything else (train_qinco.py
--distributed). Every process runs this same loop on the same data order, feeds its
own slice of each global batch (`jax.make_array_from_process_local_data`) and the mesh
spans the devices of all processes. Only process 0 writes the model and history.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qinco_jax import codec, validation
from qinco_jax import model as qm
from qinco_jax.config import EncodeOptions
from qinco_jax.io import write_bytes
from qinco_jax.model import AnyModel, QincoModel
from qinco_jax.scheduler import Scheduler

Params = dict[str, Any]
DATA_SEED = 123


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimization settings (reference defaults)."""

    lr: float = 1e-4
    max_epochs: int = 1000
    batch_size: int = 1024
    data_seed: int = DATA_SEED
    persistent_optimizer: bool = False
    # How training and validation vectors are encoded (beam, preselect, proxy; the
    # validation encode also uses dtype and batch_size). Default: the model's (greedy).
    encode: EncodeOptions = EncodeOptions()
    ngpu: int = -1         # devices per process: -1 all, 0 the CPU, N the first N
    progress: bool | None = None  # per-epoch bar; None: only when stderr is a terminal

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"learning rate must be a positive number, got {self.lr}")
        if self.max_epochs < 0:
            raise ValueError(f"max_epochs must be >= 0, got {self.max_epochs}")
        if not isinstance(self.encode, EncodeOptions):
            raise ValueError(f"encode must be an EncodeOptions, got {type(self.encode).__name__}")


# --------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------


def make_mesh(ngpu: int = -1) -> Mesh:
    """A 1-D ("data",) mesh: `ngpu` local devices of the default backend per process
    (-1: all of them; 0: one CPU device, the reference's --ngpu 0)."""
    if ngpu == 0:
        local = jax.local_devices(backend="cpu")[:1]
    else:
        local = jax.local_devices()
        if ngpu > len(local):
            raise ValueError(f"--ngpu {ngpu} asked, but this process sees only {len(local)} "
                             f"{local[0].platform} device(s)")
        if ngpu > 0:
            local = local[:ngpu]
    if jax.process_count() == 1:
        devices = local
    else:  # the same number of devices on every host, in process order
        n = len(local)
        devices = [d for p in range(jax.process_count())
                   for d in [d for d in jax.devices() if d.process_index == p][:n]]
    return Mesh(np.array(devices), ("data",))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    n = mesh.devices.size
    if batch_size % n:
        raise ValueError(f"batch size {batch_size} is not divisible by the number of devices ({n}): "
                         f"every device must get the same number of vectors")


# --------------------------------------------------------------------------------------
# The loss and the compiled step
# --------------------------------------------------------------------------------------


def split_trainable(params: Params, frozen_codebook0: bool) -> tuple[Params, Params]:
    """(trainable, frozen) parts: IVF centroids are frozen, as in the reference."""
    if frozen_codebook0:
        return {"steps": params["steps"]}, {"codebook0": params["codebook0"]}
    return dict(params), {}


def merge(trainable: Params, frozen: Params) -> Params:
    return {**frozen, **trainable}


def make_encode_fn(options: EncodeOptions | None = None) -> Callable:
    """(params, x, code0) -> codes: the no-gradient encode that picks training codes
    (options resolved: None fields take the v1 defaults, greedy over all K)."""
    opts = (options or EncodeOptions()).resolved(1, 0, "linear")

    def encode_fn(params, x, code0):
        codes, _ = qm.encode(params, x, code0, beam=opts.beam, preselect=opts.preselect, proxy=opts.proxy)
        return codes

    return encode_fn


def batch_loss(trainable: Params, frozen: Params, x: jax.Array, code0, weights: jax.Array,
               encode_fn: Callable) -> jax.Array:
    """Reference loss: sum over steps of the squared error of the partial
    reconstructions, averaged over the (non-padding) vectors and divided by d."""
    params = merge(trainable, frozen)
    codes = jax.lax.stop_gradient(encode_fn(jax.lax.stop_gradient(params), x, code0))
    xhats = qm.decode_steps(params, codes)  # (W, B, d)
    per_vector = jnp.sum((xhats - x[None]) ** 2, axis=(0, 2))
    return jnp.sum(per_vector * weights) / (jnp.sum(weights) * x.shape[1])


def make_optimizer() -> optax.GradientTransformation:
    # torch.optim.Adam defaults: betas (0.9, 0.999), eps 1e-8 outside the sqrt.
    return optax.inject_hyperparams(optax.adam)(learning_rate=0.0)


def make_train_step(encode_fn: Callable, optimizer: optax.GradientTransformation, mesh: Mesh):
    """Jitted `(trainable, opt_state, frozen, x, code0, weights, lr) -> (trainable,
    opt_state, loss)`. x/code0/weights are sharded along rows over `mesh`, everything
    else replicated."""
    replicated = NamedSharding(mesh, P())

    def step(trainable, opt_state, frozen, x, code0, weights, lr):
        loss, grads = jax.value_and_grad(batch_loss)(trainable, frozen, x, code0, weights, encode_fn)
        hyper = dict(opt_state.hyperparams)
        hyper["learning_rate"] = jnp.asarray(lr, jnp.float32)
        opt_state = opt_state._replace(hyperparams=hyper)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return jax.jit(step, out_shardings=(replicated, replicated, replicated))


# --------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------


def epoch_batches(n: int, batch_size: int, epoch: int, data_seed: int = DATA_SEED) -> list[np.ndarray]:
    """The reference's data order for one epoch."""
    perm = np.random.RandomState(epoch + data_seed).permutation(n)
    return [perm[i0:i0 + batch_size] for i0 in range(0, n, batch_size)]


class BatchFeeder:
    """Gathers, scales, pads and places batches on the mesh. In multi-process runs
    each process reads only its own rows of the global batch."""

    def __init__(self, xt: np.ndarray, code0: np.ndarray | None, db_scale: float, batch_size: int, mesh: Mesh):
        self.xt, self.code0 = xt, code0
        self.scale = np.float32(db_scale)
        self.bs = batch_size
        self.sharding = NamedSharding(mesh, P("data"))
        nproc = jax.process_count()
        if batch_size % nproc:
            raise ValueError(f"batch size {batch_size} is not divisible by the number of processes ({nproc})")
        per = batch_size // nproc
        self.rows = slice(jax.process_index() * per, (jax.process_index() + 1) * per)

    def _put(self, local: np.ndarray, global_shape):
        return jax.make_array_from_process_local_data(self.sharding, local, global_shape)

    def __call__(self, idx: np.ndarray):
        weights = np.zeros(self.bs, np.float32)
        weights[:len(idx)] = 1
        idx = np.concatenate([idx, np.zeros(self.bs - len(idx), idx.dtype)])[self.rows]
        weights = weights[self.rows]
        x = np.asarray(self.xt[idx], np.float32) / self.scale
        d = x.shape[1]
        xb = self._put(x, (self.bs, d))
        wb = self._put(weights, (self.bs,))
        cb = None if self.code0 is None else self._put(self.code0[idx].astype(np.int32), (self.bs,))
        return xb, cb, wb


def prefetched(feeder: BatchFeeder, batches: list[np.ndarray]):
    """Yield placed batches; batch i+1 is gathered and copied while the device runs
    the (asynchronously dispatched) step on batch i."""
    if not batches:
        return
    nxt = feeder(batches[0])
    for i in range(len(batches)):
        yield nxt  # the consumer dispatches its (asynchronous) step on it ...
        if i + 1 < len(batches):
            nxt = feeder(batches[i + 1])  # ... while we gather the next one


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


def local_copy(tree):
    """One device's copy of a replicated pytree (works in multi-process runs too)."""
    return jax.tree.map(lambda a: a.addressable_data(0) if isinstance(a, jax.Array) else a, tree)


def validation_mse(model: AnyModel, xval: np.ndarray, options: EncodeOptions | None = None) -> float:
    """Mean squared reconstruction error of xval (raw units)."""
    _, err = codec.encode(model, xval, options, return_errors=True)
    return float(np.mean(err, dtype=np.float64))


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------


class TrainCheckpointer:
    """Orbax CheckpointManager over a directory: one checkpoint per finished epoch
    holding the arrays (trainable params, optimizer state, best params) and a JSON
    part (epoch, scheduler, history, run description). Orbax writes each checkpoint
    to a temporary directory and renames it, so a kill leaves the previous one."""

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 2):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.mngr = ocp.CheckpointManager(
            os.path.abspath(directory),
            # Synchronous: once an epoch's log line is out, its checkpoint is on disk
            # (a checkpoint is small next to an epoch's work).
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                 enable_async_checkpointing=False))

    def latest_epoch(self) -> int | None:
        return self.mngr.latest_step()

    def save(self, epoch: int, arrays: dict, meta: dict) -> None:
        ocp = self._ocp
        self.mngr.save(epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(arrays),
                                                      meta=ocp.args.JsonSave(meta)))

    def restore_meta(self, epoch: int) -> dict:
        """The JSON part alone: read first, to check the run before restoring arrays."""
        return self.mngr.restore(epoch, args=self._ocp.args.Composite(meta=self._ocp.args.JsonRestore()))["meta"]

    def restore(self, epoch: int, target: dict) -> tuple[dict, dict]:
        ocp = self._ocp
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        out = self.mngr.restore(epoch, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                               meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def close(self) -> None:
        self.mngr.wait_until_finished()
        self.mngr.close()


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainResult:
    best: QincoModel       # the model with the lowest validation MSE (or the initial one)
    last: QincoModel       # the model after the last epoch run
    history: dict


def _default_log(msg: str) -> None:
    print(msg, flush=True)


def _save_json(path: str, obj) -> None:
    write_bytes(path, json.dumps(obj, indent=1).encode())


def fit(model: QincoModel, xt: np.ndarray, xval: np.ndarray, cfg: TrainConfig, *,
        code0: np.ndarray | None = None, model_path: str | None = None,
        checkpoint_dir: str | None = None, history_path: str | None = None,
        save_fn: Callable[[QincoModel, str], None] | None = None,
        log: Callable[[str], None] | None = None) -> TrainResult:
    """Train `model` (initialised, e.g. from an RQ) on raw vectors xt, validating on xval.

    code0: IVF-QINCo only, the nearest IVF centroid of every training vector.
    model_path: where the best model is written whenever validation improves
      (save_fn(model, path), by default qinco_jax.checkpoint.save_model).
    checkpoint_dir: resume from / save to this orbax directory every epoch.
    history_path: JSON history, rewritten every epoch."""
    is_main = jax.process_index() == 0
    log = (log or _default_log) if is_main else (lambda msg: None)
    config = model.config
    xt, xval = np.asarray(xt), np.asarray(xval)  # a memmap stays a view: no copy
    if xt.ndim != 2 or xt.shape[1] != config.d:
        raise ValueError(f"training vectors have shape {xt.shape}, the model needs dimension {config.d}")
    if len(xt) == 0:
        raise ValueError("no training vectors")
    validation.check_all_finite(xt, "training vectors")
    validation.check_all_finite(xval, "validation vectors")
    if xval.ndim != 2 or xval.shape[1] != config.d or len(xval) == 0:
        raise ValueError(f"validation vectors have shape {xval.shape}, the model needs (n >= 1, {config.d})")
    if config.is_ivf:
        if code0 is None:
            raise ValueError("IVF-QINCo training needs the IVF assignment (code0) of the training vectors")
        code0 = np.asarray(code0).reshape(-1)
        if len(code0) != len(xt):
            raise ValueError(f"code0 has {len(code0)} entries for {len(xt)} training vectors")
    elif code0 is not None:
        raise ValueError("code0 applies to IVF-QINCo training only")
    if save_fn is None and model_path:
        from qinco_jax.checkpoint import save_model as save_fn  # noqa: N813

    mesh = make_mesh(cfg.ngpu)
    check_batch_size(cfg.batch_size, mesh)
    replicated = NamedSharding(mesh, P())
    n_dev = mesh.devices.size
    log(f"training {config.describe()} on {len(xt)} vectors, validation {len(xval)}, "
        f"{n_dev} device(s) ({mesh.devices.flat[0].platform}), global batch {cfg.batch_size}")

    optimizer = make_optimizer()
    encode_options = codec.resolve_options(model, cfg.encode)
    encode_fn = make_encode_fn(encode_options)
    train_step = make_train_step(encode_fn, optimizer, mesh)
    trainable, frozen = split_trainable(model.params, config.is_ivf)
    trainable = jax.device_put(trainable, replicated)
    frozen = jax.device_put(frozen, replicated)
    opt_state = jax.device_put(optimizer.init(trainable), replicated)
    feeder = BatchFeeder(xt, code0, config.db_scale, cfg.batch_size, mesh)

    def as_model(tr) -> QincoModel:
        return QincoModel(config, local_copy(merge(tr, frozen)))

    def val_mse(tr) -> float:
        return validation_mse(as_model(tr), xval, encode_options)

    run_info = {"model": config.describe(), "db_scale": config.db_scale, "nt": int(len(xt)),
                "nval": int(len(xval)), "train": dataclasses.asdict(cfg),
                "devices": n_dev}
    ckpt = TrainCheckpointer(checkpoint_dir) if checkpoint_dir else None
    best_trainable = trainable
    start_epoch = 0
    scheduler = Scheduler(cfg.lr)
    history: dict = {"run": run_info, "before": None, "epochs": []}

    if ckpt is not None and ckpt.latest_epoch() is not None:
        last = ckpt.latest_epoch()
        meta = ckpt.restore_meta(last)
        if meta["run"]["model"] != run_info["model"] or meta["run"]["nt"] != run_info["nt"]:
            raise ValueError(f"checkpoint {checkpoint_dir} is of another run ({meta['run']['model']}, "
                             f"nt={meta['run']['nt']}), not of this one ({run_info['model']}, "
                             f"nt={run_info['nt']}); use another --checkpoint directory or delete it")
        target = {"params": trainable, "opt_state": opt_state, "best_params": trainable}
        arrays, meta = ckpt.restore(last, target)
        trainable = jax.device_put(arrays["params"], replicated)
        opt_state = jax.device_put(arrays["opt_state"], replicated)
        best_trainable = jax.device_put(arrays["best_params"], replicated)
        scheduler = Scheduler.from_state_dict(meta["scheduler"])
        history = meta["history"]
        start_epoch = int(meta["epoch"]) + 1
        log(f"resuming from checkpoint {checkpoint_dir} after epoch {meta['epoch']} (lr={scheduler.lr:g})")
    else:
        mse0 = val_mse(trainable)
        history["before"] = mse0
        log(f"before optimization: val MSE={mse0:g}")

    show_bar = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
    t_start = time.time()
    epoch = start_epoch
    while epoch < cfg.max_epochs and not scheduler.should_stop():
        lr = scheduler.lr
        t0 = time.time()
        if not cfg.persistent_optimizer:
            opt_state = jax.device_put(optimizer.init(trainable), replicated)
        batches = epoch_batches(len(xt), cfg.batch_size, epoch, cfg.data_seed)
        bar = None
        if show_bar and is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(batches), desc=f"epoch {epoch}", unit="batch", leave=False)
        losses = []
        for i, (xb, cb, wb) in enumerate(prefetched(feeder, batches)):
            trainable, opt_state, loss = train_step(trainable, opt_state, frozen, xb, cb, wb, lr)
            losses.append(loss)
            if bar is not None:
                bar.update(1)
                if i % 10 == 0 and i:
                    bar.set_postfix(loss=f"{float(losses[-2]):.4g}")  # previous step: no stall
        train_loss = float(np.mean(jax.device_get(losses), dtype=np.float64))  # one transfer per epoch
        if bar is not None:
            bar.close()
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"training diverged at epoch {epoch} (loss {train_loss}); "
                                     f"try a lower --lr")
        mse = val_mse(trainable)
        decision = scheduler.append_loss(mse)
        seconds = time.time() - t0
        if decision.is_best:
            best_trainable = trainable
        history["epochs"].append({"epoch": epoch, "train_loss": train_loss, "val_mse": mse, "lr": lr,
                                  "seconds": seconds, "best": decision.is_best})
        log(f"epoch {epoch} train loss {train_loss:g} val MSE {mse:g} lr {lr:g} {seconds:.1f} s"
            + (" (best)" if decision.is_best else ""))
        if decision.is_best and model_path and is_main:
            save_fn(as_model(trainable), model_path)
        if decision.reduced_lr:
            log(f"val MSE did not improve for 10 epochs: lr -> {scheduler.lr:g}")
        if scheduler.should_stop():
            log("stopping: no improvement for too long or lr too small")
        if history_path and is_main:
            _save_json(history_path, history)
        if ckpt is not None:
            ckpt.save(epoch, {"params": trainable, "opt_state": opt_state, "best_params": best_trainable},
                      {"epoch": epoch, "scheduler": scheduler.state_dict(), "history": history, "run": run_info})
        epoch += 1
    if ckpt is not None:
        ckpt.close()
    if history_path and is_main:
        _save_json(history_path, history)
    log(f"training done in {time.time() - t_start:.1f} s, best val MSE "
        f"{min([e['val_mse'] for e in history['epochs']], default=history['before'])}")
    return TrainResult(best=as_model(best_trainable), last=as_model(trainable), history=history)
