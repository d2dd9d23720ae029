"""PQ-QINCo (the reference's pq_qinco.py): an optional OPQ rotation, the vectors cut into
`nsub` consecutive sub-vectors, one QINCo model trained per sub-vector, the models
recombined into one PQQincoModel whose codes are the sub-models' codes side by side.

    from qinco_jax.training.pq import PQSpec, train_pq
    model = train_pq(xt, xval, PQSpec(nsub=2, opq=True, sub=ModelSpec(M=4, L=2)), TrainConfig())
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, Sequence

import numpy as np

from qinco_jax.logs import quiet
from qinco_jax.training import recipe, streaming
from qinco_jax.training import loop as training
from qinco_jax.data import validation
from qinco_jax.models.qinco import AnyModel, PQQincoModel, QincoModel


# faiss.OPQMatrix trains on at most max_train_points = 256 x 256 vectors (its own subsample)
OPQ_MAX_TRAIN_ROWS = 65_536


@dataclasses.dataclass(frozen=True)
class PQSpec:
    """nsub sub-vectors (after an OPQ rotation to opq_dim dimensions, None: the input's),
    each quantized by a model of `sub`."""

    nsub: int = 4
    opq: bool = False
    opq_dim: int | None = None
    sub: recipe.ModelSpec = recipe.ModelSpec()

    def __post_init__(self):
        if self.nsub < 1:
            raise ValueError(f"the number of sub-vectors must be >= 1, got {self.nsub}")
        if self.opq_dim is not None and self.opq_dim < 1:
            raise ValueError(f"opq_dim must be >= 1 (or None: the data dimension), got {self.opq_dim}")
        if self.opq_dim is not None and not self.opq:
            raise ValueError("opq_dim is the output dimension of an OPQ rotation: set opq=True")
        if self.sub.is_ivf:
            raise ValueError("PQ-QINCo with IVF-QINCo sub-quantizers is not supported (as in the reference)")


def train_opq(xt: np.ndarray, nsub: int, opq_dim: int | None = None, log: Callable[[str], None] = quiet) -> np.ndarray:
    """A faiss OPQ matrix (d_out x d_in) for nsub sub-vectors."""
    import faiss

    d = xt.shape[1]
    d_out = opq_dim or d
    if nsub < 1 or d_out % nsub:
        raise ValueError(f"the OPQ output dimension {d_out} is not divisible by the number of sub-vectors {nsub}")
    log(f"training OPQ {d} -> {d_out} for {nsub} sub-vectors")
    opq = faiss.OPQMatrix(d, nsub, d_out)
    with validation.faiss_step("OPQ training", on=f"{len(xt)} x {d} training vectors"):
        opq.train(validation.as_finite_float32(xt, "OPQ training vectors"))
    return faiss.vector_to_array(opq.A).reshape(opq.d_out, opq.d_in).astype(np.float32)


def _sub_rows(rows: np.ndarray, A: np.ndarray | None, lo: int, hi: int) -> np.ndarray:
    """Rows rotated by the OPQ matrix A (if any), columns lo:hi: a sub-model's vectors."""
    return (rows @ A.T if A is not None else rows)[:, lo:hi]


def split_subvectors(x: np.ndarray, nsub: int) -> list[np.ndarray]:
    """x (n, d) cut into nsub contiguous (n, d / nsub) blocks of columns."""
    d = x.shape[1]
    if nsub < 1 or d % nsub:
        raise ValueError(f"the number of sub-vectors must divide the dimension: {d} is not divisible by {nsub}")
    ds = d // nsub
    return [np.ascontiguousarray(x[:, i * ds:(i + 1) * ds]) for i in range(nsub)]


def check_opq_matrix(a: np.ndarray, what: str = "an OPQ matrix") -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2:
        raise ValueError(f"{what} must be 2-D, got shape {a.shape}")
    return a.astype(np.float32)


def recombine(sub_models: Sequence[AnyModel], opq: np.ndarray | None) -> PQQincoModel:
    """One PQ-QINCo model from QINCo / QINCo-LR sub-models (and the OPQ matrix)."""
    for i, m in enumerate(sub_models):
        if not isinstance(m, QincoModel) or m.config.is_ivf:
            raise ValueError(f"sub-model {i} is {m.describe()}: PQ-QINCo combines QINCo / QINCo-LR models")
    return PQQincoModel(tuple(sub_models), opq)


def train_pq(xt: np.ndarray, xval: np.ndarray, spec: PQSpec, cfg: training.TrainConfig, *,
             sub_model_paths: Sequence[str] | None = None, checkpoint_dir: str | None = None,
             log: Callable[[str], None] = quiet) -> PQQincoModel:
    """OPQ (trained on xt), split, train every sub-model (recipe.train_model; xval rotated
    and split alike validates it), recombine. sub_model_paths: where to save each
    sub-model; checkpoint_dir: one resumable checkpoint per sub-model in <dir>/sub<i>."""
    xt = np.asanyarray(xt)  # a memory map stays on disk: each sub-model reads its rotated rows per batch
    validation.check_all_finite(xt, "training vectors")  # dtype and values, chunk by chunk
    xval = validation.as_finite_float32(xval, "validation vectors")
    if xt.ndim != 2 or xval.ndim != 2 or xt.shape[1] != xval.shape[1] or not len(xt) or not len(xval):
        raise ValueError(f"training vectors {xt.shape} and validation vectors {xval.shape} must be non-empty "
                         f"2-D arrays of the same dimension")
    if sub_model_paths is not None and len(sub_model_paths) != spec.nsub:
        raise ValueError(f"{len(sub_model_paths)} sub-model paths for {spec.nsub} sub-vectors")
    if not spec.opq:
        split_subvectors(xt[:1], spec.nsub)  # fail before any training
    # faiss trains OPQ on its own subsample: only those rows are read
    A = train_opq(streaming.faiss_sample(xt, OPQ_MAX_TRAIN_ROWS), spec.nsub, spec.opq_dim, log) if spec.opq else None
    d_out = A.shape[0] if A is not None else xt.shape[1]
    split_subvectors(np.zeros((1, d_out), np.float32), spec.nsub)
    ds = d_out // spec.nsub
    val_parts = split_subvectors(xval @ A.T if A is not None else xval, spec.nsub)
    subs = []
    for i, xs_val in enumerate(val_parts):
        log(f"====================== sub-quantizer {i} / {spec.nsub}: d={ds}")
        path = sub_model_paths[i] if sub_model_paths else None
        xs_train = streaming.RowMap(xt, functools.partial(_sub_rows, A=A, lo=i * ds, hi=(i + 1) * ds), ds)
        result = recipe.train_model(
            xs_train, xs_val, spec.sub, cfg, model_path=path,
            history_path=path.rstrip("/") + ".history.json" if path else None,
            checkpoint_dir=os.path.join(checkpoint_dir, f"sub{i}") if checkpoint_dir else None, log=log)
        subs.append(result.best)
    return recombine(subs, A)
