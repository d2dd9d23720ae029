"""IVF-QINCo indexes: build a faiss IVF-RQ index from an IVF-QINCo model and fill it
with QINCo codes (searching it, with a QINCo re-ranking of the shortlist, is `rerank`).

The index is a faiss `IndexIVFResidualQuantizer` (key `IVF<K_IVF>[_HNSW32],RQ<M>x<b>_N…`):

- its coarse quantizer holds the model's IVF centroids (codebook0 in raw units), in a flat
  or an HNSW index;
- its fine codes are the QINCo codes themselves (columns 1..M of a model code), and its
  RQ codebooks are the least-squares additive approximation of QINCo for those codes
  (`qinco_jax.search.aq`), so faiss can scan the lists with look-up tables;
- each entry stores the squared norm of its AQ reconstruction, quantized by the
  index's norm quantizer (e.g. `Nqint8`).

Choices made to give the reference's index bit for bit (its `search_ivf.py`):
- the norm quantizer's range is trained on the squared norms of the AQ *errors* of the
  training residuals, while the entries store the squared norms of the AQ
  *reconstructions* (the reference's comment says the norm training does not matter
  much for `_Nfloat`; for `_Nqint8` it sets the clipping range). The errors are smaller
  than the reconstructions: on the main job's indexes 23–30 % of the entries' norms lie
  above that range and are clipped to its top, which blurs the shortlist's distances.
  `train_index_on_codes(..., norm_training="reconstructions")` trains the range on the
  norms the entries store, as faiss does for its own IVF-RQ indexes (the main job's
  choice);
- database vectors go to the list of their model code (the exact nearest centroid),
  even when the coarse quantizer is an approximate HNSW;
- each add batch is sorted by list with numpy's default argsort, as the reference does,
  so the lists hold their entries in the reference's order (checked on the fixture
  index with numpy 2.4 on x86-64; numpy does not specify that order). Entries with equal codes
  tie in every distance; the order decides which comes first.

Re-ranking lives in `rerank`, the operating-point sweep in `sweep`, flat two-stage
search in `two_stage`; `QincoIndex` (qinco_index) holds an index and its model.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Iterable

import faiss
import numpy as np

from qinco_jax.search import aq
from qinco_jax.models import codec
from qinco_jax.formats import packing
from qinco_jax.data import validation
from qinco_jax.config import EncodeOptions
from qinco_jax.formats.io import atomic_path
from qinco_jax.models.qinco import QincoModel
from qinco_jax.search.index_files import faiss_message, read_ondisk_index  # lists on disk: memory-mapped, checked


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
    return model.denormalise(np.asarray(model.params["codebook0"], np.float32))


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
    index = read_ondisk_index(path, what)
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
    check_index_layout(index, d=c.d, nlist=c.K_IVF, M=c.M, K=c.K, what=what, model=c.describe())


def check_index_layout(index, *, d: int, nlist: int, M: int, K: int, what: str = "the index",
                       model: str = "") -> None:
    """Raise a ValueError naming the first property of `index` that codes of M steps of
    K codewords over nlist lists in dimension d (a model's, or a codes file's) cannot fill."""
    of = f"the model ({model})" if model else "the codes"
    if index.d != d:
        raise ValueError(f"{what} has dimension d={index.d}, {of} has d={d}")
    if index.metric_type != faiss.METRIC_L2:
        raise ValueError(f"{what} does not use the L2 metric; QINCo re-ranking is L2")
    if index.nlist != nlist:
        raise ValueError(f"{what} has nlist={index.nlist} inverted lists, {of} has K_IVF={nlist} centroids")
    if index.rq.M != M:
        raise ValueError(f"{what} has {index.rq.M} RQ codebooks, {of} has M={M} QINCo steps")
    nbits = rq_nbits(index)
    want = packing.bits_for(K)
    if (1 << want) != K or any(b != want for b in nbits):
        raise ValueError(f"{what} has RQ codes of {nbits} bits, {of} K={K} needs "
                         f"{want} bits per code (K a power of two)")
    if not index.by_residual:
        raise ValueError(f"{what} does not encode residuals (by_residual is off)")


def coarse_quantizer(index):
    return faiss.downcast_index(index.quantizer)


def new_index(model: QincoModel, index_key: str, ef_construction: int = -1) -> faiss.IndexIVFResidualQuantizer:
    """An empty index for `index_key`, after checking the model can fill it."""
    model = require_ivf_model(model)
    try:
        index = faiss.index_factory(model.d, index_key)
    except RuntimeError as e:
        raise ValueError(f"faiss cannot build index key {index_key!r}: {faiss_message(e)}") from None
    try:
        index = as_ivf_index(index)
    except ValueError:
        raise ValueError(f"index key {index_key!r} is not an IVF residual-quantizer index "
                         f"(expected e.g. IVF{model.config.K_IVF},RQ{model.config.M}x8_Nqint8)") from None
    check_index_matches_model(index, model, f"index key {index_key!r}")
    if ef_construction > 0:
        quantizer = coarse_quantizer(index)
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
                ef_construction: int = -1, options: EncodeOptions | None = None,
                log: Callable[[str], None] = print) -> tuple[faiss.IndexIVFResidualQuantizer, TrainStats]:
    """A trained, empty index for the model: AQ codebooks fitted on the training set's
    QINCo codes (encoded here unless `xt_codes` is given), the model's centroids in the
    coarse quantizer, the norm quantizer trained as the reference trains it."""
    model = require_ivf_model(model)
    new_index(model, index_key, ef_construction)  # checks the key first: fail fast
    xt = validation.as_finite_float32(xt, "index training vectors")
    t0 = time.time()
    if xt_codes is None:
        log(f"encoding {len(xt)} training vectors")
        xt_codes = codec.encode(model, xt, options, progress="encode train")
    xt_codes = check_model_codes(model, xt_codes, len(xt), "training codes")
    t_encode = time.time() - t0
    index, stats = train_index_on_codes(ivf_centroids(model), xt, xt_codes, index_key, model.config.K,
                                        ef_construction=ef_construction, log=log)
    return index, dataclasses.replace(stats, t_encode=t_encode)


NORM_TRAINING = ("errors", "reconstructions")  # what the norm quantizer's range is trained on


def train_index_on_codes(centroids: np.ndarray, xt: np.ndarray, xt_codes: np.ndarray, index_key: str, K: int, *,
                         ef_construction: int = -1, max_training: int | None = None, norm_training: str = "errors",
                         log: Callable[[str], None] = print) -> tuple[faiss.IndexIVFResidualQuantizer, TrainStats]:
    """A trained, empty IVF-RQ index from the IVF centroids (raw units), raw training
    vectors and their model codes (n, 1 + M) alone — no model needed, as QINCo2's
    `run.py task=build_index` builds it: AQ codebooks fitted by least squares to the
    residuals xt - centroids[list] on the first `max_training` vectors (the reference's
    search.aq_training_samples; all by default), the norm quantizer trained on the AQ
    errors of all of them, the centroids in the coarse quantizer.
    norm_training: "errors" (the reference's, above) or "reconstructions": the norm
    quantizer's range trained on the squared norms of the AQ reconstructions, the
    numbers the entries store (none clipped at the training set's range; see the
    module doc)."""
    if norm_training not in NORM_TRAINING:
        raise ValueError(f"norm_training must be one of {', '.join(NORM_TRAINING)}, got {norm_training!r}")
    centroids = np.ascontiguousarray(validation.as_finite_float32(centroids, "IVF centroids"))
    xt = validation.as_finite_float32(xt, "index training vectors")
    xt_codes = np.asarray(xt_codes)
    if centroids.ndim != 2 or xt.ndim != 2 or centroids.shape[1] != xt.shape[1]:
        raise ValueError(f"IVF centroids {centroids.shape} and training vectors {xt.shape} must be (nlist, d) "
                         "and (n, d) of the same d")
    if xt_codes.ndim != 2 or len(xt_codes) != len(xt) or xt_codes.shape[1] < 2:
        raise ValueError(f"training codes have shape {xt_codes.shape}, expected ({len(xt)}, 1 + M)")
    if xt_codes.min() < 0 or xt_codes[:, 0].max() >= len(centroids) or xt_codes[:, 1:].max() >= K:
        raise ValueError(f"training codes out of range: lists must lie in [0, {len(centroids)}), "
                         f"step codes in [0, {K})")
    try:
        index = as_ivf_index(faiss.index_factory(xt.shape[1], index_key))
    except RuntimeError as e:
        raise ValueError(f"faiss cannot build index key {index_key!r}: {faiss_message(e)}") from None
    check_index_layout(index, d=xt.shape[1], nlist=len(centroids), M=xt_codes.shape[1] - 1, K=K,
                       what=f"index key {index_key!r}")
    if ef_construction > 0:
        quantizer = coarse_quantizer(index)
        if not hasattr(quantizer, "hnsw"):
            raise ValueError(f"efConstruction needs an HNSW coarse quantizer, {index_key!r} has none")
        quantizer.hnsw.efConstruction = ef_construction

    t0 = time.time()
    residuals = xt - centroids[xt_codes[:, 0]]
    nt = len(xt) if max_training is None else max(1, min(len(xt), int(max_training)))
    codebooks = aq.fit_codebooks(residuals[:nt], xt_codes[:nt, 1:], K)
    recons = aq.reconstruct(xt_codes[:, 1:], codebooks)
    err_norms = np.ascontiguousarray(((recons - residuals) ** 2).sum(1), dtype=np.float32)
    mse = float(err_norms.astype(np.float64).mean())
    norms = err_norms if norm_training == "errors" else np.ascontiguousarray((recons ** 2).sum(1), dtype=np.float32)
    t_train = time.time() - t0
    log(f"AQ codebooks fitted on {nt} vectors in {t_train:.2f} s, MSE of the training residuals {mse:g}")

    t0 = time.time()
    with validation.faiss_step("index training (coarse quantizer, norm quantizer)", on=f"{len(xt)} training vectors"):
        coarse_quantizer(index).add(centroids)
        faiss.copy_array_to_vector(np.ascontiguousarray(codebooks.ravel()), index.rq.codebooks)
        index.rq.train_norm(len(norms), faiss.swig_ptr(norms))
    index.rq.is_trained = True
    index.is_trained = True
    t_index = time.time() - t0
    return index, TrainStats(mse, 0.0, t_train, t_index)


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
    # row by row the same numbers, a block of rows at a time: the (n, d) reconstructions
    # of a million-code add chunk would take 512 MB (d=128)
    norms = np.empty(n, np.float32)
    for i0 in range(0, n, 65536):
        norms[i0:i0 + 65536] = (aq.reconstruct(fine[i0:i0 + 65536], codebooks) ** 2).sum(1)
    packed = np.empty((n, index.code_size), np.uint8)
    if n:
        index.rq.pack_codes(n, faiss.swig_ptr(fine), faiss.swig_ptr(packed), -1, faiss.swig_ptr(norms), None)
    return np.hstack([encode_listnos(codes[:, 0], index.coarse_code_size()), packed])


def check_index_codes(index, codes: np.ndarray, what: str = "codes to add") -> np.ndarray:
    """Codes (n, 1 + M) as int32 after checking they fit the index (no model at hand)."""
    codes = np.asarray(codes)
    M, K = index.rq.M, 1 << rq_nbits(index)[0]
    if codes.ndim != 2 or codes.shape[1] != M + 1 or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"{what} are {codes.dtype} {codes.shape}: the index needs integer codes (n, {M + 1}) "
                         f"(IVF list + {M} steps)")
    if len(codes) and (codes.min() < 0 or codes[:, 0].max() >= index.nlist or codes[:, 1:].max() >= K):
        raise ValueError(f"{what} out of range: lists must lie in [0, {index.nlist}), step codes in [0, {K})")
    return codes.astype(np.int32)


def add_codes(index, model: QincoModel | None, codes: np.ndarray, first_id: int | None = None,
              codebooks: np.ndarray | None = None) -> None:
    """Append vectors given by their model codes; ids are first_id, first_id + 1, ...
    (default: the index's current size). One C++ call fills all lists, after sorting the
    entries by list with numpy's default argsort, as the reference's add does: built
    from the same codes in the same batches, the lists hold the same entries in the same
    order (which decides ties between entries with equal codes at search time).
    model None: the codes are checked against the index alone."""
    codes = (check_index_codes(index, codes) if model is None
             else check_model_codes(model, codes, None, "codes to add"))
    if first_id is None:
        first_id = index.ntotal
    order = np.argsort(codes[:, 0].astype(np.int64))
    sa = np.ascontiguousarray(sa_codes(index, codes[order], codebooks))
    with validation.faiss_step("adding codes to the index", on=f"{len(codes)} vectors from id {first_id}"):
        lists = faiss.downcast_InvertedLists(index.invlists)
        if isinstance(lists, faiss.OnDiskInvertedLists):
            _append_by_list(index, lists, codes[order, 0], sa, (first_id + order).astype(np.int64))
        else:
            index.add_sa_codes(sa, (first_id + order).astype(np.int64))


def _append_by_list(index, lists, listnos: np.ndarray, sa: np.ndarray, ids: np.ndarray) -> None:
    """What add_sa_codes does, one call per list: entries sorted by list (listnos
    increasing) appended in order. On-disk lists take an entry at a time 30x slower."""
    if lists.read_only:
        raise ValueError(f"the on-disk lists {lists.filename} are opened read-only (for search); "
                         "build a new index to add to")
    fine = np.ascontiguousarray(sa[:, index.coarse_code_size():])
    bounds = np.searchsorted(listnos, np.arange(index.nlist + 1))
    for l in np.flatnonzero(np.diff(bounds)):
        a, b = int(bounds[l]), int(bounds[l + 1])
        lists.add_entries(int(l), b - a, faiss.swig_ptr(ids[a:b]), faiss.swig_ptr(fine[a:b]))
    index.ntotal += len(ids)


def add_vectors(index, model: QincoModel, batches: Iterable[np.ndarray], *, code_batches: bool = False,
                expected_total: int | None = None, options: EncodeOptions | None = None,
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
        else:  # dtype and finite values checked as the batch is copied, rows numbered in the whole database
            batch = validation.as_finite_float32(batch, "database vectors", first_row=index.ntotal - n_before)
            codes = codec.encode(model, batch, options, progress=f"encode db batch {i}")
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



def train_ivf_centroids(xt: np.ndarray, n_centroids: int, niter: int = 10, *, verbose: bool = True) -> np.ndarray:
    """k-means IVF centroids (n_centroids, d) of the training vectors (faiss, on a GPU
    when faiss has one), as the reference's search_ivf.py --todo train_centroids."""
    if n_centroids < 1 or niter < 1:
        raise ValueError(f"need n_centroids >= 1 and niter >= 1, got {n_centroids} and {niter}")
    if len(xt) < n_centroids:
        raise ValueError(f"{len(xt)} training vectors cannot make {n_centroids} centroids")
    gpu = faiss.get_num_gpus() > 0 if hasattr(faiss, "get_num_gpus") else False
    km = faiss.Kmeans(xt.shape[1], n_centroids, niter=niter, verbose=verbose, gpu=gpu)
    with validation.faiss_step("k-means of the IVF centroids", on=f"{len(xt)} x {xt.shape[1]} training vectors"):
        km.train(validation.as_finite_float32(xt, "k-means training vectors"))
    return km.centroids
