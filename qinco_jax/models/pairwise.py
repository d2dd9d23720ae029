"""The pairwise additive decoder: a cheap approximate decoder for IVF codes (QINCo2's
middle re-ranking stage).

A code of an IVF model is (list, c_1 .. c_M). The decoder sees M + 5 *code streams*:
the M model codes, then 5 sub-codes of the IVF list — the list's centroid quantized by
a 5-stage residual quantizer (RQ) over the centroids. It holds T tables (T = 2·M by
default), each indexed by a *pair* of streams (a_t, b_t):

    x ≈ centroid[list] + sum_t table_t[s_{a_t} · K + s_{b_t}]          (raw units)

where K is the model's codebook size (every stream, the IVF sub-codes included, takes
values in [0, K), so each table has K² rows). Decoding costs T look-ups and adds per
vector, against a full network pass per step for the model itself.

Training (`train_pairwise_decoder`) works on the residuals r = x - centroid[list], all
in raw units (the reference adds tables trained on raw residuals to normalised
centroids; here nothing is ever normalised):

1. IVF sub-codes: 5 rounds of k-means over the centroids, each centroid weighted by
   the number of training vectors in its list, each round on what the previous rounds
   left. With fewer centroids than K the reference fails (it draws K distinct centroids
   to seed k-means); here each round has min(K, nlist) codewords, so the sub-codes
   still lie in [0, K) and the file format is unchanged — with nlist <= K the first
   round reproduces every populated centroid exactly and the later ones see zeros.
2. Tables, greedily: for every candidate pair of streams, the best table for it is the
   mean residual per pair of codes, and subtracting it lowers the training sum of
   squared errors by exactly sum_k |S_k|² / n_k (S_k, n_k: sum and count of the
   residuals with pair-code k). Each round computes that gain for every pair (one
   segment-sum pass over the data per pair), keeps the pair with the largest gain
   and subtracts its table from the residuals. The reference measures each candidate
   on the first 100k residuals instead; the exact gain needs no second pass.

Files: the reference's `PairwiseDecoderIVF.state_dict()` saved by `torch.save` — a
dict {ivf_code_map (nlist, 5) int64, combine_mvals_m (2, T) int64, codebook_MKD
(T, K², D) float32}. `load_pairwise_decoder` reads it without torch, and
`save_pairwise_decoder` writes it so that the reference (and `torch.load(...,
weights_only=True)`) reads it back. The file holds neither M nor the centroids: M is
the width of the codes given to `decode` (minus the list column), and the centroids
are the IVF model's, in raw units.

Compact tables (`compact`), for search: the decode reads T random rows of D values per
candidate and is bound by those reads, so smaller rows decode faster. float16 tables
are cast to float32 after each look-up; int8 tables hold round(table / scale) with one
symmetric scale per (table, dimension) (max |column| / 127; 0 for an all-zero column)
and are multiplied by it after each look-up. Either way the sum is accumulated in
float32. Only float32 tables go to files: `save_pairwise_decoder` writes the
dequantised float32 tables of a compact decoder (so the file decodes as that decoder
did), `load_pairwise_decoder` always gives float32 tables.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from qinco_jax.data import validation
from qinco_jax.formats.io import atomic_path
from qinco_jax.formats.torch_pickle import CheckpointError, TorchWriter, load_pt, read_extra_record, write_pt

# Stages of the residual quantizer over the IVF centroids (the reference's IVF_M).
IVF_SUBCODE_STAGES = 5
# Lloyd iterations per stage at most (the reference's ITER_STEPS); stops earlier once
# no assignment changes.
KMEANS_ITERATIONS = 50
# Tables per model code stream by default (the reference's n_pairwise_codebooks).
DEFAULT_TABLES_PER_CODE = 2
# Rows per batch for decode and for the distance computations of the centroid RQ.
DECODE_BATCH_SIZE = 16384
_KMEANS_CHUNK = 16384

# Storage of the tables (`compact`): the name of each, and its numpy dtype. bfloat16 is
# left out on purpose: XLA on CPU converts it ~100x slower than it gathers float32.
TABLE_DTYPES = ("float32", "float16", "int8")
_INT8_LEVELS = 127  # symmetric: codes in [-127, 127], so -x is exact

# The keys of the reference's state_dict, in its order.
_FILE_KEYS = ("ivf_code_map", "combine_mvals_m", "codebook_MKD")
# The archive entry where this library records the model a decoder belongs to.
_FINGERPRINT_RECORD = "qinco_jax.json"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PairwiseDecoder:
    """The decoder's arrays (a jax pytree; numpy arrays when built by this module).

    ivf_subcodes: (nlist, 5) int32, the IVF sub-codes of every list (`ivf_code_map`);
    pairs: (2, T) int32, the streams (a_t, b_t) indexing table t (`combine_mvals_m`);
        stream s < M is model code s (codes column s + 1), s >= M is IVF sub-code s - M;
    tables: (T, K², D) raw units (`codebook_MKD`): float32 as trained and read, or the
        compact float16 / int8 storage of `compact`;
    scales: (T, D) float32 for int8 tables (table t, dimension j decodes as
        tables[t, :, j] * scales[t, j]), None for float tables."""

    ivf_subcodes: np.ndarray
    pairs: np.ndarray
    tables: np.ndarray
    scales: np.ndarray | None = None

    @property
    def K(self) -> int:
        return math.isqrt(self.tables.shape[1])

    @property
    def nlist(self) -> int:
        return self.ivf_subcodes.shape[0]

    @property
    def n_tables(self) -> int:
        return self.tables.shape[0]

    @property
    def d(self) -> int:
        return self.tables.shape[2]

    @property
    def table_dtype(self) -> str:
        """How the tables are stored: one of TABLE_DTYPES."""
        return np.dtype(self.tables.dtype).name

    @property
    def min_code_width(self) -> int:
        """The narrowest codes (list + M model codes) that hold every stream a table uses."""
        return 1 + max(0, int(np.max(np.asarray(self.pairs))) + 1 - IVF_SUBCODE_STAGES)


def check_layout(decoder: PairwiseDecoder, what: str = "pairwise decoder") -> None:
    """Shapes and dtypes only (cheap enough for every decode call, even on a device
    decoder): a ValueError naming what is inconsistent."""
    sub, pairs, tables = decoder.ivf_subcodes, decoder.pairs, decoder.tables
    if tables.ndim != 3 or tables.shape[0] == 0 or tables.shape[2] == 0:
        raise ValueError(f"{what}: tables must have shape (T, K*K, D) with T, D > 0, got {tables.shape}")
    if np.dtype(tables.dtype).name not in TABLE_DTYPES:
        raise ValueError(f"{what}: tables must be stored as one of {', '.join(TABLE_DTYPES)}, got {tables.dtype}")
    K = math.isqrt(tables.shape[1])
    if K * K != tables.shape[1] or K == 0:
        raise ValueError(f"{what}: tables have {tables.shape[1]} rows each, not the square K*K of a codebook size")
    T = tables.shape[0]
    if not np.issubdtype(pairs.dtype, np.integer) or pairs.shape != (2, T):
        raise ValueError(f"{what}: the pairs of streams must be integers of shape (2, {T}) for {T} tables, "
                         f"got {pairs.dtype} {pairs.shape}")
    if not np.issubdtype(sub.dtype, np.integer) or sub.ndim != 2 or sub.shape[1] != IVF_SUBCODE_STAGES \
            or sub.shape[0] == 0:
        raise ValueError(f"{what}: the IVF sub-codes must be integers of shape (nlist, {IVF_SUBCODE_STAGES}), "
                         f"got {sub.dtype} {sub.shape}")
    scales = decoder.scales
    if tables.dtype == np.int8:
        if scales is None or scales.dtype != np.float32 or scales.shape != (T, tables.shape[2]):
            got = "none" if scales is None else f"{scales.dtype} {scales.shape}"
            raise ValueError(f"{what}: int8 tables need float32 scales of shape ({T}, {tables.shape[2]}) "
                             f"(one per table and dimension), got {got}")
    elif scales is not None:
        raise ValueError(f"{what}: {tables.dtype} tables take no scales (only int8 tables do), "
                         f"got scales of shape {scales.shape}")


def check_decoder(decoder: PairwiseDecoder, what: str = "pairwise decoder") -> PairwiseDecoder:
    """The decoder with its arrays as numpy arrays (int32 maps, tables in their storage
    dtype; float64 tables become float32), after checking shapes, dtypes, code ranges
    and finiteness: a ValueError naming what is wrong."""
    sub = np.asarray(decoder.ivf_subcodes)
    pairs = np.asarray(decoder.pairs)
    tables = np.asarray(decoder.tables)
    if tables.dtype == np.float64:
        tables = tables.astype(np.float32)
    scales = None if decoder.scales is None else np.asarray(decoder.scales)
    check_layout(PairwiseDecoder(sub, pairs, tables, scales), what)
    K = math.isqrt(tables.shape[1])
    if pairs.min() < 0:
        raise ValueError(f"{what}: negative stream number {pairs.min()} in the pairs")
    if sub.min() < 0 or sub.max() >= K:
        raise ValueError(f"{what}: IVF sub-codes must lie in [0, {K}) for tables of {K}x{K} rows, "
                         f"got values in [{sub.min()}, {sub.max()}]")
    if tables.dtype != np.int8 and not np.all(np.isfinite(tables)):
        raise ValueError(f"{what}: tables hold non-finite values")
    if scales is not None and not (np.all(np.isfinite(scales)) and np.all(scales >= 0)):
        raise ValueError(f"{what}: the int8 tables' scales must be finite and >= 0")
    return PairwiseDecoder(sub.astype(np.int32), pairs.astype(np.int32), tables, scales)


def float32_tables(decoder: PairwiseDecoder) -> np.ndarray:
    """(T, K², D) float32: the tables as they decode (int8 ones dequantised); float32
    tables as they are, not copied."""
    if decoder.table_dtype == "float32":
        return np.asarray(decoder.tables)
    return np.stack([_float32_table(decoder, t) for t in range(decoder.n_tables)])


def _float32_table(decoder: PairwiseDecoder, t: int) -> np.ndarray:
    table = np.asarray(decoder.tables[t]).astype(np.float32)
    return table if decoder.scales is None else table * np.asarray(decoder.scales[t], np.float32)


def compact(decoder: PairwiseDecoder, table_dtype: str) -> PairwiseDecoder:
    """The decoder with its tables stored as `table_dtype` (one of TABLE_DTYPES), for a
    faster search: float16 (half the bytes per look-up, rounding error ~5e-4 relative),
    int8 (a quarter; symmetric per (table, dimension): error at most scale / 2 per
    table and coordinate, scale = max |column| / 127). Starts from the tables as they
    decode, so any decoder (compact or not) may be given; "float32" gives (or restores,
    up to the compact decoder's error) the plain storage."""
    if table_dtype not in TABLE_DTYPES:
        raise ValueError(f"unknown pairwise table dtype {table_dtype!r}: use one of {', '.join(TABLE_DTYPES)}")
    if np.dtype(decoder.tables.dtype).name == table_dtype:
        check_layout(decoder)  # values were checked where it was built or read: not again over every table
        return decoder
    decoder = check_decoder(decoder)
    sub, pairs = decoder.ivf_subcodes, decoder.pairs
    if table_dtype != "int8":
        tables = float32_tables(decoder)
        largest, limit = float(np.abs(tables).max()), float(np.finfo(table_dtype).max)
        if largest > limit:
            raise ValueError(f"pairwise tables hold values up to {largest:g}, beyond the {table_dtype} range "
                             f"({limit:g}): use int8 or float32 tables")
        return PairwiseDecoder(sub, pairs, tables.astype(table_dtype))
    T, _, D = decoder.tables.shape
    scales = np.empty((T, D), np.float32)
    tables = np.empty(decoder.tables.shape, np.int8)
    for t in range(T):  # one table at a time: a float32 copy of all of them can be large
        table = _float32_table(decoder, t)
        scales[t] = np.abs(table).max(axis=0) / _INT8_LEVELS
        safe = np.where(scales[t] > 0, scales[t], 1)  # an all-zero column quantizes to zeros
        tables[t] = np.clip(np.rint(table / safe), -_INT8_LEVELS, _INT8_LEVELS)
    return PairwiseDecoder(sub, pairs, tables, scales)


# --------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------


def code_streams(ivf_subcodes: jax.Array, codes: jax.Array) -> jax.Array:
    """(n, M + 5): the model codes (columns 1..M of `codes`), then the IVF sub-codes
    of the list in column 0."""
    return jnp.concatenate([codes[:, 1:], ivf_subcodes[codes[:, 0]]], axis=1)


@jax.jit
def decode_residual(decoder: PairwiseDecoder, codes: jax.Array) -> jax.Array:
    """(n, D): the sum of the table look-ups for codes (n, 1 + M), list in column 0 —
    the approximation of x - centroid[list], raw units."""
    K = decoder.K
    streams = code_streams(decoder.ivf_subcodes, codes.astype(jnp.int32))
    rows = streams[:, decoder.pairs[0]] * K + streams[:, decoder.pairs[1]]  # (n, T)
    # One gather per table, accumulated: XLA fuses these into a loop over the rows; a
    # single gather of (n, T, D) from the flattened tables then a sum is ~10x slower on CPU.
    # Compact tables are widened (and int8 ones scaled) right after their look-up, so
    # the sum is float32 whatever the storage.
    def look_up(t):
        entries = decoder.tables[t][rows[:, t]].astype(jnp.float32)
        return entries if decoder.scales is None else entries * decoder.scales[t]

    out = look_up(0)
    for t in range(1, decoder.tables.shape[0]):
        out = out + look_up(t)
    return out


@jax.jit
def decode_batch(decoder: PairwiseDecoder, ivf_centroids: jax.Array, codes: jax.Array) -> jax.Array:
    """(n, D) raw-unit reconstructions: centroid of the list + the table look-ups."""
    return ivf_centroids[codes[:, 0]] + decode_residual(decoder, codes)


def check_codes(decoder: PairwiseDecoder, codes: np.ndarray) -> np.ndarray:
    """codes as int32 (n, 1 + M), or a ValueError naming what does not fit the decoder.
    The file does not record M: codes wider than the decoder was trained for are not
    detected (its IVF streams would be read from the wrong columns)."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be an integer array (n, 1 + M) with the IVF list in column 0, "
                         f"got {codes.dtype} {codes.shape}")
    if codes.shape[1] < decoder.min_code_width:
        raise ValueError(f"codes have {codes.shape[1]} columns, the decoder's pairs use streams up to "
                         f"{int(np.max(decoder.pairs))} and so need at least {decoder.min_code_width} "
                         "(list + M model codes)")
    if len(codes):
        lists, model_codes = codes[:, 0], codes[:, 1:]
        if lists.min() < 0 or lists.max() >= decoder.nlist:
            raise ValueError(f"IVF lists (codes column 0) must lie in [0, {decoder.nlist}), "
                             f"got values in [{lists.min()}, {lists.max()}]")
        if model_codes.size and (model_codes.min() < 0 or model_codes.max() >= decoder.K):
            raise ValueError(f"model codes (columns 1..) must lie in [0, {decoder.K}) for this decoder, "
                             f"got values in [{model_codes.min()}, {model_codes.max()}]")
    return codes.astype(np.int32)


def check_centroids(decoder: PairwiseDecoder, ivf_centroids: np.ndarray) -> np.ndarray:
    c = np.asarray(ivf_centroids)
    if c.shape != (decoder.nlist, decoder.d):
        raise ValueError(f"IVF centroids of shape {c.shape} do not fit a decoder over {decoder.nlist} lists "
                         f"of dimension {decoder.d}: expected ({decoder.nlist}, {decoder.d})")
    return c.astype(np.float32)


def decode(decoder: PairwiseDecoder, codes: np.ndarray, ivf_centroids: np.ndarray, *,
           batch_size: int = DECODE_BATCH_SIZE) -> np.ndarray:
    """Raw-unit reconstructions (n, D) float32 of IVF codes (n, 1 + M) (list in column
    0), given the IVF centroids in raw units. Batches have a fixed size (the last one
    padded), so one compilation serves any n.

    The decoder is used as given (checked in full where it was built or read): for
    repeated calls pass it once through `jax.device_put`, which saves copying the
    tables (K²·T·D floats) to the device on every call."""
    check_layout(decoder)
    codes = check_codes(decoder, codes)
    centroids = jnp.asarray(check_centroids(decoder, ivf_centroids))
    dev = jax.device_put(decoder)  # a no-op for a decoder already on the device
    n = len(codes)
    out = np.empty((n, decoder.d), np.float32)
    bs = max(1, min(batch_size, n))
    for i0 in range(0, n, bs):
        chunk = codes[i0:i0 + bs]
        m = len(chunk)
        if m < bs:
            chunk = np.concatenate([chunk, np.zeros((bs - m, chunk.shape[1]), np.int32)])
        out[i0:i0 + m] = np.asarray(decode_batch(dev, centroids, jnp.asarray(chunk)))[:m]
    return out


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def _weighted_kmeans(points: np.ndarray, weights: np.ndarray, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Codewords (k, D) and assignment (n,) of a population-weighted k-means.

    Seeds: k distinct points drawn with probability proportional to their weight (the
    reference's choice), the unweighted points only when fewer than k have weight.
    A codeword that loses all its (weighted) points keeps its position."""
    n = len(points)
    populated = np.flatnonzero(weights > 0)
    if len(populated) >= k:
        seeds = rng.choice(populated, size=k, replace=False, p=weights[populated] / weights[populated].sum())
    else:
        rest = np.setdiff1d(np.arange(n), populated)
        seeds = np.concatenate([populated, rng.choice(rest, size=k - len(populated), replace=False)])
    codewords = points[seeds].astype(np.float64)
    assign = np.full(n, -1, np.int64)
    for _ in range(KMEANS_ITERATIONS):
        new = np.concatenate([_nearest(points[i:i + _KMEANS_CHUNK], codewords)
                              for i in range(0, n, _KMEANS_CHUNK)])
        if np.array_equal(new, assign):
            break
        assign = new
        mass = np.bincount(assign, weights=weights, minlength=k)
        sums = np.zeros_like(codewords)
        np.add.at(sums, assign, points * weights[:, None])
        moved = mass > 0
        codewords[moved] = sums[moved] / mass[moved, None]
    return codewords, assign


def _nearest(points: np.ndarray, codewords: np.ndarray) -> np.ndarray:
    d2 = (codewords**2).sum(1)[None, :] - 2 * points @ codewords.T
    return d2.argmin(1)


def ivf_subcodes(ivf_centroids: np.ndarray, list_sizes: np.ndarray, K: int, *,
                 seed: int = 0) -> np.ndarray:
    """(nlist, 5) int32 sub-codes of the IVF centroids (raw units): a 5-stage RQ of
    min(K, nlist) codewords per stage, population-weighted by `list_sizes` (the number
    of training vectors per list). See the module doc for nlist < K."""
    c = np.asarray(ivf_centroids, np.float64)
    w = np.asarray(list_sizes, np.float64)
    if c.ndim != 2 or len(c) == 0:
        raise ValueError(f"IVF centroids must be (nlist, D) with nlist > 0, got {c.shape}")
    if w.shape != (len(c),) or (w < 0).any():
        raise ValueError(f"list sizes must be {len(c)} non-negative counts, got shape {w.shape}")
    if K < 1:
        raise ValueError(f"codebook size K must be positive, got {K}")
    rng = np.random.default_rng(seed)
    k = min(K, len(c))
    remaining = c.copy()
    codes = np.empty((len(c), IVF_SUBCODE_STAGES), np.int32)
    for stage in range(IVF_SUBCODE_STAGES):
        codewords, assign = _weighted_kmeans(remaining, w, k, rng)
        codes[:, stage] = assign
        remaining -= codewords[assign]
    return codes


# Shrinkage chosen on held-out rows when none is given (`train_pairwise_decoder`): the
# candidates, tried in increasing order; the share of the training rows held out for
# the choice and its bounds; below MIN_ROWS_TO_CHOOSE rows there is nothing to hold
# out and the plain means (0) are used.
SHRINKAGE_GRID = (0.0, 1.0, 4.0, 16.0, 64.0, 256.0, 1024.0)
SHRINKAGE_VALIDATION_FRACTION = 0.1
SHRINKAGE_VALIDATION_MAX_ROWS = 5000
MIN_ROWS_TO_CHOOSE = 20


@dataclasses.dataclass(frozen=True)
class PairwiseTraining:
    """A trained decoder and its training MSE (mean squared L2 error per vector, raw
    units): `train_mse[0]` with the IVF centroids alone, `train_mse[t]` after t tables.

    shrinkage: the λ the tables were trained with; shrinkage_chosen: True when it was
    chosen on held-out rows (none given), False when given; validation_mse: the
    choice's ((λ, held-out MSE), ...) in the order tried (empty when given)."""

    decoder: PairwiseDecoder
    train_mse: tuple[float, ...]
    shrinkage: float = 0.0
    shrinkage_chosen: bool = False
    validation_mse: tuple[tuple[float, float], ...] = ()


@functools.partial(jax.jit, static_argnames="K")
def _pair_gain(residual: jax.Array, streams: jax.Array, a: jax.Array, b: jax.Array,
               K: int, shrinkage: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(table, gain) for the pair of streams (a, b): table (K², D) = the residuals' sum
    per pair-code over (count + shrinkage) — their mean when shrinkage is 0 —, gain =
    how much subtracting it lowers the sum of squared errors: per pair-code of n
    residuals summing to S, |S|² (n + 2λ) / (n + λ)² (|S|² / n for the mean)."""
    rows = streams[:, a] * K + streams[:, b]
    sums = jax.ops.segment_sum(residual, rows, num_segments=K * K)
    counts = jax.ops.segment_sum(jnp.ones(rows.shape, residual.dtype), rows, num_segments=K * K)
    denominator = jnp.maximum(counts + shrinkage, 1e-30)  # empty cells (sum 0) stay 0
    table = sums / denominator[:, None]
    gain = jnp.sum(jnp.sum(sums * table, axis=1) * (counts + 2 * shrinkage) / denominator)
    return table, gain


@functools.partial(jax.jit, static_argnames="K")
def _subtract_table(residual: jax.Array, streams: jax.Array, a: jax.Array, b: jax.Array, K: int,
                    table: jax.Array) -> tuple[jax.Array, jax.Array]:
    residual = residual - table[streams[:, a] * K + streams[:, b]]
    return residual, jnp.sum(residual * residual)


def _fit_tables(residual: jax.Array, streams: jax.Array, K: int, n_tables: int, shrinkage: float,
                progress: bool, what: str) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """The greedy rounds (module doc): (pairs (2, T), tables (T, K², D), MSE after 0..T tables)."""
    n = residual.shape[0]
    n_streams = streams.shape[1]
    candidates = [(a, b) for a in range(n_streams) for b in range(a + 1, n_streams)]
    mse = [float(jnp.sum(residual * residual)) / n]
    tables, pairs = [], []
    bar = _progress(n_tables * len(candidates), progress, what)
    for t in range(n_tables):
        best = None
        for a, b in candidates:
            table, gain = _pair_gain(residual, streams, jnp.int32(a), jnp.int32(b), K, jnp.float32(shrinkage))
            gain = float(gain)
            if best is None or gain > best[0]:
                best = (gain, a, b, table)
            bar.update(1)
        _, a, b, table = best
        residual, sse = _subtract_table(residual, streams, jnp.int32(a), jnp.int32(b), K, table)
        mse.append(float(sse) / n)
        tables.append(np.asarray(table))
        pairs.append((a, b))
        bar.set_postfix(tables=t + 1, mse=f"{mse[-1]:.4g}")
    bar.close()
    return np.asarray(pairs, np.int32).T.copy(), np.stack(tables), mse


def _held_out_mse(residual: jax.Array, streams: jax.Array, K: int, pairs: np.ndarray, tables: np.ndarray) -> float:
    for t in range(len(tables)):
        residual, sse = _subtract_table(residual, streams, jnp.int32(pairs[0, t]), jnp.int32(pairs[1, t]), K,
                                        jnp.asarray(tables[t]))
    return float(sse) / residual.shape[0]


def choose_shrinkage(residual: jax.Array, streams: jax.Array, K: int, n_tables: int, *, seed: int = 0,
                     grid: tuple[float, ...] = SHRINKAGE_GRID, progress: bool = False) -> tuple[float, tuple]:
    """(λ, ((λ, held-out MSE), ...)): the shrinkage of `grid` whose tables, trained on
    all but a held-out SHRINKAGE_VALIDATION_FRACTION of the rows (at most
    SHRINKAGE_VALIDATION_MAX_ROWS, drawn with `seed`), reconstruct the held-out rows
    best. The grid is tried in increasing order and the search stops once two λ in a
    row do worse than the best so far (the held-out MSE falls, then rises, with λ:
    too little shrinkage memorises, too much erases the tables; two, so that one
    noisy step does not end the search)."""
    n = residual.shape[0]
    n_val = min(SHRINKAGE_VALIDATION_MAX_ROWS, max(1, round(SHRINKAGE_VALIDATION_FRACTION * n)))
    order = np.random.default_rng(seed).permutation(n)
    val, fit = jnp.asarray(order[:n_val]), jnp.asarray(order[n_val:])
    tried: list[tuple[float, float]] = []
    for lam in sorted(grid):
        pairs, tables, _ = _fit_tables(residual[fit], streams[fit], K, n_tables, lam, progress,
                                       f"pairwise tables, shrinkage {lam:g} (choice)")
        tried.append((float(lam), _held_out_mse(residual[val], streams[val], K, pairs, tables)))
        best_mse = min(m for _, m in tried)
        if len(tried) >= 3 and tried[-1][1] > best_mse and tried[-2][1] > best_mse:
            break
    best = min(tried, key=lambda lm: lm[1])[0]
    return best, tuple(tried)


def train_pairwise_decoder(x: np.ndarray, codes: np.ndarray, ivf_centroids: np.ndarray, K: int, *,
                           n_tables: int | None = None, seed: int = 0, subcodes: np.ndarray | None = None,
                           shrinkage: float | None = None, progress: bool = True) -> PairwiseTraining:
    """Train a pairwise decoder on vectors x (n, D) raw units, their IVF codes (n, 1 + M)
    (list in column 0, model codes in [0, K)) and the IVF centroids (nlist, D) raw units.

    n_tables: number of tables (default 2·M, the reference's n_pairwise_codebooks=2).
    seed: for the k-means seeds of the IVF sub-codes and the held-out rows; subcodes:
    (nlist, 5) IVF sub-codes to use instead of computing them (e.g. those of another
    decoder). The training set lives on the device whole (n·D floats + n·(M+5)
    codes), as in the reference.
    shrinkage λ >= 0: each table entry is the sum of its residuals over (count + λ)
    instead of their mean (λ = 0, the reference's): entries seen by few training
    vectors shrink towards 0, which keeps K² = 65,536-row tables from memorising a
    training set of fewer vectors than they have rows (tables and pair choice both
    follow λ). None (the default): chosen on rows held out from the training set
    (`choose_shrinkage`; the tables are then refitted on every row with it), which
    costs a few more trainings; the result says which λ (`PairwiseTraining.shrinkage`).
    Pass 0 for the reference's decoder."""
    x = np.asarray(x)
    centroids = np.asarray(ivf_centroids)
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"training vectors must be a float array (n, D), got {x.dtype} {x.shape}")
    validation.check_all_finite(x, "pairwise decoder training vectors")
    if centroids.ndim != 2 or centroids.shape[1] != x.shape[1] or len(centroids) == 0:
        raise ValueError(f"IVF centroids must be (nlist, {x.shape[1]}) with nlist > 0, got {centroids.shape}")
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[0] != len(x) or codes.shape[1] < 2 or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be integers (n, 1 + M) with M >= 1 and n = {len(x)} (the vectors), "
                         f"got {codes.dtype} {codes.shape}")
    if len(x) == 0:
        raise ValueError("no training vectors")
    if K < 1:
        raise ValueError(f"codebook size K must be positive, got {K}")
    M = codes.shape[1] - 1
    nlist = len(centroids)
    lists, model_codes = codes[:, 0], codes[:, 1:]
    if lists.min() < 0 or lists.max() >= nlist:
        raise ValueError(f"IVF lists (codes column 0) must lie in [0, {nlist}), got [{lists.min()}, {lists.max()}]")
    if model_codes.min() < 0 or model_codes.max() >= K:
        raise ValueError(f"model codes must lie in [0, {K}), got [{model_codes.min()}, {model_codes.max()}]")
    if shrinkage is not None and not (math.isfinite(shrinkage) and shrinkage >= 0):
        raise ValueError(f"shrinkage must be a finite number >= 0 (0: table entries are plain means; "
                         f"None: chosen on held-out rows), got {shrinkage}")
    T = DEFAULT_TABLES_PER_CODE * M if n_tables is None else int(n_tables)
    if T < 1:
        raise ValueError(f"the number of tables must be positive, got {T}")

    centroids = centroids.astype(np.float32)
    if subcodes is None:
        subcodes = ivf_subcodes(centroids, np.bincount(lists, minlength=nlist), K, seed=seed)
    else:
        subcodes = np.asarray(subcodes)
        if subcodes.shape != (nlist, IVF_SUBCODE_STAGES) or not np.issubdtype(subcodes.dtype, np.integer) \
                or subcodes.min() < 0 or subcodes.max() >= K:
            raise ValueError(f"IVF sub-codes must be integers in [0, {K}) of shape ({nlist}, {IVF_SUBCODE_STAGES}), "
                             f"got {subcodes.dtype} {subcodes.shape}")
        subcodes = subcodes.astype(np.int32)
    streams = jnp.asarray(np.concatenate([model_codes, subcodes[lists]], axis=1).astype(np.int32))
    residual = jnp.asarray(x.astype(np.float32) - centroids[lists])

    tried: tuple = ()
    chosen = shrinkage is None
    if shrinkage is None:
        shrinkage = 0.0
        if len(x) >= MIN_ROWS_TO_CHOOSE:
            shrinkage, tried = choose_shrinkage(residual, streams, K, T, seed=seed, progress=progress)
    pairs, tables, mse = _fit_tables(residual, streams, K, T, float(shrinkage), progress, "pairwise tables")
    decoder = PairwiseDecoder(subcodes, pairs, tables)
    return PairwiseTraining(check_decoder(decoder), tuple(mse), float(shrinkage), chosen, tried)


def _progress(total: int, enabled: bool, what: str = "pairwise tables"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=what, unit="pair", disable=not enabled)


# --------------------------------------------------------------------------------------
# Files (the reference's format)
# --------------------------------------------------------------------------------------


def load_pairwise_decoder(path: str | os.PathLike) -> PairwiseDecoder:
    """Read the reference's pairwise decoder file (a torch state_dict) without torch;
    its tables as float32 (see `compact` for the search's smaller storage)."""
    path = os.fspath(path)
    state = load_pt(path)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: not a pairwise decoder: holds a {type(state).__name__}, "
                              f"expected a state_dict with keys {list(_FILE_KEYS)}")
    missing = [k for k in _FILE_KEYS if k not in state]
    extra = [k for k in state if k not in _FILE_KEYS]
    if missing or extra:
        raise CheckpointError(f"{path}: not a pairwise decoder: missing keys {missing}, unexpected keys {extra} "
                              f"(expected exactly {list(_FILE_KEYS)})")
    for key in _FILE_KEYS:
        if not isinstance(state[key], np.ndarray):
            raise CheckpointError(f"{path}: {key} is a {type(state[key]).__name__}, not a tensor")
    tables = state["codebook_MKD"]
    if np.issubdtype(tables.dtype, np.floating):  # the reference's float32; other widths read as float32
        tables = tables.astype(np.float32, copy=False)
    decoder = PairwiseDecoder(state["ivf_code_map"], state["combine_mvals_m"], tables)
    try:
        return check_decoder(decoder, what=path)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def save_pairwise_decoder(decoder: PairwiseDecoder, path: str | os.PathLike, *,
                          model_fingerprint: str | None = None, shrinkage: float | None = None,
                          shrinkage_chosen: bool = False) -> None:
    """Write the decoder as the reference saves it (torch state_dict: int64 maps,
    float32 tables), atomically. A compact decoder is written with its tables
    dequantised to float32 (the format has no other storage): the file decodes as the
    compact decoder does, not as the float32 decoder it was made from.
    model_fingerprint: the fingerprint of the model whose codes the decoder was trained
    on (`search.provenance.model_fingerprint`), kept in an archive entry that torch and
    the reference ignore; `read_model_fingerprint` reads it back. shrinkage (and
    whether it was chosen on held-out rows, `PairwiseTraining`): recorded in the same
    entry (`read_decoder_metadata`)."""
    decoder = check_decoder(decoder)
    decoder = PairwiseDecoder(decoder.ivf_subcodes, decoder.pairs, float32_tables(decoder))
    writer = TorchWriter()
    state = {
        "ivf_code_map": writer.plain_tensor(decoder.ivf_subcodes.astype(np.int64)),
        "combine_mvals_m": writer.plain_tensor(decoder.pairs.astype(np.int64)),
        "codebook_MKD": writer.plain_tensor(decoder.tables),
    }
    record = {}
    if model_fingerprint:
        record["model_fingerprint"] = model_fingerprint
    if shrinkage is not None:
        record.update(shrinkage=float(shrinkage), shrinkage_chosen=bool(shrinkage_chosen))
    extra = {_FINGERPRINT_RECORD: json.dumps(record).encode()} if record else None
    with atomic_path(path) as tmp:
        write_pt(tmp, writer, state, archive_name=os.path.splitext(os.path.basename(os.fspath(path)))[0],
                 extra_records=extra)


def read_decoder_metadata(path: str | os.PathLike) -> dict:
    """What this library recorded beside the tables when it wrote a decoder file
    (model_fingerprint, shrinkage, shrinkage_chosen; any may be missing): {} for the
    reference's files or an unreadable record."""
    raw = read_extra_record(path, _FINGERPRINT_RECORD)
    if raw is None:
        return {}
    try:
        value = json.loads(raw.decode())
    except (ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def read_model_fingerprint(path: str | os.PathLike) -> str | None:
    """The fingerprint of the model a decoder file was trained for, if this library
    recorded one when it wrote the file (None for the reference's files)."""
    value = read_decoder_metadata(path).get("model_fingerprint")
    return value if isinstance(value, str) else None
