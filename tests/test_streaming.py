"""Training from files that stay on disk: the same model as from RAM, resident memory
independent of the file's size, and clear errors for files that cannot train."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from qinco_jax.formats.vecs_io import read_vectors, write_vectors
from qinco_jax.training import loop as training
from qinco_jax.training import recipe, streaming

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures"


def quiet(msg):
    pass


@pytest.fixture(scope="module")
def bvecs(tmp_path_factory):
    """2,300 uint8 vectors of dimension 32 in a .bvecs file (the fixture's, rescaled)."""
    x = np.concatenate([np.load(FIX / "train_xt.npy")[:2000], np.load(FIX / "train_xval.npy")[:300]])
    x = np.clip((x - x.min()) / (x.max() - x.min()) * 255, 0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("stream") / "x.bvecs"
    write_vectors(path, x)
    return path


def _assert_same_params(a, b):
    for (path, u), v in zip(jax.tree_util.tree_leaves_with_path(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v), err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("arch", ["qinco", "qinco2"])
def test_streaming_equals_in_ram_training(bvecs, arch):
    mapped = read_vectors(bvecs)  # uint8, on disk
    assert isinstance(mapped, np.memmap)
    in_ram = np.asarray(mapped, np.float32)
    if arch == "qinco":
        spec = recipe.ModelSpec(M=2, K=16, L=1, h=16, seed=0)
        cfg = training.TrainConfig(lr=1e-3, batch_size=256, max_epochs=2, ngpu=1, progress=False)
    else:
        spec = recipe.ModelSpec(arch="qinco2", M=2, K=16, L=1, h=16, de=24, A=4, B=2, seed=0)
        cfg = training.qinco2_train_config(batch_size=256, epochs=2, ramp_epochs=1, stop_patience=0,
                                           epoch_size=768, lr=2e-3, ngpu=1, progress=False)
    runs = []
    for x in (mapped, in_ram):
        runs.append(recipe.train_model(x[:2000], x[2000:], spec, cfg, log=quiet))
    streamed, ram = runs
    assert [e["val_mse"] for e in streamed.history["epochs"]] == [e["val_mse"] for e in ram.history["epochs"]]
    _assert_same_params(streamed.last, ram.last)
    _assert_same_params(streamed.best, ram.best)
    assert streamed.best.config == ram.best.config


def test_feeder_reads_only_the_batch_rows(bvecs):
    """A batch gathers its rows (float32) and leaves none of the file's pages mapped."""
    mapped = read_vectors(bvecs)
    rows = np.array([7, 3, 2000, 5])
    np.testing.assert_array_equal(streaming.gather(mapped, rows), np.asarray(mapped, np.float32)[rows])
    lo, hi = streaming.extremes(mapped, chunk_rows=100)
    assert (lo, hi) == (float(np.asarray(mapped).min()), float(np.asarray(mapped).max()))
    np.testing.assert_array_equal(streaming.head(mapped, 250, chunk_rows=100), np.asarray(mapped[:250], np.float32))


def test_prefetched_yields_in_order_and_stops_cleanly():
    mesh = training.make_mesh(1)
    x = np.arange(40 * 4, dtype=np.float32).reshape(40, 4)
    feeder = training.BatchFeeder(x, None, 1.0, 8, mesh)
    batches = training.epoch_batches(40, 8, 0)
    got = [np.asarray(xb) for xb, _, _ in training.prefetched(feeder, batches)]
    for b, idx in zip(got, batches):
        np.testing.assert_array_equal(b, x[idx])
    gen = training.prefetched(feeder, batches, depth=1)
    next(gen)
    gen.close()  # the reader thread ends with the consumer

    class Broken(training.BatchFeeder):
        def read(self, idx):
            raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(training.prefetched(Broken(x, None, 1.0, 8, mesh), batches))


def test_bad_training_files(tmp_path, bvecs):
    from qinco_jax.cli import qinco2_train, run_config
    from qinco_jax.cli import train as train_qinco
    from qinco_jax import cli

    words = ["M=2", "K=16", "L=1", "dh=16", "A=0", "B=1", "batch=512", "epochs=1", "ds.valset=300", "cpu=true",
             f"output={tmp_path / 'm.pt'}"]
    # shorter than the validation set plus one batch
    short = tmp_path / "short.bvecs"
    write_vectors(short, np.asarray(read_vectors(bvecs))[:700])
    with pytest.raises(run_config.RunConfigError, match=r"short\.bvecs.*300 validation vectors plus at least one batch"):
        qinco2_train.train(run_config.parse_run_args(["task=train", f"trainset={short}", *words]), log=quiet)
    with pytest.raises(cli.UsageError, match=r"short\.bvecs.*one batch of 1024"):
        train_qinco.main(["--training_data", str(short), "--nt", "100", "--nval", "300", "--M", "2", "--K", "16"])
    # a size that is not a whole number of rows
    cut = tmp_path / "cut.bvecs"
    cut.write_bytes(Path(bvecs).read_bytes()[:-7])
    with pytest.raises(ValueError, match=r"cut\.bvecs.*not a multiple of the row size"):
        qinco2_train.train(run_config.parse_run_args(["task=train", f"trainset={cut}", *words]), log=quiet)
    cut_bin = tmp_path / "cut.u8bin"
    write_vectors(cut_bin, np.asarray(read_vectors(bvecs)))
    cut_bin.write_bytes(cut_bin.read_bytes()[:-5])
    with pytest.raises(ValueError, match=r"cut\.u8bin.*truncated"):
        qinco2_train.train(run_config.parse_run_args(["task=train", f"trainset={cut_bin}", *words]), log=quiet)
    assert not (tmp_path / "m.pt").exists()


GENERATE_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    path, n, d = sys.argv[1], int(sys.argv[2]), 128
    rows = np.memmap(path, dtype=np.uint8, mode="w+", shape=(n, 4 + d))  # a bvecs row: int32 d, d bytes
    rs = np.random.RandomState(0)
    for i0 in range(0, n, 100_000):
        chunk = rows[i0:i0 + 100_000]
        chunk[:, :4] = np.frombuffer(np.int32(d).tobytes(), np.uint8)
        chunk[:, 4:] = rs.randint(0, 256, (len(chunk), d), dtype=np.uint8)
    rows.flush()
""")

RSS_SCRIPT = textwrap.dedent("""
    import json, sys
    from qinco_jax.formats.vecs_io import read_vectors
    from qinco_jax.training import loop as training, recipe

    x = read_vectors(sys.argv[1])
    n, nval = len(x), 1000
    spec = recipe.ModelSpec(arch="qinco2", M=2, K=16, L=1, h=32, A=0, B=1, seed=0)
    cfg = training.qinco2_train_config(batch_size=512, epochs=1, stop_patience=0, epoch_size=4096, ngpu=1,
                                       progress=False, max_epochs=1)
    res = recipe.train_model(x[:n - nval], x[n - nval:], spec, cfg, log=lambda m: None)
    # VmHWM: this process image's peak (ru_maxrss would keep the forking parent's, i.e.
    # pytest's own size late in a run, across exec)
    peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"peak_kb": peak, "epochs": len(res.history["epochs"])}))
""")


def _peak_rss(tmp_path, n):
    path = tmp_path / f"x{n}.bvecs"
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", GENERATE_SCRIPT, str(path), str(n)], check=True, timeout=300)
    try:  # trained by a process of its own: its peak counts the training alone
        out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(path)], env=env, capture_output=True, text=True,
                             timeout=600)
    finally:
        path.unlink()
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_resident_memory_does_not_grow_with_the_file(tmp_path):
    """QINCo2 training (a small model, epochs of 4,096 rows) on a 3M-row uint8 file: the
    file is 396 MB, 1.5 GB as float32 in RAM; the peak resident memory stays within
    64 MB of the same run on a 150k-row file (whose statistics sample is as large)."""
    small = _peak_rss(tmp_path, 150_000)
    big = _peak_rss(tmp_path, 3_000_000)
    assert small["epochs"] == big["epochs"] == 1
    grown_mb = (big["peak_kb"] - small["peak_kb"]) / 1024
    print(f"peak RSS: 150k rows {small['peak_kb'] / 1024:.0f} MB, 3M rows {big['peak_kb'] / 1024:.0f} MB")
    assert grown_mb < 64, (small, big)
    assert big["peak_kb"] / 1024 < 1500  # below the in-RAM float32 copy alone


def test_kmeans_sample_gives_faiss_s_centroids(bvecs):
    """ivf_centroids reads only faiss's own subsample of the file: the same centroids."""
    import faiss

    from qinco_jax.search.index import train_ivf_centroids

    mapped = read_vectors(bvecs)  # 2,300 rows: k=4 samples 1,024 of them
    for n, m in ((50_000, 1024), (3000, 1024), (100, 100)):  # the O(m) shuffle and faiss's own
        perm = np.empty(n, np.int32)
        faiss.rand_perm(faiss.swig_ptr(perm), n, 1234)
        np.testing.assert_array_equal(streaming.faiss_permutation_prefix(n, m, 1234), perm[:m])
    sample = streaming.kmeans_sample(mapped, 4)
    assert sample.shape == (1024, 32) and sample.dtype == np.float32
    full = train_ivf_centroids(np.asarray(mapped, np.float32), 4, niter=5, verbose=False)
    np.testing.assert_array_equal(train_ivf_centroids(sample, 4, niter=5, verbose=False), full)
    assert len(streaming.kmeans_sample(mapped, 16)) == len(mapped)  # 16 x 256 > 2,300: all rows


def test_pq_qinco_streams_its_rotated_sub_vectors(bvecs):
    """train_pq on a memory map == OPQ on the whole set, rotated and split in RAM, one
    train_model per part: each sub-model reads its rotated rows batch by batch."""
    import faiss

    from qinco_jax.training import pq

    mapped = read_vectors(bvecs)
    xt, xval = mapped[:2000], np.asarray(mapped[2000:], np.float32)
    sub = recipe.ModelSpec(M=2, K=16, L=1, h=8, seed=0)
    cfg = training.TrainConfig(lr=1e-3, batch_size=256, max_epochs=1, ngpu=1, progress=False)
    model = pq.train_pq(xt, xval, pq.PQSpec(nsub=2, opq=True, sub=sub), cfg, log=quiet)
    in_ram = np.asarray(xt, np.float32)
    A = pq.train_opq(in_ram, 2)
    np.testing.assert_array_equal(model.opq, A)
    rotated_t, rotated_v = pq.split_subvectors(in_ram @ A.T, 2), pq.split_subvectors(xval @ A.T, 2)
    for got, xs_t, xs_v in zip(model.subs, rotated_t, rotated_v):
        _assert_same_params(got, recipe.train_model(xs_t, xs_v, sub, cfg, log=quiet).best)
    # the sample OPQ trains on is faiss's own subsample
    x = np.asarray(mapped, np.float32)
    full, sampled = faiss.OPQMatrix(32, 2, 32), faiss.OPQMatrix(32, 2, 32)
    full.max_train_points = sampled.max_train_points = 1000
    # a few iterations: enough for another sample to give another matrix (the defaults, 50
    # OPQ iterations of 40 k-means ones first, cost seconds and compare the same samples)
    full.niter = sampled.niter = 2
    full.niter_pq_0 = sampled.niter_pq_0 = 4
    full.train(x)
    sampled.train(streaming.faiss_sample(mapped, 1000))
    np.testing.assert_array_equal(faiss.vector_to_array(full.A), faiss.vector_to_array(sampled.A))
