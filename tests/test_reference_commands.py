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

import dataclasses
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


def test_continue_training_a_model_file_the_reference_wrote(at, capsys):
    from qinco_jax.training.qinco2_recipe import CosineSchedule

    ref_model = FIX / "qinco2" / "qinco2_d32_M4_K256_L2_de48_dh64_A8_B8.pt"
    epoch = torch_pickle.load_pt(ref_model)["epoch"]  # epochs it completed: the next one's index
    assert epoch == 13
    # the schedule continues at epoch 13: a cosine over epochs=14 (stop_patience=0) has 2 epochs left
    result = run(f"python run.py cpu=true task=train model={ref_model} output=runs/from_reference.pt "
                 "trainset=my_dataset-trainset.fvecs verbose=false ds.loop=600 ds.valset=200 epochs=14 "
                 "scheduler.stop_patience=0")
    before, after = checkpoint.load_model(ref_model), checkpoint.load_model(at / "runs/from_reference.pt")
    assert after.config == before.config
    _assert_reference_model_file(at / "runs/from_reference.pt", M=4, K=256, L=2, h=64, de=48, A=8, B=8)
    assert "stopped after epoch 12: training continues at epoch 13" in capsys.readouterr().out
    records = result.history["epochs"]
    assert [e["epoch"] for e in records] == [13, 14]
    schedule = CosineSchedule(8e-4, 3, 14, 1e-3)  # qinco2's lr and ramp, epochs=14
    assert records[0]["lr"] == pytest.approx(schedule.batch_lr(13, 0, 1))  # one batch of 600 rows per epoch
    # with epochs=1 its schedule is over: an error naming the key, before any work
    with pytest.raises(RunConfigError, match="stopped after epoch 12: its schedule .* is over.*epochs="):
        run(f"python run.py cpu=true task=train model={ref_model} output=runs/over.pt "
            "trainset=my_dataset-trainset.fvecs ds.loop=600 ds.valset=200 epochs=1")
    assert not (at / "runs/over.pt").exists()


def test_readme_train_qinco1_preset_adam_reduce_on_plateau_then_eval(at, monkeypatch):
    # ./run.sh task=train model_args=qinco1 db=deep1M output=runs/weights/qinco1-deep1M-8x8.pt
    from qinco_jax.cli import qinco2_train

    # reduce-on-plateau has no epoch limit (stop_patience ends it, as in the reference): cap it here
    capped = qinco2_train.train_config
    monkeypatch.setattr(qinco2_train, "train_config",
                        lambda cfg, n=1: dataclasses.replace(capped(cfg, n), max_epochs=2))
    run("./run.sh task=train model_args=qinco1 db=deep1M output=runs/qinco1-deep1M-8x8.pt M=2 L=1 dh=32 "
        "ds.valset=200")
    path = at / "runs/qinco1-deep1M-8x8.pt"
    _assert_reference_model_file(path, M=2, K=256, L=1, h=32, qinco1_mode=True)
    history = json.loads((at / "runs/qinco1-deep1M-8x8.pt.history.json").read_text())
    train = history["run"]["train"]
    assert (train["optimizer"], train["scheduler"], train["epoch_size"]) == ("adam", "reduce_lr_plateau", None)
    assert [e["lr"] for e in history["epochs"]] == [1e-4, 1e-4]  # the plateau rate: no cosine ramp
    assert min(e["val_mse"] for e in history["epochs"]) < history["before"]
    mse = run(f"./run.sh task=eval_valset model={path} db=deep1M ds.valset=200")
    assert mse == pytest.approx(min(e["val_mse"] for e in history["epochs"]), rel=1e-3)
    out = run(f"./run.sh task=eval model={path} db=deep1M")
    assert out["n"] == 1000 and np.isfinite(out["mse"]) and out["mse"] > 0


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


def test_eval_time_reports_microseconds_per_vector(at, small_model, capsys):
    # ./run.sh task=eval_time model=... db=...: eval, plus encoding / decoding time per vector
    out = run(f"./run.sh task=eval_time model={small_model.name} db=my_dataset-db.fvecs ds.db=300")
    assert out["n"] == 300 and out["t_encode"] > 0 and out["t_decode"] > 0
    printed = capsys.readouterr().out
    per_vector = float(printed.split("Encoding time / vector: ")[1].split("\u03bcs")[0])
    assert per_vector == pytest.approx(out["t_encode"] / 300 * 1e6, rel=0.06)


def test_readme_search_without_an_index_gives_table3_recalls(at, small_model):
    # python run.py task=search model=models/qinco2_L-bigann1M-8x8.pt db=bigann1M A=32 B=64
    out = run(f"python run.py task=search model={small_model.name} db=deep1M A=8 B=8")
    assert set(out["recalls"]) == {"1", "10", "100"} and out["nb"] == 1000 and out["nq"] == 50
    r = out["recalls"]
    assert 0 < r["1"] <= r["10"] <= r["100"] <= 1
    from qinco_jax.config import EncodeOptions
    from qinco_jax.metrics import one_recall_at
    from qinco_jax.models import codec

    model = checkpoint.load_model(small_model)
    xb = vecs_io.read_vectors(at / "my_dataset-db.fvecs")
    decoded = codec.decode(model, codec.encode(model, xb, EncodeOptions(beam=8, preselect=8)))
    ids = exact_groundtruth(vecs_io.read_vectors(at / "my_queries.fvecs"), decoded, 100)
    assert r == one_recall_at(ids, vecs_io.read_vectors(at / "my_groundtruth.ivecs"))
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
              "pairwise_decoder=runs/pairwise_decoder.pt")
    results = run(search)
    saved = json.loads((at / "runs/search_results.json").read_text())
    # the file holds every searched point; the sweep returns them less the three-stage
    # points a two-stage one beats (sweep.middle_stage_pays), and a resume drops the same
    from qinco_jax.search.sweep import middle_stage_pays

    kept, _ = middle_stage_pays(saved["results"])
    assert [r["parameters"] for r in kept] == [r["parameters"] for r in results] and results
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


# --------------------------------------------------------------------------------------
# QINCo v1's docs (qinco_v1/docs/*.md): the same scripts, shrunk with their size flags
# (--nt, --nval, --M, --L, --h, --K, --max_epochs, --n_centroids, --nprobe, --nshort) and
# a data folder (base / learn / query / gt files) for the named data sets.
# --------------------------------------------------------------------------------------

V1_SCRIPTS = {"train_qinco.py": "qinco_jax.cli.train", "search_ivf.py": "qinco_jax.cli.index",
              "pq_qinco.py": "qinco_jax.cli.train_pq", "search_2stage.py": "qinco_jax.cli.search_2stage",
              "codec_qinco.py": "qinco_jax.cli.codec", "eval_qinco.py": "qinco_jax.cli.evaluate"}
V1_SMALL = "--M 2 --L 1 --h 32 --K 16 --max_epochs 2"
V1_MODEL = FIX / "qinco_d32_M4_K16_L2_h32.pt"  # a v1 model of the reference (d=32)


def run_v1(line: str):
    """A v1 doc command line (`python -u <script>.py flags...`) through its program's main."""
    import importlib

    words = shlex.split(line)
    script = next(w for w in words if w.endswith(".py"))
    argv = words[words.index(script) + 1:]
    return importlib.import_module(V1_SCRIPTS[script]).main(argv)


@pytest.fixture(scope="module")
def v1_files(files):
    """mydata/: 3,000 training vectors, a 2,000-vector database, 50 queries, exact ground truth."""
    x = np.load(FIX / "ivf_xt.npy")
    xb, xq = np.load(FIX / "ivf_xb.npy")[:2000], np.load(FIX / "ivf_xq.npy")[:50]
    folder = files / "mydata"
    folder.mkdir()
    vecs_io.write_vectors(folder / "learn.fvecs", x[:3000])
    vecs_io.write_vectors(folder / "base.fvecs", xb)
    vecs_io.write_vectors(folder / "query.fvecs", xq)
    vecs_io.write_vectors(folder / "gt.ivecs", exact_groundtruth(xq, xb, 100).astype(np.int32))
    for sub in ("models", "index", "tmp"):
        (files / sub).mkdir(exist_ok=True)
    return files


@pytest.fixture
def v1(v1_files, monkeypatch):
    monkeypatch.chdir(v1_files)
    return v1_files


def test_v1_training_a_small_model_on_cpu(v1):
    # python -u train_qinco.py --db bigann1M --nt 100_000 --M 8 --L 2 --h 256 --lr 0.001 --ngpu 0
    #     --model models/bigann_T100k_8x8_L2.pt
    run_v1(f"python -u train_qinco.py --db mydata --nt 2_000 --nval 200 {V1_SMALL} --lr 0.001 --ngpu 0 "
           "--model models/mydata_T2k_2x4_L1.pt")
    model = checkpoint.load_model(v1 / "models/mydata_T2k_2x4_L1.pt")
    assert (model.config.M, model.config.K, model.config.L, model.config.h, model.d) == (2, 16, 1, 32, 32)
    assert type(torch_pickle.load_pt(v1 / "models/mydata_T2k_2x4_L1.pt")).__name__ == "QINCo"  # the reference's pickle


def test_v1_ivf_centroids_training_index_and_search(v1, capsys):
    # python search_ivf.py --todo train_centroids --n_centroids 1048576 --nt 50_000_000
    #     --IVF_centroids models/bigann_centroids_1M_repro.npy
    run_v1("python search_ivf.py --db mydata --todo train_centroids --n_centroids 16 --nt 2_000 "
           "--IVF_centroids models/mydata_centroids_16.npy")
    assert np.load(v1 / "models/mydata_centroids_16.npy").shape == (16, 32)
    # python train_qinco.py --ivf --db bigann1M --nt 500_000 --M 8 --L 2 --lr 0.001
    #     --IVF_centroids models/bigann_centroids_65k.npy --ngpu 8 --model models/test_ivf_train.pt
    run_v1(f"python train_qinco.py --ivf --db mydata --nt 2_000 --nval 200 {V1_SMALL} --lr 0.001 "
           "--IVF_centroids models/mydata_centroids_16.npy --ngpu 0 --model models/test_ivf_train.pt")
    model = checkpoint.load_model(v1 / "models/test_ivf_train.pt")
    assert model.config.is_ivf and model.config.K_IVF == 16
    # python search_ivf.py --db bigann10M --model models/bigann_IVF65k_16x8_L2.pt
    #     --index index/bigann10M_IVF65k_16x8_L2.faissindex --index_key IVF65536,RQ16x8_Nqint8
    run_v1("python search_ivf.py --db mydata --model models/test_ivf_train.pt --nt 2_000 "
           "--index index/mydata_IVF16_2x4.faissindex --index_key IVF16,RQ2x4_Nqint8 --nprobe 4 --nshort 10")
    import faiss

    index = faiss.read_index(str(v1 / "index/mydata_IVF16_2x4.faissindex"))
    assert index.ntotal == 2000 and index.nlist == 16
    # python search_ivf.py --db bigann10M --model models/bigann_IVF65k_16x8_L2.pt
    #     --index index/bigann10M_IVF65k_16x8_L2.faissindex --todo search --nthread 32
    capsys.readouterr()
    run_v1("python search_ivf.py --db mydata --model models/test_ivf_train.pt "
           "--index index/mydata_IVF16_2x4.faissindex --todo search --nthread 2 --nprobe 4 16 --nshort 10 50")
    table = [ln for ln in capsys.readouterr().out.splitlines() if ln.split()[:1] in (["4"], ["16"])]
    assert len(table) >= 4  # one row per (nprobe, nshort) point, printed as the sweep runs and in the table


def test_v1_pq_qinco_prepare_train_recombine_and_eval(v1, capsys):
    # python pq_qinco.py --prepare --db FB_ssnpp1M --nt 10_010_000 --nsub 2
    #     --training_subvectors models/pq_training/trainset_{0..1}.npy
    run_v1("python pq_qinco.py --prepare --db mydata --nt 2_000 --nsub 2 "
           "--training_subvectors models/trainset_0.npy models/trainset_1.npy")
    subs = [np.load(v1 / f"models/trainset_{i}.npy") for i in range(2)]
    assert [s.shape for s in subs] == [(2000, 16), (2000, 16)]
    # for i in {0..1}; do python train_qinco.py --training_data models/pq_training/trainset_$i.npy
    #     --M 16 --L 2 --h 256 --lr 0.0001 --nt 10_000_000 --nval 10_000 --ngpu 4 --model .../sub_model_$i.pt
    for i in range(2):
        run_v1(f"python train_qinco.py --training_data models/trainset_{i}.npy {V1_SMALL} --lr 0.001 "
               f"--nt 1_800 --nval 200 --ngpu 0 --model models/sub_model_{i}.pt")
    # python pq_qinco.py --recombine --nsub 2 --in_models models/pq_training/sub_model_{0..1}.pt
    #     --out_model models/pq_qinco_2x16x8.pt
    run_v1("python pq_qinco.py --recombine --nsub 2 --in_models models/sub_model_0.pt models/sub_model_1.pt "
           "--out_model models/pq_qinco_2x2x4.pt")
    pq_model = checkpoint.load_model(v1 / "models/pq_qinco_2x2x4.pt")
    assert pq_model.d == 32 and len(pq_model.subs) == 2
    # python -u eval_qinco.py --db FB_ssnpp1M --model models/pq_qinco_2x16x8.pt
    capsys.readouterr()
    run_v1("python -u eval_qinco.py --db mydata --model models/pq_qinco_2x2x4.pt")
    out = capsys.readouterr().out
    assert "MSE=" in out and "1-recall@1:" in out
    # OPQ: python pq_qinco.py --prepare ... --opq --OPQMatrix models/pq_training/OPQ.npy ...;
    # python pq_qinco.py --recombine --nsub 2 --opq --OPQMatrix models/pq_training/OPQ.npy --in_models ... --out_model ...
    run_v1("python pq_qinco.py --prepare --db mydata --nt 2_000 --nsub 2 --opq --OPQMatrix models/OPQ.npy "
           "--training_subvectors models/opq_trainset_0.npy models/opq_trainset_1.npy")
    rotation = np.load(v1 / "models/OPQ.npy")
    assert rotation.shape == (32, 32)
    np.testing.assert_allclose(np.load(v1 / "models/opq_trainset_0.npy"),
                               (np.load(FIX / "ivf_xt.npy")[:2000] @ rotation.T)[:, :16], rtol=1e-4, atol=1e-3)
    run_v1("python pq_qinco.py --recombine --nsub 2 --opq --OPQMatrix models/OPQ.npy "
           "--in_models models/sub_model_0.pt models/sub_model_1.pt --out_model models/opq_qinco_2x2x4.pt")
    assert checkpoint.load_model(v1 / "models/opq_qinco_2x2x4.pt").d == 32


def test_v1_two_stage_aq_search(v1, capsys):
    # python -u search_2stage.py --model models/bigann_8x8_L2.pt --db bigann1M
    capsys.readouterr()
    run_v1(f"python -u search_2stage.py --model {V1_MODEL} --db mydata --nt 2_000 --nshort 10 50")
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if ln.split()[:1] in (["10"], ["50"])]
    assert len(rows) >= 2, out[-2000:]


def test_v1_codec_encode_decode_and_raw(v1):
    from qinco_jax.models import codec

    # python codec_qinco.py --model models/bigann_8x8_L4.pt --encode --i data/bigann/bigann_query.bvecs --o tmp/codes.npy
    run_v1(f"python codec_qinco.py --model {V1_MODEL} --encode --i mydata/query.fvecs --o tmp/codes.npy")
    model = checkpoint.load_model(V1_MODEL)
    xq = vecs_io.read_vectors(v1 / "mydata/query.fvecs")
    codes = np.load(v1 / "tmp/codes.npy")
    np.testing.assert_array_equal(codes, codec.encode(model, xq))
    # python codec_qinco.py --model models/bigann_8x8_L4.pt --decode --i tmp/codes.npy --o tmp/decoded.npy
    run_v1(f"python codec_qinco.py --model {V1_MODEL} --decode --i tmp/codes.npy --o tmp/decoded.npy")
    np.testing.assert_allclose(np.load(v1 / "tmp/decoded.npy"), codec.decode(model, codes), rtol=1e-5, atol=1e-4)
    # python codec_qinco.py --model models/bigann_8x8_L4.pt --encode --i data/bigann/bigann_query.bvecs
    #     --o tmp/codes.raw --raw
    run_v1(f"python codec_qinco.py --model {V1_MODEL} --encode --i mydata/query.fvecs --o tmp/codes.raw --raw")
    assert (v1 / "tmp/codes.raw").stat().st_size == len(xq) * 2  # M=4 codes of 4 bits: 2 bytes a vector
    run_v1(f"python codec_qinco.py --model {V1_MODEL} --decode --i tmp/codes.raw --o tmp/decoded_raw.npy --raw")
    np.testing.assert_allclose(np.load(v1 / "tmp/decoded_raw.npy"), np.load(v1 / "tmp/decoded.npy"), rtol=1e-6)


def test_v1_eval(v1, capsys):
    # python -u eval_qinco.py --db bigann1M --model models/bigann_8x8_L16.pt
    capsys.readouterr()
    run_v1(f"python -u eval_qinco.py --db mydata --model {V1_MODEL}")
    out = capsys.readouterr().out
    mse = float(out.split("MSE=")[1].split()[0].rstrip(","))
    assert mse > 0 and all(f"1-recall@{r}:" in out for r in (1, 10, 100))


def test_reference_search_log_points_in_our_schema(tmp_path):
    """report.load_results reads the reference's log: timers renamed, a pairwise stage's
    nmid_short kept with its time, nmid_short=0 (none) left out; a broken log is named."""
    mid = {"parameters": {"nprobe": 8, "nshort": 10, "nmid_short": 4}, "cno": 3, "t_search": 1.0,
           "t_mid_rerank": 0.5, "t_decode": 0.25, "t_rerank": 0.125, "t_total": 1.875,
           "recalls": {"1": 0.5, "10": 0.75, "100": 1.0}, "recalls_orig": {"1": 0.25, "10": 0.5, "100": 0.5}}
    path = tmp_path / "log.json"
    path.write_text(json.dumps({"ivf_real_res": [mid]}))
    (point,) = report.load_results(path)
    assert point["parameters"] == {"nprobe": 8, "nshort": 10, "nmid_short": 4} and point["cno"] == 3
    assert (point["t_mid"], point["t_dis"]) == (0.5, 0.125)
    assert report.total_seconds(point) == pytest.approx(mid["t_total"])
    path.write_text(json.dumps({"ivf_real_res": [{"parameters": {"nprobe": 1}, "recalls": {}}]}))
    with pytest.raises(ValueError, match="point 0 of the reference's search log has no t_search"):
        report.load_results(path)
