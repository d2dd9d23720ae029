"""convert/codec_qinco.py and search/eval_qinco.py, run in-process on fixture models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, REFERENCE_MODELS, load_reference_outputs

from qinco_jax import cli
from qinco_jax.models import codec
from qinco_jax.data import datasets
from qinco_jax.formats import vecs_io
from qinco_jax.cli import codec as cli_codec
from qinco_jax.cli import evaluate as cli_evaluate
from qinco_jax.config import EncodeOptions
from qinco_jax.formats.checkpoint import load_model

ROOT = Path(__file__).resolve().parents[1]
QINCO = FIXTURES / REFERENCE_MODELS["qinco"]
IVF = FIXTURES / REFERENCE_MODELS["ivf_qinco"]


codec_cli = cli_codec
eval_cli = cli_evaluate


@pytest.fixture(scope="module")
def ref():
    return load_reference_outputs()


def test_encode_decode_npy_matches_reference(tmp_path, ref):
    vecs_io.write_vectors(tmp_path / "x.fvecs", ref["x"])
    codec_cli.main(["--model", str(QINCO), "--encode", "--i", str(tmp_path / "x.fvecs"), "--o", str(tmp_path / "c.npy")])
    codes = np.load(tmp_path / "c.npy")
    assert codes.dtype == np.int64  # as the reference's np.save of torch codes
    np.testing.assert_array_equal(codes, ref["qinco_codes"])
    codec_cli.main(["--model", str(QINCO), "--decode", "--i", str(tmp_path / "c.npy"), "--o", str(tmp_path / "y.npy")])
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), ref["qinco_decoded"], rtol=1e-5, atol=1e-3)


def test_raw_round_trip_ivf(tmp_path, ref):
    """IVF codes: log2(64) = 6 bits for the list, 4 x 8 bits for the steps -> 5 bytes."""
    np.save(tmp_path / "x.npy", ref["x"])
    codec_cli.main(["--model", str(IVF), "--encode", "--raw", "--i", str(tmp_path / "x.npy"), "--o", str(tmp_path / "c.raw")])
    assert (tmp_path / "c.raw").stat().st_size == len(ref["x"]) * 5
    codec_cli.main(["--model", str(IVF), "--decode", "--raw", "--i", str(tmp_path / "c.raw"), "--o", str(tmp_path / "y.fvecs")])
    y = vecs_io.read_vectors(tmp_path / "y.fvecs")
    np.testing.assert_allclose(y, ref["ivf_qinco_decoded"], rtol=1e-5, atol=1e-3)


def test_raw_size_rule_8x8(tmp_path):
    """8 codes of 8 bits for 10k vectors: exactly 80,000 bytes, and the codes come back."""
    from qinco_jax.formats.checkpoint import save_model
    from qinco_jax.config import QincoConfig
    from qinco_jax.models.qinco import QincoModel

    model = QincoModel.init(QincoConfig(d=32, K=256, M=8, L=1, h=8, db_scale=100.0), 0)
    save_model(model, tmp_path / "m8x8")
    x = datasets.gaussian_mixture(10_000, seed=5)
    vecs_io.write_vectors(tmp_path / "x.fbin", x)
    base = ["--model", str(tmp_path / "m8x8"), "--batch_size", "2048"]
    codec_cli.main(base + ["--encode", "--raw", "--i", str(tmp_path / "x.fbin"), "--o", str(tmp_path / "c.raw")])
    assert (tmp_path / "c.raw").stat().st_size == 80_000
    raw = np.fromfile(tmp_path / "c.raw", np.uint8).reshape(10_000, 8)
    codes = raw.astype(np.int32)  # 8-bit codes pack to their own bytes
    assert codes.max() > 200  # the whole 8-bit range is in use
    codec_cli.main(base + ["--decode", "--raw", "--i", str(tmp_path / "c.raw"), "--o", str(tmp_path / "y.npy")])
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), codec.decode(model, codes))
    vecs_io.write_vectors(tmp_path / "c.ivecs", codes[:100])
    codec_cli.main(base + ["--decode", "--i", str(tmp_path / "c.ivecs"), "--o", str(tmp_path / "z.npy")])
    np.testing.assert_array_equal(np.load(tmp_path / "z.npy"), np.load(tmp_path / "y.npy")[:100])
    np.testing.assert_array_equal(codes[:100], codec.encode(model, x[:100]))


def test_beam_and_preselect_are_passed_through(tmp_path, ref):
    np.save(tmp_path / "x.npy", ref["x"][:64])
    codec_cli.main(["--model", str(IVF), "--encode", "--beam", "4", "--preselect", "32",
                    "--i", str(tmp_path / "x.npy"), "--o", str(tmp_path / "c.npy")])
    expected = codec.encode(load_model(IVF), ref["x"][:64], EncodeOptions(beam=4, preselect=32))
    np.testing.assert_array_equal(np.load(tmp_path / "c.npy"), expected)
    greedy = codec.encode(load_model(IVF), ref["x"][:64])
    assert not np.array_equal(expected, greedy)  # the flags changed something


def test_codec_errors(tmp_path, ref):
    np.save(tmp_path / "x16.npy", ref["x"][:, :16])
    with pytest.raises(cli.UsageError, match="dimension 16.*expects d=32"):
        codec_cli.main(["--model", str(QINCO), "--encode", "--i", str(tmp_path / "x16.npy"), "--o", str(tmp_path / "c.npy")])
    with pytest.raises(cli.UsageError, match="exactly one of --encode and --decode"):
        codec_cli.main(["--model", str(QINCO), "--encode", "--decode", "--i", "a", "--o", "b"])
    np.save(tmp_path / "x.npy", ref["x"])
    with pytest.raises(cli.UsageError, match="codes are written as"):
        codec_cli.main(["--model", str(QINCO), "--encode", "--i", str(tmp_path / "x.npy"), "--o", str(tmp_path / "c.bvecs")])
    (tmp_path / "bad.raw").write_bytes(b"\0" * 7)
    with pytest.raises(ValueError, match="7 bytes is not a whole number of 5-byte codes"):
        codec_cli.main(["--model", str(IVF), "--decode", "--raw", "--i", str(tmp_path / "bad.raw"), "--o", str(tmp_path / "y.npy")])
    with pytest.raises(cli.UsageError, match="decoded vectors are written as"):  # floats do not fit bvecs
        codec_cli.main(["--model", str(QINCO), "--decode", "--i", str(tmp_path / "x.npy"), "--o", str(tmp_path / "y.bvecs")])
    assert not (tmp_path / "c.npy").exists() and not (tmp_path / "y.npy").exists()


def test_cli_error_is_one_line(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((3, 5), np.float32))
    r = subprocess.run([sys.executable, str(ROOT / "convert" / "codec_qinco.py"), "--model", str(QINCO), "--encode",
                        "--i", str(tmp_path / "x.npy"), "--o", str(tmp_path / "c.npy")],
                       capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("codec_qinco.py: error: ")
    assert "Traceback" not in r.stderr


def test_eval_on_synthetic_small(tmp_path):
    out = tmp_path / "eval.json"
    eval_cli.main(["--db", "synthetic_small", "--model", str(QINCO), "--json", str(out)])
    res = json.loads(out.read_text())
    ds = datasets.get_dataset("synthetic_small")
    model = load_model(QINCO)
    xb = ds.get_database()
    recons = codec.decode(model, codec.encode(model, xb))
    assert res["mse"] == pytest.approx(float(((xb - recons) ** 2).sum(1).mean()), rel=1e-5)
    ids = datasets.exact_groundtruth(ds.get_queries(), recons, 100)
    gt = ds.get_groundtruth()
    for r in (1, 10, 100):
        assert res["recalls"][str(r)] == pytest.approx((ids[:, :r] == gt[:, :1]).sum() / ds.nq)
    assert res["recalls"]["1"] <= res["recalls"]["10"] <= res["recalls"]["100"]
    assert (res["nb"], res["nq"], res["db"]) == (2000, 100, "synthetic_small")


def test_eval_dimension_mismatch(tmp_path):
    x = datasets.gaussian_mixture(60, d=16)
    vecs_io.write_vectors(tmp_path / "base.npy", x[:50])
    vecs_io.write_vectors(tmp_path / "query.npy", x[50:])
    with pytest.raises(cli.UsageError, match="dimension 32, the data set .* has dimension 16"):
        eval_cli.main(["--db", str(tmp_path), "--model", str(QINCO)])
    with pytest.raises(ValueError, match="unknown data set"):
        eval_cli.main(["--db", "no_such_set", "--model", str(QINCO)])


def test_encode_bvecs_input(tmp_path, ref):
    """uint8 vectors (BigANN's format) are encoded as their float32 values."""
    x8 = np.clip(np.round(ref["x"][:100]), 0, 255).astype(np.uint8)
    vecs_io.write_vectors(tmp_path / "x.bvecs", x8)
    codec_cli.main(["--model", str(QINCO), "--encode", "--i", str(tmp_path / "x.bvecs"), "--o", str(tmp_path / "c.npy")])
    np.testing.assert_array_equal(np.load(tmp_path / "c.npy"), codec.encode(load_model(QINCO), x8.astype(np.float32)))


def test_shards_encoded_separately_concatenate_to_the_whole(tmp_path, ref):
    np.save(tmp_path / "x.npy", ref["x"])
    whole, parts = tmp_path / "all.npy", []
    codec_cli.main(["--model", str(IVF), "--encode", "--i", str(tmp_path / "x.npy"), "--o", str(whole)])
    for i0, i1 in [(0, 200), (200, -1)]:
        parts.append(tmp_path / f"part{i0}.npy")
        codec_cli.main(["--model", str(IVF), "--encode", "--i", str(tmp_path / "x.npy"), "--o", str(parts[-1]),
                        "--i0", str(i0), "--i1", str(i1)])
    np.testing.assert_array_equal(np.concatenate([np.load(p) for p in parts]), np.load(whole))
    with pytest.raises(cli.UsageError, match="row range"):
        codec_cli.main(["--model", str(IVF), "--encode", "--i", str(tmp_path / "x.npy"), "--o", str(whole),
                        "--i0", "400", "--i1", "9999"])
