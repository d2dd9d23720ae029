"""Building blocks of QINCo2's training recipe, as pure functions (not wired into
training.py yet).

- the optimiser: gradients clipped by value, then AdamW (torch's: decoupled weight
  decay scaled by the learning rate), on the trainable leaves only;
- the learning rate: a linear ramp over the first epochs then a cosine decay, stepped
  per batch at fractional epochs (update u of an epoch of n batches runs at epoch
  time (u + 1) / n), with QINCo2's floor on the *factor*;
- the per-batch loss: the squared error after every network step plus, per step, that
  of its substep codebook on the same codes (the substep sees a detached x̂);
- the running statistics of each step's target and the re-initialisation of the
  codewords an epoch did not use.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qinco_jax import model as qm
from qinco_jax.config import QincoConfig
from qinco_jax.model import Params

FROZEN_SUBTREES = ("normalisation", "xtarget_stats")


def lr_factor(t, ramp_epochs: float, max_epochs: float, min_val: float):
    """QINCo2's RampCosineLRSchedule at epoch time t (float or jnp scalar)."""
    ramp = jnp.maximum(jnp.minimum(t / ramp_epochs, 1.0), min_val) if ramp_epochs > 0 else 1.0
    angle = jnp.minimum((t - ramp_epochs) / max_epochs, 1.0) * (math.pi / 2)
    cosine = jnp.maximum(jnp.cos(angle), min_val)
    return jnp.where(t < ramp_epochs, ramp, cosine)


def lr_schedule(lr: float, steps_per_epoch: int, ramp_epochs: float = 3, max_epochs: float = 60,
                lr_min_fact: float = 1e-3) -> optax.Schedule:
    """Learning rate of optimiser update u (0-based, counted over the whole run).

    QINCo2 passes `lr * lr_min_fact` as the factor floor (so the very first update runs
    at lr² · lr_min_fact); kept as is."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    min_val = lr * lr_min_fact

    def schedule(count):
        t = (jnp.asarray(count, jnp.float32) + 1.0) / steps_per_epoch
        return lr * lr_factor(t, ramp_epochs, max_epochs, min_val)

    return schedule


def trainable_labels(config: QincoConfig, params: Params) -> Params:
    """'train' or 'frozen' for every leaf: the normalisation, the running statistics and
    the IVF centroids are not trained."""

    def label(path, _):
        top = path[0].key
        frozen = top in FROZEN_SUBTREES or (top == "codebook0" and config.is_ivf)
        return "frozen" if frozen else "train"

    return jax.tree_util.tree_map_with_path(label, params)


def optimizer(config: QincoConfig, params: Params, *, lr: float = 8e-4, weight_decay: float = 0.1,
              grad_clip: float = 0.1, steps_per_epoch: int, ramp_epochs: float = 3, max_epochs: float = 60,
              lr_min_fact: float = 1e-3) -> optax.GradientTransformation:
    """QINCo2's optimiser: clip each gradient value to [-grad_clip, grad_clip] (0: no
    clipping), then AdamW(lr schedule, betas (0.9, 0.999), eps 1e-8, weight_decay)."""
    chain = [optax.clip(grad_clip)] if grad_clip else []
    chain.append(optax.adamw(lr_schedule(lr, steps_per_epoch, ramp_epochs, max_epochs, lr_min_fact),
                             b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay))
    return optax.multi_transform({"train": optax.chain(*chain), "frozen": optax.set_to_zero()},
                                 trainable_labels(config, params))


def losses(params: Params, x: jax.Array, codes: jax.Array, *, outer_skip: bool, is_ivf: bool):
    """(mse_loss, substep_loss) of a batch in model units, QINCo2's sums of per-step means.

    mse_loss = sum over the steps with parameters (all but an IVF step) of
    mean((x̂_m - x)²); substep_loss = sum over the network steps of
    mean((stop_gradient(x̂_{m-1}) + s_m[code_m] - x)²), s_m the substep codebook
    (0 without one). Codes come from a no-gradient encode."""
    xhats = qm.decode_steps(params, codes, outer_skip=outer_skip)  # (W, B, d)
    per_step = jnp.mean((xhats - x[None]) ** 2, axis=(1, 2))
    mse = jnp.sum(per_step[1:]) if is_ivf else jnp.sum(per_step)
    steps = params["steps"]
    if "substep_codebook" not in steps:
        return mse, jnp.zeros((), mse.dtype)
    prev = jax.lax.stop_gradient(xhats[:-1])  # x̂ before each network step: (S, B, d)
    sub = jax.vmap(lambda book, c: jnp.take(book, c, axis=0))(steps["substep_codebook"], codes[:, 1:].T)
    return mse, jnp.sum(jnp.mean((prev + sub - x[None]) ** 2, axis=(1, 2)))


def update_xtarget_stats(stats: Params, index: int, targets: jax.Array, momentum: float = 0.1) -> Params:
    """Fold one batch of a step's targets x - x̂ (any leading shape, last axis d) into
    its running statistics, as QINCo2 does while encoding in training mode: an
    exponential average of the mean and of the (unbiased) standard deviation, which
    QINCo2 stores under the name `xtarget_var`."""
    t = jnp.asarray(targets).reshape(-1, targets.shape[-1])
    old_mean, old_std = jnp.asarray(stats["mean"]), jnp.asarray(stats["var"])
    mean = jnp.mean(t, axis=0)
    std = jnp.std(t, axis=0, ddof=1)
    return {"mean": old_mean.at[index].set(momentum * mean + (1 - momentum) * old_mean[index]),
            "var": old_std.at[index].set(momentum * std + (1 - momentum) * old_std[index])}


def reset_unused_codewords(key: jax.Array, config: QincoConfig, params: Params, usage: np.ndarray,
                           noise_init: float = 0.1) -> tuple[Params, np.ndarray]:
    """Re-initialise the codewords an epoch never chose, as QINCo2 does after each epoch
    (not in qinco1_mode, never the IVF step).

    usage: (M, K) counts per codebook step (step 0 = codebook0 unless IVF, then the
    network steps). A new codeword is uniform noise, standardised over the whole
    (K, d) draw, scaled by the step's running target std and shifted by its mean; the
    substep codebook gets the same plus Gaussian noise of noise_init / 4 of its std.
    Returns the new parameters and the number of codewords reset per step."""
    usage = np.asarray(usage)
    if usage.shape != (config.M, config.K):
        raise ValueError(f"usage has shape {usage.shape}, expected (M, K) = {(config.M, config.K)}")
    if not config.is_qinco2 or config.qinco1_mode:
        return params, np.zeros(config.M, np.int64)
    stats = params["xtarget_stats"]
    new_params = jax.tree.map(lambda a: a, params)
    new_steps = dict(params["steps"])
    for name in ("codebook", "substep_codebook"):
        if name in new_steps:
            new_steps[name] = jnp.asarray(new_steps[name])
    for m in range(config.M):
        used = jnp.asarray(usage[m] > 0)[:, None]
        key, k_new, k_noise = jax.random.split(key, 3)
        fresh = jax.random.uniform(k_new, (config.K, config.d), jnp.float32)
        fresh = (fresh - fresh.mean()) / jnp.std(fresh, ddof=1)
        fresh = fresh * stats["var"][m] + stats["mean"][m]
        if m == 0 and not config.is_ivf:
            new_params["codebook0"] = jnp.where(used, params["codebook0"], fresh)
            continue
        s = m if config.is_ivf else m - 1  # index in the stacked network steps
        new_steps["codebook"] = new_steps["codebook"].at[s].set(jnp.where(used, new_steps["codebook"][s], fresh))
        if "substep_codebook" in new_steps:
            sub_fresh = fresh + jax.random.normal(k_noise, fresh.shape) * jnp.std(fresh, ddof=1) * noise_init / 4
            new_steps["substep_codebook"] = new_steps["substep_codebook"].at[s].set(
                jnp.where(used, new_steps["substep_codebook"][s], sub_fresh))
    new_params["steps"] = new_steps
    return new_params, (usage == 0).sum(axis=1)
