"""Each library pipeline run directly from Python on small data: training from data,
PQ-QINCo, an IVF index (QincoIndex: build, add, search, files), two-stage search and
evaluation."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FIXTURES, REFERENCE_MODELS

from qinco_jax.models import codec
from qinco_jax.data import datasets
from qinco_jax.experiments import evaluation
from qinco_jax.training import pq
from qinco_jax.training import recipe
from qinco_jax.training import loop as training
from qinco_jax.formats.checkpoint import load_model
from qinco_jax.config import EncodeOptions, QincoConfig
from qinco_jax.models.qinco import PQQincoModel, QincoModel
from qinco_jax.search import QincoIndex, rerank, two_stage

TINY = training.TrainConfig(lr=1e-3, batch_size=256, max_epochs=1, ngpu=1, progress=False)


def quiet(msg):
    pass


@pytest.fixture(scope="module")
def train_data():
    xt = np.load(FIXTURES / "train_xt.npy")
    return xt[:1000], xt[1000:1300]


@pytest.fixture(scope="module")
def ivf_data():
    return {k: np.load(FIXTURES / f"ivf_{k}.npy") for k in ("xt", "xb", "xq")}


@pytest.fixture(scope="module")
def model64():
    return load_model(FIXTURES / "ivf_qinco_d32_IVF64_M4_K256_L1_h32.pt")


def test_train_model_is_rq_initialisation_then_fit(train_data, tmp_path):
    xt, xval = train_data
    spec = recipe.ModelSpec(M=3, K=16, L=1, h=16, seed=0)
    cb = recipe.train_rq_codebooks(xt, spec, xval, log=quiet)
    assert cb.shape == (3, 16, 32)
    result = recipe.train_model(xt, xval, spec, TINY, rq_codebooks=cb, model_path=str(tmp_path / "m"), log=quiet)
    assert result.best.config == QincoConfig(d=32, K=16, M=3, L=1, h=16, db_scale=float(xt.max()))
    assert [e["epoch"] for e in result.history["epochs"]] == [0]
    # the recipe is exactly: initial model from the RQ codebooks, then training.fit
    by_hand = training.fit(recipe.initial_model(xt, spec, cb), xt, xval, TINY, log=quiet)
    for a, b in zip(np.asarray(result.best.params["codebook0"]), np.asarray(by_hand.best.params["codebook0"])):
        np.testing.assert_array_equal(a, b)
    assert training.validation_mse(load_model(tmp_path / "m"), xval) == pytest.approx(
        min(e["val_mse"] for e in result.history["epochs"]), rel=1e-5)
    assert min(e["val_mse"] for e in result.history["epochs"]) < result.history["before"]


def test_train_model_ivf_and_bad_specs(train_data):
    xt, xval = train_data
    centroids = xt[:8] * 1.01
    spec = recipe.ModelSpec(M=2, K=16, L=1, h=8, variant="ivf")
    result = recipe.train_model(xt, xval, spec, TINY, ivf_centroids=centroids, log=quiet)
    assert result.best.config.is_ivf and result.best.config.K_IVF == 8
    np.testing.assert_allclose(np.asarray(result.best.params["codebook0"]) * result.best.config.db_scale,
                               centroids, rtol=1e-6)  # IVF centroids stay frozen
    with pytest.raises(ValueError, match="needs IVF centroids"):
        recipe.train_model(xt, xval, spec, TINY)
    with pytest.raises(ValueError, match="power of two"):
        recipe.ModelSpec(K=12)
    with pytest.raises(ValueError, match="M must be >= 2"):
        recipe.ModelSpec(M=1)


def test_train_pq_opq_split_train_recombine(train_data):
    xt, xval = train_data
    spec = pq.PQSpec(nsub=2, opq=True, sub=recipe.ModelSpec(M=2, K=16, L=1, h=8))
    model = pq.train_pq(xt, xval, spec, TINY, log=quiet)
    assert isinstance(model, PQQincoModel) and model.opq.shape == (32, 32)
    assert [s.d for s in model.subs] == [16, 16]
    codes = codec.encode(model, xval)
    assert codes.shape == (300, 4)
    # recombined: the sub-models' errors on the rotated sub-vectors add up (OPQ is orthogonal)
    rotated = pq.split_subvectors(xval @ model.opq.T, 2)
    per_sub = [training.validation_mse(s, xs) for s, xs in zip(model.subs, rotated)]
    assert training.validation_mse(model, xval) == pytest.approx(sum(per_sub), rel=1e-3)
    np.testing.assert_array_equal(codes[:, 2:], codec.encode(model.subs[1], rotated[1]))
    parts = pq.split_subvectors(xval, 4)
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), xval)
    with pytest.raises(ValueError, match="not divisible by 3"):
        pq.train_pq(xt, xval, pq.PQSpec(nsub=3, sub=spec.sub), TINY)
    with pytest.raises(ValueError, match="IVF"):
        pq.PQSpec(sub=recipe.ModelSpec(variant="ivf"))
    with pytest.raises(ValueError, match="PQ-QINCo combines"):
        pq.recombine([model.subs[0], model], None)


def test_qinco_index_build_add_search_like_faiss(model64, ivf_data, tmp_path):
    xb, xq = ivf_data["xb"][:3000], ivf_data["xq"][:40]
    index = QincoIndex.build(model64, ivf_data["xt"][:3000], "IVF64,RQ4x8_Nqint8")
    assert index.ntotal == 0
    index.add(xb, batch_size=1100)
    assert index.ntotal == len(xb)
    index.nprobe, index.nshort = 8, 50
    D, I = index.search(xq, 10)
    assert D.shape == I.shape == (40, 10)
    assert np.all(np.diff(D, axis=1) >= 0) and I.min() >= 0
    # D are exact distances to the QINCo reconstructions of the returned vectors
    recons = codec.decode(model64, codec.encode(model64, xb))
    exact = np.sum((xq[:, None, :] - recons[I]) ** 2, axis=-1)
    np.testing.assert_allclose(D, exact, rtol=1e-4, atol=1e-3)
    # the same as the lower-level two stages at these parameters
    low = rerank.search_ivf(index.index, model64, xq, 50, rerank.Reranker(model64, k=10))
    np.testing.assert_array_equal(low.I, I)
    # more probes and a longer shortlist never lose recall of the exact QINCo neighbour
    best = np.argmin(np.sum((xq[:, None, :] - recons[None]) ** 2, axis=-1), axis=1)
    hits_small = np.mean(I[:, 0] == best)
    index.nprobe, index.nshort = 64, 3000
    assert np.mean(index.search(xq, 1)[1][:, 0] == best) >= hits_small
    index.nprobe, index.nshort = 8, 50
    path = tmp_path / "i.faissindex"
    index.write(path)
    again = QincoIndex.read(path, model64, nshort=50)
    again.nprobe = 8
    np.testing.assert_array_equal(again.search(xq, 10)[1], I)
    with pytest.raises(ValueError, match="nshort"):
        index.search(xq, 51)
    with pytest.raises(ValueError, match="HNSW"):
        index.efSearch = 16
    with pytest.raises(ValueError, match="queries have shape"):
        index.search(xq[:, :16], 5)


def test_run_two_stage_pipeline(model64, ivf_data):
    # All 200 queries: recall@1 is a few percent here, and on 40 queries re-ranking's gain
    # is one query either way (it loses by one with greedy codes).
    xt, xb, xq = ivf_data["xt"][:2000], ivf_data["xb"][:3000], ivf_data["xq"][:200]
    gt = datasets.exact_groundtruth(xq, xb, 10)
    results, stats = two_stage.run_two_stage(model64, xt, xb, xq, gt, [5, 200], EncodeOptions(beam=2))
    assert [r["parameters"] for r in results] == [{"nshort": 5}, {"nshort": 200}]
    assert results[1]["recalls"]["1"] >= results[0]["recalls"]["1"]
    assert results[1]["recalls"]["1"] >= results[1]["recalls_orig"]["1"]  # re-ranking helps
    assert stats["MSE_db"] < stats["MSE_db_AQ"]
    with pytest.raises(ValueError, match="larger than the database"):
        two_stage.run_two_stage(model64, xt, xb[:100], xq, gt, [200])


def test_evaluate_a_model_on_a_data_set():
    from qinco_jax.cli import UsageError

    model = load_model(FIXTURES / REFERENCE_MODELS["qinco"])
    ds = datasets.get_dataset("synthetic_small")
    res = evaluation.evaluate(model, ds, EncodeOptions(beam=2, batch_size=512))
    assert res["beam"] == 2 and res["preselect"] == 0 and res["proxy"] == "linear"
    assert res["nb"] == ds.nb and 0 < res["mse"]
    assert 0 <= res["recalls"]["1"] <= res["recalls"]["10"] <= res["recalls"]["100"] <= 1
    with pytest.raises(ValueError, match="dimension") as e:
        evaluation.evaluate(QincoModel.init(QincoConfig(d=8, K=16, M=2, L=1, h=8), 0), ds)
    assert not isinstance(e.value, UsageError)  # a library error, not a command-line one
