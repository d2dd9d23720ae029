"""Exact nearest-neighbour ground truth (faiss brute force), as the published data sets
ship it: the ids of the GT_K nearest database vectors of each query."""

from __future__ import annotations

import numpy as np

GT_K = 100  # neighbours in computed ground truths, as in the published ones


def exact_groundtruth(xq: np.ndarray, xb: np.ndarray, k: int = GT_K) -> np.ndarray:
    """(nq, min(k, nb)) int64 ids of the exact L2 nearest neighbours (faiss IndexFlatL2)."""
    import faiss

    index = faiss.IndexFlatL2(xb.shape[1])
    index.add(np.ascontiguousarray(xb, dtype=np.float32))
    _, ids = index.search(np.ascontiguousarray(xq, dtype=np.float32), min(k, len(xb)))
    return ids
