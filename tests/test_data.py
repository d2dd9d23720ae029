"""Vector files, data sets and code packing."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from conftest import FIXTURES
from faiss.contrib import vecs_io as faiss_vecs

from qinco_jax.data import datasets
from qinco_jax.formats import packing
from qinco_jax.formats import vecs_io

# --------------------------------------------------------------------------------------
# vecs_io
# --------------------------------------------------------------------------------------


def _vecs_bytes(x: np.ndarray, dtype: str) -> bytes:
    """An independent TEXMEX writer: per row, int32 d then the values."""
    return b"".join(np.int32(x.shape[1]).tobytes() + row.astype(dtype).tobytes() for row in x)


def _bin_bytes(x: np.ndarray, dtype: str) -> bytes:
    return np.array(x.shape, "<i4").tobytes() + x.astype(dtype).tobytes()


@pytest.fixture
def small():
    rs = np.random.RandomState(3)
    return (rs.rand(11, 7) * 200).astype(np.float32)


@pytest.mark.parametrize("ext,dtype,make", [
    (".fvecs", "<f4", _vecs_bytes), (".ivecs", "<i4", _vecs_bytes), (".bvecs", "u1", _vecs_bytes),
    (".fbin", "<f4", _bin_bytes), (".ibin", "<i4", _bin_bytes), (".u8bin", "u1", _bin_bytes),
])
@pytest.mark.parametrize("mmap", [True, False])
def test_read_formats(tmp_path, small, ext, dtype, make, mmap):
    x = small.astype(dtype)
    path = tmp_path / f"v{ext}"
    path.write_bytes(make(x, dtype))
    y = vecs_io.read_vectors(path, mmap=mmap)
    assert y.shape == (11, 7) and y.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(y, x)
    assert vecs_io.vectors_shape(path) == (11, 7)
    # write_vectors produces the very same bytes
    out = tmp_path / f"w{ext}"
    vecs_io.write_vectors(out, x)
    assert out.read_bytes() == path.read_bytes()


def test_npy_and_faiss_compat(tmp_path, small):
    vecs_io.write_vectors(tmp_path / "a.npy", small)
    m = vecs_io.read_vectors(tmp_path / "a.npy")
    assert isinstance(m, np.memmap)
    np.testing.assert_array_equal(m, small)
    faiss_vecs.fvecs_write(str(tmp_path / "f.fvecs"), small)
    np.testing.assert_array_equal(vecs_io.read_vectors(tmp_path / "f.fvecs"), small)
    codes = (small * 1000).astype(np.int64)
    vecs_io.write_vectors(tmp_path / "c.ivecs", codes)
    np.testing.assert_array_equal(faiss_vecs.ivecs_read(str(tmp_path / "c.ivecs")), codes)
    vecs_io.write_vectors(tmp_path / "b.bvecs", small.astype(np.uint8))
    np.testing.assert_array_equal(faiss_vecs.bvecs_mmap(str(tmp_path / "b.bvecs")), small.astype(np.uint8))


@pytest.mark.parametrize("ext,dtype,make,message", [
    (".fvecs", "<f4", _vecs_bytes, "truncated or not an fvecs file"),
    (".bvecs", "u1", _vecs_bytes, "truncated or not a bvecs file"),
    (".ivecs", "<i4", _vecs_bytes, "truncated or not an ivecs file"),
    (".fbin", "<f4", _bin_bytes, "truncated or not an fbin file"),
    (".u8bin", "u1", _bin_bytes, "truncated or not a u8bin file"),
])
def test_truncated_files(tmp_path, small, ext, dtype, make, message):
    path = tmp_path / f"t{ext}"
    path.write_bytes(make(small.astype(dtype), dtype)[:-3])
    with pytest.raises(ValueError, match=message) as e:
        vecs_io.read_vectors(path)
    assert str(path) in str(e.value)


def test_bad_files(tmp_path, small):
    with pytest.raises(FileNotFoundError, match="no such file"):
        vecs_io.read_vectors(tmp_path / "missing.fvecs")
    with pytest.raises(ValueError, match="unknown vector file extension '.txt'"):
        vecs_io.read_vectors(tmp_path / "x.txt")
    (tmp_path / "e.fvecs").write_bytes(b"")
    with pytest.raises(ValueError, match="empty file"):
        vecs_io.read_vectors(tmp_path / "e.fvecs")
    # a row header that disagrees with the first: caught when the file is read in full
    rows = _vecs_bytes(small[:4, :4], "<f4")
    bad = bytearray(rows)
    bad[20:24] = np.int32(5).tobytes()  # second row claims d=5
    (tmp_path / "m.fvecs").write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="rows of different dimensions"):
        vecs_io.read_vectors(tmp_path / "m.fvecs", mmap=False)
    # a .bin whose header does not match its size
    (tmp_path / "h.fbin").write_bytes(_bin_bytes(small, "<f4") + b"\0" * 4)
    with pytest.raises(ValueError, match="trailing bytes"):
        vecs_io.read_vectors(tmp_path / "h.fbin")
    np.save(tmp_path / "one.npy", np.zeros(5))
    with pytest.raises(ValueError, match="2-D"):
        vecs_io.read_vectors(tmp_path / "one.npy")


def test_write_refuses_lossy_conversion(tmp_path, small):
    with pytest.raises(ValueError, match="non-integer"):
        vecs_io.write_vectors(tmp_path / "a.bvecs", small)
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        vecs_io.write_vectors(tmp_path / "a.u8bin", np.full((2, 3), 300))
    with pytest.raises(ValueError, match="int32"):
        vecs_io.write_vectors(tmp_path / "a.ivecs", np.full((2, 3), 2**40))
    assert not list(tmp_path.iterdir())  # nothing half-written


# --------------------------------------------------------------------------------------
# packing
# --------------------------------------------------------------------------------------


def _random_codes(nbits, M, n=997, seed=0):
    rs = np.random.RandomState(seed)
    widths = nbits if isinstance(nbits, list) else [nbits] * M
    return np.stack([rs.randint(0, 2**b, size=n) for b in widths], axis=1)


@pytest.mark.parametrize("nbits,M", [(8, 8), (4, 5), (6, 7), (16, 3), ([6, 8, 8, 8], 4),
                                     ([10, 3, 8, 1, 7], 5), (12, 4), ([16, 8, 24], 3)])
def test_pack_matches_faiss(nbits, M):
    codes = _random_codes(nbits, M)
    packed = packing.pack_codes(codes, nbits)
    expected = faiss.pack_bitstrings(codes.astype(np.int32), nbits)
    assert packed.dtype == np.uint8
    np.testing.assert_array_equal(packed, expected)
    np.testing.assert_array_equal(packing.unpack_codes(packed, None, nbits, M=M), codes)
    faiss_unpacked = (faiss.unpack_bitstrings(expected, nbits) if isinstance(nbits, list)
                      else faiss.unpack_bitstrings(expected, M, nbits))
    np.testing.assert_array_equal(packing.unpack_codes(expected, len(codes), nbits, M=M), faiss_unpacked)
    # flat bytes, as read from a raw file
    np.testing.assert_array_equal(packing.unpack_codes(packed.ravel(), len(codes), nbits, M=M), codes)


def test_pack_sizes_and_errors():
    codes = _random_codes(8, 8, n=10_000)
    assert packing.pack_codes(codes, 8).nbytes == 80_000  # 8 x 8-bit codes of 10k vectors
    assert packing.code_nbits([1024, 256, 256]) == [10, 8, 8]
    assert packing.code_size([6, 8, 8, 8, 8]) == 5
    with pytest.raises(ValueError, match="column 1 has values outside"):
        packing.pack_codes(np.array([[0, 16]]), 4)
    with pytest.raises(ValueError, match="3 bit widths given for 2"):
        packing.pack_codes(np.zeros((3, 2), int), [4, 4, 4])
    with pytest.raises(ValueError, match="not a whole number"):
        packing.unpack_codes(np.zeros(7, np.uint8), None, 8, M=2)
    with pytest.raises(ValueError, match="expected 5 packed codes"):
        packing.unpack_codes(np.zeros(8, np.uint8), 5, 8, M=2)


# --------------------------------------------------------------------------------------
# data sets
# --------------------------------------------------------------------------------------


def test_synthetic_is_the_fixture_mixture_and_deterministic():
    # the fixtures' training vectors are mixture(12000)[:9000]
    np.testing.assert_array_equal(datasets.gaussian_mixture(12_000)[:9_000], np.load(FIXTURES / "train_xt.npy"))
    ds = datasets.get_dataset("synthetic_small")
    assert (ds.d, ds.nt, ds.nb, ds.nq) == (32, 5_000, 2_000, 100)
    fresh = datasets.SyntheticDataset(5_000, 2_000, 100)
    for get in ("get_train", "get_database", "get_queries"):
        np.testing.assert_array_equal(getattr(ds, get)(), getattr(fresh, get)())
    assert ds.get_train().dtype == np.float32 and ds.get_train(10).shape == (10, 32)
    assert ds.get_database().min() >= 0
    other = datasets.SyntheticDataset(5_000, 2_000, 100, seed=1)
    assert not np.array_equal(other.get_database(), ds.get_database())
    with pytest.raises(ValueError, match="asked for 6000"):
        ds.get_train(6_000)


def test_synthetic_groundtruth_is_exact():
    ds = datasets.get_dataset("synthetic_small")
    gt = ds.get_groundtruth()
    assert gt.shape == (100, 100)
    xq, xb = ds.get_queries(), ds.get_database()
    d2 = ((xq[:, None, :].astype(np.float64) - xb[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(gt[:, 0], d2.argmin(1))
    assert ds.get_groundtruth(k=10).shape == (100, 10)
    with pytest.raises(ValueError, match="only 100"):
        ds.get_groundtruth(k=101)


def test_reference_dataset_missing_files_say_where(tmp_path, monkeypatch):
    monkeypatch.setenv("QINCO_DATA", str(tmp_path))
    ds = datasets.get_dataset("bigann1M")
    assert (ds.d, ds.nb, ds.nq) == (128, 10**6, 10_000)
    with pytest.raises(FileNotFoundError) as e:
        ds.get_queries()
    assert str(tmp_path / "bigann" / "bigann_query.bvecs") in str(e.value)
    assert "corpus-texmex" in str(e.value) and "QINCO_DATA" in str(e.value)
    with pytest.raises(FileNotFoundError, match="idx_10M.ivecs"):
        datasets.get_dataset("bigann10M").get_groundtruth()
    with pytest.raises(FileNotFoundError, match="deep1b/learn.fvecs"):
        datasets.get_dataset("deep1M").get_train(10)
    with pytest.raises(FileNotFoundError, match="fb_ssnpp/database1M.npy"):
        datasets.get_dataset("FB_ssnpp1M").get_database()
    with pytest.raises(ValueError, match="unknown data set 'sift2M'"):
        datasets.get_dataset("sift2M")
    with pytest.raises(ValueError, match="bigann sizes"):
        datasets.get_dataset("bigann3M")


def test_reference_layouts(tmp_path, monkeypatch):
    monkeypatch.setenv("QINCO_DATA", str(tmp_path))
    rs = np.random.RandomState(0)
    big = tmp_path / "bigann"
    (big / "gnd").mkdir(parents=True)
    xq = rs.randint(0, 256, size=(5, 128)).astype(np.uint8)
    vecs_io.write_vectors(big / "bigann_query.bvecs", xq)
    vecs_io.write_vectors(big / "bigann_base.bvecs", xq[:3])
    vecs_io.write_vectors(big / "bigann_learn.bvecs", xq[:4])
    vecs_io.write_vectors(big / "gnd" / "idx_1M.ivecs", rs.randint(0, 10**6, size=(5, 1000)))
    ds = datasets.get_dataset("bigann1M")
    q = ds.get_queries()
    assert q.dtype == np.float32 and q.shape == (5, 128)
    np.testing.assert_array_equal(q, xq)
    assert ds.get_groundtruth(k=100).shape == (5, 100)
    assert ds.nt == 4 and ds.get_train().shape == (4, 128)
    with pytest.raises(ValueError, match="holds only 3"):  # a partial download
        ds.get_database()
    cont = tmp_path / "contriever"
    cont.mkdir()
    np.save(cont / "queries.npy", rs.rand(4, 768).astype(np.float16))
    q = datasets.get_dataset("Contriever1M").get_queries()
    assert q.dtype == np.float32 and q.shape == (4, 768)


def test_folder_dataset(tmp_path):
    data = datasets.gaussian_mixture(700, d=8, seed=2)
    vecs_io.write_vectors(tmp_path / "learn.fvecs", data[:400])
    vecs_io.write_vectors(tmp_path / "base.npy", data[400:680])
    vecs_io.write_vectors(tmp_path / "query.fbin", data[680:])
    ds = datasets.get_dataset(str(tmp_path))
    assert (ds.d, ds.nt, ds.nb, ds.nq) == (8, 400, 280, 20)
    np.testing.assert_array_equal(ds.get_train(), data[:400])
    gt = ds.get_groundtruth()  # none on disk: computed exactly
    np.testing.assert_array_equal(gt[:, 0], ((data[680:, None] - data[None, 400:680]) ** 2).sum(-1).argmin(1))
    vecs_io.write_vectors(tmp_path / "gt.ivecs", gt[:, :10][:, ::-1])
    np.testing.assert_array_equal(datasets.get_dataset(tmp_path).get_groundtruth(), gt[:, :10][:, ::-1])
    vecs_io.write_vectors(tmp_path / "base.fvecs", data[:3])
    with pytest.raises(ValueError, match="several base files"):
        datasets.get_dataset(tmp_path)
    (tmp_path / "base.fvecs").unlink()
    vecs_io.write_vectors(tmp_path / "query.fbin", data[680:, :4])
    with pytest.raises(ValueError, match="dimension 4"):
        datasets.get_dataset(tmp_path)
    (tmp_path / "query.fbin").unlink()
    with pytest.raises(FileNotFoundError, match="no query vectors"):
        datasets.get_dataset(tmp_path)


def test_code_files_raw_or_vectors_are_read_and_checked(tmp_path):
    from qinco_jax.formats.checkpoint import load_model

    model = load_model(FIXTURES / "ivf_qinco_d32_IVF64_M4_K256_L1_h32.pt")
    codes = np.load(FIXTURES / "reference_outputs.npz")["ivf_qinco_codes"]
    np.save(tmp_path / "c.npy", codes)
    packing.pack_codes(codes, packing.code_nbits(model.code_sizes)).tofile(tmp_path / "c.raw")
    for name in ("c.npy", "c.raw"):
        assert packing.count_codes_file(tmp_path / name, model) == len(codes)
        np.testing.assert_array_equal(packing.read_codes_file(tmp_path / name, model), codes)
    np.save(tmp_path / "narrow.npy", codes[:, :3])
    with pytest.raises(ValueError, match="3 columns.*5 columns"):
        packing.read_codes_file(tmp_path / "narrow.npy", model)
    np.save(tmp_path / "float.npy", codes.astype(np.float32))
    with pytest.raises(ValueError, match="not integer codes"):
        packing.read_codes_file(tmp_path / "float.npy", model)
    with pytest.raises(FileNotFoundError, match="no such file"):
        packing.count_codes_file(tmp_path / "missing.raw", model)


def test_ivf_centroid_files_are_read_and_checked(tmp_path):
    from qinco_jax.data import training_set

    c = np.arange(24, dtype=np.float64).reshape(6, 4)
    np.save(tmp_path / "c.npy", c)
    got = training_set.read_ivf_centroids(tmp_path / "c.npy", d=4, count=6)
    assert got.dtype == np.float32 and np.array_equal(got, c)
    with pytest.raises(ValueError, match="dimension must be the training vectors' d=8"):
        training_set.read_ivf_centroids(tmp_path / "c.npy", d=8)
    with pytest.raises(ValueError, match="hold 6 centroids, 5 expected"):
        training_set.read_ivf_centroids(tmp_path / "c.npy", count=5)
    with pytest.raises(FileNotFoundError, match="nope.npy"):
        training_set.read_ivf_centroids(tmp_path / "nope.npy")
    c[2, 1] = np.nan
    np.save(tmp_path / "nan.npy", c)
    with pytest.raises(ValueError, match="nan.npy"):
        training_set.read_ivf_centroids(tmp_path / "nan.npy")
    np.save(tmp_path / "flat.npy", np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="flat.npy.*2-D"):
        training_set.read_ivf_centroids(tmp_path / "flat.npy")


def test_training_split_and_concatenated_rows(tmp_path):
    from qinco_jax.data import training_set

    x = np.arange(40, dtype=np.float32).reshape(20, 2)
    np.save(tmp_path / "x.npy", x)
    xt, xval = training_set.read_training_split(tmp_path / "x.npy", valset=5, trainset=8)
    assert np.array_equal(xt, x[:8]) and np.array_equal(xval, x[15:])
    with pytest.raises(ValueError, match=r"x.npy: ds.valset=11 is more than half"):
        training_set.read_training_split(tmp_path / "x.npy", valset=11)
    rows = training_set.ConcatenatedRows(xt, xval)
    assert rows.shape == (13, 2) and len(rows) == 13
    assert np.array_equal(rows[6:10], np.concatenate([x[6:8], x[15:17]]))
    assert np.array_equal(rows[0:13], np.concatenate([x[:8], x[15:]])) and rows[13:20].shape == (0, 2)
