"""Quality measures used throughout: MSE, 1-recall@R and the paired difference of two
methods' recalls on the same queries."""

from __future__ import annotations

import numpy as np

RANKS = (1, 10, 100)


def mean_squared_error(x: np.ndarray, y: np.ndarray) -> float:
    """Mean over vectors of the squared L2 distance (the paper's MSE)."""
    return float(np.mean(np.sum((np.asarray(x, np.float64) - y) ** 2, axis=1)))


def one_recall_at(I: np.ndarray, gt: np.ndarray, ranks=RANKS) -> dict[str, float]:
    """1-recall@R: the fraction of queries whose true nearest neighbour (gt[:, 0]) is
    among the first R results. Keys are strings ("1", "10", "100"), as in the JSON."""
    I = np.asarray(I)
    if len(I) != len(gt):
        raise ValueError(f"{len(I)} result rows for {len(gt)} ground-truth rows")
    return {str(r): float((I[:, :r] == gt[:, :1]).sum() / len(gt)) for r in ranks}


def paired_difference(hits_a: np.ndarray, hits_b: np.ndarray) -> tuple[float, float]:
    """How much more often method b is right than method a on the same queries (e.g.
    `I[:, 0] == gt[:, 0]` for each), and the standard error of that difference.

    The paired error uses only the queries where the two disagree, so it is smaller than
    the two recalls' errors combined: the right measure for "b recalls more than a"."""
    a, b = np.asarray(hits_a, bool), np.asarray(hits_b, bool)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"paired_difference needs two equal, non-empty 1-d arrays, got {a.shape} and {b.shape}")
    diff = float(b.mean() - a.mean())
    return diff, float(np.sqrt(max((a != b).mean() - diff ** 2, 0.0) / len(a)))
