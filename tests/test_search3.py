"""QINCo2's three-stage search: faiss shortlist -> pairwise decoder -> full model.

Fixtures: the reference's K=16 IVF64 QINCo2 companion model and its pairwise decoder
(`pairwise_decoder_ivf64_K16.pt`), the reference's IVF64 K=256 QINCo2 index
(`ivf64_qinco2_rq4x8.faissindex`) and its search results, the v1 IVF64 model and index.
"""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FIXTURES
from qinco_jax.formats import checkpoint
from qinco_jax.models import codec
from qinco_jax.models import pairwise
from qinco_jax.search import report
from qinco_jax.cli import run_config
from qinco_jax.metrics import one_recall_at
from qinco_jax.models.qinco import QincoModel
from qinco_jax.search import QincoIndex, pairwise_stage
from qinco_jax.search import index as ivf
from qinco_jax.search.rerank import MAX_SHORTLIST, PairwiseReranker, Reranker, search_ivf, shortlist_length
from qinco_jax.search.sweep import explore

Q2 = FIXTURES / "qinco2"
K16_MODEL = Q2 / "ivf_qinco2_d32_IVF64_M4_K16_L2_de48_dh64_A8_B8.pt"
K256_MODEL = Q2 / "ivf_qinco2_d32_IVF64_M4_K256_L2_de48_dh64_A8_B8.pt"
V1_MODEL = FIXTURES / "ivf_qinco_d32_IVF64_M4_K256_L1_h32.pt"
N_TRAIN = 6000


@pytest.fixture(scope="module")
def data():
    return {k: np.load(FIXTURES / f"ivf_{k}.npy") for k in ("xt", "xb", "xq", "gt")}


@pytest.fixture(scope="module")
def k16(data):
    """The K=16 model, codes of its training / database vectors and an IVF64 index."""
    model = checkpoint.load_model(K16_MODEL)
    xt = data["xt"][:N_TRAIN]
    xt_codes = codec.encode(model, xt)
    xb_codes = codec.encode(model, data["xb"])
    index, _ = ivf.train_index(model, xt, "IVF64,RQ4x4_Nqint8", xt_codes=xt_codes, log=lambda _: None)
    ivf.add_codes(index, model, xb_codes)
    decoder = pairwise.load_pairwise_decoder(Q2 / "pairwise_decoder_ivf64_K16.pt")
    return dict(model=model, xt=xt, xt_codes=xt_codes, xb_codes=xb_codes, index=index, decoder=decoder)


def test_shortlist_length_is_capped_as_the_reference():
    assert shortlist_length(10, 4) == 40
    assert shortlist_length(10, 0) == shortlist_length(10, 1) == 10
    assert shortlist_length(1000, 10) == MAX_SHORTLIST == 8000
    assert shortlist_length(9000, 2) == 9000  # never fewer than nshort
    with pytest.raises(ValueError, match="nmid_short"):
        shortlist_length(10, -1)


@pytest.mark.parametrize("nshort, nmid", [(10, 4), (25, 4), (10, 8)])
def test_three_stages_match_two_stages_and_cut_the_decodes(k16, data, nshort, nmid):
    model, index = k16["model"], k16["index"]
    index.nprobe = 16
    reranker = Reranker(model)
    mid = pairwise_stage.middle_stage(k16["decoder"], model)
    two = search_ivf(index, model, data["xq"], nshort * nmid, reranker)
    two_decodes = reranker.rows_decoded
    three = search_ivf(index, model, data["xq"], nshort, reranker, mid=mid, nmid_short=nmid)
    three_decodes = reranker.rows_decoded - two_decodes
    # the same faiss shortlist, nmid_short times fewer full-model decodes
    np.testing.assert_array_equal(three.I_short, two.I_short)
    assert two_decodes == nmid * three_decodes == nmid * nshort * len(data["xq"])
    assert mid.rows_decoded == nmid * nshort * len(data["xq"])
    assert three.I_mid.shape == (len(data["xq"]), nshort) and three.t_mid > 0
    r2, r3 = one_recall_at(two.I, data["gt"])["1"], one_recall_at(three.I, data["gt"])["1"]
    assert abs(r3 - r2) <= 0.01 + 1e-9, (r2, r3)


def test_without_a_middle_stage_nothing_changes(k16, data):
    model, index = k16["model"], k16["index"]
    mid = pairwise_stage.middle_stage(k16["decoder"], model)
    plain = search_ivf(index, model, data["xq"], 20, Reranker(model))
    for nmid in (0, 1):
        r = search_ivf(index, model, data["xq"], 20, Reranker(model), mid=mid, nmid_short=nmid)
        assert r.I_mid is None and r.t_mid == 0.0 and mid.rows_decoded == 0
        np.testing.assert_array_equal(r.I, plain.I)


def test_int8_tables_search_as_float32_tables(k16, data):
    """The middle stage with compact tables (QincoIndex.pairwise_table_dtype): the same
    faiss shortlists, recall@1 within 0.01 of float32 tables, mostly the same nshort."""
    index = QincoIndex(k16["index"], k16["model"], pairwise_decoder=k16["decoder"], nmid_short=4)
    index.nprobe, index.nshort = 16, 10
    runs = {}
    for dtype in (None, "float32", "float16", "int8"):
        index.pairwise_table_dtype = dtype
        assert index.pairwise_decoder is k16["decoder"]  # the stage holds the compact copy
        assert index._mid.decoder.tables.dtype == (dtype or "float32")
        runs[dtype] = index.search_detailed(data["xq"], 10)
    base = runs["float32"]
    np.testing.assert_array_equal(runs[None].I, base.I)
    recall = {k: one_recall_at(r.I, data["gt"])["1"] for k, r in runs.items()}
    for dtype in ("float16", "int8"):
        np.testing.assert_array_equal(runs[dtype].I_short, base.I_short)
        assert abs(recall[dtype] - recall["float32"]) <= 0.01 + 1e-9, recall
        same = np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(runs[dtype].I_mid, base.I_mid)])
        assert same > (0.999 if dtype == "float16" else 0.97), (dtype, same)
    with pytest.raises(ValueError, match="bfloat16"):
        index.pairwise_table_dtype = "bfloat16"
    with pytest.raises(ValueError, match="bfloat16"):
        pairwise_stage.middle_stage(k16["decoder"], k16["model"], table_dtype="bfloat16")


def test_table_storage_is_chosen_by_its_mse_unless_given(k16):
    """No storage asked: int8, else float16, when its reconstructions of a sample of
    the stored entries are within 0.1 % of float32's MSE (against the model's
    decodings), else float32; a storage asked for is used as given."""
    model, index, decoder = k16["model"], k16["index"], k16["decoder"]
    codes = pairwise_stage.provenance.stored_codes_sample(index, pairwise_stage.COMPACT_CHECK_SAMPLE)
    target = codec.decode(model, codes)
    centroids = ivf.ivf_centroids(model)

    def mse(dec):
        return float(np.mean(np.sum((pairwise.decode(dec, codes, centroids) - target.astype(np.float64)) ** 2, 1)))

    want = {dtype: mse(pairwise.compact(decoder, dtype)) for dtype in pairwise.TABLE_DTYPES}
    choice, got = pairwise_stage.choose_table_dtype(decoder, model, codes)
    assert got == pytest.approx(want, rel=1e-6)
    rule = next((d for d in ("int8", "float16") if want[d] <= want["float32"] * 1.001), "float32")
    assert choice == rule
    assert pairwise_stage.choose_table_dtype(decoder, model, codes, tolerance=1.0)[0] == "int8"
    assert pairwise_stage.choose_table_dtype(decoder, model, codes, tolerance=-0.5)[0] == "float32"
    # One outlying entry per table column, in a row no sampled code looks up, sets the
    # int8 scale so high that the other entries round to 0: int8 fails the rule,
    # float16 (relative rounding) passes it.
    tables = np.array(decoder.tables)
    streams = np.concatenate([codes[:, 1:], decoder.ivf_subcodes[codes[:, 0]]], 1)
    for t, (a, b) in enumerate(decoder.pairs.T):
        unused = np.setdiff1d(np.arange(decoder.K ** 2), streams[:, a] * decoder.K + streams[:, b])
        tables[t, unused[0], :] = 30000.0
    spiky = dataclasses.replace(decoder, tables=tables)
    choice, got = pairwise_stage.choose_table_dtype(spiky, model, codes)
    assert choice == "float16" and got["int8"] > got["float32"] * 1.01, got
    # At load for search: chosen (and said) when not given, as given otherwise.
    said = []
    path = Q2 / "pairwise_decoder_ivf64_K16.pt"
    auto = pairwise_stage.load_checked(path, model, index, allow_mismatch=True, log=said.append)
    assert auto.table_dtype == rule and any(f"stored as {rule}" in line for line in said), said
    for dtype in pairwise.TABLE_DTYPES:
        given = pairwise_stage.load_checked(path, model, index, table_dtype=dtype, allow_mismatch=True, log=None)
        assert given.table_dtype == dtype


def _point(nmid, recall, seconds):
    parameters = {"nprobe": 4, "nshort": 10} | ({} if nmid is None else {"nmid_short": nmid})
    return {"parameters": parameters, "recalls": {"1": recall}, "t_search": seconds}


def test_middle_stage_pays_keeps_three_stage_points_only_where_faster_at_equal_recall():
    from qinco_jax.search.sweep import middle_stage_pays

    two = [_point(1, 0.50, 1.0), _point(0, 0.60, 2.0), _point(None, 0.70, 4.0)]
    faster = _point(4, 0.60, 1.5)       # the recall of a 2 s two-stage point in 1.5 s: kept
    beaten = _point(4, 0.55, 2.0)       # 0.60 in 2 s without the middle stage: dropped
    tie = _point(2, 0.60, 2.0)          # the same recall in the same time: no gain, dropped
    best = _point(8, 0.75, 9.0)         # beyond every two-stage recall: kept
    kept, dropped = middle_stage_pays([two[0], faster, beaten, two[1], tie, best, two[2]])
    assert kept == [two[0], faster, two[1], best, two[2]]
    assert dropped == [beaten, tie]
    assert middle_stage_pays(two) == (two, [])


def test_autotuned_sweep_adds_two_stage_points_and_drops_three_stage_points_that_do_not_pay(k16, data):
    model, index = k16["model"], k16["index"]
    mid = pairwise_stage.middle_stage(k16["decoder"], model)
    said, seen = [], []
    results = explore(index, model, data["xq"][:200], data["gt"][:200], nprobe=[2, 8], nshort=[5, 20],
                      nmid_short=[4], mid=mid, n_autotune=100, log=said.append,
                      on_result=lambda rs: seen.append(list(rs)))
    assert any("1 (no middle stage) added" in m for m in said)
    searched = max(seen, key=len)  # every point searched, before the three-stage ones were judged
    two = [r for r in searched if r["parameters"]["nmid_short"] == 1]
    assert two and all(r in results for r in two)  # the comparison points, all kept

    def beaten(r):
        return any(q["recalls"]["1"] >= r["recalls"]["1"] and report.total_seconds(q) <= report.total_seconds(r)
                   for q in two)

    for r in searched:
        if r["parameters"]["nmid_short"] == 4:
            assert (r in results) == (not beaten(r)), r
    assert sum("dropped: a two-stage point" in m for m in said) == len(searched) - len(results)
    # exhaustive (n_autotune 0): every point, none added
    every = explore(index, model, data["xq"][:200], data["gt"][:200], nprobe=[2], nshort=[5],
                    nmid_short=[4], mid=mid, n_autotune=0, log=lambda _: None)
    assert [r["parameters"]["nmid_short"] for r in every] == [4]


def _unnormalised(model: QincoModel) -> QincoModel:
    """The same network with mean 0, std 1: it sees raw data as `model` sees
    (x - mean) / std."""
    params = dict(model.params)
    params["normalisation"] = {"mean": jnp.zeros((model.d,), jnp.float32), "std": jnp.ones((), jnp.float32)}
    return dataclasses.replace(model, params=params)


def test_units_neighbours_do_not_depend_on_the_normalisation(k16, data):
    """A model with mean/std on raw data ranks exactly like the same network with mean
    0 / std 1 on pre-normalised data, in the full re-ranking and in the pairwise
    stage. Comparing raw queries with normalised reconstructions (the reference's
    mix-up) does not."""
    model, xb_codes = k16["model"], k16["xb_codes"]
    norm = model.normalisation
    assert np.abs(norm.mean).max() > 40 and norm.std > 20  # far from the identity
    plain = _unnormalised(model)
    xq, xq_n = data["xq"], model.normalise(data["xq"])
    rng = np.random.default_rng(0)
    ns = 60
    # shortlists: each query's true neighbour among random database entries
    ids = rng.integers(0, len(xb_codes), size=(len(xq), ns))
    ids[:, 7] = data["gt"][:, 0]
    codes = xb_codes[ids]
    valid = np.ones(ids.shape, bool)

    D_raw, pos_raw = Reranker(model)(xq, codes, valid)
    D_n, pos_n = Reranker(plain)(xq_n, codes, valid)
    # the same ranking (float rounding may swap a near-tie deep in a list)
    np.testing.assert_array_equal(pos_raw[:, :5], pos_n[:, :5])
    assert (pos_raw == pos_n).mean() > 0.999
    np.testing.assert_allclose(D_raw, D_n * norm.std**2, rtol=1e-3)
    # the reference's mix-up (normalised reconstructions against raw queries) ranks otherwise
    recon_n = np.asarray(codec.decode(model, codes.reshape(-1, codes.shape[2]))).reshape(len(xq), ns, -1)
    recon_n = model.normalise(recon_n.reshape(-1, model.d)).reshape(recon_n.shape)
    mixed = np.argsort(((xq[:, None] - recon_n) ** 2).sum(-1), axis=1)[:, :1]
    assert (mixed[:, 0] != pos_raw[:, 0]).mean() > 0.5

    # the pairwise stage: a decoder trained in raw units, and the same decoder expressed
    # in normalised units (tables / std: residuals x - c lose the mean), rank alike
    dec_raw = pairwise_stage.train_for_model(model, k16["xt"], k16["xt_codes"], n_tables_per_code=1,
                                             progress=False).decoder
    dec_n = pairwise.PairwiseDecoder(dec_raw.ivf_subcodes, dec_raw.pairs, dec_raw.tables / norm.std)
    Dm_raw, pm_raw = pairwise_stage.middle_stage(dec_raw, model)(xq, codes, valid, 10)
    Dm_n, pm_n = pairwise_stage.middle_stage(dec_n, plain)(xq_n, codes, valid, 10)
    np.testing.assert_array_equal(pm_raw[:, :3], pm_n[:, :3])
    assert (pm_raw == pm_n).mean() > 0.995
    np.testing.assert_allclose(Dm_raw[:, 0], Dm_n[:, 0] * norm.std**2, rtol=1e-3)
    # the reference's pairwise mix-up (normalised centroids + raw-unit tables) ranks otherwise
    mixed_mid = pairwise_stage.middle_stage(dec_raw, model, ivf_centroids=np.asarray(model.params["codebook0"]))
    _, pm_mixed = mixed_mid(xq, codes, valid, 10)
    assert (pm_mixed[:, 0] != pm_raw[:, 0]).mean() > 0.5

    # and through faiss: indexes built in each unit system give the same neighbours
    res = []
    for m, x, q in ((model, k16["xt"], xq), (plain, model.normalise(k16["xt"]), xq_n)):
        index = QincoIndex.build(m, x, "IVF64,RQ4x4_Nqint8", xt_codes=k16["xt_codes"])
        index.add_codes(xb_codes)
        index.nprobe, index.nshort, index.nmid_short = 16, 10, 4
        index.pairwise_decoder = dec_raw if m is model else dec_n
        res.append(index.search(q, 10)[1])
    assert (res[0][:, 0] == res[1][:, 0]).mean() >= 0.99


@pytest.fixture(scope="module")
def reference_qinco2_index():
    model = checkpoint.load_model(K256_MODEL)
    index = ivf.read_index(Q2 / "ivf64_qinco2_rq4x8.faissindex")
    with open(Q2 / "search_ivf64_qinco2.json") as f:
        ref = json.load(f)["results"]
    return model, index, ref


def test_reference_qinco2_index_searched_with_our_pipeline(reference_qinco2_index, data):
    """The reference's own index (IVF64_HNSW32, 1-byte coarse codes): our shortlist
    recalls are the reference's, and our re-ranking improves them where the
    reference's (normalised reconstructions against raw queries) destroys them."""
    model, index, ref = reference_qinco2_index
    assert index.coarse_code_size() == 1 and index.nlist == 64
    results = explore(index, model, data["xq"], data["gt"], nprobe=[1, 4, 16], nshort=[10, 50, 100],
                      ef_search=[16], log=lambda _: None)
    ours = {tuple(sorted(r["parameters"].items())): r for r in results}
    assert len(ref) == 4
    for r in ref:
        p = {k: v for k, v in r["parameters"].items() if k != "nmid_short"}
        mine = ours[tuple(sorted(p.items()))]
        assert mine["recalls_orig"] == r["recalls_orig"], p
        assert mine["recalls"]["1"] > r["recalls_orig"]["1"] > r["recalls"]["1"], (p, mine["recalls"])


def test_model_free_build_gives_the_model_build(k16):
    """build_index's path (centroids + codes, no model) builds the index the model's
    path builds."""
    model = k16["model"]
    a, _ = ivf.train_index(model, k16["xt"], "IVF64,RQ4x4_Nqint8", xt_codes=k16["xt_codes"], log=lambda _: None)
    b, _ = ivf.train_index_on_codes(ivf.ivf_centroids(model), k16["xt"], k16["xt_codes"], "IVF64,RQ4x4_Nqint8",
                                    model.config.K, log=lambda _: None)
    np.testing.assert_array_equal(ivf.index_codebooks(a), ivf.index_codebooks(b))
    ivf.add_codes(a, model, k16["xb_codes"])
    ivf.add_codes(b, None, k16["xb_codes"])
    assert a.ntotal == b.ntotal == len(k16["xb_codes"])
    with pytest.raises(ValueError, match="out of range"):
        ivf.add_codes(b, None, np.full((2, 5), 16))
    with pytest.raises(ValueError, match="nlist=64"):
        ivf.train_index_on_codes(ivf.ivf_centroids(model)[:32], k16["xt"], k16["xt_codes"] % 32,
                                 "IVF64,RQ4x4_Nqint8", 16, log=lambda _: None)


def test_v1_ivf_model_with_a_pairwise_decoder(data):
    """A pairwise decoder over v1 codes (db_scale normalisation), 64 < K=256 lists: raw
    units throughout, and the sweep's nmid_short axis."""
    model = checkpoint.load_model(V1_MODEL)
    index = ivf.read_index(FIXTURES / "ivf64_rq4x8.faissindex")
    xt = data["xt"][:4000]
    training = pairwise_stage.train_for_model(model, xt, n_tables_per_code=1, progress=False)
    assert all(b < a for a, b in zip(training.train_mse, training.train_mse[1:]))
    xb_codes = codec.encode(model, data["xb"][:2000])
    recon = pairwise.decode(training.decoder, xb_codes, ivf.ivf_centroids(model))
    centroid_mse = ((data["xb"][:2000] - ivf.ivf_centroids(model)[xb_codes[:, 0]]) ** 2).sum(1).mean()
    # raw units, held-out data (K=256 tables from 4000 vectors overfit: a modest gain)
    assert ((recon - data["xb"][:2000]) ** 2).sum(1).mean() < 0.9 * centroid_mse
    mid = pairwise_stage.middle_stage(training.decoder, model)
    # the middle stage's distances are those of the raw-unit pairwise reconstructions
    codes = xb_codes[:50][None].repeat(3, 0)
    D, pos = mid(data["xq"][:3], codes, np.ones((3, 50), bool), 5)
    want = ((data["xq"][:3, None] - recon[:50][None]) ** 2).sum(-1)
    np.testing.assert_allclose(D, np.take_along_axis(want, pos, 1), rtol=1e-4)
    np.testing.assert_array_equal(pos, np.argsort(want, 1)[:, :5])

    results = explore(index, model, data["xq"], data["gt"], nprobe=[4], nshort=[10, 20], nmid_short=[1, 4],
                      mid=mid, log=lambda _: None)
    assert len(results) == 4
    for r in results:
        assert r["parameters"]["nmid_short"] in (1, 4) and "t_mid" in r and "recalls_mid" in r
        assert (r["t_mid"] > 0) == (r["parameters"]["nmid_short"] == 4)
    table = report.format_table(results, len(data["xq"]))
    assert "nmid_short" in table and "mid" in table
    with pytest.raises(ValueError, match="K=16"):
        pairwise_stage.middle_stage(pairwise.load_pairwise_decoder(Q2 / "pairwise_decoder_ivf64_K16.pt"), model)


def test_search_ivf_cli_trains_and_uses_a_pairwise_decoder(data, tmp_path):
    from qinco_jax.cli import index as search_ivf

    folder = tmp_path / "db"
    folder.mkdir()
    for role, key in (("learn", "xt"), ("base", "xb"), ("query", "xq"), ("gt", "gt")):
        np.save(folder / f"{role}.npy", data[key])
    out, dec = tmp_path / "r.json", tmp_path / "pw.pt"
    search_ivf.main(["--todo", "train_pairwise_decoder", "search", "--db", str(folder), "--model", str(V1_MODEL),
                     "--index", str(FIXTURES / "ivf64_rq4x8.faissindex"), "--nt", "3000", "--n_pairwise_codebooks", "1",
                     "--pairwise_decoder", str(dec), "--nprobe", "4", "--nshort", "10", "--nmid_short", "1", "3",
                     "--pairwise_table_dtype", "int8", "--nthreads", "2", "--json", str(out)])
    assert pairwise.load_pairwise_decoder(dec).n_tables == 4
    results = report.load_results(out)
    assert sorted(r["parameters"]["nmid_short"] for r in results) == [1, 3]
    # --pairwise_shrinkage reaches the training: the tables the library trains with it
    shrunk = tmp_path / "pw8.pt"
    search_ivf.main(["--todo", "train_pairwise_decoder", "--db", str(folder), "--model", str(V1_MODEL), "--nt", "3000",
                     "--n_pairwise_codebooks", "1", "--pairwise_shrinkage", "8", "--pairwise_decoder", str(shrunk)])
    model = checkpoint.load_model(V1_MODEL)
    want = pairwise_stage.train_for_model(model, data["xt"][:3000], n_tables_per_code=1, shrinkage=8.0,
                                          progress=False).decoder
    np.testing.assert_allclose(pairwise.load_pairwise_decoder(shrunk).tables, want.tables, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="needs --pairwise_decoder"):
        search_ivf.main(["--todo", "train_pairwise_decoder", "--db", str(folder), "--model", str(V1_MODEL)])


def test_qinco2_run_tasks(k16, data, tmp_path):
    """run.py task=train_pairwise_decoder, build_index, search (with resume) on .npy codes."""
    from qinco_jax.cli import qinco2_search

    model = k16["model"]
    np.save(tmp_path / "c.npy", ivf.ivf_centroids(model))
    np.save(tmp_path / "xt.npy", k16["xt"])
    np.save(tmp_path / "xt_codes.npy", k16["xt_codes"].astype(np.int64))
    np.save(tmp_path / "xb_codes.npy", k16["xb_codes"].astype(np.int64))
    common = [f"ivf_centroids={tmp_path / 'c.npy'}", f"trainset={tmp_path / 'xt.npy'}",
              f"encoded_trainset={tmp_path / 'xt_codes.npy'}", "ds.valset=1000", "K=16", "verbose=false"]
    quiet = lambda _: None  # noqa: E731
    training = qinco2_search.train_pairwise_decoder(run_config.parse_run_args(
        ["task=train_pairwise_decoder", *common, f"output={tmp_path / 'pw.pt'}"]), log=quiet)
    assert training.decoder.n_tables == 8 and training.train_mse[-1] < training.train_mse[0]
    index = qinco2_search.build_index(run_config.parse_run_args(
        ["task=build_index", *common, f"encoded_db={tmp_path / 'xb_codes.npy'}", f"output={tmp_path / 'i.faissindex'}",
         "search.index_key=IVF${ivf_K}_HNSW32,RQ${M}x4_Nqint8"]), log=quiet)
    assert index.ntotal == 10000 and index.nlist == 64
    search_args = ["task=search", f"model={K16_MODEL}", f"index={tmp_path / 'i.faissindex'}",
                   f"queries={FIXTURES / 'ivf_xq.npy'}", f"queries_gt={FIXTURES / 'ivf_gt.npy'}",
                   f"pairwise_decoder={tmp_path / 'pw.pt'}", "search.nprobe=[4]", "search.nshort=[10]",
                   "search.nmid_short=[1,4]", "search.quantizer_efSearch=[16]", "search.nthreads=2",
                   f"output={tmp_path / 'r.json'}"]
    said = []
    results = qinco2_search.search(run_config.parse_run_args(search_args), log=said.append)
    assert {r["parameters"]["nmid_short"] for r in results} <= {1, 4} and results
    saved = report.load_results(tmp_path / "r.json")
    # the file holds every searched point; the returned sweep leaves out the three-stage
    # points a two-stage one beats (sweep.middle_stage_pays)
    from qinco_jax.search.sweep import middle_stage_pays

    assert [r["parameters"] for r in middle_stage_pays(saved)[0]] == [r["parameters"] for r in results]
    # no storage asked: chosen at load (choose_table_dtype), said and recorded
    chosen = json.loads((tmp_path / "r.json").read_text())["pairwise_table_dtype"]
    assert any(f"pairwise tables stored as {chosen}:" in m for m in said), said
    logged = []
    again = qinco2_search.search(run_config.parse_run_args(search_args + ["resume=true"]), log=logged.append)
    assert any("loaded from the previous results" in m for m in logged)
    assert [r["parameters"] for r in again] == [r["parameters"] for r in results]  # the same points, kept alike
    compact = qinco2_search.search(run_config.parse_run_args(
        search_args[:-1] + ["search.pairwise_table_dtype=int8", f"output={tmp_path / 'r8.json'}"]), log=quiet)
    assert {r["parameters"]["nmid_short"] for r in compact} <= {1, 4} and compact
    assert json.loads((tmp_path / "r8.json").read_text())["pairwise_table_dtype"] == "int8"
    with pytest.raises(run_config.RunConfigError, match="search.pairwise_table_dtype"):
        run_config.parse_run_args(search_args + ["search.pairwise_table_dtype=bfloat16"])
    # a flat coarse quantizer (the main job's indexes): the default efSearch axis is left out, said in the log
    qinco2_search.build_index(run_config.parse_run_args(
        ["task=build_index", *common, f"encoded_db={tmp_path / 'xb_codes.npy'}", f"output={tmp_path / 'f.faissindex'}",
         "search.index_key=IVF${ivf_K},RQ${M}x4_Nqint8"]), log=quiet)
    logged = []
    flat = qinco2_search.search(run_config.parse_run_args(
        ["task=search", f"model={K16_MODEL}", f"index={tmp_path / 'f.faissindex'}",
         f"queries={FIXTURES / 'ivf_xq.npy'}", f"queries_gt={FIXTURES / 'ivf_gt.npy'}", "search.nprobe=[4]",
         "search.nshort=[10]"]), log=logged.append)
    assert [r["parameters"] for r in flat] == [{"nprobe": 4, "nshort": 10}]
    assert any("quantizer_efSearch=[4] does not apply" in m for m in logged)
    with pytest.raises(run_config.RunConfigError, match="K="):
        qinco2_search.train_pairwise_decoder(run_config.parse_run_args(
            ["task=train_pairwise_decoder", *[c for c in common if c != "K=16"], f"output={tmp_path / 'x.pt'}"]))


def test_sweep_index_takes_a_decoder_file_or_a_loaded_decoder(k16, data, tmp_path):
    """The set-up both index programs share: the same points whether the pairwise
    decoder comes as its file or already loaded (e.g. after a provenance check)."""
    from qinco_jax.search.sweep import sweep_index

    path = Q2 / "pairwise_decoder_ivf64_K16.pt"
    args = dict(nprobe=[4], nshort=[10], nmid_short=[1, 4], log=lambda _: None)
    xq, gt = data["xq"][:50], data["gt"][:50]
    from_file = sweep_index(k16["index"], k16["model"], xq, gt, pairwise_decoder=path, **args)
    from_object = sweep_index(k16["index"], k16["model"], xq, gt, pairwise_decoder=k16["decoder"], **args)
    assert [r["parameters"] for r in from_file] == [r["parameters"] for r in from_object] and len(from_file) == 2
    assert [r["recalls"] for r in from_file] == [r["recalls"] for r in from_object]
    plain = sweep_index(k16["index"], k16["model"], xq, gt, nprobe=[4], nshort=[10], log=lambda _: None)
    assert [r["parameters"] for r in plain] == [{"nprobe": 4, "nshort": 10}]


def test_run_tasks_read_K_from_the_encoded_set(k16, tmp_path):
    """run.py task=train_pairwise_decoder / build_index as the README writes them (no K=,
    no model=): QINCo2's .npz codes record K in their header."""
    from qinco_jax.cli import qinco2_search
    from qinco_jax.formats import code_parts

    model = k16["model"]
    np.save(tmp_path / "c.npy", ivf.ivf_centroids(model))
    np.save(tmp_path / "xt.npy", k16["xt"])
    code_parts.write_code_parts(tmp_path / "xt.npz", k16["xt_codes"].astype(np.int64), K=16, M=4, D=32)
    code_parts.write_code_parts(tmp_path / "xb.npz", k16["xb_codes"].astype(np.int64), K=16, M=4, D=32, n_parts=2)
    common = [f"ivf_centroids={tmp_path / 'c.npy'}", f"trainset={tmp_path / 'xt.npy'}",
              f"encoded_trainset={tmp_path / 'xt.npz'}", "ds.valset=1000", "verbose=false"]
    quiet = lambda _: None  # noqa: E731
    training = qinco2_search.train_pairwise_decoder(run_config.parse_run_args(
        ["task=train_pairwise_decoder", *common, "n_pairwise_codebooks=1", f"output={tmp_path / 'pw.pt'}"]), log=quiet)
    assert training.decoder.K == 16
    index = qinco2_search.build_index(run_config.parse_run_args(
        ["task=build_index", *common, f"encoded_db={tmp_path / 'xb.npz'}", f"output={tmp_path / 'i.faissindex'}",
         "search.index_key=IVF${ivf_K},RQ${M}x4_Nqint8"]), log=quiet)
    assert index.ntotal == 10000 and ivf.rq_nbits(index) == [4] * 4
    # a header that contradicts its codes is refused
    code_parts.write_code_parts(tmp_path / "bad.npz", k16["xt_codes"].astype(np.int64), K=16, M=3, D=32)
    with pytest.raises(ValueError, match="the header says M=3"):
        qinco2_search.train_pairwise_decoder(run_config.parse_run_args(
            ["task=train_pairwise_decoder", *common[:2], f"encoded_trainset={tmp_path / 'bad.npz'}",
             "ds.valset=1000", f"output={tmp_path / 'x.pt'}"]), log=quiet)
