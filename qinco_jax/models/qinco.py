"""The QINCo model family in Flax.

A QINCo quantizer is a plain codebook (`codebook0`: K codewords, or the K_IVF frozen
IVF centroids) followed by neural steps. Every step owns a codebook C (K x d) and turns
it into an input-dependent one: for a codeword c and the current reconstruction x̂,

    z = c + Concat(c, x̂)          Concat: Linear(2d -> d, bias)   or, QINCo-LR,
                                           Linear(2d -> h) then Linear(h -> d), no bias
    z = z + W2 relu(W1 z)          L residual blocks, d -> h -> d, no bias

and x̂ moves to x̂ + z for the chosen codeword. QINCo2 generalises the step (see
QincoStep): projections d -> De -> d around the network, residual blocks of width De,
an outer skip (x̂ moves to x̂ + c + out) and a substep codebook that pre-selects the
codewords the network runs on; QINCo v1 is its configuration De = d, no outer skip
(QINCo2's "qinco1_mode"), no substep.

The concat block is linear, so it splits into a codeword half and an input half. The
codeword half does not depend on x̂: `QincoStep.candidates` computes it once for the
whole codebook (K x d), not once per vector x K as a literal concatenation would.
Decoding uses the same split, so decoding a code gives bit for bit the vector that
encoding chose for it.

Parameters form one plain pytree:

    {"codebook0": f32[K0, d],
     "steps": <QincoStep params, every leaf stacked along a leading axis of size S>}

with S = M - 1 (QINCo, QINCo-LR) or M (IVF-QINCo). QINCo2 steps may add `in_proj`,
`out_proj` and `substep_codebook` leaves, and a QINCo2 model adds two subtrees that
are not trained by gradient: `normalisation` {mean f32[d], std f32[]} and
`xtarget_stats` {mean, var: f32[M, d]} (running statistics used to re-initialise unused
codewords). The top-level functions scan over the stacked steps, so a model compiles
one step body whatever its M. Every size is read from the parameter shapes; the one
non-size, whether a step adds its codeword (`outer_skip`, QINCo2), is a static flag.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qinco_jax.config import PQConfig, QincoConfig

Params = dict[str, Any]


def torch_uniform(fan_in: int):
    """PyTorch's default nn.Linear init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for weights
    and biases alike. Training starts from the same distribution as the reference."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def kaiming_uniform_relu(fan_in: int):
    """PyTorch's kaiming_uniform_(nonlinearity="relu"): U(-sqrt(6/fan_in), sqrt(6/fan_in)),
    QINCo2's init of its projections and `up` layers."""
    bound = np.sqrt(6.0 / fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class ResidualBlock(nn.Module):
    """z + W2 relu(W1 z), no biases. `zero_init`: W2 starts at zero and W1 with
    kaiming-uniform (QINCo2), so that an untrained block is the identity."""

    d: int
    h: int
    zero_init: bool = False

    @nn.compact
    def __call__(self, z):
        up_init = kaiming_uniform_relu(self.d) if self.zero_init else torch_uniform(self.d)
        down_init = nn.initializers.zeros if self.zero_init else torch_uniform(self.h)
        y = nn.Dense(self.h, use_bias=False, kernel_init=up_init, name="up")(z)
        y = nn.Dense(self.d, use_bias=False, kernel_init=down_init, name="down")(nn.relu(y))
        return z + y


class QincoStep(nn.Module):
    """One neural quantization step, QINCo v1 and QINCo2 alike.

    For a codeword c and the current reconstruction x̂ (d-dimensional):

        e = P_in c                           P_in: Linear(d -> De), no bias (absent: De = d)
        z = e + Concat(e, x̂)                Concat: Linear(De + d -> De, bias)
        z = z + W2 relu(W1 z)                L residual blocks, De -> h -> De
        out = P_out z                        P_out: Linear(De -> d), no bias (absent: De = d)

    and the step adds `c + out` (QINCo2, `outer_skip`) or `out` (QINCo v1, QINCo2's
    qinco1_mode) to x̂. QINCo v1 is the configuration De = d, no outer skip, no substep;
    QINCo-LR (v1 only) factors Concat into Linear(2d -> h) then Linear(h -> d), no bias.
    A QINCo2 step may own a plain `substep_codebook` (K x d) that pre-selects the
    codewords the network is run on (see `preselected_candidates`)."""

    d: int
    K: int
    L: int
    h: int
    lowrank: bool = False
    de: int = 0  # 0: De = d, no projections
    outer_skip: bool = False
    substep: bool = False

    @property
    def embed_dim(self) -> int:
        return self.de or self.d

    @property
    def projected(self) -> bool:
        return self.embed_dim != self.d

    def setup(self):
        d, de = self.d, self.embed_dim
        # QINCo2 (outer skip) starts from its RQ initialisation: Concat and every `down`
        # layer are zero, so an untrained step adds its codeword (up to the projections).
        qinco2_init = self.outer_skip
        self.codebook = self.param("codebook", nn.initializers.normal(1.0), (self.K, d))
        if self.projected:
            self.in_proj = nn.Dense(de, use_bias=False, kernel_init=kaiming_uniform_relu(d))
            self.out_proj = nn.Dense(d, use_bias=False, kernel_init=kaiming_uniform_relu(de))
        # The reference's Linear(De + d -> width) on concat(e, x̂), stored as its two halves.
        width = self.h if self.lowrank else de
        init = nn.initializers.zeros if qinco2_init else torch_uniform(de + d)
        self.concat_codeword = nn.Dense(width, use_bias=not self.lowrank, kernel_init=init, bias_init=init)
        self.concat_input = nn.Dense(width, use_bias=False, kernel_init=init)
        if self.lowrank:
            self.concat_out = nn.Dense(d, use_bias=False, kernel_init=torch_uniform(self.h))
        self.residual_blocks = [ResidualBlock(de, self.h, zero_init=qinco2_init) for _ in range(self.L)]
        if self.substep:
            self.substep_codebook = self.param("substep_codebook", nn.initializers.normal(1.0), (self.K, d))

    def _concat_out(self, y):
        return self.concat_out(y) if self.lowrank else y

    def _project_out(self, z):
        return self.out_proj(z) if self.projected else z

    def codeword_term(self, c):
        """e + the codeword half of the concat block (input independent), e = P_in c."""
        e = self.in_proj(c) if self.projected else c
        return e + self._concat_out(self.concat_codeword(e))

    def input_term(self, xhat):
        """The x̂ half of the concat block."""
        return self._concat_out(self.concat_input(xhat))

    def refine(self, z):
        for block in self.residual_blocks:
            z = block(z)
        return z

    def finish(self, z, c):
        """The step's contribution from the refined embedding z of codeword c."""
        out = self._project_out(z)
        return out + c if self.outer_skip else out

    def __call__(self, xhat, codes):
        """The step's contribution for the given codes: (B, d), (B,) -> (B, d).

        The codeword half is computed for the K codewords and gathered, as in
        `candidates`: cheaper than once per row when B > K, and the same numbers."""
        table = self.codeword_term(self.codebook)
        z = self.refine(jnp.take(table, codes, axis=0) + self.input_term(xhat))
        return self.finish(z, jnp.take(self.codebook, codes, axis=0))

    def candidates(self, xhat):
        """The contribution of every codeword for every x̂: (B, d) -> (B, K, d)."""
        table = self.codeword_term(self.codebook)
        z = self.refine(table[None, :, :] + self.input_term(xhat)[:, None, :])
        return self.finish(z, self.codebook[None, :, :])

    def preselected_candidates(self, xhat, residual, n_select: int, proxy: str):
        """The contribution of the `n_select` most promising codewords only.

        Codewords are ranked by a proxy that costs one (B, K) matmul, like the plain
        codebook search of RQ, and the network runs on the selected ones only:
          "substep":  distance from the residual to the step's substep codebook (QINCo2's
                      pre-selection; needs a model trained with A > 0);
          "codebook": distance from the residual to the step's plain codeword c;
          "linear":   distance to the network without its residual blocks,
                      finish(e + Concat(e, x̂), c), which is as cheap (every term is
                      linear: a K x d table plus one vector per row) and sees the input.
        Returns the selected codeword indices (B, A) and their contributions (B, A, d)."""
        table = self.codeword_term(self.codebook)
        if proxy == "substep":
            if not self.substep:
                raise ValueError("pre-selection proxy 'substep' needs a model with substep codebooks "
                                 "(a QINCo2 model trained with A > 0)")
            proxy_vectors, target = self.substep_codebook, residual
        elif proxy == "codebook":
            proxy_vectors, target = self.codebook, residual
        elif proxy == "linear":
            # ||t + u - r||² = ||t||² - 2 t·(r - u) + const(row), with u the x̂ half.
            proxy_vectors = self.finish(table, self.codebook)
            target = residual - self._project_out(self.input_term(xhat))
        else:
            raise ValueError(f"unknown pre-selection proxy {proxy!r}: use 'substep', 'linear' or 'codebook'")
        proxy_vectors = proxy_vectors.astype(jnp.float32)
        scores = jnp.sum(proxy_vectors**2, axis=1) - 2 * target.astype(jnp.float32) @ proxy_vectors.T
        _, selected = jax.lax.top_k(-scores, n_select)
        z = self.refine(jnp.take(table, selected, axis=0) + self.input_term(xhat)[:, None, :])
        return selected.astype(jnp.int32), self.finish(z, jnp.take(self.codebook, selected, axis=0))


# --------------------------------------------------------------------------------------
# Building parameters and reading sizes back from them
# --------------------------------------------------------------------------------------


def step_module(config: QincoConfig) -> QincoStep:
    return QincoStep(d=config.d, K=config.K, L=config.L, h=config.h, lowrank=config.variant == "lowrank",
                     de=config.embed_dim if config.has_projections else 0, outer_skip=config.outer_skip,
                     substep=config.has_substep)


def step_module_from_params(steps: Params, outer_skip: bool = False) -> QincoStep:
    """The QincoStep whose (stacked) parameters these are. Sizes come from the shapes;
    the outer skip (QINCo2 on, QINCo v1 and qinco1_mode off) is not a size: say it."""
    _, K, d = steps["codebook"].shape
    blocks = sorted(k for k in steps if k.startswith("residual_blocks_"))
    if blocks:
        h = steps[blocks[0]]["up"]["kernel"].shape[-1]
    elif "concat_out" in steps:
        h = steps["concat_out"]["kernel"].shape[-2]
    else:
        h = 1  # unused: no block and no low-rank projection reads it
    de = steps["in_proj"]["kernel"].shape[-1] if "in_proj" in steps else 0
    return QincoStep(d=d, K=K, L=len(blocks), h=h, lowrank="concat_out" in steps, de=de,
                     outer_skip=outer_skip, substep="substep_codebook" in steps)


@functools.partial(jax.jit, static_argnums=0)
def _random_params(config: QincoConfig, key: jax.Array) -> Params:
    # Jitted: run op by op, Flax's initialisers take seconds even for a tiny model.
    module = step_module(config)
    key0, key_steps = jax.random.split(key)
    dummy_x = jnp.zeros((1, config.d), jnp.float32)
    dummy_c = jnp.zeros((1,), jnp.int32)
    init_one = lambda k: module.init(k, dummy_x, dummy_c)["params"]
    params = {
        "codebook0": jax.random.normal(key0, (config.codebook0_size, config.d), jnp.float32),
        "steps": jax.vmap(init_one)(jax.random.split(key_steps, config.num_steps)),
    }
    if config.is_qinco2:
        # Not trained by gradient: the normalisation, and the running statistics of each
        # codebook step's target that QINCo2 uses to re-initialise unused codewords.
        params["normalisation"] = {"mean": jnp.zeros((config.d,), jnp.float32),
                                   "std": jnp.ones((), jnp.float32)}
        params["xtarget_stats"] = {"mean": jnp.zeros((config.M, config.d), jnp.float32),
                                   "var": jnp.ones((config.M, config.d), jnp.float32)}
    return params


def init_params(config: QincoConfig, key: jax.Array, codebooks: np.ndarray | None = None,
                codebook0: np.ndarray | None = None) -> Params:
    """Fresh parameters. `codebooks` (M', K, d), if given, fill codebook0 (non-IVF) and
    the step codebooks in order, as the reference initialises from a trained RQ;
    `codebook0` sets the IVF centroids. Both are taken in model (scaled) units."""
    params = _random_params(config, key)
    if codebooks is not None:
        codebooks = np.asarray(codebooks, np.float32)
        first = 0 if config.is_ivf else 1
        expected = (config.num_steps + first, config.K, config.d)
        if codebooks.shape != expected:
            raise ValueError(f"RQ codebooks have shape {codebooks.shape}, the model needs {expected}")
        if not config.is_ivf:
            params["codebook0"] = jnp.asarray(codebooks[0])
        params["steps"]["codebook"] = jnp.asarray(codebooks[first:])
    if codebook0 is not None:
        codebook0 = np.asarray(codebook0, np.float32)
        if codebook0.shape != params["codebook0"].shape:
            raise ValueError(f"codebook0 has shape {codebook0.shape}, the model needs {params['codebook0'].shape}")
        params["codebook0"] = jnp.asarray(codebook0)
    return params


def config_from_params(params: Params, *, variant: str, db_scale: float) -> QincoConfig:
    """The config of a QINCo v1 parameter pytree (sizes read from its shapes)."""
    step = step_module_from_params(params["steps"])
    S = params["steps"]["codebook"].shape[0]
    K0, d = params["codebook0"].shape
    if variant == "ivf":
        return QincoConfig(d=d, K=step.K, M=S, L=step.L, h=step.h, variant="ivf", K_IVF=K0, db_scale=db_scale)
    return QincoConfig(d=d, K=step.K, M=S + 1, L=step.L, h=step.h, variant=variant, db_scale=db_scale)


@functools.lru_cache(maxsize=64)
def param_shapes(config: QincoConfig) -> Params:
    """The parameter pytree of `config` as jax.ShapeDtypeStruct leaves (no computation)."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def check_params(config: QincoConfig, params: Params) -> None:
    """Raise if the parameter shapes are not those of `config`."""
    expected = param_shapes(config)
    got_struct = jax.tree.structure(params)
    if got_struct != jax.tree.structure(expected):
        raise ValueError(f"parameters do not have the structure of {config.describe()}")
    for path, e, g in zip(jax.tree_util.tree_leaves_with_path(expected),
                          jax.tree.leaves(expected), jax.tree.leaves(params)):
        if tuple(e.shape) != tuple(np.shape(g)):
            name = jax.tree_util.keystr(path[0])
            raise ValueError(f"parameter {name} has shape {np.shape(g)}, {config.describe()} needs {e.shape}")


# --------------------------------------------------------------------------------------
# Pure functions of the parameters (model units: inputs already divided by db_scale)
# --------------------------------------------------------------------------------------


def nearest_codeword(x: jax.Array, codebook: jax.Array, chunk: int = 65536) -> jax.Array:
    """Index of the nearest row of `codebook` for every row of x, exactly (see
    nearest_codewords; K_IVF = 2^20 codebooks are scanned in chunks)."""
    return nearest_codewords(x, codebook, 1, chunk)[0][:, 0]


def _decode_scan(params: Params, codes: jax.Array, outer_skip: bool, keep_steps: bool):
    """The one decoding loop: final reconstruction, and the partial ones if asked."""
    step = step_module_from_params(params["steps"], outer_skip)
    xhat0 = jnp.take(params["codebook0"], codes[:, 0], axis=0)

    def body(xhat, inputs):
        step_params, step_codes = inputs
        xhat = xhat + step.apply({"params": step_params}, xhat, step_codes)
        return xhat, xhat if keep_steps else None

    return xhat0, jax.lax.scan(body, xhat0, (params["steps"], codes[:, 1:].T))


def decode_steps(params: Params, codes: jax.Array, *, outer_skip: bool = False) -> jax.Array:
    """Partial reconstructions after every step: (B, W) codes -> (W, B, d)."""
    xhat0, (_, xhats) = _decode_scan(params, codes, outer_skip, keep_steps=True)
    return jnp.concatenate([xhat0[None], xhats], axis=0)


def decode(params: Params, codes: jax.Array, *, outer_skip: bool = False) -> jax.Array:
    """Reconstruction (model units) of (B, W) codes."""
    _, (xhat, _) = _decode_scan(params, codes, outer_skip, keep_steps=False)
    return xhat


def squared_distances_to_candidates(residual: jax.Array, cands: jax.Array) -> jax.Array:
    """||residual - cand||² up to the per-row constant ||residual||²: (B, d), (B, K, d) -> (B, K).

    Computed in float32 whatever the network's dtype."""
    cands = cands.astype(jnp.float32)
    residual = residual.astype(jnp.float32)
    return jnp.sum(cands * cands, axis=-1) - 2 * jnp.einsum("bkd,bd->bk", cands, residual)


def encode_greedy(params: Params, x: jax.Array, code0: jax.Array | None = None, *, outer_skip: bool = False):
    """Greedy encoding (model units): (B, d) -> codes (B, W) int32, reconstruction (B, d).

    Every step tries all K codewords for every vector and keeps the nearest to x.
    code0, if given, fixes the first code (IVF lists known in advance)."""
    step = step_module_from_params(params["steps"], outer_skip)
    codebook0 = params["codebook0"]
    if code0 is None:
        code0 = nearest_codeword(x, codebook0)
    xhat0 = jnp.take(codebook0, code0, axis=0)

    def body(xhat, step_params):
        cands = step.apply({"params": step_params}, xhat, method=QincoStep.candidates)
        scores = squared_distances_to_candidates(x - xhat, cands)
        codes = jnp.argmin(scores, axis=1).astype(jnp.int32)
        chosen = jnp.take_along_axis(cands, codes[:, None, None], axis=1)[:, 0]
        return xhat + chosen.astype(xhat.dtype), codes

    xhat, codes = jax.lax.scan(body, xhat0, params["steps"])
    return jnp.concatenate([code0.astype(jnp.int32)[:, None], codes.T], axis=1), xhat


def nearest_codewords(x: jax.Array, codebook: jax.Array, k: int, chunk: int = 65536):
    """The k nearest rows of `codebook` for every row of x, nearest first, and their
    squared distances: (B, d) -> (B, k) int32, (B, k). Rows beyond the codebook size
    (k > K) get index 0 and distance +inf.

    Large codebooks (K_IVF = 2^20) are scanned in chunks of `chunk` rows with a running
    top-k, so memory stays at B x chunk distances; earlier chunks win ties, as in a flat
    search. The distance is computed as the reference does, ||x||² + ||c||² - 2 x·c,
    which decides near-ties the same way."""
    K, d = codebook.shape
    x_norms = jnp.sum(x * x, axis=1, keepdims=True)
    chunk = min(chunk, K)
    n_chunks = -(-K // chunk)
    padded = jnp.zeros((n_chunks * chunk, d), codebook.dtype).at[:K].set(codebook)
    norms = jnp.full((n_chunks * chunk,), jnp.inf, codebook.dtype).at[:K].set(jnp.sum(codebook**2, axis=1))

    def body(best, i):
        c = jax.lax.dynamic_slice_in_dim(padded, i * chunk, chunk)
        n = jax.lax.dynamic_slice_in_dim(norms, i * chunk, chunk)
        dist = x_norms + n - 2 * x @ c.T
        kk = min(k, chunk)
        neg, j = jax.lax.top_k(-dist, kk)
        merged_neg = jnp.concatenate([-best[0], neg], axis=1)
        merged_idx = jnp.concatenate([best[1], j.astype(jnp.int32) + i * chunk], axis=1)
        neg, pos = jax.lax.top_k(merged_neg, k)
        return (-neg, jnp.take_along_axis(merged_idx, pos, axis=1)), None

    B = x.shape[0]
    init = (jnp.full((B, k), jnp.inf, x.dtype), jnp.zeros((B, k), jnp.int32))
    (dist, idx), _ = jax.lax.scan(body, init, jnp.arange(n_chunks))
    return idx, dist


def encode_beam(params: Params, x: jax.Array, code0: jax.Array | None = None, *,
                beam: int, preselect: int = 0, proxy: str = "linear", outer_skip: bool = False):
    """Beam-search encoding (model units): (B, d) -> codes (B, W) int32, reconstruction.

    Keeps the `beam` best partial reconstructions at every step, expands each by the K
    codewords (or the `preselect` = A best by a cheap proxy, see
    QincoStep.preselected_candidates) and keeps the `beam` best by exact squared error.
    The beam starts from the `beam` nearest codewords of codebook0, or from the one
    code0 (as QINCo2 starts after its IVF step). A step that expands a single partial
    code pre-selects max(A, beam) candidates, as QINCo2 does, so that the beam fills.

    Selection runs in two stages: the best min(beam, A) expansions within each beam
    by the same score greedy encoding uses, then the best `beam` of those by total
    error. That is the exact top-`beam` of all expansions, and with beam = 1 it makes
    the same decisions as encode_greedy, bit for bit."""
    step = step_module_from_params(params["steps"], outer_skip)
    N = x.shape[0]
    K = step.K
    A = K if not preselect or preselect >= K else int(preselect)
    codebook0 = params["codebook0"]
    if code0 is not None:
        first = code0.astype(jnp.int32)[:, None]
        err = jnp.sum((x - jnp.take(codebook0, code0, axis=0)) ** 2, axis=1)[:, None].astype(jnp.float32)
    elif beam == 1:
        first = nearest_codeword(x, codebook0)[:, None]
        err = jnp.sum((x - jnp.take(codebook0, first[:, 0], axis=0)) ** 2, axis=1)[:, None].astype(jnp.float32)
    else:
        first, err = nearest_codewords(x, codebook0, min(beam, codebook0.shape[0]))
        err = err.astype(jnp.float32)
    single_start = first.shape[1] == 1
    # Pad to `beam` partial codes; the padding has infinite error so it is never kept
    # while a real expansion is left.
    pad = beam - first.shape[1]
    first = jnp.pad(first, ((0, 0), (0, pad)))
    err = jnp.pad(err, ((0, 0), (0, pad)), constant_values=jnp.inf)
    xhat = jnp.take(codebook0, first, axis=0)  # (N, beam, d)
    S = params["steps"]["codebook"].shape[0]
    history = jnp.zeros((N, beam, S + 1), jnp.int32).at[:, :, 0].set(first)

    def make_body(n_cands: int):
        per_beam = min(beam, n_cands)

        def body(carry, inputs):
            xhat, err, history = carry
            step_params, s = inputs
            flat_xhat = xhat.reshape(N * beam, -1)
            residual = (x[:, None, :] - xhat).reshape(N * beam, -1)
            if n_cands == K:
                cands = step.apply({"params": step_params}, flat_xhat, method=QincoStep.candidates)
                selected = None
            else:
                selected, cands = step.apply({"params": step_params}, flat_xhat, residual, n_cands, proxy,
                                             method=QincoStep.preselected_candidates)
            scores = squared_distances_to_candidates(residual, cands)  # (N*beam, n_cands)
            neg, local = jax.lax.top_k(-scores, per_beam)
            total = (err.reshape(N * beam, 1) - neg).reshape(N, beam * per_beam)
            # Error = ||r||² + partial score; a padded beam stays at +inf.
            neg_total, pick = jax.lax.top_k(-total, beam)
            parent = pick // per_beam
            local = jnp.take_along_axis(local.reshape(N, beam * per_beam), pick, axis=1)
            rows = (jnp.arange(N)[:, None] * beam + parent).reshape(-1)
            chosen = cands[rows, local.reshape(-1)].reshape(N, beam, -1)
            if selected is None:
                codes = local
            else:
                codes = selected[rows, local.reshape(-1)].reshape(N, beam)
            xhat = jnp.take_along_axis(xhat, parent[:, :, None], axis=1) + chosen.astype(xhat.dtype)
            history = jnp.take_along_axis(history, parent[:, :, None], axis=1)
            history = history.at[:, :, s + 1].set(codes.astype(jnp.int32))
            return (xhat, -neg_total, history), None

        return body

    carry = (xhat, err, history)
    steps, first_step = params["steps"], 0
    first_cands = min(K, max(A, beam))
    if single_start and S > 0 and first_cands != A:
        # Peeled: the first step's candidate count differs, so it has its own body.
        carry, _ = make_body(first_cands)(carry, (jax.tree.map(lambda a: a[0], steps), 0))
        steps, first_step = jax.tree.map(lambda a: a[1:], steps), 1
    carry, _ = jax.lax.scan(make_body(A), carry, (steps, jnp.arange(first_step, S)))
    xhat, err, history = carry
    # Beams are sorted best first after every step; without steps, by the first search.
    return history[:, 0], xhat[:, 0]


def encode(params: Params, x: jax.Array, code0: jax.Array | None = None, *,
           beam: int = 1, preselect: int = 0, proxy: str = "linear", outer_skip: bool = False):
    """Codes and reconstruction of x (model units): greedy (the reference's encoding)
    unless a beam or candidate pre-selection is asked for."""
    K = params["steps"]["codebook"].shape[1]
    if beam < 1:
        raise ValueError(f"beam size must be >= 1, got {beam}")
    if preselect < 0:
        raise ValueError(f"preselect must be >= 0 (0 = all K codewords), got {preselect}")
    if beam == 1 and (not preselect or preselect >= K):
        return encode_greedy(params, x, code0, outer_skip=outer_skip)
    return encode_beam(params, x, code0, beam=beam, preselect=preselect, proxy=proxy, outer_skip=outer_skip)


def step_losses(params: Params, x: jax.Array, codes: jax.Array, *, outer_skip: bool = False) -> jax.Array:
    """Sum over the batch of the squared error after every step: (W,) — the training
    objective of the paper (codes come from a no-gradient encode)."""
    xhats = decode_steps(params, codes, outer_skip=outer_skip)
    return jnp.sum((xhats - x[None]) ** 2, axis=(1, 2))


# --------------------------------------------------------------------------------------
# A model: configuration + parameters
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Normalisation:
    """How raw vectors map to model units: y = (x - mean) / std, float32 elementwise as
    the references compute it, and back x = y * std + mean.

    QINCo v1: mean = None (no shift), std = db_scale. QINCo2: the per-dimension mean and
    the scalar std stored in the model (`data_mean`, `data_std` in its files). Squared
    errors in model units are multiplied by std² to give raw units."""

    mean: np.ndarray | None
    std: np.float32

    def normalise(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        if self.mean is not None:
            x = x - self.mean
        return x / self.std

    def denormalise(self, y: np.ndarray) -> np.ndarray:
        y = np.asarray(y, np.float32) * self.std
        return y + self.mean if self.mean is not None else y


@dataclasses.dataclass(frozen=True)
class QincoModel:
    """A QINCo, QINCo-LR, IVF-QINCo or QINCo2 model. `params` are in model units."""

    config: QincoConfig
    params: Params

    def __post_init__(self):
        check_params(self.config, self.params)
        if self.config.is_qinco2:
            std = np.asarray(self.params["normalisation"]["std"])
            if not (np.isfinite(std) and std > 0):
                raise ValueError(f"the normalisation std (data_std) must be a positive finite number, got {std}")

    @classmethod
    def init(cls, config: QincoConfig, key: jax.Array | int = 0, **kwargs) -> "QincoModel":
        if isinstance(key, int):
            key = jax.random.key(key)
        return cls(config, init_params(config, key, **kwargs))

    @property
    def d(self) -> int:
        return self.config.d

    @property
    def code_width(self) -> int:
        return self.config.code_width

    @property
    def code_sizes(self) -> tuple[int, ...]:
        return self.config.code_sizes

    @property
    def normalisation(self) -> Normalisation:
        if self.config.is_qinco2:
            norm = self.params["normalisation"]
            return Normalisation(np.asarray(norm["mean"], np.float32), np.float32(norm["std"]))
        return Normalisation(None, np.float32(self.config.db_scale))

    def normalise(self, x: np.ndarray) -> np.ndarray:
        """Raw vectors (n, d) -> model units, float32."""
        return self.normalisation.normalise(x)

    def denormalise(self, y: np.ndarray) -> np.ndarray:
        """Model units (n, d) -> raw vectors, float32."""
        return self.normalisation.denormalise(y)

    def numpy_params(self) -> Params:
        return jax.tree.map(lambda a: np.asarray(a, np.float32), self.params)

    def describe(self) -> str:
        return self.config.describe()


@dataclasses.dataclass(frozen=True)
class PQQincoModel:
    """PQ-QINCo: sub-quantizers over consecutive sub-vectors, and an optional OPQ
    matrix A (d_out x d): vectors are encoded as x @ A.T, decoded as y @ A. The
    sub-quantizers cover d_out dimensions (d_out = d unless OPQ reduced it)."""

    subs: tuple[QincoModel, ...]
    opq: np.ndarray | None = None

    def __post_init__(self):
        self.config  # validates
        covered = sum(s.d for s in self.subs)
        if self.opq is not None and (self.opq.ndim != 2 or self.opq.shape[0] != covered):
            raise ValueError(f"OPQ matrix has shape {self.opq.shape}, its output must cover the "
                             f"{covered} dimensions of the sub-quantizers")

    @property
    def config(self) -> PQConfig:
        return PQConfig(tuple(s.config for s in self.subs), 0 if self.opq is None else self.opq.shape[1])

    @property
    def d(self) -> int:
        return self.config.d

    @property
    def code_width(self) -> int:
        return sum(s.code_width for s in self.subs)

    @property
    def code_sizes(self) -> tuple[int, ...]:
        return self.config.code_sizes

    def describe(self) -> str:
        return self.config.describe()


AnyModel = QincoModel | PQQincoModel
