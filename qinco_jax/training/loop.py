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

Everything v1 and QINCo2 do differently (loss, parameter split, optimizer, data order,
schedule, codeword reset) is owned by a recipe object (training.recipes: V1Recipe,
Qinco2Recipe; `qinco2_train_config` gives QINCo2's defaults), passed to `fit`. The whole
of a run is one `TrainState` (parameters, optimizer state, epoch, step, RNG, schedule,
best validation MSE and its parameters), saved and restored whole every epoch.

`fit` reads the training rows batch by batch (a memory-mapped file stays on disk: each
batch gathers its rows and converts them to float32), a background thread reading the
next batches while the device trains on the current one.

Multi-host: call `jax.distributed.initialize()` (or qinco_jax.distributed.
start()) before anything else (train_qinco.py --distributed; run.py
task=train starts it from a launcher's variables). Every process runs this same loop on the same data order, feeds its
own slice of each global batch (`jax.make_array_from_process_local_data`) and the mesh
spans the devices of all processes. Only process 0 writes the model and history.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import queue
import sys
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qinco_jax.logs import quiet
from qinco_jax.config import EncodeOptions
from qinco_jax.data import validation
from qinco_jax.formats.io import write_bytes
from qinco_jax.models import codec
from qinco_jax.models import qinco as qm
from qinco_jax.models.qinco import AnyModel, QincoModel
from qinco_jax.training import streaming
from qinco_jax.training.monitor import Monitor, NullMonitor, codeword_stats, usage_summary
from qinco_jax.training.recipes import (  # noqa: F401  (re-exported: the loop's vocabulary)
    DATA_SEED, Params, Qinco2Recipe, Recipe, V1Recipe, batch_loss, epoch_batches, make_optimizer, merge,
    qinco2_batch_loss, recipe_for, split_trainable)
from qinco_jax.training.qinco2_recipe import set_learning_rate


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
    optimizer: str = "adamw"       # QINCo2: "adamw" (decoupled decay) or "adam" (L2 decay, the qinco1 preset)
    scheduler: str = "cosine"      # QINCo2: "cosine" or "reduce_lr_plateau" (the qinco1 preset)
    reduce_fact: float = 0.1       # reduce_lr_plateau: lr *= reduce_fact after `patience` bad epochs
    patience: int = 10
    threshold_frac: float = 1e-10  # reduce_lr_plateau: relative improvement that counts
    grad_accumulate: int = 1       # QINCo2: batches whose mean gradient makes one optimizer update

    def __post_init__(self):
        if self.optimizer not in ("adamw", "adam"):
            raise ValueError(f"optimizer must be 'adamw' or 'adam', got {self.optimizer!r}")
        if self.scheduler not in ("cosine", "reduce_lr_plateau"):
            raise ValueError(f"scheduler must be 'cosine' or 'reduce_lr_plateau', got {self.scheduler!r}")
        if not (0 < self.reduce_fact < 1) or self.patience < 0 or not (self.threshold_frac >= 0):
            raise ValueError(f"reduce_lr_plateau needs 0 < reduce_fact < 1, patience >= 0 and threshold_frac >= 0, "
                             f"got {self.reduce_fact}, {self.patience}, {self.threshold_frac}")
        if self.grad_accumulate < 1:
            raise ValueError(f"grad_accumulate must be >= 1, got {self.grad_accumulate}")
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
# The compiled step
# --------------------------------------------------------------------------------------


def make_encode_fn(options: EncodeOptions | None = None, outer_skip: bool = False) -> Callable:
    """(params, x, code0) -> codes: the no-gradient encode that picks training codes
    (options resolved: None fields take the v1 defaults, greedy over all K)."""
    opts = (options or EncodeOptions()).resolved(1, 0, "linear")

    def encode_fn(params, x, code0):
        codes, _ = qm.encode(params, x, code0, beam=opts.beam, preselect=opts.preselect, proxy=opts.proxy,
                             outer_skip=outer_skip)
        return codes

    return encode_fn


def _global_norm(tree) -> jax.Array:
    """The L2 norm of all the leaves of a pytree together, in float32."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(tree)))


def make_step(loss_fn: Callable, optimizer: optax.GradientTransformation, mesh: Mesh):
    """Jitted `(trainable, opt_state, frozen, x, code0, weights, lr) -> (trainable,
    opt_state, frozen, loss, usage, grad_norm)` for `loss_fn(trainable, frozen, x, code0,
    weights) -> (loss, (frozen, usage))`; grad_norm is the global L2 norm of the
    gradient before any clipping. x/code0/weights are sharded along rows over `mesh`,
    everything else replicated."""
    replicated = NamedSharding(mesh, P())

    def step(trainable, opt_state, frozen, x, code0, weights, lr):
        (loss, (frozen, usage)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, frozen, x, code0,
                                                                                   weights)
        opt_state = set_learning_rate(opt_state, lr)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, frozen, loss, usage, _global_norm(grads)

    return jax.jit(step, out_shardings=replicated)


def make_train_step(encode_fn: Callable, optimizer: optax.GradientTransformation, mesh: Mesh):
    """The v1 step: jitted `(trainable, opt_state, frozen, x, code0, weights, lr) ->
    (trainable, opt_state, loss)` (see make_step)."""
    step = make_step(lambda tr, fr, x, c0, w: batch_loss(tr, fr, x, c0, w, encode_fn), optimizer, mesh)

    def v1_step(trainable, opt_state, frozen, x, code0, weights, lr):
        trainable, opt_state, _, loss, _, _ = step(trainable, opt_state, frozen, x, code0, weights, lr)
        return trainable, opt_state, loss

    return v1_step


# --------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------


class BatchFeeder:
    """Reads, scales, pads and places batches on the mesh. `read` is host work only
    (gather the batch's rows -- from a memory map: only those rows are read -- convert
    them to float32, normalise); `place` puts a read batch on the devices. In
    multi-process runs each process reads only its own rows of the global batch.

    code0 (IVF-QINCo): an array with the first code of every row, indexed by the
    batch's rows, or a callable (`rq_init.CentroidAssignment`) computing it from the
    batch's raw rows as they are read."""

    def __init__(self, xt: np.ndarray, code0,
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

    def read(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """This process's part of the batch of rows idx: (x, code0, weights), host arrays."""
        weights = np.zeros(self.bs, np.float32)
        weights[:len(idx)] = 1
        idx = np.concatenate([idx, np.zeros(self.bs - len(idx), idx.dtype)])[self.rows]
        weights = weights[self.rows]
        raw = streaming.gather(self.xt, idx)  # reads these rows only, float32
        if self.code0 is None:
            c0 = None
        elif callable(self.code0):  # assigned from the rows just read: no per-row array
            c0 = np.asarray(self.code0(raw), np.int32)
        else:
            c0 = np.asarray(self.code0[idx]).astype(np.int32)
        return self.normalise(raw), c0, weights

    def place(self, host_batch):
        x, c0, weights = host_batch

        def put(local, global_shape):
            return jax.make_array_from_process_local_data(self.sharding, local, global_shape)

        return (put(x, (self.bs, x.shape[1])), None if c0 is None else put(c0, (self.bs,)),
                put(weights, (self.bs,)))

    def __call__(self, idx: np.ndarray):
        return self.place(self.read(idx))


_DONE = object()


def prefetched(feeder: BatchFeeder, batches: list[np.ndarray], depth: int = 2):
    """Yield placed batches in order. A background thread reads up to `depth` batches
    ahead (the disk and the float32 conversion overlap the device's steps); batch i+1
    is placed on the devices while the (asynchronously dispatched) step runs on batch i.
    Read-ahead is bounded: at most depth + 2 batches exist on the host at a time."""
    if not batches:
        return
    ahead: queue.Queue = queue.Queue(maxsize=max(depth, 1))
    stop = threading.Event()

    def reader():
        try:
            for idx in batches:
                item = feeder.read(idx)
                while not stop.is_set():
                    try:
                        ahead.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        pass
                if stop.is_set():
                    return
            ahead.put(_DONE)
        except BaseException as e:  # handed to the consumer, raised there
            ahead.put(e)

    thread = threading.Thread(target=reader, name="batch-reader", daemon=True)
    thread.start()

    def take():
        item = ahead.get()
        if isinstance(item, BaseException):
            raise item
        return item

    try:
        nxt = feeder.place(take())
        for i in range(len(batches)):
            yield nxt  # the consumer dispatches its (asynchronous) step on it ...
            if i + 1 < len(batches):
                nxt = feeder.place(take())  # ... while we place the next one
    finally:
        stop.set()
        while thread.is_alive():  # unblock a reader waiting on a full queue
            try:
                ahead.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)


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
# The training state and its checkpoints
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainState:
    """The whole of a training run between two epochs.

    trainable / frozen: the model's parameters, split by the recipe (frozen: IVF
    centroids, QINCo2's normalisation and running statistics). opt_state: the
    optimizer's. epoch: epochs completed (the next epoch's index). step: optimizer
    steps taken. rng: the run's key (epoch e's codeword reset draws from
    fold_in(rng, e)). schedule: the recipe's schedule state (plain numbers).
    best_mse: the best validation MSE so far (None before the first epoch) and
    best_trainable / best_frozen the parameters that gave it (the initial ones before)."""

    trainable: Params
    frozen: Params
    opt_state: Any
    epoch: int
    step: int
    rng: jax.Array
    schedule: dict
    best_mse: float | None
    best_trainable: Params
    best_frozen: Params

    def arrays(self) -> dict:
        """The array part, as a checkpoint stores it."""
        return {"params": self.trainable, "frozen": self.frozen, "opt_state": self.opt_state,
                "best_params": self.best_trainable, "best_frozen": self.best_frozen,
                "rng": np.asarray(jax.random.key_data(self.rng))}  # host: the same on every process

    def numbers(self) -> dict:
        """The JSON part, as a checkpoint stores it."""
        return {"epoch": self.epoch, "step": self.step, "schedule": self.schedule, "best_mse": self.best_mse}

    @classmethod
    def from_saved(cls, arrays: dict, numbers: dict) -> "TrainState":
        return cls(trainable=arrays["params"], frozen=arrays["frozen"], opt_state=arrays["opt_state"],
                   epoch=int(numbers["epoch"]), step=int(numbers["step"]),
                   rng=jax.random.wrap_key_data(np.asarray(arrays["rng"])), schedule=numbers["schedule"],
                   best_mse=numbers["best_mse"], best_trainable=arrays["best_params"],
                   best_frozen=arrays["best_frozen"])


class TrainCheckpointer:
    """Orbax CheckpointManager over a directory: one checkpoint per finished epoch,
    numbered by that epoch's index, holding a TrainState whole (its arrays, and its
    numbers with the history and the run's description as JSON). Orbax writes each
    checkpoint to a temporary directory and renames it, so a kill leaves the previous one."""

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

    def save(self, state: TrainState, history: dict, run: dict) -> None:
        ocp = self._ocp
        meta = {"state": state.numbers(), "history": history, "run": run}
        self.mngr.save(state.epoch - 1, args=ocp.args.Composite(state=ocp.args.StandardSave(state.arrays()),
                                                                meta=ocp.args.JsonSave(meta)))

    def restore_meta(self, epoch: int) -> dict:
        """The JSON part alone: read first, to check the run before restoring arrays."""
        return self.mngr.restore(epoch, args=self._ocp.args.Composite(meta=self._ocp.args.JsonRestore()))["meta"]

    def restore(self, epoch: int, like: TrainState) -> tuple[TrainState, dict]:
        """(the TrainState saved after `epoch`, arrays shaped as `like`'s; the JSON part)."""
        ocp = self._ocp
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like.arrays())
        out = self.mngr.restore(epoch, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                               meta=ocp.args.JsonRestore()))
        return TrainState.from_saved(out["state"], out["meta"]["state"]), out["meta"]

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


def check_inputs(model: QincoModel, xt, xval, code0, recipe: Recipe):
    """The loop's input checks: shapes, finite values (a memory map is read once, in
    bounded batches), the IVF assignment. Returns (xt, xval, code0); a memory-mapped
    xt stays a memory map."""
    config = model.config
    xt = streaming.as_rows(xt)  # a memmap stays a memmap: read batch by batch
    if xt.ndim != 2 or xt.shape[1] != config.d:
        raise ValueError(f"training vectors have shape {xt.shape}, the model needs dimension {config.d}")
    if len(xt) == 0:
        raise ValueError("no training vectors")
    streaming.check_rows(xt, "training vectors")
    xval = validation.as_finite_float32(xval, "validation vectors")  # read once
    if xval.ndim != 2 or xval.shape[1] != config.d or len(xval) == 0:
        raise ValueError(f"validation vectors have shape {xval.shape}, the model needs (n >= 1, {config.d})")
    if config.is_ivf:
        if code0 is None:
            raise ValueError("IVF-QINCo training needs the IVF assignment (code0) of the training vectors")
        if callable(code0):  # computed batch by batch (rq_init.CentroidAssignment)
            if getattr(code0, "d", config.d) != config.d:
                raise ValueError(f"code0 assigns vectors of dimension {code0.d}, the model needs {config.d}")
        else:
            code0 = np.asarray(code0).reshape(-1)
            if len(code0) != len(xt):
                raise ValueError(f"code0 has {len(code0)} entries for {len(xt)} training vectors")
    elif code0 is not None:
        raise ValueError("code0 applies to IVF-QINCo training only")
    recipe.check(config)
    return xt, xval, code0


class _Trainer:
    """What stays fixed during a run: the model's config, the recipe, the mesh, the
    compiled step, the batch feeder and the validation set."""

    def __init__(self, model: QincoModel, xt, xval, code0, cfg: TrainConfig, recipe: Recipe, mesh: Mesh):
        self.config, self.recipe, self.cfg, self.xval, self.n = model.config, recipe, cfg, xval, len(xt)
        self.replicated = NamedSharding(mesh, P())
        self.optimizer = recipe.optimizer()
        self.encode_options = codec.resolve_options(model, cfg.encode)
        encode_fn = make_encode_fn(self.encode_options, outer_skip=self.config.outer_skip)
        self.step = make_step(recipe.loss_fn(self.config, encode_fn), self.optimizer, mesh)
        self.feeder = BatchFeeder(xt, code0, model.normalise, cfg.batch_size, mesh)

    def put(self, tree):
        """tree replicated on the mesh. A local array goes through the host, so that the
        same values on every process make one global array (multi-process runs)."""
        def host(a):
            return a if isinstance(a, jax.Array) and not a.is_fully_addressable else np.asarray(a)

        return jax.device_put(jax.tree.map(host, tree), self.replicated)

    def model(self, trainable: Params, frozen: Params) -> QincoModel:
        return QincoModel(self.config, local_copy(merge(trainable, frozen)))

    def initial_state(self, model: QincoModel, start_epoch: int = 0) -> TrainState:
        trainable, frozen = (self.put(t) for t in self.recipe.split(model.params, self.config))
        return TrainState(trainable=trainable, frozen=frozen, opt_state=self.put(self.optimizer.init(trainable)),
                          epoch=start_epoch, step=0, rng=jax.random.key(self.cfg.seed + 1),
                          schedule=self.recipe.initial_schedule(start_epoch), best_mse=None,
                          best_trainable=trainable, best_frozen=frozen)

    def restore(self, ckpt: TrainCheckpointer, state: TrainState, run_info: dict, where: str
                ) -> tuple[TrainState, dict]:
        """The state and history of the checkpoint's last epoch, after checking that it
        is of this run (model and training set size)."""
        last = ckpt.latest_epoch()
        meta = ckpt.restore_meta(last)
        if meta["run"]["model"] != run_info["model"] or meta["run"]["nt"] != run_info["nt"]:
            raise ValueError(f"checkpoint {where} is of another run ({meta['run']['model']}, "
                             f"nt={meta['run']['nt']}), not of this one ({run_info['model']}, "
                             f"nt={run_info['nt']}); use another --checkpoint directory or delete it")
        if "state" not in meta:
            raise ValueError(f"checkpoint {where} is of an older layout (before TrainState, qinco-jax's training "
                             f"loop of issue 18): delete it to start over")
        restored, meta = ckpt.restore(last, state)
        arrays = jax.tree.map(self.put, (restored.trainable, restored.frozen, restored.opt_state,
                                         restored.best_trainable, restored.best_frozen))
        restored = dataclasses.replace(restored, trainable=arrays[0], frozen=arrays[1], opt_state=arrays[2],
                                       best_trainable=arrays[3], best_frozen=arrays[4])
        return restored, meta["history"]

    def train_epoch(self, state: TrainState, show_bar: bool) -> tuple[TrainState, dict, Any, dict]:
        """One epoch of optimizer steps: (state after it, its record so far, codeword
        usage (M, K), its per-step values {loss, lr, grad_norm} for the monitor)."""
        recipe, epoch = self.recipe, state.epoch
        opt_state = self.put(self.optimizer.init(state.trainable)) if recipe.rebuild_optimizer else state.opt_state
        batches = recipe.epoch_rows(self.n, epoch)
        lrs = recipe.batch_lrs(state.schedule, epoch, len(batches))
        bar = None
        if show_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(batches), desc=f"epoch {epoch}", unit="batch", leave=False)
        trainable, frozen = state.trainable, state.frozen
        losses, grad_norms, usage = [], [], None
        for i, (xb, cb, wb) in enumerate(prefetched(self.feeder, batches)):
            trainable, opt_state, frozen, loss, batch_usage, grad_norm = self.step(
                trainable, opt_state, frozen, xb, cb, wb, np.float32(lrs[i]))
            losses.append(loss)
            grad_norms.append(grad_norm)
            usage = batch_usage if usage is None else usage + batch_usage
            if bar is not None:
                bar.update(1)
                if i % 10 == 0 and i:
                    bar.set_postfix(loss=f"{float(losses[-2]):.4g}")  # previous step: no stall
        losses, grad_norms = (np.asarray(v, np.float64) for v in jax.device_get((losses, grad_norms)))  # once
        train_loss = float(np.mean(losses))
        if bar is not None:
            bar.close()
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"training diverged at epoch {epoch} (loss {train_loss}); try a lower --lr")
        state = dataclasses.replace(state, trainable=trainable, frozen=frozen, opt_state=opt_state,
                                    step=state.step + len(batches))
        steps = {"loss": losses, "lr": np.asarray(lrs, np.float64), "grad_norm": grad_norms}
        record = {"epoch": epoch, "train_loss": train_loss, "lr": float(lrs[0]), "n_steps": len(batches)}
        return state, record, usage, steps

    def validate(self, trainable: Params, frozen: Params) -> float:
        return validation_mse(self.model(trainable, frozen), self.xval, self.encode_options)

    def after_validation(self, state: TrainState, mse: float, n_steps: int) -> tuple[TrainState, bool, str]:
        """The recipe's schedule fed the epoch's validation MSE; the best kept."""
        schedule, is_best, note = self.recipe.after_epoch(state.schedule, state.epoch, mse, n_steps)
        state = dataclasses.replace(state, schedule=schedule, epoch=state.epoch + 1)
        if is_best:
            state = dataclasses.replace(state, best_mse=mse, best_trainable=state.trainable,
                                        best_frozen=state.frozen)
        return state, is_best, note

    def reset_codewords(self, state: TrainState, usage) -> tuple[TrainState, list[int] | None]:
        """The recipe's codeword reset after epoch state.epoch - 1 (QINCo2's; v1: none)."""
        key = jax.random.fold_in(state.rng, state.epoch - 1)
        params, n_reset = self.recipe.reset_codewords(local_copy(merge(state.trainable, state.frozen)), self.config,
                                                      local_copy(usage), key)
        if n_reset is None:
            return state, None
        trainable = self.put(self.recipe.split(params, self.config)[0])
        return dataclasses.replace(state, trainable=trainable), n_reset


def fit(model: QincoModel, xt: np.ndarray, xval: np.ndarray, cfg: TrainConfig, *,
        recipe: Recipe | None = None, code0=None, model_path: str | None = None,
        checkpoint_dir: str | None = None, history_path: str | None = None,
        save_fn: Callable[[QincoModel, str], None] | None = None,
        log: Callable[[str], None] | None = None, monitor: Monitor | None = None,
        start_epoch: int = 0) -> TrainResult:
    """Train `model` (initialised, e.g. from an RQ) on raw vectors xt, validating on xval.

    recipe: what v1 and QINCo2 training do differently (training.recipes); by default
      `recipe_for(model.config, cfg)`: QINCo2's for a QINCo2 model, else v1's.
    xt: any (n, d) array; a memory map (or a streaming.RowMap) stays on disk, read batch by batch.
    code0: IVF-QINCo only, the nearest IVF centroid of the training vectors: an (n,)
      array, or a `rq_init.CentroidAssignment(centroids)` that computes it batch by
      batch from the rows each batch reads (no per-row array; what train_model passes).
    model_path: where the best model is written whenever validation improves
      (save_fn(model, path), by default qinco_jax.formats.checkpoint.save_model).
    checkpoint_dir: resume from / save to this orbax directory every epoch.
    history_path: JSON history, rewritten every epoch; every epoch's record holds the
      codeword usage of its training encodes (training.monitor.codeword_stats).
    monitor: called after every epoch with its record and per-step loss, learning
      rate and gradient norm (training.monitor: e.g. a TensorBoardMonitor); the
      caller closes it.
    start_epoch: the first epoch's index (a continued model: the epoch after its last);
      the data order, learning rate and epoch limits count from there."""
    is_main = jax.process_index() == 0
    log = (log or _default_log) if is_main else quiet  # one process speaks
    monitor = monitor if monitor is not None and is_main else NullMonitor()
    recipe = recipe or recipe_for(model.config, cfg)
    xt, xval, code0 = check_inputs(model, xt, xval, code0, recipe)
    if save_fn is None and model_path:
        from qinco_jax.formats.checkpoint import save_model as save_fn  # noqa: N813
    mesh = make_mesh(cfg.ngpu)
    check_batch_size(cfg.batch_size, mesh)
    n_dev = mesh.devices.size
    log(f"training {model.config.describe()} on {len(xt)} vectors, validation {len(xval)}, "
        f"{n_dev} device(s) ({mesh.devices.flat[0].platform}), global batch {cfg.batch_size}")

    trainer = _Trainer(model, xt, xval, code0, cfg, recipe, mesh)
    run_info = {"model": model.config.describe(), "db_scale": model.config.db_scale, "nt": int(len(xt)),
                "nval": int(len(xval)), "train": dataclasses.asdict(cfg), "devices": n_dev}
    if start_epoch < 0:
        raise ValueError(f"start_epoch must be >= 0, got {start_epoch}")
    state = trainer.initial_state(model, start_epoch)
    history: dict = {"run": run_info, "before": None, "epochs": []}
    ckpt = TrainCheckpointer(checkpoint_dir) if checkpoint_dir else None
    if ckpt is not None and ckpt.latest_epoch() is not None:
        state, history = trainer.restore(ckpt, state, run_info, checkpoint_dir)
        log(f"resuming from checkpoint {checkpoint_dir} after epoch {state.epoch - 1}")
    else:
        history["before"] = trainer.validate(state.trainable, state.frozen)
        log(f"before optimization: val MSE={history['before']:g}")

    show_bar = (cfg.progress if cfg.progress is not None else sys.stderr.isatty()) and is_main
    t_start = time.time()
    while not recipe.should_stop(state.schedule, state.epoch):
        t0 = time.time()
        first_step = state.step
        state, record, usage, steps = trainer.train_epoch(state, show_bar)
        mse = trainer.validate(state.trainable, state.frozen)
        state, is_best, note = trainer.after_validation(state, mse, record.pop("n_steps"))
        if note:
            log(note)
        record.update(val_mse=mse, seconds=time.time() - t0, best=is_best)
        record = {k: record[k] for k in ("epoch", "train_loss", "val_mse", "lr", "seconds", "best")}
        record.update(codeword_stats(local_copy(usage)))
        if is_best and model_path and is_main:
            save_fn(trainer.model(state.trainable, state.frozen), model_path)
        state, n_reset = trainer.reset_codewords(state, usage)  # after the best model is written, as the reference
        if n_reset is not None:
            record["codewords_reset"] = n_reset
        history["epochs"].append(record)
        log(f"epoch {record['epoch']} train loss {record['train_loss']:g} val MSE {mse:g} lr {record['lr']:g} "
            f"{record['seconds']:.1f} s" + (" (best)" if is_best else "")
            + usage_summary(record) + (f" reset {sum(n_reset)} codewords" if n_reset and sum(n_reset) else ""))
        monitor.on_epoch(record, steps, first_step)
        if recipe.should_stop(state.schedule, state.epoch) and state.epoch < cfg.max_epochs:
            log("stopping: no improvement for too long or the schedule is over")
        if history_path and is_main:
            _save_json(history_path, history)
        if ckpt is not None:
            ckpt.save(state, history, run_info)
    if ckpt is not None:
        ckpt.close()
    if history_path and is_main:
        _save_json(history_path, history)
    log(f"training done in {time.time() - t_start:.1f} s, best val MSE "
        f"{min([e['val_mse'] for e in history['epochs']], default=history['before'])}")
    return TrainResult(best=trainer.model(state.best_trainable, state.best_frozen),
                       last=trainer.model(state.trainable, state.frozen), history=history)
