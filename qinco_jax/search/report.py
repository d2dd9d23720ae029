"""Search results: the one results schema, its file, its table, the Pareto front of
recall against time and the recall / time plot of the paper's Figure 3.

A results file (qinco-index / qinco-search-2stage --json) is one JSON object:
    {"results": [operating point, ...], ...metadata (e.g. "nq", "stats", "db", "model")}
and an operating point is
    {"parameters": {...}, "recalls": {"1": r, "10": r, "100": r}, "recalls_orig": {...},
     "t_search": s, "t_decode": s, "t_dis": s, "nq": n}
with times in seconds for the whole query set; "recalls_orig" are the recalls of the
shortlist before QINCo re-ranking. A three-stage search (pairwise decoder) adds
"nmid_short" to the parameters, "t_mid" (the pairwise stage) and "recalls_mid" (the
pairwise stage's shortlist of nshort). `load_results` also reads a bare list of points
(files written before this schema), and the QINCo2 reference's search log
{"ivf_real_res": [...]} (`from_reference_log`), so that `run.py task=search resume=true`
continues a sweep the reference started; we always write our schema.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from qinco_jax.formats.io import atomic_path

Result = dict


def results_document(results: Sequence[Result], **metadata) -> dict:
    """The JSON object of a results file: {"results": [...], **metadata}."""
    if "results" in metadata:
        raise ValueError("'results' is the list of operating points, not a metadata key")
    return {"results": list(results), **metadata}


def save_results(path: str | os.PathLike, results: Sequence[Result], **metadata) -> None:
    """Write a results file atomically (see the module docstring for the schema)."""
    from qinco_jax.formats.io import write_bytes

    write_bytes(path, (json.dumps(results_document(results, **metadata), indent=1) + "\n").encode())


def load_results(path: str | os.PathLike) -> list[Result]:
    """The operating points of a results file: ours, or a search log of the QINCo2
    reference (`run.py task=search output=<log.json>`), converted (see from_reference_log)."""
    with open(path) as f:
        data = json.load(f)
    if isinstance(data, dict) and REFERENCE_LOG_KEY in data:
        return from_reference_log(data, path)
    results = data.get("results") if isinstance(data, dict) else data
    if not isinstance(results, list) or not all("recalls" in r and "parameters" in r for r in results):
        raise ValueError(f"{path}: not a search results file (expected a list of "
                         "{{parameters, recalls, recalls_orig, t_search, t_decode, t_dis}})")
    return results


REFERENCE_LOG_KEY = "ivf_real_res"  # the reference's search log: {"ivf_real_res": [point, ...]}


def from_reference_log(log: dict, path: str | os.PathLike = "the log") -> list[Result]:
    """The points of a QINCo2 reference search log, in our schema: its parameters
    (nmid_short=0, the reference's "no pairwise stage", left out as ours leave it out),
    recalls and recalls_orig as they are, and its timers renamed: t_search,
    t_mid_rerank -> t_mid (with a pairwise stage), t_decode, t_rerank -> t_dis. Its log
    does not record the number of queries; the points' totals are the same seconds."""
    points = log[REFERENCE_LOG_KEY]
    if not isinstance(points, list):
        raise ValueError(f"{path}: '{REFERENCE_LOG_KEY}' must be a list of search results")
    out = []
    for i, r in enumerate(points):
        missing = [k for k in ("parameters", "recalls", "t_search", "t_decode", "t_rerank") if k not in r]
        if missing:
            raise ValueError(f"{path}: point {i} of the reference's search log has no {', '.join(missing)}")
        parameters = {k: int(v) for k, v in r["parameters"].items()}
        point = {"parameters": parameters, "recalls": {str(k): float(v) for k, v in r["recalls"].items()},
                 "recalls_orig": {str(k): float(v) for k, v in r.get("recalls_orig", {}).items()},
                 "t_search": float(r["t_search"]), "t_decode": float(r["t_decode"]), "t_dis": float(r["t_rerank"])}
        if parameters.get("nmid_short", 0) == 0:
            parameters.pop("nmid_short", None)
        else:
            point["t_mid"] = float(r.get("t_mid_rerank", 0.0))
        if "cno" in r:
            point["cno"] = int(r["cno"])
        out.append(point)
    return out


def queries_in(results: Sequence[Result]) -> int:
    """The number of timed queries, when the results record it (0 if not)."""
    return int(max((r.get("nq", 0) or r["parameters"].get("nq", 0) for r in results), default=0))


def total_seconds(r: Result) -> float:
    return (float(r["t_search"]) + float(r.get("t_mid", 0.0)) + float(r.get("t_decode", 0.0))
            + float(r.get("t_dis", 0.0)))


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (time, recall) points that no other point beats on both: sorted
    by time, each strictly more accurate than every faster one."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def format_header(param_names: Sequence[str]) -> str:
    """The header line of the results table (see format_row)."""
    head = " ".join(f"{k:>8s}" for k in param_names)
    return (f"{head} | {'AQ R@1':>7s} {'R@10':>6s} {'R@100':>6s} | {'QINCo R@1':>9s} {'R@10':>6s} "
            f"{'R@100':>6s} | {'ms/query':>8s} (search + decode + dis)")


def format_row(r: Result, param_names: Sequence[str], nq: int) -> str:
    """One operating point: its parameters, recalls before / after QINCo re-ranking,
    milliseconds per query and their split (printed as a sweep runs, and by format_table)."""
    p = " ".join(f"{str(r['parameters'].get(k, '')):>8s}" for k in param_names)
    o, q = r.get("recalls_orig", {}), r["recalls"]
    stages = ("t_search", "t_mid", "t_decode", "t_dis") if "t_mid" in r else ("t_search", "t_decode", "t_dis")
    ms = " + ".join(f"{1000 * float(r.get(t, 0.0)) / nq:.4f}" for t in stages)
    mid = " (search + mid + decode + dis)" if "t_mid" in r else ""
    return (f"{p} | {o.get('1', float('nan')):7.3f} {o.get('10', float('nan')):6.3f} "
            f"{o.get('100', float('nan')):6.3f} | {q['1']:9.3f} {q['10']:6.3f} {q['100']:6.3f} | "
            f"{1000 * total_seconds(r) / nq:8.3f} ({ms}){mid}")


def param_names(results: Sequence[Result]) -> list[str]:
    """The parameter names of a set of results, in the order they first appear."""
    names: dict[str, None] = {}
    for r in results:
        names.update(dict.fromkeys(r["parameters"]))
    return list(names)


def format_table(results: Sequence[Result], nq: int) -> str:
    """The results table: a header, then one line per operating point sorted by its
    parameters."""
    keys = param_names(results)
    head = format_header(keys)
    lines = [head, "-" * len(head)]
    for r in sorted(results, key=lambda r: tuple(r["parameters"].get(k, 0) for k in keys)):
        lines.append(format_row(r, keys, nq))
    return "\n".join(lines)


def plot_recall_vs_time(results: Sequence[Result], nq: int, path: str | os.PathLike, title: str = "") -> None:
    """PNG of 1-recall@1 against milliseconds per query, before and after QINCo
    re-ranking, with the Pareto front of each drawn as a line. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    three = lambda r: int(r["parameters"].get("nmid_short", 0)) > 1  # noqa: E731
    series = [("QINCo re-ranked", "recalls", total_seconds, "tab:red", lambda r: not three(r)),
              ("pairwise + QINCo re-ranked", "recalls", total_seconds, "tab:green", three),
              ("AQ shortlist only", "recalls_orig", lambda r: float(r["t_search"]), "tab:blue",
               lambda r: not three(r))]
    for label, key, seconds, color, keep in series:
        pts = [(1000 * seconds(r) / nq, r[key]["1"]) for r in results if key in r and keep(r)]
        if not pts:
            continue
        ax.scatter(*zip(*pts), s=12, color=color, alpha=0.4)
        front = [pts[i] for i in pareto_front(pts)]
        ax.plot(*zip(*front), "-o", ms=4, color=color, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("search time (ms per query)")
    ax.set_ylabel("1-recall@1")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title or "IVF-QINCo: recall against search time (Pareto fronts)")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
