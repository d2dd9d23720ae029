"""A JAX search engine for faiss IVF-RQ indexes: the same shortlists as faiss's scan, in
batches, on any JAX device, with the pairwise stage and the QINCo re-ranking in the
same jitted function.

What it reads from the faiss index (`read_ivf_tables`), once, into device arrays:

- the coarse quantizer's centroids (flat or HNSW: both store them);
- the additive quantizer's codebooks (M codebooks of 2^nbits_m codewords, any widths up
  to 16 bits);
- every inverted list's ids and stored codes: the M fine codes and the stored norm
  code, decoded as faiss decodes it for the index's norm encoding (`search_type`:
  `_Nfloat`, `_Nqint8`, `_Nqint4`, `_Ncqint8`, `_Ncqint4`, `_Nlsq2x4`, `_Nrq2x4`; and the
  encodings without a stored norm: `ST_LUT_nonorm` (no norm term), `ST_norm_from_LUT`
  and `ST_decompress` (the exact norm of the reconstruction, which is what faiss computes
  for them)). The *decoded stored* norm matters: the shortlist ranks by it, and exact
  norms give other shortlists than faiss's.

The distance of faiss's L2 by-residual scan of list l for query q and entry x̂ (AQ
reconstruction of the residual) is

    ‖q − c_l‖² + n(x̂) − 2⟨q − c_l, x̂⟩             n(x̂): the decoded stored norm

computed by faiss with one look-up table of ⟨q − c_l, C_m[k]⟩ per (query, probed list).
Here it is rewritten ⟨q − c_l, x̂⟩ = ⟨q, x̂⟩ − ⟨c_l, x̂⟩ (the precomputed-table trick of
faiss's IVF-PQ): each stored entry keeps t = n(x̂) + 2⟨c_l, x̂⟩ (computed once, in float64,
when the engine is built), and each query needs one table ⟨q, C_m[k]⟩ (one matrix
product per batch) whatever the number of probes:

    d(q, x) = ‖q − c_l‖² + t(x) − 2 Σ_m ⟨q, C_m[x_m]⟩.

Rounding differs from faiss's (float32 sums in another order), so distances agree to
~1e-6 relative and two entries whose distances tie to that precision may swap at the
shortlist's edge; entries with equal codes in the same list tie exactly in both.

Layout (what decides the speed): every list is cut into chunks of `chunk` entries (the
last one padded with entries at +inf), all chunks in one (n_chunks, chunk, M) array. A
query's work is the chunks of its nprobe lists, so the per-query number of chunks
varies; queries are grouped by it, rounded up a geometric ladder of sizes (a few static
shapes), and each group is scanned in blocks of queries with a static (queries, slots)
shape. Padding a list to the longest (1,781 entries where the mean is 195 on the main
job) costs as much as faiss's scan; chunks waste at most chunk − 1 entries per list.

Coarse assignment is exact (a matrix product and top-k over all centroids). For an HNSW
coarse quantizer faiss's assignment is approximate: the two engines probe the same lists
only where HNSW finds the exact nearest centroids (always at a large enough efSearch);
elsewhere the JAX engine's shortlists are the better ones. efSearch has no effect here.

One search: coarse assignment (jitted), the chunk plan (numpy, on the host: it needs
the probed lists' sizes), then per block one jitted call from query vectors to results:
look-up table, scan, top-n shortlist, optional pairwise middle stage, QINCo decode of
the shortlist, exact distances, top-k. Blocks are sized to a memory budget (and halved
when the device still runs out of memory), so any batch fits.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qinco_jax.data import validation
from qinco_jax.formats import packing

# Entries per chunk of a list: the unit of padding (a list wastes at most chunk - 1 slots).
DEFAULT_CHUNK = 32
# Most queries per jitted block (CPU: cache-sized blocks are fastest; GPU: big batches).
MAX_BLOCK_QUERIES = {"cpu": 256, "gpu": 8192}
# Bytes of intermediate arrays a block may use (the scan's gathered codes and distances,
# the re-ranking's activations); the device's free memory bounds it too on accelerators.
# CPU: cache-sized blocks (on the shared 2-core test machine, 256 MB blocks ran 3-4x
# slower than 8-32 MB ones at nprobe 16 on a 50k x 128 index).
BLOCK_BYTES = {"cpu": 16 << 20, "gpu": 4 << 30}
# A block takes the queries needing at least 1 / MERGE_RATIO of its first query's slots.
MERGE_RATIO = 1.5
# Slots per query are rounded up this geometric ladder (ratio 2^(1/4)): few shapes, <19% waste.
_LADDER_RATIO = 2 ** 0.25

# faiss's AdditiveQuantizer search_type (by name) -> how the stored norm is decoded.
# (faiss is imported only to read an index: the engine itself runs without it.)
NORM_ENCODINGS = {
    "ST_norm_float": "float", "ST_norm_qint8": "qint8", "ST_norm_qint4": "qint4",
    "ST_norm_cqint8": "cqint", "ST_norm_cqint4": "cqint", "ST_norm_lsq2x4": "cqint",
    "ST_norm_rq2x4": "cqint", "ST_LUT_nonorm": "none", "ST_norm_from_LUT": "exact",
    "ST_decompress": "exact",
}


def search_type_name(search_type: int) -> str:
    import faiss

    names = {getattr(faiss.AdditiveQuantizer, n): n for n in dir(faiss.AdditiveQuantizer) if n.startswith("ST_")}
    return names.get(int(search_type), f"search type {search_type}")


class UnsupportedIndexError(ValueError):
    """The JAX engine does not implement this index's layout (the message says what)."""


# --------------------------------------------------------------------------------------
# Reading the faiss index
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class IvfTables:
    """An IVF additive-quantizer index read into numpy arrays, entries in list order.

    centroids (nlist, d) float32; codebooks (sum_m K_m, d) float32 with codebook m at
    rows offsets[m]:offsets[m+1]; codes (ntotal, M) int32 fine codes; norms (ntotal,)
    float32 decoded stored norms; ids (ntotal,) int64; list_offsets (nlist + 1,)."""

    centroids: np.ndarray
    codebooks: np.ndarray
    offsets: np.ndarray
    codes: np.ndarray
    norms: np.ndarray
    ids: np.ndarray
    list_offsets: np.ndarray
    norm_encoding: str

    @property
    def nlist(self) -> int:
        return len(self.centroids)

    @property
    def d(self) -> int:
        return self.centroids.shape[1]

    @property
    def M(self) -> int:
        return len(self.offsets) - 1

    @property
    def ntotal(self) -> int:
        return len(self.ids)

    def list_sizes(self) -> np.ndarray:
        return np.diff(self.list_offsets)


def _downcast_aq(aq):
    import faiss

    return faiss.downcast_AdditiveQuantizer(aq) if hasattr(faiss, "downcast_AdditiveQuantizer") else aq


def check_supported(index) -> tuple[Any, Any]:
    """(the IVF index downcast, its additive quantizer), or UnsupportedIndexError naming
    the first thing the JAX engine does not implement."""
    import faiss

    ivf = faiss.downcast_index(index)
    if not isinstance(ivf, faiss.IndexIVFAdditiveQuantizer):
        raise UnsupportedIndexError(f"the JAX engine searches IVF additive-quantizer indexes "
                                    f"(IVF<n>,RQ<M>x<b>_N...), not {type(ivf).__name__}")
    if isinstance(ivf, faiss.IndexIVFProductResidualQuantizer) or isinstance(
            ivf, faiss.IndexIVFProductLocalSearchQuantizer):
        raise UnsupportedIndexError(f"the JAX engine does not implement product additive quantizers "
                                    f"({type(ivf).__name__}); use engine='faiss'")
    aq = _downcast_aq(ivf.aq)
    if ivf.metric_type != faiss.METRIC_L2:
        raise UnsupportedIndexError("the JAX engine implements the L2 metric only; this index uses "
                                    f"metric {ivf.metric_type} (use engine='faiss')")
    if not ivf.by_residual:
        raise UnsupportedIndexError("the JAX engine implements by-residual IVF indexes only (by_residual is off)")
    if search_type_name(aq.search_type) not in NORM_ENCODINGS:
        raise UnsupportedIndexError(f"the JAX engine does not implement the AQ search type "
                                    f"{search_type_name(aq.search_type)}")
    nbits = [int(b) for b in faiss.vector_to_array(aq.nbits)]
    if any(b > 16 for b in nbits):
        raise UnsupportedIndexError(f"the JAX engine implements codebooks of at most 2^16 entries; "
                                    f"this index has codes of {nbits} bits")
    return ivf, aq


def _norm_table(aq) -> np.ndarray:
    """The codebook of a clustered norm encoding (cqint8/4, lsq2x4, rq2x4): faiss's qnorm."""
    import faiss

    n = int(aq.qnorm.ntotal)
    return faiss.rev_swig_ptr(aq.qnorm.get_xb(), n).copy()


def decode_norms(aq, norm_codes: np.ndarray, encoding: str) -> np.ndarray:
    """faiss's stored norm codes -> the float32 squared norms its scan uses."""
    c = np.asarray(norm_codes)
    lo, hi = float(aq.norm_min), float(aq.norm_max)
    if encoding == "float":
        return c.astype(np.uint32).view(np.float32)
    if encoding == "qint8":  # faiss: (i + 0.5) / 256 * (max - min) + min, in double
        return ((c + 0.5) / 256 * np.float32(hi - lo) + lo).astype(np.float32)
    if encoding == "qint4":
        return ((c + 0.5) / 16 * np.float32(hi - lo) + lo).astype(np.float32)
    if encoding == "cqint":
        return _norm_table(aq)[c].astype(np.float32)
    raise ValueError(f"no stored norm to decode for encoding {encoding!r}")


def _centroids(ivf) -> np.ndarray:
    import faiss

    quantizer = faiss.downcast_index(ivf.quantizer)
    if quantizer.ntotal != ivf.nlist:
        raise UnsupportedIndexError(f"the coarse quantizer holds {quantizer.ntotal} centroids for "
                                    f"{ivf.nlist} lists (is the index trained?)")
    try:
        return np.ascontiguousarray(quantizer.reconstruct_n(0, ivf.nlist), np.float32)
    except RuntimeError:
        raise UnsupportedIndexError(f"the JAX engine needs the coarse centroids; the coarse quantizer "
                                    f"{type(quantizer).__name__} cannot reconstruct them") from None


def read_ivf_tables(index) -> IvfTables:
    """Read an IVF additive-quantizer index (see the module docstring) into `IvfTables`."""
    import faiss

    ivf, aq = check_supported(index)
    nbits = [int(b) for b in faiss.vector_to_array(aq.nbits)]
    M, d = len(nbits), int(ivf.d)
    offsets = np.concatenate([[0], np.cumsum([1 << b for b in nbits])]).astype(np.int64)
    codebooks = faiss.vector_to_array(aq.codebooks).reshape(-1, d).astype(np.float32)
    if len(codebooks) != offsets[-1]:
        raise UnsupportedIndexError(f"the AQ holds {len(codebooks)} codewords, its codes of {nbits} bits "
                                    f"need {offsets[-1]} (is it trained?)")
    encoding = NORM_ENCODINGS[search_type_name(aq.search_type)]
    norm_bits = int(aq.norm_bits)
    invlists = ivf.invlists
    sizes = np.array([invlists.list_size(l) for l in range(ivf.nlist)], np.int64)
    list_offsets = np.concatenate([[0], np.cumsum(sizes)])
    n = int(list_offsets[-1])
    raw = np.empty((n, ivf.code_size), np.uint8)
    ids = np.empty(n, np.int64)
    for l in np.flatnonzero(sizes):
        a, b = list_offsets[l], list_offsets[l + 1]
        raw[a:b] = faiss.rev_swig_ptr(invlists.get_codes(int(l)), int(sizes[l]) * ivf.code_size).reshape(-1, ivf.code_size)
        ids[a:b] = faiss.rev_swig_ptr(invlists.get_ids(int(l)), int(sizes[l]))
    widths = nbits + ([norm_bits] if norm_bits else [])
    fields = packing.unpack_codes(raw, n, widths) if n else np.zeros((0, len(widths)), np.int32)
    codes = np.ascontiguousarray(fields[:, :M])
    if encoding in ("none",):
        norms = np.zeros(n, np.float32)
    elif encoding == "exact":
        norms = np.square(_reconstruct(codes, codebooks, offsets).astype(np.float64)).sum(1).astype(np.float32)
    else:
        norms = decode_norms(aq, fields[:, M], encoding)
    return IvfTables(_centroids(ivf), codebooks, offsets, codes, norms, ids, list_offsets, encoding)


def _reconstruct(codes: np.ndarray, codebooks: np.ndarray, offsets: np.ndarray, rows: int = 1 << 16) -> np.ndarray:
    """AQ reconstructions (n, d) float64, in chunks of rows."""
    out = np.empty((len(codes), codebooks.shape[1]), np.float64)
    cb = codebooks.astype(np.float64)
    for i in range(0, len(codes), rows):
        c = codes[i:i + rows]
        acc = cb[offsets[0] + c[:, 0]].copy()
        for m in range(1, codes.shape[1]):
            acc += cb[offsets[m] + c[:, m]]
        out[i:i + rows] = acc
    return out


# --------------------------------------------------------------------------------------
# The device layout: lists cut into chunks
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ChunkedLists:
    """Device arrays of the chunked lists, with one extra all-padding chunk at the end
    (index n_chunks) that padded query slots point to.

    codes (n_chunks + 1, chunk, M) uint8/uint16; terms (n_chunks + 1, chunk) float32:
    t = n(x̂) + 2⟨c_l, x̂⟩, +inf on padding; chunk_list (n_chunks + 1,) int32 the list of
    each chunk. Host side: first_chunk, n_chunks_of (nlist,) and slot_ids
    ((n_chunks + 1) * chunk,) int64 the id at each slot (-1 on padding)."""

    codes: jax.Array
    terms: jax.Array
    chunk_list: jax.Array
    first_chunk: np.ndarray
    n_chunks_of: np.ndarray
    slot_ids: np.ndarray
    chunk: int

    @property
    def pad_chunk(self) -> int:
        """The all-padding chunk (the last one)."""
        return int(self.codes.shape[0]) - 1


def chunk_lists(tables: IvfTables, chunk: int = DEFAULT_CHUNK) -> ChunkedLists:
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    sizes = tables.list_sizes()
    n_chunks_of = -(-sizes // chunk)
    first_chunk = np.concatenate([[0], np.cumsum(n_chunks_of)[:-1]]).astype(np.int64)
    total = int(n_chunks_of.sum())
    if (total + 1) * chunk >= 2 ** 31:
        raise UnsupportedIndexError(f"{tables.ntotal} entries in {total} chunks of {chunk}: the JAX engine "
                                    "addresses at most 2^31 slots (int32 positions); shard the index")
    # Slot of every entry: its list's first chunk * chunk + its rank in the list.
    list_of = np.repeat(np.arange(tables.nlist), sizes)
    rank = np.arange(tables.ntotal) - tables.list_offsets[list_of]
    slot = first_chunk[list_of] * chunk + rank
    M = tables.M
    code_dtype = np.uint8 if tables.offsets[-1] == 0 or np.diff(tables.offsets).max() <= 256 else np.uint16
    codes = np.zeros(((total + 1) * chunk, M), code_dtype)
    codes[slot] = tables.codes
    terms = np.full((total + 1) * chunk, np.inf, np.float32)
    terms[slot] = (tables.norms.astype(np.float64) + 2 * centroid_dot_reconstruction(tables)).astype(np.float32)
    slot_ids = np.full((total + 1) * chunk, -1, np.int64)
    slot_ids[slot] = tables.ids
    chunk_list = np.append(np.repeat(np.arange(tables.nlist), n_chunks_of), 0).astype(np.int32)
    return ChunkedLists(jnp.asarray(codes.reshape(total + 1, chunk, M)), jnp.asarray(terms.reshape(total + 1, chunk)),
                        jnp.asarray(chunk_list), first_chunk, n_chunks_of, slot_ids, chunk)


def centroid_dot_reconstruction(tables: IvfTables, max_bytes: int = 256 << 20) -> np.ndarray:
    """⟨c_l, x̂⟩ of every entry (float64), as Σ_m G[l, offset_m + x_m] with G = centroids ·
    codebooksᵀ computed for a block of lists at a time (entries are in list order): M
    look-ups per entry instead of a d-dimensional reconstruction."""
    out = np.empty(tables.ntotal, np.float64)
    cb = tables.codebooks.astype(np.float64)
    lists_per_block = max(1, max_bytes // (8 * max(1, len(cb))))
    offsets = tables.offsets[:-1]
    for l0 in range(0, tables.nlist, lists_per_block):
        l1 = min(tables.nlist, l0 + lists_per_block)
        a, b = tables.list_offsets[l0], tables.list_offsets[l1]
        if a == b:
            continue
        gram = tables.centroids[l0:l1].astype(np.float64) @ cb.T  # (lists, sum K_m)
        local = np.repeat(np.arange(l1 - l0), np.diff(tables.list_offsets[l0:l1 + 1]))
        acc = np.zeros(b - a, np.float64)
        for m, off in enumerate(offsets):
            acc += gram[local, off + tables.codes[a:b, m]]
        out[a:b] = acc
    return out


def ladder_up(n: int) -> int:
    """The smallest ladder size >= n (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 17, 20, ...)."""
    if n <= 8:
        return max(1, int(n))
    e = max(0, math.floor(math.log(n / 8, _LADDER_RATIO)) - 1)
    size = int(math.ceil(8 * _LADDER_RATIO ** e))
    while size < n:
        e += 1
        size = int(math.ceil(8 * _LADDER_RATIO ** e))
    return size


@dataclasses.dataclass
class Block:
    """One jitted call: queries (positions in the batch, padded with -1), their chunk
    slots (queries, slots) and the coarse distance of each slot's list."""

    queries: np.ndarray
    slots: np.ndarray
    bias: np.ndarray


def plan_blocks(layout: ChunkedLists, probes: np.ndarray, coarse_dis: np.ndarray, *, max_queries: int,
                bytes_per_slot: int, budget: int, merge: float | None = None) -> list[Block]:
    """Cut the batch into blocks of queries with similar work: queries sorted by their
    number of chunks, most first; a block has the slots S (up the ladder) of its first
    query, takes the following queries that need at least S / merge slots (at most
    max_queries, and `budget` bytes), and its row count is rounded up to a power of two
    filled with the next queries (they need fewer slots: no more padding than before).
    So a batch compiles a few (rows, slots) shapes and pads little."""
    merge = MERGE_RATIO if merge is None else merge
    nq, P = probes.shape
    pad = layout.pad_chunk
    valid = probes >= 0
    lists = np.where(valid, probes, 0)
    counts = np.where(valid, layout.n_chunks_of[lists], 0)
    totals = counts.sum(1)
    order = np.argsort(-totals, kind="stable")
    sorted_totals = totals[order]
    blocks = []
    i = 0
    while i < nq:
        S = ladder_up(max(int(sorted_totals[i]), 1))
        most = max(1, min(max_queries, budget // max(1, S * layout.chunk * bytes_per_slot)))
        most = 1 << int(math.floor(math.log2(most)))
        # sorted_totals is non-increasing: the queries needing >= S / merge slots come first
        similar = int(np.searchsorted(-sorted_totals[i:i + most], -S / merge, side="right"))
        rows = min(most, 1 << int(math.ceil(math.log2(max(similar, 1)))))
        qs = order[i:i + rows]
        i += len(qs)
        slots = np.full((rows, S), pad, np.int32)
        bias = np.zeros((rows, S), np.float32)
        c = counts[qs]  # (b, P)
        # Chunk k of probe p of query j: first_chunk[list] + k, at slot offset[j, p] + k.
        offs = np.cumsum(c, 1) - c
        row_of = np.repeat(np.arange(len(qs)), c.sum(1))
        flat_c = c.ravel()
        within = np.arange(flat_c.sum()) - np.repeat(np.cumsum(flat_c) - flat_c, flat_c)
        cols = np.repeat(offs.ravel(), flat_c) + within
        slots[row_of, cols] = np.repeat(layout.first_chunk[lists[qs]].ravel(), flat_c) + within
        bias[row_of, cols] = np.repeat(coarse_dis[qs].ravel(), flat_c)
        queries = np.full(rows, -1, np.int64)
        queries[:len(qs)] = qs
        blocks.append(Block(queries, slots, bias))
    return blocks


# --------------------------------------------------------------------------------------
# The jitted kernels
# --------------------------------------------------------------------------------------


# Candidates the coarse matrix product pre-selects beyond nprobe, re-measured exactly:
# ‖q‖² − 2⟨q, c⟩ + ‖c‖² loses digits to cancellation (faiss's distances are exact to
# ~1e-7 relative, and the list distance is part of every shortlist distance).
COARSE_MARGIN = 8


@functools.partial(jax.jit, static_argnames=("nprobe",))
def coarse_assign(centroids, centroid_norms, xq, nprobe):
    """Nearest nprobe centroids: (squared distances, list numbers), nearest first;
    pre-selected by a matrix product, ranked by the exact Σ (q − c)²."""
    n_pre = min(nprobe + COARSE_MARGIN, centroids.shape[0])
    with jax.default_matmul_precision("highest"):
        approx = centroid_norms[None] - 2 * xq @ centroids.T
    _, cand = jax.lax.top_k(-approx, n_pre)
    diff = xq[:, None, :] - centroids[cand]
    exact = jnp.sum(diff * diff, axis=-1)
    neg, order = jax.lax.top_k(-exact, nprobe)
    return -neg, jnp.take_along_axis(cand, order, axis=1)


def scan_block(codebooks, offsets, layout_codes, layout_terms, xq, slots, bias, n):
    """Shortlist of n per query: (AQ distances, (chunk, offset) slot positions as
    chunk * chunk_size + offset), nearest first; +inf where the probed lists hold fewer."""
    B, S = slots.shape
    C = layout_codes.shape[1]
    with jax.default_matmul_precision("highest"):
        lut = xq @ codebooks.T  # (B, sum K_m): <q, C_m[k]>, one table per query
    codes = layout_codes[slots].astype(jnp.int32).reshape(B, S * C, -1)
    ip = jnp.zeros((B, S * C), jnp.float32)
    for m in range(len(offsets) - 1):
        ip = ip + jnp.take_along_axis(lut[:, offsets[m]:offsets[m + 1]], codes[..., m], axis=1)
    dis = (bias[:, :, None] + layout_terms[slots]).reshape(B, S * C) - 2 * ip
    neg, pos = jax.lax.top_k(-dis, n)
    chunk = jnp.take_along_axis(slots, pos // C, axis=1)
    return -neg, chunk * C + pos % C


def _search_block(tables, model, mid, xq, slots, bias, *, offsets, n, nshort, k, dtype, outer_skip):
    """One block from query vectors to results: scan and AQ shortlist of n, pairwise
    stage to nshort (when `mid` is given and n > nshort), QINCo decode of the shortlist,
    exact raw-unit distances, top k. Positions are global slots (-1: none)."""
    from qinco_jax.search.rerank import _pairwise_rank_impl, _rerank_impl

    codebooks, layout_codes, layout_terms, chunk_list = tables
    C = layout_codes.shape[1]
    D_short, gpos = scan_block(codebooks, offsets, layout_codes, layout_terms, xq, slots, bias, n)
    valid = jnp.isfinite(D_short)
    short = jnp.where(valid, gpos, -1)
    fine = layout_codes.reshape(-1, layout_codes.shape[-1])[gpos].astype(jnp.int32)
    full = jnp.concatenate([chunk_list[gpos // C][..., None], fine], axis=-1)
    full = jnp.where(valid[..., None], full, 0)  # decodable placeholders
    mid_pos = short[:, :nshort]  # a block whose lists hold no more than nshort entries: nothing to cut
    if mid is not None and n > nshort:
        decoder, centroids = mid
        D_mid, pos = _pairwise_rank_impl(decoder, centroids, xq, full, valid, nshort)
        full = jnp.take_along_axis(full, pos[..., None], axis=1)
        gpos = jnp.take_along_axis(gpos, pos, axis=1)
        valid = jnp.isfinite(D_mid)
        mid_pos = jnp.where(valid, gpos, -1)
    params, mean, std = model
    D, pos = _rerank_impl(params, mean, std, xq, full, valid, min(k, full.shape[1]), dtype, outer_skip)
    final = jnp.where(jnp.isfinite(D), jnp.take_along_axis(gpos, pos, axis=1), -1)
    return short, mid_pos, D, final


_search_block_jit = jax.jit(_search_block, static_argnames=("offsets", "n", "nshort", "k", "dtype", "outer_skip"))


@functools.partial(jax.jit, static_argnames=("offsets", "n"))
def _shortlist_block(codebooks, layout_codes, layout_terms, xq, slots, bias, *, offsets, n):
    D, gpos = scan_block(codebooks, offsets, layout_codes, layout_terms, xq, slots, bias, n)
    return D, jnp.where(jnp.isfinite(D), gpos, -1)


def _is_out_of_memory(e: Exception) -> bool:
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


# --------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class EngineResult:
    """Results of a batch, in query order. Positions are already ids (-1: none)."""

    D: np.ndarray  # (nq, k) exact distances after re-ranking (AQ distances for a shortlist-only search)
    I: np.ndarray  # (nq, k) ids
    I_short: np.ndarray  # (nq, n) the AQ shortlist, nearest first
    I_mid: np.ndarray | None  # (nq, nshort) the pairwise stage's shortlist, or None
    t_coarse: float
    t_scan: float  # the jitted blocks (scan + middle stage + decode + re-ranking)
    t_ids: float  # slot positions -> ids on the host


class JaxIvfEngine:
    """The JAX search engine of one faiss IVF additive-quantizer index (see the module
    docstring). Built once from the index (`JaxIvfEngine(index)`); rebuild it after the
    index changes.

    chunk: entries per chunk of the layout; max_block_queries, block_bytes: the blocks
    (None: per-backend defaults, MAX_BLOCK_QUERIES and BLOCK_BYTES)."""

    def __init__(self, index, *, chunk: int = DEFAULT_CHUNK, max_block_queries: int | None = None,
                 block_bytes: int | None = None, tables: IvfTables | None = None):
        t0 = time.time()
        self.tables = read_ivf_tables(index) if tables is None else tables
        self.layout = chunk_lists(self.tables, chunk)
        self.centroids = jnp.asarray(self.tables.centroids)
        self.centroid_norms = jnp.asarray(np.square(self.tables.centroids.astype(np.float64)).sum(1).astype(np.float32))
        self.codebooks = jnp.asarray(self.tables.codebooks)
        self.offsets = tuple(int(o) for o in self.tables.offsets)
        backend = "cpu" if jax.default_backend() == "cpu" else "gpu"
        self.max_block_queries = int(max_block_queries or MAX_BLOCK_QUERIES[backend])
        self.block_bytes = int(block_bytes or _device_budget(BLOCK_BYTES[backend]))
        self.ntotal = self.tables.ntotal
        self.t_build = time.time() - t0
        self._compiled: dict[tuple, Any] = {}

    @classmethod
    def from_tables(cls, tables: IvfTables, **kwargs) -> "JaxIvfEngine":
        """An engine over tables not read from a faiss index (e.g. generated ones)."""
        return cls(None, tables=tables, **kwargs)

    @property
    def d(self) -> int:
        return self.tables.d

    @property
    def nlist(self) -> int:
        return self.tables.nlist

    def check_queries(self, xq) -> np.ndarray:
        xq = np.asarray(xq)
        if xq.ndim != 2 or xq.shape[1] != self.d:
            raise ValueError(f"queries have shape {xq.shape}, the index needs (nq, {self.d})")
        if len(xq) == 0:
            raise ValueError("no queries to search (empty batch)")
        validation.check_all_finite(xq, "queries")
        return np.ascontiguousarray(xq, np.float32)

    def coarse(self, xq: np.ndarray, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact coarse assignment: (distances, lists) (nq, nprobe); -1 beyond nlist."""
        if nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {nprobe}")
        p = min(int(nprobe), self.nlist)
        D, L = [], []
        step = max(1, min(len(xq), (self.block_bytes // 4) // max(1, 3 * self.nlist)))
        for i in range(0, len(xq), step):
            d, l = coarse_assign(self.centroids, self.centroid_norms, jnp.asarray(xq[i:i + step]), p)
            D.append(np.asarray(d))
            L.append(np.asarray(l))
        D, L = np.concatenate(D), np.concatenate(L).astype(np.int64)
        if p < nprobe:
            D = np.pad(D, ((0, 0), (0, nprobe - p)), constant_values=np.inf)
            L = np.pad(L, ((0, 0), (0, nprobe - p)), constant_values=-1)
        return D, L

    @property
    def bytes_per_slot(self) -> int:
        """Block memory per scanned entry: its codes as int32, look-up sums, terms and
        distances (the re-ranking's activations, per shortlist entry, are far fewer)."""
        return 4 * self.tables.M + 24

    def _run_blocks(self, blocks: list[Block], xq: np.ndarray, call) -> list[tuple[Block, tuple]]:
        """Run `call(xq_block, block)` on every block, halving a block that runs out of
        device memory (never failing on size)."""
        out = []
        pending = list(blocks)
        while pending:
            b = pending.pop(0)
            q = xq[np.maximum(b.queries, 0)]
            try:
                res = call(q, b)
                out.append((b, res))
            except Exception as e:  # noqa: BLE001 (XlaRuntimeError has no stable import path)
                if not _is_out_of_memory(e) or len(b.queries) == 1:
                    raise
                h = len(b.queries) // 2
                pending[:0] = [Block(b.queries[:h], b.slots[:h], b.bias[:h]), Block(b.queries[h:], b.slots[h:], b.bias[h:])]
        return out

    def plan(self, xq: np.ndarray, nprobe: int, *, bytes_per_query: int = 0) -> tuple[list[Block], float]:
        t0 = time.time()
        D, L = self.coarse(xq, nprobe)
        t_coarse = time.time() - t0
        blocks = plan_blocks(self.layout, L, D, max_queries=self.max_block_queries,
                             bytes_per_slot=self.bytes_per_slot, budget=self.block_bytes)
        return blocks, t_coarse

    def shortlist(self, xq: np.ndarray, nprobe: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """faiss's scan: (AQ distances, ids) (nq, n) of the n nearest entries of the
        nprobe nearest lists, nearest first; inf / -1 where fewer exist."""
        xq = self.check_queries(xq)
        if n < 1:
            raise ValueError(f"shortlist length must be >= 1, got {n}")
        blocks, _ = self.plan(xq, nprobe)
        D = np.full((len(xq), n), np.inf, np.float32)
        pos = np.full((len(xq), n), -1, np.int64)
        C = self.layout.chunk

        def call(q, b):
            m = min(n, b.slots.shape[1] * C)
            return _shortlist_block(self.codebooks, self.layout.codes, self.layout.terms, q, b.slots, b.bias,
                                    offsets=self.offsets, n=m)

        for b, (d, p) in self._run_blocks(blocks, xq, call):
            keep = b.queries >= 0
            m = d.shape[1]
            D[b.queries[keep], :m] = np.asarray(d)[keep]
            pos[b.queries[keep], :m] = np.asarray(p)[keep]
        return D, self._ids(pos)

    def _ids(self, pos: np.ndarray) -> np.ndarray:
        return np.where(pos >= 0, self.layout.slot_ids[np.maximum(pos, 0)], -1)

    def search(self, xq: np.ndarray, nprobe: int, n: int, k: int, model_side, *, mid=None,
               nshort: int | None = None, dtype=jnp.float32, outer_skip: bool = False) -> EngineResult:
        """Shortlist of n per query, the pairwise stage `mid` = (decoder, centroids) to
        nshort when n > nshort, QINCo re-ranking with model_side = (params, mean, std)
        and the top k, all in one jitted call per block."""
        xq = self.check_queries(xq)
        nshort = n if nshort is None else int(nshort)
        blocks, t_coarse = self.plan(xq, nprobe)
        C = self.layout.chunk
        tables = (self.codebooks, self.layout.codes, self.layout.terms, self.layout.chunk_list)
        nq = len(xq)
        short = np.full((nq, n), -1, np.int64)
        three = mid is not None and n > nshort
        mids = np.full((nq, nshort), -1, np.int64) if three else None
        kk = min(k, nshort if three else n)
        D = np.full((nq, kk), np.inf, np.float32)
        final = np.full((nq, kk), -1, np.int64)

        def call(q, b):
            m = min(n, b.slots.shape[1] * C)
            ms = min(nshort, m)
            return _search_block_jit(tables, model_side, mid if three else None, q, b.slots, b.bias,
                                     offsets=self.offsets, n=m, nshort=ms, k=min(kk, ms), dtype=dtype,
                                     outer_skip=outer_skip)

        self._compile(blocks, xq, call, (n, nshort, kk, three, str(dtype), outer_skip, id(mid[0]) if three else None, id(model_side[0])))
        t0 = time.time()
        done = self._run_blocks(blocks, xq, call)
        done = [(b, jax.device_get(r)) for b, r in done]
        t_scan = time.time() - t0
        t0 = time.time()
        for b, (s, mp, d, f) in done:
            keep = b.queries >= 0
            qs = b.queries[keep]
            short[qs, :s.shape[1]] = s[keep]
            if mids is not None:
                mids[qs, :mp.shape[1]] = mp[keep]
            D[qs, :d.shape[1]] = d[keep]
            final[qs, :f.shape[1]] = f[keep]
        I, I_short, I_mid = self._ids(final), self._ids(short), None if mids is None else self._ids(mids)
        return EngineResult(D, I, I_short, I_mid, t_coarse, t_scan, time.time() - t0)

    def _compile(self, blocks: list[Block], xq: np.ndarray, call, static: tuple) -> None:
        """Compile (and run once) every new block shape before the timed run."""
        for b in blocks:
            key = (b.slots.shape, static)
            if key in self._compiled:
                continue
            jax.block_until_ready(call(xq[:1].repeat(len(b.queries), 0), b))
            self._compiled[key] = True


def _device_budget(default: int) -> int:
    """Bytes a block may use: the default, capped at a quarter of the device's free
    memory where JAX reports it (accelerators)."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 (backends without memory stats)
        stats = {}
    limit, used = stats.get("bytes_limit"), stats.get("bytes_in_use", 0)
    if limit:
        return int(max(1 << 20, min(default, (limit - used) // 4)))
    return default


# --------------------------------------------------------------------------------------
# The search pipeline's interface (rerank.search_ivf's, with the JAX engine)
# --------------------------------------------------------------------------------------


def search_ivf(engine: JaxIvfEngine, xq: np.ndarray, nprobe: int, nshort: int, reranker, *, mid=None,
               nmid_short: int = 0):
    """`rerank.search_ivf` on the JAX engine: shortlist of nshort (or, with a pairwise
    stage `mid` (a `rerank.PairwiseReranker`), shortlist_length(nshort, nmid_short)),
    pairwise stage, QINCo re-ranking with `reranker`'s model, in one jitted call per
    block. Timings: t_search is the whole pipeline (exact coarse assignment, the chunk
    plan, then the fused scan + middle stage + decode + re-ranking: they are one
    function, so no part of it is timed apart), t_decode and t_mid are 0, t_dis is the
    host's mapping of slot positions to ids."""
    from qinco_jax.search.rerank import SearchResult, shortlist_length

    n = shortlist_length(nshort, nmid_short) if mid is not None else nshort
    three = mid is not None and n > nshort
    model_side = (reranker.params, reranker.mean, reranker.std)
    r = engine.search(xq, nprobe, n, reranker.k, model_side, mid=(mid.decoder, mid.centroids) if three else None,
                      nshort=nshort, dtype=reranker.dtype, outer_skip=reranker.outer_skip)
    reranker.rows_decoded += len(r.I) * nshort
    if three:
        mid.rows_decoded += len(r.I) * n
    return SearchResult(r.D, r.I, r.I_short, r.t_coarse + r.t_scan, 0.0, r.t_ids, 0.0, r.I_mid)


ENGINES = ("faiss", "jax")


def open_engine(index, engine: str, *, fallback: bool = False, log=print) -> JaxIvfEngine | None:
    """The JAX engine of `index` for engine="jax", None for engine="faiss". An index the
    JAX engine does not implement raises UnsupportedIndexError, or with `fallback`
    logs why and returns None (search with faiss)."""
    if engine not in ENGINES:
        raise ValueError(f"unknown search engine {engine!r}: use one of {', '.join(ENGINES)}")
    if engine == "faiss":
        return None
    try:
        return JaxIvfEngine(index)
    except UnsupportedIndexError as e:
        if not fallback:
            raise
        log(f"JAX engine unavailable, searching with faiss: {e}")
        return None
