"""The main job's published figures (qinco_jax.experiments.published): the README's and
docs/benchmarks.md's tables equal the one table in the library, and the comparison the
main job prints at its end, on fake summaries (no real run)."""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import pytest

from qinco_jax.experiments import published
from qinco_jax.experiments.main_job import MainJobConfig

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "docs" / "benchmarks.md"]
PAGE_NAMES = {"its AQ shortlist alone": "AQ shortlist only"}  # benchmarks.md's wording of the method names


def _cells(line: str) -> list[str]:
    return [c.strip().strip("*").strip() for c in line.strip().strip("|").split("|")]


def page_mse_table(text: str) -> dict[str, float]:
    """The rows `| method | MSE ... |` of the page's database MSE table."""
    table = text.split("| method (8 bytes / vector) | database MSE |", 1)[1].split("\n\n", 1)[0]
    rows = {}
    for line in table.strip().splitlines()[1:]:
        name, mse = _cells(line)[:2]
        for page_words, ours in PAGE_NAMES.items():
            name = name.replace(page_words, ours)
        rows[name] = float(re.match(r"\**(\d+)", mse).group(1))
    return rows


def page_recall_table(text: str) -> list[list[str]]:
    """The rows of the page's `| method | (nprobe, nshort) | ...` recall@1 table, as cells."""
    table = text.split("| method | (nprobe, nshort) |", 1)[1].split("\n\n", 1)[0]
    return [[c.replace("*", "") for c in _cells(line)] for line in table.strip().splitlines()[2:]]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_pages_mse_table_is_the_published_one(page):
    rows = page_mse_table(page.read_text())
    assert rows, page
    expected = {k: v for k, v in published.PUBLISHED["mse"].items() if k in rows or "shortlist" not in k}
    assert rows == expected


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_pages_recall_table_is_the_published_one(page):
    """One row per published operating point of IVF-QINCo then IVF-QINCo2, in order."""
    rows = page_recall_table(page.read_text())
    expected = [(name, p, eq) for name in ("IVF-QINCo", "IVF-QINCo2")
                for p, eq in zip(published.published_points(name), published.equal_time_rows(name))]
    assert len(rows) == len(expected) >= 4
    for row, (name, p, eq) in zip(rows, expected):
        nprobe, nshort = map(int, re.findall(r"\d+", row[1]))
        assert row[0] == name
        assert p["parameters"] == eq["parameters"] == {"nprobe": nprobe, "nshort": nshort}
        assert row[2] == f"{p['ms_per_query']:.2f} / {p['recall@1']:.3f}"
        # the equal-time columns follow from the published points, as the main job derives them
        assert float(row[3]) == eq["IVF-RQ (beam 5)"] and float(row[4]) == eq["IVF-PQ"]


def test_benchmarks_baseline_recalls_are_the_published_ones():
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    text = " ".join(text.split())
    for name, page_name in (("IVF-RQ (beam 5)", "IVF-RQ (beam 5)"), ("IVF-PQ", "IVF-PQ")):
        m = re.search(re.escape(page_name) + r": ([\d. /]+) at ([\d.–/ ]+) ms", text)
        assert m, name
        recalls = [float(x) for x in m.group(1).split("/")]
        assert recalls == [p["recall@1"] for p in published.published_points(name)]
        if "–" not in m.group(2):  # IVF-RQ's times one by one (IVF-PQ's are a range)
            assert [float(x) for x in m.group(2).split("/")] == [
                p["ms_per_query"] for p in published.published_points(name)]


def test_readme_states_the_tolerance_the_comparison_uses():
    text = " ".join((ROOT / "README.md").read_text().split())
    assert f"MSEs within about {published.MSE_TOLERANCE:.0%}".replace("%", " %") in text
    assert f"recalls within about {published.RECALL_TOLERANCE}" in text


# --------------------------------------------------------------------------------------
# The comparison, on fake summaries
# --------------------------------------------------------------------------------------


def fake_summary(config: MainJobConfig = MainJobConfig(), db: str = "sift_images") -> dict:
    """A summary in the main job's shape holding exactly the published figures (plus a
    point the README does not give, which the comparison ignores)."""
    methods = []
    for name, mse in published.PUBLISHED["mse"].items():
        points = copy.deepcopy(published.published_points(name)) if name in published.PUBLISHED["points"] else []
        for p in points:
            p["recall@10"] = 0.9
        if "nshort" in (points[0]["parameters"] if points else {}):
            points.append({"parameters": {"nprobe": 3, "nshort": 7}, "ms_per_query": 0.1, "recall@1": 0.1,
                           "recall@10": 0.2})
        methods.append({"name": name, "bytes_per_vector": 8, "mse": float(mse), "points": points})
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
    return {"data": {"name": db, "config": cfg}, "methods": methods}


def _method(s: dict, name: str) -> dict:
    return next(m for m in s["methods"] if m["name"] == name)


def _line(text: str, method: str, figure: str) -> str:
    return next(ln for ln in text.splitlines() if ln.startswith(f"{method:30s} {figure:24s}"))


def test_the_published_figures_compare_equal_to_themselves():
    rows = published.compare(fake_summary())
    assert len(rows) == len(published.PUBLISHED["mse"]) + sum(map(len, published.PUBLISHED["points"].values()))
    assert all(r.within and r.difference == 0 for r in rows)
    text = published.format_comparison(fake_summary())
    assert f"{len(rows)} of {len(rows)} figures within the tolerance" in text
    assert published.PUBLISHED["machine"] in text


def _what(point: dict) -> str:
    return "R@1 " + " ".join(f"{k}={v}" for k, v in point["parameters"].items())


def test_differences_within_and_beyond_the_tolerance():
    s = fake_summary()
    rq_mse, q2_mse = published.PUBLISHED["mse"]["IVF-RQ (beam 5)"], published.PUBLISHED["mse"]["IVF-QINCo2"]
    _method(s, "IVF-RQ (beam 5)")["mse"] = rq_mse * 1.005      # +0.5 %: within 1 %
    _method(s, "IVF-QINCo2")["mse"] = q2_mse * 1.02            # +2 %: beyond
    first, second = published.published_points("IVF-QINCo2")[:2]
    points = _method(s, "IVF-QINCo2")["points"]
    points[0]["recall@1"] = first["recall@1"] - 0.009          # within 0.015
    points[1]["recall@1"] = second["recall@1"] - 0.02          # beyond 0.015
    last = published.published_points("IVF-QINCo")[-1]
    _method(s, "IVF-QINCo")["points"] = [p for p in _method(s, "IVF-QINCo")["points"]
                                         if p["parameters"] != last["parameters"]]  # a point the run lacks
    rows = {(r.method, r.what): r for r in published.compare(s)}
    assert rows["IVF-RQ (beam 5)", "MSE"].within and rows["IVF-RQ (beam 5)", "MSE"].difference == pytest.approx(0.005)
    assert rows["IVF-QINCo2", "MSE"].within is False
    assert rows["IVF-QINCo2", _what(first)].within
    assert rows["IVF-QINCo2", _what(first)].difference == pytest.approx(-0.009)
    assert rows["IVF-QINCo2", _what(second)].within is False
    assert rows["IVF-QINCo", _what(last)].run is None

    text = published.format_comparison(s)
    assert _line(text, "IVF-RQ (beam 5)", "MSE").split()[-4:] == [f"{rq_mse * 1.005:.0f}", f"{rq_mse}", "+0.50%",
                                                                  "yes"]
    assert _line(text, "IVF-QINCo2", "MSE").endswith("+2.00%  NO (> 1%)")
    assert _line(text, "IVF-QINCo2", _what(first)).split()[-4:] == [
        f"{first['recall@1'] - 0.009:.3f}", f"{first['recall@1']:.3f}", "-0.009", "yes"]
    assert _line(text, "IVF-QINCo2", _what(second)).endswith("-0.020  NO (> 0.015)")
    assert _line(text, "IVF-QINCo", _what(last)).endswith("not in this run")
    n = len(published.compare(s))
    assert f"{n - 3} of {n} figures within the tolerance; 2 outside it; 1 not in this run" in text


def test_other_configurations_are_not_compared():
    text = published.format_comparison(fake_summary(MainJobConfig(epochs=10, out="elsewhere", progress=False)))
    assert "not comparable" in text and "epochs=10 (default 3)" in text
    assert "out=" not in text and "progress" not in text  # where it writes changes no figure
    text = published.format_comparison(fake_summary(db="synthetic_small"))
    assert "not comparable" in text and "db='synthetic_small'" in text
    assert published.config_differences(fake_summary()["data"]["config"]) == {}
    assert published.config_differences({}) != {}  # a summary without its configuration is not comparable


def test_the_published_configuration_is_the_main_jobs_default():
    """A changed default of the main job makes its figures incomparable with the README's
    until they are measured again: this test says so."""
    default = dataclasses.asdict(MainJobConfig())
    relevant = {k: v for k, v in default.items() if k not in published._IRRELEVANT_FIELDS}
    assert relevant == published.PUBLISHED["config"]
