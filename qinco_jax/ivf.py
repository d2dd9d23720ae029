"""IVF-QINCo indexes: build a faiss IVF-RQ index from an IVF-QINCo model, fill it with
QINCo codes, and search it with a QINCo re-ranking of the shortlist (the paper's Fig. 3).

The index is a faiss `IndexIVFResidualQuantizer` (key `IVF<K_IVF>[_HNSW32],RQ<M>x<b>_N…`):

- its coarse quantizer holds the model's IVF centroids (codebook0 · db_scale), in a flat
  or an HNSW index;
- its fine codes are the QINCo codes themselves (columns 1..M of a model code), and its
  RQ codebooks are the least-squares additive approximation of QINCo for those codes
  (`qinco_jax.aq`), so faiss can scan the lists with look-up tables;
- each entry stores the squared norm of its AQ reconstruction, quantized by the
  index's norm quantizer (e.g. `Nqint8`).

Searching asks faiss for the nshort best entries together with their codes and list
numbers, decodes those with the QINCo network and keeps the best 100 by exact distance:
one jitted function per batch of queries.

Choices made to give the reference's index bit for bit (its `search_ivf.py`):
- the norm quantizer's range is trained on the squared norms of the AQ *errors* of the
  training residuals, while the entries store the squared norms of the AQ
  *reconstructions* (the reference's comment says the norm training does not matter
  much for `_Nfloat`; for `_Nqint8` it sets the clipping range);
- database vectors go to the list of their model code (the exact nearest centroid),
  even when the coarse quantizer is an approximate HNSW;
- each add batch is sorted by list with numpy's default argsort, as the reference does,
  so the lists hold their entries in the reference's order (checked on the fixture
  index with numpy 2.4 on x86-64; numpy does not specify that order). Entries with equal codes
  tie in every distance; the order decides which comes first.

Re-ranking breaks ties between equal distances by shortlist position; the reference's
numpy argsort breaks them its own (unspecified) way, so recalls can differ by a query
or so where the true neighbour shares its code with other vectors.

Timings reported per operating point, for the whole query set: t_search (faiss
shortlist with codes), t_decode (unpacking the shortlist's codes, then the jitted
decode + exact distances + top 100, which the reference times as two steps: decode,
then distances and sort), t_dis (gathering the result ids on the host).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Iterable, Sequence

import faiss
import jax
import jax.numpy as jnp
import numpy as np

from qinco_jax import aq, codec, packing, validation
from qinco_jax.io import atomic_path
from qinco_jax.metrics import one_recall_at
from qinco_jax.model import QincoModel

RERANK_K = 100  # results kept after re-ranking, as in the reference
# Shortlist rows decoded per jitted call: bounds the (rows x max(d, h)) activations.
RERANK_ROWS = {"cpu": 8192, "gpu": 262144}


# --------------------------------------------------------------------------------------
# The model's side: IVF centroids, code layout, checks
# --------------------------------------------------------------------------------------


def require_ivf_model(model) -> QincoModel:
    if not isinstance(model, QincoModel) or not model.config.is_ivf:
        kind = model.describe() if hasattr(model, "describe") else type(model).__name__
        raise ValueError(f"an IVF index needs an IVF-QINCo model, got {kind}")
    return model


def ivf_centroids(model: QincoModel) -> np.ndarray:
    """The IVF centroids in raw units, computed as the reference does (float32)."""
    return np.asarray(model.params["codebook0"], np.float32) * np.float32(model.config.db_scale)


def _faiss_message(e: Exception) -> str:
    """The last line of a faiss C++ error (the line that says what is wrong)."""
    text = str(e).strip()
    return text.splitlines()[-1] if text else ""


def as_ivf_index(index) -> faiss.IndexIVFResidualQuantizer:
    if not isinstance(index, faiss.IndexIVFResidualQuantizer):
        # A second wrapper of the same C++ object: it must take over ownership, or the
        # index is freed with the first one.
        down = faiss.downcast_index(index)
        if down is not index and getattr(index, "thisown", False):
            index.this.disown()
            down.this.acquire()
        index = down
    if not isinstance(index, faiss.IndexIVFResidualQuantizer):
        raise ValueError(f"expected an IVF residual-quantizer index (key IVF<n>,RQ<M>x<bits>_N...), "
                         f"got {type(index).__name__}")
    return index


def read_index(path, what: str = "index") -> faiss.IndexIVFResidualQuantizer:
    """An IVF-RQ index from a file, with an error naming the file if it is not one."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path}: no such file")
    try:
        index = faiss.read_index(path)
    except RuntimeError as e:
        raise ValueError(f"{what} {path} is not a faiss index: {_faiss_message(e)}") from None
    try:
        return as_ivf_index(index)
    except ValueError as e:
        raise ValueError(f"{what} {path}: {e}") from None


def write_index(index, path) -> None:
    """faiss.write_index, atomically: an interrupted write leaves the old file."""
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def rq_nbits(index) -> list[int]:
    return [int(b) for b in faiss.vector_to_array(index.rq.nbits)]


def check_index_matches_model(index, model: QincoModel, what: str = "the index") -> None:
    """Raise a ValueError naming the first property of `index` that `model` cannot fill."""
    c = require_ivf_model(model).config
    if index.d != c.d:
        raise ValueError(f"{what} has dimension d={index.d}, the model ({c.describe()}) has d={c.d}")
    if index.metric_type != faiss.METRIC_L2:
        raise ValueError(f"{what} does not use the L2 metric; QINCo re-ranking is L2")
    if index.nlist != c.K_IVF:
        raise ValueError(f"{what} has nlist={index.nlist} inverted lists, the model has K_IVF={c.K_IVF} centroids")
    if index.rq.M != c.M:
        raise ValueError(f"{what} has {index.rq.M} RQ codebooks, the model has M={c.M} QINCo steps")
    nbits = rq_nbits(index)
    want = packing.bits_for(c.K)
    if (1 << want) != c.K or any(b != want for b in nbits):
        raise ValueError(f"{what} has RQ codes of {nbits} bits, the model's K={c.K} needs "
                         f"{want} bits per code (K a power of two)")
    if not index.by_residual:
        raise ValueError(f"{what} does not encode residuals (by_residual is off)")


def _coarse_quantizer(index):
    return faiss.downcast_index(index.quantizer)


def new_index(model: QincoModel, index_key: str, ef_construction: int = -1) -> faiss.IndexIVFResidualQuantizer:
    """An empty index for `index_key`, after checking the model can fill it."""
    model = require_ivf_model(model)
    try:
        index = faiss.index_factory(model.d, index_key)
    except RuntimeError as e:
        raise ValueError(f"faiss cannot build index key {index_key!r}: {_faiss_message(e)}") from None
    try:
        index = as_ivf_index(index)
    except ValueError:
        raise ValueError(f"index key {index_key!r} is not an IVF residual-quantizer index "
                         f"(expected e.g. IVF{model.config.K_IVF},RQ{model.config.M}x8_Nqint8)") from None
    check_index_matches_model(index, model, f"index key {index_key!r}")
    if ef_construction > 0:
        quantizer = _coarse_quantizer(index)
        if not hasattr(quantizer, "hnsw"):
            raise ValueError(f"--quantizer_efConstruction needs an HNSW coarse quantizer "
                             f"(e.g. IVF{model.config.K_IVF}_HNSW32,...), {index_key!r} has none")
        quantizer.hnsw.efConstruction = ef_construction
    return index


# --------------------------------------------------------------------------------------
# Train: AQ codebooks, norm quantizer, coarse quantizer
# --------------------------------------------------------------------------------------


def check_model_codes(model: QincoModel, codes: np.ndarray, n: int | None, what: str) -> np.ndarray:
    codes = np.asarray(codes)
    width = model.config.code_width
    if codes.ndim != 2 or codes.shape[1] != width:
        raise ValueError(f"{what} have shape {codes.shape}: the model ({model.describe()}) gives "
                         f"codes of {width} columns (IVF list + {model.config.M} steps)")
    if n is not None and len(codes) != n:
        raise ValueError(f"{what} hold {len(codes)} codes for {n} vectors")
    return codec.check_codes(model, codes)


@dataclasses.dataclass
class TrainStats:
    mse_train_residuals: float
    t_encode: float
    t_train_codebook: float
    t_index: float


def train_index(model: QincoModel, xt: np.ndarray, index_key: str, *, xt_codes: np.ndarray | None = None,
                ef_construction: int = -1, encode_kwargs: dict | None = None,
                log: Callable[[str], None] = print) -> tuple[faiss.IndexIVFResidualQuantizer, TrainStats]:
    """A trained, empty index for the model: AQ codebooks fitted on the training set's
    QINCo codes (encoded here unless `xt_codes` is given), the model's centroids in the
    coarse quantizer, the norm quantizer trained as the reference trains it."""
    model = require_ivf_model(model)
    index = new_index(model, index_key, ef_construction)  # checks the key first: fail fast
    xt = validation.as_finite_float32(xt, "index training vectors")
    t0 = time.time()
    if xt_codes is None:
        log(f"encoding {len(xt)} training vectors")
        xt_codes = codec.encode(model, xt, progress="encode train", **(encode_kwargs or {}))
    xt_codes = check_model_codes(model, xt_codes, len(xt), "training codes")
    t_encode = time.time() - t0

    t0 = time.time()
    centroids = ivf_centroids(model)
    residuals = xt - centroids[xt_codes[:, 0]]
    codebooks = aq.fit_codebooks(residuals, xt_codes[:, 1:], model.config.K)
    recons = aq.reconstruct(xt_codes[:, 1:], codebooks)
    err_norms = np.ascontiguousarray(((recons - residuals) ** 2).sum(1), dtype=np.float32)
    mse = float(err_norms.astype(np.float64).mean())
    t_train = time.time() - t0
    log(f"AQ codebooks fitted in {t_train:.2f} s, MSE of the training residuals {mse:g}")

    t0 = time.time()
    with validation.faiss_step("index training (coarse quantizer, norm quantizer)", on=f"{len(xt)} training vectors"):
        _coarse_quantizer(index).add(centroids)
        faiss.copy_array_to_vector(np.ascontiguousarray(codebooks.ravel()), index.rq.codebooks)
        index.rq.train_norm(len(err_norms), faiss.swig_ptr(err_norms))
    index.rq.is_trained = True
    index.is_trained = True
    t_index = time.time() - t0
    return index, TrainStats(mse, t_encode, t_train, t_index)


def index_codebooks(index) -> np.ndarray:
    """The RQ codebooks of an index, (M, K, d)."""
    K = 1 << rq_nbits(index)[0]
    return faiss.vector_to_array(index.rq.codebooks).reshape(index.rq.M, K, index.d)


# --------------------------------------------------------------------------------------
# Add: codes -> stored entries, in bulk
# --------------------------------------------------------------------------------------


def encode_listnos(listnos: np.ndarray, coarse_size: int) -> np.ndarray:
    """List numbers -> the little-endian coarse codes faiss puts before a code."""
    le = np.asarray(listnos).astype("<u8").view(np.uint8).reshape(len(listnos), 8)
    return le[:, :coarse_size]


def decode_listnos(coarse: np.ndarray) -> np.ndarray:
    """Little-endian coarse codes (..., coarse_size) uint8 -> list numbers int64, for any
    coarse code size from 1 to 8 bytes."""
    coarse = np.asarray(coarse, np.uint8)
    size = coarse.shape[-1]
    if not 1 <= size <= 8:
        raise ValueError(f"coarse codes of {size} bytes are not supported (1 to 8)")
    padded = np.zeros(coarse.shape[:-1] + (8,), np.uint8)
    padded[..., :size] = coarse
    return padded.view("<u8")[..., 0].astype(np.int64)


def sa_codes(index, codes: np.ndarray, codebooks: np.ndarray | None = None) -> np.ndarray:
    """Model codes (n, M + 1) -> the index's standalone codes (n, sa_code_size): coarse
    list number, packed RQ codes and the quantized squared norm of the AQ reconstruction."""
    n = len(codes)
    if codebooks is None:
        codebooks = index_codebooks(index)
    fine = np.ascontiguousarray(codes[:, 1:], dtype=np.int32)
    norms = np.ascontiguousarray((aq.reconstruct(fine, codebooks) ** 2).sum(1), dtype=np.float32)
    packed = np.empty((n, index.code_size), np.uint8)
    if n:
        index.rq.pack_codes(n, faiss.swig_ptr(fine), faiss.swig_ptr(packed), -1, faiss.swig_ptr(norms), None)
    return np.hstack([encode_listnos(codes[:, 0], index.coarse_code_size()), packed])


def add_codes(index, model: QincoModel, codes: np.ndarray, first_id: int | None = None,
              codebooks: np.ndarray | None = None) -> None:
    """Append vectors given by their model codes; ids are first_id, first_id + 1, ...
    (default: the index's current size). One C++ call fills all lists, after sorting the
    entries by list with numpy's default argsort, as the reference's add does: built
    from the same codes in the same batches, the lists hold the same entries in the same
    order (which decides ties between entries with equal codes at search time)."""
    codes = check_model_codes(model, codes, None, "codes to add")
    if first_id is None:
        first_id = index.ntotal
    order = np.argsort(codes[:, 0].astype(np.int64))
    sa = np.ascontiguousarray(sa_codes(index, codes[order], codebooks))
    with validation.faiss_step("adding codes to the index", on=f"{len(codes)} vectors from id {first_id}"):
        index.add_sa_codes(sa, (first_id + order).astype(np.int64))


def add_vectors(index, model: QincoModel, batches: Iterable[np.ndarray], *, code_batches: bool = False,
                expected_total: int | None = None, encode_kwargs: dict | None = None,
                log: Callable[[str], None] = print) -> float:
    """Fill the index from database batches (raw vectors, encoded here) or, with
    code_batches, from batches of model codes (e.g. `--xb_codes` files). Returns the time."""
    check_index_matches_model(index, model)
    codebooks = index_codebooks(index)
    t0 = time.time()
    n_before = index.ntotal
    for i, batch in enumerate(batches):
        if code_batches:
            codes = check_model_codes(model, batch, None, f"code batch {i}")
        else:
            codes = codec.encode(model, np.asarray(batch, np.float32), progress=f"encode db batch {i}",
                                 **(encode_kwargs or {}))
        add_codes(index, model, codes, codebooks=codebooks)
        log(f"  [{time.time() - t0:.2f} s] added {index.ntotal - n_before} vectors")
    added = index.ntotal - n_before
    if expected_total is not None and added != expected_total:
        raise ValueError(f"{added} vectors were added, the database has {expected_total}")
    return time.time() - t0


# --------------------------------------------------------------------------------------
# Search: shortlist from faiss, QINCo re-ranking in one jitted function
# --------------------------------------------------------------------------------------


def split_search_codes(index, raw: np.ndarray, M: int) -> tuple[np.ndarray, np.ndarray]:
    """Codes from search_and_return_codes(include_listnos=True), (nq, k, cc + code_size)
    -> list numbers (nq, k) int64 and fine codes (nq, k, M) int32."""
    cc = index.coarse_code_size()
    nq, k, w = raw.shape
    listnos = decode_listnos(raw[..., :cc])
    fine_bytes = raw[..., cc:].reshape(nq * k, w - cc)
    fine = packing.unpack_codes(fine_bytes, None, rq_nbits(index)).reshape(nq, k, M)
    return listnos, fine


def _rerank_impl(params, scale, xq, codes, valid, k, dtype):
    """Decode (nq, ns, W) codes, exact squared distances to the queries (raw units) and
    the k smallest per query; missing entries (valid False) rank last at +inf."""
    nq, ns, W = codes.shape
    (xhat,) = codec.decode_batch(params, codes.reshape(nq * ns, W), dtype)
    diff = xq[:, None, :] - (xhat * scale).reshape(nq, ns, -1)
    dis = jnp.where(valid, jnp.sum(diff * diff, axis=-1), jnp.inf)
    neg, idx = jax.lax.top_k(-dis, k)
    return -neg, idx


_rerank_batch = jax.jit(_rerank_impl, static_argnames=("k", "dtype"))


class Reranker:
    """QINCo re-ranking of shortlists: decode, exact distance, top k, per query batch.

    Batches have a fixed number of queries for a given shortlist length (the last one
    is padded), so a search at a new nshort compiles once; `warm_up` does that compile
    outside the timed region."""

    def __init__(self, model: QincoModel, *, dtype=None, rows_per_batch: int | None = None, k: int = RERANK_K):
        self.model = model
        self.params = jax.device_put(model.params)
        self.scale = jnp.float32(model.config.db_scale)
        self.dtype = codec.resolve_dtype(dtype)
        self.rows = int(rows_per_batch or RERANK_ROWS[codec.backend()])
        self.k = k
        self._warm: set[tuple[int, int]] = set()

    def _batch_queries(self, nq: int, ns: int) -> int:
        """Queries per jitted call: at most `rows` shortlist entries, and the nq queries
        split into equal batches so that padding the last one wastes little."""
        most = max(1, self.rows // ns)
        n_batches = -(-max(nq, 1) // most)
        return -(-max(nq, 1) // n_batches)

    def warm_up(self, nq: int, ns: int) -> None:
        qb = self._batch_queries(nq, ns)
        if (qb, ns) in self._warm:
            return
        W = self.model.config.code_width
        args = (np.zeros((qb, self.model.d), np.float32), np.zeros((qb, ns, W), np.int32),
                np.ones((qb, ns), bool))
        jax.block_until_ready(_rerank_batch(self.params, self.scale, *args, k=min(self.k, ns), dtype=self.dtype))
        self._warm.add((qb, ns))

    def __call__(self, xq: np.ndarray, codes: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """xq (nq, d) raw; codes (nq, ns, W) model codes of the shortlists; valid (nq, ns)
        False for missing entries. Returns the exact distances and the positions in the
        shortlist of the min(k, ns) best entries, best first; missing ones last at +inf."""
        nq, ns, W = codes.shape
        codes = np.where(valid[..., None], codes, 0).astype(np.int32)  # decodable placeholders
        k = min(self.k, ns)
        fn = lambda q, c, v: _rerank_batch(self.params, self.scale, q, c, v, k=k, dtype=self.dtype)
        return tuple(codec.map_batches(fn, [np.asarray(xq, np.float32), codes, np.asarray(valid, bool)],
                                       self._batch_queries(nq, ns)))


def gather_ids(ids: np.ndarray, D: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Result ids from shortlist positions; -1 where the distance is +inf (missing)."""
    I = np.take_along_axis(ids, positions, axis=1)
    I[~np.isfinite(D)] = -1
    return I


@dataclasses.dataclass
class SearchResult:
    D: np.ndarray  # (nq, <=100) exact distances after re-ranking
    I: np.ndarray  # (nq, <=100) ids after re-ranking
    I_short: np.ndarray  # (nq, nshort) the index's shortlist (AQ order)
    t_search: float
    t_decode: float
    t_dis: float


def _shortlist_and_rerank(shortlist, to_codes, xq: np.ndarray, nshort: int, reranker: Reranker) -> SearchResult:
    """The two stages, timed alike for the IVF and the flat search: `shortlist(xq, nshort)`
    -> (ids, payload) is t_search; `to_codes(ids, payload)` -> (model codes, valid) and
    the re-ranking are t_decode; gathering the result ids is t_dis."""
    xq = np.ascontiguousarray(xq, np.float32)
    reranker.warm_up(len(xq), nshort)
    t0 = time.time()
    I, payload = shortlist(xq, nshort)
    t1 = time.time()
    codes, valid = to_codes(I, payload)
    D, positions = reranker(xq, codes, valid)
    t2 = time.time()
    I_ref = gather_ids(I, D, positions)
    t3 = time.time()
    return SearchResult(D, I_ref, I, t1 - t0, t2 - t1, t3 - t2)


def search(index, model: QincoModel, xq: np.ndarray, nshort: int, reranker: Reranker) -> SearchResult:
    """One search at the index's current nprobe / efSearch: faiss shortlist of nshort
    with the codes and list numbers of its entries, QINCo re-ranking."""

    def shortlist(q, ns):
        _, I, raw = index.search_and_return_codes(q, ns, include_listnos=True)
        return I, raw

    def to_codes(I, raw):
        listnos, fine = split_search_codes(index, raw, model.config.M)
        valid = (I >= 0) & (listnos < index.nlist)
        codes = np.concatenate([np.where(valid, listnos, 0)[..., None].astype(np.int32), fine], axis=2)
        return codes, valid

    return _shortlist_and_rerank(shortlist, to_codes, xq, nshort, reranker)


def set_search_parameters(index, parameters: dict) -> None:
    index.nprobe = int(parameters["nprobe"])
    if "quantizer_efSearch" in parameters:
        quantizer = _coarse_quantizer(index)
        if not hasattr(quantizer, "hnsw"):
            raise ValueError("--quantizer_efSearch needs an HNSW coarse quantizer; this index has "
                             f"{type(quantizer).__name__}")
        quantizer.hnsw.efSearch = int(parameters["quantizer_efSearch"])


def _check_queries(model: QincoModel, xq: np.ndarray, gt: np.ndarray) -> None:
    if np.ndim(xq) != 2 or np.shape(xq)[1] != model.d:
        raise ValueError(f"queries have shape {np.shape(xq)}, the model ({model.describe()}) needs (nq, {model.d})")
    validation.check_all_finite(xq, "queries")
    if len(gt) != len(xq):
        raise ValueError(f"{len(gt)} ground-truth rows for {len(xq)} queries")


def _operating_point(parameters: dict, r: SearchResult, gt: np.ndarray) -> dict:
    """One result as the CLIs write it to --json (see qinco_jax.report)."""
    return dict(parameters=parameters, t_search=r.t_search, t_decode=r.t_decode, t_dis=r.t_dis,
                recalls=one_recall_at(r.I, gt), recalls_orig=one_recall_at(r.I_short, gt), nq=len(r.I))


def explore(index, model: QincoModel, xq: np.ndarray, gt: np.ndarray, *, nprobe: Sequence[int],
            nshort: Sequence[int], ef_search: Sequence[int] = (), n_autotune: int = 0,
            reranker: Reranker | None = None, log: Callable[[str], None] = print) -> list[dict]:
    """Search at every operating point of nprobe x efSearch x nshort (or n_autotune
    sampled ones, skipping points that cannot be Pareto-optimal), as the reference.
    Returns one dict per point: parameters, cno, recalls, recalls_orig, t_search,
    t_decode, t_dis, nq."""
    from faiss.contrib.evaluation import OperatingPointsWithRanges

    model = require_ivf_model(model)
    check_index_matches_model(index, model)
    _check_queries(model, xq, gt)
    reranker = reranker or Reranker(model)
    index.parallel_mode = 3  # as the reference: parallel over queries and lists
    op = OperatingPointsWithRanges()
    op.add_range("nprobe", [int(v) for v in nprobe])
    if ef_search:
        op.add_range("quantizer_efSearch", [int(v) for v in ef_search])
    op.add_range("nshort", [int(v) for v in nshort])
    experiments = op.sample_experiments(n_autotune, rs=np.random.RandomState(123))
    log(f"{op.num_experiments()} operating points, running {len(experiments)}")
    results = []
    for cno in experiments:
        key = op.cno_to_key(cno)
        parameters = {k: int(v) for k, v in op.get_parameters(key).items()}
        if n_autotune:
            max_perf, min_time = op.predict_bounds(key)
            if not op.is_pareto_optimal(max_perf, min_time):
                log(f"{cno:4d} {str(parameters):55s} skipped: cannot be Pareto-optimal")
                continue
        set_search_parameters(index, parameters)  # the first point checks efSearch applies
        r = search(index, model, xq, parameters["nshort"], reranker)
        res = dict(_operating_point(parameters, r, gt), cno=int(cno))
        op.add_operating_point(key, res["recalls"]["1"], r.t_search + r.t_decode + r.t_dis)
        results.append(res)
        log(format_row(res, len(xq)))
    return results


def format_header(param_names: Sequence[str] = ("nprobe", "nshort")) -> str:
    cols = "".join(f"{n:>10s}" for n in param_names)
    return (f"{cols} | {'R@1':>6s} {'R@10':>6s} {'R@100':>6s} | {'AQ R@1':>6s} {'R@10':>6s} {'R@100':>6s} "
            f"| {'ms/query':>9s} (search + decode + dis)")


def format_row(res: dict, nq: int) -> str:
    p = res["parameters"]
    cols = "".join(f"{v:>10d}" for v in p.values())
    r, o = res["recalls"], res["recalls_orig"]
    total = (res["t_search"] + res["t_decode"] + res["t_dis"]) * 1000 / nq
    return (f"{cols} | {r['1']:6.3f} {r['10']:6.3f} {r['100']:6.3f} | {o['1']:6.3f} {o['10']:6.3f} {o['100']:6.3f} "
            f"| {total:9.4f} ({res['t_search']*1000/nq:.4f} + {res['t_decode']*1000/nq:.4f} "
            f"+ {res['t_dis']*1000/nq:.4f})")


# --------------------------------------------------------------------------------------
# Flat two-stage search (the paper's Table 4): AQ shortlist over the whole database
# --------------------------------------------------------------------------------------


def require_flat_model(model) -> QincoModel:
    if not isinstance(model, QincoModel):
        raise ValueError(f"two-stage search needs a QINCo, QINCo-LR or IVF-QINCo model, got {model.describe()}")
    return model


def fit_flat_aq(model: QincoModel, x: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """AQ codebooks approximating the model's decoder for these codes: over all M code
    columns (QINCo, QINCo-LR, as the reference), or over the M steps on the residuals to
    the IVF centroids (IVF-QINCo, whose first column has K_IVF values)."""
    model = require_flat_model(model)
    codes = check_model_codes(model, codes, len(x), "codes")
    x = np.asarray(x, np.float32)
    if model.config.is_ivf:
        return aq.fit_codebooks(x - ivf_centroids(model)[codes[:, 0]], codes[:, 1:], model.config.K)
    return aq.fit_codebooks(x, codes, model.config.K)


def flat_aq_reconstruct(model: QincoModel, codes: np.ndarray, codebooks: np.ndarray) -> np.ndarray:
    if model.config.is_ivf:
        return ivf_centroids(model)[codes[:, 0]] + aq.reconstruct(codes[:, 1:], codebooks)
    return aq.reconstruct(codes, codebooks)


def two_stage_search(model: QincoModel, xq: np.ndarray, gt: np.ndarray, xb_codes: np.ndarray,
                     xb_aq: np.ndarray, nshort: Sequence[int], reranker: Reranker | None = None,
                     log: Callable[[str], None] = print) -> list[dict]:
    """For every nshort: exhaustive search of the AQ reconstructions xb_aq (faiss, L2),
    then QINCo decoding of the shortlist and exact re-ranking. Same result format as
    `explore`."""
    model = require_flat_model(model)
    _check_queries(model, xq, gt)
    xb_aq = np.ascontiguousarray(xb_aq, np.float32)
    xb_codes = check_model_codes(model, xb_codes, len(xb_aq), "database codes")
    reranker = reranker or Reranker(model)
    flat = faiss.IndexFlatL2(xb_aq.shape[1])
    flat.add(xb_aq)

    def shortlist(q, ns):
        return flat.search(q, ns)[1], None

    def to_codes(I, _):
        valid = I >= 0
        return xb_codes[np.where(valid, I, 0)], valid

    results = []
    for ns in nshort:
        ns = int(ns)
        if not 1 <= ns <= len(xb_aq):
            raise ValueError(f"nshort={ns} must lie in [1, {len(xb_aq)}] (the database size)")
        r = _shortlist_and_rerank(shortlist, to_codes, xq, ns, reranker)
        res = _operating_point({"nshort": ns}, r, gt)
        results.append(res)
        log(format_row(res, len(xq)))
    return results
