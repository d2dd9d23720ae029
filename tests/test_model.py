"""The model's pure functions: shapes, the split concat block, nearest-codeword search."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qinco_jax.models import qinco as qm
from qinco_jax.config import PQConfig, QincoConfig
from qinco_jax.models.qinco import PQQincoModel, QincoModel


@pytest.mark.parametrize("variant", ["qinco", "lowrank", "ivf"])
def test_parameter_shapes_follow_the_config(variant):
    cfg = QincoConfig(d=8, K=16, M=3, L=2, h=12, variant=variant, K_IVF=32 if variant == "ivf" else 0)
    params = QincoModel.init(cfg, 0).params
    S = cfg.num_steps
    assert S == (3 if variant == "ivf" else 2)
    assert params["codebook0"].shape == (32 if variant == "ivf" else 16, 8)
    assert params["steps"]["codebook"].shape == (S, 16, 8)
    width = 12 if variant == "lowrank" else 8
    assert params["steps"]["concat_codeword"]["kernel"].shape == (S, 8, width)
    assert ("bias" in params["steps"]["concat_codeword"]) == (variant != "lowrank")
    assert params["steps"]["residual_blocks_1"]["up"]["kernel"].shape == (S, 8, 12)
    assert qm.config_from_params(params, variant=variant, db_scale=1.0) == cfg


def test_wrong_parameter_shape_is_named():
    cfg = QincoConfig(d=8, K=16, M=3, L=1, h=12)
    params = QincoModel.init(cfg, 0).params
    params["steps"]["codebook"] = jnp.zeros((2, 16, 9))
    with pytest.raises(ValueError, match="codebook"):
        QincoModel(cfg, params)


def test_candidates_equal_the_literal_concatenation():
    """The split concat block (codeword half computed once per codebook) gives what the
    paper's Linear(concat(c, x̂)) gives."""
    cfg = QincoConfig(d=6, K=5, M=2, L=1, h=7)
    params = QincoModel.init(cfg, 3).params
    p = jax.tree.map(lambda a: a[0], params["steps"])
    xhat = jax.random.normal(jax.random.key(1), (4, 6))
    got = qm.step_module(cfg).apply({"params": p}, xhat, method=qm.QincoStep.candidates)
    c = p["codebook"]
    W = jnp.concatenate([p["concat_codeword"]["kernel"], p["concat_input"]["kernel"]], axis=0)
    cat = jnp.concatenate([jnp.broadcast_to(c, (4, 5, 6)), jnp.broadcast_to(xhat[:, None], (4, 5, 6))], -1)
    z = c + cat @ W + p["concat_codeword"]["bias"]
    blk = p["residual_blocks_0"]
    z = z + jax.nn.relu(z @ blk["up"]["kernel"]) @ blk["down"]["kernel"]
    np.testing.assert_allclose(got, z, rtol=1e-5, atol=1e-5)


def test_decode_reproduces_the_encoders_reconstruction():
    cfg = QincoConfig(d=8, K=16, M=4, L=2, h=16)
    params = QincoModel.init(cfg, 0).params
    x = jax.random.normal(jax.random.key(2), (64, 8))
    codes, xhat = qm.encode_greedy(params, x)
    np.testing.assert_array_equal(qm.decode(params, codes), xhat)
    partial = qm.decode_steps(params, codes)
    assert partial.shape == (4, 64, 8)
    np.testing.assert_array_equal(partial[-1], xhat)
    losses = qm.step_losses(params, x, codes)
    np.testing.assert_allclose(losses[-1], jnp.sum((xhat - x) ** 2), rtol=1e-5)


def test_greedy_picks_the_best_codeword_at_every_step():
    cfg = QincoConfig(d=4, K=8, M=3, L=1, h=8)
    params = QincoModel.init(cfg, 5).params
    x = jax.random.normal(jax.random.key(0), (20, 4))
    codes, _ = qm.encode_greedy(params, x)
    for s in range(1, 3):
        prefix = codes[:, :s]
        errs = []
        for k in range(8):
            trial = jnp.concatenate([prefix, jnp.full((20, 1), k, jnp.int32), jnp.zeros((20, 3 - s - 1), jnp.int32)], 1)
            errs.append(jnp.sum((qm.decode_steps(params, trial)[s] - x) ** 2, axis=1))
        np.testing.assert_array_equal(codes[:, s], jnp.argmin(jnp.stack(errs, 1), axis=1))


@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_nearest_codeword_in_chunks_is_exact(chunk):
    rs = np.random.RandomState(0)
    cb = jnp.asarray(rs.randn(300, 5).astype(np.float32))
    x = jnp.asarray(rs.randn(50, 5).astype(np.float32))
    brute = np.argmin(((np.asarray(x)[:, None] - np.asarray(cb)[None]) ** 2).sum(-1), 1)
    np.testing.assert_array_equal(qm.nearest_codeword(x, cb, chunk=chunk), brute)
    idx, dist = qm.nearest_codewords(x, cb, 4, chunk=chunk)
    full = ((np.asarray(x)[:, None] - np.asarray(cb)[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(idx[:, 0], brute)
    np.testing.assert_allclose(dist, np.sort(full, axis=1)[:, :4], rtol=1e-4, atol=1e-4)


def test_pq_model_checks_the_opq_matrix():
    subs = tuple(QincoModel.init(QincoConfig(d=4, K=4, M=2, L=1, h=4), i) for i in range(2))
    assert PQQincoModel(subs).d == 8
    assert PQQincoModel(subs, np.eye(8, 10, dtype=np.float32)).d == 10
    with pytest.raises(ValueError, match="OPQ"):
        PQQincoModel(subs, np.eye(6, 8, dtype=np.float32))
    assert PQConfig(tuple(s.config for s in subs)).code_width == 4


def test_config_rejects_nonsense():
    with pytest.raises(ValueError):
        QincoConfig(d=0, K=16, M=2, L=1, h=4)
    with pytest.raises(ValueError):
        QincoConfig(d=4, K=16, M=2, L=1, h=4, variant="ivf")  # no K_IVF
