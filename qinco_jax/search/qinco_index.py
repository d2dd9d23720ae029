"""QincoIndex: an IVF-QINCo index used like a faiss index.

    index = QincoIndex.build(model, xt, "IVF1024,RQ8x8_Nqint8")  # train
    index.add(xb)                                                # encode + add, in batches
    index.nprobe, index.nshort = 16, 200
    D, I = index.search(xq, 10)                                  # shortlist, QINCo re-ranking
    index.write("db.faissindex"); index = QincoIndex.read("db.faissindex", model)

`write` keeps, beside the faiss file, the search settings (nprobe, nshort, efSearch,
nmid_short, the pairwise table storage, the re-ranking options, an engine where the
index has one) and the fingerprint of the model in `db.faissindex.qinco.json`, and the
pairwise decoder, if any, in `db.faissindex.pairwise.pt`; `read` restores them all, so
the same search gives the same neighbours. `read` (and the constructor) refuse a model
that did not make the index's codes, and setting a pairwise decoder refuses one trained
for another model (`qinco_jax.search.provenance`; `allow_model_mismatch=True` to
override).

The search is the stages of `rerank.search_ivf`: faiss returns the nshort best entries
by the AQ approximation, QINCo decodes them and ranks them exactly. With a pairwise
decoder (QINCo2's three-stage search) faiss returns nmid_short * nshort entries and the
pairwise decoder keeps the nshort nearest before QINCo decodes them:

    index.pairwise_decoder = pairwise.load_pairwise_decoder("pairwise.pt")
    index.nmid_short = 4
    index.pairwise_table_dtype = "int8"   # optional: smaller tables, a faster middle stage
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import warnings
from typing import Callable

import numpy as np

from qinco_jax.models import pairwise
from qinco_jax.data import validation
from qinco_jax.config import EncodeOptions
from qinco_jax.models.qinco import QincoModel
from qinco_jax.search import index as ivf_index
from qinco_jax.search import pairwise_stage, provenance
from qinco_jax.search.rerank import PairwiseReranker, Reranker, SearchResult, search_ivf

DEFAULT_ADD_BATCH = 1 << 16  # database vectors encoded and added per batch
PAIRWISE_SUFFIX = ".pairwise.pt"  # where `write` puts the pairwise decoder, beside the index
# Search settings `write` records and `read` restores, besides nprobe / efSearch / options.
_SETTINGS = ("nshort", "nmid_short", "pairwise_table_dtype", "engine")


def _quiet(_msg: str) -> None:
    pass


def _warn(msg: str) -> None:
    warnings.warn(msg, stacklevel=3)


class QincoIndex:
    """A faiss IVF-RQ index (`faiss.IndexIVFResidualQuantizer`) and the IVF-QINCo model
    whose codes it holds. Settable search parameters: nprobe (lists visited), nshort
    (shortlist re-ranked by QINCo), efSearch (of an HNSW coarse quantizer), and with a
    `pairwise_decoder`: nmid_short (faiss returns nmid_short * nshort entries, capped as
    `rerank.shortlist_length` says, for the pairwise stage to cut to nshort) and
    pairwise_table_dtype (how the middle stage stores the tables: one of
    pairwise.TABLE_DTYPES, see `pairwise.compact`; None: as the decoder holds them, float32
    for a decoder read from a file).
    options: how `add` encodes (and the re-ranking's dtype).

    The model must be the one that made the index's codes: a model of the right shape
    but other weights is refused with a `provenance.ModelMismatchError` (checked by the
    fingerprint `write` records, else by decoding a sample of the stored entries);
    allow_model_mismatch=True only warns. index_path: the file the index came from
    (named in errors; its metadata holds the fingerprint) — `read` sets it."""

    def __init__(self, index, model: QincoModel, *, options: EncodeOptions | None = None, nshort: int = 100,
                 pairwise_decoder: pairwise.PairwiseDecoder | None = None, nmid_short: int = 0,
                 pairwise_table_dtype: str | None = None, allow_model_mismatch: bool = False,
                 index_path: str | os.PathLike | None = None):
        self.index = ivf_index.as_ivf_index(index)
        self.model = ivf_index.require_ivf_model(model)
        ivf_index.check_index_matches_model(self.index, self.model)
        self.allow_model_mismatch = bool(allow_model_mismatch)
        self.provenance = provenance.check_index_belongs(
            self.index, self.model, index_path=index_path, allow_mismatch=self.allow_model_mismatch,
            override_hint="allow_model_mismatch=True", log=_warn)
        self.options = options or EncodeOptions()
        self.nshort = nshort
        self.nmid_short = nmid_short
        self.decoder_provenance: provenance.Belonging | None = None  # how the pairwise decoder was checked
        self._rerankers: dict[int, Reranker] = {}
        self._mid: PairwiseReranker | None = None
        self._pairwise_decoder = None
        self.pairwise_table_dtype = pairwise_table_dtype
        self.pairwise_decoder = pairwise_decoder

    # ---- construction and files ------------------------------------------------------

    @classmethod
    def build(cls, model: QincoModel, xt: np.ndarray, index_key: str, *, xt_codes: np.ndarray | None = None,
              options: EncodeOptions | None = None, ef_construction: int = -1,
              log: Callable[[str], None] = _quiet) -> "QincoIndex":
        """A trained, empty index for `model` (see search.index.train_index)."""
        index, _ = ivf_index.train_index(model, xt, index_key, xt_codes=xt_codes, options=options,
                                         ef_construction=ef_construction, log=log)
        return cls(index, model, options=options)

    @classmethod
    def read(cls, index_path, model: QincoModel, **kwargs) -> "QincoIndex":
        """The index of a file, with the search settings and pairwise decoder `write`
        kept beside it (keyword arguments override them: nshort=, pairwise_decoder=,
        ...), after checking that `model` made its codes."""
        index = ivf_index.read_index(index_path)
        record = provenance.fresh_metadata(index_path, index) or {}
        saved = dict(record.get("search_settings") or {})
        # settings the constructor takes go to it; the others (nprobe, efSearch) are set after
        init_keys = tuple(k for k in _SETTINGS if k in inspect.signature(cls.__init__).parameters)
        for key in init_keys:
            if key in saved:
                kwargs.setdefault(key, saved[key])
        if "options" in saved and "options" not in kwargs:
            kwargs["options"] = EncodeOptions(**saved["options"])
        decoder_file = record.get("pairwise_decoder_file")
        load_decoder = decoder_file and "pairwise_decoder" not in kwargs
        self = cls(index, model, index_path=index_path, **kwargs)
        for key in ("nprobe", "efSearch") + tuple(k for k in _SETTINGS if k not in init_keys):
            if key in saved and saved[key] is not None and key not in kwargs and hasattr(self, key):
                setattr(self, key, saved[key])
        if load_decoder:
            self.open_pairwise_decoder(os.path.join(os.path.dirname(os.fspath(index_path)), decoder_file))
        return self

    def search_settings(self) -> dict:
        """What `write` records and `read` restores: nprobe, efSearch (HNSW coarse
        quantizer only), nshort, nmid_short, pairwise_table_dtype, engine (where the
        index has one) and the re-ranking options."""
        settings = {"nprobe": self.nprobe}
        if hasattr(ivf_index.coarse_quantizer(self.index), "hnsw"):
            settings["efSearch"] = self.efSearch
        for key in _SETTINGS:
            value = getattr(self, key, None)
            if value is not None:
                settings[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
        settings["options"] = dataclasses.asdict(self.options)
        return settings

    def write(self, path) -> None:
        """Write the faiss index (atomically), its metadata (`<path>.qinco.json`: the
        model's fingerprint, `search_settings()`) and the pairwise decoder if one is set
        (`<path>.pairwise.pt`, float32 tables); the model is saved separately."""
        ivf_index.write_index(self.index, path)
        extra = {}
        if self._pairwise_decoder is not None:
            decoder_path = os.fspath(path) + PAIRWISE_SUFFIX
            pairwise.save_pairwise_decoder(self._pairwise_decoder, decoder_path,
                                           model_fingerprint=None if self._decoder_overridden
                                           else provenance.model_fingerprint(self.model))
            extra["pairwise_decoder_file"] = os.path.basename(decoder_path)
        provenance.write_metadata(path, self.index, self.model, settings=self.search_settings(), extra=extra,
                                  made_by_model=self.provenance.by != "overridden")

    @property
    def _decoder_overridden(self) -> bool:
        return self.provenance.by == "overridden" or (
            self.decoder_provenance is not None and self.decoder_provenance.by == "overridden")

    def open_pairwise_decoder(self, path) -> None:
        """Read a pairwise decoder file and use it as the middle stage, after checking
        it was trained for this index's model (the fingerprint its file records, else
        by decoding a sample of the stored entries)."""
        decoder = pairwise_stage.load_for_model(path, self.model)
        self.decoder_provenance = provenance.check_decoder_belongs(
            decoder, self.model, provenance.stored_codes_sample(self.index), decoder_path=path,
            recorded_fingerprint=pairwise.read_model_fingerprint(path), allow_mismatch=self.allow_model_mismatch,
            override_hint="allow_model_mismatch=True", log=_warn)
        self._set_pairwise_decoder(decoder)

    # ---- adding ----------------------------------------------------------------------

    def add(self, x: np.ndarray, batch_size: int = DEFAULT_ADD_BATCH, log: Callable[[str], None] = _quiet) -> None:
        """Encode raw vectors with the model (self.options) and add them, batch by batch;
        ids continue from ntotal."""
        if batch_size < 1:
            raise ValueError(f"add batch size must be >= 1, got {batch_size}")
        batches = (x[i:i + batch_size] for i in range(0, len(x), batch_size))
        ivf_index.add_vectors(self.index, self.model, batches, expected_total=len(x), options=self.options, log=log)

    def add_codes(self, codes: np.ndarray) -> None:
        """Add vectors given by their model codes (n, M + 1)."""
        ivf_index.add_codes(self.index, self.model, codes)

    # ---- search parameters -----------------------------------------------------------

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def d(self) -> int:
        return int(self.index.d)

    @property
    def nprobe(self) -> int:
        return int(self.index.nprobe)

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if value < 1:
            raise ValueError(f"nprobe must be >= 1, got {value}")
        self.index.nprobe = int(value)

    @property
    def nshort(self) -> int:
        return self._nshort

    @nshort.setter
    def nshort(self, value: int) -> None:
        if value < 1:
            raise ValueError(f"nshort must be >= 1, got {value}")
        self._nshort = int(value)

    @property
    def nmid_short(self) -> int:
        return self._nmid_short

    @nmid_short.setter
    def nmid_short(self, value: int) -> None:
        if value < 0:
            raise ValueError(f"nmid_short must be >= 0, got {value}")
        self._nmid_short = int(value)

    @property
    def pairwise_decoder(self) -> pairwise.PairwiseDecoder | None:
        return self._pairwise_decoder

    @pairwise_decoder.setter
    def pairwise_decoder(self, decoder: pairwise.PairwiseDecoder | None) -> None:
        """Set (checked against the model: its shape, then its reconstructions of a
        sample of the stored entries) or remove (None) the middle stage."""
        if decoder is not None:
            pairwise_stage.check_decoder_fits(decoder, self.model)
            self.decoder_provenance = provenance.check_decoder_belongs(
                decoder, self.model, provenance.stored_codes_sample(self.index),
                allow_mismatch=self.allow_model_mismatch, override_hint="allow_model_mismatch=True", log=_warn)
        self._set_pairwise_decoder(decoder)

    def _set_pairwise_decoder(self, decoder: pairwise.PairwiseDecoder | None) -> None:
        self._mid = None if decoder is None else pairwise_stage.middle_stage(
            decoder, self.model, table_dtype=self._pairwise_table_dtype)
        self._pairwise_decoder = decoder

    @property
    def pairwise_table_dtype(self) -> str | None:
        return self._pairwise_table_dtype

    @pairwise_table_dtype.setter
    def pairwise_table_dtype(self, value: str | None) -> None:
        """The middle stage's table storage (pairwise.TABLE_DTYPES; None: the decoder's)."""
        if value is not None and value not in pairwise.TABLE_DTYPES:
            raise ValueError(f"unknown pairwise table dtype {value!r}: use one of {', '.join(pairwise.TABLE_DTYPES)}")
        self._pairwise_table_dtype = value
        self._set_pairwise_decoder(self._pairwise_decoder)  # rebuild the stage

    @property
    def efSearch(self) -> int:  # noqa: N802 (faiss's name)
        return int(self._hnsw().efSearch)

    @efSearch.setter
    def efSearch(self, value: int) -> None:  # noqa: N802
        if value < 1:
            raise ValueError(f"efSearch must be >= 1, got {value}")
        self._hnsw().efSearch = int(value)

    def _hnsw(self):
        quantizer = ivf_index.coarse_quantizer(self.index)
        if not hasattr(quantizer, "hnsw"):
            raise ValueError(f"efSearch needs an HNSW coarse quantizer; this index has {type(quantizer).__name__}")
        return quantizer.hnsw

    # ---- search ----------------------------------------------------------------------

    def search_detailed(self, xq: np.ndarray, k: int) -> SearchResult:
        """The search with its shortlist and timings (see rerank.SearchResult)."""
        if not 1 <= k <= self.nshort:
            raise ValueError(f"k={k} must lie in [1, nshort={self.nshort}]: only the shortlist is re-ranked")
        xq = np.asarray(xq)
        if xq.ndim != 2 or xq.shape[1] != self.d:
            raise ValueError(f"queries have shape {xq.shape}, the index needs (nq, {self.d})")
        validation.check_all_finite(xq, "queries")
        if k not in self._rerankers:
            self._rerankers[k] = Reranker(self.model, dtype=self.options.dtype, k=k)
        return search_ivf(self.index, self.model, xq, self.nshort, self._rerankers[k], mid=self._mid,
                          nmid_short=self.nmid_short)

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(D, I), each (nq, k): exact squared distances and ids of the k nearest
        vectors among each query's re-ranked shortlist; -1 / inf where fewer exist."""
        r = self.search_detailed(xq, k)
        return r.D, r.I
