"""QINCo2: parity with the reference's fixtures, its .pt files, encoding defaults."""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import require_torch
from qinco_jax.models import codec
from qinco_jax.formats import qinco2_file
from qinco_jax.formats import torch_pickle
from qinco_jax.models import qinco as qm
from qinco_jax.formats.checkpoint import CheckpointError, load_model, save_model
from qinco_jax.config import EncodeOptions, QincoConfig
from qinco_jax.models.qinco import QincoModel
from qinco_jax.formats.torch_pickle import Global, Reduce, TorchWriter

FIXTURES = Path(__file__).parent / "fixtures" / "qinco2"
PLAIN = FIXTURES / "qinco2_d32_M4_K256_L2_de48_dh64_A8_B8.pt"
QINCO1_MODE = FIXTURES / "qinco2_qinco1mode_d32_M4_K256_L2_dh64.pt"
IVF = FIXTURES / "ivf_qinco2_d32_IVF64_M4_K256_L2_de48_dh64_A8_B8.pt"

# (file, key prefix, [(A, B, key suffix)]): every setting the reference recorded.
# qinco2_q1 at B=4 exists only on the reference's training path (its eval path fails).
CASES = [
    (PLAIN, "qinco2", [(8, 8, ""), (4, 1, ""), (16, 16, "")]),
    (QINCO1_MODE, "qinco2_q1", [(0, 1, ""), (0, 4, "_train")]),
    (IVF, "ivf_qinco2", [(8, 8, ""), (4, 1, ""), (16, 16, "")]),
]


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(FIXTURES / "reference_outputs_qinco2.npz"))


@pytest.mark.parametrize("path,prefix,settings", CASES, ids=[c[1] for c in CASES])
def test_parity_with_reference(ref, path, prefix, settings):
    model = load_model(path)
    x = ref["x"]
    for A, B, suffix in settings:
        key = f"{prefix}_A{A}_B{B}"
        ref_codes = ref[f"{key}_codes{suffix}"]
        codes, err = codec.encode(model, x, EncodeOptions(beam=B, preselect=A), return_errors=True)
        equal_rows = np.mean(np.all(codes == ref_codes, axis=1))
        assert equal_rows >= 0.99, (key, equal_rows)
        ref_mse = float(ref[f"{key}_mse{suffix}"])
        assert abs(err.mean() - ref_mse) <= 1e-3 * ref_mse, (key, err.mean(), ref_mse)
        decoded = codec.decode(model, ref_codes)
        ref_decoded = ref[f"{key}_decoded{suffix}"]
        assert np.abs(decoded - ref_decoded).max() <= 1e-4 * np.abs(ref_decoded).max(), key
        # The squared errors the encoder reports are those of its decoding, in raw units.
        np.testing.assert_allclose(err, np.sum((codec.decode(model, codes) - x) ** 2, axis=1), rtol=1e-3)


def test_default_encoding_is_the_models_own_A_and_B(ref):
    model = load_model(PLAIN)
    assert codec.model_encode_defaults(model) == (8, 8, "substep")
    codes = codec.encode(model, ref["x"][:200])
    assert np.mean(np.all(codes == ref["qinco2_A8_B8_codes"][:200], axis=1)) >= 0.99
    # Greedy with all K codewords is another encoding: the defaults did change something.
    greedy = codec.encode(model, ref["x"][:200], EncodeOptions(beam=1, preselect=0))
    assert not np.array_equal(greedy, codes)
    assert codec.model_encode_defaults(load_model(QINCO1_MODE)) == (1, 0, "linear")
    v1 = QincoModel.init(QincoConfig(d=8, K=16, M=2, L=1, h=8))
    assert codec.model_encode_defaults(v1) == (1, 0, "linear")
    with pytest.raises(ValueError, match="substep"):
        codec.encode(v1, np.zeros((4, 8), np.float32), EncodeOptions(beam=2, preselect=4, proxy="substep"))


def test_describe():
    assert load_model(IVF).describe() == "IVF64-QINCo2 d=32 M=4 K=256 L=2 de=48 dh=64 A=8 B=8"
    assert load_model(PLAIN).describe() == "QINCo2 d=32 M=4 K=256 L=2 de=48 dh=64 A=8 B=8"
    assert load_model(QINCO1_MODE).describe() == "QINCo2 d=32 M=4 K=256 L=2 de=32 dh=64 A=0 B=1 qinco1_mode"
    assert QincoConfig(d=8).describe().startswith("QINCo d=8 ")


def test_qinco1_mode_file_equals_v1_model_with_same_weights(ref):
    q1 = load_model(QINCO1_MODE)
    c = q1.config
    v1 = QincoModel(QincoConfig(d=c.d, K=c.K, M=c.M, L=c.L, h=c.h),
                    {"codebook0": q1.params["codebook0"], "steps": q1.params["steps"]})
    x = ref["x"][:200]
    x_model_units = q1.normalise(x)  # v1 with db_scale = 1 sees model units
    for beam in (1, 4):
        np.testing.assert_array_equal(codec.encode(q1, x, EncodeOptions(beam=beam)),
                                      codec.encode(v1, x_model_units, EncodeOptions(beam=beam)))
    codes = codec.encode(q1, x)
    np.testing.assert_allclose(codec.decode(q1, codes), q1.denormalise(codec.decode(v1, codes)),
                               rtol=1e-6, atol=1e-4)


def test_untrained_qinco2_is_its_codebooks():
    """Concat and `down` start at zero, so an untrained step adds P_out P_in c + c: with
    the identity projections of de = d that is 2c (as in the reference, whose outer skip
    adds c to a network output that is then c itself)."""
    config = QincoConfig(d=8, K=16, M=3, L=2, h=16, arch="qinco2", A=4, B=2)
    model = QincoModel.init(config, 1)
    codes = np.array([[1, 2, 3], [15, 0, 7]], np.int32)
    p = model.params
    expected = p["codebook0"][codes[:, 0]] + 2 * p["steps"]["codebook"][0][codes[:, 1]] \
        + 2 * p["steps"]["codebook"][1][codes[:, 2]]
    np.testing.assert_allclose(np.asarray(qm.decode(p, codes, outer_skip=True)), expected, rtol=1e-6)
    # and with de != d the projections are the only change: z = P_out P_in c + c.
    projected = QincoModel.init(QincoConfig(d=8, K=16, M=2, L=1, h=16, de=12, arch="qinco2"), 2)
    s = jax.tree.map(lambda a: np.asarray(a[0]), projected.params["steps"])
    c = s["codebook"][codes[:, 1]]
    expected = projected.params["codebook0"][codes[:, 0]] + c @ s["in_proj"]["kernel"] @ s["out_proj"]["kernel"] + c
    np.testing.assert_allclose(np.asarray(qm.decode(projected.params, codes[:, :2], outer_skip=True)), expected,
                               rtol=1e-5, atol=1e-5)


def _state_and_parameters(path):
    obj = torch_pickle.load_pt(path)
    return {k: np.asarray(v) for k, v in obj["model"].items()}, obj["parameters"], obj["data_dim"]


@pytest.mark.parametrize("path", [PLAIN, QINCO1_MODE, IVF], ids=["plain", "qinco1_mode", "ivf"])
def test_pt_to_directory_to_pt_round_trip(tmp_path, path):
    original = load_model(path)
    directory = tmp_path / "model"
    save_model(original, directory)
    restored = load_model(directory)
    assert restored.config == original.config
    out = tmp_path / path.name  # qinco1-mode must come from `parameters`, not the name
    save_model(restored, out)
    sd_in, parameters_in, d_in = _state_and_parameters(path)
    sd_out, parameters_out, d_out = _state_and_parameters(out)
    assert list(sd_out) == list(sd_in)
    for k in sd_in:
        assert sd_out[k].dtype == sd_in[k].dtype and sd_out[k].shape == sd_in[k].shape, k
        np.testing.assert_array_equal(sd_out[k], sd_in[k], err_msg=k)
    assert parameters_out == parameters_in and d_out == d_in
    assert load_model(out).config == original.config


def test_written_file_loads_with_torch_weights_only(tmp_path):
    torch = require_torch()
    out = tmp_path / "ivf.pt"
    save_model(load_model(IVF), out)
    written = torch.load(out, weights_only=True)
    reference = torch.load(IVF, weights_only=True)
    assert set(written) == set(reference)
    assert written["parameters"] == reference["parameters"] and written["data_dim"] == reference["data_dim"]
    assert list(written["model"]) == list(reference["model"])
    for k, t in reference["model"].items():
        assert written["model"][k].shape == t.shape and written["model"][k].dtype == t.dtype, k
        assert torch.equal(written["model"][k], t), k


def _write_checkpoint(path, model, parameters=None, extra=None, data_dim=None):
    """A QINCo2-format file with chosen `parameters` (to make bad ones)."""
    writer = TorchWriter()
    sd = qinco2_file.qinco2_state_dict(model)
    root = {"epoch": None, "model": {k: qinco2_file._plain_tensor(writer, v) for k, v in sd.items()},
            "optimizer": None, "scheduler": None, "logger": extra,
            "parameters": parameters if parameters is not None else qinco2_file.qinco2_parameters(model.config),
            "data_dim": model.config.d if data_dim is None else data_dim}
    torch_pickle.write_pt(path, writer, root)


def test_refusals(tmp_path):
    model = load_model(IVF)
    good = qinco2_file.qinco2_parameters(model.config)

    bad = tmp_path / "global.pt"
    _write_checkpoint(bad, model, extra=Reduce(Global("os", "system"), ("true",)))
    with pytest.raises(CheckpointError, match="os.system"):
        load_model(bad)

    for name, parameters, data_dim, match in [
        ("k.pt", {**good, "K": 128}, None, "codebook.weight.*shape"),
        ("de.pt", {**good, "de": 64}, None, "concat.mlp.weight.*shape"),
        ("l.pt", {**good, "L": 1}, None, "residual_blocks.1"),
        ("a0.pt", {**good, "A": 0}, None, "substep"),
        ("m.pt", {**good, "M": 5}, None, "steps.5"),
        ("ivf.pt", {k: v for k, v in good.items() if k not in ("ivf_in_use", "ivf_K")}, None, "steps.0.codebook.weight"),
        ("d.pt", good, 16, "data_mean"),
        ("unknown.pt", {**good, "wd": 3}, None, "unknown"),
        ("type.pt", {**good, "K": "256"}, None, "integer"),
        ("missing.pt", {k: v for k, v in good.items() if k != "dh"}, None, "lacks"),
    ]:
        _write_checkpoint(tmp_path / name, model, parameters, data_dim=data_dim)
        with pytest.raises(CheckpointError, match=match):
            load_model(tmp_path / name)

    data = PLAIN.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated|corrupt"):
        load_model(truncated)


def test_qinco1_file_name_means_qinco1_mode(tmp_path):
    q1 = load_model(QINCO1_MODE)
    parameters = {k: v for k, v in qinco2_file.qinco2_parameters(q1.config).items() if k != "qinco1_mode"}
    named = tmp_path / "qinco1-deep1M-8x8.pt"
    _write_checkpoint(named, q1, parameters)
    assert load_model(named).config.qinco1_mode
    shutil.copy(named, tmp_path / "other.pt")
    assert not load_model(tmp_path / "other.pt").config.qinco1_mode
