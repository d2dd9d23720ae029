"""QINCo2 training end to end: below its RQ initialisation, untrained == RQ, kill and
resume == uninterrupted, the CLI's --arch qinco2 flags and run.py's train / eval_valset."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from qinco_jax.formats import checkpoint
from qinco_jax.training import recipe
from qinco_jax.training import loop as training

FIX = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="module")
def data():
    return np.load(FIX / "train_xt.npy")[:3000], np.load(FIX / "train_xval.npy")[:300]


def quiet(msg):
    pass


SPEC = recipe.ModelSpec(arch="qinco2", M=3, K=16, L=1, h=32, de=24, A=4, B=2, seed=0)


def small_cfg(**kw):
    base = dict(batch_size=256, epochs=3, ramp_epochs=1, stop_patience=1, epoch_size=1024, lr=2e-3, ngpu=1,
                progress=False)
    base.update(kw)
    return training.qinco2_train_config(**base)


def test_qinco2_train_config_defaults():
    cfg = training.qinco2_train_config()
    assert (cfg.lr, cfg.weight_decay, cfg.grad_clip, cfg.ramp_epochs, cfg.batch_size) == (8e-4, 0.1, 0.1, 3, 1024)
    assert cfg.max_epochs == 60 + 10 + 1 and cfg.persistent_optimizer
    assert training.qinco2_train_config(epochs=5, stop_patience=2).max_epochs == 8
    with pytest.raises(ValueError, match="dtype"):
        training.qinco2_train_config(dtype="float16")


def _rq_mse(x, books):
    """Greedy RQ squared error per vector, numpy."""
    r = x.astype(np.float64)
    for b in books:
        d = ((r[:, None, :] - b[None]) ** 2).sum(-1)
        r = r - b[d.argmin(1)]
    return (r ** 2).sum(1).mean()


def test_untrained_model_is_its_rq_initialisation(data):
    xt, xval = data
    spec = recipe.ModelSpec(arch="qinco2", M=3, K=16, L=1, h=32, A=0, B=1)  # de = d: no projection
    model, rq_val = recipe.qinco2_initial_model(xt, spec, small_cfg(codebook_noise=0.0), xval=xval)
    p = model.params
    c0, books = np.asarray(p["codebook0"]), np.asarray(p["steps"]["codebook"])
    std = float(p["normalisation"]["std"])
    # Zero concat and `down` layers: a step's network returns its codeword c unchanged and
    # the outer skip adds c again, so each network step adds 2c (QINCo2's reference does
    # the same: its untrained val MSE is 2424 against 897 for its RQ, fixture README).
    xn = model.normalise(xval)
    expected = _rq_mse(xn, [c0, *(2 * books)]) * std ** 2
    assert training.validation_mse(model, xval) == pytest.approx(expected, rel=1e-4)
    # ... and the codebooks are the RQ's, normalised: halving the network steps' codewords
    # gives back the RQ initialisation's MSE.
    assert _rq_mse(xn, [c0, *books]) * std ** 2 == pytest.approx(rq_val, rel=1e-4)
    np.testing.assert_allclose(np.asarray(p["normalisation"]["mean"]), xt.mean(0), rtol=1e-4)


@pytest.mark.parametrize("de", [0, 24])  # de = 0: d (codebook halved) and projected (out_proj zeroed)
def test_rq_exact_init_starts_at_the_rq_error_then_goes_below(data, de):
    xt, xval = data
    spec = recipe.ModelSpec(arch="qinco2", M=3, K=16, L=1, h=32, de=de, A=4, B=1, seed=0, init="rq_exact")
    cfg = small_cfg(epochs=3, stop_patience=0, epoch_size=None, lr=2e-3)
    model, rq_val = recipe.qinco2_initial_model(xt, spec, cfg, xval=xval)
    # the RQ's own greedy error on the validation set, from its raw codebooks
    p = model.params
    std = float(p["normalisation"]["std"])
    c0 = np.asarray(p["codebook0"])
    books = np.asarray(p["steps"]["substep_codebook"])  # the RQ codewords, unhalved
    assert _rq_mse(model.normalise(xval), [c0, *books]) * std ** 2 == pytest.approx(rq_val, rel=1e-4)
    # A = K would make pre-selection exact; with A = 4 and B = 1 the model encodes greedily over
    # the 4 codewords nearest by the substep codebook, which is the RQ's own greedy choice
    assert training.validation_mse(model, xval) == pytest.approx(rq_val, rel=1e-4)
    res = recipe.train_model(xt, xval, spec, cfg, log=quiet)
    assert res.history["before"] == pytest.approx(rq_val, rel=1e-4)
    assert min(e["val_mse"] for e in res.history["epochs"]) < rq_val


def test_rq_exact_in_qinco1_mode_needs_de_equal_d(data):
    xt, xval = data
    spec = recipe.ModelSpec(arch="qinco2", M=3, K=16, L=1, h=32, de=24, qinco1_mode=True, init="rq_exact")
    with pytest.raises(ValueError, match="de = d"):
        recipe.qinco2_initial_model(xt, spec, small_cfg(), xval=xval)


def test_a_few_epochs_go_below_the_rq_initialisation(data, tmp_path):
    xt, xval = data
    _, rq_val = recipe.qinco2_initial_model(xt, SPEC, small_cfg(epoch_size=None), xval=xval)
    cfg = small_cfg(epochs=4, epoch_size=None, lr=1e-2)
    res = recipe.train_model(xt, xval, SPEC, cfg, model_path=str(tmp_path / "m.pt"),
                             history_path=str(tmp_path / "h.json"), log=quiet)
    mses = [e["val_mse"] for e in res.history["epochs"]]
    assert len(mses) == 4 + 1 + 1  # epochs + stop_patience + 1
    assert min(mses) < rq_val < res.history["before"]
    assert mses[-1] < mses[0]
    loaded = checkpoint.load_model(tmp_path / "m.pt")  # QINCo2's .pt format, the best epoch
    assert loaded.config == res.best.config and loaded.config.is_qinco2
    assert training.validation_mse(loaded, xval) == pytest.approx(min(mses), rel=1e-5)
    # the running statistics moved, the normalisation did not
    assert not np.allclose(np.asarray(res.last.params["xtarget_stats"]["var"]), 1.0)
    np.testing.assert_array_equal(np.asarray(res.last.params["normalisation"]["mean"]),
                                  np.asarray(loaded.params["normalisation"]["mean"]))


class Killed(Exception):
    pass


def test_kill_and_resume_equals_uninterrupted(data, tmp_path):
    xt, xval = data
    cfg = small_cfg(epochs=2, stop_patience=0)
    full = recipe.train_model(xt, xval, SPEC, cfg, checkpoint_dir=str(tmp_path / "ck_a"), log=quiet)

    def killer(msg):  # killed after epoch 1's validation, before its checkpoint
        if msg.startswith("epoch 1 "):
            raise Killed()

    with pytest.raises(Killed):
        recipe.train_model(xt, xval, SPEC, cfg, checkpoint_dir=str(tmp_path / "ck_b"), log=killer)
    logs = []
    resumed = recipe.train_model(xt, xval, SPEC, cfg, checkpoint_dir=str(tmp_path / "ck_b"), log=logs.append)
    assert any("resuming" in m and "after epoch 0" in m for m in logs)
    assert len(full.history["epochs"]) == 3
    for a, b in zip(jax.tree.leaves(full.last.params), jax.tree.leaves(resumed.last.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [e["val_mse"] for e in full.history["epochs"]] == [e["val_mse"] for e in resumed.history["epochs"]]


def test_cli_arch_qinco2(tmp_path):
    from qinco_jax import cli
    from qinco_jax.cli import train as train_qinco

    args = ["--training_data", str(FIX / "train_xt.npy"), "--nt", "2000", "--nval", "300", "--arch", "qinco2",
            "--M", "3", "--K", "16", "--L", "1", "--dh", "32", "--de", "24", "--A", "4", "--B", "2",
            "--batch_size", "256", "--ngpu", "1", "--progress", "off", "--max_epochs", "1", "--stop_patience", "0",
            "--epoch_size", "1024", "--wd", "0.05", "--grad_clip", "0.2"]
    parsed = train_qinco.build_parser().parse_args(args)
    cfg = train_qinco.train_config_from_args(parsed)
    assert (cfg.lr, cfg.weight_decay, cfg.grad_clip, cfg.epoch_size, cfg.epochs) == (8e-4, 0.05, 0.2, 1024, 1)
    spec = train_qinco.model_spec_from_args(parsed)
    assert (spec.arch, spec.de, spec.h, spec.A, spec.B) == ("qinco2", 24, 32, 4, 2)
    res = train_qinco.main(args + ["--model", str(tmp_path / "m.pt")])
    assert len(res.history["epochs"]) == 2
    assert checkpoint.load_model(tmp_path / "m.pt").config.describe() == res.best.config.describe()
    with pytest.raises(cli.UsageError, match="arch qinco2"):
        train_qinco.main(args + ["--db_scale", "5"])  # a QINCo v1 setting
    # --init rq_exact reaches QINCo2's spec (its effect: test_rq_exact_init_starts_at_the_rq_error...)
    assert train_qinco.model_spec_from_args(train_qinco.build_parser().parse_args(
        args + ["--init", "rq_exact"])).init == "rq_exact"
    with pytest.raises(cli.UsageError, match="need --arch qinco2"):
        train_qinco.main(["--training_data", str(FIX / "train_xt.npy"), "--nt", "2000", "--nval", "300",
                          "--de", "24"])


def test_run_tasks_train_and_eval_valset(tmp_path):
    from qinco_jax.cli import run_config
    from qinco_jax.cli import qinco2_train

    x = np.concatenate([np.load(FIX / "train_xt.npy")[:1500], np.load(FIX / "train_xval.npy")[:200]])
    np.save(tmp_path / "x.npy", x)
    out = str(tmp_path / "m.pt")
    words = [f"trainset={tmp_path / 'x.npy'}", "M=3", "K=16", "L=1", "dh=32", "de=24", "A=4", "B=2",
             "batch=256", "epochs=1", "scheduler.stop_patience=0", "ds.valset=200", "ds.loop=512", "cpu=true",
             "lr=0.002", f"output={out}"]
    res = qinco2_train.train(run_config.parse_run_args(["task=train", *words]), log=quiet)
    assert len(res.history["epochs"]) == 2
    best = min(e["val_mse"] for e in res.history["epochs"])
    mse = qinco2_train.eval_valset(run_config.parse_run_args(
        ["task=eval_valset", f"model={out}", f"trainset={tmp_path / 'x.npy'}", "ds.valset=200"]), log=quiet)
    assert mse == pytest.approx(best, rel=1e-5)
    # resume=true after the run finished: nothing more to train, the same history
    again = qinco2_train.train(run_config.parse_run_args(["task=train", *words, "resume=true"]), log=quiet)
    assert again.history["epochs"] == res.history["epochs"]
    with pytest.raises(run_config.RunConfigError, match="unknown optimizer 'sgd'"):
        qinco2_train.train(run_config.parse_run_args(["task=train", *words, "optimizer=sgd"]), log=quiet)


def test_qinco1_mode_trains(data):
    xt, xval = data
    spec = recipe.ModelSpec(arch="qinco2", M=2, K=16, L=1, h=32, A=0, B=1, qinco1_mode=True)
    res = recipe.train_model(xt, xval, spec, small_cfg(epochs=1, stop_patience=0, epoch_size=None), log=quiet)
    assert not res.best.config.outer_skip
    mses = [e["val_mse"] for e in res.history["epochs"]]
    assert len(mses) == 2 and mses[-1] < res.history["before"]
    assert all(sum(e["codewords_reset"]) == 0 for e in res.history["epochs"])  # never in qinco1_mode
