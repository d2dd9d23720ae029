"""Parity with the PyTorch reference: its saved models, loaded without torch, encode and
decode like the reference did (tests/fixtures/reference_outputs.npz)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FIXTURES, REFERENCE_MODELS, load_reference_outputs

from qinco_jax.models import codec
from qinco_jax.formats.checkpoint import load_model
from qinco_jax.models.qinco import PQQincoModel, QincoModel

EXPECTED = {
    "qinco": ("qinco", 32, 4, 16, 2, 32, 0),
    "qinco_lr": ("lowrank", 32, 4, 16, 2, 32, 0),
    "ivf_qinco": ("ivf", 32, 4, 256, 1, 32, 64),
}


@pytest.fixture(scope="module", params=sorted(REFERENCE_MODELS))
def reference(request):
    key = request.param
    return key, load_model(FIXTURES / REFERENCE_MODELS[key]), load_reference_outputs()


def rel_error(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_configuration_read_from_the_module(reference):
    key, model, _ = reference
    if key == "pq_qinco":
        assert isinstance(model, PQQincoModel)
        assert model.opq.shape == (32, 32) and len(model.subs) == 2
        assert [(s.config.variant, s.d, s.config.M, s.config.K, s.config.L, s.config.h) for s in model.subs] \
            == [("qinco", 16, 3, 16, 1, 16)] * 2
        # each sub-quantizer keeps its own db_scale, as in the reference
        assert model.subs[0].config.db_scale != model.subs[1].config.db_scale
        return
    assert isinstance(model, QincoModel)
    c = model.config
    assert (c.variant, c.d, c.M, c.K, c.L, c.h, c.K_IVF) == EXPECTED[key]
    # db_scale was pickled as a numpy float32: we keep exactly that value
    assert np.float32(c.db_scale) == c.db_scale and c.db_scale > 1


def test_encode_matches_reference_codes(reference):
    key, model, ref = reference
    codes = codec.encode(model, ref["x"])
    expected = ref[f"{key}_codes"]
    assert codes.shape == expected.shape
    assert np.mean(codes == expected) >= 0.995


def test_decode_matches_reference(reference):
    key, model, ref = reference
    decoded = codec.decode(model, ref[f"{key}_codes"])
    assert rel_error(decoded, ref[f"{key}_decoded"]) < 1e-4


def test_ivf_encode_with_given_lists_matches_reference():
    """IVF-QINCo (saved from cuda:0) with the IVF lists imposed, as search_ivf does."""
    ref = load_reference_outputs()
    model = load_model(FIXTURES / REFERENCE_MODELS["ivf_qinco"])
    expected = ref["ivf_qinco_codes"]
    codes = codec.encode(model, ref["x"], code0=expected[:, 0])
    assert np.array_equal(codes[:, 0], expected[:, 0])
    assert np.mean(codes == expected) >= 0.995


@pytest.mark.parametrize("k_ivf", [64, 512])
def test_cuda_saved_ivf_model_holds_its_centroids(k_ivf):
    """The IVF codebook of the cuda:0-saved models is the k-means centroids / db_scale."""
    model = load_model(FIXTURES / f"ivf_qinco_d32_IVF{k_ivf}_M4_K256_L1_h32.pt")
    assert model.config.K_IVF == k_ivf and model.config.code_width == 5
    centroids = np.load(FIXTURES / f"ivf_centroids_{k_ivf}.npy")
    got = np.asarray(model.params["codebook0"]) * np.float32(model.config.db_scale)
    assert rel_error(got, centroids) < 1e-5
