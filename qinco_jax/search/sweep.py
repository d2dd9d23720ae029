"""The operating-point sweep of an IVF-QINCo index: search at every (or an autotuned
sample of) nprobe x efSearch x nshort (x nmid_short with a pairwise decoder: QINCo2's
three-stage search), as the reference's search_ivf.py / run.py task=search; one result
dict per point (the schema of `qinco_jax.search.report`).

Pruning (n_autotune > 0) uses faiss's OperatingPointsWithRanges, which assumes recall
and time grow with every axis; that holds for nmid_short as for the others (a longer
faiss shortlist, more pairwise decodes), so the same pruning covers the 4-axis grid.

The middle stage where it pays (n_autotune > 0 with a pairwise stage): the sweep always
includes two-stage points (nmid_short 1 is added to the grid when missing) and keeps a
three-stage point only where it is faster at equal recall, i.e. where no two-stage
point of the sweep reaches its recall@1 in no more time (`middle_stage_pays`); the
others are dropped from the returned results (and said). An exhaustive sweep
(n_autotune 0) keeps every point. `on_result` (what the commands save) sees every
searched point, so a resumed sweep searches none of them again and drops the same ones."""

from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np

from qinco_jax.search import report
from qinco_jax.data import validation
from qinco_jax.metrics import one_recall_at
from qinco_jax.models.qinco import QincoModel
from qinco_jax.search.index import check_index_matches_model, coarse_quantizer, require_ivf_model
from qinco_jax.search.rerank import PairwiseReranker, Reranker, SearchResult, search_ivf


def set_search_parameters(index, parameters: dict) -> None:
    index.nprobe = int(parameters["nprobe"])
    if "quantizer_efSearch" in parameters:
        quantizer = coarse_quantizer(index)
        if not hasattr(quantizer, "hnsw"):
            raise ValueError("--quantizer_efSearch needs an HNSW coarse quantizer; this index has "
                             f"{type(quantizer).__name__}")
        quantizer.hnsw.efSearch = int(parameters["quantizer_efSearch"])


def check_queries(model: QincoModel, xq: np.ndarray, gt: np.ndarray) -> None:
    if np.ndim(xq) != 2 or np.shape(xq)[1] != model.d:
        raise ValueError(f"queries have shape {np.shape(xq)}, the model ({model.describe()}) needs (nq, {model.d})")
    validation.check_all_finite(xq, "queries")
    if len(gt) != len(xq):
        raise ValueError(f"{len(gt)} ground-truth rows for {len(xq)} queries")


def operating_point(parameters: dict, r: SearchResult, gt: np.ndarray) -> dict:
    """One result as the CLIs write it to --json (see qinco_jax.search.report)."""
    res = dict(parameters=parameters, t_search=r.t_search, t_decode=r.t_decode, t_dis=r.t_dis,
               recalls=one_recall_at(r.I, gt), recalls_orig=one_recall_at(r.I_short, gt), nq=len(r.I))
    if "nmid_short" in parameters:
        res["t_mid"] = r.t_mid
        res["recalls_mid"] = one_recall_at(r.I_short if r.I_mid is None else r.I_mid, gt)
    return res


def is_three_stage(result: dict) -> bool:
    return result["parameters"].get("nmid_short", 0) > 1


def middle_stage_pays(results: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """(kept, dropped): every two-stage result (no nmid_short, or nmid_short <= 1) is
    kept; a three-stage one only where it is faster at equal recall — no two-stage
    result has a recall@1 at least as high in at most the same total time
    (`report.total_seconds`). Order is kept."""
    two = [(r["recalls"]["1"], report.total_seconds(r)) for r in results if not is_three_stage(r)]
    kept, dropped = [], []
    for r in results:
        recall, seconds = r["recalls"]["1"], report.total_seconds(r)
        beaten = is_three_stage(r) and any(rc >= recall and t <= seconds for rc, t in two)
        (dropped if beaten else kept).append(r)
    return kept, dropped


def explore(index, model: QincoModel, xq: np.ndarray, gt: np.ndarray, *, nprobe: Sequence[int],
            nshort: Sequence[int], ef_search: Sequence[int] = (), n_autotune: int = 0,
            reranker: Reranker | None = None, mid: PairwiseReranker | None = None,
            nmid_short: Sequence[int] = (), previous: Sequence[dict] = (),
            on_result: Callable[[list[dict]], None] | None = None,
            log: Callable[[str], None] = print, engine=None) -> list[dict]:
    """Search at every operating point of nprobe x efSearch x nshort (x nmid_short when
    a pairwise stage `mid` is given: see `search.pairwise_stage.middle_stage`), or at
    n_autotune sampled ones, skipping points that cannot be Pareto-optimal, as the
    reference; with n_autotune and `mid`, three-stage points only where the middle
    stage is faster at equal recall (the module doc: `middle_stage_pays`). Returns one dict per point: parameters, cno, recalls, recalls_orig,
    t_search, t_decode, t_dis, nq (and with `mid`: t_mid, recalls_mid).
    previous: results of an earlier run (resume): their points are not searched again,
    they feed the pruning and are returned first. on_result(results so far) is called
    after every new point (e.g. to save them).
    engine: a `search.jax_engine.JaxIvfEngine` of `index` to search with instead of
    faiss's scan (its coarse assignment is exact: efSearch has no effect on it)."""
    from faiss.contrib.evaluation import OperatingPointsWithRanges

    model = require_ivf_model(model)
    check_index_matches_model(index, model)
    check_queries(model, xq, gt)
    reranker = reranker or Reranker(model)
    if mid is not None:
        if not nmid_short:
            raise ValueError("a pairwise decoder needs nmid_short values (faiss returns nmid_short * nshort entries)")
        if any(v < 0 for v in nmid_short):
            raise ValueError(f"nmid_short values must be >= 0, got {list(nmid_short)}")
        if (mid.nlist, mid.K) != (model.config.K_IVF, model.config.K):
            raise ValueError(f"the pairwise decoder (nlist={mid.nlist}, K={mid.K}) does not fit the model "
                             f"({model.describe()})")
    if mid is not None and n_autotune and not any(v <= 1 for v in nmid_short):
        nmid_short = [1, *nmid_short]  # the two-stage points the middle stage must beat
        log(f"nmid_short {list(nmid_short)}: 1 (no middle stage) added, to compare the three-stage points with")
    index.parallel_mode = 3  # as the reference: parallel over queries and lists
    op = OperatingPointsWithRanges()
    op.add_range("nprobe", [int(v) for v in nprobe])
    if ef_search:
        op.add_range("quantizer_efSearch", [int(v) for v in ef_search])
    op.add_range("nshort", [int(v) for v in nshort])
    if mid is not None:
        op.add_range("nmid_short", [int(v) for v in nmid_short])
    if op.num_experiments() == 1:  # faiss's sampler needs n_autotune >= 2 and lists a lone point twice
        experiments = [0]
    else:
        experiments = op.sample_experiments(n_autotune, rs=np.random.RandomState(123))
    log(f"{op.num_experiments()} operating points, running {len(experiments)}")
    names = ["nprobe"] + (["quantizer_efSearch"] if ef_search else []) + ["nshort"] \
        + (["nmid_short"] if mid is not None else [])
    log(report.format_header(names))
    results = list(previous)
    done = {tuple(sorted(r["parameters"].items())): r for r in previous}
    for cno in experiments:
        key = op.cno_to_key(cno)
        parameters = {k: int(v) for k, v in op.get_parameters(key).items()}
        if tuple(sorted(parameters.items())) in done:
            old = done[tuple(sorted(parameters.items()))]
            op.add_operating_point(key, old["recalls"]["1"], report.total_seconds(old))
            log(f"{cno:4d} {str(parameters):55s} loaded from the previous results")
            continue
        if n_autotune:
            max_perf, min_time = op.predict_bounds(key)
            if not op.is_pareto_optimal(max_perf, min_time):
                log(f"{cno:4d} {str(parameters):55s} skipped: cannot be Pareto-optimal")
                continue
        set_search_parameters(index, parameters)  # the first point checks efSearch applies
        if engine is not None:
            from qinco_jax.search import jax_engine

            r = jax_engine.search_ivf(engine, xq, parameters["nprobe"], parameters["nshort"], reranker, mid=mid,
                                      nmid_short=parameters.get("nmid_short", 0))
        else:
            r = search_ivf(index, model, xq, parameters["nshort"], reranker, mid=mid,
                           nmid_short=parameters.get("nmid_short", 0))
        res = dict(operating_point(parameters, r, gt), cno=int(cno))
        op.add_operating_point(key, res["recalls"]["1"], report.total_seconds(res))
        results.append(res)
        log(report.format_row(res, names, len(xq)))
        if on_result is not None:
            on_result(results)
    if mid is not None and n_autotune:
        results, dropped = middle_stage_pays(results)
        for r in dropped:
            log(f"{r.get('cno', -1):4d} {str(r['parameters']):55s} dropped: a two-stage point reaches its "
                "recall@1 in no more time")
        # on_result saw every searched point (a resumed sweep does not search them again,
        # and drops the same ones): only the returned list leaves them out
    return results



def searchable_ef_search(index, ef_search: Sequence[int], log: Callable[[str], None] = print) -> tuple[int, ...]:
    """The efSearch values that apply to `index`: all of them with an HNSW coarse
    quantizer, none with another (a config's default efSearch axis has no meaning for a
    flat quantizer: searched without it rather than refused)."""
    quantizer = coarse_quantizer(index)
    if ef_search and not hasattr(quantizer, "hnsw"):
        log(f"the index's coarse quantizer is {type(quantizer).__name__}, not HNSW: "
            f"quantizer_efSearch={list(ef_search)} does not apply and is left out")
        return ()
    return tuple(int(v) for v in ef_search)


def sweep_index(index, model: QincoModel, xq: np.ndarray, gt: np.ndarray, *, nprobe: Sequence[int],
                nshort: Sequence[int], ef_search: Sequence[int] = (), n_autotune: int = 0,
                pairwise_decoder=None, pairwise_table_dtype: str | None = None,
                nmid_short: Sequence[int] = (), reranker_dtype: str | None = None,
                rerank_rows: int | None = None, previous: Sequence[dict] = (), on_result: Callable[[list[dict]], None] | None = None,
                engine: str = "faiss", engine_fallback: bool = False,
                log: Callable[[str], None] = print) -> list[dict]:
    """The search set-up both index programs share, then `explore`: QINCo re-ranking
    (decoding in `reranker_dtype`, default the model's, `rerank_rows` shortlist entries
    per decoding batch, default the backend's), and with `pairwise_decoder` (a
    file in the reference's format, or a `models.pairwise.PairwiseDecoder` already
    loaded and checked) the three-stage search, its tables stored as
    `pairwise_table_dtype` (None: a loaded decoder's own storage, float32 for a file).
    engine: "faiss" (faiss's scan) or "jax" (`search.jax_engine`; with engine_fallback,
    faiss where the JAX engine does not implement the index).
    Returns `explore`'s results."""
    from qinco_jax.models import pairwise
    from qinco_jax.search import jax_engine, pairwise_stage

    model = require_ivf_model(model)
    check_index_matches_model(index, model)
    mid = None
    if isinstance(pairwise_decoder, (str, os.PathLike)) and os.fspath(pairwise_decoder):
        decoder = pairwise_stage.load_for_model(pairwise_decoder, model, pairwise_table_dtype or "float32")
        mid = pairwise_stage.middle_stage(decoder, model)
        log(f"three-stage search with the pairwise decoder {os.fspath(pairwise_decoder)} "
            f"({decoder.table_dtype} tables), nmid_short {list(nmid_short)}")
    elif pairwise_decoder is not None and not isinstance(pairwise_decoder, (str, os.PathLike)):
        decoder = pairwise_decoder if pairwise_table_dtype is None else pairwise.compact(pairwise_decoder,
                                                                                         pairwise_table_dtype)
        mid = pairwise_stage.middle_stage(decoder, model)
        log(f"three-stage search with a pairwise decoder ({decoder.table_dtype} tables), "
            f"nmid_short {list(nmid_short)}")
    opened = jax_engine.open_engine(index, engine, fallback=engine_fallback, log=log)
    if opened is not None:
        log(f"searching with the JAX engine (built in {opened.t_build:.2f} s; exact coarse assignment: "
            "efSearch has no effect on it)")
    return explore(index, model, xq, gt, nprobe=nprobe, nshort=nshort, ef_search=ef_search, n_autotune=n_autotune,
                   reranker=Reranker(model, dtype=reranker_dtype, rows_per_batch=rerank_rows), mid=mid,
                   nmid_short=nmid_short, previous=previous, on_result=on_result, log=log, engine=opened)
