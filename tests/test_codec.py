"""Batched encode/decode on numpy arrays in raw units."""

import numpy as np
import pytest

from qinco_jax.models import codec
from qinco_jax.models import qinco as qm
from qinco_jax.config import EncodeOptions, QincoConfig
from qinco_jax.models.qinco import PQQincoModel, QincoModel

CFG = QincoConfig(d=8, K=16, M=3, L=1, h=16, db_scale=10.0)


def _data(n, d=8, seed=0):
    return (np.random.RandomState(seed).randn(n, d) * 10).astype(np.float32)


def test_batching_and_padding_do_not_change_the_codes():
    m = QincoModel.init(CFG, 0)
    x = _data(37)
    whole = codec.encode(m, x, EncodeOptions(batch_size=64))
    pieces = codec.encode(m, x, EncodeOptions(batch_size=8))  # 5 batches, the last padded
    np.testing.assert_array_equal(whole, pieces)
    assert whole.shape == (37, 3) and whole.dtype == np.int32
    y = codec.decode(m, whole, batch_size=16)
    np.testing.assert_allclose(y, codec.decode(m, whole, batch_size=128), rtol=1e-6)


def test_encode_works_in_raw_units_with_db_scale():
    m = QincoModel.init(CFG, 0)
    x = _data(20)
    codes, err = codec.encode(m, x, return_errors=True)
    y = codec.decode(m, codes)
    np.testing.assert_allclose(err, ((x - y) ** 2).sum(1), rtol=1e-4)
    direct, xhat = qm.encode_greedy(m.params, x / np.float32(10.0))
    np.testing.assert_array_equal(codes, direct)
    np.testing.assert_allclose(y, np.asarray(xhat) * 10, rtol=1e-6)


def test_a_fixed_batch_compiles_once():
    m = QincoModel.init(CFG, 1)
    codec.encode(m, _data(40), EncodeOptions(batch_size=16))
    before = codec.encode_batch._cache_size()
    codec.encode(m, _data(45), EncodeOptions(batch_size=16))
    codec.encode(m, _data(33), EncodeOptions(batch_size=16))
    assert codec.encode_batch._cache_size() == before


def test_ivf_first_code_is_the_nearest_centroid_and_can_be_imposed():
    cfg = QincoConfig(d=8, K=16, M=2, L=1, h=8, variant="ivf", K_IVF=40, db_scale=10.0)
    m = QincoModel.init(cfg, 0)
    x = _data(30)
    codes = codec.encode(m, x)
    cents = np.asarray(m.params["codebook0"]) * 10
    brute = np.argmin(((x[:, None] - cents[None]) ** 2).sum(-1), 1)
    np.testing.assert_array_equal(codes[:, 0], brute)
    np.testing.assert_array_equal(codec.assign_ivf(m, x), brute)
    imposed = (brute + 1) % 40
    forced = codec.encode(m, x, code0=imposed)
    np.testing.assert_array_equal(forced[:, 0], imposed)
    with pytest.raises(ValueError, match="code0"):
        codec.encode(m, x, code0=np.full(30, 40))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_codes_mostly_agree(dtype):
    m = QincoModel.init(CFG, 0)
    x = _data(200)
    agree = (codec.encode(m, x, EncodeOptions(dtype=dtype)) == codec.encode(m, x)).mean()
    assert agree > 0.8
    y16 = codec.decode(m, codec.encode(m, x), dtype=dtype)
    y32 = codec.decode(m, codec.encode(m, x))
    assert np.abs(y16 - y32).max() < 0.1 * np.abs(y32).max()


def test_pq_with_opq_round_trip():
    subs = tuple(QincoModel.init(QincoConfig(d=4, K=8, M=2, L=1, h=8), i) for i in range(2))
    q, _ = np.linalg.qr(np.random.RandomState(0).randn(8, 8))
    m = PQQincoModel(subs, q.astype(np.float32))
    x = _data(25) / 10
    codes, err = codec.encode(m, x, return_errors=True)
    assert codes.shape == (25, 4)
    y = codec.decode(m, codes)
    np.testing.assert_allclose(err, ((x - y) ** 2).sum(1), rtol=1e-4)
    # Sub-quantizers see x rotated by OPQ, column blocks of 4.
    xr = x @ q.T
    np.testing.assert_array_equal(codes[:, :2], codec.encode(subs[0], xr[:, :4]))


def test_bad_inputs_are_named():
    m = QincoModel.init(CFG, 0)
    with pytest.raises(ValueError, match="dimension 7"):
        codec.encode(m, _data(5, d=7))
    with pytest.raises(ValueError, match="shape"):
        codec.decode(m, np.zeros((5, 4), np.int32))
    with pytest.raises(ValueError, match="outside"):
        codec.decode(m, np.full((5, 3), 16))
    with pytest.raises(ValueError, match="integers"):
        codec.decode(m, np.zeros((5, 3), np.float32))
    with pytest.raises(ValueError, match="empty"):
        codec.encode(m, np.zeros((0, 8), np.float32))
    with pytest.raises(ValueError, match="beam"):
        codec.encode(m, _data(5), EncodeOptions(beam=0))
    with pytest.raises(ValueError, match="dtype"):
        codec.encode(m, _data(5), EncodeOptions(dtype="float64"))
    for bad in (0, -4):
        with pytest.raises(ValueError, match="batch size"):
            codec.encode(m, _data(5), EncodeOptions(batch_size=bad))
