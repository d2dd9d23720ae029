"""Initial codebooks for QINCo training: a faiss ResidualQuantizer, as in the paper.

QINCo starts from a trained residual quantizer: its M codebooks become codebook0 and
the step codebooks (IVF-QINCo: the M step codebooks; the RQ is then trained on the
residuals of the training vectors to their nearest IVF centroid). Everything here works
in raw (unscaled) units; the model divides by db_scale when it takes the codebooks.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from qinco_jax.models import codec
from qinco_jax.data import validation
from qinco_jax.metrics import mean_squared_error


def codebook_bits(K: int) -> int:
    """log2(K), after checking that K is a power of two >= 2 (a faiss RQ codebook size)."""
    nbit = int(round(np.log2(K))) if K > 0 else -1
    if K < 2 or 1 << nbit != K:
        raise ValueError(f"K must be a power of two >= 2 (an RQ codebook of nbit bits), got {K}")
    return nbit


def train_rq(xt: np.ndarray, M: int, K: int, beam_size: int = 1, xval: np.ndarray | None = None,
             log: Callable[[str], None] = print) -> np.ndarray:
    """Train a faiss ResidualQuantizer with M codebooks of K entries on xt and return
    the codebooks, (M, K, d) float32, raw units."""
    import faiss
    from faiss.contrib.inspect_tools import get_additive_quantizer_codebooks

    xt = validation.as_finite_float32(xt, "RQ training vectors")
    nbit = codebook_bits(K)
    if beam_size < 1:
        raise ValueError(f"RQ beam size must be >= 1, got {beam_size}")
    if len(xt) < K:
        raise ValueError(f"training an RQ with K={K} needs at least {K} vectors, got {len(xt)}")
    log(f"training RQ {M}x{nbit}, beam_size={beam_size} on {xt.shape}")
    t0 = time.time()
    rq = faiss.ResidualQuantizer(xt.shape[1], M, nbit)
    rq.max_beam_size = beam_size
    with validation.faiss_step(f"RQ training ({M}x{nbit} bits)", on=f"{xt.shape[0]} x {xt.shape[1]} training vectors"):
        rq.train(xt)
    msg = f"[{time.time() - t0:.2f} s] RQ trained: train MSE={rq_mse(rq, xt):g}"
    if xval is not None and len(xval):
        msg += f" validation MSE={rq_mse(rq, np.ascontiguousarray(xval, dtype=np.float32)):g}"
    log(msg)
    return np.asarray(get_additive_quantizer_codebooks(rq), dtype=np.float32)


def rq_mse(rq, x: np.ndarray) -> float:
    return mean_squared_error(rq.decode(rq.compute_codes(x)), x)


def assign_to_centroids(x: np.ndarray, centroids: np.ndarray, batch_size: int = 16384,
                        progress: str | None = None) -> np.ndarray:
    """Exact nearest centroid (int32) of every row of x, in raw units like the
    reference (which assigns the training set before any scaling). The centroids are
    scanned in chunks, so K_IVF = 2^20 fits in memory."""
    x = np.asarray(x)
    centroids = np.asarray(centroids, np.float32)
    if centroids.ndim != 2 or x.ndim != 2 or centroids.shape[1] != x.shape[1]:
        raise ValueError(f"IVF centroids have shape {centroids.shape}, the vectors have dimension "
                         f"{x.shape[1] if x.ndim == 2 else x.shape}: they must match")
    return codec.nearest_rows(x, centroids, batch_size=batch_size, progress=progress)


class CentroidAssignment:
    """The IVF assignment of training vectors (`code0` for `training.fit`), computed
    where it is needed instead of stored: calling it on raw rows (b, d) gives their
    nearest centroid (int32 (b,)), exactly as `assign_to_centroids` does. The training
    loop calls it on the rows each batch reads, so no array with an entry per training
    vector exists (4 bytes a row: 1.4 GB for Deep1B's 358M training vectors) and the
    rows are read once. It costs one assignment per row trained on (per epoch: `ds.loop`
    rows), where the explicit array costs one per row of the file, once.

    The centroids (K_IVF, d) are put on the device once, here."""

    def __init__(self, centroids: np.ndarray, batch_size: int = 16384):
        import jax

        c = validation.as_finite_float32(centroids, "IVF centroids")
        if c.ndim != 2 or len(c) == 0:
            raise ValueError(f"IVF centroids have shape {c.shape}: expected (K_IVF >= 1, d)")
        self.centroids = c
        self.batch_size = int(batch_size)
        self._on_device = jax.device_put(c)  # one copy for the whole run, not one per batch

    @property
    def d(self) -> int:
        return self.centroids.shape[1]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.d:
            raise ValueError(f"vectors of shape {x.shape} cannot be assigned to IVF centroids of dimension {self.d}")
        return codec.nearest_rows(x, self._on_device, batch_size=self.batch_size)


def ivf_residuals(x: np.ndarray, centroids: np.ndarray, assign: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32) - np.asarray(centroids, np.float32)[assign]




def qinco2_exact_init(params: dict, config) -> dict:
    """QINCo2 parameters (concat and `down` layers already zero, as QINCo2 initialises
    them) changed so that every step adds exactly its codeword c, so the untrained
    model decodes as the RQ its codebooks come from. With the outer skip a step adds
    c + P_out P_in c: the out projection is zeroed (its gradient, through z = P_in c,
    is not zero, and then reaches the rest), or without projections (de = d, where the
    step adds c + c) the codebook is halved; the substep codebook keeps c, the RQ
    codeword the pre-selection compares residuals with. In qinco1_mode (no outer skip)
    a step adds P_out P_in c, exact only without projections. Pure."""
    import jax
    import jax.numpy as jnp

    steps = dict(params["steps"])
    if not config.outer_skip:
        if config.has_projections:
            raise ValueError("init rq_exact in qinco1_mode needs de = d: a step's projections "
                             "P_out P_in cannot start as the identity")
        return params
    if config.has_projections:
        steps["out_proj"] = jax.tree.map(jnp.zeros_like, steps["out_proj"])
    else:
        steps["codebook"] = steps["codebook"] / 2
    return {**params, "steps": steps}


def zero_network_init(params: dict) -> dict:
    """The parameters with every step's network made the identity on its codeword: the
    concat block (codeword and input halves and bias; for QINCo-LR only its low-rank
    output `concat_out`, so that the gradient still reaches the two halves) and every
    residual block's `down` kernel zeroed: the concat block gives c + 0 and every
    residual block z + 0. Applied after the RQ codebooks are set, the model
    decodes exactly as that RQ, so training starts at the RQ's error and the first
    gradient steps can only improve it (the idea of QINCo2's zero-initialised output
    layers). The `up` kernels keep their random values: the gradient reaches `down`
    through them. Pure: returns a new pytree, the input is unchanged."""
    import jax
    import jax.numpy as jnp

    steps = dict(params["steps"])
    lowrank = "concat_out" in steps
    zeroed = ("concat_out",) if lowrank else ("concat_codeword", "concat_input")
    for name in list(steps):
        layer = steps[name]
        if name in zeroed:
            steps[name] = jax.tree.map(jnp.zeros_like, layer)
        elif name.startswith("residual_blocks_"):
            steps[name] = {**layer, "down": jax.tree.map(jnp.zeros_like, layer["down"])}
    return {**params, "steps": steps}
