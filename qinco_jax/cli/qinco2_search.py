"""QINCo2's `run.py` search tasks: train_pairwise_decoder, build_index, search.

Each is a function `task(cfg: RunConfig, log=print)` (the task registry of
`qinco_jax.cli.run`); the work is done by the library (`qinco_jax.search`,
`qinco_jax.models.pairwise`), these functions read the files the keys name and write the output.

    run.py task=train_pairwise_decoder ivf_centroids=c.npy trainset=xt.npy \\
        encoded_trainset=xt_codes.npz output=pairwise.pt           [K=..., n_pairwise_codebooks=2]
    run.py task=build_index ivf_centroids=c.npy trainset=xt.npy encoded_trainset=xt_codes.npz \\
        encoded_db=xb_codes.npz output=index.faissindex             [search.index_key=...]
        [ondisk=true: lists in index.ivfdata; QINCO_PROCESS_INDEX=i QINCO_PROCESS_COUNT=P for P processes]
    run.py task=search model=m.pt index=index.faissindex queries=xq.npy queries_gt=gt.npy \\
        [pairwise_decoder=pairwise.pt search.nmid_short=[2,4]] output=results.json [resume=true]
    run.py task=search model=m.pt db=xb.fvecs queries=xq.fvecs queries_gt=gt.ivecs [A=.. B=.. ds.db=..]
        (no index: R@1/10/100 among the whole database decoded by the model)

Codes files: QINCo2's `.npz` header + `.part_<i>.npz` parts (`qinco_jax.formats.code_parts`) or a
plain `.npy` array (n, 1 + M). The encoded training set holds the codes of the whole
training file; as in the reference, its first rows go with the training vectors (the
file minus its last ds.valset rows, at most ds.trainset of them) and its last ds.valset
rows with the validation vectors.

Differences from the reference, on purpose:
- every distance is in raw units (the reference's search compares raw queries with
  normalised reconstructions, and its pairwise stage adds normalised centroids to raw
  corrections); its re-ranked recalls are wrong whenever mean != 0 or std != 1;
- fewer IVF centroids than K, and coarse codes of any size, work;
- search without index= (the reference's full-database search, the paper's Table 3
  recalls) decodes the whole database in batches of enc_max_bs, not `batch`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from qinco_jax.formats import code_parts
from qinco_jax.models import pairwise
from qinco_jax.cli.qinco2_tasks import read_ivf_centroids, read_vector_file, split_training_file
from qinco_jax.metrics import mean_squared_error
from qinco_jax.cli.run_config import RunConfig, RunConfigError, check_task, index_key, resolve_data
from qinco_jax.logs import Log
ADD_BATCH = 1_000_000  # database codes added per batch (the reference's)
EF_CONSTRUCTION = 20  # efConstruction of the HNSW coarse quantizer, as the reference builds it


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


def read_codes(path: str) -> np.ndarray:
    """Codes (n, 1 + M) from QINCo2's .npz parts or a .npy array."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"codes file {path} not found")
    codes = np.asarray(code_parts.read_codes(path))
    if codes.ndim != 2 or codes.shape[1] < 2 or not np.issubdtype(codes.dtype, np.integer):
        raise RunConfigError(f"codes file {path} holds {codes.dtype} {codes.shape}, expected integer codes "
                             "(n, 1 + M) with the IVF list first")
    return codes


def ivf_centroids_file(cfg: RunConfig) -> np.ndarray:
    c = read_ivf_centroids(cfg)
    if cfg.ivf_K is not None and cfg.ivf_K != len(c):
        raise RunConfigError(f"ivf_K={cfg.ivf_K} given, but ivf_centroids={cfg.ivf_centroids} holds {len(c)} centroids")
    return c


def encoded_training_set(cfg: RunConfig, log: Log) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(xt, xt_codes, xval, xval_codes) split as the reference splits them."""
    xt, xval = split_training_file(cfg)
    nt, nval = len(xt), len(xval)
    codes = read_codes(cfg.encoded_trainset)
    if nt + nval > len(codes):
        raise RunConfigError(f"encoded_trainset={cfg.encoded_trainset} holds {len(codes)} codes, fewer than the "
                             f"{nt} training + {nval} validation vectors")
    log(f"{nt} training vectors, {nval} validation vectors, codes of width {codes.shape[1]}")
    return (np.asarray(xt, np.float32), codes[:nt], np.asarray(xval, np.float32), codes[-nval:])


def _codebook_size(cfg: RunConfig, codes: np.ndarray) -> int:
    """K= if given, else the K recorded in the header of encoded_trainset= (QINCo2's
    .npz codes, written by task=encode), else the model='s."""
    if cfg.K is not None:
        return int(cfg.K)
    if str(cfg.encoded_trainset).endswith(".npz"):
        header = code_parts.read_code_header(cfg.encoded_trainset)
        if not header.M == codes.shape[1] - 1:
            raise RunConfigError(f"encoded_trainset={cfg.encoded_trainset}: its header says M={header.M}, "
                                 f"its codes have {codes.shape[1] - 1} steps")
        return int(header.K)
    if cfg.model:
        from qinco_jax.formats import checkpoint

        return int(checkpoint.load_model(cfg.model).config.K)
    raise RunConfigError(f"task={cfg.task} needs K=<codebook size> (or model=<file.pt>): encoded_trainset="
                         f"{cfg.encoded_trainset} is a plain array, which does not record it (task=encode's "
                         ".npz codes do)")


def checked_training_codes(cfg: RunConfig, log: Log):
    """(centroids, xt, xt_codes, xval, xval_codes, K) of ivf_centroids= and
    encoded_trainset=, the codes checked against the centroids and K."""
    centroids = ivf_centroids_file(cfg)
    xt, codes, xval, val_codes = encoded_training_set(cfg, log)
    K = _codebook_size(cfg, codes)
    _check_codes(codes, centroids, K, f"encoded_trainset={cfg.encoded_trainset}")
    return centroids, xt, codes, xval, val_codes, K


def _check_codes(codes: np.ndarray, centroids: np.ndarray, K: int, what: str) -> None:
    if codes.min() < 0 or codes[:, 0].max() >= len(centroids) or codes[:, 1:].max() >= K:
        raise RunConfigError(f"{what}: IVF lists must lie in [0, {len(centroids)}) and step codes in [0, {K}); "
                             f"got lists up to {codes[:, 0].max()} and codes up to {codes[:, 1:].max()}")


# --------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------


def train_pairwise_decoder(cfg: RunConfig, log: Log = print) -> pairwise.PairwiseTraining:
    """Train the pairwise decoder on the encoded training set, in raw units (residuals
    to the raw IVF centroids of ivf_centroids=), n_pairwise_codebooks * M tables; write
    it in the reference's format to output=."""
    check_task(cfg)
    centroids, xt, codes, xval, val_codes, K = checked_training_codes(cfg, log)
    M = codes.shape[1] - 1
    if cfg.M is not None and cfg.M != M:
        raise RunConfigError(f"M={cfg.M} given, but the codes of {cfg.encoded_trainset} have M={M} steps")
    if cfg.n_pairwise_codebooks < 1:
        raise RunConfigError(f"n_pairwise_codebooks must be >= 1, got {cfg.n_pairwise_codebooks}")
    log(f"training {cfg.n_pairwise_codebooks * M} pairwise tables of {K}x{K} rows")
    training = pairwise.train_pairwise_decoder(xt, codes, centroids, K, n_tables=cfg.n_pairwise_codebooks * M,
                                               seed=cfg.seed, shrinkage=cfg.pairwise_shrinkage,
                                               progress=cfg.verbose)
    fingerprint = None
    if cfg.model:  # the model whose codes encoded_trainset= holds, once checked: recorded in the file
        from qinco_jax.formats import checkpoint
        from qinco_jax.search import provenance

        model = checkpoint.load_model(cfg.model)
        found = provenance.check_decoder_belongs(training.decoder, model, val_codes[:provenance.SAMPLE_SIZE],
                                         ivf_centroids=centroids, decoder_path=cfg.output, model_path=cfg.model,
                                         allow_mismatch=cfg.allow_model_mismatch,
                                         override_hint="allow_model_mismatch=true", log=log)
        fingerprint = provenance.model_fingerprint(model) if found.by != "overridden" else None
    from qinco_jax.search.pairwise_stage import describe_shrinkage

    log(describe_shrinkage(training))
    pairwise.save_pairwise_decoder(training.decoder, cfg.output, model_fingerprint=fingerprint,
                                   shrinkage=training.shrinkage, shrinkage_chosen=training.shrinkage_chosen)
    scale = resolve_data(cfg).mse_scale
    val_mse = mean_squared_error(pairwise.decode(training.decoder, val_codes, centroids), xval) * scale
    log(f"train MSE {training.train_mse[-1] * scale:.6g} "
        f"(IVF centroids alone: {training.train_mse[0] * scale:.6g}), val MSE {val_mse:.6g}")
    log(f"saved the pairwise decoder to {cfg.output}")
    return training


def build_index(cfg: RunConfig, log: Log = print):
    """The IVF-RQ index of QINCo(2) codes: AQ codebooks fitted by least squares to the
    encoded training set (search.aq_training_samples of them), the database codes of
    encoded_db= added part by part in chunks of a million (qinco_jax.search.ondisk);
    written to output=. Needs no model. ondisk=true: the lists go to <output>.ivfdata;
    launched on several processes (as task=encode is), each adds its share of the parts
    and the last one merges them. Returns the index (None on a process that did not merge)."""
    from qinco_jax.search import index as ivf
    from qinco_jax.search import ondisk
    from qinco_jax import distributed

    check_task(cfg)
    try:
        slot = distributed.process_slot()
    except ValueError as e:
        raise RunConfigError(str(e)) from None
    process_index, process_count, barrier = slot.index, slot.count, slot.barrier
    if process_count > 1 and not cfg.ondisk:
        raise RunConfigError(f"task=build_index on {process_count} processes needs ondisk=true (each process "
                             "adds its share to its own on-disk lists, merged into one index)")
    sources, header = ondisk.encoded_set_sources(cfg.encoded_db)
    limit = resolve_data(cfg).db_limit
    if limit is not None:
        sources = ondisk.first_rows(sources, limit)
    centroids, xt, codes, _, _, K = checked_training_codes(cfg, log)
    M = codes.shape[1] - 1
    key = index_key(cfg, ivf_K=len(centroids), M=M)
    log(f"index {key}")
    # the reference's efConstruction applies to HNSW coarse quantizers only; a flat one builds without it
    ef_construction = EF_CONSTRUCTION if "HNSW" in key.split(",")[0] else 0
    index, stats = ivf.train_index_on_codes(centroids, xt, codes, key, K, ef_construction=ef_construction,
                                            max_training=cfg.search.aq_training_samples, log=log)
    ondisk.check_sources(sources, index, header=header, header_path=cfg.encoded_db)
    log(f"adding {sum(s.n_rows for s in sources)} codes of {cfg.encoded_db} ({len(sources)} file(s))")
    if cfg.ondisk:
        index = ondisk.build_ondisk(index, sources, cfg.output, process_index=process_index,
                                    process_count=process_count, barrier=barrier, chunk_rows=ADD_BATCH, log=log)
        if index is None:
            return None
    else:
        ondisk.build_in_memory(index, sources, chunk_rows=ADD_BATCH, log=log)
        ivf.write_index(index, cfg.output)
    log(f"saved the index ({index.ntotal} vectors, AQ MSE of the training residuals "
        f"{stats.mse_train_residuals:g}) to {cfg.output}")
    return index


def search_decoded_database(cfg: RunConfig, log: Log = print) -> dict:
    """task=search without index=: the R@1 / R@10 / R@100 of the paper's Table 3, every
    database vector (db=, cut to ds.db) replaced by its reconstruction by model= (at
    its own A / B or the command line's), the queries' exact neighbours among them.
    Returns experiments.evaluation.decoded_database_recalls's dict with A and B."""
    from qinco_jax.cli import qinco2_tasks
    from qinco_jax.experiments.evaluation import decoded_database_recalls

    cfg = qinco2_tasks.with_folder_data(cfg)
    check_task(cfg)
    data = resolve_data(cfg)
    model = qinco2_tasks.load_model(cfg, log)
    opts = qinco2_tasks.encode_options(cfg, model)
    xb = qinco2_tasks.database_vectors(cfg, log)
    xq = read_vector_file(data.queries, "queries")
    gt = read_vector_file(data.queries_gt, "ground-truth")
    log(f"Searching {len(xq)} queries in the {len(xb)} database vectors decoded with A={opts.preselect} "
        f"B={opts.beam}")
    try:
        result = decoded_database_recalls(model, xb, xq, gt, opts, batch_size=max(1, cfg.enc_max_bs))
    except ValueError as e:
        raise RunConfigError(str(e)) from None
    r = result["recalls"]
    log(f"R@1={100 * r['1']:.2f}    R@10={100 * r['10']:.2f}    R@100={100 * r['100']:.2f}")
    return dict(result, A=opts.preselect, B=opts.beam)


def search(cfg: RunConfig, log: Log = print) -> list[dict] | dict:
    """Search index= with model= (and pairwise_decoder=: the three-stage search) at
    every operating point of search.nprobe x quantizer_efSearch x nshort (x nmid_short),
    skipping points that cannot be Pareto-optimal as the reference does; the results
    (qinco_jax.search.report's schema) go to output= after every point, and resume=true
    continues from them."""
    import faiss

    from qinco_jax.formats import checkpoint
    from qinco_jax.search import index as ivf
    from qinco_jax.search import pairwise_stage, provenance, report
    from qinco_jax.search.sweep import searchable_ef_search, sweep_index

    check_task(cfg)
    if not cfg.index:
        return search_decoded_database(cfg, log)
    data = resolve_data(cfg)
    model = checkpoint.load_model(cfg.model)
    ivf.require_ivf_model(model)
    index = ivf.read_index(cfg.index, "index")
    ivf.check_index_matches_model(index, model, f"index {cfg.index}")
    found = provenance.check_index_belongs(index, model, index_path=cfg.index, model_path=cfg.model,
                                           allow_mismatch=cfg.allow_model_mismatch,
                                           override_hint="allow_model_mismatch=true", log=log)
    log(f"model and index checked ({found.by})")
    xq = np.asarray(read_vector_file(data.queries, "queries"), np.float32)
    gt = np.asarray(read_vector_file(data.queries_gt, "ground-truth"))
    if cfg.search.nthreads > 0:
        faiss.omp_set_num_threads(int(cfg.search.nthreads))
    decoder = None
    if cfg.pairwise_decoder:
        decoder = pairwise_stage.load_checked(cfg.pairwise_decoder, model, index,
                                              table_dtype=cfg.search.pairwise_table_dtype, model_path=cfg.model,
                                              allow_mismatch=cfg.allow_model_mismatch,
                                              override_hint="allow_model_mismatch=true", log=log)
        log(f"three-stage search with the pairwise decoder {cfg.pairwise_decoder} "
            f"({decoder.table_dtype} tables)")
    metadata = dict(nq=len(xq), model=model.describe(), index=cfg.index, pairwise_decoder=cfg.pairwise_decoder,
                    engine=cfg.search.engine)
    if decoder is not None:
        metadata["pairwise_table_dtype"] = decoder.table_dtype
    previous: list[dict] = []
    if cfg.resume and cfg.output and Path(cfg.output).exists():
        previous = report.load_results(cfg.output)
        log(f"resuming from {len(previous)} results in {cfg.output}")

    searched = list(previous)  # every point searched so far, the ones the sweep drops included

    def save(results):
        searched[:] = results
        if cfg.output:
            report.save_results(cfg.output, results, **metadata)

    s = cfg.search
    ef_search = searchable_ef_search(index, s.quantizer_efSearch, log)
    n_points = len(s.nprobe) * max(1, len(ef_search)) * len(s.nshort) * (len(s.nmid_short) if cfg.pairwise_decoder else 1)
    results = sweep_index(index, model, xq, gt, nprobe=s.nprobe, nshort=s.nshort, ef_search=ef_search,
                          n_autotune=n_points, pairwise_decoder=decoder,
                          nmid_short=s.nmid_short,
                          rerank_rows=s.batch_size, previous=previous, on_result=save,
                          engine=s.engine, engine_fallback=s.engine_fallback, log=log)
    save(searched)  # in our format, with the points the sweep dropped (a resume skips them)
    log("\n" + report.format_table(results, len(xq)))
    return results
