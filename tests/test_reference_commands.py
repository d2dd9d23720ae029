"""Every usage example of the QINCo2 README ("Training", "Evaluating a model", "Using
QINCo2 with IVF"), typed as written but for file names and size keys (ds.loop,
ds.valset, ds.db, ds.trainset, epochs, M, K, ivf_K, small L / dh / de / A / B), on tiny
data, through run.py's main; each test checks what the command wrote.

The data: a folder in QINCO_DATA laid out as the reference's deep1b/ (so db=deep1M and
db=deep1B name it) and the same vectors as the README's "my_dataset" files: 3,000
training vectors (d=32), a 1,000-vector database, 50 queries and their exact ground
truth. Models are tiny (M=2, L=1, dh=32) and train for a few epochs of 600 samples.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest

from qinco_jax.cli import run as run_cli
from qinco_jax.cli.run_config import RunConfigError
from qinco_jax.data.groundtruth import exact_groundtruth
from qinco_jax.formats import checkpoint, code_parts, torch_pickle, vecs_io
from qinco_jax.formats.qinco2_file import CHECKPOINT_KEYS
from qinco_jax.search import report

FIX = Path(__file__).resolve().parent / "fixtures"
# The README's size keys, shrunk: a few epochs of 600 samples, 200 validation vectors.
SMALL_TRAINING = "ds.loop=600 ds.valset=200 epochs=1 M=2 L=1 dh=32 de=32 A=4 B=4"


def run(line: str):
    """A README command line, its `./run.sh` / `python run.py` prefix dropped."""
    words = shlex.split(line)
    while words and not ("=" in words[0]):
        words.pop(0)
    return run_cli.main(words)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference_commands")
    x = np.load(FIX / "ivf_xt.npy")
    xt, xb, xq = x[:3000], np.load(FIX / "ivf_xb.npy")[:1000], np.load(FIX / "ivf_xq.npy")[:50]
    gt = exact_groundtruth(xq, xb, 100).astype(np.int32)
    deep = root / "data" / "deep1b"
    deep.mkdir(parents=True)
    vecs_io.write_vectors(deep / "learn.fvecs", xt)
    vecs_io.write_vectors(deep / "base.fvecs", xb)
    vecs_io.write_vectors(deep / "deep1B_queries.fvecs", xq)
    for name in ("deep1M", "deep1B"):
        vecs_io.write_vectors(deep / f"{name}_groundtruth.ivecs", gt)
    vecs_io.write_vectors(root / "my_dataset-trainset.fvecs", xt)
    vecs_io.write_vectors(root / "my_dataset-db.fvecs", xb)
    vecs_io.write_vectors(root / "my_queries.fvecs", xq)
    vecs_io.write_vectors(root / "my_groundtruth.ivecs", gt)
    (root / "runs").mkdir()
    return root


@pytest.fixture
def at(files, monkeypatch):
    """Run in the data folder, with QINCO_DATA pointing at its data/."""
    monkeypatch.chdir(files)
    monkeypatch.setenv("QINCO_DATA", str(files / "data"))
    return files


def _assert_reference_model_file(path: Path, **config) -> None:
    """A .pt the reference loads (its checkpoint keys) holding a model of `config`."""
    root = torch_pickle.load_pt(path)
    assert set(CHECKPOINT_KEYS) <= set(root), sorted(root)
    assert root["data_dim"] == 32
    model = checkpoint.load_model(path)
    for key, value in config.items():
        assert getattr(model.config, key) == value, key


@pytest.fixture(scope="module")
def small_model(files):
    """README: train a very small model on a custom dataset (the next test's command)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(files)
        run("./run.sh task=train model_args=qinco2-S L=1 dh=32 de=64 A=4 B=4 "
            "output=my_super_small_model-my_dataset-8x8.pt trainset=my_dataset-trainset.fvecs "
            "ds.loop=600 ds.valset=200 M=2 epochs=1")
    return files / "my_super_small_model-my_dataset-8x8.pt"


@pytest.fixture(scope="module")
def ivf(files):
    """README: IVF centroids, an IVF-qinco2-S model trained with them, the training set
    and database encoded: what the pairwise decoder, index and search commands read."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(files)
        mp.setenv("QINCO_DATA", str(files / "data"))
        run("python run.py task=ivf_centroids ivf_K=16 db=deep1M output=runs/ivf_centroids-deep1M-16.npy ds.valset=200")
        run(f"./run.sh task=train model_args=qinco2-S db=deep1M output=runs/IVF-qinco2_S-deep1M-8x8.pt "
            f"ivf_centroids=runs/ivf_centroids-deep1M-16.npy {SMALL_TRAINING}")
        run("./run.sh task=encode db=deep1B model=runs/IVF-qinco2_S-deep1M-8x8.pt "
            "output=runs/IVF-qinco2_S-deep1B-8x8_db.npz")
        run("./run.sh task=encode db=deep1B encode_trainset=true model=runs/IVF-qinco2_S-deep1M-8x8.pt "
            "output=runs/IVF-qinco2_S-deep1B-8x8_trainset.npz ds.valset=200")
    return files / "runs"


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def test_readme_train_qinco2_S_on_deep1M_with_resume(at):
    # ./run.sh task=train model_args=qinco2-S db=deep1M M=16 output=runs/weights/qinco2_S-deep1M-16x8.pt resume=true
    line = ("./run.sh task=train model_args=qinco2-S db=deep1M M=2 output=runs/qinco2_S-deep1M-2x8.pt resume=true "
            "ds.loop=600 ds.valset=200 epochs=1 L=1 dh=32 de=32 A=4 B=4")
    result = run(line)
    _assert_reference_model_file(at / "runs/qinco2_S-deep1M-2x8.pt", M=2, K=256, L=1, h=32, A=4, B=4)
    history = json.loads((at / "runs/qinco2_S-deep1M-2x8.pt.history.json").read_text())
    assert history["epochs"] and all(np.isfinite(e["val_mse"]) for e in history["epochs"])
    assert result.history["epochs"] == history["epochs"]


def test_readme_train_a_very_small_model_on_a_custom_dataset(small_model):
    _assert_reference_model_file(small_model, M=2, K=256, L=1, h=32, de=64, A=4, B=4)


def test_readme_resume_training_from_a_previous_model(at, small_model):
    # python run.py cpu=true task=train model=runs/weights/qinco2_S-deep1M-8x8.pt
    #     output=runs/weights/qinco2_S-deep1M-8x8-2.pt db=deep1M verbose=false
    before = checkpoint.load_model(small_model)
    run(f"python run.py cpu=true task=train model={small_model.name} output=runs/small-2.pt db=deep1M "
        "verbose=false ds.loop=600 ds.valset=200 epochs=1")
    after = checkpoint.load_model(at / "runs/small-2.pt")
    assert after.config == before.config  # the model's arguments come from the file
    a, b = before.params["steps"]["codebook"], after.params["steps"]["codebook"]
    assert not np.allclose(np.asarray(a), np.asarray(b))  # and it trained further


def test_readme_train_qinco1_preset_is_refused_with_the_reason(at):
    # ./run.sh task=train model_args=qinco1 db=deep1M output=runs/weights/qinco1-deep1M-8x8.pt
    # Not implemented yet: QINCo2's loop has no Adam / reduce-on-plateau option.
    with pytest.raises(RunConfigError, match="optimizer=adam scheduler.name=reduce_lr_plateau"):
        run("./run.sh task=train model_args=qinco1 db=deep1M output=runs/qinco1-deep1M-8x8.pt M=2 L=1 dh=32")
    assert not (at / "runs/qinco1-deep1M-8x8.pt").exists()


# --------------------------------------------------------------------------------------
# Evaluating a model
# --------------------------------------------------------------------------------------


def test_readme_eval_named_db_with_a_larger_beam(at, small_model):
    # ./run.sh task=eval model=models/qinco2_L-bigann1M-8x8.pt db=bigann1M A=32 B=64
    out = run(f"./run.sh task=eval model={small_model.name} db=deep1M A=8 B=8")
    default = run(f"./run.sh task=eval model={small_model.name} db=deep1M")
    assert (out["A"], out["B"], out["n"]) == (8, 8, 1000) and (default["A"], default["B"]) == (4, 4)
    assert 0 < out["mse"] <= default["mse"] * 1.001  # a larger beam does not encode worse


def test_readme_eval_custom_model_on_a_custom_dataset_limit(at, small_model):
    # ./run.sh task=eval model=my_super_small_model-my_dataset-8x8.pt db=my_dataset-db.fvecs ds.db=100_000
    out = run(f"./run.sh task=eval model={small_model.name} db=my_dataset-db.fvecs ds.db=500")
    assert out["n"] == 500 and np.isfinite(out["mse"]) and out["mse"] > 0


def test_readme_search_without_an_index_gives_table3_recalls(at, small_model):
    # python run.py task=search model=models/qinco2_L-bigann1M-8x8.pt db=bigann1M A=32 B=64
    out = run(f"python run.py task=search model={small_model.name} db=deep1M A=8 B=8")
    assert set(out["recalls"]) == {"1", "10", "100"} and out["nb"] == 1000 and out["nq"] == 50
    r = out["recalls"]
    assert 0 < r["1"] <= r["10"] <= r["100"] <= 1
    files = run(f"python run.py task=search model={small_model.name} db=my_dataset-db.fvecs A=8 B=8 "
                "queries=my_queries.fvecs queries_gt=my_groundtruth.ivecs")
    assert files["recalls"] == out["recalls"]  # the same data named by files


def test_readme_eval_valset(at, small_model):
    # ./run.sh task=eval_valset model=<model_path.pt> [db=<db_name>] [trainset=<trainset_path>] [ds.valset=<>]
    mse = run(f"./run.sh task=eval_valset model={small_model.name} trainset=my_dataset-trainset.fvecs ds.valset=200")
    history = json.loads(Path(str(small_model) + ".history.json").read_text())
    assert mse == pytest.approx(min(e["val_mse"] for e in history["epochs"]), rel=1e-3)


# --------------------------------------------------------------------------------------
# Using QINCo2 with IVF
# --------------------------------------------------------------------------------------


def test_readme_ivf_centroids_on_a_custom_dataset(at):
    # python run.py task=ivf_centroids ivf_K=700 trainset=my_dataset-trainset.fvecs
    #     output=runs/ivf_centroids/ivf_centroids-my_dataset-K=700.npy
    run("python run.py task=ivf_centroids ivf_K=20 trainset=my_dataset-trainset.fvecs "
        "output=runs/ivf_centroids-my_dataset-K=20.npy ds.valset=200")
    c = np.load(at / "runs/ivf_centroids-my_dataset-K=20.npy")
    assert c.shape == (20, 32) and c.dtype == np.float32 and np.isfinite(c).all()


def test_readme_ivf_steps(ivf):
    # python run.py task=ivf_centroids ivf_K=1048576 db=deep1M output=...npy
    assert np.load(ivf / "ivf_centroids-deep1M-16.npy").shape == (16, 32)
    # ./run.sh task=train model_args=qinco2-S db=deep1M output=... ivf_centroids=...npy (the file sets ivf_K)
    _assert_reference_model_file(ivf / "IVF-qinco2_S-deep1M-8x8.pt", M=2, K=256, K_IVF=16)
    # ./run.sh task=encode db=deep1B model=... output=..._db.npz
    header = code_parts.read_code_header(ivf / "IVF-qinco2_S-deep1B-8x8_db.npz")
    assert (header.K, header.M, header.D, header.n_parts) == (256, 2, 32, 1)
    db_codes = code_parts.read_codes(ivf / "IVF-qinco2_S-deep1B-8x8_db.npz")
    assert db_codes.shape == (1000, 3) and db_codes[:, 0].max() < 16
    # ./run.sh task=encode db=deep1B encode_trainset=true model=... output=..._trainset.npz
    assert code_parts.read_codes(ivf / "IVF-qinco2_S-deep1B-8x8_trainset.npz").shape == (3000, 3)


def test_readme_encode_a_custom_dataset(at, ivf):
    # ./run.sh task=encode db=my_dataset-trainset.fvecs model=my-custom-IVF-model.pt output=my_encoded_trainset.npz
    # ./run.sh task=encode db=my_dataset-db.fvecs model=my-custom-IVF-model.pt output=my_encoded_db.npz
    run("./run.sh task=encode db=my_dataset-db.fvecs model=runs/IVF-qinco2_S-deep1M-8x8.pt output=my_encoded_db.npz")
    np.testing.assert_array_equal(code_parts.read_codes(at / "my_encoded_db.npz"),
                                  code_parts.read_codes(ivf / "IVF-qinco2_S-deep1B-8x8_db.npz"))
    run("./run.sh task=encode db=my_dataset-trainset.fvecs model=runs/IVF-qinco2_S-deep1M-8x8.pt "
        "output=my_encoded_trainset.npz")
    assert code_parts.read_codes(at / "my_encoded_trainset.npz").shape == (3000, 3)


def test_readme_pairwise_decoder_index_and_search_with_resume(at, ivf):
    # python run.py task=train_pairwise_decoder db=deep1B ivf_centroids=...npy output=..._pairwise_decoder.pt
    #     encoded_trainset=..._trainset.npz           (K and M from the codes' header)
    run("python run.py task=train_pairwise_decoder db=deep1B ivf_centroids=runs/ivf_centroids-deep1M-16.npy "
        "output=runs/pairwise_decoder.pt encoded_trainset=runs/IVF-qinco2_S-deep1B-8x8_trainset.npz ds.valset=200")
    assert torch_pickle.load_pt(at / "runs/pairwise_decoder.pt")
    # python run.py task=build_index db=deep1B ivf_centroids=...npy output=...faissindex
    #     encoded_trainset=..._trainset.npz encoded_db=..._db.npz ds.db=300_000 ds.trainset=100_000 ds.valset=10_000
    index = run("python run.py task=build_index db=deep1B ivf_centroids=runs/ivf_centroids-deep1M-16.npy "
                "output=runs/index.faissindex encoded_trainset=runs/IVF-qinco2_S-deep1B-8x8_trainset.npz "
                "encoded_db=runs/IVF-qinco2_S-deep1B-8x8_db.npz ds.db=800 ds.trainset=2000 ds.valset=200")
    import faiss

    written = faiss.read_index(str(at / "runs/index.faissindex"))
    assert written.ntotal == index.ntotal == 800 and written.nlist == 16
    # python run.py cpu=true task=search db=deep1B model=... index=...faissindex
    #     output=runs/logs/search_results-...json resume=true pairwise_decoder=..._pairwise_decoder.pt
    search = ("python run.py cpu=true task=search db=deep1B model=runs/IVF-qinco2_S-deep1M-8x8.pt "
              "index=runs/index.faissindex output=runs/search_results.json resume=true "
              "pairwise_decoder=runs/pairwise_decoder.pt ds.db=800")
    results = run(search)
    saved = json.loads((at / "runs/search_results.json").read_text())
    assert [r["parameters"] for r in saved["results"]] == [r["parameters"] for r in results] and results
    assert all(set(r["parameters"]) == {"nprobe", "quantizer_efSearch", "nshort", "nmid_short"} for r in results)
    assert all(0 <= r["recalls"]["1"] <= r["recalls"]["100"] <= 1 for r in results)
    again = run(search)  # resume=true: nothing searched twice
    assert [r["parameters"] for r in again] == [r["parameters"] for r in results]
    assert [r["t_search"] for r in again] == [r["t_search"] for r in results]


def test_search_resumes_from_a_log_the_reference_wrote(at, ivf, tmp_path):
    """A half-finished sweep of the reference ({"ivf_real_res": [...]}, its timers and
    its nmid_short=0 for "no pairwise stage"): its points are kept, not searched again."""
    run("python run.py task=build_index db=deep1B ivf_centroids=runs/ivf_centroids-deep1M-16.npy "
        f"output={tmp_path / 'i.faissindex'} encoded_trainset=runs/IVF-qinco2_S-deep1B-8x8_trainset.npz "
        "encoded_db=runs/IVF-qinco2_S-deep1B-8x8_db.npz ds.valset=200")
    theirs = {"parameters": {"nprobe": 4, "quantizer_efSearch": 4, "nshort": 4, "nmid_short": 0}, "cno": 0,
              "t_search": 0.5, "t_mid_rerank": 0.0, "t_decode": 0.25, "t_rerank": 0.125, "t_total": 0.875,
              "recalls": {"1": 0.25, "10": 0.5, "100": 0.5}, "recalls_orig": {"1": 0.125, "10": 0.5, "100": 0.5},
              "key": [0, 0, 0, 0]}
    log = tmp_path / "reference_log.json"
    log.write_text(json.dumps({"ivf_real_res": [theirs]}))
    results = run(f"python run.py cpu=true task=search db=deep1B model=runs/IVF-qinco2_S-deep1M-8x8.pt "
                  f"index={tmp_path / 'i.faissindex'} output={log} resume=true")
    assert [r["parameters"] for r in results] == [{"nprobe": 4, "quantizer_efSearch": 4, "nshort": 4},
                                                  {"nprobe": 4, "quantizer_efSearch": 4, "nshort": 10}]
    first = results[0]
    assert (first["t_search"], first["t_decode"], first["t_dis"], first["recalls"]["1"]) == (0.5, 0.25, 0.125, 0.25)
    assert report.load_results(log)[0]["recalls"] == theirs["recalls"]  # rewritten in our schema, kept
    assert "results" in json.loads(log.read_text())


# --------------------------------------------------------------------------------------
# Bad input: a clear error naming the key or file, before any work
# --------------------------------------------------------------------------------------


def test_train_from_a_model_refuses_contradicting_keys_and_other_files(at, small_model):
    with pytest.raises(RunConfigError, match=r"M=4 given, but model=.* has M=2"):
        run(f"python run.py task=train model={small_model.name} output=runs/x.pt db=deep1M M=4")
    (at / "not_a_model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RunConfigError, match="model=not_a_model.pt is not a QINCo2 checkpoint"):
        run("python run.py task=train model=not_a_model.pt output=runs/x.pt db=deep1M")
    v1 = FIX / "qinco_d32_M4_K16_L2_h32.pt"
    with pytest.raises(RunConfigError, match="not a QINCo2 model"):
        run(f"python run.py task=train model={v1} output=runs/x.pt db=deep1M")
    with pytest.raises(RunConfigError, match="grad_accumulate must be >= 1, got 0"):
        run(f"python run.py task=train model={small_model.name} output=runs/x.pt db=deep1M grad_accumulate=0")
    assert not (at / "runs/x.pt").exists()
