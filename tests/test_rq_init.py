"""Exact-RQ initialisation: an untrained model decodes exactly as its RQ, training only
improves it."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from qinco_jax.training import rq_init
from qinco_jax.training import loop as training
from qinco_jax.config import QincoConfig
from qinco_jax.models.qinco import QincoModel, init_params

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures"


def quiet(msg):
    pass


def rq_greedy_decode(cb, x):
    xhat = np.zeros_like(x)
    for c in cb:
        i = np.argmin((((x - xhat)[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
        xhat = xhat + c[i]
    return xhat


def test_zeroes_only_the_output_layers_and_is_pure():
    config = QincoConfig(d=8, K=4, M=3, L=2, h=6)
    params = init_params(config, jax.random.key(0))
    zeroed = rq_init.zero_network_init(params)
    steps, before = zeroed["steps"], params["steps"]
    for name in ("concat_codeword", "concat_input"):
        assert all(not np.any(np.asarray(a)) for a in jax.tree.leaves(steps[name]))
    assert "bias" in steps["concat_codeword"]
    for block in ("residual_blocks_0", "residual_blocks_1"):
        assert not np.any(np.asarray(steps[block]["down"]["kernel"]))
        np.testing.assert_array_equal(steps[block]["up"]["kernel"], before[block]["up"]["kernel"])
        assert np.any(np.asarray(before[block]["down"]["kernel"]))  # the input is unchanged
    np.testing.assert_array_equal(steps["codebook"], before["codebook"])
    np.testing.assert_array_equal(zeroed["codebook0"], params["codebook0"])
    # QINCo-LR: only the low-rank output is zeroed, so the two halves still get gradients
    lr = rq_init.zero_network_init(init_params(QincoConfig(d=8, K=4, M=3, L=1, h=6, variant="lowrank"),
                                               jax.random.key(0)))["steps"]
    assert not np.any(np.asarray(lr["concat_out"]["kernel"]))
    assert np.any(np.asarray(lr["concat_input"]["kernel"]))


@pytest.mark.parametrize("lowrank", [False, True])
def test_untrained_model_is_the_rq_and_training_improves_it(lowrank):
    xt_all = np.load(FIX / "train_xt.npy")
    xt, xval = xt_all[:2000], xt_all[2000:2400]
    cb = rq_init.train_rq(xt, 4, 16, 1, log=quiet)
    rq_mse = float(np.mean(np.sum((xval - rq_greedy_decode(cb, xval)) ** 2, axis=1)))
    scale = np.float32(xt.max())
    config = QincoConfig(d=32, K=16, M=4, L=2, h=32, db_scale=float(scale),
                         variant="lowrank" if lowrank else "qinco")
    params = rq_init.zero_network_init(init_params(config, jax.random.key(0), codebooks=cb / scale))
    model = QincoModel(config, params)
    assert training.validation_mse(model, xval) == pytest.approx(rq_mse, rel=1e-5)
    if lowrank:
        return  # training is the same loop: one variant suffices
    cfg = training.TrainConfig(lr=1e-3, batch_size=256, max_epochs=3, ngpu=1, progress=False)
    res = training.fit(model, xt, xval, cfg, log=quiet)
    assert res.history["before"] == pytest.approx(rq_mse, rel=1e-5)
    mses = [e["val_mse"] for e in res.history["epochs"]]
    assert mses[-1] < rq_mse, (mses, rq_mse)


def test_cli_flag(tmp_path, capsys):
    from qinco_jax.cli import train as train_qinco

    args = ["--training_data", str(FIX / "train_xt.npy"), "--nt", "1500", "--nval", "300", "--M", "3",
            "--K", "16", "--L", "1", "--h", "16", "--ngpu", "1", "--progress", "off", "--max_epochs", "0",
            "--init", "rq_exact"]
    res = train_qinco.main(args)
    cb = np.asarray(res.best.params["steps"]["codebook"])
    assert not np.any(np.asarray(res.best.params["steps"]["residual_blocks_0"]["down"]["kernel"]))
    xval = np.load(FIX / "train_xt.npy")[1500:1800]
    codebooks = np.concatenate([np.asarray(res.best.params["codebook0"])[None], cb]) * res.best.config.db_scale
    rq = float(np.mean(np.sum((xval - rq_greedy_decode(codebooks, xval)) ** 2, axis=1)))
    assert res.history["before"] == pytest.approx(rq, rel=1e-4)
    assert train_qinco.build_parser().parse_args([]).init == "random"  # the reference's default
