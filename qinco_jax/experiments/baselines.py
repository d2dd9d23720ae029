"""What a user would otherwise pick at the same code size: faiss IVF-PQ and IVF-RQ,
built on the same IVF centroids as IVF-QINCo, and the summary / plot that compares them.

Bytes per vector: every method stores M bytes of code per vector (M codes of 8 bits:
PQ sub-quantizers, RQ codebooks, QINCo steps). The IVF list number is not counted, for
any method: an inverted list stores it once for all its vectors. The additive-quantizer
indexes (IVF-RQ and the AQ shortlist of IVF-QINCo) also keep faiss's 1-byte quantised
norm (`_Nqint8`) to search with look-up tables; it is not counted either (it can be
recomputed from the codes), and it is the same for both.

Recalls are the papers' 1-recall@R: the fraction of queries whose exact nearest
neighbour is among the first R results.

The summary file (`write_summary`):
    {"data": {...}, "methods": [{"name", "bytes_per_vector", "mse",
                                 "points": [{"parameters", "ms_per_query", "recall@1", "recall@10"}]}]}
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from qinco_jax.data import validation
from qinco_jax.formats.io import atomic_path
from qinco_jax.metrics import mean_squared_error, one_recall_at
from qinco_jax.search.report import pareto_front

DEFAULT_RQ_BEAM = 5  # faiss ResidualQuantizer's default max_beam_size
SEARCH_K = 10        # results per query: enough for recall@10


@dataclass(frozen=True)
class Method:
    """One method of the comparison: its reconstruction MSE and search operating points
    (dicts with parameters, ms_per_query, recall@1, recall@10)."""

    name: str
    bytes_per_vector: int
    mse: float
    points: tuple[dict, ...] = field(default_factory=tuple)

    def to_json(self) -> dict:
        return {"name": self.name, "bytes_per_vector": int(self.bytes_per_vector), "mse": float(self.mse),
                "points": [dict(p) for p in self.points]}


def _f32(x: np.ndarray, what: str = "vectors", first_row: int = 0) -> np.ndarray:
    """A float32 copy, refused (VectorInputError) if it holds NaN/Inf or is not real numbers."""
    return validation.as_finite_float32(x, what, first_row)


def flat_quantizer(centroids: np.ndarray):
    """A faiss IndexFlatL2 holding the IVF centroids (a trained coarse quantizer)."""
    import faiss

    centroids = _f32(centroids, "IVF centroids")
    if centroids.ndim != 2:
        raise ValueError(f"IVF centroids must be a (K_IVF, d) array, got shape {centroids.shape}")
    quantizer = faiss.IndexFlatL2(centroids.shape[1])
    quantizer.add(centroids)
    return quantizer


def _check_training(xt: np.ndarray, centroids: np.ndarray, M: int, nbits: int) -> None:
    if np.ndim(xt) != 2 or np.shape(xt)[1] != np.shape(centroids)[1]:
        raise ValueError(f"training vectors have shape {np.shape(xt)}, the IVF centroids {np.shape(centroids)}: "
                         f"the dimensions must match")
    if M < 1 or nbits < 1:
        raise ValueError(f"M and nbits must be >= 1, got M={M} nbits={nbits}")
    if len(xt) < (1 << nbits):
        raise ValueError(f"training {1 << nbits}-entry codebooks needs at least {1 << nbits} vectors, got {len(xt)}")


def build_ivf_pq(xt: np.ndarray, centroids: np.ndarray, M: int, nbits: int = 8):
    """faiss IndexIVFPQ on the given IVF centroids (kept fixed), M sub-quantizers of nbits
    bits trained on the residuals of xt. Empty: add the database with `index.add`."""
    import faiss

    _check_training(xt, centroids, M, nbits)
    d = np.shape(xt)[1]
    if d % M:
        raise ValueError(f"IVF-PQ cuts vectors into M={M} sub-vectors: d={d} must be a multiple of M")
    quantizer = flat_quantizer(centroids)
    index = faiss.IndexIVFPQ(quantizer, d, quantizer.ntotal, M, nbits)
    index.own_fields = True
    quantizer.this.disown()  # owned by the index from here on
    with validation.faiss_step(f"IVF-PQ training ({M}x{nbits} bits)", on=f"{len(xt)} x {d} training vectors"):
        index.train(_f32(xt, "training vectors"))  # the quantizer is already trained: only the PQ is
    return index


def build_ivf_rq(xt: np.ndarray, centroids: np.ndarray, M: int, nbits: int = 8, beam: int = DEFAULT_RQ_BEAM):
    """faiss IndexIVFResidualQuantizer (norm stored as qint8, as IVF-QINCo's shortlist
    index) on the given IVF centroids, M codebooks of nbits bits trained with beam
    search of width `beam` (also used to encode the database)."""
    import faiss

    _check_training(xt, centroids, M, nbits)
    if beam < 1:
        raise ValueError(f"RQ beam size must be >= 1, got {beam}")
    quantizer = flat_quantizer(centroids)
    index = faiss.IndexIVFResidualQuantizer(quantizer, quantizer.d, quantizer.ntotal, M, nbits,
                                            faiss.METRIC_L2, faiss.AdditiveQuantizer.ST_norm_qint8)
    index.own_fields = True
    quantizer.this.disown()
    index.rq.max_beam_size = beam
    with validation.faiss_step(f"IVF-RQ training ({M}x{nbits} bits)", on=f"{len(xt)} training vectors"):
        index.train(_f32(xt, "training vectors"))
    return index


def rq_codebooks(index) -> np.ndarray:
    """The codebooks (M, K, d) of an IVF-RQ index's residual quantizer (raw units, on the
    residuals to the IVF centroids): what IVF-QINCo's exact-RQ initialisation starts from."""
    import faiss

    rq = index.rq
    nbits = faiss.vector_to_array(rq.nbits)
    if len(set(nbits.tolist())) != 1:
        raise ValueError(f"IVF-RQ codebooks of unequal sizes ({nbits.tolist()} bits) cannot be stacked")
    return faiss.vector_to_array(rq.codebooks).reshape(rq.M, 1 << int(nbits[0]), rq.d).copy()


def add_database(index, xb: np.ndarray, batch_size: int = 65536, progress: bool | None = None) -> None:
    from tqdm import tqdm

    for i0 in tqdm(range(0, len(xb), batch_size), desc="adding database", unit="batch",
                   disable=progress is False, leave=False):
        index.add(_f32(xb[i0:i0 + batch_size], "database vectors", i0))


def reconstruction_mse(index, x: np.ndarray) -> float:
    """Mean over vectors of the squared L2 error of the index's encode / decode (IVF
    centroid + quantized residual)."""
    x = _f32(x)
    return mean_squared_error(index.sa_decode(index.sa_encode(x)), x)


def search_sweep(index, xq: np.ndarray, gt: np.ndarray, nprobe: Sequence[int], k: int = SEARCH_K,
                 repeats: int = 1, log: Callable[[str], None] | None = None) -> list[dict]:
    """Search at every nprobe: one operating point each (parameters, ms_per_query,
    recall@1, recall@10). The time is the best of `repeats` runs over all queries."""
    xq = _f32(xq, "queries")
    gt = np.asarray(gt)
    if len(gt) != len(xq):
        raise ValueError(f"{len(gt)} ground-truth rows for {len(xq)} queries")
    points = []
    for p in nprobe:
        if not 1 <= int(p) <= index.nlist:
            raise ValueError(f"nprobe must be in [1, {index.nlist}], got {p}")
        index.nprobe = int(p)
        best = float("inf")
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            _, I = index.search(xq, k)
            best = min(best, time.perf_counter() - t0)
        recalls = one_recall_at(I, gt, ranks=(1, 10))
        point = {"parameters": {"nprobe": int(p)}, "ms_per_query": 1000 * best / len(xq),
                 "recall@1": recalls["1"], "recall@10": recalls["10"]}
        points.append(point)
        if log:
            log(f"  nprobe={p:<5d} {point['ms_per_query']:8.4f} ms/query  R@1 {point['recall@1']:.4f} "
                f"R@10 {point['recall@10']:.4f}")
    return points


def points_from_search_results(results: Sequence[dict], reranked: bool = True) -> list[dict]:
    """Operating points of IVF-QINCo from qinco_jax.search.sweep.explore's results (or a
    search_ivf.py --json file): re-ranked (time: search + the pairwise stage, if any +
    decode + distances) or the AQ shortlist alone (time: search)."""
    from qinco_jax.search import report

    points = []
    for r in results:
        nq = int(r.get("nq") or 0)
        if nq < 1:
            raise ValueError("search results without their number of queries (nq): cannot time per query")
        key = "recalls" if reranked else "recalls_orig"
        seconds = report.total_seconds(r) if reranked else float(r["t_search"])
        points.append({"parameters": dict(r["parameters"]), "ms_per_query": 1000 * seconds / nq,
                       "recall@1": float(r[key]["1"]), "recall@10": float(r[key]["10"])})
    return points


def best_recall_within(points: Sequence[dict], ms_per_query: float, rank: str = "recall@1") -> float | None:
    """The highest recall of the points at most `ms_per_query` per query (None if no
    point is that fast): how methods compare at equal time."""
    return max((p[rank] for p in points if p["ms_per_query"] <= ms_per_query), default=None)


# --------------------------------------------------------------------------------------
# Summary file and plot
# --------------------------------------------------------------------------------------


def summary(data: dict, methods: Sequence[Method]) -> dict:
    if not methods:
        raise ValueError("a summary needs at least one method")
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"method names must be distinct, got {names}")
    return {"data": dict(data), "methods": [m.to_json() for m in methods]}


def write_summary(path: str | os.PathLike, data: dict, methods: Sequence[Method]) -> dict:
    """Write the summary JSON atomically; returns it."""
    s = summary(data, methods)
    with atomic_path(path, suffix=".json") as tmp:
        tmp.write_text(json.dumps(s, indent=1))
    return s


def load_summary(path: str | os.PathLike) -> dict:
    with open(path) as f:
        s = json.load(f)
    if not isinstance(s, dict) or not isinstance(s.get("methods"), list) or not all(
            {"name", "bytes_per_vector", "mse", "points"} <= set(m) for m in s["methods"]):
        raise ValueError(f"{path}: not a summary file (expected {{data, methods: [{{name, bytes_per_vector, "
                         f"mse, points}}]}})")
    return s


def format_mse_table(s: dict) -> str:
    lines = [f"{'method':28s} {'bytes/vector':>12s} {'MSE':>12s}"]
    lines += [f"{m['name']:28s} {m['bytes_per_vector']:12d} {m['mse']:12.6g}" for m in s["methods"]]
    return "\n".join(lines)


def plot_methods(s: dict, path: str | os.PathLike, title: str = "") -> None:
    """PNG of recall@1 (left) and recall@10 (right) against milliseconds per query, one
    Pareto curve per method of the summary `s` (points as faint dots). Atomic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 5.4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, rank in zip(axes, ("recall@1", "recall@10")):
        for i, m in enumerate(s["methods"]):
            pts = [(p["ms_per_query"], p[rank]) for p in m["points"]]
            if not pts:
                continue
            color = colors[i % len(colors)]
            ax.scatter(*zip(*pts), s=10, color=color, alpha=0.3)
            front = [pts[j] for j in pareto_front(pts)]
            ax.plot(*zip(*front), "-o", ms=3, color=color, label=f"{m['name']} (MSE {m['mse']:,.0f})")
        ax.set_xscale("log")
        ax.set_xlabel("search time (ms per query)")
        ax.set_ylabel(f"1-{rank}")
        ax.grid(True, which="both", alpha=0.3)
    # one legend below both panels, off the curves
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(title or "recall against search time (Pareto fronts)")
    fig.tight_layout(rect=(0, 0.02 + 0.035 * ((len(labels) + 1) // 2), 1, 1))
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
