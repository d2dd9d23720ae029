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


@pytest.fixture(scope="module")
def ivf_start():
    """Fixture IVF data (d=32, 64 centroids) and an untrained IVF-QINCo model on them."""
    from qinco_jax.config import QincoConfig
    from qinco_jax.models.qinco import QincoModel

    x = np.load(FIX / "ivf_xt.npy")[:1200]
    centroids = np.load(FIX / "ivf_centroids_64.npy")
    config = QincoConfig(d=32, K=16, M=2, L=1, h=16, variant="ivf", K_IVF=64, db_scale=float(x.max()))
    return x, centroids, QincoModel.init(config, 0, codebook0=centroids / np.float32(config.db_scale))


def test_ivf_assignment_per_batch_trains_as_the_explicit_array(ivf_start):
    """IVF-QINCo's code0 computed from the rows each batch reads (rq_init.CentroidAssignment,
    what train_model and continue_training pass) trains the model that the explicit
    per-row array trains."""
    from qinco_jax.training import rq_init

    x, centroids, start = ivf_start
    xt, xval = x[:1024], x[1024:]
    explicit = rq_init.assign_to_centroids(xt, centroids)
    lazy = rq_init.CentroidAssignment(centroids)
    rows = np.random.RandomState(0).permutation(len(xt))[:256]
    np.testing.assert_array_equal(lazy(xt[rows]), explicit[rows])
    cfg = training.TrainConfig(lr=1e-3, batch_size=256, max_epochs=1, ngpu=1, progress=False)
    per_batch, from_array = (training.fit(start, xt, xval, cfg, code0=c0, log=quiet) for c0 in (lazy, explicit))
    assert per_batch.history["epochs"][0]["val_mse"] < per_batch.history["before"]
    np.testing.assert_allclose(per_batch.history["epochs"][0]["val_mse"], from_array.history["epochs"][0]["val_mse"],
                               rtol=1e-6)
    for u, v in zip(jax.tree.leaves(per_batch.last.params), jax.tree.leaves(from_array.last.params)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="dimension 31"):
        training.fit(start, xt, xval, cfg, code0=rq_init.CentroidAssignment(centroids[:, :31]), log=quiet)


def test_continue_training_assigns_ivf_batches_as_read(ivf_start, monkeypatch):
    """Continuing an IVF model's training passes fit the per-batch assignment to the
    model's own centroids, not an array of every row's."""
    from qinco_jax.training import finetune, rq_init

    x, centroids, model = ivf_start
    seen = {}
    monkeypatch.setattr(training, "fit", lambda *a, code0=None, **k: seen.setdefault("code0", code0))
    finetune.continue_training(model, x[:1000], x[1000:], training.TrainConfig(batch_size=100, ngpu=1))
    assert isinstance(seen["code0"], rq_init.CentroidAssignment)
    np.testing.assert_allclose(seen["code0"].centroids, centroids, rtol=1e-6)
    np.testing.assert_array_equal(seen["code0"](x[:512]), rq_init.assign_to_centroids(x[:512], centroids))


def test_ivf_training_keeps_no_per_row_array(tmp_path, monkeypatch):
    """IVF training on a memory-mapped file of 12M rows (uint8, d=4: 48 MB) allocates no
    array with an entry per row: numpy's peak allocation (tracemalloc) over train_model
    (statistics, RQ initialisation, the input checks and a batch read by fit's feeder;
    not the training steps, which only repeat the batch read) stays below the 48 MB that
    the IVF assignment alone took when computed for every row up front."""
    import tracemalloc

    from qinco_jax.training import rq_init

    n, d = 12_000_000, 4
    path = tmp_path / "x.u8bin"
    raw = np.memmap(path, dtype=np.uint8, mode="w+", shape=(8 + n * d,))
    raw[:8] = np.frombuffer(np.array([n, d], np.int32).tobytes(), np.uint8)
    raw[8:] = np.random.RandomState(0).randint(0, 256, n * d, dtype=np.uint8)
    raw.flush()
    del raw
    x = read_vectors(path)
    assert isinstance(x, np.memmap) and x.shape == (n, d)
    centroids = np.random.RandomState(1).uniform(0, 255, (16, d)).astype(np.float32)
    spec = recipe.ModelSpec(arch="qinco2", M=2, K=16, L=1, h=8, A=0, B=1, variant="ivf", seed=0)
    cfg = training.qinco2_train_config(batch_size=256, epochs=1, stop_patience=0, epoch_size=512, ngpu=1,
                                       progress=False, max_epochs=1)
    seen = {}

    def fit_inputs(model, xt, xval, cfg, *, code0=None, **kwargs):  # fit up to its first batch
        xt, xval, code0 = training.check_inputs(model, xt, xval, code0, training.recipe_for(model.config, cfg))
        feeder = training.BatchFeeder(xt, code0, model.normalise, cfg.batch_size, training.make_mesh(cfg.ngpu))
        seen["code0"], seen["batch"] = code0, feeder.read(np.arange(n - 556, n - 300))

    monkeypatch.setattr(training, "fit", fit_inputs)
    tracemalloc.start()
    try:
        recipe.train_model(x[:n - 300], x[n - 300:], spec, cfg, ivf_centroids=centroids, log=quiet)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * n, f"numpy peak {peak / 2**20:.1f} MB: an array of 4 bytes per training row was allocated"
    assert isinstance(seen["code0"], rq_init.CentroidAssignment)
    rows = np.asarray(x[n - 556:n - 300], np.float32)
    np.testing.assert_array_equal(seen["batch"][1], rq_init.assign_to_centroids(rows, centroids))


def test_bad_training_files_leave_earlier_outputs_untouched(tmp_path, bvecs):
    """A training file whose size is not a whole number of rows, or too short, given to
    every training command (v1 train_qinco.py, run.py task=train and task=ivf_centroids):
    an error naming the file, and the output a previous run wrote is left as it was."""
    from qinco_jax import cli
    from qinco_jax.cli import run as run_cli
    from qinco_jax.cli import run_config
    from qinco_jax.cli import train as train_qinco

    x = np.asarray(read_vectors(bvecs))
    cut = tmp_path / "cut.bvecs"
    cut.write_bytes(Path(bvecs).read_bytes()[:-7])
    cut_fbin = tmp_path / "cut.fbin"
    write_vectors(cut_fbin, x.astype(np.float32))
    cut_fbin.write_bytes(cut_fbin.read_bytes()[:-3])
    short = tmp_path / "short.bvecs"
    write_vectors(short, x[:700])  # fewer than 300 + a batch of 512
    model, centroids = tmp_path / "model.pt", tmp_path / "centroids.npy"
    model.write_bytes(b"a model written before")
    centroids.write_bytes(b"centroids written before")
    for path, match in ((cut, r"cut\.bvecs.*not a multiple of the row size"), (cut_fbin, r"cut\.fbin.*truncated")):
        with pytest.raises(ValueError, match=match):
            train_qinco.main(["--training_data", str(path), "--nt", "1000", "--nval", "300", "--M", "2", "--K", "16",
                              "--model", str(model)])
        with pytest.raises((ValueError, run_config.RunConfigError), match=match):
            run_cli.main(["task=train", f"trainset={path}", "M=2", "K=16", "L=1", "dh=16", "A=0", "B=1", "batch=256",
                          "epochs=1", "ds.valset=300", "cpu=true", f"output={model}"])
        with pytest.raises((ValueError, run_config.RunConfigError), match=match):
            run_cli.main(["task=ivf_centroids", "ivf_K=4", f"trainset={path}", f"output={centroids}",
                          "ds.valset=300"])
    with pytest.raises(cli.UsageError, match=r"short\.bvecs.*300 validation vectors plus at least one batch"):
        train_qinco.main(["--training_data", str(short), "--nt", "100", "--nval", "300", "--M", "2", "--K", "16",
                          "--batch_size", "512", "--model", str(model)])
    with pytest.raises(run_config.RunConfigError, match=r"short\.bvecs.*300 validation vectors plus at least one"):
        run_cli.main(["task=train", f"trainset={short}", "M=2", "K=16", "L=1", "dh=16", "A=0", "B=1", "batch=512",
                      "epochs=1", "ds.valset=300", "cpu=true", f"output={model}"])
    assert model.read_bytes() == b"a model written before"
    assert centroids.read_bytes() == b"centroids written before"
