"""QINCo2's `run.py task=...` command line: the QINCo2 README's eval / encode /
ivf_centroids commands on tiny fixture data, the encode output format (header + parts)
and its multi-process split, and the errors."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from qinco_jax import distributed
from qinco_jax.formats import checkpoint
from qinco_jax.formats import code_parts
from qinco_jax.models import codec
from qinco_jax.formats import vecs_io
from qinco_jax.cli import run as run_cli
from qinco_jax.cli.run_config import RunConfigError, parse_run_args

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures"
Q2 = FIX / "qinco2"
MODEL = str(Q2 / "qinco2_d32_M4_K256_L2_de48_dh64_A8_B8.pt")
IVF_MODEL = str(Q2 / "ivf_qinco2_d32_IVF64_M4_K256_L2_de48_dh64_A8_B8.pt")
Q1_MODEL = str(Q2 / "qinco2_qinco1mode_d32_M4_K256_L2_dh64.pt")


@pytest.fixture(scope="module")
def ref():
    with np.load(Q2 / "reference_outputs_qinco2.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def data(tmp_path_factory, ref):
    """QINCO_DATA with a tiny deep1b/ (base = the 500 reference test vectors, learn =
    20,000 training vectors: the default ds.valset=10_000 leaves 10,000 to train), plus
    the same vectors as plain files."""
    root = tmp_path_factory.mktemp("qinco_data")
    learn = np.load(FIX / "ivf_xt.npy")[:20_000]
    vecs_io.write_vectors(root / "deep1b" / "base.fvecs", ref["x"])
    vecs_io.write_vectors(root / "deep1b" / "learn.fvecs", learn)
    np.save(root / "x.npy", ref["x"])
    np.save(root / "learn.npy", learn)
    return root


@pytest.fixture
def qinco_data(data, monkeypatch):
    monkeypatch.setenv("QINCO_DATA", str(data))
    monkeypatch.delenv(distributed.PROCESS_INDEX_ENV, raising=False)
    monkeypatch.delenv(distributed.PROCESS_COUNT_ENV, raising=False)
    return data


def run(command: str):
    """A README command line (after `python run.py`) through run.py's main."""
    return run_cli.main(command.split())


# --------------------------------------------------------------------------------------
# eval
# --------------------------------------------------------------------------------------


def test_eval_readme_command_named_db_with_beam_override(qinco_data, ref):
    # README: task=eval model=models/qinco2_L-bigann1M-8x8.pt db=bigann1M A=32 B=64
    out = run(f"cpu=true task=eval model={MODEL} db=deep1M A=16 B=16")
    assert (out["A"], out["B"], out["n"]) == (16, 16, 500)
    assert out["mse"] == pytest.approx(float(ref["qinco2_A16_B16_mse"]), rel=1e-3)


def test_eval_readme_command_custom_file_model_defaults_and_limit(qinco_data, ref):
    # README: task=eval model=my_super_small_model-my_dataset-8x8.pt db=my_dataset-db.fvecs ds.db=100_000
    out = run(f"task=eval model={MODEL} db={qinco_data / 'x.npy'} ds.db=100_000")
    assert (out["A"], out["B"]) == (8, 8)  # the model's own
    assert out["mse"] == pytest.approx(float(ref["qinco2_A8_B8_mse"]), rel=1e-3)
    few = run(f"task=eval model={MODEL} db={qinco_data / 'x.npy'} ds.db=100 A=4 B=1 mse_scale=0.5")
    x = ref["x"][:100]
    xhat = codec.decode(checkpoint.load_model(MODEL), ref["qinco2_A4_B1_codes"][:100])
    assert few["n"] == 100
    assert few["mse"] == pytest.approx(0.5 * float(np.mean(np.sum((x - xhat) ** 2, 1))), rel=1e-3)


def test_eval_refuses_keys_that_contradict_the_model(qinco_data):
    with pytest.raises(RunConfigError, match="M=8 given, but model=.* has M=4"):
        run(f"task=eval model={MODEL} db={qinco_data / 'x.npy'} M=8")
    # the presets set ivf_K for every model; the reference reads it for IVF models only
    assert run(f"task=eval model={MODEL} db={qinco_data / 'x.npy'} ds.db=10 ivf_K=1048576")["n"] == 10
    with pytest.raises(RunConfigError, match="trained with A=0"):
        run(f"task=eval model={Q1_MODEL} db={qinco_data / 'x.npy'} A=4")


# --------------------------------------------------------------------------------------
# encode
# --------------------------------------------------------------------------------------


def _assert_reference_format(path: Path, n_parts: int, width: int):
    """The files the reference's EncodeDBTask writes (names, keys, dtypes, compression)."""
    with np.load(path) as z:
        assert sorted(z.files) == ["D", "K", "M", "n_parts"]
        assert all(z[k].shape == () and z[k].dtype == np.int64 for k in z.files)
        assert int(z["n_parts"]) == n_parts
    for i in range(n_parts):
        p = path.with_name(f"{path.stem}.part_{i}.npz")
        with zipfile.ZipFile(p) as zf:
            assert [info.compress_type for info in zf.infolist()] == [zipfile.ZIP_DEFLATED]
        with np.load(p) as z:
            assert z.files == ["codes"] and z["codes"].dtype == np.int64 and z["codes"].shape[1] == width
    assert not list(path.parent.glob(".*tmp*")), "temporary files left behind"


def test_encode_readme_commands_ivf_model_named_db(qinco_data, ref, tmp_path):
    # README: task=encode db=deep1B model=models/IVF-qinco2_S-deep1B-8x8.pt output=..._db.npz
    out = tmp_path / "encoded_db" / "IVF-qinco2-deep1B_db.npz"
    run(f"task=encode db=deep1B model={IVF_MODEL} output={out}")
    _assert_reference_format(out, 1, 5)
    header = code_parts.read_code_header(out)
    assert (header.n_parts, header.K, header.M, header.D) == (1, 256, 4, 32)
    codes = code_parts.read_codes(out)
    expected = codec.encode(checkpoint.load_model(IVF_MODEL), ref["x"])
    np.testing.assert_array_equal(codes, expected)
    assert np.mean(np.all(codes == ref["ivf_qinco2_A8_B8_codes"], axis=1)) >= 0.99


def test_encode_custom_file_matches_the_reference_encode_task(qinco_data, ref, tmp_path):
    # README: task=encode db=my_dataset-db.fvecs model=my-custom-IVF-model.pt output=my_encoded_db.npz
    out = tmp_path / "my_encoded_db.npz"
    run(f"task=encode db={FIX / 'ivf_xb.npy'} model={IVF_MODEL} output={out} enc_max_bs=4096")  # 3 batches
    codes = code_parts.read_codes(out)
    assert codes.shape == (10_000, 5)
    assert np.mean(np.all(codes == ref["ivf_qinco2_xb_codes"], axis=1)) >= 0.99  # the reference's own encode task


def test_encode_trainset_is_training_then_validation_vectors(qinco_data, tmp_path):
    # README: task=encode db=deep1B encode_trainset=true model=... output=..._trainset.npz
    out = tmp_path / "trainset.npz"
    run(f"task=encode db=deep1B encode_trainset=true model={Q1_MODEL} output={out}")
    learn = np.load(qinco_data / "learn.npy")  # 10,000 train + the last 10,000 (validation), in order
    rows = np.r_[0:300, 20_000 - 200:20_000]  # encoding is row by row: check these rows only
    expected = codec.encode(checkpoint.load_model(Q1_MODEL), learn[rows])
    codes = code_parts.read_codes(out)
    assert codes.shape == (20_000, 4)
    np.testing.assert_array_equal(codes[rows], expected)
    out2 = tmp_path / "trainset_small.npz"
    run(f"task=encode db=deep1B encode_trainset=true model={Q1_MODEL} output={out2} ds.trainset=300 ds.valset=200")
    np.testing.assert_array_equal(code_parts.read_codes(out2), expected)


def test_two_process_encode_writes_two_parts_that_assemble_to_one(qinco_data, tmp_path, monkeypatch):
    db = qinco_data / "x.npy"
    one = tmp_path / "one.npz"
    run(f"task=encode db={db} model={MODEL} output={one} A=4 B=2")
    two = tmp_path / "two.npz"
    for i in (1, 0):  # any order: each process writes its part, process 0 the header
        monkeypatch.setenv(distributed.PROCESS_INDEX_ENV, str(i))
        monkeypatch.setenv(distributed.PROCESS_COUNT_ENV, "2")
        run(f"task=encode db={db} model={MODEL} output={two} A=4 B=2")
    _assert_reference_format(two, 2, 4)
    sizes = [len(code_parts._part_codes(two, i)) for i in range(2)]
    assert sizes == [250, 250]
    np.testing.assert_array_equal(code_parts.read_codes(two), code_parts.read_codes(one))
    monkeypatch.setenv(distributed.PROCESS_INDEX_ENV, "2")
    with pytest.raises(RunConfigError, match="must lie in"):
        run(f"task=encode db={db} model={MODEL} output={two}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_encode_on_two_jax_distributed_processes(qinco_data, tmp_path):
    """Two processes joined by jax.distributed (a coordinator address, as a launcher
    gives): each writes its part, process 0 the header after both are written."""
    import os

    out = tmp_path / "dist.npz"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QINCO_PROCESS", "SLURM_", "OMPI_"))}
    env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{_free_port()}", JAX_NUM_PROCESSES="2", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(ROOT / "run.py"), "cpu=true", "task=encode", f"db={qinco_data / 'x.npy'}",
           f"model={Q1_MODEL}", f"output={out}", "ds.db=101"]
    procs = [subprocess.Popen(cmd, env={**env, "JAX_PROCESS_ID": str(i)}, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert "using 2 process(es)" in logs[0]
    _assert_reference_format(out, 2, 4)
    assert [len(code_parts._part_codes(out, i)) for i in range(2)] == [50, 51]
    x = np.load(qinco_data / "x.npy")[:101]
    np.testing.assert_array_equal(code_parts.read_codes(out), codec.encode(checkpoint.load_model(Q1_MODEL), x))


def test_code_parts_round_trip_split_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, size=(11, 3))
    path = tmp_path / "c.npz"
    code_parts.write_code_parts(path, codes, K=16, M=3, D=8, n_parts=3)
    assert [code_parts.part_rows(11, 3, i) for i in range(3)] == [(0, 3), (3, 6), (6, 11)]
    np.testing.assert_array_equal(code_parts.read_codes(path), codes)
    np.save(tmp_path / "c.npy", codes.astype(np.int32))
    np.testing.assert_array_equal(code_parts.read_codes(tmp_path / "c.npy"), codes)
    code_parts.part_path(path, 2).unlink()
    with pytest.raises(code_parts.CodeFileError, match=r"c.part_2.npz not found"):
        code_parts.read_codes(path)
    code_parts.write_code_parts(path, codes, K=8, M=3, D=8)  # codes >= K
    with pytest.raises(code_parts.CodeFileError, match="outside"):
        code_parts.read_codes(path)
    with pytest.raises(code_parts.CodeFileError, match="name it"):
        code_parts.write_code_parts(tmp_path / "c.bin", codes, K=16, M=3, D=8)


# --------------------------------------------------------------------------------------
# ivf_centroids, convert
# --------------------------------------------------------------------------------------


def test_ivf_centroids_readme_command(qinco_data, tmp_path):
    # README: task=ivf_centroids ivf_K=700 trainset=my_dataset-trainset.fvecs output=.../ivf_centroids-....npy
    out = tmp_path / "ivf_centroids" / "ivf_centroids-my_dataset-K=64.npy"
    run(f"task=ivf_centroids ivf_K=64 trainset={qinco_data / 'learn.npy'} output={out} verbose=false")
    c = np.load(out)
    assert c.shape == (64, 32) and c.dtype == np.float32
    xt = np.load(qinco_data / "learn.npy")[:10_000]  # the last ds.valset=10_000 rows are left out

    def quantisation_mse(centroids):
        d = ((xt[:, None, :] - centroids[None]) ** 2).sum(-1)
        return d.min(1).mean()

    assert quantisation_mse(c) < 0.8 * quantisation_mse(xt[:64])


def test_convert_writes_the_model_in_another_format(tmp_path):
    out = tmp_path / "converted"
    run(f"task=convert model={MODEL} output={out}")
    back = tmp_path / "back.pt"
    run(f"task=convert model={out} output={back}")
    a, b = checkpoint.load_model(MODEL), checkpoint.load_model(back)
    assert a.config == b.config
    x = np.load(FIX / "train_xval.npy")[:50]
    np.testing.assert_array_equal(codec.encode(a, x), codec.encode(b, x))


# --------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------


def test_unknown_key_task_or_module_is_a_clear_error(monkeypatch):
    with pytest.raises(RunConfigError, match="unknown key 'modle'"):
        run(f"task=eval modle={MODEL}")
    with pytest.raises(RunConfigError, match="unknown task 'evaluate'"):
        run("task=evaluate")
    with pytest.raises(RunConfigError, match="task is required"):
        run(f"model={MODEL}")
    monkeypatch.setitem(run_cli.TASK_MODULES, "train", "qinco_jax.cli.no_such_module")
    with pytest.raises(RunConfigError, match="task=train is not available: its module qinco_jax.cli.no_such_module"):
        run("task=train")
    monkeypatch.setitem(run_cli.TASK_MODULES, "train", "qinco_jax.cli.qinco2_tasks")
    with pytest.raises(RunConfigError, match="defines no train"):
        run("task=train")


def test_task_modules_define_only_their_tasks():
    mine = [t for t, m in run_cli.TASK_MODULES.items() if m == "qinco_jax.cli.qinco2_tasks"]
    assert all(callable(run_cli.task_function(t)) for t in mine)
    assert parse_run_args(["task=encode"]).task == "encode"


def test_run_py_at_the_root_runs_as_a_program(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "run.py"), "task=eval", "modle=x.pt"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 2 and "unknown key 'modle'" in out.stderr and "Traceback" not in out.stderr
    helped = subprocess.run([sys.executable, str(ROOT / "run.py"), "--help"], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120)
    assert helped.returncode == 0 and "ivf_centroids" in helped.stdout and "encode_trainset" in helped.stdout


def test_process_slot_from_the_environment(monkeypatch):
    monkeypatch.setenv(distributed.PROCESS_INDEX_ENV, "1")
    monkeypatch.delenv(distributed.PROCESS_COUNT_ENV, raising=False)
    with pytest.raises(ValueError, match="set both"):
        distributed.process_slot()
    monkeypatch.setenv(distributed.PROCESS_COUNT_ENV, "three")
    with pytest.raises(ValueError, match="must be integers"):
        distributed.process_slot()
    monkeypatch.setenv(distributed.PROCESS_COUNT_ENV, "3")
    assert distributed.process_slot() == distributed.ProcessSlot(1, 3, None)


def test_reconstruction_error_is_batch_independent_and_the_mean_squared_error():
    from qinco_jax.config import EncodeOptions
    from qinco_jax.experiments.evaluation import reconstruction_error
    from qinco_jax.metrics import mean_squared_error

    model = checkpoint.load_model(MODEL)
    x = np.load(FIX / "ivf_xb.npy")[:300]
    opts = EncodeOptions(beam=2, preselect=4)
    whole = reconstruction_error(model, x, opts, batch_size=1000)
    pieces = reconstruction_error(model, x, opts, batch_size=7)
    expected = mean_squared_error(x, codec.decode(model, codec.encode(model, x, opts)))
    assert whole.n == pieces.n == 300
    assert whole.mse == pytest.approx(expected, rel=1e-6) and pieces.mse == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match=r"needs \(n, 32\)"):
        reconstruction_error(model, x[:, :16], opts)
