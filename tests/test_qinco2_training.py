"""QINCo2's training building blocks (qinco_jax.qinco2_training)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import require_torch
from qinco_jax import model as qm
from qinco_jax import qinco2_training as qt
from qinco_jax.config import QincoConfig
from qinco_jax.model import QincoModel

FIXTURES = Path(__file__).parent / "fixtures" / "qinco2"


def test_lr_at_epoch_starts_matches_reference_curve():
    ref = json.loads((FIXTURES / "train_reference_qinco2.json").read_text())
    cfg = ref["config"]
    lr, expected = cfg["lr"], ref["runs"][0]["lr_at_epoch_start"]
    got = [float(lr * qt.lr_factor(float(e), cfg["scheduler.ramp_epochs"], cfg["epochs"], lr * 1e-3))
           for e in range(len(expected))]
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # Stepped per batch: the last update of epoch e runs at epoch time e + 1.
    schedule = qt.lr_schedule(lr, 16, cfg["scheduler.ramp_epochs"], cfg["epochs"])
    np.testing.assert_allclose([float(schedule(16 * e - 1)) for e in range(1, len(expected))], expected[1:],
                               rtol=1e-5)
    assert float(schedule(0)) == pytest.approx(lr * (1 / 16) / 3, rel=1e-5)


def test_optimizer_matches_torch_adamw_with_value_clipping():
    torch = require_torch()
    config = QincoConfig(d=4, K=8, M=2, L=1, h=6, arch="qinco2", A=2, B=2)
    params = QincoModel.init(config, 0).numpy_params()
    rs = np.random.RandomState(0)
    grads = [jax.tree.map(lambda a: np.asarray(rs.randn(*a.shape) * 0.2, np.float32), params) for _ in range(4)]
    n, lr = 2, 8e-4
    tx = qt.optimizer(config, params, lr=lr, steps_per_epoch=n, max_epochs=5)
    state = tx.init(params)
    ours = params
    for g in grads:
        updates, state = tx.update(g, state, ours)
        ours = optax.apply_updates(ours, updates)

    w = torch.nn.Parameter(torch.from_numpy(np.array(params["steps"]["codebook"])))
    opt = torch.optim.AdamW([w], lr=lr, weight_decay=0.1)
    for u, g in enumerate(grads):
        # QINCo2 steps its scheduler to epoch time (u + 1) / n before each update.
        for group in opt.param_groups:
            group["lr"] = lr * float(qt.lr_factor((u + 1) / n, 3, 5, lr * 1e-3))
        w.grad = torch.from_numpy(np.array(g["steps"]["codebook"]))
        torch.nn.utils.clip_grad_value_([w], 0.1)
        opt.step()
    np.testing.assert_allclose(np.asarray(ours["steps"]["codebook"]), w.detach().numpy(), rtol=1e-5, atol=1e-7)
    # Frozen leaves do not move.
    for name in ("normalisation", "xtarget_stats"):
        jax.tree.map(np.testing.assert_array_equal, ours[name], params[name])


def test_ivf_centroids_are_frozen():
    config = QincoConfig(d=4, K=8, M=2, L=1, h=6, variant="ivf", K_IVF=5, arch="qinco2")
    labels = qt.trainable_labels(config, QincoModel.init(config, 0).params)
    assert labels["codebook0"] == "frozen" and labels["steps"]["codebook"] == "train"


def test_losses():
    config = QincoConfig(d=4, K=8, M=3, L=1, h=6, arch="qinco2", A=2, B=2)
    p = QincoModel.init(config, 3).numpy_params()
    p["steps"] = jax.tree.map(lambda a: a + 0.1 * np.random.RandomState(1).randn(*a.shape).astype(np.float32),
                              p["steps"])
    rs = np.random.RandomState(2)
    x = rs.randn(5, 4).astype(np.float32)
    codes = rs.randint(0, 8, size=(5, 3)).astype(np.int32)
    mse, sub = qt.losses(p, jnp.asarray(x), jnp.asarray(codes), outer_skip=True, is_ivf=False)
    xhats = np.asarray(qm.decode_steps(p, codes, outer_skip=True))
    np.testing.assert_allclose(float(mse), sum(np.mean((xh - x) ** 2) for xh in xhats), rtol=1e-5)
    expected_sub = sum(np.mean((xhats[s] + p["steps"]["substep_codebook"][s][codes[:, s + 1]] - x) ** 2)
                       for s in range(2))
    np.testing.assert_allclose(float(sub), expected_sub, rtol=1e-5)
    # The substep loss trains the substep codebooks only (x̂ is detached).
    g = jax.grad(lambda q: qt.losses(q, x, codes, outer_skip=True, is_ivf=False)[1])(p)
    assert np.abs(np.asarray(g["steps"]["substep_codebook"])).sum() > 0
    assert np.abs(np.asarray(g["steps"]["codebook"])).sum() == 0


def test_running_stats_and_reset_of_unused_codewords():
    config = QincoConfig(d=4, K=8, M=3, L=1, h=6, arch="qinco2", A=2, B=2)
    params = QincoModel.init(config, 0).numpy_params()
    targets = np.random.RandomState(0).randn(64, 2, 4).astype(np.float32) * 3 + 5
    stats = qt.update_xtarget_stats(params["xtarget_stats"], 1, jnp.asarray(targets))
    flat = targets.reshape(-1, 4)
    np.testing.assert_allclose(np.asarray(stats["mean"][1]), 0.1 * flat.mean(0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(stats["var"][1]), 0.1 * flat.std(0, ddof=1) + 0.9, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(stats["mean"][0]), 0)

    params["xtarget_stats"] = {"mean": np.full((3, 4), 100.0, np.float32), "var": np.full((3, 4), 2.0, np.float32)}
    usage = np.ones((3, 8), np.int64)
    usage[0, 2] = usage[2, 5] = usage[2, 6] = 0
    new, n_reset = qt.reset_unused_codewords(jax.random.key(0), config, params, usage)
    assert list(n_reset) == [1, 0, 2]
    np.testing.assert_array_equal(np.delete(np.asarray(new["codebook0"]), 2, 0), np.delete(params["codebook0"], 2, 0))
    assert abs(float(np.asarray(new["codebook0"])[2].mean()) - 100) < 10
    book = np.asarray(new["steps"]["codebook"][1])
    np.testing.assert_array_equal(book[:5], params["steps"]["codebook"][1][:5])
    assert np.all(np.abs(book[5:7] - 100) < 10)
    sub = np.asarray(new["steps"]["substep_codebook"][1])
    assert np.all(sub[5:7] != book[5:7]) and np.all(np.abs(sub[5:7] - book[5:7]) < 1)
    np.testing.assert_array_equal(np.asarray(new["steps"]["codebook"][0]), params["steps"]["codebook"][0])
    # qinco1_mode never resets.
    q1 = QincoConfig(d=4, K=8, M=3, L=1, h=6, arch="qinco2", qinco1_mode=True)
    p1 = QincoModel.init(q1, 0).numpy_params()
    same, n = qt.reset_unused_codewords(jax.random.key(0), q1, p1, usage)
    assert same is p1 and n.sum() == 0
