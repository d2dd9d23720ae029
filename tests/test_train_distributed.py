"""QINCo2 training on two processes (jax.distributed, one CPU device each, `batch` per
device) trains the model one process trains with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(tmp_path, name, n_proc, batch, loop=1024, extra=()):
    out = tmp_path / name / "m.pt"
    out.parent.mkdir(exist_ok=True)
    words = [f"trainset={tmp_path / 'x.npy'}", "M=3", "K=16", "L=1", "dh=32", "de=24", "A=4", "B=2",
             f"batch={batch}", "epochs=2", "scheduler.stop_patience=0", "ds.valset=300", f"ds.loop={loop}",
             "cpu=true", "lr=0.002", f"output={out}", *extra]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("QINCO_PROCESS", "SLURM_", "OMPI_", "JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROCESS"))}
    env.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    if n_proc > 1:
        env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{_free_port()}", JAX_NUM_PROCESSES=str(n_proc))
    cmd = [sys.executable, str(ROOT / "run.py"), "task=train", *words]
    procs = [subprocess.Popen(cmd, env={**env, "JAX_PROCESS_ID": str(i)} if n_proc > 1 else env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(n_proc)]
    return out, procs


def _train(tmp_path, name, n_proc, batch, loop=1024, extra=()):
    out, procs = _start(tmp_path, name, n_proc, batch, loop, extra)
    logs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * n_proc, logs
    history = json.loads((out.parent / "m.pt.history.json").read_text())
    return history, logs


# Epochs of 64 steps: long enough for the kill-and-resume test to kill the run in its middle.
LOOP = 16_384


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder holding x.npy: 2,000 training vectors then 300 validation vectors."""
    path = tmp_path_factory.mktemp("distributed")
    x = np.concatenate([np.load(FIX / "train_xt.npy")[:2000], np.load(FIX / "train_xval.npy")[:300]])
    np.save(path / "x.npy", x)
    return path


@pytest.fixture(scope="module")
def two_process_run(workdir):
    """The uninterrupted two-process run (batch 128 per device): trained once, the model
    both tests compare with (history, logs)."""
    return _train(workdir, "two", 2, 128, LOOP)


def test_two_processes_train_the_one_process_model(workdir, two_process_run):
    one, _ = _train(workdir, "one", 1, 256, LOOP)
    two, logs = two_process_run  # batch per device: the same global batch of 256
    assert "global batch 256 = batch 128 x 2" in logs[0]
    help_text = subprocess.run([sys.executable, str(ROOT / "run.py"), "--help"], capture_output=True, text=True,
                               env=dict(os.environ, PYTHONPATH=str(ROOT))).stdout
    assert "batch is per device" in help_text
    assert two["run"]["devices"] == 2 and one["run"]["devices"] == 1
    assert two["run"]["train"]["batch_size"] == one["run"]["train"]["batch_size"] == 256
    mse_one = [e["val_mse"] for e in one["epochs"]]
    mse_two = [e["val_mse"] for e in two["epochs"]]
    assert len(mse_one) == len(mse_two) == 3
    assert mse_two[-1] < two["before"]  # it trained
    np.testing.assert_allclose(mse_two, mse_one, rtol=0.01)


def test_two_processes_killed_and_resumed_train_the_uninterrupted_model(workdir, two_process_run):
    """Both processes killed once a checkpoint is on disk, then restarted with
    resume=true: the same validation curve as the uninterrupted two-process run."""
    import time

    full, _ = two_process_run
    out, procs = _start(workdir, "cut", 2, 128, LOOP)
    first = out.parent / "m.pt.checkpoint" / "0"
    deadline = time.time() + 400
    while not first.exists() and time.time() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    for p in procs:
        p.kill()
        p.communicate()
    assert first.exists(), "no checkpoint was written"
    resumed, logs = _train(workdir, "cut", 2, 128, LOOP, extra=["resume=true"])
    assert "resuming from checkpoint" in logs[0], logs[0][-3000:]
    assert " train loss " in logs[0], "killed too late: the resumed run had nothing left to train"
    assert [e["val_mse"] for e in resumed["epochs"]] == [e["val_mse"] for e in full["epochs"]]
