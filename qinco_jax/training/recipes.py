"""The two training recipes the loop runs: what differs between QINCo v1 and QINCo2.

A recipe is a frozen object built from the TrainConfig. It owns every choice the
training loop (`training.loop.fit`) leaves open, and nothing else:

    loss            v1: the sum of the steps' squared errors; QINCo2: step MSEs plus
                    substep losses, the running target statistics updated
    parameters      which subtrees train and which stay frozen (`split` / `merge`)
    optimizer       v1: Adam (rebuilt every epoch unless persistent); QINCo2: AdamW
                    (or Adam) with gradients clipped by value, persistent, optionally
                    accumulated over grad_accumulate batches
    data order      which training rows each epoch visits, in which batches
    schedule        the learning rate of every batch and the stopping rule (QINCo2:
                    cosine or reduce-on-plateau); its state
                    is plain numbers (JSON), carried in the loop's TrainState
    codeword reset  QINCo2 re-draws the codewords an epoch did not use; v1 does not

The recipes are stateless: the schedule's state goes in and comes out of their methods,
so that the loop's TrainState is the whole of a run and a checkpoint restores it whole.
`recipe_for(config, cfg)` picks the recipe a model trains with.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qinco_jax.config import QincoConfig
from qinco_jax.models import qinco as qm
from qinco_jax.training import qinco2_recipe as q2
from qinco_jax.training.scheduler import Scheduler

Params = dict[str, Any]
DATA_SEED = 123
# loss_fn(trainable, frozen, x, code0, weights) -> (loss, (frozen, usage (M, K)))
LossFn = Callable[..., tuple[jax.Array, tuple[Params, jax.Array]]]


# --------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------


def merge(trainable: Params, frozen: Params) -> Params:
    """The model's parameter pytree from its trainable and frozen parts."""
    return {**frozen, **trainable}


def _cast(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def batch_loss(trainable: Params, frozen: Params, x: jax.Array, code0, weights: jax.Array,
               encode_fn: Callable, *, K: int | None = None, M: int | None = None,
               dtype=jnp.float32) -> tuple[jax.Array, tuple[Params, jax.Array]]:
    """QINCo v1's loss: sum over steps of the squared error of the partial
    reconstructions, averaged over the (non-padding) vectors and divided by d.
    Returns (loss, (frozen, usage)) as qinco2_batch_loss does: frozen unchanged, usage
    the (M, K) codeword counts of the batch's codes (an IVF column not counted) when K
    and M are given, else a 0. dtype bfloat16: the network runs in bfloat16 on the
    float32 master weights (the cast is inside the gradient); the targets, the errors
    and the loss stay in float32."""
    params = _cast(merge(trainable, frozen), dtype)
    codes = jax.lax.stop_gradient(encode_fn(jax.lax.stop_gradient(params), x, code0))
    xhats = qm.decode_steps(params, codes).astype(jnp.float32)  # (W, B, d)
    per_vector = jnp.sum((xhats - x[None]) ** 2, axis=(0, 2))
    loss = jnp.sum(per_vector * weights) / (jnp.sum(weights) * x.shape[1])
    usage = jnp.zeros((), jnp.int32) if K is None else q2.model_codeword_usage(codes, K, M, weights)
    return loss, (frozen, usage)


def qinco2_batch_loss(trainable: Params, frozen: Params, x: jax.Array, code0, weights: jax.Array,
                      encode_fn: Callable, *, is_ivf: bool, K: int, outer_skip: bool = True,
                      dtype=jnp.float32):
    """QINCo2's loss (qinco2_recipe.model_losses: step MSEs + substep losses, model
    units) of codes from a no-gradient encode with the model's own A and B. Also returns
    the frozen part with the running target statistics updated, and the batch's
    codeword usage (M, K). dtype bfloat16: the network runs in bfloat16 on float32
    master weights (the cast is inside the gradient); the vectors stay float32, so the
    encode's residuals, the targets and the losses are float32."""
    params = _cast(merge(trainable, frozen), dtype)
    codes = jax.lax.stop_gradient(encode_fn(jax.lax.stop_gradient(params), x, code0))
    mse, sub, xhats = q2.model_losses(params, x, codes, weights, outer_skip=outer_skip, is_ivf=is_ivf)
    stats = frozen["xtarget_stats"]
    new_frozen = dict(frozen)
    new_frozen["xtarget_stats"] = q2.update_model_target_stats(stats, x, jax.lax.stop_gradient(xhats), weights)
    usage = q2.model_codeword_usage(codes, K, stats["mean"].shape[0], weights)
    return mse + sub, (new_frozen, usage)


def split_trainable(params: Params, frozen_codebook0: bool) -> tuple[Params, Params]:
    """QINCo v1's (trainable, frozen) parts: IVF centroids are frozen, as in the reference."""
    if frozen_codebook0:
        return {"steps": params["steps"]}, {"codebook0": params["codebook0"]}
    return dict(params), {}


def make_optimizer() -> optax.GradientTransformation:
    """QINCo v1's optimizer: torch.optim.Adam's defaults (betas 0.9 / 0.999, eps 1e-8
    outside the sqrt), the learning rate an injected hyperparameter."""
    return optax.inject_hyperparams(optax.adam)(learning_rate=0.0)


def epoch_batches(n: int, batch_size: int, epoch: int, data_seed: int = DATA_SEED) -> list[np.ndarray]:
    """QINCo v1's data order for one epoch: `RandomState(data_seed + epoch).permutation(n)`
    cut in batches of batch_size (the last, smaller one kept)."""
    perm = np.random.RandomState(epoch + data_seed).permutation(n)
    return [perm[i0:i0 + batch_size] for i0 in range(0, n, batch_size)]


# --------------------------------------------------------------------------------------
# The recipes
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class V1Recipe:
    """QINCo v1 (qinco_v1/train_qinco.py): Adam rebuilt at every epoch with the plateau
    Scheduler's rate unless `persistent_optimizer` (the rate is constant within an
    epoch: lr / 10 after 10 epochs without a new best, stop after 50 or below 2e-6, or
    after `max_epochs`); every epoch visits all rows in the order of
    `RandomState(data_seed + epoch)`; IVF centroids frozen; no codeword reset.
    dtype "bfloat16": the network runs in bfloat16 on float32 weights.

    cfg: the run's TrainConfig (lr, max_epochs, batch_size, data_seed,
    persistent_optimizer are read)."""

    cfg: Any  # training.loop.TrainConfig

    def check(self, config: QincoConfig) -> None:
        pass

    def split(self, params: Params, config: QincoConfig) -> tuple[Params, Params]:
        return split_trainable(params, config.is_ivf)

    def loss_fn(self, config: QincoConfig, encode_fn: Callable) -> LossFn:
        dtype = jnp.bfloat16 if self.cfg.dtype == "bfloat16" else jnp.float32
        return lambda tr, fr, x, c0, w: batch_loss(tr, fr, x, c0, w, encode_fn, K=config.K, M=config.M,
                                                   dtype=dtype)

    def optimizer(self) -> optax.GradientTransformation:
        return make_optimizer()

    @property
    def rebuild_optimizer(self) -> bool:
        """Whether the optimizer state starts afresh at every epoch (the reference's)."""
        return not self.cfg.persistent_optimizer

    def epoch_rows(self, n: int, epoch: int) -> list[np.ndarray]:
        """The epoch's training rows, batch by batch."""
        return epoch_batches(n, self.cfg.batch_size, epoch, self.cfg.data_seed)

    def initial_schedule(self, start_epoch: int = 0) -> dict:
        return Scheduler(self.cfg.lr).state_dict()

    def batch_lrs(self, schedule: dict, epoch: int, n_batches: int) -> np.ndarray:
        return np.full(n_batches, float(schedule["lr"]))

    def should_stop(self, schedule: dict, epoch: int) -> bool:
        return epoch >= self.cfg.max_epochs or Scheduler.from_state_dict(schedule).should_stop()

    def after_epoch(self, schedule: dict, epoch: int, val_mse: float, n_steps: int) -> tuple[dict, bool, str]:
        """(new schedule, whether this epoch is the best so far, a note to log or "")."""
        scheduler = Scheduler.from_state_dict(schedule)
        decision = scheduler.append_loss(val_mse)
        note = f"val MSE did not improve for 10 epochs: lr -> {scheduler.lr:g}" if decision.reduced_lr else ""
        return scheduler.state_dict(), decision.is_best, note

    def reset_codewords(self, params: Params, config: QincoConfig, usage, key: jax.Array
                        ) -> tuple[Params, list[int] | None]:
        return params, None


@dataclasses.dataclass(frozen=True)
class Qinco2Recipe:
    """QINCo2 (the root `qinco/` package, run.py task=train): AdamW (or Adam:
    cfg.optimizer) with gradients clipped by value (weight_decay, grad_clip),
    persistent, optionally updating once per `grad_accumulate` batches (mean gradient;
    an accumulation may span two epochs); the rate set per batch by a linear ramp then
    a cosine (lr, ramp_epochs, epochs, lr_min_fact), or, scheduler
    "reduce_lr_plateau" (the qinco1 preset), constant per epoch and reduced by
    reduce_fact after `patience` epochs without a relative improvement of
    threshold_frac (never below lr * lr_min_fact; its state is in the schedule, so a
    resumed run keeps it; no epoch limit but stop_patience / max_epochs); epochs of
    `epoch_size` samples cycling through a fixed shuffled order (seed); stop after
    `stop_patience` epochs without a new best or `epochs + stop_patience + 1` epochs
    (or max_epochs, whichever comes first); a loss adding each step's substep-codebook
    error; running target statistics (frozen, outside the gradient) that re-draw the
    codewords an epoch did not use (codebook_noise), after the best model is written.
    dtype "bfloat16": the network runs in bfloat16 on float32 weights.

    cfg: the run's TrainConfig."""

    cfg: Any  # training.loop.TrainConfig

    def check(self, config: QincoConfig) -> None:
        if not config.is_qinco2:
            raise ValueError(f"the QINCo2 recipe trains QINCo2 models, got {config.describe()}")

    def split(self, params: Params, config: QincoConfig) -> tuple[Params, Params]:
        return q2.split_trainable(params, config.is_ivf)

    def loss_fn(self, config: QincoConfig, encode_fn: Callable) -> LossFn:
        dtype = jnp.bfloat16 if self.cfg.dtype == "bfloat16" else jnp.float32

        def loss_fn(tr, fr, x, c0, w):
            return qinco2_batch_loss(tr, fr, x, c0, w, encode_fn, is_ivf=config.is_ivf, K=config.K,
                                     outer_skip=config.outer_skip, dtype=dtype)

        return loss_fn

    def optimizer(self) -> optax.GradientTransformation:
        cfg = self.cfg
        opt = q2.make_optimizer(cfg.weight_decay, cfg.grad_clip, kind=cfg.optimizer)
        if cfg.grad_accumulate > 1:
            # the mean gradient of grad_accumulate batches, clipped, makes one update (the
            # reference's accelerate accumulation); the step count stays per batch.
            opt = optax.MultiSteps(opt, every_k_schedule=cfg.grad_accumulate)
        return opt

    rebuild_optimizer = False

    @property
    def plateau(self) -> bool:
        return self.cfg.scheduler == "reduce_lr_plateau"

    def data_order(self, n: int) -> q2.DataOrder:
        return q2.DataOrder(n, self.cfg.epoch_size, self.cfg.seed)

    def epoch_rows(self, n: int, epoch: int) -> list[np.ndarray]:
        return self.data_order(n).batches(epoch, self.cfg.batch_size)

    def initial_schedule(self, start_epoch: int = 0) -> dict:
        """start_epoch > 0 (a continued model file's `epoch`): the schedule starts there,
        as the reference's does, its last epoch counting as the best so far (the
        stop_patience count starts afresh); the best MSE starts unknown."""
        schedule = dataclasses.asdict(q2.TrainProgress(epoch=start_epoch, best_mse_epoch=start_epoch - 1))
        if self.plateau:
            cfg = self.cfg
            schedule["plateau"] = dataclasses.asdict(q2.PlateauSchedule(
                lr=cfg.lr, factor=cfg.reduce_fact, patience=cfg.patience, threshold=cfg.threshold_frac,
                min_lr=cfg.lr * cfg.lr_min_fact))
        return schedule

    @staticmethod
    def _progress(schedule: dict) -> q2.TrainProgress:
        return q2.TrainProgress(**{k: v for k, v in schedule.items() if k != "plateau"})

    def batch_lrs(self, schedule: dict, epoch: int, n_batches: int) -> np.ndarray:
        cfg = self.cfg
        if self.plateau:  # constant within an epoch
            return np.full(n_batches, float(schedule["plateau"]["lr"]))
        return q2.CosineSchedule(cfg.lr, cfg.ramp_epochs, cfg.epochs, cfg.lr_min_fact).epoch_lrs(epoch, n_batches)

    def should_stop(self, schedule: dict, epoch: int) -> bool:
        return epoch >= self.cfg.max_epochs or q2.should_stop(self._progress(schedule), self.cfg.epochs,
                                                               self.cfg.stop_patience, cosine=not self.plateau)

    def after_epoch(self, schedule: dict, epoch: int, val_mse: float, n_steps: int) -> tuple[dict, bool, str]:
        """reduce_lr_plateau: the plateau schedule steps on the epoch's validation MSE and
        gives the next epoch's rate. (The reference also steps it once before the first
        epoch, on the untrained model's MSE; not here.)"""
        progress, improved = self._progress(schedule).after_epoch(val_mse, n_steps)
        out, note = dataclasses.asdict(progress), ""
        if self.plateau:
            plateau = q2.PlateauSchedule(**schedule["plateau"])
            before = plateau.lr
            plateau.step(val_mse)
            out["plateau"] = dataclasses.asdict(plateau)
            if plateau.lr < before:
                note = (f"val MSE did not improve for {plateau.patience} epochs: lr -> {plateau.lr:g}")
        return out, improved, note

    def reset_codewords(self, params: Params, config: QincoConfig, usage, key: jax.Array
                        ) -> tuple[Params, list[int] | None]:
        params, n_reset = q2.reset_model_codewords(params, config, usage, key, self.cfg.codebook_noise)
        return params, [int(n) for n in n_reset]


Recipe = V1Recipe | Qinco2Recipe


def recipe_for(config: QincoConfig, cfg) -> Recipe:
    """The recipe a model of `config` trains with: QINCo2's for a QINCo2 model, else v1's."""
    return Qinco2Recipe(cfg) if config.is_qinco2 else V1Recipe(cfg)
