"""QINCo2's training recipe, as self-contained pieces (ICLR 2025 reference: the root
`qinco/` package of facebookresearch/Qinco, its `run.py task=train`).

Everything here is pure: numbers, numpy arrays or JAX pytrees in, the same out, with
explicit seeds / PRNG keys. The training loop composes them:

    xt, xval = split_validation(x, valset)                        # last `valset` rows
    mean, std = normalisation_stats(xt, qinco1_mode)              # stored in the model
    order = DataOrder(len(xt), loop, seed)                        # epochs of `loop` rows
    rq = train_rq_init(xt[order.rq_rows(batch)], M, K, ...)       # raw-unit codebooks
    books = initial_codebooks(rq, mean, std, ...)                 # normalised + noise
    opt = make_optimizer(...); schedule = CosineSchedule(...)     # or PlateauSchedule
    progress = TrainProgress()
    while not should_stop(progress, ...):
        for i, rows in enumerate(order.batches(progress.epoch, batch)):
            lr = schedule.batch_lr(progress.epoch, i, n_batches)  # traced: no recompile
            ... loss = sum(step_mse_losses) + sum(substep_losses), stats updated ...
        progress, is_best = progress.after_epoch(val_mse)         # write the model if best
        books = reset_unused_codewords(...)                       # after the write

Reference quirks kept on purpose (each is described where it is implemented): the
learning-rate floor `lr * lr_min_fact` is used as a *factor*; the scheduler is stepped
before each batch to `epoch + (i + 1) / n_batches`; training stops when
`epoch >= epochs + stop_patience` (so `epochs + stop_patience + 1` epochs run); the
RQ's empty clusters are re-drawn uniform in [0, 1) without scaling; the running
"xtarget_var" holds a standard deviation; a codeword counts as used if any training
code of the epoch chose it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qinco_jax.data.training_set import split_validation  # noqa: F401 - re-exported: the recipe splits with it
from qinco_jax.models import qinco as qm
from qinco_jax.data import validation
from qinco_jax.config import QincoConfig
from qinco_jax.metrics import mean_squared_error

# The reference's constants.
STATS_ROWS = 100_000          # normalisation statistics: the first 100k training vectors
RQ_MAX_ROWS = 1_000_000       # RQ initialisation: at most this many training vectors ...
RQ_INIT_ROWS = 200_000        # ... of which the k-means initial spread sees the first 200k
RQ_KMEANS_ITERS = 10
SHUFFLE_BLOCK = 2_000_000     # the training set is shuffled in blocks of this many rows
STATS_MOMENTUM = 0.1          # running mean / std of each step's target residual
IMPROVEMENT_EPS = 1e-6        # a validation MSE must beat the best by this to count
# Parameter subtrees that gradients never update (IVF centroids are frozen too).
FROZEN_SUBTREES = ("normalisation", "xtarget_stats")


# --------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------


def _optimizer(learning_rate, weight_decay, grad_clip: float, kind: str):
    # torch clips the gradients before optimizer.step(); Adam's (coupled) weight decay
    # is added to the clipped gradient inside the step, AdamW's is decoupled.
    parts = [optax.clip(grad_clip)] if grad_clip > 0 else []
    if kind == "adamw":
        # optax decays every leaf (no mask), as the reference's AdamW decays every
        # trainable parameter: codebooks, substep codebooks, weights and biases alike.
        parts.append(optax.adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay))
    elif kind == "adam":
        parts.append(optax.add_decayed_weights(weight_decay))
        parts.append(optax.adam(learning_rate, b1=0.9, b2=0.999, eps=1e-8))
    else:
        raise ValueError(f"unknown optimizer {kind!r}: use 'adamw' or 'adam'")
    return optax.chain(*parts)


def make_optimizer(weight_decay: float = 0.1, grad_clip: float = 0.1, kind: str = "adamw"
                   ) -> optax.GradientTransformation:
    """QINCo2's optimizer: gradients clipped BY VALUE to [-grad_clip, grad_clip] (0: no
    clipping), then AdamW (torch defaults: betas 0.9/0.999, eps 1e-8) with decoupled
    weight decay, or Adam with L2 weight decay (`optimizer=adam`, the qinco1 preset).

    Apply it to the trainable parameters only (frozen IVF centroids, data mean/std and
    the running statistics are not parameters of the optimizer, as in the reference
    where they have no gradient). The learning rate and weight decay are injected
    hyperparameters: set the learning rate per batch with `set_learning_rate` inside
    the jitted step, it never recompiles."""
    if not (weight_decay >= 0 and math.isfinite(weight_decay)):
        raise ValueError(f"weight decay must be a finite number >= 0, got {weight_decay}")
    if not (grad_clip >= 0 and math.isfinite(grad_clip)):
        raise ValueError(f"grad_clip must be a finite number >= 0 (0: no clipping), got {grad_clip}")
    if kind not in ("adamw", "adam"):
        raise ValueError(f"unknown optimizer {kind!r}: use 'adamw' or 'adam'")
    factory = optax.inject_hyperparams(_optimizer, static_args=("grad_clip", "kind"))
    return factory(learning_rate=0.0, weight_decay=weight_decay, grad_clip=float(grad_clip), kind=kind)


def set_learning_rate(opt_state, lr) -> Any:
    """opt_state (of `make_optimizer`, or of optax.MultiSteps around it: gradient
    accumulation) with its learning rate set to lr (traceable). Under MultiSteps the
    inner optimizer reads the rate when it updates, so an update uses the rate of its
    last accumulated batch, as the reference (stepping its scheduler every batch) does."""
    if isinstance(opt_state, optax.MultiStepsState):
        return opt_state._replace(inner_opt_state=set_learning_rate(opt_state.inner_opt_state, lr))
    hyper = dict(opt_state.hyperparams)
    hyper["learning_rate"] = jnp.asarray(lr, dtype=jnp.asarray(hyper["learning_rate"]).dtype)
    return opt_state._replace(hyperparams=hyper)


# --------------------------------------------------------------------------------------
# Learning-rate schedules and the stopping rule
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CosineSchedule:
    """The reference's `RampCosineLRSchedule` (scheduler.name=cosine), a LambdaLR with

        f(t) = max(min(t / ramp_epochs, 1), floor)                     t < ramp_epochs
        f(t) = max(cos(min((t - ramp_epochs) / epochs, 1) * pi / 2), floor)  after

    and lr(t) = lr * f(t), t in epochs (fractional within an epoch). The floor is
    `lr * lr_min_fact` used as a FACTOR (reference quirk: 0.0008 * 1e-3 = 8e-7, so the
    first epoch is announced at lr = 6.4e-10). Arithmetic is Python floats in the
    reference's order, so values equal the reference's bit for bit."""

    lr: float = 8e-4
    ramp_epochs: float = 3
    epochs: float = 60
    lr_min_fact: float = 1e-3

    def __post_init__(self):
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"learning rate must be a positive number, got {self.lr}")
        if self.ramp_epochs < 0:
            raise ValueError(f"scheduler.ramp_epochs must be >= 0, got {self.ramp_epochs}")
        if self.epochs <= 0:
            raise ValueError(f"epochs must be > 0 for the cosine schedule, got {self.epochs}")

    @property
    def floor(self) -> float:
        return self.lr * self.lr_min_fact

    def factor(self, t: float) -> float:
        if t < self.ramp_epochs:
            return max(min(t / self.ramp_epochs, 1.0), self.floor)
        p = (t - self.ramp_epochs) / self.epochs
        return max(math.cos(min(p, 1.0) * math.pi / 2), self.floor)

    def lr_at(self, t: float) -> float:
        return self.lr * self.factor(t)

    def epoch_start_lr(self, epoch: int) -> float:
        """The rate the reference announces (and logs) at the start of `epoch`."""
        return self.lr_at(epoch)

    def batch_lr(self, epoch: int, i_batch: int, n_batches: int) -> float:
        """The rate batch i_batch (0-based) of `epoch` trains with: the reference steps
        its scheduler to epoch + (i_batch + 1) / n_batches BEFORE the optimizer step."""
        return self.lr_at(epoch + (i_batch + 1) / n_batches)

    def epoch_lrs(self, epoch: int, n_batches: int) -> np.ndarray:
        """batch_lr of every batch of the epoch, float64 (n_batches,)."""
        return np.array([self.batch_lr(epoch, i, n_batches) for i in range(n_batches)])


@dataclasses.dataclass
class PlateauSchedule:
    """torch's ReduceLROnPlateau as the reference configures it (scheduler.name=
    reduce_lr_plateau, the qinco1 preset): mode min, relative threshold, no cooldown.
    `step(val_mse)` is called at the start of every epoch with the last validation MSE
    (the first with the MSE of the untrained model); the rate is constant within an
    epoch. State: plain numbers (`dataclasses.asdict` / `PlateauSchedule(**state)`)."""

    lr: float = 1e-4
    factor: float = 0.1
    patience: int = 10
    threshold: float = 1e-10
    min_lr: float = 1e-6
    best: float = math.inf
    num_bad_epochs: int = 0

    def step(self, val_mse: float) -> float:
        if val_mse < self.best * (1.0 - self.threshold):
            self.best = float(val_mse)
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.num_bad_epochs > self.patience:
            new_lr = max(self.lr * self.factor, self.min_lr)
            if self.lr - new_lr > 1e-8:  # torch's eps
                self.lr = new_lr
            self.num_bad_epochs = 0
        return self.lr


@dataclasses.dataclass(frozen=True)
class TrainProgress:
    """Where training stands, as the reference's MetricLogger keeps it; plain numbers
    (`dataclasses.asdict` to checkpoint, `TrainProgress(**d)` to resume).

    epoch: completed epochs (the next epoch's index; the `.pt` file's `epoch`).
    best_mse / best_mse_epoch: best validation MSE so far and the epoch that gave it
    (-1: none yet; the MSE before training does not count). step: optimizer steps."""

    epoch: int = 0
    best_mse: float = math.inf
    best_mse_epoch: int = -1
    step: int = 0

    def after_epoch(self, val_mse: float, n_steps: int = 0) -> tuple["TrainProgress", bool]:
        """Record the validation MSE of the epoch just trained; returns the new
        progress and whether this epoch is the best so far (the reference then writes
        the model, before resetting unused codewords)."""
        improved = val_mse < self.best_mse - IMPROVEMENT_EPS
        return dataclasses.replace(
            self, epoch=self.epoch + 1, step=self.step + n_steps,
            best_mse=float(val_mse) if improved else self.best_mse,
            best_mse_epoch=self.epoch if improved else self.best_mse_epoch), improved


def should_stop(progress: TrainProgress, epochs: int, stop_patience: int, cosine: bool = True) -> bool:
    """The reference's test before every epoch. With e = the last completed epoch's
    index (-1 before the first): stop if e - best_mse_epoch > stop_patience (no
    improvement for stop_patience epochs), or, cosine schedule only, if
    e >= epochs + stop_patience. So a cosine run trains at most
    `epochs + stop_patience + 1` epochs (13 for epochs=10, stop_patience=2)."""
    last = progress.epoch - 1
    if last - progress.best_mse_epoch > stop_patience:
        return True
    return bool(cosine and last >= epochs + stop_patience)


def max_epochs(epochs: int, stop_patience: int, cosine: bool = True) -> int | None:
    """Epochs a run trains when the validation MSE keeps improving (None: unbounded)."""
    return epochs + stop_patience + 1 if cosine else None


# --------------------------------------------------------------------------------------
# Data: validation split, epoch order, normalisation
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DataOrder:
    """Which training rows each epoch sees, in which order.

    The reference reads the training set through a block shuffle (a random permutation
    of each block of SHUFFLE_BLOCK rows) and, when `loop` < n, through a window of
    `loop` positions that advances by `loop` every epoch: epoch e trains on positions
    (i + loop * e) mod n, i < loop, in that order. Otherwise (loop >= n, unset, or
    qinco1_mode) every epoch sees all n rows in the same shuffled order.

    Deviation: the reference draws the block permutations from numpy's global RNG and
    re-draws one whenever its cache reloads a block (n > SHUFFLE_BLOCK); here block b's
    permutation is `RandomState([seed, b]).permutation`, fixed for the whole run (and a
    resumed run), which for n <= SHUFFLE_BLOCK is the same kind of order."""

    n: int
    loop: int | None = 10_000_000
    seed: int = 0
    block: int = SHUFFLE_BLOCK

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"the training set is empty (n={self.n})")
        if self.loop is not None and self.loop < 0:
            raise ValueError(f"ds.loop must be >= 0 or null, got {self.loop}")
        if self.block < 1:
            raise ValueError(f"shuffle block must be >= 1, got {self.block}")

    @classmethod
    def for_run(cls, n: int, loop: int | None, seed: int, qinco1_mode: bool = False) -> "DataOrder":
        """The order of a run.py training run: `ds.loop`, numpy seed `seed`; the
        reference does not loop in qinco1_mode (every epoch is the whole set)."""
        return cls(n, None if qinco1_mode else loop, seed)

    @property
    def epoch_size(self) -> int:
        return min(self.loop, self.n) if self.loop else self.n

    def positions(self, epoch: int) -> np.ndarray:
        """Positions (before the shuffle) of the epoch's samples, int64 (epoch_size,)."""
        i = np.arange(self.epoch_size, dtype=np.int64)
        if self.epoch_size == self.n:
            return i
        return (i + self.epoch_size * int(epoch)) % self.n

    def _block_permutation(self, b: int) -> np.ndarray:
        size = min(self.block, self.n - b * self.block)
        return np.random.RandomState([self.seed, b]).permutation(size)

    def rows(self, epoch: int) -> np.ndarray:
        """Row indices into the training set, in training order, int64 (epoch_size,)."""
        pos = self.positions(epoch)
        out = np.empty_like(pos)
        blocks = pos // self.block
        for b in np.unique(blocks):
            sel = blocks == b
            out[sel] = b * self.block + self._block_permutation(int(b))[pos[sel] - b * self.block]
        return out

    def batches(self, epoch: int, batch_size: int) -> list[np.ndarray]:
        """The epoch's rows cut in batches of batch_size; the last, smaller one is kept."""
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        rows = self.rows(epoch)
        return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]

    def num_batches(self, batch_size: int) -> int:
        return -(-self.epoch_size // batch_size)

    def rq_rows(self, batch_size: int, max_rows: int = RQ_MAX_ROWS) -> np.ndarray:
        """The rows the reference's RQ initialisation trains on: epoch 0's batches,
        whole batches only, as long as their total stays <= max_rows (the first batch
        always). With loop < n that is the first `loop` rows of the order only."""
        return epoch_prefix(self.batches(0, batch_size), max_rows)


def epoch_prefix(batches: list[np.ndarray], max_rows: int) -> np.ndarray:
    """The reference's `extract_data_block`: leading whole batches totalling <= max_rows."""
    kept, total = [], 0
    for b in batches:
        total += len(b)
        if kept and total > max_rows:
            break
        kept.append(b)
    return np.concatenate(kept) if kept else np.zeros(0, np.int64)


def normalisation_stats(xt: np.ndarray, qinco1_mode: bool = False) -> tuple[np.ndarray, float]:
    """(data_mean (d,) float32, data_std float): the model normalises x as
    (x - data_mean) / data_std.

    QINCo2: the per-dimension mean and the global standard deviation (all elements,
    ddof 0) of the first STATS_ROWS training vectors, computed by numpy in the data's
    own dtype as the reference does. qinco1_mode: data_mean = min + 1 in every
    dimension and data_std = (max - min) / 2 over the whole training split."""
    xt = xt if hasattr(xt, "shape") else np.asarray(xt)  # a memory map stays one: read chunk by chunk
    if xt.ndim != 2 or len(xt) == 0:
        raise ValueError(f"training vectors must be a non-empty (n, d) array, got shape {xt.shape}")
    if qinco1_mode:
        from qinco_jax.training import streaming

        d_min, d_max = streaming.extremes(xt)
        mean = np.ones(xt.shape[1], np.float32) * np.float32(d_min) + np.float32(1)
        std = (d_max - d_min) / 2
    else:
        stats = xt[:STATS_ROWS]
        mean, std = stats.mean(0), float(stats.std())
    if not (std > 0 and math.isfinite(std)):
        raise ValueError(f"the training vectors have no spread (std={std}): cannot normalise them")
    return np.asarray(mean, np.float32), float(np.float32(std))


# --------------------------------------------------------------------------------------
# RQ initialisation
# --------------------------------------------------------------------------------------


def _nearest(x: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    import faiss

    index = faiss.IndexFlatL2(codebook.shape[1])
    index.add(np.ascontiguousarray(codebook, np.float32))
    _, ids = index.search(np.ascontiguousarray(x, np.float32), 1)
    return ids[:, 0]


def kmeans_reference(x: np.ndarray, K: int, iters: int, rs: np.random.RandomState) -> np.ndarray:
    """The reference's `TorchSingleVQ.train_static_rq`: K centroids drawn uniform in
    [0, 1) per dimension, scaled by the per-dimension std (ddof 1) and shifted by the
    mean of the first RQ_INIT_ROWS vectors, then `iters` Lloyd iterations (exact
    nearest assignment, centroid = mean of its points). An empty cluster becomes a
    fresh uniform [0, 1)^d vector, unscaled (reference quirk)."""
    x = np.ascontiguousarray(x, np.float32)
    head = x[:RQ_INIT_ROWS]
    mean, std = head.mean(0), head.std(0, ddof=1)
    codebook = (rs.random_sample((K, x.shape[1])).astype(np.float32) * std + mean).astype(np.float32)
    for _ in range(iters):
        assign = _nearest(x, codebook)
        counts = np.bincount(assign, minlength=K)
        sums = np.zeros((K, x.shape[1]), np.float64)
        np.add.at(sums, assign, x)
        empty = counts == 0
        sums[empty] = rs.random_sample((int(empty.sum()), x.shape[1]))
        codebook = (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
    return codebook


@dataclasses.dataclass(frozen=True)
class RQInit:
    """RQ initialisation result: `codebooks` (raw units) of the M network steps' plain
    codebooks (IVF: the steps after the centroids), and the train / validation MSE
    (reference metric: sum over dimensions of the mean squared error, raw units)."""

    codebooks: np.ndarray  # (S, K, d) float32
    train_mse: float
    val_mse: float | None


def train_rq_init(xt: np.ndarray, M: int, K: int, *, ivf_centroids: np.ndarray | None = None,
                  xval: np.ndarray | None = None, seed: int = 0, iters: int = RQ_KMEANS_ITERS,
                  qinco1_mode: bool = False) -> RQInit:
    """The reference's RQ initialisation, in raw units: one k-means (kmeans_reference)
    per step on the residuals of the previous steps. With IVF centroids the first
    stage is the nearest centroid (frozen) and M more stages follow; `codebooks` holds
    the M trained ones. qinco1_mode: a faiss ResidualQuantizer with one codebook per
    stage (the reference trains M (+1 with IVF) such stages on the raw vectors, ignoring
    the IVF; its first M are returned, as the reference hands them to the steps)."""
    xt = validation.as_finite_float32(xt, "training vectors")
    if xval is not None:
        validation.check_all_finite(xval, "validation vectors")
    n_stages = M + (1 if ivf_centroids is not None else 0)
    if len(xt) < K:
        raise ValueError(f"the RQ initialisation needs at least K={K} training vectors, got {len(xt)}")
    if qinco1_mode:
        import faiss

        nbits = int(round(math.log2(K)))
        if 1 << nbits != K:
            raise ValueError(f"qinco1_mode's faiss RQ needs K a power of two, got {K}")
        rqs, residual, books = [], xt.copy(), []
        for _ in range(n_stages):
            rq = faiss.ResidualQuantizer(xt.shape[1], 1, nbits)
            with validation.faiss_step(f"RQ training (1x{nbits} bits)", on=f"{len(xt)} x {xt.shape[1]} training vectors"):
                rq.train(residual)
            residual = residual - rq.decode(rq.compute_codes(residual))
            rqs.append(rq)
            books.append(faiss.vector_float_to_array(rq.codebooks).reshape(K, -1))

        def quantize(x):
            r = np.ascontiguousarray(x, np.float32).copy()
            for rq in rqs:
                r = r - rq.decode(rq.compute_codes(r))
            return x - r

        codebooks = np.stack(books[:M])
    else:
        rs = np.random.RandomState(seed)
        residual, books = xt.copy(), []
        if ivf_centroids is not None:
            ivf = np.asarray(ivf_centroids, np.float32)
            residual = residual - ivf[_nearest(residual, ivf)]
        for _ in range(M):
            book = kmeans_reference(residual, K, iters, rs)
            residual = residual - book[_nearest(residual, book)]
            books.append(book)
        codebooks = np.stack(books)

        def quantize(x):
            r = np.ascontiguousarray(x, np.float32).copy()
            if ivf_centroids is not None:
                r = r - ivf[_nearest(r, ivf)]
            for book in books:
                r = r - book[_nearest(r, book)]
            return x - r

    val_mse = mean_squared_error(xval, quantize(xval)) if xval is not None and len(xval) else None
    return RQInit(codebooks.astype(np.float32), mean_squared_error(xt, quantize(xt)), val_mse)


def initial_codebooks(rq_codebooks: np.ndarray, data_mean: np.ndarray, data_std: float, *,
                      ivf: bool, key: jax.Array, noise: float = 0.1, qinco1_mode: bool = False) -> np.ndarray:
    """The steps' initial codebooks (normalised units) from raw RQ codebooks (S, K, d),
    as the reference's `initialize_qinco_codebooks`: step 0 of a plain model is
    (c - mean) / std, every other (residual) codebook c / std; then each gets Gaussian
    noise of std `noise * std(codebook)` (all elements, ddof 1; noise 1 in
    qinco1_mode). A step's substep codebook starts equal to its codebook (the same
    noisy tensor). Returns float32 (S, K, d)."""
    books = np.asarray(rq_codebooks, np.float32)
    if books.ndim != 3:
        raise ValueError(f"RQ codebooks must be (steps, K, d), got shape {books.shape}")
    mean = np.asarray(data_mean, np.float32)
    std = np.float32(data_std)
    out = []
    keys = jax.random.split(key, len(books))
    scale = 1.0 if qinco1_mode else noise
    for i, c in enumerate(books):
        c = (c - mean) / std if (i == 0 and not ivf) else c / std
        eps = np.asarray(jax.random.normal(keys[i], c.shape, jnp.float32))
        out.append(c + eps * c.std(ddof=1) * np.float32(scale))
    return np.stack(out).astype(np.float32)


# --------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------


def _weighted_mean(sq: jax.Array, weights: jax.Array | None) -> jax.Array:
    """Mean over rows and dimensions of sq (..., B, d); rows weighted (padding = 0)."""
    if weights is None:
        return jnp.mean(sq, axis=(-2, -1))
    per_row = jnp.mean(sq, axis=-1)
    return jnp.sum(per_row * weights, axis=-1) / jnp.sum(weights)


def step_mse_losses(partial_xhats: jax.Array, x: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """The reference's `mse_loss` of each network/codebook step, (S,): the mean over
    vectors and dimensions of (x̂_m - x)², x̂_m the reconstruction after step m, all in
    normalised units. partial_xhats (S, B, d). The IVF step has no loss (it is frozen):
    pass only the steps after it. The training loss is the sum of these and of
    `substep_losses`."""
    return _weighted_mean((partial_xhats - x[None]) ** 2, weights)


def substep_losses(x: jax.Array, xhats_before: jax.Array, substep_codebooks: jax.Array, codes: jax.Array,
                   weights: jax.Array | None = None) -> jax.Array:
    """The substep codebooks' loss, (S,): for step m, mean over vectors and dimensions
    of (x̂_{m-1} + S_m[code_m] - x)², where x̂_{m-1} is the reconstruction before the
    step, held constant (no gradient flows into the network through it) and S_m the
    step's substep codebook (trained as a plain RQ codebook on the step's residual).
    xhats_before (S, B, d), substep_codebooks (S, K, d), codes (S, B) int."""
    chosen = jnp.take_along_axis(substep_codebooks, codes[:, :, None].astype(jnp.int32), axis=1)
    return _weighted_mean((jax.lax.stop_gradient(xhats_before) + chosen - x[None]) ** 2, weights)


# --------------------------------------------------------------------------------------
# Running target statistics and the reset of unused codewords
# --------------------------------------------------------------------------------------


def encode_chunk_rows(enc_max_bs: int, A: int, B: int) -> int:
    """Rows per encode call in the reference (`enc_max_bs // (B * max(A, 1))`): a
    training batch larger than this is encoded, and its statistics updated, chunk by
    chunk. 0 / None enc_max_bs: no chunking (returns 0)."""
    if not enc_max_bs:
        return 0
    return max(enc_max_bs // (B * (A or 1)), 1)


def update_target_stats(mean: jax.Array, std: jax.Array, x: jax.Array, xhat_beam: jax.Array,
                        momentum: float = STATS_MOMENTUM) -> tuple[jax.Array, jax.Array]:
    """One training-mode encode's update of a step's running statistics (the
    reference's `xtarget_mean` / `xtarget_var` buffers; the latter holds a standard
    deviation): target = x - x̂ over the beam of partial reconstructions entering the
    step; new = momentum * batch statistic + (1 - momentum) * old, where the batch
    statistic is the mean / the std (ddof 1) over all rows and beam entries.
    x (B, d), xhat_beam (B, F, d) (F = 1 before the beam opens). Initial values: 0, 1."""
    target = (x[:, None, :] - xhat_beam).reshape(-1, x.shape[-1])
    batch_mean = jnp.mean(target, axis=0)
    batch_std = jnp.std(target, axis=0, ddof=1)
    return (momentum * batch_mean + (1 - momentum) * mean,
            momentum * batch_std + (1 - momentum) * std)


def codeword_usage(codes: jax.Array, K: int) -> jax.Array:
    """How many times each codeword was chosen: codes (..., S) int -> (S, K) int32.
    Sum this over the epoch's training batches (the reference counts the codes the
    training encode chose; validation codes do not count)."""
    codes = codes.reshape(-1, codes.shape[-1]).astype(jnp.int32)
    onehot = jax.nn.one_hot(codes, K, dtype=jnp.int32)  # (N, S, K)
    return jnp.sum(onehot, axis=0)


def reset_unused_codewords(codebooks: jax.Array, substep_codebooks: jax.Array | None, usage: jax.Array,
                           target_mean: jax.Array, target_std: jax.Array, key: jax.Array, *,
                           noise: float = 0.1, qinco1_mode: bool = False):
    """The reference's end-of-epoch reset (not in qinco1_mode: returned unchanged).

    For each step, a codeword that no training vector of the epoch chose (usage 0) is
    replaced by a random one: U[0, 1)^(K x d) standardised by its own global mean and
    std (ddof 1), times the running target std plus the running target mean. The
    substep codebook's same entries get that codeword plus Gaussian noise of std
    `noise * std(new codebook) / 4`. Used entries are kept.

    codebooks (S, K, d) of the steps that have one (IVF centroids are never reset),
    substep_codebooks (S', K, d) those of the LAST S' of these steps (a plain model's
    step 0 has none), usage (S, K), target_mean / target_std (S, d).
    Returns (codebooks, substep_codebooks, n_reset (S,) int)."""
    if qinco1_mode:
        return codebooks, substep_codebooks, jnp.zeros(codebooks.shape[0], jnp.int32)
    return _reset_unused(codebooks, substep_codebooks, usage, target_mean, target_std, key, float(noise))


@functools.partial(jax.jit, static_argnames=("noise",))
def _reset_unused(codebooks, substep_codebooks, usage, target_mean, target_std, key, noise):
    S, K, d = codebooks.shape
    k_uniform, k_noise = jax.random.split(key)
    u = jax.random.uniform(k_uniform, (S, K, d), codebooks.dtype)
    u_mean = jnp.mean(u, axis=(1, 2), keepdims=True)
    u_std = jnp.std(u, axis=(1, 2), ddof=1, keepdims=True)
    new = (u - u_mean) / u_std * target_std[:, None, :] + target_mean[:, None, :]
    used = (usage > 0)[:, :, None]
    out = jnp.where(used, codebooks, new)
    out_sub = substep_codebooks
    if substep_codebooks is not None:
        first = S - substep_codebooks.shape[0]  # the substep codebooks of the last steps
        if first < 0 or substep_codebooks.shape[1:] != (K, d):
            raise ValueError(f"substep codebooks {substep_codebooks.shape} do not match the last steps "
                             f"of the codebooks {codebooks.shape}")
        new_s = new[first:]
        new_std = jnp.std(new_s, axis=(1, 2), ddof=1, keepdims=True)
        new_sub = new_s + jax.random.normal(k_noise, new_s.shape, new_s.dtype) * new_std * (noise / 4)
        out_sub = jnp.where(used[first:], substep_codebooks, new_sub)
    return out, out_sub, jnp.sum(usage == 0, axis=1).astype(jnp.int32)


# --------------------------------------------------------------------------------------
# The same pieces on a model's parameter pytree (what the training loop calls)
# --------------------------------------------------------------------------------------


def split_trainable(params: dict, is_ivf: bool) -> tuple[dict, dict]:
    """(trainable, frozen) parts of a parameter pytree: the normalisation, the running
    target statistics and IVF centroids are frozen (the reference has no gradient for
    them); everything else (codebooks, substep codebooks, network weights) trains."""
    frozen = {k: params[k] for k in FROZEN_SUBTREES if k in params}
    if is_ivf:
        frozen["codebook0"] = params["codebook0"]
    trainable = {k: v for k, v in params.items() if k not in frozen}
    return trainable, frozen


def _codebook_step_inputs(xhats: jax.Array, n_stats: int) -> jax.Array:
    """The reconstruction entering each codebook step that has running statistics
    (the last n_stats of the W steps; an IVF step has none): xhats (W, B, d) after
    each step -> (n_stats, B, d), zero before the first step."""
    before = jnp.concatenate([jnp.zeros_like(xhats[:1]), xhats[:-1]], axis=0)
    return before[before.shape[0] - n_stats:]


def model_losses(params: dict, x: jax.Array, codes: jax.Array, weights: jax.Array | None = None, *,
                 outer_skip: bool, is_ivf: bool):
    """(mse_loss, substep_loss, xhats) of a batch in model units, QINCo2's sums of
    per-step means (rows weighted: padding rows weigh 0).

    mse_loss = sum over the steps with parameters (all but an IVF step) of
    step_mse_losses; substep_loss = sum over the network steps of substep_losses
    (0 without substep codebooks). Codes come from a no-gradient encode; xhats (W, B, d)
    are the partial reconstructions (for the running statistics)."""
    xhats = qm.decode_steps(params, codes, outer_skip=outer_skip)
    per_step = step_mse_losses(xhats.astype(jnp.float32), x.astype(jnp.float32), weights)
    mse = jnp.sum(per_step[1:]) if is_ivf else jnp.sum(per_step)
    steps = params["steps"]
    if "substep_codebook" not in steps:
        return mse, jnp.zeros((), mse.dtype), xhats
    sub = substep_losses(x.astype(jnp.float32), xhats[:-1].astype(jnp.float32),
                         steps["substep_codebook"].astype(jnp.float32), codes[:, 1:].T, weights)
    return mse, jnp.sum(sub), xhats


def update_model_target_stats(stats: dict, x: jax.Array, xhats: jax.Array, weights: jax.Array | None = None,
                              momentum: float = STATS_MOMENTUM) -> dict:
    """`update_target_stats` for every codebook step at once: stats {mean, var} (M, d),
    x (B, d), xhats (W, B, d) the partial reconstructions of the chosen codes.

    Deviation: the reference takes the statistic over the whole beam entering a step
    (and once per `enc_max_bs` chunk); here it is over the chosen path's partial
    reconstructions, once per batch (rows weighted: padding rows weigh 0). The
    statistics only decide where unused codewords are re-drawn."""
    n_stats = stats["mean"].shape[0]
    target = x[None].astype(jnp.float32) - jax.lax.stop_gradient(
        _codebook_step_inputs(xhats, n_stats)).astype(jnp.float32)  # (M, B, d)
    w = jnp.ones(x.shape[0], jnp.float32) if weights is None else weights.astype(jnp.float32)
    n = jnp.sum(w)
    mean = jnp.einsum("mbd,b->md", target, w) / n
    var = jnp.einsum("mbd,b->md", (target - mean[:, None]) ** 2, w) / jnp.maximum(n - 1, 1)
    return {"mean": momentum * mean + (1 - momentum) * stats["mean"],
            "var": momentum * jnp.sqrt(var) + (1 - momentum) * stats["var"]}


def model_codeword_usage(codes: jax.Array, K: int, n_stats: int, weights: jax.Array | None = None) -> jax.Array:
    """Uses of each codeword of the codebook steps (the last n_stats code columns; an
    IVF column is not counted) in a batch, padding rows excluded: (n_stats, K) int32."""
    onehot = jax.nn.one_hot(codes[:, codes.shape[1] - n_stats:], K, dtype=jnp.int32)  # (B, S, K)
    if weights is not None:
        onehot = onehot * (weights > 0).astype(jnp.int32)[:, None, None]
    return jnp.sum(onehot, axis=0)


def reset_model_codewords(params: dict, config: QincoConfig, usage, key: jax.Array, noise: float = 0.1
                          ) -> tuple[dict, np.ndarray]:
    """`reset_unused_codewords` on a model's parameters: usage (M, K) counts per
    codebook step (codebook0 first unless IVF, then the network steps). Returns the
    new parameters and the number of codewords reset per step (none in qinco1_mode
    or for a QINCo v1 model)."""
    usage = jnp.asarray(usage)
    if usage.shape != (config.M, config.K):
        raise ValueError(f"usage has shape {usage.shape}, expected (M, K) = {(config.M, config.K)}")
    if not config.is_qinco2 or config.qinco1_mode:
        return params, np.zeros(config.M, np.int64)
    steps = params["steps"]
    books = steps["codebook"] if config.is_ivf else jnp.concatenate([params["codebook0"][None], steps["codebook"]])
    stats = params["xtarget_stats"]
    new, new_sub, n_reset = _reset_unused(jnp.asarray(books), steps.get("substep_codebook"), usage,
                                          stats["mean"], stats["var"], key, float(noise))
    out = dict(params)
    out["steps"] = dict(steps)
    if config.is_ivf:
        out["steps"]["codebook"] = new
    else:
        out["codebook0"], out["steps"]["codebook"] = new[0], new[1:]
    if new_sub is not None:
        out["steps"]["substep_codebook"] = new_sub
    return out, np.asarray(n_reset)
