"""QINCo2 training's remaining reference knobs (run.py task=train): grad_accumulate,
optimizer=adam|adamw, scheduler.name=reduce_lr_plateau (with its state resumed). The
qinco1 preset end to end and a continued model's start epoch: test_reference_commands.py."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qinco_jax.cli import qinco2_train, run_config
from qinco_jax.training import loop as training
from qinco_jax.training import recipe
from qinco_jax.training.recipes import Qinco2Recipe

FIX = Path(__file__).resolve().parent / "fixtures"
SPEC = recipe.ModelSpec(arch="qinco2", M=2, K=16, L=1, h=32, de=24, A=4, B=2, seed=0)


def quiet(msg):
    pass


@pytest.fixture(scope="module")
def data():
    return np.load(FIX / "train_xt.npy")[:2000], np.load(FIX / "train_xval.npy")[:200]


def small_cfg(**kw):
    base = dict(batch_size=128, epochs=3, ramp_epochs=1, stop_patience=5, epoch_size=512, lr=2e-3, ngpu=1,
                progress=False)
    base.update(kw)
    return training.qinco2_train_config(**base)


@pytest.fixture(scope="module")
def model(data):
    return recipe.qinco2_initial_model(data[0], SPEC, small_cfg())[0]


def _steps(model, cfg, batches, lr=1e-2):
    """The recipe's compiled step run on each batch in turn: (trainable after each, opt_state)."""
    rec = Qinco2Recipe(cfg)
    mesh = training.make_mesh(1)
    opt = rec.optimizer()
    encode_fn = training.make_encode_fn(None, outer_skip=model.config.outer_skip)
    step = training.make_step(rec.loss_fn(model.config, encode_fn), opt, mesh)
    trainable, frozen = rec.split(model.params, model.config)
    state = opt.init(trainable)
    out = []
    for x in batches:
        x = jnp.asarray(model.normalise(x))
        trainable, state, frozen, *_ = step(trainable, state, frozen, x, None, jnp.ones(len(x), jnp.float32),
                                            np.float32(lr))
        out.append(trainable)
    return out, state


def _max_diff(a, b) -> float:
    return max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_grad_accumulate_2_updates_as_one_batch_twice_as_large(data, model):
    xt = data[0]
    B = 128
    (acc_1, acc_2), state = _steps(model, small_cfg(grad_accumulate=2), [xt[:B], xt[B:2 * B]])
    (big,), _ = _steps(model, small_cfg(), [xt[:2 * B]])
    (small,), _ = _steps(model, small_cfg(), [xt[:B]])
    start = Qinco2Recipe(small_cfg()).split(model.params, model.config)[0]
    assert isinstance(state, optax.MultiStepsState)
    assert _max_diff(acc_1, start) == 0  # the first batch only accumulates
    moved = _max_diff(big, start)
    assert moved > 1e-4
    assert _max_diff(acc_2, big) < 1e-3 * moved  # the mean gradient of both: one update of 2B rows
    assert _max_diff(small, big) > 0.01 * moved  # (one batch of B rows alone updates differently)


def test_grad_accumulate_trains_through_fit_and_the_cli_passes_it(data, tmp_path):
    xt, xval = data
    res = recipe.train_model(xt, xval, SPEC, small_cfg(grad_accumulate=2, epochs=1, stop_patience=0),
                             log=quiet)
    mses = [e["val_mse"] for e in res.history["epochs"]]
    assert len(mses) == 2 and min(mses) < res.history["before"]
    cfg = qinco2_train.train_config(run_config.parse_run_args(
        ["task=train", "trainset=x.npy", "output=m.pt", "grad_accumulate=3", "batch=64"]))
    assert (cfg.grad_accumulate, cfg.batch_size) == (3, 64)
    with pytest.raises(run_config.RunConfigError, match="grad_accumulate must be >= 1, got 0"):
        run_config.parse_run_args(["task=train", "trainset=x.npy", "output=m.pt", "grad_accumulate=0"])


def test_optimizer_adam_is_used(model, data):
    xt = data[0][:128]
    cfg = qinco2_train.train_config(run_config.parse_run_args(
        ["task=train", "trainset=x.npy", "output=m.pt", "optimizer=adam", "wd=0.5"]))
    assert cfg.optimizer == "adam"
    (adam,), adam_state = _steps(model, small_cfg(optimizer="adam", weight_decay=0.5), [xt])
    (adamw,), adamw_state = _steps(model, small_cfg(optimizer="adamw", weight_decay=0.5), [xt])
    # clip, add_decayed_weights, adam vs clip, adamw: the chain optimizer=adam builds
    assert (len(adam_state.inner_state), len(adamw_state.inner_state)) == (3, 2)
    assert _max_diff(adam, adamw) > 1e-5  # L2 decay inside Adam vs decoupled decay: different steps
    # without weight decay the two are the same optimizer
    (a0,), _ = _steps(model, small_cfg(optimizer="adam", weight_decay=0.0), [xt])
    (w0,), _ = _steps(model, small_cfg(optimizer="adamw", weight_decay=0.0), [xt])
    assert _max_diff(a0, w0) < 1e-7
    with pytest.raises(ValueError, match="optimizer"):
        small_cfg(optimizer="sgd")


class Killed(Exception):
    pass


def test_reduce_lr_plateau_reduces_when_validation_stalls_and_resumes(data, tmp_path):
    xt, xval = data
    # threshold_frac 0.5: only halving the best validation MSE would count as progress,
    # so after the first epoch every epoch stalls; patience 0: the rate drops at once.
    cfg = small_cfg(scheduler="reduce_lr_plateau", patience=0, threshold_frac=0.5, reduce_fact=0.1,
                    lr_min_fact=0.05, max_epochs=4, epoch_size=None)
    logs = []
    full = recipe.train_model(xt, xval, SPEC, cfg, checkpoint_dir=str(tmp_path / "a"), log=logs.append)
    lrs = [e["lr"] for e in full.history["epochs"]]
    # epoch 0 sets the best; epoch 1 stalls -> x0.1; epoch 2 stalls -> floor lr * lr_min_fact
    assert lrs == pytest.approx([2e-3, 2e-3, 2e-4, 1e-4])
    assert any("lr -> 0.0002" in m for m in logs)

    def killer(msg):  # killed after epoch 2's validation, before its checkpoint
        if msg.startswith("epoch 2 "):
            raise Killed()

    with pytest.raises(Killed):
        recipe.train_model(xt, xval, SPEC, cfg, checkpoint_dir=str(tmp_path / "b"), log=killer)
    resumed = recipe.train_model(xt, xval, SPEC, cfg, checkpoint_dir=str(tmp_path / "b"), log=quiet)
    assert [e["lr"] for e in resumed.history["epochs"]] == [e["lr"] for e in full.history["epochs"]]
    assert [e["val_mse"] for e in resumed.history["epochs"]] == [e["val_mse"] for e in full.history["epochs"]]


def test_reduce_lr_plateau_has_no_epoch_limit_but_stop_patience(data):
    xt, xval = data
    # cosine would stop after epochs + stop_patience + 1 = 2 epochs; the plateau
    # schedule runs until stop_patience epochs without a new best (or max_epochs)
    cfg = small_cfg(scheduler="reduce_lr_plateau", epochs=1, stop_patience=0, max_epochs=3, lr=1e-2)
    rec = Qinco2Recipe(cfg)
    schedule = rec.initial_schedule()
    schedule, best, _ = rec.after_epoch(schedule, 0, 1.0, 4)
    schedule, best, _ = rec.after_epoch(schedule, 1, 0.5, 4)
    assert best and not rec.should_stop(schedule, 2)
    schedule, best, _ = rec.after_epoch(schedule, 2, 0.7, 4)
    assert not best and rec.should_stop(schedule, 3)
    cosine = Qinco2Recipe(small_cfg(epochs=1, stop_patience=0, max_epochs=3))
    s = cosine.initial_schedule()
    s, _, _ = cosine.after_epoch(s, 0, 1.0, 4)
    s, _, _ = cosine.after_epoch(s, 1, 0.5, 4)
    assert cosine.should_stop(s, 2)
    run_cfg = qinco2_train.train_config(run_config.parse_run_args(
        ["task=train", "trainset=x.npy", "output=m.pt", "scheduler.name=reduce_lr_plateau",
         "scheduler.patience=3", "scheduler.reduce_fact=0.5", "scheduler.threshold_frac=0.01"]))
    assert (run_cfg.scheduler, run_cfg.patience, run_cfg.reduce_fact, run_cfg.threshold_frac) == (
        "reduce_lr_plateau", 3, 0.5, 0.01)
    assert run_cfg.max_epochs > 10_000
