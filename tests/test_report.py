"""Pareto front, results table and recall / time plot."""

import json

import pytest

from qinco_jax.search import report


def _result(nprobe, nshort, r1, r1_orig, t):
    return {"parameters": {"nprobe": nprobe, "nshort": nshort},
            "recalls": {"1": r1, "10": min(1, 2 * r1), "100": 1.0},
            "recalls_orig": {"1": r1_orig, "10": 0.5, "100": 0.9},
            "t_search": t, "t_decode": t / 2, "t_dis": t / 4}


def test_pareto_front_keeps_only_undominated_points():
    pts = [(1.0, 0.5), (2.0, 0.4), (3.0, 0.7), (0.5, 0.2), (3.0, 0.6), (4.0, 0.7)]
    assert report.pareto_front(pts) == [3, 0, 2]


def test_table_and_plot(tmp_path):
    results = [_result(1, 10, 0.3, 0.2, 0.01), _result(4, 50, 0.6, 0.4, 0.04), _result(16, 100, 0.8, 0.5, 0.2)]
    table = report.format_table(results, nq=100)
    assert "nprobe" in table and "0.600" in table
    assert f"{1000 * 0.04 * 1.75 / 100:8.3f}" in table  # ms per query counts the three times
    path = tmp_path / "plot.png"
    report.plot_recall_vs_time(results, 100, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(path).ndim == 3


def test_load_results_refuses_other_json(tmp_path):
    p = tmp_path / "r.json"
    p.write_text(json.dumps([_result(1, 10, 0.3, 0.2, 0.01)]))
    assert report.load_results(p)[0]["parameters"]["nprobe"] == 1
    p.write_text(json.dumps({"something": 1}))
    with pytest.raises(ValueError, match="not a search results file"):
        report.load_results(p)
