"""examples/main_job.py end to end on a tiny configuration: the summary lists every
method at equal bytes per vector, each with an MSE and operating points."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import faiss
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def one_faiss_thread():
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def test_tiny_main_job(tmp_path, one_faiss_thread):
    spec = importlib.util.spec_from_file_location("main_job", ROOT / "examples" / "main_job.py")
    main_job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(main_job)
    s = main_job.main(["--db", "synthetic_small", "--out", str(tmp_path), "--n_centroids", "16", "--nt", "3000",
                       "--nval", "300", "--M", "4", "--L", "1", "--h", "16", "--epochs", "1", "--lr", "1e-3",
                       "--rq_beam", "2", "--nprobe", "1", "4", "--nshort", "10", "20"])
    assert json.loads((tmp_path / "summary.json").read_text()) == s
    assert (tmp_path / "pareto.png").stat().st_size > 0
    names = [m["name"] for m in s["methods"]]
    assert names[0] == "IVF-PQ" and names[1].startswith("IVF-RQ") and names[-1] == "IVF-QINCo"
    assert {m["bytes_per_vector"] for m in s["methods"]} == {4}
    for m in s["methods"]:
        assert math.isfinite(m["mse"]) and m["mse"] > 0
        assert len(m["points"]) >= 2
        assert all({"parameters", "ms_per_query", "recall@1", "recall@10"} <= set(p) for p in m["points"])
    # exact-RQ initialisation: the RQ's validation MSE is where training started
    assert s["data"]["rq_init_val_mse"] > 0 and s["data"]["qinco_val_mse"] > 0
