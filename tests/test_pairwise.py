"""The pairwise additive decoder: the reference's file and decodings, training, file I/O."""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import numpy as np
import pytest

from conftest import FIXTURES, require_torch
from qinco_jax.search import aq
from qinco_jax.models import pairwise
from qinco_jax.formats.torch_pickle import CheckpointError, TorchWriter, write_pt

QINCO2 = FIXTURES / "qinco2"
REFERENCE_DECODER = QINCO2 / "pairwise_decoder_ivf64_K16.pt"


@functools.lru_cache(maxsize=None)
def qinco2_outputs() -> dict[str, np.ndarray]:
    with np.load(QINCO2 / "reference_outputs_qinco2.npz") as f:
        return {k: f[k] for k in f.files}


def _rq_codes(r: np.ndarray, M: int, K: int) -> np.ndarray:
    """Codes (n, M) of a plain residual quantizer (k-means per stage): cheap stand-ins
    for a model's codes."""
    import faiss

    codes, rem = [], r.copy()
    for m in range(M):
        km = faiss.Kmeans(r.shape[1], K, niter=8, seed=m)
        km.train(rem)
        _, a = km.index.search(rem, 1)
        codes.append(a[:, 0])
        rem -= km.centroids[a[:, 0]]
    return np.stack(codes, 1).astype(np.int64)


@functools.lru_cache(maxsize=None)
def ivf_training_data(n: int, M: int, K: int):
    """(x, IVF codes (n, 1 + M), centroids): fixture vectors, their nearest of the 64
    centroids and RQ codes of the residuals."""
    x = np.load(FIXTURES / "ivf_xt.npy")[:n]
    centroids = np.load(FIXTURES / "ivf_centroids_64.npy")
    d2 = (centroids**2).sum(1)[None] - 2 * x @ centroids.T
    lists = d2.argmin(1)
    codes = _rq_codes(x - centroids[lists], M, K)
    return x, np.concatenate([lists[:, None], codes], 1), centroids


# --------------------------------------------------------------------------------------
# The reference's file
# --------------------------------------------------------------------------------------


def test_reference_file_decodes_like_the_reference():
    decoder = pairwise.load_pairwise_decoder(REFERENCE_DECODER)
    assert (decoder.nlist, decoder.n_tables, decoder.K, decoder.d) == (64, 8, 16, 32)
    ref = qinco2_outputs()
    codes = ref["ivf_qinco2_k16_A8_B8_codes"]
    centroids = np.load(FIXTURES / "ivf_centroids_64.npy")
    out = pairwise.decode(decoder, codes, centroids, batch_size=96)  # several batches, a padded last one
    np.testing.assert_allclose(out, ref["pairwise_ivf64_k16_decoded"], rtol=0, atol=5e-5)
    mse = ((ref["x"] - out) ** 2).sum(1).mean()
    assert mse == pytest.approx(float(ref["pairwise_ivf64_k16_mse"]), rel=1e-5)
    # A decoder kept on the device decodes the same; no codes give no vectors.
    on_device = pairwise.decode(jax.device_put(decoder), codes, centroids)
    np.testing.assert_array_equal(on_device, pairwise.decode(decoder, codes, centroids))
    assert pairwise.decode(decoder, codes[:0], centroids).shape == (0, 32)


def test_write_read_round_trip_is_exact(tmp_path):
    decoder = pairwise.load_pairwise_decoder(REFERENCE_DECODER)
    path = tmp_path / "pw.pt"
    pairwise.save_pairwise_decoder(decoder, path)
    again = pairwise.load_pairwise_decoder(path)
    for field in ("ivf_subcodes", "pairs", "tables"):
        np.testing.assert_array_equal(getattr(again, field), getattr(decoder, field))
    assert [p.name for p in tmp_path.iterdir()] == ["pw.pt"]  # no temporary left behind


def test_written_file_loads_in_torch_as_the_reference_state_dict(tmp_path):
    torch = require_torch()
    decoder = pairwise.load_pairwise_decoder(REFERENCE_DECODER)
    path = tmp_path / "pw.pt"
    pairwise.save_pairwise_decoder(decoder, path)
    ours = torch.load(path, weights_only=True)
    theirs = torch.load(REFERENCE_DECODER, weights_only=True)
    assert list(ours) == list(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and ours[key].shape == theirs[key].shape
        assert torch.equal(ours[key], theirs[key])


def _write_state(path, state: dict):
    writer = TorchWriter()
    write_pt(path, writer, {k: writer.plain_tensor(v) for k, v in state.items()})


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("combine_mvals_m"), "missing keys"),
    (lambda s: s.update(extra=np.zeros(1, np.float32)), "unexpected keys"),
    (lambda s: s.update(codebook_MKD=s["codebook_MKD"][:, :250]), "square"),
    (lambda s: s.update(combine_mvals_m=s["combine_mvals_m"][:, :5]), r"\(2, 8\)"),
    (lambda s: s.update(ivf_code_map=s["ivf_code_map"][:, :4]), "sub-codes"),
    (lambda s: s.update(ivf_code_map=s["ivf_code_map"] + 16), r"\[0, 16\)"),
    (lambda s: s.update(combine_mvals_m=s["combine_mvals_m"].astype(np.float32)), "integers"),
])
def test_malformed_files_are_refused(tmp_path, change, message):
    d = pairwise.load_pairwise_decoder(REFERENCE_DECODER)
    state = {"ivf_code_map": d.ivf_subcodes.astype(np.int64), "combine_mvals_m": d.pairs.astype(np.int64),
             "codebook_MKD": d.tables}
    change(state)
    path = tmp_path / "bad.pt"
    _write_state(path, state)
    with pytest.raises(CheckpointError, match=message):
        pairwise.load_pairwise_decoder(path)


def test_a_model_file_is_not_a_pairwise_decoder():
    with pytest.raises(CheckpointError, match="not a pairwise decoder"):
        pairwise.load_pairwise_decoder(FIXTURES / "ivf_qinco_d32_IVF64_M4_K256_L1_h32.pt")


def test_decode_refuses_codes_and_centroids_that_do_not_fit():
    decoder = pairwise.load_pairwise_decoder(REFERENCE_DECODER)
    codes = qinco2_outputs()["ivf_qinco2_k16_A8_B8_codes"][:10]
    centroids = np.load(FIXTURES / "ivf_centroids_64.npy")
    with pytest.raises(ValueError, match="at least 5"):
        pairwise.decode(decoder, codes[:, :3], centroids)
    with pytest.raises(ValueError, match=r"lists .* \[0, 64\)"):
        pairwise.decode(decoder, np.where(np.arange(5) == 0, 64, codes), centroids)
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        pairwise.decode(decoder, np.where(np.arange(5) == 2, 16, codes), centroids)
    with pytest.raises(ValueError, match=r"expected \(64, 32\)"):
        pairwise.decode(decoder, codes, centroids[:32])


# --------------------------------------------------------------------------------------
# Compact tables (the search's float16 / int8 storage)
# --------------------------------------------------------------------------------------


def _table_entries(decoder: pairwise.PairwiseDecoder, codes: np.ndarray) -> np.ndarray:
    """(T, n, D) float32: the entry each table gives each code (numpy, no jit)."""
    streams = np.concatenate([codes[:, 1:], decoder.ivf_subcodes[codes[:, 0]]], 1)
    rows = streams[:, decoder.pairs[0]] * decoder.K + streams[:, decoder.pairs[1]]
    tables = pairwise.float32_tables(decoder)
    return np.stack([tables[t][rows[:, t]] for t in range(decoder.n_tables)])


def test_compact_tables_decode_within_their_rounding():
    decoder = pairwise.load_pairwise_decoder(REFERENCE_DECODER)
    ref = qinco2_outputs()
    codes, x = ref["ivf_qinco2_k16_A8_B8_codes"], ref["x"]
    centroids = np.load(FIXTURES / "ivf_centroids_64.npy")
    exact = pairwise.decode(decoder, codes, centroids)
    entries = np.abs(_table_entries(decoder, codes))  # (T, n, D)
    accumulation = 1e-5 * (np.abs(exact) + entries.sum(0))  # float32 sums of T terms, in any order

    half = pairwise.compact(decoder, "float16")
    assert half.table_dtype == "float16" and half.tables.dtype == np.float16 and half.scales is None
    err = np.abs(pairwise.decode(half, codes, centroids) - exact)
    # each look-up rounded to float16: relative error at most 2^-11
    assert np.all(err <= entries.sum(0) * 2.0**-11 + accumulation)

    q = pairwise.compact(decoder, "int8")
    assert q.table_dtype == "int8" and q.scales.shape == (decoder.n_tables, decoder.d)
    np.testing.assert_allclose(q.scales, np.abs(decoder.tables).max(axis=1) / 127, rtol=1e-6)
    assert np.abs(q.tables.astype(int)).max(axis=1).min() == 127  # every column uses the full range
    # every entry within half a step of its table and dimension ...
    step_err = np.abs(pairwise.float32_tables(q) - decoder.tables)
    assert np.all(step_err <= q.scales[:, None, :] / 2 * (1 + 1e-5))
    # ... so a decoding within the sum of those half steps over the tables
    err = np.abs(pairwise.decode(q, codes, centroids) - exact)
    assert np.all(err <= q.scales.sum(0) / 2 * (1 + 1e-5) + accumulation)
    assert err.max() > 0  # the bound is about a real rounding
    mse = {name: ((x - pairwise.decode(d, codes, centroids)) ** 2).sum(1).mean()
           for name, d in (("float32", decoder), ("float16", half), ("int8", q))}
    assert mse["float16"] == pytest.approx(mse["float32"], rel=1e-5)
    assert mse["int8"] == pytest.approx(mse["float32"], rel=1e-2)


def test_compact_is_idempotent_and_zero_columns_are_safe():
    decoder = pairwise.load_pairwise_decoder(REFERENCE_DECODER)
    tables = decoder.tables.copy()
    tables[2, :, 5] = 0  # a dimension table 2 never corrects
    decoder = pairwise.PairwiseDecoder(decoder.ivf_subcodes, decoder.pairs, tables)
    q = pairwise.compact(decoder, "int8")
    assert q.scales[2, 5] == 0 and np.all(q.tables[2, :, 5] == 0)
    assert np.all(pairwise.float32_tables(q)[2, :, 5] == 0)
    again = pairwise.compact(q, "int8")  # from the dequantised tables: the same codes and scales
    np.testing.assert_array_equal(again.tables, q.tables)
    np.testing.assert_allclose(again.scales, q.scales, rtol=1e-6)
    np.testing.assert_array_equal(pairwise.compact(q, "float32").tables, pairwise.float32_tables(q))
    assert pairwise.compact(decoder, "float32").tables is decoder.tables  # nothing to do


@pytest.mark.parametrize("make, message", [
    (lambda d: pairwise.compact(d, "bfloat16"), "bfloat16"),
    (lambda d: pairwise.check_layout(dataclasses.replace(d, tables=d.tables.astype(np.int16))), "int16"),
    (lambda d: pairwise.check_layout(dataclasses.replace(d, tables=d.tables.astype(np.int8))), "scales"),
    (lambda d: pairwise.check_layout(dataclasses.replace(pairwise.compact(d, "int8"), scales=np.ones((8, 3), np.float32))),
     r"\(8, 32\)"),
    (lambda d: pairwise.check_layout(dataclasses.replace(d, scales=np.ones((8, 32), np.float32))), "no scales"),
    (lambda d: pairwise.check_decoder(dataclasses.replace(pairwise.compact(d, "int8"),
                                                          scales=np.full((8, 32), np.nan, np.float32))), "scales"),
    (lambda d: pairwise.compact(dataclasses.replace(d, tables=d.tables * 1e6), "float16"), "float16 range"),
])
def test_bad_table_storage_is_named(make, message):
    with pytest.raises(ValueError, match=message):
        make(pairwise.load_pairwise_decoder(REFERENCE_DECODER))


def test_saving_a_compact_decoder_writes_its_dequantised_float32_tables(tmp_path):
    decoder = pairwise.load_pairwise_decoder(REFERENCE_DECODER)
    q = pairwise.compact(decoder, "int8")
    pairwise.save_pairwise_decoder(q, tmp_path / "q.pt")
    back = pairwise.load_pairwise_decoder(tmp_path / "q.pt")
    assert back.table_dtype == "float32" and back.scales is None
    np.testing.assert_array_equal(back.tables, pairwise.float32_tables(q))
    assert not np.array_equal(back.tables, decoder.tables)  # the int8 rounding, kept
    codes = qinco2_outputs()["ivf_qinco2_k16_A8_B8_codes"]
    centroids = np.load(FIXTURES / "ivf_centroids_64.npy")
    np.testing.assert_allclose(pairwise.decode(back, codes, centroids), pairwise.decode(q, codes, centroids),
                               rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def test_training_mse_falls_with_every_table_and_beats_aq():
    x, codes, centroids = ivf_training_data(20000, M=4, K=16)
    result = pairwise.train_pairwise_decoder(x, codes, centroids, K=16, shrinkage=0.0, progress=False)
    decoder = result.decoder
    assert decoder.n_tables == 8 and decoder.K == 16 and len(result.train_mse) == 9
    assert np.all(np.diff(result.train_mse) < 0), result.train_mse
    # The recorded MSE is the decoder's: decoding the training set gives it back.
    err = ((x - pairwise.decode(decoder, codes, centroids)) ** 2).sum(1).mean()
    assert err == pytest.approx(result.train_mse[-1], rel=1e-4)
    # The least-squares AQ decoder over the same codes (what the IVF-RQ index scans with).
    residual = x - centroids[codes[:, 0]]
    books = aq.fit_codebooks(residual, codes[:, 1:], K=16)
    aq_mse = ((residual - aq.reconstruct(codes[:, 1:], books)) ** 2).sum(1).mean()
    assert result.train_mse[-1] < aq_mse * 0.97, (result.train_mse[-1], aq_mse)


@pytest.mark.parametrize("shrinkage", [0.0, 5.0])
def test_each_round_picks_the_pair_that_lowers_the_mse_most(shrinkage):
    """Brute force: every pair's table (residual sums over count + shrinkage) and the
    squared error left after subtracting it; the training keeps the best pair."""
    x, codes, centroids = ivf_training_data(3000, M=3, K=16)
    result = pairwise.train_pairwise_decoder(x, codes, centroids, K=16, n_tables=2, shrinkage=shrinkage,
                                             progress=False)
    decoder = result.decoder
    streams = np.concatenate([codes[:, 1:], decoder.ivf_subcodes[codes[:, 0]]], 1)
    residual = (x - centroids[codes[:, 0]]).astype(np.float64)
    for t in range(2):
        best = None
        for a, b in itertools.combinations(range(streams.shape[1]), 2):
            rows = streams[:, a] * 16 + streams[:, b]
            table = np.zeros((256, x.shape[1]))
            np.add.at(table, rows, residual)
            counts = np.bincount(rows, minlength=256)
            table /= (np.maximum(counts, 1) if shrinkage == 0 else counts + shrinkage)[:, None]
            sse = ((residual - table[rows]) ** 2).sum()
            if best is None or sse < best[0]:
                best = (sse, (a, b), table, rows)
        sse, pair, table, rows = best
        assert tuple(decoder.pairs[:, t]) == pair
        np.testing.assert_allclose(decoder.tables[t], table, rtol=1e-4, atol=1e-3)
        assert result.train_mse[t + 1] == pytest.approx(sse / len(x), rel=1e-4)
        residual -= table[rows]


def test_shrinkage_keeps_large_tables_from_memorising_a_small_training_set():
    """K = 256 (65,536 rows per table) on 8,000 training vectors: plain means memorise
    them (training MSE near 0) and decode held-out vectors worse than shrunk entries."""
    x, codes, centroids = ivf_training_data(12000, M=2, K=256)
    train, held = slice(0, 8000), slice(8000, 12000)

    def held_out_mse(shrinkage):
        res = pairwise.train_pairwise_decoder(x[train], codes[train], centroids, K=256, shrinkage=shrinkage,
                                              progress=False)
        xhat = pairwise.decode(res.decoder, codes[held], centroids)
        return res.train_mse[-1], float(((x[held] - xhat) ** 2).sum(1).mean())

    (train_plain, plain), (train_shrunk, shrunk) = held_out_mse(0.0), held_out_mse(8.0)
    assert train_plain < train_shrunk  # the plain means fit the training set closer...
    assert shrunk < 0.9 * plain        # ...and generalise worse
    with pytest.raises(ValueError, match="shrinkage"):
        pairwise.train_pairwise_decoder(x[:100], codes[:100], centroids, K=256, shrinkage=-1.0, progress=False)


def test_shrinkage_is_chosen_on_held_out_rows_when_none_is_given(tmp_path):
    """No shrinkage given, K = 256 tables (65,536 rows) and 6,000 training vectors: the
    choice holds out 10 % of them, finds a λ > 0 that reconstructs them better than the
    plain means, refits on every row with it, and that decoder also decodes vectors
    it never saw better than the plain means'."""
    x, codes, centroids = ivf_training_data(9000, M=2, K=256)
    train, held = slice(0, 6000), slice(6000, 9000)
    chosen = pairwise.train_pairwise_decoder(x[train], codes[train], centroids, K=256, progress=False)
    assert chosen.shrinkage_chosen and chosen.shrinkage > 0
    tried = dict(chosen.validation_mse)
    assert tried[0.0] > tried[chosen.shrinkage] == min(tried.values())
    assert list(tried) == sorted(tried) and chosen.shrinkage in pairwise.SHRINKAGE_GRID
    # The refit: the tables are those trained on every row with the chosen λ.
    again = pairwise.train_pairwise_decoder(x[train], codes[train], centroids, K=256, shrinkage=chosen.shrinkage,
                                            progress=False)
    np.testing.assert_array_equal(again.decoder.pairs, chosen.decoder.pairs)
    np.testing.assert_allclose(again.decoder.tables, chosen.decoder.tables, rtol=1e-6, atol=1e-6)
    assert not again.shrinkage_chosen and again.validation_mse == ()
    plain = pairwise.train_pairwise_decoder(x[train], codes[train], centroids, K=256, shrinkage=0.0, progress=False)

    def held_out(training):
        return float(((x[held] - pairwise.decode(training.decoder, codes[held], centroids)) ** 2).sum(1).mean())

    assert held_out(chosen) < 0.95 * held_out(plain)
    # The choice is recorded beside the tables.
    path = tmp_path / "pw.pt"
    pairwise.save_pairwise_decoder(chosen.decoder, path, model_fingerprint="abc", shrinkage=chosen.shrinkage,
                                   shrinkage_chosen=True)
    assert pairwise.read_decoder_metadata(path) == {"model_fingerprint": "abc", "shrinkage": chosen.shrinkage,
                                                    "shrinkage_chosen": True}
    assert pairwise.read_model_fingerprint(path) == "abc"


def test_an_explicit_shrinkage_is_used_as_given():
    """0 gives the reference's plain means (no rows held out, no choice), whatever the
    held-out rows would prefer; another value is used as it is; a tiny training set
    without a shrinkage keeps the plain means (nothing to hold out)."""
    x, codes, centroids = ivf_training_data(3000, M=2, K=16)
    for lam in (0.0, 3.0):
        res = pairwise.train_pairwise_decoder(x, codes, centroids, K=16, n_tables=1, shrinkage=lam, progress=False)
        assert (res.shrinkage, res.shrinkage_chosen, res.validation_mse) == (lam, False, ())
        streams = np.concatenate([codes[:, 1:], res.decoder.ivf_subcodes[codes[:, 0]]], 1)
        rows = streams[:, res.decoder.pairs[0, 0]] * 16 + streams[:, res.decoder.pairs[1, 0]]
        sums = np.zeros((256, x.shape[1]))
        np.add.at(sums, rows, x - centroids[codes[:, 0]])
        counts = np.bincount(rows, minlength=256)
        want = sums / np.maximum(counts + lam, 1)[:, None]  # sum / (count + λ); empty cells 0
        np.testing.assert_allclose(res.decoder.tables[0], want, rtol=1e-4, atol=1e-3)
    tiny = pairwise.train_pairwise_decoder(x[:pairwise.MIN_ROWS_TO_CHOOSE - 1], codes[:pairwise.MIN_ROWS_TO_CHOOSE - 1],
                                           centroids, K=16, n_tables=1, progress=False)
    assert (tiny.shrinkage, tiny.shrinkage_chosen, tiny.validation_mse) == (0.0, True, ())
    with pytest.raises(ValueError, match="shrinkage"):
        pairwise.train_pairwise_decoder(x, codes, centroids, K=16, shrinkage=float("nan"), progress=False)


def test_training_and_decoding_are_in_raw_units():
    """An affine change of units (x -> s·x + b, centroids alike) changes the decodings
    the same way: nothing is trained or decoded in a hidden normalised space."""
    x, codes, centroids = ivf_training_data(3000, M=2, K=16)
    scale, shift = np.float32(7.5), np.linspace(-300, 300, x.shape[1]).astype(np.float32)
    plain = pairwise.train_pairwise_decoder(x, codes, centroids, K=16, progress=False)
    # The same IVF sub-codes for both: k-means over the shifted centroids may break a
    # near tie differently after float rounding, which is not what this test is about.
    moved = pairwise.train_pairwise_decoder(x * scale + shift, codes, centroids * scale + shift, K=16,
                                            subcodes=plain.decoder.ivf_subcodes, progress=False)
    np.testing.assert_allclose(moved.train_mse, np.array(plain.train_mse) * scale**2, rtol=1e-3)
    np.testing.assert_array_equal(moved.decoder.pairs, plain.decoder.pairs)
    out_plain = pairwise.decode(plain.decoder, codes, centroids)
    out_moved = pairwise.decode(moved.decoder, codes, centroids * scale + shift)
    np.testing.assert_allclose(out_moved, out_plain * scale + shift, rtol=0, atol=0.05)


def test_fewer_centroids_than_codewords():
    """K = 256 codes over 64 lists: the reference fails; here each sub-code stage has 64
    codewords, the first reproduces every centroid, and training and I/O work."""
    x, codes, centroids = ivf_training_data(4000, M=2, K=256)
    result = pairwise.train_pairwise_decoder(x, codes, centroids, K=256, shrinkage=0.0, progress=False)
    sub = result.decoder.ivf_subcodes
    assert sub.shape == (64, 5) and sub.max() < 64
    assert len(np.unique(sub[:, 0])) == 64  # every centroid its own first sub-code
    assert result.decoder.K == 256 and result.decoder.tables.shape == (4, 65536, 32)
    assert np.all(np.diff(result.train_mse) < 0)


def test_ivf_subcodes_with_empty_lists_and_few_centroids():
    centroids = np.load(FIXTURES / "ivf_centroids_64.npy")[:10]
    sizes = np.array([5, 0, 3, 0, 0, 7, 1, 0, 2, 0])
    sub = pairwise.ivf_subcodes(centroids, sizes, K=16)
    assert sub.shape == (10, 5) and sub.min() >= 0 and sub.max() < 10
    assert len(np.unique(sub[:, 0])) == 10
    sub4 = pairwise.ivf_subcodes(centroids, sizes, K=4)
    assert sub4.max() < 4
    with pytest.raises(ValueError, match="non-negative"):
        pairwise.ivf_subcodes(centroids, -sizes, K=16)


def test_training_refuses_bad_inputs():
    x, codes, centroids = ivf_training_data(3000, M=2, K=16)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        pairwise.train_pairwise_decoder(x, codes, centroids, K=8, progress=False)
    with pytest.raises(ValueError, match=r"lists .* \[0, 32\)"):
        pairwise.train_pairwise_decoder(x, codes, centroids[:32], K=16, progress=False)
    with pytest.raises(ValueError, match="sub-codes"):
        pairwise.train_pairwise_decoder(x, codes, centroids, K=16, subcodes=np.full((64, 5), 16), progress=False)
    with pytest.raises(ValueError, match="n = 3000"):
        pairwise.train_pairwise_decoder(x, codes[:10], centroids, K=16, progress=False)
