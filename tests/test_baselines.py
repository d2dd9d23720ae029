"""faiss IVF-PQ / IVF-RQ baselines at equal bytes, the summary file and its plot."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from qinco_jax.experiments import baselines
from qinco_jax.data import datasets


@pytest.fixture(scope="module", autouse=True)
def one_faiss_thread():
    # faiss's OpenMP threads spin for seconds on a busy 2-core machine; one is faster
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    ds = datasets.get_dataset("synthetic_small")
    xt, xb, xq = ds.get_train(), ds.get_database(), ds.get_queries()
    km = faiss.Kmeans(xt.shape[1], 16, niter=10, seed=1)
    km.train(xt)
    return xt, xb, xq, ds.get_groundtruth(), km.centroids


@pytest.fixture(scope="module")
def indexes(data):
    xt, xb, _, _, centroids = data
    pq = baselines.build_ivf_pq(xt, centroids, M=4)
    rq = baselines.build_ivf_rq(xt, centroids, M=4, beam=4)
    for index in (pq, rq):
        baselines.add_database(index, xb, progress=False)
    return pq, rq


def test_same_centroids_and_bytes(data, indexes):
    *_, centroids = data
    for index in indexes:
        assert index.nlist == 16 and index.ntotal == 2000
        np.testing.assert_array_equal(index.quantizer.reconstruct_n(0, 16), centroids)
    pq, rq = indexes
    assert pq.pq.M == rq.rq.M == 4 and pq.pq.nbits == 8 and rq.rq.max_beam_size == 4


def test_mse_below_the_coarse_quantizer_alone(data, indexes):
    xt, _, _, _, centroids = data
    coarse = faiss.IndexFlatL2(centroids.shape[1])
    coarse.add(centroids)
    _, a = coarse.search(xt, 1)
    ivf_only = float(np.mean(np.sum((xt - centroids[a[:, 0]]) ** 2, 1)))
    for index in indexes:
        mse = baselines.reconstruction_mse(index, xt)
        assert 0 < mse < 0.5 * ivf_only


def test_rq_codebooks_decode_as_the_index(data, indexes):
    """The codebooks IVF-QINCo starts from: the sum of the coded codewords is faiss's
    decode of the residual."""
    _, xb, _, _, centroids = data
    _, rq = indexes
    books = baselines.rq_codebooks(rq)
    assert books.shape == (4, 256, xb.shape[1])
    residuals = np.ascontiguousarray(xb[:50] - centroids[rq.quantizer.assign(xb[:50], 1)[:, 0]])
    packed = rq.rq.compute_codes(residuals)
    codes = packed[:, :4].astype(np.int64)  # 8-bit codes first, then the quantised norm
    ours = sum(books[m][codes[:, m]] for m in range(4))
    np.testing.assert_allclose(ours, rq.rq.decode(packed), rtol=1e-5, atol=1e-3)
    assert np.mean((ours - residuals) ** 2) < np.mean(residuals ** 2)


def test_search_sweep_points(data, indexes):
    _, _, xq, gt, _ = data
    for index in indexes:
        points = baselines.search_sweep(index, xq, gt, nprobe=[1, 4, 16])
        assert [p["parameters"] for p in points] == [{"nprobe": 1}, {"nprobe": 4}, {"nprobe": 16}]
        assert all(p["ms_per_query"] > 0 and 0 <= p["recall@1"] <= p["recall@10"] <= 1 for p in points)
        assert points[-1]["recall@10"] >= points[0]["recall@10"] and points[-1]["recall@1"] > 0.1
    with pytest.raises(ValueError, match="nprobe must be in"):
        baselines.search_sweep(indexes[0], xq, gt, nprobe=[17])


def test_build_errors(data):
    xt, *_, centroids = data
    with pytest.raises(ValueError, match="multiple of M"):
        baselines.build_ivf_pq(xt, centroids, M=5)
    with pytest.raises(ValueError, match="dimensions must match"):
        baselines.build_ivf_rq(xt[:, :16], centroids, M=4)
    with pytest.raises(ValueError, match="beam size"):
        baselines.build_ivf_rq(xt, centroids, M=4, beam=0)


def test_points_from_search_results_and_equal_time():
    results = [{"parameters": {"nprobe": 2, "nshort": 10}, "nq": 100, "t_search": 0.01, "t_decode": 0.02,
                "t_dis": 0.01, "recalls": {"1": 0.5, "10": 0.8}, "recalls_orig": {"1": 0.3, "10": 0.7}}]
    (re,) = baselines.points_from_search_results(results)
    (aq,) = baselines.points_from_search_results(results, reranked=False)
    assert re == {"parameters": {"nprobe": 2, "nshort": 10}, "ms_per_query": pytest.approx(0.4),
                  "recall@1": 0.5, "recall@10": 0.8}
    assert aq["ms_per_query"] == pytest.approx(0.1) and aq["recall@1"] == 0.3
    assert baselines.best_recall_within([re, aq], 0.2) == 0.3
    assert baselines.best_recall_within([re, aq], 0.05) is None  # no point that fast
    # a three-stage point: its time includes the pairwise middle stage
    (three,) = baselines.points_from_search_results([{**results[0], "t_mid": 0.02}])
    assert three["ms_per_query"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="nq"):
        baselines.points_from_search_results([{**results[0], "nq": 0}])


def test_summary_file_and_plot(tmp_path):
    pts = [{"parameters": {"nprobe": p}, "ms_per_query": 0.01 * p, "recall@1": 0.1 * p, "recall@10": 0.15 * p}
           for p in (1, 2, 4)]
    methods = [baselines.Method("IVF-PQ", 8, 12.5, tuple(pts)), baselines.Method("IVF-RQ", 8, 10.0, tuple(pts[:2]))]
    path = tmp_path / "summary.json"
    s = baselines.write_summary(path, {"name": "synthetic_small", "nb": 2000}, methods)
    assert json.loads(path.read_text()) == s == baselines.load_summary(path)
    assert [m["name"] for m in s["methods"]] == ["IVF-PQ", "IVF-RQ"]
    assert s["methods"][1] == {"name": "IVF-RQ", "bytes_per_vector": 8, "mse": 10.0, "points": pts[:2]}
    assert "IVF-RQ" in baselines.format_mse_table(s) and "12.5" in baselines.format_mse_table(s)
    png = tmp_path / "pareto.png"
    baselines.plot_methods(s, png, title="test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="distinct"):
        baselines.summary({}, [methods[0], methods[0]])
    (tmp_path / "bad.json").write_text('{"methods": [{"name": "x"}]}')
    with pytest.raises(ValueError, match="not a summary file"):
        baselines.load_summary(tmp_path / "bad.json")
