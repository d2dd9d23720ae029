"""Model, index and pairwise decoder must belong together (qinco_jax.search.provenance).

Fixtures: the reference's indexes with the models that made them (v1 IVF64 and IVF512,
QINCo2 IVF64 K=256), and models of the same shape that did not make them: the QINCo2
model on the v1 index and the reverse (same d, K_IVF, M, K and the same IVF centroids),
a re-initialised model with the right IVF centroids.
"""

from __future__ import annotations

import json
import warnings

import faiss
import numpy as np
import pytest

from conftest import FIXTURES
from qinco_jax.formats import checkpoint
from qinco_jax.models import codec, pairwise
from qinco_jax.models.qinco import QincoModel
from qinco_jax.search import QincoIndex, pairwise_stage, provenance
from qinco_jax.search import index as ivf

Q2 = FIXTURES / "qinco2"
V1_64 = FIXTURES / "ivf_qinco_d32_IVF64_M4_K256_L1_h32.pt"
V1_512 = FIXTURES / "ivf_qinco_d32_IVF512_M4_K256_L1_h32.pt"
Q2_64 = Q2 / "ivf_qinco2_d32_IVF64_M4_K256_L2_de48_dh64_A8_B8.pt"
INDEX_V1_64 = FIXTURES / "ivf64_rq4x8.faissindex"
INDEX_V1_512 = FIXTURES / "ivf512_rq4x8.faissindex"
INDEX_Q2_64 = Q2 / "ivf64_qinco2_rq4x8.faissindex"


@pytest.fixture(scope="module")
def models():
    return {"v1_64": checkpoint.load_model(V1_64), "v1_512": checkpoint.load_model(V1_512),
            "q2_64": checkpoint.load_model(Q2_64)}


@pytest.fixture(scope="module")
def data():
    return {k: np.load(FIXTURES / f"ivf_{k}.npy") for k in ("xt", "xb", "xq", "gt")}


def reinitialised(model: QincoModel, seed: int) -> QincoModel:
    """A model of the same shape and IVF centroids, other weights."""
    params = dict(QincoModel.init(model.config, seed).params)
    params["codebook0"] = model.params["codebook0"]
    return QincoModel(model.config, params)


def test_reference_indexes_open_with_their_models(models):
    for path, name, most in ((INDEX_V1_64, "v1_64", 0.25), (INDEX_V1_512, "v1_512", 0.3), (INDEX_Q2_64, "q2_64", 0.02)):
        index = QincoIndex.read(path, models[name])
        assert index.provenance.by == "decode" and index.provenance.metadata is None
        assert index.provenance.disagreement < most < provenance.MISMATCH_THRESHOLD


@pytest.mark.parametrize("path, wrong", [(INDEX_V1_64, "q2_64"), (INDEX_Q2_64, "v1_64"), (INDEX_V1_512, "reinit")])
def test_a_same_shape_model_that_did_not_make_the_index_is_refused(models, path, wrong):
    model = reinitialised(models["v1_512"], 1) if wrong == "reinit" else models[wrong]
    ivf.check_index_matches_model(ivf.read_index(path), model)  # the shapes alone would let it through
    with pytest.raises(provenance.ModelMismatchError, match=rf"did not make the codes of index {path}.*disagree by") as e:
        QincoIndex.read(path, model)
    assert "allow_model_mismatch=True" in str(e.value)
    measured = float(str(e.value).split("disagree by ")[1].split(" ")[0])
    assert measured > 0.9  # unrelated decodes: about 1
    with pytest.warns(UserWarning, match="did not make the codes"):
        index = QincoIndex.read(path, model, allow_model_mismatch=True)
    assert index.provenance.by == "overridden"


def test_fingerprint_is_the_model_not_its_file(models, tmp_path):
    model = models["q2_64"]
    fp = provenance.model_fingerprint(model)
    checkpoint.save_model(model, tmp_path / "again.pt")
    assert provenance.model_fingerprint(checkpoint.load_model(tmp_path / "again.pt")) == fp
    params = dict(model.params)
    params["codebook0"] = np.asarray(params["codebook0"]) + np.float32(1e-3)
    assert provenance.model_fingerprint(QincoModel(model.config, params)) != fp
    assert provenance.model_fingerprint(models["v1_64"]) != fp


def test_written_indexes_record_the_model_and_refuse_another(models, tmp_path):
    index = QincoIndex.read(INDEX_V1_64, models["v1_64"])
    path = tmp_path / "db.faissindex"
    index.write(path)
    record = json.loads(provenance.metadata_path(path).read_text())
    assert record["model_fingerprint"] == provenance.model_fingerprint(models["v1_64"])
    assert faiss.read_index(str(path)).ntotal == 10000  # the faiss file itself is plain faiss
    again = QincoIndex.read(path, models["v1_64"])
    assert again.provenance.by == "fingerprint" and again.provenance.disagreement is None
    with pytest.raises(provenance.ModelMismatchError, match=r"built with the model of fingerprint .* has fingerprint"):
        QincoIndex.read(path, models["q2_64"])
    # a model close to the right one (what the decode check alone could not tell apart) is refused too
    params = dict(models["v1_64"].params)
    close = QincoModel(models["v1_64"].config, {**params, "codebook0": np.asarray(params["codebook0"]) * 1.0001})
    with pytest.raises(provenance.ModelMismatchError, match="fingerprint"):
        QincoIndex.read(path, close)
    # a record left beside an index that other tools rewrote is ignored (decode check instead)
    faiss.write_index(ivf.read_index(INDEX_Q2_64), str(path))
    assert provenance.fresh_metadata(path, ivf.read_index(path)) is None
    assert QincoIndex.read(path, models["q2_64"]).provenance.by == "decode"


def test_write_read_keep_every_search_setting(models, data, tmp_path):
    model = models["v1_64"]
    index = QincoIndex.read(INDEX_V1_64, model)
    decoder = pairwise_stage.train_for_model(model, data["xt"][:2000], n_tables_per_code=1, progress=False).decoder
    index.nprobe, index.nshort = 8, 30
    index.pairwise_decoder = decoder
    index.nmid_short, index.pairwise_table_dtype = 3, "float16"
    D, I = index.search(data["xq"][:50], 10)
    index.write(tmp_path / "db.faissindex")
    again = QincoIndex.read(tmp_path / "db.faissindex", model)
    assert (again.nprobe, again.nshort, again.nmid_short, again.pairwise_table_dtype) == (8, 30, 3, "float16")
    assert again.options == index.options and again.pairwise_decoder is not None
    D2, I2 = again.search(data["xq"][:50], 10)
    np.testing.assert_array_equal(I2, I)
    np.testing.assert_allclose(D2, D, rtol=1e-5)
    # keyword arguments override what was kept
    assert QincoIndex.read(tmp_path / "db.faissindex", model, nshort=12).nshort == 12
    # the decoder file records the model; the reference's readers see a plain state_dict
    assert pairwise.read_model_fingerprint(tmp_path / "db.faissindex.pairwise.pt") == provenance.model_fingerprint(model)


def test_write_read_keep_efsearch_of_an_hnsw_quantizer(models, data, tmp_path):
    model = models["q2_64"]
    index = QincoIndex.read(INDEX_Q2_64, model)
    index.efSearch, index.nprobe, index.nshort = 7, 4, 20
    index.write(tmp_path / "h.faissindex")
    again = QincoIndex.read(tmp_path / "h.faissindex", model)
    assert (again.efSearch, again.nprobe, again.nshort) == (7, 4, 20)


@pytest.fixture(scope="module")
def decoders(models, data):
    """Pairwise decoders trained on the v1 and the QINCo2 model's codes of the same vectors."""
    xt = data["xt"][:2000]
    return {name: pairwise_stage.train_for_model(models[name], xt, n_tables_per_code=1, progress=False).decoder
            for name in ("v1_64", "q2_64")}


def test_a_pairwise_decoder_of_another_model_is_refused(models, decoders, tmp_path):
    index = QincoIndex.read(INDEX_V1_64, models["v1_64"])
    index.pairwise_decoder = decoders["v1_64"]  # its own: accepted
    with pytest.raises(provenance.ModelMismatchError, match=r"was not trained on the codes of the model .*disagree by"):
        index.pairwise_decoder = decoders["q2_64"]
    # a file this library wrote records its model: refused by the fingerprint, named
    path = tmp_path / "pw_q2.pt"
    pairwise.save_pairwise_decoder(decoders["q2_64"], path, model_fingerprint=provenance.model_fingerprint(models["q2_64"]))
    with pytest.raises(provenance.ModelMismatchError, match=rf"pairwise decoder {path} was trained on the codes of the "
                       "model of fingerprint"):
        pairwise_stage.load_checked(path, models["v1_64"], index.index)
    with pytest.raises(provenance.ModelMismatchError, match="fingerprint"):
        index.open_pairwise_decoder(path)
    assert pairwise_stage.load_checked(path, models["q2_64"], ivf.read_index(INDEX_Q2_64)).K == 256
    with pytest.warns(UserWarning, match="fingerprint"):
        QincoIndex.read(INDEX_V1_64, models["v1_64"], allow_model_mismatch=True).open_pairwise_decoder(path)


def test_the_reference_pairwise_decoder_passes_with_its_model(data):
    model = checkpoint.load_model(Q2 / "ivf_qinco2_d32_IVF64_M4_K16_L2_de48_dh64_A8_B8.pt")
    decoder = pairwise.load_pairwise_decoder(Q2 / "pairwise_decoder_ivf64_K16.pt")
    assert pairwise.read_model_fingerprint(Q2 / "pairwise_decoder_ivf64_K16.pt") is None
    codes = codec.encode(model, data["xb"][:512])
    found = provenance.check_decoder_belongs(decoder, model, codes)
    assert found.by == "decode" and found.disagreement < 0.1
    other = reinitialised(model, 3)
    with pytest.raises(provenance.ModelMismatchError):
        provenance.check_decoder_belongs(decoder, other, codes)


def _folder(tmp_path, data):
    folder = tmp_path / "db"
    folder.mkdir()
    for role, key in (("learn", "xt"), ("base", "xb"), ("query", "xq"), ("gt", "gt")):
        np.save(folder / f"{role}.npy", data[key])
    return folder


def test_search_ivf_cli_refuses_a_model_that_did_not_make_the_index(data, tmp_path, capsys):
    from qinco_jax.cli import index as search_ivf

    folder = _folder(tmp_path, data)
    args = ["--todo", "search", "--db", str(folder), "--index", str(INDEX_V1_64), "--nprobe", "4", "--nshort", "10",
            "--nthreads", "1"]
    with pytest.raises(provenance.ModelMismatchError, match=rf"model {Q2_64} .* index {INDEX_V1_64}.*--allow_mismatch"):
        search_ivf.main([*args, "--model", str(Q2_64)])
    search_ivf.main([*args, "--model", str(Q2_64), "--allow_mismatch", "--json", str(tmp_path / "r.json")])
    assert "WARNING" in capsys.readouterr().out
    search_ivf.main([*args, "--model", str(V1_64)])
    assert "model and index checked (decode)" in capsys.readouterr().out


def test_search_ivf_cli_records_the_model_of_what_it_builds(data, tmp_path):
    from qinco_jax.cli import index as search_ivf

    folder = _folder(tmp_path, data)
    trained, full, dec = tmp_path / "t.faissindex", tmp_path / "f.faissindex", tmp_path / "pw.pt"
    search_ivf.main(["--todo", "train", "add", "train_pairwise_decoder", "--db", str(folder), "--model", str(V1_64),
                     "--nt", "3000", "--index_key", "IVF64,RQ4x8_Nqint8", "--trained_index", str(trained),
                     "--index", str(full), "--pairwise_decoder", str(dec), "--n_pairwise_codebooks", "1",
                     "--nthreads", "1"])
    fp = provenance.model_fingerprint(checkpoint.load_model(V1_64))
    for path in (trained, full):
        assert provenance.read_metadata(path)["model_fingerprint"] == fp
    assert pairwise.read_model_fingerprint(dec) == fp
    # add to the trained (empty) index with another model: refused by the fingerprint
    with pytest.raises(provenance.ModelMismatchError, match=rf"index {trained} was built with the model of fingerprint"):
        search_ivf.main(["--todo", "add", "--db", str(folder), "--model", str(Q2_64), "--trained_index", str(trained),
                         "--nthreads", "1"])
    # a pairwise decoder of the v1 model with the QINCo2 model on its own index: refused
    with pytest.raises(provenance.ModelMismatchError, match=rf"pairwise decoder {dec}"):
        search_ivf.main(["--todo", "search", "--db", str(folder), "--model", str(Q2_64), "--index", str(INDEX_Q2_64),
                         "--pairwise_decoder", str(dec), "--nprobe", "4", "--nshort", "10", "--nthreads", "1"])


def test_run_search_refuses_a_model_that_did_not_make_the_index(data, tmp_path):
    from qinco_jax.cli import qinco2_search, run_config

    np.save(tmp_path / "xq.npy", data["xq"])
    np.save(tmp_path / "gt.npy", data["gt"])
    common = ["task=search", f"index={INDEX_Q2_64}", f"queries={tmp_path / 'xq.npy'}",
              f"queries_gt={tmp_path / 'gt.npy'}", "search.nprobe=[4]", "search.nshort=[10]",
              "search.quantizer_efSearch=[16]", "verbose=false"]
    quiet = lambda _: None  # noqa: E731
    with pytest.raises(provenance.ModelMismatchError, match=rf"model {V1_64} .*index {INDEX_Q2_64}.*"
                       "allow_model_mismatch=true"):
        qinco2_search.search(run_config.parse_run_args([*common, f"model={V1_64}"]), log=quiet)
    assert qinco2_search.search(run_config.parse_run_args([*common, f"model={V1_64}", "allow_model_mismatch=true"]),
                                log=quiet)
    assert qinco2_search.search(run_config.parse_run_args([*common, f"model={Q2_64}"]), log=quiet)


def test_run_train_pairwise_decoder_records_a_checked_model(data, tmp_path):
    """run.py task=train_pairwise_decoder model=...: the model's fingerprint goes in the
    decoder file once its decode of the held-out codes agrees with the decoder's."""
    from qinco_jax.cli import qinco2_search, run_config

    model = checkpoint.load_model(Q2 / "ivf_qinco2_d32_IVF64_M4_K16_L2_de48_dh64_A8_B8.pt")
    xt = data["xt"][:3000]
    np.save(tmp_path / "c.npy", ivf.ivf_centroids(model))
    np.save(tmp_path / "xt.npy", xt)
    np.save(tmp_path / "codes.npy", codec.encode(model, xt).astype(np.int64))
    other = reinitialised(model, 5)
    checkpoint.save_model(other, tmp_path / "other.pt")
    common = ["task=train_pairwise_decoder", f"ivf_centroids={tmp_path / 'c.npy'}", f"trainset={tmp_path / 'xt.npy'}",
              f"encoded_trainset={tmp_path / 'codes.npy'}", "ds.valset=500", "n_pairwise_codebooks=1", "verbose=false"]
    quiet = lambda _: None  # noqa: E731
    out = tmp_path / "pw.pt"
    qinco2_search.train_pairwise_decoder(run_config.parse_run_args(
        [*common, f"model={Q2 / 'ivf_qinco2_d32_IVF64_M4_K16_L2_de48_dh64_A8_B8.pt'}", f"output={out}"]), log=quiet)
    assert pairwise.read_model_fingerprint(out) == provenance.model_fingerprint(model)
    with pytest.raises(provenance.ModelMismatchError, match=rf"model {tmp_path / 'other.pt'}"):
        qinco2_search.train_pairwise_decoder(run_config.parse_run_args(
            [*common, f"model={tmp_path / 'other.pt'}", f"output={tmp_path / 'x.pt'}"]), log=quiet)
    assert not (tmp_path / "x.pt").exists()


def test_an_empty_index_checks_the_ivf_centroids(models, data):
    model = models["v1_64"]
    index, _ = ivf.train_index(model, data["xt"][:3000], "IVF64,RQ4x8_Nqint8", log=lambda _: None)
    assert provenance.check_index_belongs(index, model).by == "empty index"
    assert provenance.check_index_belongs(index, models["q2_64"]).by == "empty index"  # same centroids: cannot tell
    params = dict(model.params)
    moved = QincoModel(model.config, {**params, "codebook0": np.asarray(params["codebook0"])[::-1].copy()})
    with pytest.raises(provenance.ModelMismatchError, match="holds other IVF centroids than the model"):
        provenance.check_index_belongs(index, moved)


def test_an_index_searched_with_a_mismatch_allowed_is_written_without_a_fingerprint(models, tmp_path):
    with pytest.warns(UserWarning):
        index = QincoIndex.read(INDEX_V1_64, models["q2_64"], allow_model_mismatch=True)
    index.write(tmp_path / "x.faissindex")
    record = provenance.read_metadata(tmp_path / "x.faissindex")
    assert record["model_fingerprint"] is None and record["model_mismatch_allowed"]
    with pytest.raises(provenance.ModelMismatchError, match="disagree by"):  # checked again by decoding
        QincoIndex.read(tmp_path / "x.faissindex", models["q2_64"])
    assert QincoIndex.read(tmp_path / "x.faissindex", models["v1_64"]).provenance.by == "decode"
