"""Which model made an index's codes: model fingerprints, index metadata files, and the
decode check that refuses a model (or a pairwise decoder) that does not belong.

An IVF-QINCo index stores codes, not vectors: only the model that made them decodes
them into the right vectors. A model of the same shape (same d, K_IVF, M, K) but other
weights opens the index and searches it, silently wrong (re-ranked recall@1 falls from
0.44 to 0.01 on SIFT). Two checks catch that:

1. **Fingerprint.** What this library writes records the fingerprint of the model that
   made the codes (`model_fingerprint`: a hash of the model's parameters and
   normalisation): an index gets a metadata file beside it, `<index>.qinco.json`
   (`metadata_path`), which the reference's readers never open; a pairwise decoder
   file gets an extra entry in its zip archive, which `torch.load` ignores. A fresh
   record (it describes the very index at hand: same size, same sampled entries) with
   another fingerprint is a refusal.
2. **Decode check**, for files with no record (built by the reference, or copied
   without their metadata): a sample of the index's stored codes is decoded by the
   model and by the index's own AQ codebooks (the additive approximation fitted to the
   right model's codes). `decode_disagreement` compares the two residuals to the IVF
   centroids, r_model and r_AQ:

       disagreement = mean |r_model - r_AQ|² / mean (|r_model|² + |r_AQ|²)

   0 when they agree exactly, about 1 when they are unrelated (r_model carries no
   information about r_AQ), at most 2. Measured on the test fixtures (reference-built
   indexes, `SAMPLE_SIZE` entries; over seeds of the sample it moves by about 0.01):
   the right model 0.006 (QINCo2), 0.20 and 0.24 (briefly trained QINCo v1 models,
   whose AQ fit is coarse; 0.20 and 0.24 over all 10,000 entries too); a QINCo2 model
   of the same shape on a QINCo v1 index and the reverse 0.96 and 0.98; re-initialised
   models with the right IVF centroids 0.995 to 1.001. `MISMATCH_THRESHOLD` lies
   between.
   The same measure with a pairwise decoder's reconstructions in place of the AQ ones
   checks a decoder against a model, with its own threshold: a right decoder can be
   far coarser than an AQ fit (each of its K² -row tables is fitted on the training
   set alone, and a small training set leaves most rows empty). Measured on the
   fixtures' stored entries: the reference's K=16 decoder with its model 0.015,
   decoders trained here on 6,000 vectors 0.41 (v1) and 0.68 (QINCo2, K=256: mostly
   empty tables); a decoder trained on the other model's codes 0.99 and 1.00.

The decode check cannot tell apart two models that decode alike (e.g. two short
trainings from the same RQ start): for those only the fingerprint speaks, which is why
this library records it. Experts override both checks with `allow_mismatch`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import faiss
import jax
import numpy as np

from qinco_jax.formats import packing
from qinco_jax.formats.io import write_bytes
from qinco_jax.models import codec, pairwise
from qinco_jax.search import aq
from qinco_jax.search import index as ivf

# Stored entries decoded by the decode check (0.2 s for a small model on a CPU).
SAMPLE_SIZE = 512
SAMPLE_LISTS = 4096  # lists whose sizes are read to draw the sample from (a few ms)
# Disagreement above which a model is refused (right models <= 0.23, wrong >= 0.95 on the fixtures).
MISMATCH_THRESHOLD = 0.6
# The same for a pairwise decoder against a model (right decoders <= 0.68, wrong >= 0.99).
DECODER_MISMATCH_THRESHOLD = 0.85
# Relative centroid gap (`centroid_gap`) above which an empty index is refused.
CENTROID_TOLERANCE = 1e-6
METADATA_SUFFIX = ".qinco.json"
METADATA_FORMAT = "qinco-jax index metadata"
METADATA_VERSION = 1


class ModelMismatchError(ValueError):
    """A model, an index and / or a pairwise decoder that do not belong together."""


# --------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------


def model_fingerprint(model) -> str:
    """A short hex digest of what decides a model's decode: its kind and sizes, every
    parameter (as float32, in a fixed order) and its normalisation. Equal for the same
    model read from a reference .pt file or from this library's formats."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    h.update((model.describe() if hasattr(model, "describe") else type(model).__name__).encode())
    if config is not None and hasattr(config, "db_scale"):
        h.update(np.float32(config.db_scale).tobytes())
    leaves = jax.tree_util.tree_flatten_with_path(model.params)[0]
    for path, leaf in sorted(leaves, key=lambda pl: jax.tree_util.keystr(pl[0])):
        a = np.ascontiguousarray(np.asarray(leaf, np.float32))
        h.update(jax.tree_util.keystr(path).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------
# The index's stored codes
# --------------------------------------------------------------------------------------


def stored_codes_sample(index, n: int = SAMPLE_SIZE, seed: int = 0) -> np.ndarray:
    """Up to n stored entries of an IVF-RQ index as codes (n, 1 + M) int32 (list, then
    the RQ codes), the same ones for the same index: drawn uniformly among the entries
    of SAMPLE_LISTS randomly chosen lists (all of them when nlist <= SAMPLE_LISTS, more
    while those hold fewer than n), so a million-list index costs no full scan."""
    M = index.rq.M
    if index.ntotal == 0:
        return np.zeros((0, M + 1), np.int32)
    inv = index.invlists
    rng = np.random.default_rng(seed)
    order = rng.permutation(index.nlist)
    lists = np.zeros(0, np.int64)
    sizes = np.zeros(0, np.int64)
    for start in range(0, index.nlist, SAMPLE_LISTS):
        block = order[start:start + SAMPLE_LISTS]
        lists = np.concatenate([lists, block])
        sizes = np.concatenate([sizes, [inv.list_size(int(l)) for l in block]])
        if sizes.sum() >= n:
            break
    total = int(sizes.sum())
    picks = np.sort(rng.choice(total, size=min(n, total), replace=False))
    starts = np.concatenate([[0], np.cumsum(sizes)])
    where = np.searchsorted(starts, picks, side="right") - 1
    rows, listnos = [], []
    for k in np.unique(where):
        l, size = int(lists[k]), int(sizes[k])
        ptr = inv.get_codes(l)
        try:
            codes = np.frombuffer(faiss.rev_swig_ptr(ptr, size * inv.code_size), np.uint8).reshape(size, -1)
            rows.append(codes[picks[where == k] - starts[k]].copy())
        finally:
            inv.release_codes(l, ptr)
        listnos.append(np.full(len(rows[-1]), l, np.int64))
    nbits = [int(b) for b in faiss.vector_to_array(index.rq.nbits)]
    fine = packing.unpack_codes(np.concatenate(rows), None, nbits)
    return np.concatenate([np.concatenate(listnos)[:, None], fine], axis=1).astype(np.int32)


def _coarse_centroids(index) -> np.ndarray:
    return faiss.downcast_index(index.quantizer).reconstruct_n(0, index.nlist)


def centroid_gap(index, model) -> float:
    """The largest squared distance between the index's coarse centroids and the
    model's IVF centroids (raw units), relative to the centroids' mean squared spread
    (0 for an index built from the model; reference-built ones: below 1e-15)."""
    ours, theirs = _coarse_centroids(index), ivf.ivf_centroids(model)
    spread = float(((ours - ours.mean(0)) ** 2).sum(1).mean())
    gap = float(((ours - theirs) ** 2).sum(1).max())
    return gap / spread if spread > 0 else gap


def _disagreement(reference: np.ndarray, other: np.ndarray) -> float:
    num = ((reference - other) ** 2).sum(1).astype(np.float64).mean()
    den = ((reference ** 2).sum(1) + (other ** 2).sum(1)).astype(np.float64).mean()
    return float(num / den) if den > 0 else 0.0


def decode_disagreement(index, model, codes: np.ndarray) -> float:
    """How far the model's decode of `codes` (stored entries of `index`) lies from the
    index's own AQ decode of them (see the module doc: 0 = equal, ~1 = unrelated)."""
    if not len(codes):
        return 0.0
    centroids = _coarse_centroids(index)[codes[:, 0]]
    K = 1 << int(faiss.vector_to_array(index.rq.nbits)[0])
    codebooks = faiss.vector_to_array(index.rq.codebooks).reshape(index.rq.M, K, index.d)
    r_aq = aq.reconstruct(codes[:, 1:], codebooks)
    r_model = codec.decode(model, codes, batch_size=len(codes)) - centroids
    return _disagreement(r_model, r_aq)


def decoder_disagreement(decoder, model, codes: np.ndarray, ivf_centroids: np.ndarray | None = None) -> float:
    """The same measure between the model's decode of `codes` and a pairwise decoder's
    (both as residuals to the IVF centroids, by default the model's own)."""
    if not len(codes):
        return 0.0
    cents = ivf.ivf_centroids(model) if ivf_centroids is None else np.asarray(ivf_centroids, np.float32)
    base = cents[codes[:, 0]]
    r_model = codec.decode(model, codes, batch_size=len(codes)) - base
    r_pairwise = pairwise.decode(decoder, codes, cents) - base
    return _disagreement(r_model, r_pairwise)


def _sample_digest(index, codes: np.ndarray) -> str:
    """Identifies an index's content cheaply: its size and the sampled stored entries."""
    h = hashlib.sha256(f"{index.ntotal} {index.nlist} {index.d} {index.rq.M}".encode())
    h.update(np.ascontiguousarray(codes, np.int32).tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------
# Index metadata files
# --------------------------------------------------------------------------------------


def metadata_path(index_path: str | os.PathLike) -> Path:
    """Where an index's metadata lives: `<index>.qinco.json` beside it."""
    return Path(os.fspath(index_path) + METADATA_SUFFIX)


def write_metadata(index_path: str | os.PathLike, index, model, *, settings: dict | None = None,
                   extra: dict | None = None, made_by_model: bool = True) -> Path:
    """Write the metadata of an index this library built with `model` (atomically):
    the model's fingerprint and description, what identifies the index's content, and
    optional search `settings` (QincoIndex.write). made_by_model=False (an index opened
    with a mismatch allowed): no fingerprint is recorded, so the next reader checks
    the model again by decoding."""
    record: dict[str, Any] = {
        "format": METADATA_FORMAT,
        "version": METADATA_VERSION,
        "index_file": os.path.basename(os.fspath(index_path)),
        "ntotal": int(index.ntotal),
        "content_digest": _sample_digest(index, stored_codes_sample(index)),
        "model_fingerprint": model_fingerprint(model) if made_by_model else None,
        "model": model.describe(),
    }
    if not made_by_model:
        record["model_mismatch_allowed"] = True
    if settings:
        record["search_settings"] = settings
    if extra:
        record.update(extra)
    path = metadata_path(index_path)
    write_bytes(path, (json.dumps(record, indent=1) + "\n").encode())
    return path


def read_metadata(index_path: str | os.PathLike) -> dict | None:
    """The metadata record of an index file, or None if it has none (or an unreadable one)."""
    path = metadata_path(index_path)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != METADATA_FORMAT:
        return None
    return record


def fresh_metadata(index_path: str | os.PathLike | None, index, codes: np.ndarray | None = None) -> dict | None:
    """The metadata of `index_path` if it describes `index` as it is (same size and
    sampled entries): a record left beside an index that was since rewritten by other
    tools is ignored."""
    if index_path is None:
        return None
    record = read_metadata(index_path)
    if record is None:
        return None
    if codes is None:
        codes = stored_codes_sample(index)
    if record.get("ntotal") != int(index.ntotal) or record.get("content_digest") != _sample_digest(index, codes):
        return None
    return record


# --------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Belonging:
    """What the check found: how (`by`: "fingerprint", "decode", "empty index",
    "overridden"), the disagreement measured (None when not measured) and the
    index's metadata record (None: none, or stale)."""

    by: str
    disagreement: float | None
    metadata: dict | None


def _names(index_path, model_path, model) -> tuple[str, str]:
    index_name = f"index {os.fspath(index_path)}" if index_path else "the index"
    model_name = (f"model {os.fspath(model_path)} ({model.describe()})" if model_path
                  else f"the model ({model.describe()})")
    return index_name, model_name


def check_index_belongs(index, model, *, index_path=None, model_path=None, allow_mismatch: bool = False,
                        override_hint: str = "allow_mismatch=True",
                        log: Callable[[str], None] | None = None) -> Belonging:
    """Raise ModelMismatchError unless `model` made the codes of `index`: by the
    fingerprint of a fresh metadata record when there is one, else by the decode check
    on a sample of the stored entries (an empty index with no record: by its IVF
    centroids alone, the only part of the model it holds). allow_mismatch: report instead of raising (`log`).
    index_path / model_path name the files in the message; override_hint names the
    override as the caller's user spells it (e.g. --allow_mismatch)."""
    index_name, model_name = _names(index_path, model_path, model)
    ivf.check_index_matches_model(index, model, index_name)  # shapes first: the decode needs them
    codes = stored_codes_sample(index)
    record = fresh_metadata(index_path, index, codes)
    problem = None
    disagreement = None
    by = "empty index"
    if record is not None and record.get("model_fingerprint"):
        by = "fingerprint"
        fp = model_fingerprint(model)
        if record["model_fingerprint"] != fp:
            if len(codes):
                disagreement = decode_disagreement(index, model, codes)
            measured = f"; decoding {len(codes)} stored entries, the model and the index's AQ codebooks " \
                       f"disagree by {disagreement:.3f}" if disagreement is not None else ""
            problem = (f"{index_name} was built with the model of fingerprint {record['model_fingerprint']} "
                       f"({record.get('model', '?')}), {model_name} has fingerprint {fp}{measured}: "
                       "its codes mean other vectors to this model")
    elif not len(codes):  # nothing stored to decode: the IVF centroids at least must be the model's
        gap = centroid_gap(index, model)
        if gap > CENTROID_TOLERANCE:
            problem = (f"the coarse quantizer of {index_name} holds other IVF centroids than {model_name} "
                       f"(largest squared difference {gap:.3g} x their mean squared spread)")
    else:
        by = "decode"
        disagreement = decode_disagreement(index, model, codes)
        if disagreement > MISMATCH_THRESHOLD:
            problem = (f"{model_name} did not make the codes of {index_name}: decoding {len(codes)} stored entries, "
                       f"the model and the index's AQ codebooks disagree by {disagreement:.3f} (0 = equal, "
                       f"1 = unrelated; the model that made an index stays below {MISMATCH_THRESHOLD})")
    return _verdict(problem, Belonging(by, disagreement, record), allow_mismatch, override_hint, log,
                    remedy="Use the model the index was built with", consequence=" (results are then meaningless)")


def check_decoder_belongs(decoder, model, codes: np.ndarray, *, decoder_path=None, model_path=None,
                          ivf_centroids: np.ndarray | None = None,
                          recorded_fingerprint: str | None = None, allow_mismatch: bool = False,
                          override_hint: str = "allow_mismatch=True",
                          log: Callable[[str], None] | None = None) -> Belonging:
    """Raise ModelMismatchError unless the pairwise decoder was trained on `model`'s
    codes: by the fingerprint its file records (`recorded_fingerprint`, see
    `pairwise.read_model_fingerprint`) when there is one, else by comparing its
    reconstructions of `codes` (e.g. `stored_codes_sample(index)`) with the model's
    (residuals to `ivf_centroids`, by default the model's). Returns what was found
    (`Belonging`; by "no codes" when there was neither a fingerprint nor codes)."""
    dec_name = f"pairwise decoder {os.fspath(decoder_path)}" if decoder_path else "the pairwise decoder"
    _, model_name = _names(None, model_path, model)
    problem, disagreement, by = None, None, "no codes"
    if recorded_fingerprint:
        by = "fingerprint"
        fp = model_fingerprint(model)
        if recorded_fingerprint != fp:
            problem = (f"{dec_name} was trained on the codes of the model of fingerprint {recorded_fingerprint}, "
                       f"{model_name} has fingerprint {fp}")
    elif len(codes):
        by = "decode"
        disagreement = decoder_disagreement(decoder, model, codes, ivf_centroids)
        if disagreement > DECODER_MISMATCH_THRESHOLD:
            problem = (f"{dec_name} was not trained on the codes of {model_name}: decoding {len(codes)} codes, "
                       f"the decoder and the model disagree by {disagreement:.3f} (0 = equal, 1 = unrelated; "
                       f"a decoder of the model stays below {DECODER_MISMATCH_THRESHOLD}, unless trained on far "
                       "too few vectors for its K² -row tables)")
    return _verdict(problem, Belonging(by, disagreement, None), allow_mismatch, override_hint, log,
                    remedy="Use the decoder trained for this model")


def _verdict(problem: str | None, found: Belonging, allow_mismatch: bool, override_hint: str,
             log: Callable[[str], None] | None, remedy: str, consequence: str = "") -> Belonging:
    """What a belonging check ends with: `found` when there is no problem; else the
    refusal, or (an expert's override) a warning and a Belonging marked "overridden"."""
    if problem is None:
        return found
    if not allow_mismatch:
        raise ModelMismatchError(f"{problem}. {remedy}, or {override_hint} to search anyway{consequence}")
    if log is not None:
        log(f"WARNING: {problem} ({override_hint} given: searching anyway)")
    return dataclasses.replace(found, by="overridden")
