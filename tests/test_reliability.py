"""Bad input never becomes silent bad output (issue 13): NaN/Inf refused at every entry
point with the file and row, unsupported dtypes refused, vecs row headers verified,
faiss failures wrapped, memory bounded when streaming a memory map."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
from conftest import FIXTURES, REFERENCE_MODELS

from qinco_jax.experiments import baselines
from qinco_jax.models import codec
from qinco_jax.models import pairwise
from qinco_jax.training import pq
from qinco_jax.training import qinco2_recipe
from qinco_jax.training import recipe
from qinco_jax.training import rq_init
from qinco_jax.training import loop as training
from qinco_jax.data import validation
from qinco_jax.formats import vecs_io
from qinco_jax.cli import codec as codec_cli
from qinco_jax.cli import index as index_cli
from qinco_jax.cli import train as train_cli
from qinco_jax.search import index as ivf
from qinco_jax.search import sweep, two_stage
from qinco_jax.search.qinco_index import QincoIndex
from qinco_jax.formats.checkpoint import load_model
from qinco_jax.data.validation import FaissStepError, VectorInputError

ROOT = Path(__file__).resolve().parents[1]
QINCO = FIXTURES / REFERENCE_MODELS["qinco"]
IVF64 = FIXTURES / "ivf_qinco_d32_IVF64_M4_K256_L1_h32.pt"


@pytest.fixture(scope="module")
def xt():
    return np.load(FIXTURES / "train_xt.npy")


def with_bad(x, row, value=np.nan, col=3):
    x = np.array(x, np.float32)
    x[row, col] = value
    return x


def only_inputs_left(folder: Path, inputs: set[str]) -> None:
    """No output and no temporary file was left behind."""
    assert set(os.listdir(folder)) == inputs


# --------------------------------------------------------------------------------------
# 1. Non-finite values
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_codec_cli_refuses_non_finite_vectors(tmp_path, xt, value):
    vecs_io.write_vectors(tmp_path / "x.fvecs", with_bad(xt[:300], 217, value))
    with pytest.raises(VectorInputError, match=r"x\.fvecs: row 217 holds a non-finite value"):
        codec_cli.main(["--model", str(QINCO), "--encode", "--batch_size", "64", "--i", str(tmp_path / "x.fvecs"),
                        "--o", str(tmp_path / "codes.npy")])
    only_inputs_left(tmp_path, {"x.fvecs"})


def test_encode_of_a_pq_model_refuses_non_finite_vectors():
    model = load_model(FIXTURES / REFERENCE_MODELS["pq_qinco"])
    x = with_bad(np.random.default_rng(0).random((50, model.d)) * 100, 41, np.inf)
    with pytest.raises(VectorInputError, match="row 41 holds a non-finite value"):
        codec.encode(model, x)


def test_training_cli_refuses_non_finite_vectors(tmp_path, xt):
    np.save(tmp_path / "xt.npy", with_bad(xt, 1234))
    args = ["--training_data", str(tmp_path / "xt.npy"), "--nt", "2000", "--nval", "300", "--M", "3", "--K", "16",
            "--L", "1", "--h", "16", "--batch_size", "256", "--ngpu", "1", "--progress", "off",
            "--max_epochs", "1", "--model", str(tmp_path / "model.pt"), "--RQ_filename", str(tmp_path / "rq.npy")]
    with pytest.raises(VectorInputError, match=r"training vectors of .*xt\.npy: row 1234 "):
        train_cli.main(args)
    only_inputs_left(tmp_path, {"xt.npy"})
    # IVF centroids with an infinity
    np.save(tmp_path / "xt.npy", xt)
    np.save(tmp_path / "centroids.npy", with_bad(np.ones((16, xt.shape[1])), 9, np.inf, 0))
    with pytest.raises(VectorInputError, match=r"IVF centroids of .*centroids\.npy: row 9 "):
        train_cli.main(args + ["--ivf", "--IVF_centroids", str(tmp_path / "centroids.npy")])
    only_inputs_left(tmp_path, {"xt.npy", "centroids.npy"})


def test_training_library_refuses_non_finite_vectors(xt):
    with pytest.raises(VectorInputError, match="RQ training vectors: row 5 "):
        rq_init.train_rq(with_bad(xt[:300], 5), 2, 16, log=lambda m: None)
    model = load_model(QINCO)
    cfg = training.TrainConfig(max_epochs=1, batch_size=64, ngpu=1, progress=False)
    with pytest.raises(VectorInputError, match="validation vectors: row 7 "):
        training.fit(model, xt[:256], with_bad(xt[:64], 7, -np.inf), cfg, log=lambda m: None)


@pytest.fixture(scope="module")
def ivf_folder(tmp_path_factory):
    """A small data set folder for search_ivf.py, and the full index of its database."""
    tmp = tmp_path_factory.mktemp("ivf_nan")
    good = tmp / "good"
    good.mkdir()
    xb = np.load(FIXTURES / "ivf_xb.npy")[:400]
    xq = np.load(FIXTURES / "ivf_xq.npy")[:20]
    np.save(good / "learn.npy", np.load(FIXTURES / "ivf_xt.npy")[:1000])
    np.save(good / "base.npy", xb)
    np.save(good / "query.npy", xq)
    main = index_cli.main
    common = ["--model", str(IVF64), "--nprobe", "4", "--nshort", "10", "--nthreads", "1"]
    main(["--db", str(good)] + common + ["--todo", "train", "add", "--nt", "1000", "--index_key", "IVF64,RQ4x8_Nqint8",
                                          "--trained_index", str(tmp / "trained.faissindex"),
                                          "--index", str(tmp / "full.faissindex")])
    return main, common, tmp, xb, xq


def _bad_folder(tmp_path, role, array, row):
    folder = tmp_path / "db"
    folder.mkdir()
    src = {"learn": np.load(FIXTURES / "ivf_xt.npy")[:1000]}
    for r in ("learn", "base", "query"):
        data = array if r == role else None
        if data is None:
            data = src.get(r)
        if data is None:
            continue
        np.save(folder / f"{r}.npy", with_bad(data, row) if r == role else data)
    return folder


def test_index_cli_refuses_non_finite_vectors(ivf_folder, tmp_path):
    main, common, tmp, xb, xq = ivf_folder
    out = tmp_path / "out"
    out.mkdir()
    # index training
    folder = _bad_folder(tmp_path, "learn", np.load(FIXTURES / "ivf_xt.npy")[:1000], 77)
    np.save(folder / "base.npy", xb)
    np.save(folder / "query.npy", xq)
    with pytest.raises(VectorInputError, match=r"training vectors of .*learn\.npy: row 77 "):
        main(["--db", str(folder)] + common + ["--todo", "train", "--nt", "1000", "--index_key", "IVF64,RQ4x8_Nqint8",
                                               "--trained_index", str(out / "trained.faissindex")])
    with pytest.raises(VectorInputError, match=r"learn\.npy: row 77 "):  # k-means of the centroids
        main(["--db", str(folder), "--todo", "train_centroids", "--n_centroids", "8", "--nt", "1000",
              "--IVF_centroids", str(out / "centroids.npy")])
    # adding the database
    np.save(folder / "learn.npy", np.load(FIXTURES / "ivf_xt.npy")[:1000])
    np.save(folder / "base.npy", with_bad(xb, 333))
    with pytest.raises(VectorInputError, match=r"database vectors of .*base\.npy: row 333 "):
        main(["--db", str(folder)] + common + ["--todo", "add", "--add_bs", "100", "--trained_index",
                                               str(tmp / "trained.faissindex"),
                                               "--index", str(out / "full.faissindex")])
    # queries
    np.save(folder / "base.npy", xb)
    np.save(folder / "query.npy", with_bad(xq, 11))
    with pytest.raises(VectorInputError, match=r"queries of .*query\.npy: row 11 "):
        main(["--db", str(folder)] + common + ["--todo", "search", "--index", str(tmp / "full.faissindex"),
                                               "--json", str(out / "results.json")])
    only_inputs_left(out, set())


def test_index_library_refuses_non_finite_vectors(ivf_folder):
    _, _, tmp, xb, xq = ivf_folder
    model = load_model(IVF64)
    with pytest.raises(VectorInputError, match="index training vectors: row 3 "):
        ivf.train_index(model, with_bad(xb, 3), "IVF64,RQ4x8_Nqint8", log=lambda m: None)
    index = ivf.read_index(tmp / "trained.faissindex")
    with pytest.raises(VectorInputError, match="database vectors: row 18 holds"):  # numbered in the database
        ivf.add_vectors(index, model, [xb[:10], with_bad(xb[10:20], 8)], log=lambda m: None)
    assert index.ntotal == 10  # the first batch went in; the bad one did not
    full = ivf.read_index(tmp / "full.faissindex")
    with pytest.raises(VectorInputError, match="queries: row 2 "):
        sweep.explore(full, model, with_bad(xq, 2), np.zeros((len(xq), 1), np.int64), nprobe=[4], nshort=[10])


def test_qinco_index_refuses_non_finite_vectors(ivf_folder, tmp_path):
    _, _, tmp, xb, xq = ivf_folder
    model = load_model(IVF64)
    xt = np.load(FIXTURES / "ivf_xt.npy")[:1000]
    with pytest.raises(VectorInputError, match="index training vectors: row 4 "):
        QincoIndex.build(model, with_bad(xt, 4), "IVF64,RQ4x8_Nqint8")
    index = QincoIndex.read(tmp / "trained.faissindex", model)
    np.save(tmp_path / "base.npy", with_bad(xb, 150))
    base = np.load(tmp_path / "base.npy", mmap_mode="r")  # streamed: the file and the row are named
    with pytest.raises(VectorInputError, match=r"database vectors of .*base\.npy: row 150 "):
        index.add(base, batch_size=100)
    assert index.ntotal == 100  # the first batch went in; nothing of the bad one did
    full = QincoIndex.read(tmp / "full.faissindex", model, nshort=10)
    with pytest.raises(VectorInputError, match="queries: row 5 "):
        full.search(with_bad(xq, 5), 5)
    with pytest.raises(VectorInputError, match="queries: elements of dtype complex64"):
        full.search(xq.astype(np.complex64), 5)


def test_two_stage_search_refuses_non_finite_queries(xt):
    model = load_model(QINCO)
    codes = codec.encode(model, xt[:20])
    with pytest.raises(VectorInputError, match="queries: row 1 "):
        two_stage.two_stage_search(model, with_bad(xt[:4], 1), np.zeros((4, 1), np.int64), codes,
                                   codec.decode(model, codes), [10], log=lambda m: None)


def test_recipe_and_pq_training_refuse_bad_vectors(xt):
    spec = recipe.ModelSpec(M=2, K=16, L=1, h=16)
    cfg = training.TrainConfig(max_epochs=1, batch_size=64, ngpu=1, progress=False)
    with pytest.raises(VectorInputError, match="training vectors: row 9 "):
        recipe.train_model(with_bad(xt[:256], 9), xt[256:320], spec, cfg)
    with pytest.raises(VectorInputError, match="validation vectors: elements of dtype complex64"):
        recipe.train_model(xt[:256], xt[256:320].astype(np.complex64), spec, cfg)
    with pytest.raises(VectorInputError, match="IVF centroids: row 2 "):
        recipe.check_ivf_centroids(recipe.ModelSpec(variant="ivf"), with_bad(xt[:8], 2, np.inf), xt.shape[1])
    with pytest.raises(VectorInputError, match="training vectors: row 13 "):
        pq.train_pq(with_bad(xt[:256], 13), xt[256:320], pq.PQSpec(nsub=2, sub=spec), cfg)


def test_qinco2_entry_points_refuse_non_finite_vectors(xt):
    model = load_model(FIXTURES / "qinco2" / "qinco2_d32_M4_K256_L2_de48_dh64_A8_B8.pt")
    with pytest.raises(VectorInputError, match="row 6 holds a non-finite value"):
        codec.encode(model, with_bad(xt[:40], 6, np.inf))
    with pytest.raises(VectorInputError, match="training vectors: row 11 "):
        qinco2_recipe.train_rq_init(with_bad(xt[:300], 11), 2, 16)
    with pytest.raises(VectorInputError, match="validation vectors: row 2 "):
        qinco2_recipe.train_rq_init(xt[:300], 2, 16, xval=with_bad(xt[300:340], 2))
    with pytest.raises(VectorInputError, match="pairwise decoder training vectors: row 3 "):
        pairwise.train_pairwise_decoder(with_bad(xt[:50], 3), np.zeros((50, 3), np.int32),
                                        np.zeros((4, xt.shape[1]), np.float32), 16, progress=False)


def test_faiss_baselines_refuse_non_finite_vectors(xt):
    centroids = xt[:8]
    with pytest.raises(VectorInputError, match="training vectors: row 21 "):
        baselines.build_ivf_pq(with_bad(xt[:300], 21), centroids, M=4, nbits=4)
    index = baselines.build_ivf_rq(xt[:300], centroids, M=2, nbits=4)
    with pytest.raises(VectorInputError, match="database vectors: row 130 "):  # numbered in the database
        baselines.add_database(index, with_bad(xt[:200], 130), batch_size=64, progress=False)


# --------------------------------------------------------------------------------------
# 2. Unsupported dtypes
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128, bool, object, "U4"])
def test_unsupported_dtypes_are_refused(dtype):
    model = load_model(QINCO)
    x = np.ones((10, model.d), dtype=dtype)
    with pytest.raises(VectorInputError, match=f"dtype {np.dtype(dtype)}"):
        codec.encode(model, x)
    with pytest.raises(VectorInputError, match=f"dtype {np.dtype(dtype)}"):
        validation.as_finite_float32(x, "training vectors")


def test_complex_vector_file_is_refused(tmp_path):
    x = np.ones((10, 32), np.complex64) * (1 + 2j)
    np.save(tmp_path / "x.npy", x)
    with pytest.raises(ValueError, match=r"x\.npy: holds elements of dtype complex64"):
        vecs_io.read_vectors(tmp_path / "x.npy")
    with pytest.raises(ValueError, match="complex64"):
        codec_cli.main(["--model", str(QINCO), "--encode", "--i", str(tmp_path / "x.npy"), "--o", str(tmp_path / "c.npy")])
    only_inputs_left(tmp_path, {"x.npy"})


def test_integer_inputs_keep_working(xt):
    model = load_model(QINCO)
    x8 = np.clip(xt[:64], 0, 255).astype(np.uint8)
    ref = codec.encode(model, x8.astype(np.float32))
    for dt in (np.uint8, np.int32, np.int64, np.float16, np.float64):
        np.testing.assert_array_equal(codec.encode(model, x8.astype(dt)), ref)


# --------------------------------------------------------------------------------------
# 3. Vector file headers
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".fvecs", ".ivecs", ".bvecs"])
@pytest.mark.parametrize("mmap", [True, False])
def test_bad_row_header_names_file_and_row(tmp_path, ext, mmap):
    path = tmp_path / f"x{ext}"
    vecs_io.write_vectors(path, np.arange(50 * 32).reshape(50, 32) % 200)
    row_bytes = 4 + 32 * vecs_io.VECS_DTYPES[ext].itemsize
    raw = bytearray(path.read_bytes())
    raw[37 * row_bytes:37 * row_bytes + 4] = np.int32(31).tobytes()  # one row says 31, the rest 32
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=rf"x\{ext}: row 37 says dimension 31, the first row says 32"):
        vecs_io.read_vectors(path, mmap=mmap)


def test_row_headers_checked_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(vecs_io, "_HEADER_CHUNK_BYTES", 7 * 20)  # 7 rows of 4 floats
    path = tmp_path / "x.fvecs"
    vecs_io.write_vectors(path, np.ones((50, 4), np.float32))
    np.testing.assert_array_equal(vecs_io.read_vectors(path), np.ones((50, 4)))
    raw = bytearray(path.read_bytes())
    raw[49 * 20:49 * 20 + 4] = np.int32(5).tobytes()
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="row 49 says dimension 5"):
        vecs_io.read_vectors(path)


@pytest.mark.parametrize("ext", [".fbin", ".u8bin", ".ibin"])
def test_bin_header_checked_against_file_size(tmp_path, ext):
    path = tmp_path / f"x{ext}"
    vecs_io.write_vectors(path, np.ones((20, 8), np.uint8))
    raw = bytearray(path.read_bytes())
    raw[:4] = np.int32(21).tobytes()
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=rf"x\{ext}: truncated .*header says 21 x 8"):
        vecs_io.read_vectors(path)


# --------------------------------------------------------------------------------------
# 4. faiss failures
# --------------------------------------------------------------------------------------


def test_faiss_failure_is_wrapped():
    x = np.random.default_rng(0).random((10, 8), dtype=np.float32)
    with pytest.raises(FaissStepError) as e:
        with validation.faiss_step("k-means of the IVF centroids", on="10 x 8 training vectors"):
            faiss.Kmeans(8, 64, niter=2).train(x)
    msg = str(e.value)
    assert msg.startswith("k-means of the IVF centroids on 10 x 8 training vectors failed in faiss:")
    assert "Number of training points (10) should be at least as large as number of clusters (64)" in msg
    assert ".cpp" not in msg and "Error in" not in msg and "\n" not in msg


def test_faiss_step_lets_other_errors_through():
    with pytest.raises(KeyError):
        with validation.faiss_step("RQ training"):
            raise KeyError("not a faiss failure")


# --------------------------------------------------------------------------------------
# 6. Memory bound
# --------------------------------------------------------------------------------------


def test_encoding_a_memory_map_keeps_resident_memory_bounded(tmp_path):
    """Encoding a 64 MiB uint8 memory map (256 MiB as float32) in batches of 2048 rows
    (1 MiB as float32): the resident pages of the map stay a few batches, and the peak
    resident memory grows by far less than the file (a float32 copy would add 256 MiB,
    a map left resident 64 MiB)."""
    out = tmp_path / "mem.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "bench_memory.py"), "--size_mb", "64", "--d", "128",
                    "--batch_size", "2048", "--tmpdir", str(tmp_path), "--json", str(out)],
                   check=True, capture_output=True, timeout=300)
    res = json.loads(out.read_text())
    assert res["file_bytes"] > 64 * 2**20 - 1024 and res["n"] > 200 * res["batch_size"]
    assert res["peak_file_increase_bytes"] < 16 * 2**20, res  # the header check reads 8 MiB at a time
    assert res["peak_increase_bytes"] < res["file_bytes"] * 3 / 4, res  # heap noise of some 30 MiB included
