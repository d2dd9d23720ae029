"""QINCo re-ranking of a shortlist: decode its codes, exact distances, best 100.

Searching asks faiss for the nshort best entries together with their codes and list
numbers, decodes those with the QINCo network and keeps the best 100 by exact distance:
one jitted function per batch of queries.

Re-ranking breaks ties between equal distances by shortlist position; the reference's
numpy argsort breaks them its own (unspecified) way, so recalls can differ by a query
or so where the true neighbour shares its code with other vectors.

With a pairwise decoder (QINCo2's three-stage search) faiss returns
`shortlist_length(nshort, nmid_short)` = nmid_short * nshort entries (capped at
MAX_SHORTLIST, as the reference caps them), the pairwise additive decoder
(`qinco_jax.models.pairwise`) reconstructs them cheaply and keeps the nshort nearest by exact
raw-unit distance, and only those nshort reach the full model. Every distance in both
re-ranking stages is in raw units: the model's reconstructions are denormalised, the
pairwise decoder's are raw-unit IVF centroids plus raw-unit tables.

Timings reported per operating point, for the whole query set: t_search (faiss
shortlist with codes), t_mid (the pairwise stage: decode, exact distances, top
nshort; 0 without one), t_decode (unpacking the shortlist's codes, then the jitted
decode + exact distances + top 100, which the reference times as two steps: decode,
then distances and sort), t_dis (gathering the result ids on the host).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from qinco_jax.models import codec
from qinco_jax.models import pairwise
from qinco_jax.models.qinco import QincoModel
from qinco_jax.search.index import split_search_codes

RERANK_K = 100  # results kept after re-ranking, as in the reference
# Shortlist rows decoded per jitted call: bounds the (rows x max(d, h)) activations.
RERANK_ROWS = {"cpu": 8192, "gpu": 262144}
# The most entries faiss is asked for in a three-stage search (the reference's cap).
MAX_SHORTLIST = 8000
# Shortlist rows the pairwise stage reconstructs per jitted call (T look-ups of D floats each).
PAIRWISE_ROWS = {"cpu": 65536, "gpu": 1 << 20}


def shortlist_length(nshort: int, nmid_short: int) -> int:
    """Entries asked from faiss: nmid_short * nshort, capped at MAX_SHORTLIST as the
    reference caps it, and never fewer than nshort (nmid_short 0 or 1: two stages)."""
    if nshort < 1 or nmid_short < 0:
        raise ValueError(f"need nshort >= 1 and nmid_short >= 0, got {nshort} and {nmid_short}")
    return max(nshort, min(nmid_short * nshort, MAX_SHORTLIST))


def _batch_queries(rows: int, nq: int, ns: int) -> int:
    """Queries per jitted call: at most `rows` shortlist entries, and the nq queries
    split into equal batches so that padding the last one wastes little."""
    most = max(1, rows // ns)
    n_batches = -(-max(nq, 1) // most)
    return -(-max(nq, 1) // n_batches)


def _rerank_impl(params, mean, std, xq, codes, valid, k, dtype, outer_skip):
    """Decode (nq, ns, W) codes, map them back to raw units (x = y * std + mean, the
    model's normalisation), exact squared distances to the raw queries and the k
    smallest per query; missing entries (valid False) rank last at +inf."""
    nq, ns, W = codes.shape
    (xhat,) = codec.decode_batch(params, codes.reshape(nq * ns, W), dtype, outer_skip)
    diff = xq[:, None, :] - (xhat * std + mean).reshape(nq, ns, -1)
    dis = jnp.where(valid, jnp.sum(diff * diff, axis=-1), jnp.inf)
    neg, idx = jax.lax.top_k(-dis, k)
    return -neg, idx


_rerank_batch = jax.jit(_rerank_impl, static_argnames=("k", "dtype", "outer_skip"))


class Reranker:
    """QINCo re-ranking of shortlists: decode, exact distance, top k, per query batch.

    Batches have a fixed number of queries for a given shortlist length (the last one
    is padded), so a search at a new nshort compiles once; `warm_up` does that compile
    outside the timed region."""

    def __init__(self, model: QincoModel, *, dtype=None, rows_per_batch: int | None = None, k: int = RERANK_K):
        self.model = model
        self.params = jax.device_put(codec.network_params(model.params))
        norm = model.normalisation
        # Every distance in raw units: reconstructions leave the model's normalised space
        # (QINCo2: (x - mean) / std) before they meet the raw queries.
        self.mean = jnp.asarray(norm.mean if norm.mean is not None else np.zeros(model.d), jnp.float32)
        self.std = jnp.float32(norm.std)
        self.outer_skip = model.config.outer_skip
        self.dtype = codec.resolve_dtype(dtype)
        self.rows = int(rows_per_batch or RERANK_ROWS[codec.backend()])
        self.k = k
        self.rows_decoded = 0  # shortlist entries decoded by the model so far (not the padding)
        self._warm: set[tuple[int, int]] = set()

    def _batch_queries(self, nq: int, ns: int) -> int:
        return _batch_queries(self.rows, nq, ns)

    def warm_up(self, nq: int, ns: int) -> None:
        qb = self._batch_queries(nq, ns)
        if (qb, ns) in self._warm:
            return
        W = self.model.config.code_width
        args = (np.zeros((qb, self.model.d), np.float32), np.zeros((qb, ns, W), np.int32),
                np.ones((qb, ns), bool))
        jax.block_until_ready(_rerank_batch(self.params, self.mean, self.std, *args, k=min(self.k, ns),
                                            dtype=self.dtype, outer_skip=self.outer_skip))
        self._warm.add((qb, ns))

    def __call__(self, xq: np.ndarray, codes: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """xq (nq, d) raw; codes (nq, ns, W) model codes of the shortlists; valid (nq, ns)
        False for missing entries. Returns the exact distances and the positions in the
        shortlist of the min(k, ns) best entries, best first; missing ones last at +inf."""
        nq, ns, W = codes.shape
        codes = np.where(valid[..., None], codes, 0).astype(np.int32)  # decodable placeholders
        k = min(self.k, ns)
        self.rows_decoded += nq * ns
        fn = lambda q, c, v: _rerank_batch(self.params, self.mean, self.std, q, c, v, k=k, dtype=self.dtype,
                                               outer_skip=self.outer_skip)
        return tuple(codec.map_batches(fn, [np.asarray(xq, np.float32), codes, np.asarray(valid, bool)],
                                       self._batch_queries(nq, ns)))


def _pairwise_rank_impl(decoder, centroids, xq, codes, valid, k):
    """Pairwise reconstructions (raw units) of (nq, ns, W) codes, exact squared
    distances to the raw queries, the k smallest per query; missing entries last."""
    nq, ns, W = codes.shape
    xhat = pairwise.decode_batch(decoder, centroids, codes.reshape(nq * ns, W))
    diff = xq[:, None, :] - xhat.reshape(nq, ns, -1)
    dis = jnp.where(valid, jnp.sum(diff * diff, axis=-1), jnp.inf)
    neg, idx = jax.lax.top_k(-dis, k)
    return -neg, idx


_pairwise_rank = jax.jit(_pairwise_rank_impl, static_argnames=("k",))


class PairwiseReranker:
    """The middle stage: the pairwise additive decoder re-ranks a long shortlist and
    keeps the k nearest entries by exact raw-unit distance, per query batch (fixed
    shapes per (shortlist length, k), so each pair compiles once; `warm_up` does it
    outside the timed region).

    ivf_centroids: the IVF centroids in raw units (`index.ivf_centroids(model)`), the
    ones the decoder's tables were trained against."""

    def __init__(self, decoder: pairwise.PairwiseDecoder, ivf_centroids: np.ndarray, *,
                 rows_per_batch: int | None = None):
        pairwise.check_layout(decoder)
        self.centroids = jnp.asarray(pairwise.check_centroids(decoder, ivf_centroids))
        self.decoder = jax.device_put(decoder)
        self.rows = int(rows_per_batch or PAIRWISE_ROWS[codec.backend()])
        self.rows_decoded = 0
        self._warm: set[tuple[int, int, int]] = set()

    @property
    def K(self) -> int:
        return self.decoder.K

    @property
    def nlist(self) -> int:
        return self.decoder.nlist

    def warm_up(self, nq: int, ns: int, k: int, width: int) -> None:
        qb = _batch_queries(self.rows, nq, ns)
        if (qb, ns, k) in self._warm:
            return
        args = (np.zeros((qb, self.decoder.d), np.float32), np.zeros((qb, ns, width), np.int32),
                np.ones((qb, ns), bool))
        jax.block_until_ready(_pairwise_rank(self.decoder, self.centroids, *args, k=k))
        self._warm.add((qb, ns, k))

    def __call__(self, xq: np.ndarray, codes: np.ndarray, valid: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """xq (nq, d) raw; codes (nq, ns, 1 + M) with the IVF list in column 0; valid
        (nq, ns). Returns the pairwise distances and the shortlist positions of the
        min(k, ns) nearest entries, best first; missing ones last at +inf."""
        nq, ns, _ = codes.shape
        codes = np.where(valid[..., None], codes, 0).astype(np.int32)
        k = min(k, ns)
        self.rows_decoded += nq * ns
        fn = lambda q, c, v: _pairwise_rank(self.decoder, self.centroids, q, c, v, k=k)
        return tuple(codec.map_batches(fn, [np.asarray(xq, np.float32), codes, np.asarray(valid, bool)],
                                       _batch_queries(self.rows, nq, ns)))


def gather_ids(ids: np.ndarray, D: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Result ids from shortlist positions; -1 where the distance is +inf (missing)."""
    I = np.take_along_axis(ids, positions, axis=1)
    I[~np.isfinite(D)] = -1
    return I


@dataclasses.dataclass
class SearchResult:
    D: np.ndarray  # (nq, <=100) exact distances after re-ranking
    I: np.ndarray  # (nq, <=100) ids after re-ranking
    I_short: np.ndarray  # (nq, n) the index's shortlist (AQ order; n = shortlist_length(nshort, nmid_short))
    t_search: float
    t_decode: float
    t_dis: float
    t_mid: float = 0.0  # the pairwise stage (0 without one)
    I_mid: np.ndarray | None = None  # (nq, nshort) the pairwise stage's shortlist, best first


def shortlist_and_rerank(shortlist, to_codes, xq: np.ndarray, nshort: int, reranker: Reranker, *,
                         mid: PairwiseReranker | None = None, nmid_short: int = 0) -> SearchResult:
    """The two or three stages, timed alike for the IVF and the flat search:
    `shortlist(xq, n)` -> (ids, payload) is t_search (n = nshort, or with a middle
    stage `shortlist_length(nshort, nmid_short)`); `to_codes(ids, payload)` -> (model
    codes, valid) and the re-ranking are t_decode; the pairwise stage cutting the n
    entries to nshort is t_mid; gathering the result ids is t_dis. The middle stage
    runs only when `mid` is given and n > nshort (as the reference)."""
    xq = np.ascontiguousarray(xq, np.float32)
    n = shortlist_length(nshort, nmid_short) if mid is not None else nshort
    three = mid is not None and n > nshort
    reranker.warm_up(len(xq), nshort)
    if three:
        mid.warm_up(len(xq), n, nshort, reranker.model.config.code_width)
    t0 = time.time()
    I, payload = shortlist(xq, n)
    t1 = time.time()
    codes, valid = to_codes(I, payload)
    t_mid, I_mid, I_final = 0.0, None, I
    if three:
        tm = time.time()
        D_mid, pos = mid(xq, codes, valid, nshort)
        codes = np.take_along_axis(codes, pos[..., None], axis=1)
        valid = np.isfinite(D_mid)
        I_mid = I_final = gather_ids(I, D_mid, pos)
        t_mid = time.time() - tm
    D, positions = reranker(xq, codes, valid)
    t2 = time.time()
    I_ref = gather_ids(I_final, D, positions)
    t3 = time.time()
    return SearchResult(D, I_ref, I, t1 - t0, t2 - t1 - t_mid, t3 - t2, t_mid, I_mid)


def search_ivf(index, model: QincoModel, xq: np.ndarray, nshort: int, reranker: Reranker, *,
               mid: PairwiseReranker | None = None, nmid_short: int = 0) -> SearchResult:
    """One search at the index's current nprobe / efSearch: faiss shortlist (of
    nshort, or nmid_short * nshort with a pairwise stage `mid`) with the codes and list
    numbers of its entries, pairwise re-ranking to nshort, QINCo re-ranking."""

    def shortlist(q, ns):
        _, I, raw = index.search_and_return_codes(q, ns, include_listnos=True)
        return I, raw

    def to_codes(I, raw):
        listnos, fine = split_search_codes(index, raw, model.config.M)
        valid = (I >= 0) & (listnos < index.nlist)
        codes = np.concatenate([np.where(valid, listnos, 0)[..., None].astype(np.int32), fine], axis=2)
        return codes, valid

    return shortlist_and_rerank(shortlist, to_codes, xq, nshort, reranker, mid=mid, nmid_short=nmid_short)
