"""The main job's published figures, and how a run compares with them.

`make demo` runs the main job with its default configuration; the README's headline
tables (and docs/benchmarks.md) give the figures one such run produced. They are kept
here, in one place: `tests/test_published.py` checks that the pages' tables equal them,
and the main job ends by printing its own figures beside them (`format_comparison`).

Figures move between machines (floating-point reductions run in another order, and
training amplifies the difference), so a run is compared with a tolerance: database MSEs
within about 1 % (`MSE_TOLERANCE`, relative), recall@1 within about 0.015
(`RECALL_TOLERANCE`, absolute: training from another seed alone moved the models' recalls
by up to 0.012 on this machine, bench/bench_main_job_seeds.py, and another machine's
floating-point order is in this like another seed; 5,000 queries make a recall ±0.0065
on its own). Times are
the machine's own and are not compared; so are the operating points each QINCo model is
searched at (chosen on validation queries by their times: another machine, or the same
one under another load, may choose others, and a published point the run did not search
is reported as such). Only a run of the default configuration on the default data set
is comparable; for any other, `format_comparison` says so.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

# Fields of MainJobConfig that change no figure compared here (where the files go, bars).
_IRRELEVANT_FIELDS = ("out", "progress", "jax_engine")  # change no compared figure

MSE_TOLERANCE = 0.01     # relative: "MSEs within about 1 %"
RECALL_TOLERANCE = 0.015  # absolute: "recalls within about 0.015"

# One run of `make demo` (the default MainJobConfig, on sift_images).
PUBLISHED: dict[str, Any] = {
    "machine": ("this project's shared 2-core CPU (AMD EPYC), no other job of this project running; faiss "
                "on one thread"),
    "db": "sift_images",
    "nq": 5000,
    # the main job's configuration of that run (MainJobConfig's defaults; tests check they still are)
    "config": {"db": "sift_images", "n_centroids": 256, "kmeans_niter": 10, "M": 8, "nt": 95000, "nval": 5000,
               "L": 1, "h": 64, "epochs": 3, "lr": 0.0003, "batch_size": 256, "init": "rq_exact",
               "train_preselect": 64, "encode_beam": 8, "encode_preselect": 32, "aq_train": 10000, "aq_fit": "decoded",
               "rq_beam": 5, "nprobe": (1, 2, 4, 8, 16), "nshort": (10, 20, 50), "val_queries": 2000,
               "search_threads": 1, "build_threads": 1,
               "qinco2": True, "qinco2_L": 1, "qinco2_h": 64, "qinco2_de": 64, "qinco2_A": 32, "qinco2_B": 1,
               "qinco2_epochs": 6, "qinco2_lr": 0.002, "seed": 0},
    # database MSE of each method, 8 bytes per vector
    "mse": {
        "IVF-PQ": 20321,
        "IVF-RQ (beam 5)": 16215,
        "IVF-QINCo: AQ shortlist only": 16837,
        "IVF-QINCo": 15197,
        "IVF-QINCo2: AQ shortlist only": 18048,
        "IVF-QINCo2": 12752,
    },
    # operating points: (search parameters, milliseconds per query, recall@1), by time;
    # the QINCo models' points are those chosen on the validation queries
    "points": {
        "IVF-PQ": [
            ({"nprobe": 1}, 0.02, 0.521),
            ({"nprobe": 2}, 0.02, 0.594),
            ({"nprobe": 4}, 0.02, 0.623),
            ({"nprobe": 8}, 0.04, 0.631),
            ({"nprobe": 16}, 0.06, 0.634),
        ],
        "IVF-RQ (beam 5)": [
            ({"nprobe": 1}, 0.08, 0.552),
            ({"nprobe": 2}, 0.17, 0.642),
            ({"nprobe": 4}, 0.34, 0.677),
            ({"nprobe": 8}, 0.69, 0.691),
            ({"nprobe": 16}, 1.38, 0.694),
        ],
        "IVF-QINCo": [
            ({"nprobe": 2, "nshort": 10}, 0.24, 0.655),
            ({"nprobe": 4, "nshort": 10}, 0.44, 0.691),
            ({"nprobe": 8, "nshort": 10}, 0.76, 0.703),
            ({"nprobe": 16, "nshort": 10}, 1.50, 0.708),
        ],
        "IVF-QINCo2": [
            ({"nprobe": 2, "nshort": 10}, 0.21, 0.668),
            ({"nprobe": 4, "nshort": 20}, 0.46, 0.706),
            ({"nprobe": 8, "nshort": 10}, 0.87, 0.716),
            ({"nprobe": 16, "nshort": 20}, 1.63, 0.719),
        ],
    },
}


@dataclasses.dataclass(frozen=True)
class Row:
    """One figure of a run beside its published value."""

    method: str
    what: str            # "MSE" or "R@1 nprobe=.. nshort=.."
    run: float | None    # None: the run has no such method or point
    published: float
    difference: float | None  # relative for MSEs, absolute for recalls
    within: bool | None       # within the tolerance (None: nothing to compare)


def published_points(method: str) -> list[dict]:
    """A method's published operating points in the summary's shape
    ({"parameters", "ms_per_query", "recall@1"})."""
    return [{"parameters": dict(p), "ms_per_query": ms, "recall@1": r} for p, ms, r in PUBLISHED["points"][method]]


def config_differences(config: dict) -> dict[str, tuple[Any, Any]]:
    """The fields of a run's configuration (the summary's data.config) that differ from
    the published run's (PUBLISHED["config"], the default MainJobConfig's), as
    {field: (run's, published)}; fields that change no compared figure (out, progress,
    jax_engine) are left out."""
    differences = {}
    for key, value in PUBLISHED["config"].items():
        given = config.get(key, "(missing)")
        same = list(given) == list(value) if isinstance(value, tuple) and isinstance(given, (list, tuple)) \
            else given == value
        if not same:
            differences[key] = (given, value)
    return differences


def compare(summary: dict) -> list[Row]:
    """Each published database MSE and recall@1 beside the run's (a summary as the main
    job writes it: {"data": ..., "methods": [...]})."""
    methods = {m["name"]: m for m in summary["methods"]}
    rows = []
    for name, published in PUBLISHED["mse"].items():
        got = methods.get(name, {}).get("mse")
        diff = None if got is None else (float(got) - published) / published
        rows.append(Row(name, "MSE", got, published, diff, None if diff is None else abs(diff) <= MSE_TOLERANCE))
    for name in PUBLISHED["points"]:
        run_points = methods.get(name, {}).get("points", [])
        for p in published_points(name):
            match = next((q for q in run_points if q["parameters"] == p["parameters"]), None)
            got = None if match is None else float(match["recall@1"])
            diff = None if got is None else got - p["recall@1"]
            # a margin of 1e-9 so that a difference of exactly the tolerance counts as within
            within = None if diff is None else abs(diff) <= RECALL_TOLERANCE + 1e-9
            what = "R@1 " + " ".join(f"{k}={v}" for k, v in p["parameters"].items())
            rows.append(Row(name, what, got, p["recall@1"], diff, within))
    return rows


def format_comparison(summary: dict) -> str:
    """What the main job prints at its end: its figures beside the README's, with the
    differences and whether each is within the machine-to-machine tolerance; for a run
    of another configuration or data set, that its figures are not comparable."""
    data = summary.get("data", {})
    differences = config_differences(data.get("config", {}))
    if data.get("name") != PUBLISHED["db"]:
        differences = {"db": (data.get("name"), PUBLISHED["db"]), **differences}
    if differences:
        listed = ", ".join(f"{k}={v[0]!r} (default {v[1]!r})" for k, v in differences.items())
        return ("comparison with the README's figures: not comparable, this run's configuration is not the "
                f"default one ({listed}); the README's figures are for `make demo` as it is")
    rows = compare(summary)
    lines = [f"comparison with the README's figures ({PUBLISHED['machine']}). Other machines differ: expect "
             f"MSEs within {MSE_TOLERANCE:.0%} and recall@1 within {RECALL_TOLERANCE} of them "
             f"(times are not compared)",
             f"{'method':30s} {'figure':24s} {'this run':>10s} {'README':>10s} {'difference':>11s}  within"]
    for r in rows:
        if r.run is None:
            run, diff, within = "-", "-", "not in this run"
        elif r.what == "MSE":
            run, diff = f"{r.run:.0f}", f"{r.difference:+.2%}"
            within = "yes" if r.within else f"NO (> {MSE_TOLERANCE:.0%})"
        else:
            run, diff = f"{r.run:.3f}", f"{r.difference:+.3f}"
            within = "yes" if r.within else f"NO (> {RECALL_TOLERANCE})"
        published = f"{r.published:.0f}" if r.what == "MSE" else f"{r.published:.3f}"
        lines.append(f"{r.method:30s} {r.what:24s} {run:>10s} {published:>10s} {diff:>11s}  {within}")
    outside = [r for r in rows if r.within is False]
    missing = [r for r in rows if r.within is None]
    lines.append(f"{len(rows) - len(outside) - len(missing)} of {len(rows)} figures within the tolerance"
                 + (f"; {len(outside)} outside it" if outside else "")
                 + (f"; {len(missing)} not in this run" if missing else ""))
    return "\n".join(lines)


def equal_time_rows(target: str = "IVF-QINCo2", others: Sequence[str] = ("IVF-RQ (beam 5)", "IVF-PQ")) -> list[dict]:
    """The README's equal-time columns, derived from the published points as the main
    job derives them: for each point of `target`, the best recall@1 of each other method
    within its time."""
    from qinco_jax.experiments.baselines import best_recall_within

    return [{"parameters": p["parameters"],
             **{o: best_recall_within(published_points(o), p["ms_per_query"]) for o in others}}
            for p in published_points(target)]
