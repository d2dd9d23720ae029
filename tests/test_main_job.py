"""The main job (examples/small_scale.sh, what `make demo` runs) end to end on a tiny
configuration: k-means -> IVF-QINCo training -> IVF-RQ index -> search -> plot."""

import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

ROOT = Path(__file__).resolve().parents[1]

TINY = {"DB": "synthetic_small", "N_CENTROIDS": "16", "NT": "4000", "NVAL": "500", "M": "8", "L": "2",
        "H": "64", "EPOCHS": "4", "NPROBE": "4 16", "NSHORT": "20 100"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    env = dict(os.environ, **TINY, OUT=str(out), PYTHON=sys.executable,
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(["bash", str(ROOT / "examples" / "small_scale.sh")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_every_step_ran_and_wrote_its_output(demo):
    out, stdout = demo
    for step in ("1/4", "2/4", "3/4", "4/4"):
        assert f"=== {step}" in stdout
    for name in ("centroids.npy", "model.pt", "index.faissindex", "train_history.json"):
        assert (out / name).stat().st_size > 0, name
    history = json.loads((out / "train_history.json").read_text())
    assert len(history["epochs"]) == 4


def test_results_json_and_plot_parse(demo):
    out, _ = demo
    results = json.loads((out / "search.json").read_text())
    results = results["results"] if isinstance(results, dict) else results
    assert {(r["parameters"]["nprobe"], r["parameters"]["nshort"]) for r in results} == {
        (4, 20), (4, 100), (16, 20), (16, 100)}
    for r in results:
        assert set(r["recalls"]) == {"1", "10", "100"} and set(r["recalls_orig"]) == {"1", "10", "100"}
        assert min(r["t_search"], r["t_decode"], r["t_dis"]) >= 0
    image = matplotlib.image.imread(out / "pareto.png")
    assert image.shape[0] > 100 and image.shape[1] > 100


def test_reranking_with_qinco_beats_the_aq_shortlist(demo):
    out, _ = demo
    results = json.loads((out / "search.json").read_text())
    results = results["results"] if isinstance(results, dict) else results
    r = next(r for r in results if r["parameters"] == {"nprobe": 16, "nshort": 100}
             or (r["parameters"].get("nprobe") == 16 and r["parameters"].get("nshort") == 100))
    assert r["recalls"]["10"] > r["recalls_orig"]["10"] + 0.03
    assert r["recalls"]["1"] >= r["recalls_orig"]["1"]
