"""IVF-QINCo indexes: AQ fit, build, add, search, against the reference's index and results."""

from __future__ import annotations

import json
import os

import faiss
import numpy as np
import pytest

from conftest import FIXTURES
from qinco_jax.search import aq
from qinco_jax.models import codec
from qinco_jax.formats import packing
from qinco_jax.search import index as ivf_index
from qinco_jax.search import rerank, sweep, two_stage
from qinco_jax.formats.checkpoint import load_model
from qinco_jax.config import QincoConfig
from qinco_jax.metrics import one_recall_at
from qinco_jax.models.qinco import QincoModel

KEY512 = "IVF512,RQ4x8_Nqint8"
# One query of the 200 changes a recall by 0.005; compare with that much slack exactly.
ONE_QUERY = 0.005 + 1e-9


# --------------------------------------------------------------------------------------
# Shared (module-scoped) fixtures
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data():
    return {k: np.load(FIXTURES / f"ivf_{k}.npy") for k in ("xt", "xb", "xq", "gt")}


@pytest.fixture(scope="module")
def model512():
    return load_model(FIXTURES / "ivf_qinco_d32_IVF512_M4_K256_L1_h32.pt")


@pytest.fixture(scope="module")
def model64():
    return load_model(FIXTURES / "ivf_qinco_d32_IVF64_M4_K256_L1_h32.pt")


@pytest.fixture(scope="module")
def reference_results():
    with open(FIXTURES / "ivf512_rq4x8.json") as f:
        return json.load(f)["results"]


def read_reference_index(name: str):
    return ivf_index.read_index(FIXTURES / name)


@pytest.fixture(scope="module")
def xb_codes512(model512, data):
    return codec.encode(model512, data["xb"])


@pytest.fixture(scope="module")
def built512(model512, data, xb_codes512):
    """The index our pipeline builds from the IVF512 model, all of ivf_xt and ivf_xb
    (one add batch, like the reference's default --add_bs)."""
    index, stats = ivf_index.train_index(model512, data["xt"], KEY512, log=lambda m: None)
    ivf_index.add_vectors(index, model512, [xb_codes512], code_batches=True, expected_total=len(data["xb"]),
                    log=lambda m: None)
    return index, stats


def stored_entries(index) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(list number per id, stored code per id, ids of every list in stored order)."""
    lists = np.full(index.ntotal, -1, np.int64)
    codes = np.zeros((index.ntotal, index.code_size), np.uint8)
    order = []
    inv = index.invlists
    for l in range(index.nlist):
        n = inv.list_size(l)
        if n == 0:
            order.append(np.zeros(0, np.int64))
            continue
        ids = faiss.rev_swig_ptr(inv.get_ids(l), n).copy()
        lists[ids] = l
        codes[ids] = faiss.rev_swig_ptr(inv.get_codes(l), n * index.code_size).reshape(n, index.code_size)
        order.append(ids)
    return lists, codes, order


def by_parameters(results):
    return {tuple(sorted(r["parameters"].items())): r for r in results}


def assert_recalls_close(ours, ref, tol, keys=("recalls", "recalls_orig")):
    ours, ref = by_parameters(ours), by_parameters(ref)
    assert set(ours) == set(ref)
    for p, r in ref.items():
        for key in keys:
            for rank in ("1", "10", "100"):
                assert abs(ours[p][key][rank] - r[key][rank]) <= tol, (p, key, rank, ours[p][key], r[key])


# --------------------------------------------------------------------------------------
# AQ least squares
# --------------------------------------------------------------------------------------


def dense_lstsq(x, codes, K):
    """The reference's method: lstsq on the dense one-hot matrix (min-norm solution)."""
    n, M = codes.shape
    onehot = np.zeros((n, M * K), np.float32)
    onehot[np.arange(n)[:, None], codes + np.arange(M) * K] = 1
    sol, *_ = np.linalg.lstsq(onehot, x, rcond=None)
    return sol.reshape(M, K, x.shape[1])


def test_aq_fit_is_the_min_norm_lstsq_solution():
    rs = np.random.RandomState(0)
    n, M, K, d = 3000, 3, 32, 6
    codes = rs.randint(K, size=(n, M))
    codes[:, 2] %= 20  # codewords 20..31 of the last codebook never occur
    x = (rs.randn(n, d) + codes[:, :1] * 0.1 + codes[:, 1:2] ** 0.5).astype(np.float32)
    ours = aq.fit_codebooks(x, codes, K)
    ref = dense_lstsq(x, codes, K)
    # Same solution, not just the same reconstructions: the minimum-norm one.
    np.testing.assert_allclose(ours, ref, atol=1e-4 * np.abs(ref).max())
    assert np.all(ours[2, 20:] == 0)
    r1, r2 = aq.reconstruct(codes, ours), aq.reconstruct(codes, ref)
    assert np.linalg.norm(r1 - r2) <= 1e-5 * np.linalg.norm(r2)


def test_aq_normal_equations_stream_in_chunks(monkeypatch):
    rs = np.random.RandomState(1)
    codes = rs.randint(8, size=(1000, 4))
    x = rs.randn(1000, 5).astype(np.float32)
    whole = aq.fit_codebooks(x, codes, 8)
    monkeypatch.setattr(aq, "CHUNK_ROWS", 97)
    eq = aq.NormalEquations(M=4, K=8, d=5)
    eq.add(x[:500], codes[:500])
    eq.add(x[500:], codes[500:])
    np.testing.assert_allclose(eq.solve(), whole, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        aq.fit_codebooks(x, codes + 1, 8)


# --------------------------------------------------------------------------------------
# Coarse codes of any size
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", range(1, 9))
def test_listnos_round_trip_little_endian(size):
    rs = np.random.RandomState(size)
    hi = min(2 ** (8 * size), 2**62)
    listnos = rs.randint(0, hi, size=50, dtype=np.int64)
    listnos[0] = hi - 1
    coded = ivf_index.encode_listnos(listnos, size)
    assert coded.shape == (50, size)
    # little-endian: byte j holds bits 8j..8j+7
    assert all(int(coded[1, j]) == (int(listnos[1]) >> (8 * j)) & 255 for j in range(size))
    np.testing.assert_array_equal(ivf_index.decode_listnos(coded.reshape(5, 10, size)), listnos.reshape(5, 10))


def test_listnos_of_a_one_byte_coarse_code(model64, data):
    """IVF64 (1-byte coarse codes, which the reference's search cannot read): the list
    numbers returned with the codes are the lists the ids are stored in, and re-ranking
    the shortlist gives the exact distances to the QINCo decoding of the stored codes."""
    index = read_reference_index("ivf64_rq4x8.faissindex")
    assert index.coarse_code_size() == 1
    lists, stored, _ = stored_entries(index)
    index.nprobe = 4
    xq = data["xq"][:50]
    _, I, raw = index.search_and_return_codes(xq, 30, include_listnos=True)
    listnos, fine = ivf_index.split_search_codes(index, raw, 4)
    ok = I >= 0
    np.testing.assert_array_equal(listnos[ok], lists[I[ok]])
    np.testing.assert_array_equal(fine[ok], packing.unpack_codes(stored[I[ok]], None, [8] * 4))
    r = rerank.search_ivf(index, model64, xq, 30, rerank.Reranker(model64))
    top = r.I[:, :5]
    assert np.all(top >= 0)
    fine_top = packing.unpack_codes(stored[top.ravel()], None, [8] * 4).reshape(50, 5, 4)
    codes = np.concatenate([lists[top][..., None], fine_top], axis=2)
    exact = ((codec.decode(model64, codes.reshape(-1, 5)).reshape(50, 5, 32) - xq[:, None]) ** 2).sum(2)
    np.testing.assert_allclose(r.D[:, :5], exact, rtol=1e-4)
    assert np.all(np.diff(r.D, axis=1) >= 0)


def test_three_byte_coarse_codes_and_4_bit_rq():
    """nlist = 70,000 > 2^16: coarse codes of 3 bytes; K = 16: 4-bit RQ codes."""
    d, nlist = 8, 70_000
    model = QincoModel.init(QincoConfig(d=d, K=16, M=2, L=1, h=16, variant="ivf", K_IVF=nlist), key=0)
    rs = np.random.RandomState(0)
    centroids = ivf_index.ivf_centroids(model)
    xt = centroids[rs.randint(nlist, size=1000)] + 0.05 * rs.randn(1000, d).astype(np.float32)
    xb = centroids[rs.randint(nlist, size=1000)] + 0.05 * rs.randn(1000, d).astype(np.float32)
    index, _ = ivf_index.train_index(model, xt, f"IVF{nlist},RQ2x4_Nqint8", log=lambda m: None)
    assert index.coarse_code_size() == 3
    xb_codes = codec.encode(model, xb)
    assert xb_codes[:, 0].max() > 65535  # list numbers that need the third byte
    ivf_index.add_codes(index, model, xb_codes)
    index.nprobe = 8
    xq = xb[:40] + 0.01
    r = rerank.search_ivf(index, model, xq, 20, rerank.Reranker(model))
    _, I, raw = index.search_and_return_codes(xq, 20, include_listnos=True)
    listnos, fine = ivf_index.split_search_codes(index, raw, 2)
    ok = I >= 0
    np.testing.assert_array_equal(listnos[ok], xb_codes[I[ok], 0])
    np.testing.assert_array_equal(fine[ok], xb_codes[I[ok], 1:])
    found = r.I >= 0
    exact = ((codec.decode(model, xb_codes[r.I[found]]) - np.repeat(xq, found.sum(1), axis=0)) ** 2).sum(1)
    np.testing.assert_allclose(r.D[found], exact, rtol=1e-4, atol=1e-6)
    # each query (a database vector, moved slightly) finds its own vector
    assert np.mean([q in r.I[q] for q in range(40)]) >= 0.95


# --------------------------------------------------------------------------------------
# The reference's index and search results
# --------------------------------------------------------------------------------------


def test_search_of_reference_index_gives_reference_recalls(model512, data, reference_results):
    index = read_reference_index("ivf512_rq4x8.faissindex")
    results = sweep.explore(index, model512, data["xq"], data["gt"], nprobe=[1, 4, 16], nshort=[10, 50, 100],
                          log=lambda m: None)
    assert len(results) == 9
    for r in results:
        assert set(r) >= {"parameters", "recalls", "recalls_orig", "t_search", "t_decode", "t_dis"}
        assert r["t_search"] > 0 and r["t_decode"] > 0
    # The AQ shortlist is faiss's own search (identical here; its multithreaded merge
    # may order equal distances differently elsewhere). The re-ranked recalls differ at
    # most by tie-breaking among entries with identical codes (equal distances).
    assert_recalls_close(results, reference_results, ONE_QUERY)


def test_built_index_equals_reference_index(built512):
    index, stats = built512
    ref = read_reference_index("ivf512_rq4x8.faissindex")
    assert (index.nlist, index.ntotal, index.code_size, index.rq.M) == (ref.nlist, ref.ntotal, ref.code_size, ref.rq.M)
    np.testing.assert_array_equal(index.quantizer.reconstruct_n(0, 512), ref.quantizer.reconstruct_n(0, 512))
    lists, codes, _ = stored_entries(index)
    ref_lists, ref_codes, _ = stored_entries(ref)
    same = (lists == ref_lists) & np.all(codes[:, :4] == ref_codes[:, :4], axis=1)
    assert same.mean() >= 0.995
    # The same AQ reconstructions of the same stored codes (codebooks are only defined up to
    # shifts between them; both are the min-norm solution).
    sa = np.hstack([ivf_index.encode_listnos(ref_lists, 2), ref_codes])
    ours, theirs = index.sa_decode(sa), ref.sa_decode(sa)
    assert np.linalg.norm(ours - theirs) <= 1e-4 * np.linalg.norm(theirs)
    # The norm quantizer: trained on the same error norms.
    assert index.rq.norm_min == pytest.approx(ref.rq.norm_min, rel=1e-4)
    assert index.rq.norm_max == pytest.approx(ref.rq.norm_max, rel=1e-4)
    assert np.mean(codes[:, 4] == ref_codes[:, 4]) >= 0.99
    assert stats.mse_train_residuals > 0


def test_built_index_gives_reference_recalls(built512, model512, data, reference_results, tmp_path):
    index, _ = built512
    # Through a file, as the CLI does between its steps.
    path = tmp_path / "built.faissindex"
    faiss.write_index(index, str(path))
    index = ivf_index.as_ivf_index(faiss.read_index(str(path)))
    results = sweep.explore(index, model512, data["xq"], data["gt"], nprobe=[1, 4, 16], nshort=[10, 50, 100],
                          log=lambda m: None)
    assert_recalls_close(results, reference_results, 0.01 + 1e-9)


def test_reranking_reorders_the_same_shortlist(model512, data):
    index = read_reference_index("ivf512_rq4x8.faissindex")
    index.nprobe = 16
    r = rerank.search_ivf(index, model512, data["xq"], 100, rerank.Reranker(model512))
    after, before = one_recall_at(r.I, data["gt"]), one_recall_at(r.I_short, data["gt"])
    assert after["100"] == before["100"]  # same shortlist of 100
    assert np.all(np.diff(r.D, axis=1) >= 0)


def test_missing_results_rank_last(model512, data):
    """nprobe=1 and nshort=100 leave most shortlists short of 100 (lists of ~20): the
    missing entries (id -1, bytes 0xff) come last with +inf and id -1, never decoded."""
    index = read_reference_index("ivf512_rq4x8.faissindex")
    index.nprobe = 1
    r = rerank.search_ivf(index, model512, data["xq"], 100, rerank.Reranker(model512))
    missing = r.I_short < 0
    assert missing.any()
    np.testing.assert_array_equal((r.I < 0).sum(1), missing.sum(1))
    assert np.all(np.isinf(r.D[r.I < 0]))
    assert np.all(np.isfinite(r.D[r.I >= 0]))
    for q in range(len(r.I)):
        assert set(r.I[q][r.I[q] >= 0]) == set(r.I_short[q][~missing[q]])


def test_hnsw_coarse_quantizer(model64, data):
    key = "IVF64_HNSW32,RQ4x8_Nqint8"
    index, _ = ivf_index.train_index(model64, data["xt"][:5000], key, ef_construction=40, log=lambda m: None)
    quantizer = faiss.downcast_index(index.quantizer)
    assert quantizer.hnsw.efConstruction == 40 and quantizer.ntotal == 64
    batches = (data["xb"][i:i + 4000] for i in range(0, 10000, 4000))
    ivf_index.add_vectors(index, model64, batches, expected_total=10000, log=lambda m: None)
    res = sweep.explore(index, model64, data["xq"], data["gt"], nprobe=[4], ef_search=[8, 64], nshort=[50],
                      log=lambda m: None)
    assert [r["parameters"] for r in res] == [{"nprobe": 4, "quantizer_efSearch": 8, "nshort": 50},
                                             {"nprobe": 4, "quantizer_efSearch": 64, "nshort": 50}]
    assert res[1]["recalls"]["100"] >= 0.3


def test_autotune_skips_points_that_cannot_be_pareto_optimal(model512, data):
    index = read_reference_index("ivf512_rq4x8.faissindex")
    res = sweep.explore(index, model512, data["xq"], data["gt"], nprobe=[1, 2, 4, 8, 16], nshort=[10, 20, 50, 100],
                      n_autotune=20, log=lambda m: None)
    assert 0 < len(res) < 20


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


def test_index_that_the_model_cannot_fill(model512, model64):
    ref = read_reference_index("ivf512_rq4x8.faissindex")
    with pytest.raises(ValueError, match="nlist=512.*K_IVF=64"):
        ivf_index.check_index_matches_model(ref, model64)
    with pytest.raises(ValueError, match="dimension d=16"):
        ivf_index.check_index_matches_model(faiss.index_factory(16, KEY512), model512)
    for key, msg in [("IVF512,RQ8x8_Nqint8", "8 RQ codebooks.*M=4"), ("IVF512,RQ4x6_Nqint8", "6, 6, 6, 6.*8 bits"),
                     ("IVF256,RQ4x8_Nqint8", "nlist=256"), ("IVF512,PQ4", "not an IVF residual-quantizer"),
                     ("IVF512,Flat", "not an IVF residual-quantizer"), ("NotAKey12", "cannot build")]:
        with pytest.raises(ValueError, match=msg):
            ivf_index.new_index(model512, key)
    with pytest.raises(ValueError, match="HNSW"):
        ivf_index.new_index(model512, KEY512, ef_construction=40)
    with pytest.raises(ValueError, match="HNSW"):
        sweep.explore(ref, model512, np.zeros((2, 32), np.float32), np.zeros((2, 1), np.int64), nprobe=[1],
                    nshort=[10], ef_search=[16], log=lambda m: None)
    pq = load_model(FIXTURES / "qinco_d32_M4_K16_L2_h32.pt")
    with pytest.raises(ValueError, match="IVF-QINCo model"):
        ivf_index.new_index(pq, KEY512)
    with pytest.raises(ValueError, match=r"queries have shape \(2, 16\).*\(nq, 32\)"):
        sweep.explore(ref, model512, np.zeros((2, 16), np.float32), np.zeros((2, 1), np.int64), nprobe=[1],
                    nshort=[10], log=lambda m: None)


def test_index_files_that_are_not_ivf_rq(tmp_path):
    flat = tmp_path / "flat.faissindex"
    faiss.write_index(faiss.IndexFlatL2(8), str(flat))
    with pytest.raises(ValueError, match="flat.faissindex: expected an IVF residual-quantizer index"):
        ivf_index.read_index(flat)
    with pytest.raises(FileNotFoundError, match="missing.faissindex: no such file"):
        ivf_index.read_index(tmp_path / "missing.faissindex")


def test_codes_of_the_wrong_width(model512, data):
    index, _ = ivf_index.train_index(model512, data["xt"][:3000], KEY512, xt_codes=None, log=lambda m: None)
    with pytest.raises(ValueError, match=r"shape \(10, 4\).*codes of 5 columns"):
        ivf_index.add_codes(index, model512, np.zeros((10, 4), np.int64))
    with pytest.raises(ValueError, match=r"column 0 has values outside \[0, 512\)"):
        ivf_index.add_codes(index, model512, np.full((10, 5), 512))
    with pytest.raises(ValueError, match="training codes hold 10 codes for 3000"):
        ivf_index.train_index(model512, data["xt"][:3000], KEY512, xt_codes=np.zeros((10, 5), np.int64))
    with pytest.raises(ValueError, match="3 vectors were added, the database has 4"):
        ivf_index.add_vectors(index, model512, [np.zeros((3, 5), np.int64)], code_batches=True, expected_total=4,
                        log=lambda m: None)


# --------------------------------------------------------------------------------------
# The command-line program
# --------------------------------------------------------------------------------------


def _search_ivf_main():
    from qinco_jax.cli import index as search_ivf

    return search_ivf.main


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, data):
    """search_ivf.py --todo train add search on the fixture data, as the reference built
    and searched ivf512_rq4x8 (all of ivf_xt, the reference's search grid)."""
    tmp = tmp_path_factory.mktemp("search_ivf")
    folder = tmp / "db"
    folder.mkdir()
    for role, key in (("learn", "xt"), ("base", "xb"), ("query", "xq"), ("gt", "gt")):
        np.save(folder / f"{role}.npy", data[key])
    main = _search_ivf_main()
    common = ["--db", str(folder), "--model", str(FIXTURES / "ivf_qinco_d32_IVF512_M4_K256_L1_h32.pt"),
              "--nprobe", "1", "4", "16", "--nshort", "10", "50", "100", "--nthreads", "2"]
    main(common + ["--todo", "train", "add", "search", "--nt", "39000", "--index_key", KEY512,
                   "--trained_index", str(tmp / "trained.faissindex"), "--index", str(tmp / "full.faissindex"),
                   "--json", str(tmp / "results.json")])
    return main, common, tmp


def test_cli_builds_and_searches_like_the_reference(cli_run, reference_results):
    _, _, tmp = cli_run
    trained = faiss.read_index(str(tmp / "trained.faissindex"))
    full = faiss.read_index(str(tmp / "full.faissindex"))
    assert trained.ntotal == 0 and trained.is_trained and full.ntotal == 10000
    with open(tmp / "results.json") as f:
        document = json.load(f)
    assert isinstance(document, dict) and document["nq"] == 200  # the one results schema (README)
    results = document["results"]
    assert isinstance(results, list) and len(results) == 9
    for r in results:
        assert set(r) >= {"parameters", "recalls", "recalls_orig", "t_search", "t_decode", "t_dis"}
        assert set(r["recalls"]) == {"1", "10", "100"}
    assert_recalls_close(results, reference_results, 0.01 + 1e-9)
    assert not [p for p in os.listdir(tmp) if p.endswith(".tmp")]  # atomic writes leave nothing behind


def test_cli_adds_precomputed_codes_from_several_files(cli_run, model512, xb_codes512, tmp_path):
    main, common, tmp = cli_run
    half = len(xb_codes512) // 2
    np.save(tmp_path / "codes0.npy", xb_codes512[:half].astype(np.int64))
    # The second shard as codec_qinco.py --raw writes it (packed bits).
    packed = packing.pack_codes(xb_codes512[half:], packing.code_nbits(model512.code_sizes))
    packed.tofile(tmp_path / "codes1.raw")
    out = tmp_path / "from_codes.json"
    main(common + ["--todo", "add", "search", "--trained_index", str(tmp / "trained.faissindex"),
                   "--xb_codes", str(tmp_path / "codes0.npy"), str(tmp_path / "codes1.raw"), "--json", str(out),
                   "--index", str(tmp_path / "from_codes.faissindex")])
    # Every vector stored in the same list with the same code as when encoded by the CLI
    # (the order inside the lists follows the add batches, as in the reference).
    ours = stored_entries(faiss.read_index(str(tmp_path / "from_codes.faissindex")))
    encoded = stored_entries(faiss.read_index(str(tmp / "full.faissindex")))
    np.testing.assert_array_equal(ours[0], encoded[0])
    np.testing.assert_array_equal(ours[1], encoded[1])
    with open(out) as f, open(tmp / "results.json") as g:
        assert_recalls_close(json.load(f)["results"], json.load(g)["results"], 0.01 + 1e-9)


def test_cli_trains_centroids(cli_run, tmp_path):
    main, common, tmp = cli_run
    out = tmp_path / "centroids.npy"
    main(["--db", common[1], "--todo", "train_centroids", "--n_centroids", "16", "--kmeans_iter", "3",
          "--nt", "2_000", "--IVF_centroids", str(out)])
    centroids = np.load(out)
    assert centroids.shape == (16, 32) and centroids.dtype == np.float32
    assert np.unique(centroids, axis=0).shape[0] == 16


def test_cli_bad_input(cli_run, xb_codes512, tmp_path):
    from qinco_jax.cli import UsageError

    main, common, tmp = cli_run
    trained = ["--todo", "add", "--trained_index", str(tmp / "trained.faissindex")]
    np.save(tmp_path / "narrow.npy", xb_codes512[:, :4])
    with pytest.raises(ValueError, match="narrow.npy has 4 columns.*5 columns"):
        main(common + trained + ["--xb_codes", str(tmp_path / "narrow.npy")])
    np.save(tmp_path / "few.npy", xb_codes512[:6000])
    with pytest.raises(UsageError, match="hold 6000 codes.*has 10000 vectors"):
        main(common + trained + ["--xb_codes", str(tmp_path / "few.npy")])
    np.arange(7, dtype=np.uint8).tofile(tmp_path / "odd.raw")
    with pytest.raises(ValueError, match="not a whole number of .*codes"):
        main(common + trained + ["--xb_codes", str(tmp_path / "odd.raw")])
    with pytest.raises(UsageError, match="needs a trained index"):
        main(common + ["--todo", "add"])
    ivf64 = str(FIXTURES / "ivf_qinco_d32_IVF64_M4_K256_L1_h32.pt")
    with pytest.raises(ValueError, match="nlist=512.*K_IVF=64"):
        main(common + ["--todo", "search", "--index", str(tmp / "full.faissindex"), "--model", ivf64])
    with pytest.raises(ValueError, match="RQ8x8.*8 RQ codebooks"):
        main(common + ["--todo", "train", "--nt", "1000", "--index_key", "IVF512,RQ8x8_Nqint8"])
    with pytest.raises(UsageError, match="--model is required"):
        main(["--db", common[1], "--todo", "search", "--index", str(tmp / "full.faissindex")])
    with pytest.raises(UsageError, match="--bs must be >= 1, got -8"):
        main(common + ["--todo", "search", "--index", str(tmp / "full.faissindex"), "--bs", "-8"])
    with pytest.raises(UsageError, match="needs --IVF_centroids"):
        main(["--db", common[1], "--todo", "train_centroids"])
    with pytest.raises(ValueError, match="not a faiss index"):
        main(common + ["--todo", "search", "--index", str(tmp_path / "few.npy")])


# --------------------------------------------------------------------------------------
# Flat two-stage search
# --------------------------------------------------------------------------------------


def test_two_stage_search_reranks_the_aq_shortlist(data):
    model = load_model(FIXTURES / "qinco_d32_M4_K16_L2_h32.pt")
    xt, xb, xq, gt = data["xt"][:5000], data["xb"], data["xq"], data["gt"]
    codebooks = two_stage.fit_flat_aq(model, xt, codec.encode(model, xt))
    assert codebooks.shape == (4, 16, 32)
    xb_codes = codec.encode(model, xb)
    xb_aq = two_stage.flat_aq_reconstruct(model, xb_codes, codebooks)
    results = two_stage.two_stage_search(model, xq, gt, xb_codes, xb_aq, [10, 100], log=lambda m: None)
    assert [r["parameters"] for r in results] == [{"nshort": 10}, {"nshort": 100}]
    # The same as the reference's way: decode the whole database, exact distances to the
    # AQ shortlist, sort.
    decoded = codec.decode(model, xb_codes)
    for r, ns in zip(results, (10, 100)):
        _, short = faiss.knn(xq, xb_aq, ns)
        assert r["recalls_orig"] == pytest.approx(one_recall_at(short, gt))
        dis = ((xq[:, None] - decoded[short]) ** 2).sum(2)
        ref_I = np.take_along_axis(short, np.argsort(dis, axis=1, kind="stable"), axis=1)
        for rank, v in one_recall_at(ref_I, gt).items():
            assert abs(r["recalls"][rank] - v) <= ONE_QUERY
    with pytest.raises(ValueError, match="nshort=20000"):
        two_stage.two_stage_search(model, xq, gt, xb_codes, xb_aq, [20000], log=lambda m: None)
    with pytest.raises(ValueError, match="database codes hold 9999 codes for 10000 vectors"):
        two_stage.two_stage_search(model, xq, gt, xb_codes[1:], xb_aq, [10], log=lambda m: None)


def test_search_2stage_cli(tmp_path, data):
    from qinco_jax.cli import search_2stage as module

    folder = tmp_path / "db"
    folder.mkdir()
    for role, key in (("learn", "xt"), ("base", "xb"), ("query", "xq"), ("gt", "gt")):
        np.save(folder / f"{role}.npy", data[key][:4000] if key == "xt" else data[key])
    out = tmp_path / "r.json"
    args = ["--model", str(FIXTURES / "ivf_qinco_d32_IVF64_M4_K256_L1_h32.pt"), "--db", str(folder),
            "--nt", "4000", "--nshort", "10", "200", "--json", str(out)]
    module.main(args)
    with open(out) as f:
        results = json.load(f)["results"]
    assert [r["parameters"]["nshort"] for r in results] == [10, 200]
    assert results[1]["recalls"]["100"] >= results[0]["recalls"]["100"]
    with pytest.raises(ValueError, match="PQ-QINCo|IVF-QINCo model"):
        module.main(args[:1] + [str(FIXTURES / "pq_qinco_2x_d16_M3_K16_L1_h16_opq.pt")] + args[2:])


def test_norm_range_trained_on_the_stored_norms_clips_none():
    """The reference trains the qint8 norm range on the AQ errors, smaller than the
    reconstructions the entries store: large norms are clipped to the range's top.
    norm_training="reconstructions" trains it on the stored norms: every decoded norm
    within half a quantization step of the exact one."""
    from qinco_jax.search import jax_engine

    rng = np.random.default_rng(0)
    nlist, M, K, d, n = 8, 2, 16, 8, 4000
    centroids = rng.normal(size=(nlist, d)).astype(np.float32) * 10
    codes = np.column_stack([rng.integers(0, nlist, n), rng.integers(0, K, (n, M))]).astype(np.int32)
    codebooks = rng.normal(size=(M, K, d)).astype(np.float32) * 3
    xt = (centroids[codes[:, 0]] + aq.reconstruct(codes[:, 1:], codebooks)
          + rng.normal(size=(n, d)).astype(np.float32))  # errors (~d) well below the reconstructions (~18 d)
    key = f"IVF{nlist},RQ{M}x4_Nqint8"
    for training in ivf_index.NORM_TRAINING:
        index, _ = ivf_index.train_index_on_codes(centroids, xt, codes, key, K, norm_training=training,
                                                  log=lambda m: None)
        ivf_index.add_codes(index, None, codes)
        tables = jax_engine.read_ivf_tables(index)
        exact = (aq.reconstruct(tables.codes, ivf_index.index_codebooks(index)).astype(np.float64) ** 2).sum(1)
        step = (index.rq.norm_max - index.rq.norm_min) / 256
        clipped = exact > index.rq.norm_max * (1 + 1e-5)  # the largest norm is the range's top, to rounding
        if training == "errors":
            assert clipped.mean() > 0.1
        else:
            assert not clipped.any() and np.abs(tables.norms - exact).max() <= step / 2 + 1e-3 * exact.max()
    with pytest.raises(ValueError, match="norm_training"):
        ivf_index.train_index_on_codes(centroids, xt, codes, key, K, norm_training="exact")
