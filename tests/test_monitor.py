"""Training curves (training.monitor: codeword usage, TensorBoard event files) and mixed
precision training (dtype bfloat16), through the library and both command lines."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest

from qinco_jax.models import codec
from qinco_jax.training import loop as training
from qinco_jax.training import monitor, recipe

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures"


def quiet(msg):
    pass


@pytest.fixture(scope="module")
def data():
    return np.load(FIX / "train_xt.npy")[:1024], np.load(FIX / "train_xval.npy")[:200]


@pytest.fixture(scope="module")
def v1_model(data):
    spec = recipe.ModelSpec(M=3, K=16, L=1, h=16, seed=0)
    return recipe.initial_model(data[0], spec, recipe.train_rq_codebooks(data[0], spec))


def test_codeword_stats():
    usage = np.zeros((3, 8), np.int64)
    usage[0] = 5                      # uniform: 3 bits, perplexity 8, none dead
    usage[1, 2] = 40                  # one codeword: 0 bits, perplexity 1, 7 dead
    usage[2, :2] = [30, 10]           # p = 3/4, 1/4
    s = monitor.codeword_stats(usage)
    h2 = -(0.75 * np.log2(0.75) + 0.25 * np.log2(0.25))
    assert s["codebook_entropy"] == pytest.approx([3.0, 0.0, h2], abs=1e-6)
    assert s["codebook_perplexity"] == pytest.approx([8.0, 1.0, 2 ** h2], abs=1e-4)
    assert s["dead_codewords"] == [0, 7, 6]
    assert "dead 13" in monitor.usage_summary(s)
    with pytest.raises(ValueError, match="usage"):
        monitor.codeword_stats(np.zeros(8))


def test_v1_fit_writes_event_files_and_usage_history(data, v1_model, tmp_path):
    xt, xval = data
    # lr tiny: the model barely moves, so the epoch's codes are the initial model's
    cfg = training.TrainConfig(lr=1e-12, batch_size=256, max_epochs=2, ngpu=1, progress=False)
    lines = []
    with monitor.TensorBoardMonitor(tmp_path / "tb") as mon:
        res = training.fit(v1_model, xt, xval, cfg, log=lines.append, monitor=mon,
                           history_path=str(tmp_path / "h.json"))
    hist = json.loads((tmp_path / "h.json").read_text())
    assert hist["epochs"] == res.history["epochs"]
    expected = monitor.codeword_stats(np.stack([np.bincount(c, minlength=16)
                                                for c in codec.encode(v1_model, xt).T]))
    for e in hist["epochs"]:
        assert e["dead_codewords"] == expected["dead_codewords"]
        assert e["codebook_perplexity"] == pytest.approx(expected["codebook_perplexity"], rel=1e-3)
        assert e["codebook_entropy"] == pytest.approx(expected["codebook_entropy"], rel=1e-3)
        assert all(1 <= p <= 16 for p in e["codebook_perplexity"])
    assert any(" perplexity " in line and " dead " in line for line in lines if line.startswith("epoch "))

    assert os.listdir(tmp_path / "tb") and all(f.startswith("events.out.tfevents.")
                                                for f in os.listdir(tmp_path / "tb"))
    scalars = monitor.read_scalars(tmp_path / "tb")
    n = 2 * 4  # 2 epochs of 1024 / 256 steps
    for tag in ("train/loss", "train/lr", "train/grad_norm"):
        assert [s for s, _ in scalars[tag]] == list(range(1, n + 1)), tag
    assert all(v == pytest.approx(1e-12) for _, v in scalars["train/lr"])
    assert all(np.isfinite(v) and v > 0 for _, v in scalars["train/grad_norm"])
    assert np.mean([v for _, v in scalars["train/loss"][:4]]) == pytest.approx(
        hist["epochs"][0]["train_loss"], rel=1e-5)
    assert scalars["val/mse"] == [(4, pytest.approx(hist["epochs"][0]["val_mse"], rel=1e-6)),
                                  (8, pytest.approx(hist["epochs"][1]["val_mse"], rel=1e-6))]
    for m in range(3):
        assert scalars[f"codewords/dead/m{m}"][-1] == (8, expected["dead_codewords"][m])
        assert scalars[f"codewords/perplexity/m{m}"][-1][1] == pytest.approx(expected["codebook_perplexity"][m],
                                                                             rel=1e-3)
        assert f"codewords/entropy/m{m}" in scalars


def test_v1_bfloat16_trains_with_float32_weights(data, v1_model):
    xt, xval = data
    runs = {}
    for dtype in ("float32", "bfloat16"):
        cfg = training.TrainConfig(lr=1e-3, batch_size=256, max_epochs=2, ngpu=1, progress=False, dtype=dtype)
        runs[dtype] = training.fit(v1_model, xt, xval, cfg, log=quiet)
    bf = runs["bfloat16"]
    assert all(a.dtype == np.float32 for a in jax.tree.leaves(bf.last.params))
    # the network really ran in bfloat16 (different losses), and learns about as well
    l32, l16 = (r.history["epochs"][0]["train_loss"] for r in (runs["float32"], bf))
    assert l16 != l32 and l16 == pytest.approx(l32, rel=0.05)
    assert bf.history["epochs"][-1]["val_mse"] < bf.history["before"]
    assert bf.history["epochs"][-1]["val_mse"] == pytest.approx(runs["float32"].history["epochs"][-1]["val_mse"],
                                                                rel=0.05)


def test_qinco2_bfloat16_loss_targets_stay_float32(data):
    """The bfloat16 loss differs from float32 only by the network's rounding: at the
    same codes and parameters it is within bfloat16's precision of the float32 loss."""
    import jax.numpy as jnp

    from qinco_jax.training import recipes

    xt, xval = data
    spec = recipe.ModelSpec(arch="qinco2", M=2, K=16, L=1, h=32, de=24, A=4, B=2)
    cfg = training.qinco2_train_config(batch_size=256, epochs=1, stop_patience=0, epoch_size=512, ngpu=1,
                                       progress=False, dtype="bfloat16")
    res = recipe.train_model(xt, xval, spec, cfg, log=quiet)
    assert all(a.dtype == np.float32 for a in jax.tree.leaves(res.best.params))
    assert res.history["epochs"][-1]["val_mse"] < res.history["before"]
    assert len(res.history["epochs"][0]["codebook_perplexity"]) == 2
    model = res.last
    trainable, frozen = recipes.q2.split_trainable(model.params, False)
    x = jnp.asarray(model.normalise(xt[:256]))
    w = jnp.ones(256, jnp.float32)
    enc = training.make_encode_fn(outer_skip=True)
    losses = {dt: float(recipes.qinco2_batch_loss(trainable, frozen, x, None, w, enc, is_ivf=False, K=16,
                                                  dtype=dt)[0]) for dt in (jnp.float32, jnp.bfloat16)}
    assert losses[jnp.bfloat16] != losses[jnp.float32]
    assert losses[jnp.bfloat16] == pytest.approx(losses[jnp.float32], rel=0.03)


def _train_args(tmp_path, *extra):
    return ["--training_data", str(FIX / "train_xt.npy"), "--nt", "512", "--nval", "128", "--M", "2",
            "--K", "16", "--L", "1", "--h", "16", "--lr", "1e-3", "--batch_size", "256", "--ngpu", "1",
            "--progress", "off", "--max_epochs", "1", *extra]


def test_train_cli_tensorboard_and_dtype(tmp_path, capsys):
    from qinco_jax.cli import UsageError
    from qinco_jax.cli import train as train_qinco

    res = train_qinco.main(_train_args(tmp_path, "--tensorboard", str(tmp_path / "tb"), "--dtype", "bfloat16",
                                       "--model", str(tmp_path / "m.pt")))
    assert res.history["run"]["train"]["dtype"] == "bfloat16"
    scalars = monitor.read_scalars(tmp_path / "tb")
    assert len(scalars["train/loss"]) == 2 and len(scalars["val/mse"]) == 1
    assert "codewords/dead/m1" in scalars
    hist = json.loads((tmp_path / "m.pt.history.json").read_text())
    assert len(hist["epochs"][0]["dead_codewords"]) == 2
    # a directory that cannot be written: named, before any work (no RQ file written)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for bad in (blocker, blocker / "sub"):
        with pytest.raises(UsageError, match=f"--tensorboard {bad}"):
            train_qinco.main(_train_args(tmp_path, "--tensorboard", str(bad),
                                         "--RQ_filename", str(tmp_path / "rq.npy")))
    assert not (tmp_path / "rq.npy").exists()


def test_run_tensorboard_and_precision_keys(tmp_path):
    from qinco_jax.cli import qinco2_train, run_config

    x = np.concatenate([np.load(FIX / "train_xt.npy")[:768], np.load(FIX / "train_xval.npy")[:128]])
    np.save(tmp_path / "x.npy", x)
    words = ["task=train", f"trainset={tmp_path / 'x.npy'}", "M=2", "K=16", "L=1", "dh=16", "A=4", "B=2",
             "batch=256", "epochs=1", "scheduler.stop_patience=0", "ds.valset=128", "ds.loop=512", "cpu=true"]
    cfg = run_config.parse_run_args([*words, f"output={tmp_path / 'm.pt'}", "precision=bf16",
                                     f"tensorboard={tmp_path / 'tb'}"])
    assert qinco2_train.train_config(cfg).dtype == "bfloat16"
    assert qinco2_train.train_config(run_config.parse_run_args(words)).dtype == "float32"
    res = qinco2_train.train(cfg, log=quiet)
    scalars = monitor.read_scalars(tmp_path / "tb")
    assert len(scalars["val/mse"]) == len(res.history["epochs"])
    assert {"train/loss", "train/lr", "train/grad_norm", "codewords/perplexity/m0", "codewords/entropy/m1",
            "codewords/dead/m1", "codewords/perplexity_mean", "codewords/dead_total"} <= set(scalars)
    assert all(len(e["codebook_entropy"]) == 2 for e in res.history["epochs"])
    with pytest.raises(run_config.RunConfigError, match="precision"):
        run_config.parse_run_args([*words, "precision=fp16"])
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(run_config.RunConfigError, match=f"tensorboard={blocker}"):
        qinco2_train.train(run_config.parse_run_args([*words, f"tensorboard={blocker}",
                                                      f"output={tmp_path / 'm2.pt'}"]), log=quiet)
    assert not (tmp_path / "m2.pt.checkpoint").exists()
