"""The prepared GPU check (bench/device_check.py) in its smoke mode, so that it is known
to run before a GPU machine is lent: as there, without faiss."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The GPU machines have no faiss: hide it, then run the driver as its script does.
WITHOUT_FAISS = ("import runpy, sys; sys.modules['faiss'] = None; sys.argv = sys.argv[1:]; "
                 "runpy.run_path(sys.argv[0], run_name='__main__')")
TINY = ["--d", "16", "--M", "3", "--K", "16", "--L", "1", "--h", "16", "--k_ivf", "256",
        "--n_encode", "256", "--n_decode", "1024", "--train_batch", "64"]


def test_smoke_mode_without_faiss_passes_and_writes_every_figure(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", WITHOUT_FAISS, str(ROOT / "bench" / "device_check.py"),
                           "--out", str(tmp_path), "--budget_s", "600", *TINY], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((tmp_path / "device_check.json").read_text())
    assert r["mode"] == "smoke" and r["passed"] is True
    assert r["environment"]["faiss"] is None and r["environment"]["platform"] == "cpu"
    assert {s: v["status"] for s, v in r["sections"].items()} == {s: "ok" for s in (
        "environment", "fixtures", "train", "ivf_search", "matmul", "paper_precision", "encode", "decode",
        "train_step", "rerank", "ivf_assign", "qinco2", "qinco2_encode", "jax_engine", "mixed_precision")}
    # correctness: every fixture agrees with the reference at the library's default precision
    assert set(r["fixtures"]["models"]) == {"qinco", "qinco_lr", "ivf_qinco", "pq_qinco"}
    assert all(m["agreement"]["highest"] >= 0.995 for m in r["fixtures"]["models"].values())
    assert r["train"]["loss_last5"] < r["train"]["loss_first5"]
    assert r["qinco2"]["passed"] and len(r["qinco2"]["models"]) == 8
    assert all(m["equal_rows"] >= 0.99 for m in r["qinco2"]["models"].values())
    assert (r["qinco2_encode"]["A"], r["qinco2_encode"]["B"]) == (16, 32) and r["qinco2_encode"]["vectors_per_s"] > 0
    mp = r["mixed_precision"]  # both runs trained; weights stay float32 in bfloat16
    assert mp["bfloat16"]["weights_float32"] and len(mp["bfloat16"]["val_mse"]) == mp["epochs"] == 2
    assert mp["float32"]["val_mse"] != mp["bfloat16"]["val_mse"] and mp["mse_ratio"] > 0 and mp["time_ratio"] > 0
    # the parts that need faiss say so instead of failing
    assert "faiss" in r["ivf_search"]["skipped"] and "faiss" in r["rerank"]["skipped"]
    assert r["encode"]["model"].startswith("QINCo d=16 M=3 K=16 L=1 h=16")
    assert set(r["encode"]["settings"]) == {"beam1_pre0", "beam1_pre32", "beam1_pre16", "beam4_pre32", "beam8_pre0"}
    assert r["encode"]["greedy_vectors_per_s"] > 0 and r["decode"]["vectors_per_s"] > 0
    assert r["train_step"]["devices"] == 1 and r["train_step"]["mesh_axis"] == ["data"]
    assert r["ivf_assign"]["k_ivf"] == 256 and r["matmul"]["float32_highest_gflops"] > 0
    # the JAX IVF engine runs without faiss: its shortlists are the float64 scan's
    je = r["jax_engine"]
    assert je["passed"] and je["shortlists_equal"] == je["shortlists_checked"] == 16
    assert je["nprobe16"]["shortlist_ms_per_query"] > 0 and je["nprobe16"]["codes_scanned_per_query"] > 0
    assert "faiss" in je["rerank"]
    assert "no --reference_dir" in " ".join(r["notes"])
    summary = (tmp_path / "summary.txt").read_text()
    assert proc.stdout.rstrip().endswith(summary.rstrip()) and "overall: PASS" in summary


def test_sections_beyond_the_budget_are_skipped_with_a_note(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "device_check.py"), "--out", str(tmp_path),
                           "--budget_s", "2", *TINY], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    r = json.loads((tmp_path / "device_check.json").read_text())
    assert proc.returncode == 1 and r["passed"] is False  # correctness was not shown
    assert r["sections"]["environment"]["status"] == "ok"
    skipped = [s for s, v in r["sections"].items() if v["status"] == "skipped"]
    assert "fixtures" in skipped and "ivf_assign" in skipped
    assert "s of the budget left" in r["sections"]["fixtures"]["note"]
    assert "sections not completed: fixtures (skipped)" in proc.stdout


def test_sections_flag_runs_only_the_named_sections(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", WITHOUT_FAISS, str(ROOT / "bench" / "device_check.py"),
                           "--out", str(tmp_path), "--sections", "jax_engine"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((tmp_path / "device_check.json").read_text())
    assert set(r["sections"]) == {"environment", "jax_engine"} and r["passed"] is True
    assert "JAX IVF engine, 256 lists, 20,000 codes" in (tmp_path / "summary.txt").read_text()
