"""Training: scheduler rules, loss decrease, data parallel == single device,
kill-and-resume == uninterrupted, CLI end to end and its input checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from qinco_jax.training import recipe
from qinco_jax.training import rq_init
from qinco_jax.training import loop as training
from qinco_jax.config import QincoConfig
from qinco_jax.models.qinco import QincoModel, init_params
from qinco_jax.training.scheduler import Scheduler

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures"


@pytest.fixture(scope="module")
def data():
    xt = np.load(FIX / "train_xt.npy")
    return xt, np.load(FIX / "train_xval.npy")


def rq_model(xt, M=3, K=16, L=1, h=16, seed=0):
    """The recipe's initial model (RQ codebooks, db_scale = max of xt) and its codebooks."""
    spec = recipe.ModelSpec(M=M, K=K, L=L, h=h, seed=seed)
    cb = recipe.train_rq_codebooks(xt, spec)
    return recipe.initial_model(xt, spec, cb), cb


def quiet(msg):
    pass


# --------------------------------------------------------------------------------------
# Scheduler
# --------------------------------------------------------------------------------------


def test_scheduler_scripted_sequence():
    s = Scheduler(1e-3)
    # improving for 5 epochs: every one is the best
    assert all(s.append_loss(v).is_best for v in [10, 9, 8, 7, 6])
    # 10 epochs without a new best: lr / 10 at the 10th (epoch 15), not before
    for i in range(9):
        d = s.append_loss(6.5)
        assert not d.is_best and not d.reduced_lr and s.lr == 1e-3
    d = s.append_loss(6.5)
    assert d.reduced_lr and s.lr == pytest.approx(1e-4) and s.last_lr_update == 15
    # a tie with the best counts as best (stored again), then the count restarts
    assert s.append_loss(6.0).is_best
    d = s.append_loss(5.0)
    assert d.is_best and not d.reduced_lr
    for i in range(9):
        assert not s.append_loss(5.5).reduced_lr
    d = s.append_loss(5.5)
    assert d.reduced_lr and s.lr == pytest.approx(1e-5)
    # the next reduction falls below 2e-6: stop. After a reduction the reference
    # waits for epoch > last_update + 10, i.e. 11 epochs (its quirk, kept).
    for i in range(10):
        assert not s.append_loss(5.5).stop
    d = s.append_loss(5.5)
    assert d.stop and s.should_stop() and s.lr == 0
    # state round trip (the checkpoint stores it as JSON)
    s2 = Scheduler.from_state_dict(json.loads(json.dumps(s.state_dict())))
    assert s2 == s


def test_scheduler_never_improving_stops_after_lr_reductions():
    s = Scheduler(1.0)
    reductions = []
    for epoch in range(1, 200):
        d = s.append_loss(1.0 if epoch == 1 else 2.0)
        if d.reduced_lr:
            reductions.append(epoch)
        if d.stop:
            break
    assert reductions == [11, 22, 33, 44, 55, 66]  # 1 -> 1e-6 < 2e-6 at the 6th
    assert epoch == 66


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def test_training_beats_rq_initialisation(data):
    xt, xval = data
    model, cb = rq_model(xt, M=4, K=16, L=2, h=32)
    rq_mse = float(np.mean(np.sum((xval - rq_decode(cb, xval)) ** 2, axis=1)))
    cfg = training.TrainConfig(lr=1e-3, batch_size=256, max_epochs=3, ngpu=1, progress=False)
    res = training.fit(model, xt, xval, cfg, log=quiet)
    mses = [e["val_mse"] for e in res.history["epochs"]]
    assert len(mses) == 3
    assert mses[-1] < mses[0] < res.history["before"]
    assert min(mses) < rq_mse, (mses, rq_mse)
    # the best model is the one that gave the best validation MSE
    assert training.validation_mse(res.best, xval) == pytest.approx(min(mses), rel=1e-5)


def rq_decode(cb, x):
    """Greedy RQ encode-decode with numpy (the reference's RQ baseline, beam 1)."""
    xhat = np.zeros_like(x)
    for c in cb:
        r = x - xhat
        i = np.argmin(((r[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
        xhat = xhat + c[i]
    return xhat


def test_ivf_training_keeps_centroids_frozen():
    xt_all = np.load(FIX / "ivf_xt.npy")[:3000]
    centroids = np.load(FIX / "ivf_centroids_64.npy")
    xt, xval = xt_all[:2500], xt_all[2500:]
    assign = rq_init.assign_to_centroids(xt, centroids)
    ref = np.argmin(((xt[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert np.mean(assign == ref) > 0.999
    cb = rq_init.train_rq(rq_init.ivf_residuals(xt, centroids, assign), 2, 16, log=quiet)
    scale = np.float32(xt.max())
    config = QincoConfig(d=32, K=16, M=2, L=1, h=16, variant="ivf", K_IVF=64, db_scale=float(scale))
    params = init_params(config, jax.random.key(0), codebooks=cb / scale, codebook0=centroids / scale)
    cfg = training.TrainConfig(lr=1e-3, batch_size=256, max_epochs=2, ngpu=1, progress=False)
    res = training.fit(QincoModel(config, params), xt, xval, cfg, code0=assign, log=quiet)
    np.testing.assert_array_equal(np.asarray(res.last.params["codebook0"]), centroids / scale)
    assert not np.allclose(np.asarray(res.last.params["steps"]["codebook"]), cb / scale)
    assert res.history["epochs"][-1]["val_mse"] < res.history["before"]
    with pytest.raises(ValueError, match="code0"):
        training.fit(QincoModel(config, params), xt, xval, cfg, log=quiet)


def _save_npz(model, path):
    np.savez(path, **{jax.tree_util.keystr(k): np.asarray(v)
                      for k, v in jax.tree_util.tree_leaves_with_path(model.params)})


class Killed(Exception):
    pass


def test_kill_and_resume_equals_uninterrupted(data, tmp_path):
    xt, xval = data[0][:1500], data[1][:300]
    model, _ = rq_model(xt)
    cfg = training.TrainConfig(lr=1e-3, batch_size=256, max_epochs=3, ngpu=1, progress=False,
                               persistent_optimizer=True)
    full = training.fit(model, xt, xval, cfg, model_path=str(tmp_path / "a.npz"), save_fn=_save_npz,
                        checkpoint_dir=str(tmp_path / "ck_a"), log=quiet)

    def killer(msg):  # killed after epoch 1's validation, before its checkpoint
        if msg.startswith("epoch 1 "):
            raise Killed()

    with pytest.raises(Killed):
        training.fit(model, xt, xval, cfg, model_path=str(tmp_path / "b.npz"), save_fn=_save_npz,
                     checkpoint_dir=str(tmp_path / "ck_b"), log=killer)
    logs = []
    resumed = training.fit(model, xt, xval, cfg, model_path=str(tmp_path / "b.npz"), save_fn=_save_npz,
                           checkpoint_dir=str(tmp_path / "ck_b"), log=logs.append)
    assert any("resuming" in m and "after epoch 0" in m for m in logs)
    for a, b in zip(jax.tree.leaves(full.last.params), jax.tree.leaves(resumed.last.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [e["val_mse"] for e in full.history["epochs"]] == [e["val_mse"] for e in resumed.history["epochs"]]
    fa, fb = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    for k in fa.files:
        np.testing.assert_array_equal(fa[k], fb[k])
    # a finished run restarted does nothing more
    again = training.fit(model, xt, xval, cfg, checkpoint_dir=str(tmp_path / "ck_b"), log=quiet)
    assert len(again.history["epochs"]) == 3
    # a checkpoint of another model is refused before any array is restored
    other, _ = rq_model(xt, M=4)
    with pytest.raises(ValueError, match="another run"):
        training.fit(other, xt, xval, cfg, checkpoint_dir=str(tmp_path / "ck_b"), log=quiet)


MULTI_DEVICE_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from qinco_jax.training import recipe
    from qinco_jax.training import rq_init
    from qinco_jax.training import loop as training
    from qinco_jax.config import QincoConfig
    from qinco_jax.models.qinco import QincoModel, init_params
    assert jax.device_count() == 4, jax.devices()
    xt = np.load({fix!r} + "/train_xt.npy")[:1000]   # 3 full batches of 256 + one of 232
    xval = np.load({fix!r} + "/train_xval.npy")[:200]
    cb = rq_init.train_rq(xt, 3, 16, 1, log=lambda m: None)
    scale = np.float32(xt.max())
    config = QincoConfig(d=32, K=16, M=3, L=1, h=16, db_scale=float(scale))
    model = QincoModel(config, init_params(config, jax.random.key(0), codebooks=cb / scale))
    out = {{}}
    for n in (1, 4):
        cfg = training.TrainConfig(lr=1e-3, batch_size=256, max_epochs=2, ngpu=n, progress=False)
        res = training.fit(model, xt, xval, cfg, log=lambda m: None)
        out[n] = [np.asarray(a).tolist() for a in jax.tree.leaves(res.last.params)]
        out[f"mse{{n}}"] = [e["val_mse"] for e in res.history["epochs"]]
        out[f"dev{{n}}"] = res.history["run"]["devices"]
    try:
        training.fit(model, xt, xval, training.TrainConfig(batch_size=250, ngpu=4, max_epochs=1), log=lambda m: None)
        out["error"] = None
    except ValueError as e:
        out["error"] = str(e)
    print("RESULT" + json.dumps(out))
""")


def test_four_devices_equal_one_device():
    path = os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=path)  # this checkout's qinco_jax
    script = MULTI_DEVICE_SCRIPT.format(fix=str(FIX))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    out = json.loads(line[len("RESULT"):])
    assert out["dev1"] == 1 and out["dev4"] == 4
    for a, b in zip(out["1"], out["4"]):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["mse4"], out["mse1"], rtol=1e-4)
    assert "not divisible by the number of devices (4)" in out["error"]


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def _cli_args(tmp_path, *extra):
    return ["--training_data", str(FIX / "train_xt.npy"), "--nt", "2000", "--nval", "300", "--M", "3",
            "--K", "16", "--L", "1", "--h", "16", "--lr", "1e-3", "--batch_size", "256", "--ngpu", "1",
            "--progress", "off", *extra]


def test_cli_end_to_end_pt_model(tmp_path, capsys):
    from qinco_jax.cli import train as train_qinco

    from qinco_jax.formats import checkpoint
    from qinco_jax.models import codec

    model_path = tmp_path / "m.pt"
    res = train_qinco.main(_cli_args(tmp_path, "--max_epochs", "2", "--model", str(model_path),
                                     "--RQ_filename", str(tmp_path / "rq.npy")))
    out = capsys.readouterr().out
    assert "epoch 1 train loss" in out and "val MSE" in out
    assert np.load(tmp_path / "rq.npy").shape == (3, 16, 32)
    hist = json.loads((tmp_path / "m.pt.history.json").read_text())
    assert [e["epoch"] for e in hist["epochs"]] == [0, 1]
    loaded = checkpoint.load_model(model_path)
    assert loaded.config == res.best.config
    xval = np.load(FIX / "train_xt.npy")[2000:2300]
    assert training.validation_mse(loaded, xval) == pytest.approx(min(e["val_mse"] for e in hist["epochs"]),
                                                                   rel=1e-5)
    # --todo train reuses the stored RQ codebooks; a library-format model directory
    train_qinco.main(_cli_args(tmp_path, "--todo", "train", "--RQ_filename", str(tmp_path / "rq.npy"),
                               "--max_epochs", "1", "--model", str(tmp_path / "m_dir")))
    assert isinstance(checkpoint.load_model(tmp_path / "m_dir"), QincoModel)
    assert codec.encode(loaded, xval[:5]).shape == (5, 3)


def test_cli_bad_inputs(tmp_path):
    from qinco_jax.cli import train as train_qinco

    from qinco_jax.cli import UsageError

    with pytest.raises(UsageError, match="not enough training vectors"):
        train_qinco.main(_cli_args(tmp_path, "--nt", "9500", "--nval", "1000"))
    bad = tmp_path / "c.npy"
    np.save(bad, np.zeros((8, 16), np.float32))
    with pytest.raises(UsageError, match="dimension must be the training vectors' d=32"):
        train_qinco.main(_cli_args(tmp_path, "--ivf", "--IVF_centroids", str(bad)))
    with pytest.raises(UsageError, match="--ivf needs --IVF_centroids"):
        train_qinco.main(_cli_args(tmp_path, "--ivf"))
    with pytest.raises(ValueError, match="power of two"):
        train_qinco.main(_cli_args(tmp_path, "--K", "12"))
    with pytest.raises(UsageError, match="RQ_filename"):
        train_qinco.main(_cli_args(tmp_path, "--todo", "train"))
    # error messages reach the user as one line, exit status 2
    proc = subprocess.run([sys.executable, str(ROOT / "train" / "train_qinco.py"),
                           *_cli_args(tmp_path, "--nt", "20000")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not enough training vectors" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_pq_qinco_prepare_train_recombine_and_one_shot(tmp_path):
    from qinco_jax.cli import train as train_qinco
    from qinco_jax.cli import train_pq as pq_qinco

    from qinco_jax.formats import checkpoint
    from qinco_jax.models import codec
    from qinco_jax.models.qinco import PQQincoModel

    xt = np.load(FIX / "train_xt.npy")[:1300]
    data = tmp_path / "xt.npy"
    np.save(data, xt)
    subs = [str(tmp_path / f"sub{i}.npy") for i in range(2)]
    pq_qinco.main(["--prepare", "--training_data", str(data), "--nt", "1300", "--nsub", "2", "--opq",
                   "--OPQMatrix", str(tmp_path / "opq.npy"), "--training_subvectors", *subs])
    A = np.load(tmp_path / "opq.npy")
    assert A.shape == (32, 32)
    np.testing.assert_allclose(np.load(subs[1]), (xt @ A.T)[:, 16:], rtol=1e-4, atol=1e-3)
    tiny = ["--nt", "1000", "--nval", "300", "--M", "2", "--K", "16", "--L", "1", "--h", "8", "--lr", "1e-3",
            "--batch_size", "256", "--max_epochs", "1", "--ngpu", "1", "--progress", "off"]
    for i in range(2):
        train_qinco.main(["--training_data", subs[i], *tiny, "--model", str(tmp_path / f"m{i}.pt")])
    pq_qinco.main(["--recombine", "--nsub", "2", "--opq", "--OPQMatrix", str(tmp_path / "opq.npy"),
                   "--in_models", str(tmp_path / "m0.pt"), str(tmp_path / "m1.pt"),
                   "--out_model", str(tmp_path / "pq.pt")])
    pq = checkpoint.load_model(tmp_path / "pq.pt")
    assert isinstance(pq, PQQincoModel) and pq.opq is not None and len(pq.subs) == 2
    assert codec.encode(pq, xt[:10]).shape == (10, 4)
    # one shot, without OPQ: the same pieces in one run
    one = pq_qinco.main(["--training_data", str(data), *tiny, "--nt", "1300", "--nsub", "2",
                         "--out_model", str(tmp_path / "pq_dir")])
    loaded = checkpoint.load_model(tmp_path / "pq_dir")
    assert loaded.opq is None and [s.d for s in loaded.subs] == [16, 16]
    np.testing.assert_array_equal(codec.encode(loaded, xt[:50]), codec.encode(one, xt[:50]))
    with pytest.raises(ValueError, match="not divisible by 3"):
        pq_qinco.main(["--training_data", str(data), *tiny, "--nt", "1300", "--nsub", "3",
                       "--out_model", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="--nsub must be >= 1"):  # not a ZeroDivisionError in OPQ
        pq_qinco.main(["--training_data", str(data), *tiny, "--nsub", "0", "--opq", "--out_model", str(tmp_path / "x")])


def test_train_steps_match_torch_adam_on_reference_model():
    """Two steps from the fixture model's weights: our loss, gradients and Adam update
    equal a torch computation of the reference objective (its formulas, written here
    with torch.nn.functional on the reference's state-dict names)."""
    from conftest import require_torch

    torch = require_torch()
    import torch.nn.functional as F

    from qinco_jax.formats import checkpoint
    from qinco_jax.formats.state_dict import params_from_state_dict, state_dict_from_params

    model = checkpoint.load_model(FIX / "qinco_d32_M4_K16_L2_h32.pt")
    config = model.config
    x_raw = np.load(FIX / "train_xt.npy")[:128]
    x = x_raw / np.float32(config.db_scale)
    sd = {k: torch.tensor(np.array(v), requires_grad=True) for k, v in state_dict_from_params(config, model.numpy_params()).items()}
    opt = torch.optim.Adam(list(sd.values()), lr=1e-3)

    def step_out(m, c, xh):
        z = c + F.linear(torch.cat([c, xh], -1), sd[f"step{m}.MLPconcat.weight"], sd[f"step{m}.MLPconcat.bias"])
        for l in range(config.L):
            up = F.linear(z, sd[f"step{m}.residual_block{l}.0.weight"])
            z = z + F.linear(F.relu(up), sd[f"step{m}.residual_block{l}.2.weight"])
        return z

    def torch_loss(xb):
        cb0 = sd["codebook0.weight"]
        with torch.no_grad():
            codes = [torch.argmin(torch.cdist(xb, cb0), dim=1)]
            xhat = cb0[codes[0]]
            for m in range(1, config.M):
                C = sd[f"step{m}.codebook.weight"]
                B, K = len(xb), len(C)
                cands = xhat[:, None] + step_out(m, C[None].expand(B, K, -1), xhat[:, None].expand(B, K, -1))
                codes.append(torch.argmin(((cands - xb[:, None]) ** 2).sum(-1), dim=1))
                xhat = cands[torch.arange(B), codes[-1]]
        xhat = cb0[codes[0]]
        loss = ((xhat - xb) ** 2).sum()
        for m in range(1, config.M):
            xhat = xhat + step_out(m, sd[f"step{m}.codebook.weight"][codes[m]], xhat)
            loss = loss + ((xhat - xb) ** 2).sum()
        return loss / len(xb) / xb.shape[1]

    mesh = training.make_mesh(1)
    optimizer = training.make_optimizer()
    trainable, frozen = training.split_trainable(model.params, False)
    opt_state = optimizer.init(trainable)
    step = training.make_train_step(training.make_encode_fn(), optimizer, mesh)
    for batch in (slice(0, 64), slice(64, 128)):
        opt.zero_grad()
        t_loss = torch_loss(torch.from_numpy(x[batch]))
        t_loss.backward()
        opt.step()
        trainable, opt_state, loss = step(trainable, opt_state, frozen, x[batch], None,
                                          np.ones(64, np.float32), 1e-3)
        assert float(loss) == pytest.approx(t_loss.item(), rel=1e-5)
    ours = training.merge(trainable, frozen)
    theirs = params_from_state_dict(config, {k: v.detach().numpy() for k, v in sd.items()})
    for path, a in jax.tree_util.tree_leaves_with_path(ours):
        b = theirs
        for k in path:
            b = b[k.key]
        # Adam divides by the gradient's own scale, so float rounding in a near-zero
        # gradient component can move that weight by a visible fraction of one step
        # (lr = 1e-3): 2e-5 is 2 % of a step.
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=2e-5, err_msg=jax.tree_util.keystr(path))
    # and the update moved the weights (the comparison is not vacuous)
    assert not np.allclose(np.asarray(ours["steps"]["codebook"]), np.asarray(model.params["steps"]["codebook"]))
