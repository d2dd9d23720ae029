"""Batched, jitted encoding and decoding on numpy arrays in raw (unscaled) units.

Every call runs a fixed-shape jitted function on batches of `batch_size` rows; the last
batch is padded, so an input of any length reuses the compiled function. Inputs
shorter than a batch are padded to the next power of two instead, which bounds the
number of compilations to log2(batch_size) while keeping small calls (a search
shortlist, a test) cheap.

Normalisation follows the references exactly (model.Normalisation): QINCo v1 divides x
by db_scale in float32 before the model sees it, QINCo2 computes (x - mean) / std;
reconstructions are mapped back.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qinco_jax.models import qinco as qm
from qinco_jax.data import validation
from qinco_jax.formats import vecs_io
from qinco_jax.config import EncodeOptions
from qinco_jax.models.qinco import AnyModel, PQQincoModel, QincoModel

DTYPES = {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}

# Encoding holds batch x K x max(d, h) activations. On a CPU the fastest batches keep
# them in the core caches; a GPU wants enough rows to fill its SMs.
ENCODE_ACTIVATION_BYTES = {"cpu": 8 << 20, "gpu": 1 << 30}
DECODE_BATCH = {"cpu": 4096, "gpu": 65536}

# Precision of the float32 matrix products inside the codec's jitted kernels (encode,
# decode, IVF assignment, and the re-ranking that decodes through them). GPUs run
# float32 products in TF32 by default, which changes some codes; "highest" keeps full
# float32 so that encoding agrees with the reference (and with the CPU) everywhere.
# Faster GPU modes: "default" / "high" (TF32 or bf16 passes, as XLA picks) or a
# jax.lax.DotAlgorithmPreset name such as "BF16_BF16_F32"; on a CPU all compute alike.
# The command-line programs read QINCO_MATMUL_PRECISION.
MATMUL_PRECISION_ENV = "QINCO_MATMUL_PRECISION"


def _checked_precision(precision: str, what: str = "matmul precision") -> str:
    try:
        with jax.default_matmul_precision(precision):
            pass
    except ValueError as e:
        raise ValueError(f"unknown {what} {precision!r}: {e}") from None
    return precision


_matmul_precision = _checked_precision(os.environ.get(MATMUL_PRECISION_ENV, "highest"), MATMUL_PRECISION_ENV)


def matmul_precision() -> str:
    return _matmul_precision


def set_matmul_precision(precision: str) -> None:
    """Set the kernels' matmul precision (a jax.default_matmul_precision value). The
    precision is read when a kernel compiles, so jax's compiled functions are cleared."""
    global _matmul_precision
    precision = _checked_precision(precision)
    if precision != _matmul_precision:
        _matmul_precision = precision
        jax.clear_caches()


def backend() -> str:
    """"cpu" or "gpu": which default batch sizes apply."""
    return "cpu" if jax.default_backend() == "cpu" else "gpu"


def model_encode_defaults(model: AnyModel) -> tuple[int, int, str]:
    """(beam, preselect, proxy) a model encodes with unless told otherwise: QINCo2's own
    B and A with its substep codebooks (greedy, all K codewords when A = 0), and
    greedy search over all K codewords for QINCo v1 (the reference's encoding)."""
    if isinstance(model, PQQincoModel):
        return 1, 0, "linear"
    c = model.config
    if c.is_qinco2:
        return c.B, c.A, "substep" if c.has_substep else "linear"
    return 1, 0, "linear"


def default_encode_batch_size(model: AnyModel, beam: int = 1, preselect: int = 0) -> int:
    if isinstance(model, PQQincoModel):
        return min(default_encode_batch_size(s, beam, preselect) for s in model.subs)
    c = model.config
    candidates = c.K if not preselect or preselect >= c.K else preselect
    per_vector = beam * candidates * max(c.d, c.embed_dim, c.h) * 4
    budget = ENCODE_ACTIVATION_BYTES[backend()]
    return int(max(8, min(16384, 2 ** int(np.log2(max(1, budget // per_vector))))))


def default_decode_batch_size() -> int:
    return DECODE_BATCH[backend()]


def resolve_dtype(dtype) -> jnp.dtype:
    if dtype is None:
        return jnp.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    return jnp.dtype(dtype)


def map_batches(fn: Callable, inputs: Sequence[np.ndarray], batch_size: int,
                progress: str | None = None) -> list[np.ndarray]:
    """Apply a jitted `fn(*batch_inputs) -> tuple of arrays` over row batches.

    The next batch is dispatched before the previous result is fetched, so the host
    prepares and copies batch i+1 while the device computes batch i."""
    n = len(inputs[0])
    if n == 0:
        raise ValueError("no vectors to process (empty input)")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    bs = int(batch_size) if n >= batch_size else 1 << int(np.ceil(np.log2(n)))
    bar = _progress_bar(n, progress)
    outputs: list[list[np.ndarray]] = []
    pending = None

    def fetch(item):
        res, count = item
        outputs.append([np.asarray(r)[:count] for r in res])
        if bar is not None:
            bar.update(count)

    for i0 in range(0, n, bs):
        batch = [np.asarray(a[i0:i0 + bs]) for a in inputs]
        for a, b in zip(inputs, batch):  # NaN/Inf never become codes; named with the row (and file)
            validation.check_finite(b, "input vectors", i0, validation.source_of(a))
        batch = [_pad_rows(b, bs) for b in batch]
        res = fn(*batch)
        if pending is not None:
            fetch(pending)
            for a in inputs:  # a memory map's resident pages: a few batches, not the file
                vecs_io.release(a[i0 - bs:i0])
        pending = (res, min(bs, n - i0))
    fetch(pending)
    if bar is not None:
        bar.close()
    return [np.concatenate(parts) for parts in zip(*outputs)]


def _pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
    if len(a) == rows:
        return a
    return np.concatenate([a, np.zeros((rows - len(a),) + a.shape[1:], a.dtype)])


def _progress_bar(total: int, desc: str | None):
    if not desc:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="vec", unit_scale=True, leave=False)


# --------------------------------------------------------------------------------------
# Jitted kernels (one batch, model units)
# --------------------------------------------------------------------------------------


def _cast(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype), tree)


def network_params(params):
    """The parameters the jitted kernels use (QINCo2's normalisation and running
    statistics are applied on the host or not at all)."""
    return {"codebook0": params["codebook0"], "steps": params["steps"]}


@functools.partial(jax.jit, static_argnames=("dtype", "search", "outer_skip", "single_list"))
def encode_batch(params, x, code0, dtype, search: tuple[int, int, str], outer_skip: bool = False,
                 single_list: bool = False):
    """One batch: codes and squared errors (model units); code0 None or imposed first
    codes; search = (beam, preselect, proxy). single_list: the first step keeps the one
    nearest codeword whatever the beam (an IVF model's list, see `encode`)."""
    beam, preselect, proxy = search
    with jax.default_matmul_precision(_matmul_precision):
        if code0 is None and single_list:
            code0 = qm.nearest_codeword(x, params["codebook0"])
        codes, xhat = qm.encode(_cast(params, dtype), x.astype(dtype), code0, beam=beam,
                                 preselect=preselect, proxy=proxy, outer_skip=outer_skip)
        return codes, jnp.sum((xhat.astype(jnp.float32) - x) ** 2, axis=1)


@functools.partial(jax.jit, static_argnames=("dtype", "outer_skip"))
def decode_batch(params, codes, dtype, outer_skip=False):
    with jax.default_matmul_precision(_matmul_precision):
        return (qm.decode(_cast(params, dtype), codes, outer_skip=outer_skip).astype(jnp.float32),)


@jax.jit
def _assign_batch(codebook, x):
    with jax.default_matmul_precision(_matmul_precision):
        return (qm.nearest_codeword(x, codebook),)


# --------------------------------------------------------------------------------------
# Public API (raw units, numpy in and out)
# --------------------------------------------------------------------------------------


def _check_vectors(model: AnyModel, x: np.ndarray) -> np.ndarray:
    x = validation.check_vectors(x)  # dtype checked; a memory map stays one (map_batches names its file)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array of vectors, got shape {x.shape}")
    if x.shape[1] != model.d:
        raise ValueError(f"vectors have dimension {x.shape[1]}, the model ({model.describe()}) expects d={model.d}")
    return x


def check_codes(model: AnyModel, codes: np.ndarray) -> np.ndarray:
    """Codes as int32, after checking their width and range against the model."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] != model.code_width:
        raise ValueError(f"codes have shape {codes.shape}, the model ({model.describe()}) "
                         f"needs (n, {model.code_width})")
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
    if len(codes):
        sizes = np.array(model.code_sizes)
        if codes.min() < 0 or np.any(codes.max(axis=0) >= sizes):
            bad = int(np.argmax((codes.max(axis=0) >= sizes) | (codes.min(axis=0) < 0)))
            raise ValueError(f"code column {bad} has values outside [0, {sizes[bad]})")
    return codes.astype(np.int32, copy=False)


def nearest_rows(x: np.ndarray, codebook: np.ndarray, *, scale: float = 1.0, batch_size: int = 4096,
                 progress: str | None = None) -> np.ndarray:
    """The exact nearest row of `codebook` (int32) for every row of x / scale, in
    batches (x may be a memory map); codebooks of 2^20 rows are scanned in chunks."""
    codebook = jax.device_put(jnp.asarray(codebook, jnp.float32))
    fn = lambda xb: _assign_batch(codebook, np.asarray(xb, np.float32) / np.float32(scale))
    (codes,) = map_batches(fn, [x], batch_size, progress)
    return codes


def assign_ivf(model: QincoModel, x: np.ndarray, batch_size: int = 4096, progress: str | None = None) -> np.ndarray:
    """The exact nearest IVF centroid (first code) of every raw vector, in model units
    as the encoder computes it."""
    x = _check_vectors(model, x)
    codebook = jax.device_put(jnp.asarray(model.params["codebook0"], jnp.float32))
    (codes,) = map_batches(lambda xb: _assign_batch(codebook, model.normalise(xb)), [x], batch_size, progress)
    return codes


def resolve_options(model: AnyModel, options: EncodeOptions | None) -> EncodeOptions:
    """`options` (default: EncodeOptions()) with the model's defaults filled in."""
    if options is None:
        options = EncodeOptions()
    if not isinstance(options, EncodeOptions):
        raise TypeError(f"options must be a qinco_jax.config.EncodeOptions, got {type(options).__name__}")
    return options.resolved(*model_encode_defaults(model))


def encode(model: AnyModel, x: np.ndarray, options: EncodeOptions | None = None, *,
           code0: np.ndarray | None = None, progress: str | None = None, return_errors: bool = False):
    """Codes (n, code_width) int32 of raw vectors x (n, d).

    options (EncodeOptions): greedy by default, as the reference encodes; beam > 1
    keeps that many partial codes per step, preselect = A < K runs the network on A
    pre-selected codewords per step only (the QINCo2 paper's two speed/accuracy knobs;
    no retraining); dtype and batch_size say how the network runs. Options left None
    take the model's own values (model_encode_defaults): greedy for QINCo v1, QINCo2's
    beam of B with A candidates pre-selected by its substep codebooks.
    IVF models keep each vector's nearest IVF list (first code, as assign_ivf) whatever
    the beam; the beam searches the codes within it.
    code0: first codes to impose instead (IVF lists computed elsewhere, e.g. by an HNSW
    quantizer). return_errors: also return each vector's squared reconstruction error
    in raw units."""
    x = _check_vectors(model, x)
    opts = resolve_options(model, options)
    if isinstance(model, PQQincoModel):
        if code0 is not None:
            raise ValueError("code0 applies to IVF models, not to PQ-QINCo")
        return _encode_pq(model, x, opts, progress, return_errors)
    if opts.proxy == "substep" and not model.config.has_substep:
        raise ValueError(f"pre-selection proxy 'substep' needs substep codebooks, which {model.describe()} "
                         "does not have (use 'linear' or 'codebook')")
    dt = resolve_dtype(opts.dtype)
    search = (opts.beam, opts.preselect, opts.proxy)
    bs = default_encode_batch_size(model, opts.beam, opts.preselect) if opts.batch_size is None else opts.batch_size
    params = jax.device_put(network_params(model.params))
    c = model.config
    if code0 is None:
        # An IVF model (v1 or QINCo2) keeps each vector's nearest list whatever the beam,
        # as faiss's IVF assigns: a list picked by the beam lowers the MSE but files the
        # vector where the queries near it do not probe.
        fn = lambda xb: encode_batch(params, model.normalise(xb), None, dt, search, c.outer_skip, c.is_ivf)
        codes, err = map_batches(fn, [x], bs, progress)
    else:
        code0 = np.asarray(code0).astype(np.int32).reshape(-1)
        if len(code0) != len(x):
            raise ValueError(f"code0 has {len(code0)} entries for {len(x)} vectors")
        if code0.min(initial=0) < 0 or code0.max(initial=0) >= model.config.codebook0_size:
            raise ValueError(f"code0 values must lie in [0, {model.config.codebook0_size})")
        fn = lambda xb, cb: encode_batch(params, model.normalise(xb), cb, dt, search, c.outer_skip)
        codes, err = map_batches(fn, [x, code0], bs, progress)
    if return_errors:
        return codes, err * model.normalisation.std ** 2
    return codes


def decode(model: AnyModel, codes: np.ndarray, *, batch_size: int | None = None, dtype=None,
           progress: str | None = None) -> np.ndarray:
    """Raw-unit reconstructions (n, d) float32 of codes (n, code_width)."""
    codes = check_codes(model, codes)
    if isinstance(model, PQQincoModel):
        return _decode_pq(model, codes, batch_size, dtype, progress)
    dt = resolve_dtype(dtype)
    params = jax.device_put(network_params(model.params))
    fn = lambda cb: decode_batch(params, cb, dt, model.config.outer_skip)
    (xhat,) = map_batches(fn, [codes], default_decode_batch_size() if batch_size is None else batch_size, progress)
    return model.denormalise(xhat)


def _split_columns(model: PQQincoModel, width_of) -> list[slice]:
    out, i0 = [], 0
    for s in model.subs:
        out.append(slice(i0, i0 + width_of(s)))
        i0 += width_of(s)
    return out


def _encode_pq(model: PQQincoModel, x, options: EncodeOptions, progress, return_errors):
    xr = validation.as_finite_float32(x, "input vectors")
    if model.opq is not None:
        xr = xr @ model.opq.T
    codes = np.concatenate(
        [encode(sub, np.ascontiguousarray(xr[:, cols]), options, progress=progress)
         for sub, cols in zip(model.subs, _split_columns(model, lambda s: s.d))], axis=1)
    if not return_errors:
        return codes
    # Measured in the input space: a non-square OPQ does not preserve distances.
    y = _decode_pq(model, codes, None, options.dtype, None)
    return codes, np.sum((np.asarray(x, np.float32) - y) ** 2, axis=1)


def _decode_pq(model: PQQincoModel, codes, batch_size, dtype, progress):
    parts = [decode(sub, codes[:, cols], batch_size=batch_size, dtype=dtype, progress=progress)
             for sub, cols in zip(model.subs, _split_columns(model, lambda s: s.code_width))]
    y = np.concatenate(parts, axis=1)
    return y @ model.opq if model.opq is not None else y

