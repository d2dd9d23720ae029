"""Beam-search encoding and candidate pre-selection (issue 6)."""

import itertools
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from qinco_jax.models import codec
from qinco_jax.models import qinco as qm
from qinco_jax.config import EncodeOptions, QincoConfig
from qinco_jax.models.qinco import QincoModel

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("variant", ["qinco", "lowrank", "ivf"])
def test_beam_one_over_all_codewords_is_greedy_bit_for_bit(variant):
    cfg = QincoConfig(d=8, K=32, M=4, L=2, h=16, variant=variant, K_IVF=20 if variant == "ivf" else 0)
    params = QincoModel.init(cfg, 2).params
    x = jnp.asarray(np.random.RandomState(0).randn(200, 8).astype(np.float32))
    greedy_codes, greedy_xhat = qm.encode_greedy(params, x)
    beam_codes, beam_xhat = qm.encode_beam(params, x, beam=1)
    np.testing.assert_array_equal(beam_codes, greedy_codes)
    np.testing.assert_array_equal(beam_xhat, greedy_xhat)
    forced = qm.encode_beam(params, x, greedy_codes[:, 0], beam=1, preselect=32)[0]
    np.testing.assert_array_equal(forced, greedy_codes)


def test_a_beam_holding_every_partial_code_finds_the_brute_force_optimum():
    cfg = QincoConfig(d=6, K=4, M=3, L=1, h=8, db_scale=3.0)
    m = QincoModel.init(cfg, 7)
    x = (np.random.RandomState(1).randn(64, 6) * 3).astype(np.float32)
    every_code = np.array(list(itertools.product(range(4), repeat=3)), np.int32)
    err = ((x[:, None] - codec.decode(m, every_code)[None]) ** 2).sum(-1)  # (64, 4^3)
    codes, beam_err = codec.encode(m, x, EncodeOptions(beam=16), return_errors=True)  # 16 = 4^2 partial codes
    np.testing.assert_array_equal(codes, every_code[err.argmin(1)])
    np.testing.assert_allclose(beam_err, err.min(1), rtol=1e-4)
    greedy_err = codec.encode(m, x, return_errors=True)[1]
    assert greedy_err.mean() > beam_err.mean()  # greedy is not optimal on this model


def test_wider_beams_never_lose_on_average_and_preselection_costs_little():
    cfg = QincoConfig(d=16, K=64, M=4, L=2, h=32)
    m = QincoModel.init(cfg, 0)
    x = np.random.RandomState(3).randn(300, 16).astype(np.float32)
    mse = {(a, b): codec.encode(m, x, EncodeOptions(beam=b, preselect=a), return_errors=True)[1].mean()
           for a in (0, 16) for b in (1, 4)}
    assert mse[0, 4] < mse[0, 1]
    assert mse[16, 4] < mse[16, 1]
    assert mse[16, 1] < 1.05 * mse[0, 1]  # A = K/4 pre-selected loses < 5 % MSE here


def test_beam_four_beats_greedy_on_a_trained_fixture_model():
    # The trained IVF fixtures (K = 256). On the K = 16 fixtures greedy encoding is
    # already optimal: a brute-force search over all 16^4 codes finds the same MSE.
    from qinco_jax.formats.checkpoint import load_model

    x = np.load(FIXTURES / "reference_outputs.npz")["x"]
    ivf = load_model(FIXTURES / "ivf_qinco_d32_IVF64_M4_K256_L1_h32.pt")
    greedy = codec.encode(ivf, x, return_errors=True)[1].mean()
    beam4 = codec.encode(ivf, x, EncodeOptions(beam=4), return_errors=True)[1].mean()
    assert beam4 < 0.95 * greedy
    preselected = codec.encode(ivf, x, EncodeOptions(beam=4, preselect=32), return_errors=True)[1].mean()
    assert preselected < 0.95 * greedy


def test_pq_models_pass_beam_options_to_every_sub_quantizer():
    from qinco_jax.models.qinco import PQQincoModel

    subs = tuple(QincoModel.init(QincoConfig(d=4, K=8, M=3, L=1, h=8), i) for i in range(2))
    m = PQQincoModel(subs)
    x = np.random.RandomState(0).randn(100, 8).astype(np.float32)
    codes = codec.encode(m, x, EncodeOptions(beam=4))
    np.testing.assert_array_equal(codes[:, 3:], codec.encode(subs[1], x[:, 4:], EncodeOptions(beam=4)))


def test_index_building_encodes_the_database_with_the_beam(monkeypatch):
    """search_ivf.py --beam/--preselect reach the encoder of `add` (ivf_index.add_vectors)."""
    from qinco_jax.formats.checkpoint import load_model
    from qinco_jax.search import index as ivf_index

    model = load_model(FIXTURES / "ivf_qinco_d32_IVF64_M4_K256_L1_h32.pt")
    xt = np.load(FIXTURES / "ivf_xt.npy")[:3000]
    xb = np.load(FIXTURES / "ivf_xb.npy")[:1000]
    trained, _ = ivf_index.train_index(model, xt, "IVF64,RQ4x8_Nqint8", log=lambda m: None)
    added = []
    add_codes = ivf_index.add_codes
    monkeypatch.setattr(ivf_index, "add_codes", lambda index, m, codes, **kw: (added.append(codes),
                                                                         add_codes(index, m, codes, **kw))[1])
    mse = {}
    for beam, preselect in [(1, 0), (4, 32)]:
        import faiss

        index = faiss.clone_index(trained)
        ivf_index.add_vectors(index, model, [xb], options=EncodeOptions(beam=beam, preselect=preselect), log=lambda m: None)
        assert index.ntotal == len(xb)
        np.testing.assert_array_equal(added[-1], codec.encode(model, xb, EncodeOptions(beam=beam, preselect=preselect)))
        mse[beam] = ((codec.decode(model, added[-1]) - xb) ** 2).sum(1).mean()
    assert mse[4] < 0.97 * mse[1]


def test_training_can_encode_with_a_beam():
    from qinco_jax.training import loop as training

    cfg = QincoConfig(d=8, K=16, M=3, L=1, h=16)
    params = QincoModel.init(cfg, 0).params
    x = jnp.asarray(np.random.RandomState(0).randn(64, 8).astype(np.float32))
    codes = training.make_encode_fn(EncodeOptions(beam=4, preselect=8))(params, x, None)
    np.testing.assert_array_equal(codes, qm.encode_beam(params, x, beam=4, preselect=8)[0])
    np.testing.assert_array_equal(training.make_encode_fn()(params, x, None), qm.encode_greedy(params, x)[0])
    with pytest.raises(ValueError, match="beam"):
        training.TrainConfig(encode=EncodeOptions(beam=0))


def _trained_ivf_model_and_vectors():
    from qinco_jax.formats.checkpoint import load_model

    return load_model(FIXTURES / "ivf_qinco_d32_IVF64_M4_K256_L1_h32.pt"), np.load(FIXTURES / "ivf_xb.npy")[:500]


@pytest.mark.parametrize("options", [EncodeOptions(beam=4), EncodeOptions(beam=8, preselect=32)])
def test_an_ivf_model_keeps_the_nearest_list_under_beam_search(options):
    """The beam searches the codes within each vector's nearest IVF list, so the IVF
    search probes the list the vector is filed under."""
    model, x = _trained_ivf_model_and_vectors()
    nearest = codec.assign_ivf(model, x)
    codes = codec.encode(model, x, options)
    np.testing.assert_array_equal(codes[:, 0], nearest)
    # The check bites: left free, the same beam moves some vectors to another list.
    opts = codec.resolve_options(model, options)
    free = qm.encode_beam(codec.network_params(model.params), jnp.asarray(model.normalise(x)), beam=opts.beam,
                          preselect=opts.preselect, proxy=opts.proxy)[0]
    assert np.mean(np.asarray(free)[:, 0] != nearest) > 0.01
    # Within the fixed list the beam still beats greedy.
    greedy = codec.encode(model, x, return_errors=True)[1].mean()
    assert codec.encode(model, x, options, return_errors=True)[1].mean() < greedy


def test_a_qinco2_ivf_model_keeps_the_nearest_list_under_beam_search():
    cfg = QincoConfig(d=8, K=16, M=3, L=1, h=16, arch="qinco2", variant="ivf", K_IVF=20, A=4, B=4)
    model = QincoModel.init(cfg, 1)
    x = np.random.RandomState(2).randn(300, 8).astype(np.float32)
    np.testing.assert_array_equal(codec.encode(model, x, EncodeOptions(beam=8))[:, 0], codec.assign_ivf(model, x))


def test_imposed_first_codes_override_the_nearest_list():
    model, x = _trained_ivf_model_and_vectors()
    other = (codec.assign_ivf(model, x) + 1) % model.config.K_IVF
    np.testing.assert_array_equal(codec.encode(model, x, EncodeOptions(beam=4), code0=other)[:, 0], other)
