"""The JAX search engine (qinco_jax.search.jax_engine) against faiss's own scan: the
same shortlists on the fixture indexes (flat and HNSW coarse quantizers) and on every
norm encoding, the same re-ranked results through QincoIndex and the sweep, blocks
split to any memory budget, and clear errors on bad input."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from conftest import FIXTURES
from qinco_jax.formats.checkpoint import load_model
from qinco_jax.metrics import one_recall_at
from qinco_jax.search import QincoIndex, jax_engine, pairwise_stage, sweep
from qinco_jax.search import index as ivf_index
from qinco_jax.search.jax_engine import JaxIvfEngine, UnsupportedIndexError

Q2 = FIXTURES / "qinco2"
# Distances of the two engines agree to ~1e-6 relative (float32 sums in another order);
# entries whose distances tie to this precision may swap at the shortlist's edge.
RTOL = 2e-5


@pytest.fixture(scope="module")
def data():
    return {k: np.load(FIXTURES / f"ivf_{k}.npy") for k in ("xt", "xb", "xq", "gt")}


@pytest.fixture(scope="module", autouse=True)
def one_faiss_thread():
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # the test machine's cores are shared: no spinning threads
    yield
    faiss.omp_set_num_threads(before)


def assert_same_shortlists(D_ref, I_ref, D, I, rtol=RTOL):
    """The same ids per query, except entries whose distance ties the last kept one
    (to rtol); the same number of entries; the same sorted distances (to rtol)."""
    assert I.shape == I_ref.shape
    np.testing.assert_array_equal((I >= 0).sum(1), (I_ref >= 0).sum(1))
    ok = I_ref >= 0
    np.testing.assert_allclose(D[ok], D_ref[ok], rtol=rtol, atol=rtol * np.abs(D_ref[ok]).max())
    for q in range(len(I)):
        a, b = I_ref[q][I_ref[q] >= 0], I[q][I[q] >= 0]
        if set(a) == set(b):
            continue
        edge = D_ref[q][ok[q]].max()
        tol = rtol * max(abs(edge), 1.0)
        only_ref = D_ref[q][np.isin(I_ref[q], np.setdiff1d(a, b))]
        only_ours = D[q][np.isin(I[q], np.setdiff1d(b, a))]
        assert only_ref.min() >= edge - tol and only_ours.min() >= edge - tol, (q, edge, only_ref, only_ours)


def faiss_shortlist(index, xq, nprobe, n):
    index.nprobe = nprobe
    return index.search(xq, n)


def hnsw_copy(flat_index):
    """The same index (codebooks, norms, entries) behind an HNSW coarse quantizer."""
    ivf = ivf_index.as_ivf_index(flat_index)
    key = f"IVF{ivf.nlist}_HNSW32,RQ{ivf.rq.M}x{ivf_index.rq_nbits(ivf)[0]}_Nqint8"
    out = ivf_index.as_ivf_index(faiss.index_factory(ivf.d, key))
    ivf_index.coarse_quantizer(out).add(ivf_index.coarse_quantizer(ivf).reconstruct_n(0, ivf.nlist))
    faiss.copy_array_to_vector(faiss.vector_to_array(ivf.rq.codebooks), out.rq.codebooks)
    out.rq.norm_min, out.rq.norm_max = ivf.rq.norm_min, ivf.rq.norm_max
    out.rq.is_trained = out.is_trained = True
    for l in range(ivf.nlist):
        n = ivf.invlists.list_size(l)
        if n:
            codes = faiss.rev_swig_ptr(ivf.invlists.get_codes(l), n * ivf.code_size).reshape(n, -1)
            ids = faiss.rev_swig_ptr(ivf.invlists.get_ids(l), n).copy()
            out.add_sa_codes(np.hstack([ivf_index.encode_listnos(np.full(n, l), out.coarse_code_size()), codes]), ids)
    return out


# --------------------------------------------------------------------------------------
# Shortlists: the same as faiss's scan
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ivf512_rq4x8.faissindex", "ivf64_rq4x8.faissindex"])
def test_shortlists_are_faiss_shortlists_on_the_fixture_indexes(name, data):
    index = ivf_index.read_index(FIXTURES / name)
    engine = JaxIvfEngine(index)
    assert engine.tables.norm_encoding == "qint8" and engine.ntotal == index.ntotal
    for nprobe, n in [(1, 10), (4, 50), (16, 100), (600, 30)]:  # 600 > nlist: every list
        D_ref, I_ref = faiss_shortlist(index, data["xq"], nprobe, n)
        D, I = engine.shortlist(data["xq"], nprobe, n)
        assert_same_shortlists(D_ref, I_ref, D, I)


def test_stored_norms_are_decoded_not_recomputed(data):
    """The scan ranks by faiss's 8-bit norms: with exact norms the shortlists differ."""
    index = ivf_index.read_index(FIXTURES / "ivf512_rq4x8.faissindex")
    engine = JaxIvfEngine(index)
    exact = np.square(jax_engine._reconstruct(engine.tables.codes, engine.tables.codebooks,
                                              engine.tables.offsets)).sum(1)
    err = np.abs(engine.tables.norms - exact)
    step = (index.rq.norm_max - index.rq.norm_min) / 256
    inside = (exact > index.rq.norm_min) & (exact < index.rq.norm_max)
    assert err[inside].max() <= step / 2 + 1e-3 and err.mean() > step / 10


def test_hnsw_coarse_quantizer_exact_assignment(data):
    """The reference's QINCo2 index (IVF64_HNSW32): faiss with an efSearch that finds
    the exact nearest lists gives the JAX engine's shortlists; at a small efSearch the
    JAX engine still probes the exact nearest lists (no worse a shortlist)."""
    index = ivf_index.read_index(Q2 / "ivf64_qinco2_rq4x8.faissindex")
    quantizer = ivf_index.coarse_quantizer(index)
    assert hasattr(quantizer, "hnsw")
    engine = JaxIvfEngine(index)
    quantizer.hnsw.efSearch = 64
    D_ref, I_ref = faiss_shortlist(index, data["xq"], 8, 50)
    D, I = engine.shortlist(data["xq"], 8, 50)
    assert_same_shortlists(D_ref, I_ref, D, I)
    # exact coarse assignment: the brute-force nearest centroids
    flat = faiss.IndexFlatL2(index.d)
    flat.add(engine.tables.centroids)
    _, lists_ref = flat.search(data["xq"], 8)
    _, lists = engine.coarse(data["xq"], 8)
    assert (lists == lists_ref).mean() > 0.99  # up to float ties between centroids


def test_the_same_entries_behind_flat_and_hnsw_quantizers(data):
    flat = ivf_index.read_index(FIXTURES / "ivf64_rq4x8.faissindex")
    hnsw = hnsw_copy(flat)
    ivf_index.coarse_quantizer(hnsw).hnsw.efSearch = 64
    D_ref, I_ref = faiss_shortlist(hnsw, data["xq"], 4, 30)
    D, I = JaxIvfEngine(hnsw).shortlist(data["xq"], 4, 30)
    assert_same_shortlists(D_ref, I_ref, D, I)
    D_flat, I_flat = JaxIvfEngine(flat).shortlist(data["xq"], 4, 30)
    np.testing.assert_array_equal(I_flat, I)


def random_aq_index(key: str, x: np.ndarray, seed: int = 0):
    """An IVF additive-quantizer index of `key` with random codebooks (no slow AQ
    training), the norm quantizer trained, x added."""
    rng = np.random.default_rng(seed)
    index = faiss.index_factory(x.shape[1], key)
    nlist = index.nlist
    faiss.downcast_index(index.quantizer).add(x[:nlist])
    aq = index.aq
    nbits = faiss.vector_to_array(aq.nbits)
    total = int(sum(1 << int(b) for b in nbits))
    codebooks = rng.standard_normal((total, x.shape[1])) * x.std() / np.sqrt(len(nbits))
    faiss.copy_array_to_vector(codebooks.astype(np.float32).ravel(), aq.codebooks)
    aq.is_trained = True
    assign = np.argmin(((x[:1000, None] - x[None, :nlist]) ** 2).sum(-1), 1)
    norms = np.ascontiguousarray(((x[:1000] - x[assign]) ** 2).sum(1), np.float32)
    aq.train_norm(len(norms), faiss.swig_ptr(norms))
    index.is_trained = True
    index.add(x)
    return index


@pytest.mark.parametrize("key, encoding", [
    ("IVF16,RQ4x4_Nfloat", "float"), ("IVF16,RQ4x4_Nqint4", "qint4"), ("IVF16,RQ4x4_Ncqint8", "cqint"),
    ("IVF16,RQ4x4_Ncqint4", "cqint"), ("IVF16,RQ4x4_Nrq2x4", "cqint"), ("IVF16,RQ4x4", "exact"),
    ("IVF16,RQ1x4_2x6_Nqint8", "qint8"), ("IVF16,LSQ4x4_Nqint8", "qint8"),
])
def test_every_norm_encoding_and_codebook_width(key, encoding):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((3000, 16)) + 5 * rng.standard_normal((1, 16))).astype(np.float32)
    xq = (rng.standard_normal((60, 16)) + x.mean(0)).astype(np.float32)
    index = random_aq_index(key, x)
    engine = JaxIvfEngine(index)
    assert engine.tables.norm_encoding == encoding
    D_ref, I_ref = faiss_shortlist(index, xq, 3, 20)
    D, I = engine.shortlist(xq, 3, 20)
    assert_same_shortlists(D_ref, I_ref, D, I)


# --------------------------------------------------------------------------------------
# The whole search: QincoIndex(engine="jax"), the sweep, three stages
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model512():
    return load_model(FIXTURES / "ivf_qinco_d32_IVF512_M4_K256_L1_h32.pt")


def test_qinco_index_engines_give_the_same_results(model512, data):
    index = ivf_index.read_index(FIXTURES / "ivf512_rq4x8.faissindex")
    ours, theirs = QincoIndex(index, model512, engine="jax", nshort=30), QincoIndex(index, model512, nshort=30)
    for nprobe in (2, 16):
        ours.nprobe = theirs.nprobe = nprobe
        a, b = ours.search_detailed(data["xq"], 10), theirs.search_detailed(data["xq"], 10)
        assert_same_shortlists(b.D, b.I, a.D, a.I, rtol=1e-4)  # exact distances: the same decodes
        assert abs(one_recall_at(a.I, data["gt"])["1"] - one_recall_at(b.I, data["gt"])["1"]) <= 0.005 + 1e-9
        assert a.I_short.shape == b.I_short.shape == (len(data["xq"]), 30)
        assert a.t_search > 0 and a.t_decode == 0.0


def test_engine_is_rebuilt_after_add(model512, data):
    index = ivf_index.read_index(FIXTURES / "ivf512_rq4x8.faissindex")
    small = faiss.clone_index(index)
    small.reset()
    qi = QincoIndex(small, model512, engine="jax", nshort=10)
    qi.nprobe = 512
    _, I = qi.search(data["xq"][:5], 10)
    assert (I == -1).all()  # empty index: nothing found
    from qinco_jax.models import codec

    qi.add_codes(codec.encode(model512, data["xb"][:300]))
    _, I = qi.search(data["xq"][:5], 10)
    assert (I >= 0).all() and I.max() < 300


def test_sweep_with_the_jax_engine(model512, data):
    index = ivf_index.read_index(FIXTURES / "ivf512_rq4x8.faissindex")
    kw = dict(nprobe=[2, 8], nshort=[20], log=lambda _: None)
    theirs = sweep.explore(index, model512, data["xq"], data["gt"], **kw)
    ours = sweep.explore(index, model512, data["xq"], data["gt"], engine=JaxIvfEngine(index), **kw)
    assert [r["parameters"] for r in ours] == [r["parameters"] for r in theirs]
    for a, b in zip(ours, theirs):
        for key in ("recalls", "recalls_orig"):
            for rank in ("1", "10", "100"):
                assert abs(a[key][rank] - b[key][rank]) <= 0.01 + 1e-9, (a["parameters"], key, a[key], b[key])


def test_three_stages_in_one_jit(data):
    """The pairwise middle stage inside the jitted block: the faiss engine's results."""
    model = load_model(FIXTURES / "ivf_qinco_d32_IVF64_M4_K256_L1_h32.pt")
    index = ivf_index.read_index(FIXTURES / "ivf64_rq4x8.faissindex")
    decoder = pairwise_stage.train_for_model(model, data["xt"][:3000], n_tables_per_code=1, progress=False).decoder
    results = {}
    for engine in ("faiss", "jax"):
        qi = QincoIndex(index, model, engine=engine, nshort=10, pairwise_decoder=decoder, nmid_short=4)
        qi.nprobe = 8
        results[engine] = qi.search_detailed(data["xq"], 10)
    a, b = results["jax"], results["faiss"]
    assert a.I_mid.shape == b.I_mid.shape == (len(data["xq"]), 10) and a.I_short.shape == (len(data["xq"]), 40)
    same_mid = np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a.I_mid, b.I_mid)])
    assert same_mid > 0.98
    assert abs(one_recall_at(a.I, data["gt"])["1"] - one_recall_at(b.I, data["gt"])["1"]) <= 0.01 + 1e-9
    # one probed list holds fewer entries than nshort: nothing for the middle stage to cut
    for engine in ("faiss", "jax"):
        qi = QincoIndex(index, model, engine=engine, nshort=200, pairwise_decoder=decoder, nmid_short=4)
        qi.nprobe = 1
        results[engine] = qi.search_detailed(data["xq"][:20], 10)
    a, b = results["jax"], results["faiss"]
    assert ((b.I_mid >= 0).sum(1) < 200).any()  # the case is exercised
    for x, y, s in zip(a.I_mid, b.I_mid, b.I_short):
        if (s >= 0).sum() <= 200:
            assert set(x[x >= 0]) == set(y[y >= 0]) == set(s[s >= 0])


# --------------------------------------------------------------------------------------
# Sizes: any batch fits
# --------------------------------------------------------------------------------------


def test_blocks_follow_the_memory_budget(data):
    index = ivf_index.read_index(FIXTURES / "ivf512_rq4x8.faissindex")
    big = JaxIvfEngine(index)
    tiny = JaxIvfEngine(index, block_bytes=1)  # one query per block
    D_big, I_big = big.shortlist(data["xq"][:40], 8, 20)
    blocks, _ = tiny.plan(np.ascontiguousarray(data["xq"][:40]), 8)
    assert all(len(b.queries) == 1 for b in blocks) and len(blocks) == 40
    D, I = tiny.shortlist(data["xq"][:40], 8, 20)
    np.testing.assert_array_equal(I, I_big)


def test_a_block_that_runs_out_of_memory_is_split(data, monkeypatch):
    index = ivf_index.read_index(FIXTURES / "ivf512_rq4x8.faissindex")
    engine = JaxIvfEngine(index)
    D_ref, I_ref = engine.shortlist(data["xq"], 8, 20)
    real = jax_engine._shortlist_block
    sizes = []

    def limited(*args, **kw):
        sizes.append(args[3].shape[0])
        if args[3].shape[0] > 16:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
        return real(*args, **kw)

    monkeypatch.setattr(jax_engine, "_shortlist_block", limited)
    D, I = engine.shortlist(data["xq"], 8, 20)
    np.testing.assert_array_equal(I, I_ref)
    assert max(sizes) > 16 and min(sizes) <= 16

    def broken(*args, **kw):
        raise RuntimeError("INVALID_ARGUMENT: something else")

    monkeypatch.setattr(jax_engine, "_shortlist_block", broken)
    with pytest.raises(RuntimeError, match="INVALID_ARGUMENT"):  # only memory errors split
        engine.shortlist(data["xq"], 8, 20)


def test_chunk_layout_and_ladder():
    assert [jax_engine.ladder_up(n) for n in (1, 7, 8, 9, 10, 11)] == [1, 7, 8, 10, 10, 12]
    for n in range(1, 3000, 7):
        s = jax_engine.ladder_up(n)
        assert n <= s <= max(n * 1.2 + 1, 8)


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


def test_bad_queries(data, model512):
    index = ivf_index.read_index(FIXTURES / "ivf512_rq4x8.faissindex")
    engine = JaxIvfEngine(index)
    with pytest.raises(ValueError, match=r"queries have shape \(5, 16\), the index needs \(nq, 32\)"):
        engine.shortlist(data["xq"][:5, :16], 4, 10)
    bad = data["xq"][:5].copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="queries"):
        engine.shortlist(bad, 4, 10)
    with pytest.raises(ValueError, match="empty"):
        engine.shortlist(data["xq"][:0], 4, 10)
    with pytest.raises(ValueError, match="nprobe"):
        engine.shortlist(data["xq"][:5], 0, 10)
    qi = QincoIndex(index, model512, engine="jax")
    with pytest.raises(ValueError, match="queries"):
        qi.search(bad, 10)
    with pytest.raises(ValueError, match="unknown search engine 'gpu'"):
        QincoIndex(index, model512, engine="gpu")


def test_indexes_the_engine_does_not_implement():
    ip = faiss.index_factory(16, "IVF8,RQ2x4_Nqint8", faiss.METRIC_INNER_PRODUCT)
    with pytest.raises(UnsupportedIndexError, match="L2 metric only"):
        JaxIvfEngine(ip)
    prq = faiss.index_factory(16, "IVF8,PRQ2x2x4")
    with pytest.raises(UnsupportedIndexError, match="product additive quantizers"):
        JaxIvfEngine(prq)
    with pytest.raises(UnsupportedIndexError, match="additive-quantizer indexes"):
        JaxIvfEngine(faiss.index_factory(16, "IVF8,PQ4"))
    messages = []
    assert jax_engine.open_engine(ip, "jax", fallback=True, log=messages.append) is None
    assert "L2 metric only" in messages[0] and "faiss" in messages[0]
    with pytest.raises(UnsupportedIndexError):
        jax_engine.open_engine(ip, "jax")


# --------------------------------------------------------------------------------------
# Command lines: search_ivf.py --engine jax, run.py search.engine=jax
# --------------------------------------------------------------------------------------


def test_search_ivf_cli_engine_jax(data, tmp_path):
    from qinco_jax.cli import index as search_ivf
    from qinco_jax.search import report

    folder = tmp_path / "db"
    folder.mkdir()
    for role, key in (("learn", "xt"), ("base", "xb"), ("query", "xq"), ("gt", "gt")):
        np.save(folder / f"{role}.npy", data[key])
    common = ["--db", str(folder), "--model", str(FIXTURES / "ivf_qinco_d32_IVF512_M4_K256_L1_h32.pt"),
              "--index", str(FIXTURES / "ivf512_rq4x8.faissindex"), "--todo", "search", "--nprobe", "4",
              "--nshort", "20", "--nthreads", "1"]
    for engine in ("faiss", "jax"):
        search_ivf.main(common + ["--engine", engine, "--json", str(tmp_path / f"{engine}.json")])
    ours, theirs = (report.load_results(tmp_path / f"{e}.json") for e in ("jax", "faiss"))
    assert json_engine(tmp_path / "jax.json") == "jax" and len(ours) == len(theirs) == 1
    assert set(ours[0]) >= {"parameters", "recalls", "recalls_orig", "t_search", "t_decode", "t_dis", "nq"}
    for key in ("recalls", "recalls_orig"):
        for rank in ("1", "10", "100"):
            assert abs(ours[0][key][rank] - theirs[0][key][rank]) <= 0.01 + 1e-9
    with pytest.raises(SystemExit):
        search_ivf.main(common + ["--engine", "gpu"])


def json_engine(path):
    import json

    return json.loads(path.read_text())["engine"]


def test_run_py_search_engine_jax(tmp_path):
    from qinco_jax.cli import qinco2_search, run_config

    args = ["task=search", f"model={FIXTURES / 'ivf_qinco_d32_IVF64_M4_K256_L1_h32.pt'}",
            f"index={FIXTURES / 'ivf64_rq4x8.faissindex'}", f"queries={FIXTURES / 'ivf_xq.npy'}",
            f"queries_gt={FIXTURES / 'ivf_gt.npy'}", "search.nprobe=[4]", "search.nshort=[10]", "search.nthreads=1"]
    logged = []
    ours = qinco2_search.search(run_config.parse_run_args(args + ["search.engine=jax", f"output={tmp_path / 'j.json'}"]),
                                log=logged.append)
    theirs = qinco2_search.search(run_config.parse_run_args(args), log=lambda _: None)
    assert any("JAX engine" in m for m in logged) and json_engine(tmp_path / "j.json") == "jax"
    assert [r["parameters"] for r in ours] == [r["parameters"] for r in theirs] == [{"nprobe": 4, "nshort": 10}]
    assert abs(ours[0]["recalls"]["1"] - theirs[0]["recalls"]["1"]) <= 0.01 + 1e-9
    with pytest.raises(run_config.RunConfigError, match="search.engine"):
        run_config.parse_run_args(args + ["search.engine=cuda"])
