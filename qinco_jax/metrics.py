"""Quality measures used throughout: MSE and 1-recall@R."""

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
