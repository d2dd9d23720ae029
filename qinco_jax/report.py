"""Search results as a reader wants them: the Pareto front of recall against time, a
table and the recall / time plot of the paper's Figure 3.

A result is one operating point as search_ivf.py writes it to --json:
    {"parameters": {...}, "recalls": {"1": r, "10": r, "100": r}, "recalls_orig": {...},
     "t_search": s, "t_decode": s, "t_dis": s}
with times in seconds for the whole query set.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from qinco_jax.io import atomic_path

Result = dict


def load_results(path: str | os.PathLike) -> list[Result]:
    with open(path) as f:
        data = json.load(f)
    results = data.get("results") if isinstance(data, dict) else data
    if not isinstance(results, list) or not all("recalls" in r and "parameters" in r for r in results):
        raise ValueError(f"{path}: not a search results file (expected a list of "
                         "{{parameters, recalls, recalls_orig, t_search, t_decode, t_dis}})")
    return results


def queries_in(results: Sequence[Result]) -> int:
    """The number of timed queries, when the results record it (0 if not)."""
    return int(max((r.get("nq", 0) or r["parameters"].get("nq", 0) for r in results), default=0))


def total_seconds(r: Result) -> float:
    return float(r["t_search"]) + float(r.get("t_decode", 0.0)) + float(r.get("t_dis", 0.0))


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


def format_table(results: Sequence[Result], nq: int) -> str:
    """One line per operating point: its parameters, recalls before / after QINCo
    re-ranking, and milliseconds per query."""
    keys = sorted({k for r in results for k in r["parameters"]})
    head = " ".join(f"{k:>8s}" for k in keys)
    lines = [f"{head} | {'AQ R@1':>7s} {'R@10':>6s} {'R@100':>6s} | {'QINCo R@1':>9s} {'R@10':>6s} "
             f"{'R@100':>6s} | {'ms/query':>8s}"]
    lines.append("-" * len(lines[0]))
    for r in sorted(results, key=lambda r: tuple(r["parameters"].get(k, 0) for k in keys)):
        p = " ".join(f"{str(r['parameters'].get(k, '')):>8s}" for k in keys)
        o, q = r.get("recalls_orig", {}), r["recalls"]
        lines.append(f"{p} | {o.get('1', float('nan')):7.3f} {o.get('10', float('nan')):6.3f} "
                     f"{o.get('100', float('nan')):6.3f} | {q['1']:9.3f} {q['10']:6.3f} {q['100']:6.3f} | "
                     f"{1000 * total_seconds(r) / nq:8.3f}")
    return "\n".join(lines)


def plot_recall_vs_time(results: Sequence[Result], nq: int, path: str | os.PathLike, title: str = "") -> None:
    """PNG of 1-recall@1 against milliseconds per query, before and after QINCo
    re-ranking, with the Pareto front of each drawn as a line. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    series = [("QINCo re-ranked", "recalls", total_seconds, "tab:red"),
              ("AQ shortlist only", "recalls_orig", lambda r: float(r["t_search"]), "tab:blue")]
    for label, key, seconds, color in series:
        pts = [(1000 * seconds(r) / nq, r[key]["1"]) for r in results if key in r]
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
