"""QINCo2's training recipe pieces against the reference's numbers and hand-computed values."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qinco_jax.training import qinco2_recipe as r
from tests.conftest import FIXTURES, require_torch

TRAIN_REF = FIXTURES / "qinco2" / "train_reference_qinco2.json"


# ---------------------------------------------------------------- schedule / stopping


def test_epoch_start_lr_equals_reference_bit_for_bit():
    ref = json.loads(TRAIN_REF.read_text())
    cfg = ref["config"]
    sched = r.CosineSchedule(lr=cfg["lr"], ramp_epochs=cfg["scheduler.ramp_epochs"], epochs=cfg["epochs"])
    for run in ref["runs"]:
        got = [sched.epoch_start_lr(e) for e in range(len(run["lr_at_epoch_start"]))]
        assert got == run["lr_at_epoch_start"]  # exact: same float arithmetic
    assert sched.epoch_start_lr(0) == pytest.approx(6.4e-10, rel=1e-12)  # the factor-floor quirk


def test_batch_lr_matches_the_saved_reference_state():
    # qinco2 fixture models: epochs=10, 32 batches/epoch (8192 / 256), 13 epochs. The
    # logger's last announced lr is epoch 12's start; the optimizer's last lr is the one
    # of the last batch, stepped to t = 13 (cosine fully decayed -> the floor factor).
    sched = r.CosineSchedule(lr=0.0008, ramp_epochs=3, epochs=10, lr_min_fact=1e-3)
    assert sched.epoch_start_lr(12) == 0.00012514757203218474
    assert sched.batch_lr(12, 31, 32) == 6.400000000000001e-10
    # during the ramp, batch i of epoch 0 uses (i + 1) / n of an epoch
    assert sched.batch_lr(0, 0, 4) == 0.0008 * (0.25 / 3)
    lrs = sched.epoch_lrs(3, 5)
    assert lrs.shape == (5,) and np.all(np.diff(lrs) < 0)
    assert lrs[-1] == 0.0008 * math.cos(0.1 * math.pi / 2)


def test_ramp_free_schedule_and_bad_values():
    s = r.CosineSchedule(lr=1.0, ramp_epochs=0, epochs=4)
    assert s.factor(0) == 1.0 and s.factor(2) == pytest.approx(math.cos(math.pi / 4))
    assert s.factor(100) == s.floor == 1e-3
    with pytest.raises(ValueError, match="epochs"):
        r.CosineSchedule(epochs=0)
    with pytest.raises(ValueError, match="learning rate"):
        r.CosineSchedule(lr=-1)


def _run_epochs(mses, epochs, patience, cosine=True):
    p, ran = r.TrainProgress(), 0
    it = iter(mses)
    while not r.should_stop(p, epochs, patience, cosine):
        p, _ = p.after_epoch(next(it), n_steps=3)
        ran += 1
    return p, ran


def test_stop_rule_counts_the_reference_epochs():
    improving = [100.0 - i for i in range(100)]
    assert _run_epochs(improving, 5, 2)[1] == 8     # the training-curve fixture: 8 epochs
    assert _run_epochs(improving, 10, 2)[1] == 13   # the fixture models: 13 epochs
    assert r.max_epochs(10, 2) == 13 and r.max_epochs(10, 2, cosine=False) is None
    p, ran = _run_epochs([5.0] + [6.0] * 50, 60, 2)  # best at epoch 0, then no improvement
    assert ran == 4 and p.best_mse_epoch == 0 and p.best_mse == 5.0 and p.step == 12
    # an improvement smaller than 1e-6 does not count
    p, improved = r.TrainProgress(epoch=3, best_mse=1.0, best_mse_epoch=2).after_epoch(1.0 - 1e-7)
    assert not improved and p.best_mse_epoch == 2 and p.epoch == 4
    # plain numbers: a checkpoint round trip
    assert r.TrainProgress(**json.loads(json.dumps(dataclasses.asdict(p)))) == p


PLATEAU_MSES = [10, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 8, 8, 8, 8]


def test_plateau_schedule_by_hand():
    s = r.PlateauSchedule(lr=1e-4, factor=0.1, patience=2, min_lr=1e-6)
    lrs = [s.step(v) for v in PLATEAU_MSES]
    # 10, 9 are new bests; the 3rd repeated 9 is the 3rd bad epoch (> patience 2): reduce,
    # count from 0 again; floored at min_lr
    assert lrs[:4] == [1e-4] * 4
    np.testing.assert_allclose(lrs[4:7], 1e-5)
    np.testing.assert_allclose(lrs[7:], 1e-6)
    assert r.PlateauSchedule(**dataclasses.asdict(s)) == s


def test_plateau_schedule_matches_torch():
    torch = require_torch()
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=1e-3)
    ts = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.1, patience=1, min_lr=1e-5, threshold=1e-10)
    s = r.PlateauSchedule(lr=1e-3, factor=0.1, patience=1, min_lr=1e-5, threshold=1e-10)
    for v in PLATEAU_MSES:
        ts.step(v)
        assert s.step(v) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)


# ---------------------------------------------------------------- optimizer


def test_optimizer_first_step_by_hand_and_lr_never_recompiles():
    opt = r.make_optimizer(weight_decay=0.1, grad_clip=0.1)
    params = {"w": jnp.array([1.0, 2.0, 3.0])}
    traces = []

    @jax.jit
    def step(params, state, grads, lr):
        traces.append(1)
        state = r.set_learning_rate(state, lr)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = opt.init(params)
    g = {"w": jnp.array([0.5, -0.05, 0.0])}
    new, state = step(params, state, g, 0.01)
    clipped = np.array([0.1, -0.05, 0.0])
    # first Adam step: m̂ = g, v̂ = g²; AdamW: p - lr (m̂ / (sqrt(v̂) + eps) + wd p)
    want = np.array([1.0, 2.0, 3.0]) - 0.01 * (clipped / (np.abs(clipped) + 1e-8) + 0.1 * np.array([1.0, 2.0, 3.0]))
    np.testing.assert_allclose(np.asarray(new["w"]), want, rtol=1e-6)
    step(new, state, g, 0.002)
    step(new, state, g, 0.0)
    assert len(traces) == 1


def test_optimizer_options_and_errors():
    p = {"w": jnp.array([1.0])}
    adam = r.make_optimizer(weight_decay=0.5, grad_clip=0, kind="adam")
    st = r.set_learning_rate(adam.init(p), 0.1)
    up, _ = adam.update({"w": jnp.array([0.0])}, st, p)
    # a zero gradient + L2 decay 0.5 * w = 0.5 -> first Adam step -lr * sign(0.5)
    np.testing.assert_allclose(np.asarray(up["w"]), [-0.1], rtol=1e-5)
    no_decay = r.make_optimizer(weight_decay=0.0, grad_clip=0, kind="adam")
    up0, _ = no_decay.update({"w": jnp.array([0.0])}, r.set_learning_rate(no_decay.init(p), 0.1), p)
    assert float(up0["w"][0]) == 0.0
    with pytest.raises(ValueError, match="optimizer"):
        r.make_optimizer(kind="sgd")
    with pytest.raises(ValueError, match="grad_clip"):
        r.make_optimizer(grad_clip=-1)


def test_optimizer_matches_torch_adamw_with_value_clipping():
    torch = require_torch()
    rs = np.random.RandomState(0)
    w0 = rs.randn(4, 3).astype(np.float32)
    grads = [rs.randn(4, 3).astype(np.float32) * 0.3 for _ in range(5)]
    lrs = [1e-3, 5e-3, 2e-3, 8e-4, 1e-4]
    tw = torch.nn.Parameter(torch.tensor(w0))
    topt = torch.optim.AdamW([tw], lr=1e-3, weight_decay=0.1)
    opt = r.make_optimizer(0.1, 0.1)
    params, state = {"w": jnp.asarray(w0)}, opt.init({"w": jnp.asarray(w0)})
    for g, lr in zip(grads, lrs):
        tw.grad = torch.tensor(g)
        torch.nn.utils.clip_grad_value_([tw], 0.1)
        for group in topt.param_groups:
            group["lr"] = lr
        topt.step()
        state = r.set_learning_rate(state, lr)
        up, state = opt.update({"w": jnp.asarray(g)}, state, params)
        params = optax.apply_updates(params, up)
    np.testing.assert_allclose(np.asarray(params["w"]), tw.detach().numpy(), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- data


def test_data_order_loops_through_a_fixed_permutation():
    order = r.DataOrder(n=10, loop=4, seed=3)
    assert order.epoch_size == 4 and order.num_batches(3) == 2
    np.testing.assert_array_equal(order.positions(0), [0, 1, 2, 3])
    np.testing.assert_array_equal(order.positions(1), [4, 5, 6, 7])
    np.testing.assert_array_equal(order.positions(2), [8, 9, 0, 1])
    perm = order.rows(0).tolist() + order.rows(1).tolist() + order.rows(2).tolist()[:2]
    assert sorted(perm) == list(range(10))  # one permutation, visited in windows
    np.testing.assert_array_equal(order.rows(2)[2:], order.rows(0)[:2])
    np.testing.assert_array_equal(order.rows(5), order.rows(5))  # deterministic
    b = order.batches(2, 3)
    assert [len(x) for x in b] == [3, 1]
    # loop >= n (or unset): every epoch is the same full order
    full = r.DataOrder(n=10, loop=100, seed=3)
    np.testing.assert_array_equal(full.rows(0), full.rows(7))
    np.testing.assert_array_equal(r.DataOrder(n=10, loop=None, seed=3).rows(1), full.rows(0))
    assert r.DataOrder.for_run(10, 4, 3, qinco1_mode=True).epoch_size == 10
    assert r.DataOrder.for_run(10, 4, 3) == order


def test_block_shuffle_stays_within_blocks():
    order = r.DataOrder(n=10, loop=None, seed=0, block=4)
    rows = order.rows(0)
    for b0 in (0, 4, 8):
        assert sorted(rows[b0:b0 + 4].tolist()) == list(range(b0, min(b0 + 4, 10)))
    assert not np.array_equal(rows, np.arange(10))


def test_rq_rows_take_whole_batches_up_to_the_cap():
    order = r.DataOrder(n=10, loop=None, seed=1)
    np.testing.assert_array_equal(order.rq_rows(3, max_rows=7), order.rows(0)[:6])
    np.testing.assert_array_equal(order.rq_rows(3, max_rows=2), order.rows(0)[:3])  # first batch always
    looped = r.DataOrder(n=10, loop=4, seed=1)
    np.testing.assert_array_equal(looped.rq_rows(3), looped.rows(0))  # only the first `loop` rows


def test_split_validation():
    x = np.arange(20).reshape(10, 2)
    xt, xval = r.split_validation(x, 3)
    np.testing.assert_array_equal(xval, x[7:])
    np.testing.assert_array_equal(xt, x[:7])
    assert len(r.split_validation(x, 3, trainset=4)[0]) == 4
    with pytest.raises(ValueError, match="more than half"):
        r.split_validation(x, 6)
    with pytest.raises(ValueError, match="valset"):
        r.split_validation(x, 0)


def test_normalisation_stats_by_hand():
    x = np.array([[0.0, 2.0], [2.0, 4.0]], np.float32)
    mean, std = r.normalisation_stats(x)
    np.testing.assert_allclose(mean, [1.0, 3.0])
    assert std == pytest.approx(math.sqrt(2.0))  # global, ddof 0: values 0,2,2,4
    mean1, std1 = r.normalisation_stats(x, qinco1_mode=True)
    np.testing.assert_array_equal(mean1, [1.0, 1.0]) and None
    assert std1 == 2.0 and mean1.dtype == np.float32
    # only the first 100k rows count
    big = np.zeros((r.STATS_ROWS + 1, 2), np.float32)
    big[::2] = 1.0
    big[-1] = 1e6
    m, s = r.normalisation_stats(big)
    assert m.max() < 1 and s == pytest.approx(0.5, rel=1e-4)
    with pytest.raises(ValueError, match="spread"):
        r.normalisation_stats(np.ones((4, 2), np.float32))


# ---------------------------------------------------------------- RQ initialisation


def test_kmeans_reference_empty_cluster_quirk():
    x = np.full((10, 2), 100.0, np.float32)
    book = r.kmeans_reference(x, 2, 3, np.random.RandomState(0))
    np.testing.assert_allclose(book[0], [100.0, 100.0])  # ties go to the first centroid
    assert np.all((book[1] >= 0) & (book[1] < 1))          # the empty one: raw U[0, 1)


def test_kmeans_reference_finds_separated_clusters():
    x = np.concatenate([np.zeros((50, 2)), np.full((50, 2), 10.0)]).astype(np.float32)
    book = r.kmeans_reference(x, 2, 10, np.random.RandomState(0))
    assert sorted(map(tuple, np.round(book, 5).tolist())) == [(0.0, 0.0), (10.0, 10.0)]


@pytest.fixture(scope="module")
def small_data():
    xt = np.load(FIXTURES / "train_xt.npy")[:2000]
    xval = np.load(FIXTURES / "train_xval.npy")[:300]
    return xt, xval


def test_rq_init_reduces_mse_step_by_step(small_data):
    xt, xval = small_data
    var = float(((xval - xval.mean(0)) ** 2).mean(0).sum())
    one = r.train_rq_init(xt, 1, 16, xval=xval, seed=0)
    two = r.train_rq_init(xt, 2, 16, xval=xval, seed=0)
    assert two.codebooks.shape == (2, 16, 32) and two.codebooks.dtype == np.float32
    assert two.val_mse < one.val_mse < var
    np.testing.assert_array_equal(one.codebooks[0], two.codebooks[0])  # same seed, same first stage
    q1 = r.train_rq_init(xt, 2, 16, xval=xval, qinco1_mode=True)
    assert q1.codebooks.shape == (2, 16, 32) and q1.val_mse < var


def test_rq_init_over_ivf_centroids(small_data):
    xt, xval = small_data
    ivf = np.load(FIXTURES / "ivf_centroids_64.npy")
    res = r.train_rq_init(xt, 2, 16, ivf_centroids=ivf, xval=xval)
    assign = ((xval[:, None] - ivf[None]) ** 2).sum(-1).argmin(1)
    ivf_only = float(((xval - ivf[assign]) ** 2).mean(0).sum())
    assert res.codebooks.shape == (2, 16, 32) and res.val_mse < ivf_only
    # the RQ codebooks are residual codebooks: centred near 0, unlike the data
    assert abs(res.codebooks.mean()) < 0.1 * abs(xt.mean())


def test_initial_codebooks_normalise_and_add_noise():
    rs = np.random.RandomState(0)
    books = rs.rand(3, 64, 4).astype(np.float32) * 10
    mean, std = np.arange(4, dtype=np.float32), 2.0
    exact = r.initial_codebooks(books, mean, std, ivf=False, key=jax.random.PRNGKey(0), noise=0.0)
    np.testing.assert_allclose(exact[0], (books[0] - mean) / 2, rtol=1e-6)
    np.testing.assert_allclose(exact[1:], books[1:] / 2, rtol=1e-6)
    ivf = r.initial_codebooks(books, mean, std, ivf=True, key=jax.random.PRNGKey(0), noise=0.0)
    np.testing.assert_allclose(ivf, books / 2, rtol=1e-6)
    noisy = r.initial_codebooks(books, mean, std, ivf=True, key=jax.random.PRNGKey(1), noise=0.1)
    ratio = (noisy - ivf).std(axis=(1, 2)) / ivf.std(axis=(1, 2), ddof=1)
    np.testing.assert_allclose(ratio, 0.1, rtol=0.15)
    heavy = r.initial_codebooks(books, mean, std, ivf=True, key=jax.random.PRNGKey(1), qinco1_mode=True)
    np.testing.assert_allclose((heavy - ivf).std() / ((noisy - ivf).std()), 10, rtol=1e-3)


# ---------------------------------------------------------------- losses


def test_step_and_substep_losses_by_hand():
    x = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    xh = jnp.array([[[1.0, 1.0], [3.0, 3.0]], [[1.0, 2.0], [3.0, 5.0]]])  # (S=2, B=2, d=2)
    np.testing.assert_allclose(r.step_mse_losses(xh, x), [0.5, 0.25])
    w = jnp.array([1.0, 0.0])  # second row is padding
    np.testing.assert_allclose(r.step_mse_losses(xh, x, w), [0.5, 0.0])
    before = jnp.zeros((2, 2, 2))
    sub = jnp.array([[[1.0, 2.0], [0.0, 0.0]], [[3.0, 4.0], [1.0, 1.0]]])  # (S, K=2, d)
    codes = jnp.array([[0, 1], [1, 0]])
    # step 0: rows pick [1,2] (exact) and [0,0] (err 9+16); step 1: [1,1] (0+1), [3,4] (0)
    np.testing.assert_allclose(r.substep_losses(x, before, sub, codes), [25 / 4, 1 / 4])
    g_before, g_sub = jax.grad(lambda b, s: r.substep_losses(x, b, s, codes).sum(), argnums=(0, 1))(before, sub)
    assert not np.any(np.asarray(g_before)) and np.any(np.asarray(g_sub))


def test_running_target_stats_by_hand():
    x = jnp.array([[1.0], [3.0]])
    mean, std = r.update_target_stats(jnp.zeros(1), jnp.ones(1), x, jnp.zeros((2, 1, 1)))
    np.testing.assert_allclose(mean, [0.2], rtol=1e-6)
    np.testing.assert_allclose(std, [0.1 * math.sqrt(2) + 0.9], rtol=1e-6)
    assert r.encode_chunk_rows(65536, 16, 32) == 128 and r.encode_chunk_rows(65536, 0, 1) == 65536
    assert r.encode_chunk_rows(0, 8, 8) == 0


def test_codeword_usage_and_reset():
    codes = jnp.array([[0, 1], [0, 1], [2, 1]])  # (B, S=2), K=3
    usage = r.codeword_usage(codes, 3)
    np.testing.assert_array_equal(usage, [[2, 0, 1], [0, 3, 0]])
    books = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4)
    subs = books[1:] + 100.0  # only the last step has a substep codebook
    tmean, tstd = jnp.full((2, 4), 5.0), jnp.full((2, 4), 0.5)
    new, new_sub, n = r.reset_unused_codewords(books, subs, usage, tmean, tstd, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(n, [1, 2])
    np.testing.assert_array_equal(new[0, [0, 2]], books[0, [0, 2]])
    np.testing.assert_array_equal(new[1, 1], books[1, 1])
    np.testing.assert_array_equal(new_sub[0, 1], subs[0, 1])
    assert not np.allclose(new[0, 1], books[0, 1]) and not np.allclose(new_sub[0, 0], subs[0, 0])
    # re-drawn substep entries = re-drawn codeword + small noise
    assert float(jnp.abs(new_sub[0, 0] - new[1, 0]).max()) < 1.0
    # all unused: the new codebook has exactly the running mean / std
    allnew, _, _ = r.reset_unused_codewords(jnp.zeros((1, 256, 8)), None, jnp.zeros((1, 256)),
                                            jnp.full((1, 8), 5.0), jnp.full((1, 8), 0.5), jax.random.PRNGKey(1))
    assert float(allnew.mean()) == pytest.approx(5.0, abs=1e-4)
    assert float(jnp.std(allnew, ddof=1)) == pytest.approx(0.5, rel=1e-4)
    same, same_sub, n0 = r.reset_unused_codewords(books, subs, usage, tmean, tstd, jax.random.PRNGKey(0),
                                                  qinco1_mode=True)
    assert same is books and same_sub is subs and not np.any(np.asarray(n0))
    with pytest.raises(ValueError, match="substep"):
        r.reset_unused_codewords(books, jnp.zeros((3, 3, 4)), usage, tmean, tstd, jax.random.PRNGKey(0))


def test_rq_init_reaches_the_reference_validation_mse():
    # README of the QINCo2 fixtures: RQ-init val MSE 896.8 (M=4, K=256, all 9000 train_xt
    # + train_xval rows) and 742.2 (IVF64, ivf_xt, ds.loop=8192: the first 8192 rows).
    x = np.concatenate([np.load(FIXTURES / "train_xt.npy"), np.load(FIXTURES / "train_xval.npy")])
    xt, xval = r.split_validation(x, 1000)
    plain = r.train_rq_init(xt[r.DataOrder(len(xt), None, 0).rq_rows(256)], 4, 256, xval=xval)
    assert plain.val_mse == pytest.approx(896.8, rel=0.02)
    ivt, ivv = r.split_validation(np.load(FIXTURES / "ivf_xt.npy"), 1000)
    rows = r.DataOrder(len(ivt), 8192, 0).rq_rows(256)
    assert len(rows) == 8192
    ivf = r.train_rq_init(ivt[rows], 4, 256, xval=ivv, ivf_centroids=np.load(FIXTURES / "ivf_centroids_64.npy"))
    assert ivf.val_mse == pytest.approx(742.2, rel=0.02)


# ---------------------------------------------------------------- on a model's parameters


def _qinco2_params(seed=3, **kw):
    from qinco_jax.config import QincoConfig
    from qinco_jax.models.qinco import QincoModel

    config = QincoConfig(d=4, K=8, M=3, L=1, h=6, arch="qinco2", **kw)
    return config, QincoModel.init(config, seed).numpy_params()


def test_split_trainable_freezes_statistics_and_ivf_centroids():
    config, p = _qinco2_params(variant="ivf", K_IVF=5)
    trainable, frozen = r.split_trainable(p, config.is_ivf)
    assert set(frozen) == {"normalisation", "xtarget_stats", "codebook0"} and set(trainable) == {"steps"}
    config, p = _qinco2_params()
    trainable, frozen = r.split_trainable(p, config.is_ivf)
    assert set(frozen) == {"normalisation", "xtarget_stats"} and set(trainable) == {"steps", "codebook0"}


def test_model_losses_by_hand():
    from qinco_jax.models import qinco as qm

    config, p = _qinco2_params(A=2, B=2)
    p["steps"] = jax.tree.map(lambda a: a + 0.1 * np.random.RandomState(1).randn(*a.shape).astype(np.float32),
                              p["steps"])
    rs = np.random.RandomState(2)
    x = rs.randn(5, 4).astype(np.float32)
    codes = rs.randint(0, 8, size=(5, 3)).astype(np.int32)
    mse, sub, _ = r.model_losses(p, jnp.asarray(x), jnp.asarray(codes), outer_skip=True, is_ivf=False)
    xhats = np.asarray(qm.decode_steps(p, codes, outer_skip=True))
    np.testing.assert_allclose(float(mse), sum(np.mean((xh - x) ** 2) for xh in xhats), rtol=1e-5)
    expected_sub = sum(np.mean((xhats[s] + p["steps"]["substep_codebook"][s][codes[:, s + 1]] - x) ** 2)
                       for s in range(2))
    np.testing.assert_allclose(float(sub), expected_sub, rtol=1e-5)
    # The substep loss trains the substep codebooks only (x̂ is detached).
    g = jax.grad(lambda q: r.model_losses(q, x, codes, outer_skip=True, is_ivf=False)[1])(p)
    assert np.abs(np.asarray(g["steps"]["substep_codebook"])).sum() > 0
    assert np.abs(np.asarray(g["steps"]["codebook"])).sum() == 0
    # padding rows (weight 0) do not count
    w = jnp.array([1, 1, 1, 0, 0], jnp.float32)
    mse_w, _, _ = r.model_losses(p, x, codes, w, outer_skip=True, is_ivf=False)
    mse_3, _, _ = r.model_losses(p, x[:3], codes[:3], outer_skip=True, is_ivf=False)
    np.testing.assert_allclose(float(mse_w), float(mse_3), rtol=1e-6)


def test_model_target_stats_usage_and_reset():
    config, params = _qinco2_params(A=2, B=2)
    rs = np.random.RandomState(0)
    x = rs.randn(64, 4).astype(np.float32) * 3 + 5
    xhats = rs.randn(3, 64, 4).astype(np.float32)
    stats = r.update_model_target_stats(params["xtarget_stats"], x, xhats)
    # step 0's target is x itself; step m's is x - x̂_{m-1}
    np.testing.assert_allclose(np.asarray(stats["mean"][0]), 0.1 * x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(stats["var"][2]), 0.1 * (x - xhats[1]).std(0, ddof=1) + 0.9, rtol=1e-5)
    codes = jnp.array([[0, 1, 2], [0, 1, 3]])
    usage = r.model_codeword_usage(codes, 8, 3, jnp.array([1.0, 0.0]))
    assert usage.shape == (3, 8) and int(usage.sum()) == 3 and int(usage[2, 2]) == 1

    params["xtarget_stats"] = {"mean": np.full((3, 4), 100.0, np.float32), "var": np.full((3, 4), 2.0, np.float32)}
    usage = np.ones((3, 8), np.int64)
    usage[0, 2] = usage[2, 5] = usage[2, 6] = 0
    new, n_reset = r.reset_model_codewords(params, config, usage, jax.random.key(0))
    assert list(n_reset) == [1, 0, 2]
    np.testing.assert_array_equal(np.delete(np.asarray(new["codebook0"]), 2, 0), np.delete(params["codebook0"], 2, 0))
    assert abs(float(np.asarray(new["codebook0"])[2].mean()) - 100) < 10
    book = np.asarray(new["steps"]["codebook"][1])
    np.testing.assert_array_equal(book[:5], params["steps"]["codebook"][1][:5])
    assert np.all(np.abs(book[5:7] - 100) < 10)
    sub = np.asarray(new["steps"]["substep_codebook"][1])
    assert np.all(sub[5:7] != book[5:7]) and np.all(np.abs(sub[5:7] - book[5:7]) < 1)
    np.testing.assert_array_equal(np.asarray(new["steps"]["codebook"][0]), params["steps"]["codebook"][0])
    # qinco1_mode never resets
    q1, p1 = _qinco2_params(qinco1_mode=True)
    same, n = r.reset_model_codewords(p1, q1, usage, jax.random.key(0))
    assert same is p1 and n.sum() == 0
