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

QINCo2 models train with QINCo2's recipe instead (qinco2_recipe; `qinco2_train_config`
gives its defaults): AdamW with gradients clipped by value, the rate set per batch by a
linear ramp then a cosine, epochs of `epoch_size` samples cycling through a fixed
shuffled order, a loss adding each step's substep-codebook error, codes from an encode
with the model's own A and B, running target statistics (frozen, outside the gradient
like the normalisation) that re-draw the codewords an epoch did not use, after the best
model is written. `dtype="bfloat16"` runs that network in bfloat16 on float32 weights.

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

from qinco_jax.models import codec
from qinco_jax.data import validation
from qinco_jax.training import qinco2_recipe as q2
from qinco_jax.models import qinco as qm
from qinco_jax.config import EncodeOptions
from qinco_jax.formats.io import write_bytes
from qinco_jax.models.qinco import AnyModel, QincoModel
from qinco_jax.training.scheduler import Scheduler

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
    # QINCo2's recipe (used when the model is a QINCo2 model; see qinco2_train_config):
    weight_decay: float = 0.1      # AdamW's (decoupled)
    grad_clip: float = 0.1         # clip each gradient value to [-grad_clip, grad_clip]; 0: none
    epochs: int = 60               # cosine length after the ramp (the reference's `epochs`)
    ramp_epochs: float = 3         # linear warm-up epochs of the cosine schedule
    lr_min_fact: float = 1e-3
    stop_patience: int = 10        # stop after this many epochs without a new best
    epoch_size: int | None = None  # samples per epoch (the reference's ds.loop); None: all
    codebook_noise: float = 0.1    # noise on the RQ codebooks, relative to their std
    seed: int = 0                  # data order, codebook noise and codeword resets
    dtype: str = "float32"         # "bfloat16": mixed precision (float32 master weights)

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.epoch_size is not None and self.epoch_size < 1:
            raise ValueError(f"epoch_size must be >= 1 (or None: the whole training set), got {self.epoch_size}")
        if not (self.weight_decay >= 0 and self.grad_clip >= 0 and self.codebook_noise >= 0):
            raise ValueError(f"weight_decay, grad_clip and codebook_noise must be >= 0, got "
                             f"{self.weight_decay}, {self.grad_clip}, {self.codebook_noise}")
        if self.stop_patience < 0 or self.epochs < 1 or self.ramp_epochs < 0:
            raise ValueError(f"need stop_patience >= 0, epochs >= 1 and ramp_epochs >= 0, got "
                             f"{self.stop_patience}, {self.epochs}, {self.ramp_epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"learning rate must be a positive number, got {self.lr}")
        if self.max_epochs < 0:
            raise ValueError(f"max_epochs must be >= 0, got {self.max_epochs}")
        if not isinstance(self.encode, EncodeOptions):
            raise ValueError(f"encode must be an EncodeOptions, got {type(self.encode).__name__}")


def qinco2_train_config(**overrides) -> TrainConfig:
    """QINCo2's recipe defaults (its config/qinco_cfg.yaml): AdamW lr 8e-4, weight decay
    0.1, gradients clipped by value at 0.1, 3 ramp epochs then a cosine over `epochs`
    = 60, stop after 10 epochs without improvement, batch 1024, codebook noise 0.1;
    `overrides` replace any field."""
    base = dict(lr=8e-4, weight_decay=0.1, grad_clip=0.1, epochs=60, ramp_epochs=3, lr_min_fact=1e-3,
                stop_patience=10, batch_size=1024, codebook_noise=0.1, persistent_optimizer=True)
    base.update(overrides)
    if "max_epochs" not in overrides:  # the reference's cosine run length
        base["max_epochs"] = base["epochs"] + base["stop_patience"] + 1
    return TrainConfig(**base)


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


def make_encode_fn(options: EncodeOptions | None = None, outer_skip: bool = False) -> Callable:
    """(params, x, code0) -> codes: the no-gradient encode that picks training codes
    (options resolved: None fields take the v1 defaults, greedy over all K)."""
    opts = (options or EncodeOptions()).resolved(1, 0, "linear")

    def encode_fn(params, x, code0):
        codes, _ = qm.encode(params, x, code0, beam=opts.beam, preselect=opts.preselect, proxy=opts.proxy,
                             outer_skip=outer_skip)
        return codes

    return encode_fn


def _cast(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def batch_loss(trainable: Params, frozen: Params, x: jax.Array, code0, weights: jax.Array,
               encode_fn: Callable) -> tuple[jax.Array, tuple[Params, jax.Array]]:
    """Reference loss: sum over steps of the squared error of the partial
    reconstructions, averaged over the (non-padding) vectors and divided by d.
    Returns (loss, (frozen, usage)) as qinco2_batch_loss does; v1 changes neither."""
    params = merge(trainable, frozen)
    codes = jax.lax.stop_gradient(encode_fn(jax.lax.stop_gradient(params), x, code0))
    xhats = qm.decode_steps(params, codes)  # (W, B, d)
    per_vector = jnp.sum((xhats - x[None]) ** 2, axis=(0, 2))
    loss = jnp.sum(per_vector * weights) / (jnp.sum(weights) * x.shape[1])
    return loss, (frozen, jnp.zeros((), jnp.int32))


def qinco2_batch_loss(trainable: Params, frozen: Params, x: jax.Array, code0, weights: jax.Array,
                      encode_fn: Callable, *, is_ivf: bool, K: int, outer_skip: bool = True,
                      dtype=jnp.float32):
    """QINCo2's loss (qinco2_recipe.model_losses: step MSEs + substep losses, model
    units) of codes from a no-gradient encode with the model's own A and B. Also returns
    the frozen part with the running target statistics updated, and the batch's
    codeword usage (M, K). dtype bfloat16: the network runs in bfloat16 on float32
    master weights (the cast is inside the gradient), losses are summed in float32."""
    params = _cast(merge(trainable, frozen), dtype)
    xc = x.astype(dtype)
    codes = jax.lax.stop_gradient(encode_fn(jax.lax.stop_gradient(params), xc, code0))
    mse, sub, xhats = q2.model_losses(params, xc, codes, weights, outer_skip=outer_skip, is_ivf=is_ivf)
    stats = frozen["xtarget_stats"]
    new_frozen = dict(frozen)
    new_frozen["xtarget_stats"] = q2.update_model_target_stats(stats, x, jax.lax.stop_gradient(xhats), weights)
    usage = q2.model_codeword_usage(codes, K, stats["mean"].shape[0], weights)
    return mse + sub, (new_frozen, usage)


def make_optimizer() -> optax.GradientTransformation:
    # torch.optim.Adam defaults: betas (0.9, 0.999), eps 1e-8 outside the sqrt.
    return optax.inject_hyperparams(optax.adam)(learning_rate=0.0)


def make_train_step(encode_fn: Callable, optimizer: optax.GradientTransformation, mesh: Mesh):
    """The v1 step: jitted `(trainable, opt_state, frozen, x, code0, weights, lr) ->
    (trainable, opt_state, loss)` (see make_step)."""
    step = make_step(lambda tr, fr, x, c0, w: batch_loss(tr, fr, x, c0, w, encode_fn), optimizer, mesh)

    def v1_step(trainable, opt_state, frozen, x, code0, weights, lr):
        trainable, opt_state, _, loss, _ = step(trainable, opt_state, frozen, x, code0, weights, lr)
        return trainable, opt_state, loss

    return v1_step


def make_step(loss_fn: Callable, optimizer: optax.GradientTransformation, mesh: Mesh):
    """Jitted `(trainable, opt_state, frozen, x, code0, weights, lr) -> (trainable,
    opt_state, frozen, loss, usage)` for `loss_fn(trainable, frozen, x, code0, weights)
    -> (loss, (frozen, usage))`. x/code0/weights are sharded along rows over `mesh`,
    everything else replicated."""
    replicated = NamedSharding(mesh, P())

    def step(trainable, opt_state, frozen, x, code0, weights, lr):
        (loss, (frozen, usage)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, frozen, x, code0,
                                                                                   weights)
        hyper = dict(opt_state.hyperparams)
        hyper["learning_rate"] = jnp.asarray(lr, jnp.float32)
        opt_state = opt_state._replace(hyperparams=hyper)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, frozen, loss, usage

    return jax.jit(step, out_shardings=replicated)


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

    def __init__(self, xt: np.ndarray, code0: np.ndarray | None,
                 normalise: Callable[[np.ndarray], np.ndarray] | float, batch_size: int, mesh: Mesh):
        self.xt, self.code0 = xt, code0
        if not callable(normalise):  # a v1 db_scale
            scale = np.float32(normalise)
            normalise = lambda x: x / scale  # noqa: E731
        self.normalise = normalise  # raw -> model units: the model's own (model.normalise)
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
        x = self.normalise(np.asarray(self.xt[idx], np.float32))
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


class _V1Recipe:
    """QINCo v1's loop policy: Adam (rebuilt every epoch unless persistent), the
    reference's plateau Scheduler (constant rate within an epoch), its data order."""

    def __init__(self, cfg: TrainConfig, n: int):
        self.cfg, self.n = cfg, n
        self.scheduler = Scheduler(cfg.lr)

    def optimizer(self):
        return make_optimizer()

    def rebuild_optimizer(self) -> bool:
        return not self.cfg.persistent_optimizer

    def should_stop(self, epoch: int) -> bool:
        return epoch >= self.cfg.max_epochs or self.scheduler.should_stop()

    def batches(self, epoch: int) -> list[np.ndarray]:
        return epoch_batches(self.n, self.cfg.batch_size, epoch, self.cfg.data_seed)

    def batch_lrs(self, epoch: int, n_batches: int) -> np.ndarray:
        return np.full(n_batches, self.scheduler.lr)

    def after_epoch(self, epoch: int, mse: float, n_steps: int, log) -> bool:
        decision = self.scheduler.append_loss(mse)
        if decision.reduced_lr:
            log(f"val MSE did not improve for 10 epochs: lr -> {self.scheduler.lr:g}")
        return decision.is_best

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler = Scheduler.from_state_dict(state)


class _Qinco2Recipe:
    """QINCo2's loop policy (qinco2_recipe): AdamW + clipping, persistent; the rate set
    per batch by the ramp + cosine schedule; epochs of `epoch_size` samples cycling
    through a fixed shuffled order; stop after `stop_patience` epochs without a new best
    or `epochs + stop_patience + 1` epochs (or cfg.max_epochs, whichever is first)."""

    def __init__(self, cfg: TrainConfig, n: int):
        self.cfg = cfg
        self.schedule = q2.CosineSchedule(cfg.lr, cfg.ramp_epochs, cfg.epochs, cfg.lr_min_fact)
        self.order = q2.DataOrder(n, cfg.epoch_size, cfg.seed)
        self.progress = q2.TrainProgress()

    def optimizer(self):
        return q2.make_optimizer(self.cfg.weight_decay, self.cfg.grad_clip)

    def rebuild_optimizer(self) -> bool:
        return False

    def should_stop(self, epoch: int) -> bool:
        return epoch >= self.cfg.max_epochs or q2.should_stop(self.progress, self.cfg.epochs,
                                                                self.cfg.stop_patience)

    def batches(self, epoch: int) -> list[np.ndarray]:
        return self.order.batches(epoch, self.cfg.batch_size)

    def batch_lrs(self, epoch: int, n_batches: int) -> np.ndarray:
        return self.schedule.epoch_lrs(epoch, n_batches)

    def after_epoch(self, epoch: int, mse: float, n_steps: int, log) -> bool:
        self.progress, improved = self.progress.after_epoch(mse, n_steps)
        return improved

    def state_dict(self) -> dict:
        return dataclasses.asdict(self.progress)

    def load_state_dict(self, state: dict) -> None:
        self.progress = q2.TrainProgress(**state)


def fit(model: QincoModel, xt: np.ndarray, xval: np.ndarray, cfg: TrainConfig, *,
        code0: np.ndarray | None = None, model_path: str | None = None,
        checkpoint_dir: str | None = None, history_path: str | None = None,
        save_fn: Callable[[QincoModel, str], None] | None = None,
        log: Callable[[str], None] | None = None) -> TrainResult:
    """Train `model` (initialised, e.g. from an RQ) on raw vectors xt, validating on xval.

    A QINCo v1 model trains with the v1 recipe (module docstring); a QINCo2 model with
    QINCo2's (see _Qinco2Recipe and qinco2_batch_loss; the cfg fields weight_decay,
    grad_clip, epochs, ramp_epochs, lr_min_fact, stop_patience, epoch_size, seed,
    dtype apply), with the unused codewords re-drawn after every epoch.

    code0: IVF-QINCo only, the nearest IVF centroid of every training vector.
    model_path: where the best model is written whenever validation improves
      (save_fn(model, path), by default qinco_jax.formats.checkpoint.save_model).
    checkpoint_dir: resume from / save to this orbax directory every epoch.
    history_path: JSON history, rewritten every epoch."""
    is_main = jax.process_index() == 0
    log = (log or _default_log) if is_main else (lambda msg: None)
    config = model.config
    qinco2 = config.is_qinco2
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
    if cfg.dtype != "float32" and not qinco2:
        raise ValueError(f"dtype {cfg.dtype!r}: mixed precision is implemented for QINCo2 training only")
    if save_fn is None and model_path:
        from qinco_jax.formats.checkpoint import save_model as save_fn  # noqa: N813

    mesh = make_mesh(cfg.ngpu)
    check_batch_size(cfg.batch_size, mesh)
    replicated = NamedSharding(mesh, P())
    n_dev = mesh.devices.size
    log(f"training {config.describe()} on {len(xt)} vectors, validation {len(xval)}, "
        f"{n_dev} device(s) ({mesh.devices.flat[0].platform}), global batch {cfg.batch_size}")

    recipe = (_Qinco2Recipe if qinco2 else _V1Recipe)(cfg, len(xt))
    optimizer = recipe.optimizer()
    encode_options = codec.resolve_options(model, cfg.encode)
    encode_fn = make_encode_fn(encode_options, outer_skip=config.outer_skip)
    if qinco2:
        dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32

        def loss_fn(tr, fr, x, c0, w):
            return qinco2_batch_loss(tr, fr, x, c0, w, encode_fn, is_ivf=config.is_ivf, K=config.K,
                                     outer_skip=config.outer_skip, dtype=dtype)

        trainable, frozen = q2.split_trainable(model.params, config.is_ivf)
    else:
        def loss_fn(tr, fr, x, c0, w):
            return batch_loss(tr, fr, x, c0, w, encode_fn)

        trainable, frozen = split_trainable(model.params, config.is_ivf)
    train_step = make_step(loss_fn, optimizer, mesh)
    trainable = jax.device_put(trainable, replicated)
    frozen = jax.device_put(frozen, replicated)
    opt_state = jax.device_put(optimizer.init(trainable), replicated)
    feeder = BatchFeeder(xt, code0, model.normalise, cfg.batch_size, mesh)

    def as_model(tr, fr) -> QincoModel:
        return QincoModel(config, local_copy(merge(tr, fr)))

    def val_mse(tr, fr) -> float:
        return validation_mse(as_model(tr, fr), xval, encode_options)

    run_info = {"model": config.describe(), "db_scale": config.db_scale, "nt": int(len(xt)),
                "nval": int(len(xval)), "train": dataclasses.asdict(cfg),
                "devices": n_dev}
    ckpt = TrainCheckpointer(checkpoint_dir) if checkpoint_dir else None
    best_trainable, best_frozen = trainable, frozen
    start_epoch = 0
    history: dict = {"run": run_info, "before": None, "epochs": []}

    def checkpoint_arrays():
        arrays = {"params": trainable, "opt_state": opt_state, "best_params": best_trainable}
        if qinco2:  # the running statistics change during training
            arrays.update(frozen=frozen, best_frozen=best_frozen)
        return arrays

    if ckpt is not None and ckpt.latest_epoch() is not None:
        last = ckpt.latest_epoch()
        meta = ckpt.restore_meta(last)
        if meta["run"]["model"] != run_info["model"] or meta["run"]["nt"] != run_info["nt"]:
            raise ValueError(f"checkpoint {checkpoint_dir} is of another run ({meta['run']['model']}, "
                             f"nt={meta['run']['nt']}), not of this one ({run_info['model']}, "
                             f"nt={run_info['nt']}); use another --checkpoint directory or delete it")
        arrays, meta = ckpt.restore(last, checkpoint_arrays())
        trainable = jax.device_put(arrays["params"], replicated)
        opt_state = jax.device_put(arrays["opt_state"], replicated)
        best_trainable = jax.device_put(arrays["best_params"], replicated)
        if qinco2:
            frozen = jax.device_put(arrays["frozen"], replicated)
            best_frozen = jax.device_put(arrays["best_frozen"], replicated)
        else:
            best_frozen = frozen
        recipe.load_state_dict(meta["scheduler"])
        history = meta["history"]
        start_epoch = int(meta["epoch"]) + 1
        log(f"resuming from checkpoint {checkpoint_dir} after epoch {meta['epoch']}")
    else:
        mse0 = val_mse(trainable, frozen)
        history["before"] = mse0
        log(f"before optimization: val MSE={mse0:g}")

    show_bar = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
    t_start = time.time()
    epoch = start_epoch
    while not recipe.should_stop(epoch):
        t0 = time.time()
        if recipe.rebuild_optimizer():
            opt_state = jax.device_put(optimizer.init(trainable), replicated)
        batches = recipe.batches(epoch)
        lrs = recipe.batch_lrs(epoch, len(batches))
        bar = None
        if show_bar and is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(batches), desc=f"epoch {epoch}", unit="batch", leave=False)
        losses, usage = [], None
        for i, (xb, cb, wb) in enumerate(prefetched(feeder, batches)):
            trainable, opt_state, frozen, loss, batch_usage = train_step(trainable, opt_state, frozen, xb, cb, wb,
                                                                         np.float32(lrs[i]))
            losses.append(loss)
            usage = batch_usage if usage is None else usage + batch_usage
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
        mse = val_mse(trainable, frozen)
        is_best = recipe.after_epoch(epoch, mse, len(batches), log)
        if is_best:
            best_trainable, best_frozen = trainable, frozen
        record = {"epoch": epoch, "train_loss": train_loss, "val_mse": mse, "lr": float(lrs[0]),
                  "seconds": time.time() - t0, "best": is_best}
        if is_best and model_path and is_main:
            save_fn(as_model(trainable, frozen), model_path)
        if qinco2:  # after the best model is written, as the reference
            key = jax.random.fold_in(jax.random.key(cfg.seed + 1), epoch)
            params, n_reset = q2.reset_model_codewords(local_copy(merge(trainable, frozen)), config,
                                                       local_copy(usage), key, cfg.codebook_noise)
            trainable = jax.device_put(q2.split_trainable(params, config.is_ivf)[0], replicated)
            record["codewords_reset"] = [int(n) for n in n_reset]
        history["epochs"].append(record)
        log(f"epoch {epoch} train loss {train_loss:g} val MSE {mse:g} lr {record['lr']:g} "
            f"{record['seconds']:.1f} s" + (" (best)" if is_best else "")
            + (f" reset {sum(record['codewords_reset'])} codewords" if record.get("codewords_reset")
               and sum(record["codewords_reset"]) else ""))
        if recipe.should_stop(epoch + 1) and epoch + 1 < cfg.max_epochs:
            log("stopping: no improvement for too long or the schedule is over")
        if history_path and is_main:
            _save_json(history_path, history)
        if ckpt is not None:
            ckpt.save(epoch, checkpoint_arrays(),
                      {"epoch": epoch, "scheduler": recipe.state_dict(), "history": history, "run": run_info})
        epoch += 1
    if ckpt is not None:
        ckpt.close()
    if history_path and is_main:
        _save_json(history_path, history)
    log(f"training done in {time.time() - t_start:.1f} s, best val MSE "
        f"{min([e['val_mse'] for e in history['epochs']], default=history['before'])}")
    return TrainResult(best=as_model(best_trainable, best_frozen), last=as_model(trainable, frozen),
                       history=history)
