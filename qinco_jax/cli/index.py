"""Build and search IVF-QINCo indexes (the reference's search_ivf.py).

Steps (--todo), in this order:
  train_centroids  k-means IVF centroids of the training set -> --IVF_centroids (.npy)
  train            encode the training set with the IVF-QINCo model (or read --xt_codes),
                   fit the AQ codebooks to the QINCo codes by least squares, put the
                   model's centroids in the coarse quantizer -> trained index (--trained_index)
  add              encode the database (or read --xb_codes files) and fill the inverted
                   lists, --add_bs vectors at a time -> full index (--index). With --ondisk
                   the lists go to <index>.ivfdata beside the index (memory-mapped at search
                   time); launched on several processes (QINCO_PROCESS_INDEX / _COUNT, or a
                   jax.distributed launcher) with --todo add --trained_index, each process
                   adds its share of the database and the shards are merged on disk
  train_pairwise_decoder
                   train QINCo2's pairwise additive decoder on the training set's model
                   codes (encoded, or read from --xt_codes) -> --pairwise_decoder (.pt,
                   the reference's format); not in the default --todo
  search           shortlist of nshort from the index, QINCo decoding of the shortlist and
                   exact re-ranking, for every nprobe x efSearch x nshort; prints a table
                   and writes the results to --json. With --pairwise_decoder: the
                   three-stage search (faiss returns nmid_short * nshort entries, the
                   pairwise decoder keeps nshort of them for QINCo), over --nmid_short too

    python search/search_ivf.py --db bigann10M --model models/bigann_IVF65k_16x8_L2.pt \\
        --index index/bigann10M_IVF65k_16x8_L2.faissindex --index_key IVF65536,RQ16x8_Nqint8
    python search/search_ivf.py --todo search --db bigann10M --model models/bigann_IVF65k_16x8_L2.pt \\
        --index index/bigann10M_IVF65k_16x8_L2.faissindex --json results.json
"""

from __future__ import annotations

import json
import os

import numpy as np

from qinco_jax import cli
from qinco_jax.data import datasets
from qinco_jax.formats import packing
from qinco_jax.cli import run_config

TODO = ["train_centroids", "train", "add", "train_pairwise_decoder", "search"]


def build_parser():
    p = cli.parser(__doc__.split("\n\n")[0])
    g = p.add_argument_group("what and how to compute")
    g.add_argument("--todo", default=["train", "add", "search"], choices=TODO, nargs="+", help="what to do")
    cli.add_compute_args(g, batch_flag="--bs")
    g.add_argument("--add_bs", default=1_000_000, type=int,
                   help="database vectors read, encoded and added per batch at add time")
    g.add_argument("--nthreads", default=32, type=int,
                   help="faiss OpenMP threads, capped at the number of CPUs (-1: faiss's default)")
    g.add_argument("--json", default="", help="write the search results to this JSON file ({\"results\": [...], ...}, "
                   "see the README's results schema)")

    g = p.add_argument_group("QINCo model")
    g.add_argument("--model", default="", help="IVF-QINCo model: a reference .pt file or a qinco-jax model directory")
    cli.add_search_args(g)
    g.add_argument("--allow_mismatch", action="store_true",
                   help="search (or add to) an index, or use a pairwise decoder, that the model did not make: "
                   "without it they are refused (checked by the model fingerprint this library records beside "
                   "the files it writes, else by decoding a sample of the index's stored codes)")

    g = p.add_argument_group("database")
    cli.add_db_arg(g)
    g.add_argument("--nt", default=1_000_000, type=int, help="nb training vectors to use")
    g.add_argument("--xt_codes", default="", help="file with the model codes of the first --nt training vectors "
                   "(.npy, .ivecs, .ibin, or packed bytes as codec_qinco.py --raw writes them)")
    g.add_argument("--xb_codes", default=[], nargs="*",
                   help="files with the model codes of the database, in order (same formats as --xt_codes, or "
                   "QINCo2's encoded sets: a .npz header with its .part_<i>.npz files); read --add_bs at a time")

    g = p.add_argument_group("IVF centroids training")
    g.add_argument("--n_centroids", default=65536, type=int, help="number of centroids to train")
    g.add_argument("--kmeans_iter", default=10, type=int, help="number of k-means iterations")
    g.add_argument("--IVF_centroids", default="", help="where to store the IVF centroids (.npy)")

    g = p.add_argument_group("build index")
    g.add_argument("--index_key", default="IVF65536,RQ8x8_Nfloat",
                   help="faiss index key: IVF<K_IVF>[_HNSW32],RQ<M>x<log2 K>_<norm>, matching the model")
    g.add_argument("--trained_index", default="", help="load / store the trained (empty) index")
    g.add_argument("--index", default="", help="load / store the full index")
    g.add_argument("--ondisk", action="store_true",
                   help="add: store the inverted lists in <index>.ivfdata beside --index (faiss on-disk lists, "
                   "memory-mapped by search; needed to build on several processes)")
    g.add_argument("--quantizer_efConstruction", default=-1, type=int,
                   help="efConstruction of an HNSW coarse quantizer (-1: faiss's default)")
    g.add_argument("--quantizer_efSearch", default=[], nargs="+", type=int,
                   help="efSearch values of an HNSW coarse quantizer to try at search time")

    g = p.add_argument_group("search parameters to try")
    g.add_argument("--nprobe", default=[1, 4, 16, 64, 256, 1024], type=int, nargs="+",
                   help="nprobe settings to try")
    g.add_argument("--nshort", default=[10, 20, 50, 100, 200, 500, 1000], type=int, nargs="+",
                   help="shortlist sizes to try")
    g.add_argument("--pairwise_decoder", default="",
                   help="pairwise decoder file (.pt): written by --todo train_pairwise_decoder, used by search "
                   "as the middle re-ranking stage")
    g.add_argument("--nmid_short", default=[2, 4], type=int, nargs="+",
                   help="with --pairwise_decoder: faiss shortlists of nmid_short * nshort entries (capped at "
                   "8000) to try, cut to nshort by the pairwise decoder (0 or 1: no middle stage)")
    g.add_argument("--pairwise_table_dtype", default=None, choices=run_config.PAIRWISE_TABLE_DTYPES,
                   help="with --pairwise_decoder: how the search stores the pairwise tables (float16 / int8: "
                   "smaller, faster look-ups, slightly coarser reconstructions; the file stays float32). "
                   "Unset: int8, else float16, when its reconstructions of a sample of the stored entries are "
                   "within 0.1%% of float32's MSE, else float32 (said in the log)")
    g.add_argument("--n_pairwise_codebooks", default=2, type=int,
                   help="pairwise tables per model code step (the reference's n_pairwise_codebooks)")
    g.add_argument("--pairwise_shrinkage", default=None, type=float,
                   help="train_pairwise_decoder: each table entry is its residuals' sum over (count + this) "
                   "instead of their mean (0: the reference's plain means); > 0 keeps the 65,536-row tables "
                   "from memorising a small training set. Unset: chosen on 10%% of the training rows held out "
                   "(the lowest held-out MSE of a grid), then refitted on all of them (not the reference's)")
    g.add_argument("--engine", default="faiss", choices=["faiss", "jax"],
                   help="search engine (not the reference's): faiss's IVF-RQ scan, or the JAX engine "
                   "(qinco_jax.search.jax_engine: the same shortlists, batched and jitted, on any JAX device; "
                   "exact coarse assignment, so --quantizer_efSearch has no effect on it)")
    g.add_argument("--engine_fallback", action="store_true",
                   help="with --engine jax: search with faiss (saying why) if the JAX engine does not "
                   "implement the index, instead of stopping")
    g.add_argument("--n_autotune", default=0, type=int,
                   help="number of autotune experiments, skipping non-Pareto-optimal ones (0 = exhaustive)")
    return p


def log(msg: str) -> None:
    print(msg, flush=True)


def check_args(args) -> None:
    for name in ("nt", "add_bs", "n_centroids", "kmeans_iter"):
        if getattr(args, name) < 1:
            raise cli.UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("nprobe", "nshort", "quantizer_efSearch"):
        bad = [v for v in getattr(args, name) if v < 1]
        if bad:
            raise cli.UsageError(f"--{name} values must be >= 1, got {bad}")
    bad = [v for v in args.nmid_short if v < 0]
    if bad:
        raise cli.UsageError(f"--nmid_short values must be >= 0, got {bad}")
    if args.n_pairwise_codebooks < 1:
        raise cli.UsageError(f"--n_pairwise_codebooks must be >= 1, got {args.n_pairwise_codebooks}")
    if args.pairwise_shrinkage is not None and not args.pairwise_shrinkage >= 0:
        raise cli.UsageError(f"--pairwise_shrinkage must be >= 0, got {args.pairwise_shrinkage}")
    if "train_pairwise_decoder" in args.todo and not args.pairwise_decoder:
        raise cli.UsageError("--todo train_pairwise_decoder needs --pairwise_decoder to store it")
    if args.bs is not None and args.bs < 1:
        raise cli.UsageError(f"--bs must be >= 1, got {args.bs}")
    if args.n_autotune < 0:
        raise cli.UsageError(f"--n_autotune must be >= 0, got {args.n_autotune}")
    needs_model = [t for t in args.todo if t != "train_centroids"]
    if needs_model and not args.model:
        raise cli.UsageError(f"--model is required for --todo {' '.join(needs_model)}")
    if args.ondisk and "add" in args.todo and not args.index:
        raise cli.UsageError("--ondisk needs --index: the lists are written beside it, in <index>.ivfdata")
    if args.todo == ["train_centroids"] and not args.IVF_centroids:
        raise cli.UsageError("--todo train_centroids needs --IVF_centroids to store them")


def set_threads(n: int) -> None:
    import faiss

    if n == -1:
        return
    n = max(1, min(n, os.cpu_count() or 1))
    log(f"set nb threads to {n}")
    faiss.omp_set_num_threads(n)


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------


def train_centroids(args, ds) -> np.ndarray:
    from qinco_jax.search.index import train_ivf_centroids

    xt = ds.get_train(args.nt)
    log(f"k-means of {xt.shape} into {args.n_centroids} centroids, {args.kmeans_iter} iterations")
    if len(xt) < args.n_centroids:
        raise cli.UsageError(f"{len(xt)} training vectors cannot make {args.n_centroids} centroids")
    return train_ivf_centroids(xt, args.n_centroids, args.kmeans_iter)


def encode_options(args):
    return cli.encode_options_from_args(args, batch_size=args.bs)


def run_train(args, model, ds, stats):
    from qinco_jax.search import index as ivf

    xt = ds.get_train(args.nt)
    log(f"training vectors {xt.shape}")
    xt_codes = None
    if args.xt_codes:
        log(f"loading training codes from {args.xt_codes}")
        xt_codes = packing.read_codes_file(args.xt_codes, model)
        ivf.check_model_codes(model, xt_codes, len(xt), f"training codes of {args.xt_codes}")
    index, st = ivf.train_index(model, xt, args.index_key, xt_codes=xt_codes,
                                ef_construction=args.quantizer_efConstruction,
                                options=encode_options(args), log=log)
    stats.update(t_xt_encode=st.t_encode, t_train_codebook=st.t_train_codebook,
                 MSE_train_residuals=st.mse_train_residuals, t_add_codebook=st.t_index)
    log(f"index ready: {args.index_key}")
    return index


def database_sources(args, model, ds):
    """Where the database's codes come from, file by file: --xb_codes, or the database
    vectors encoded as they are read."""
    from qinco_jax.formats import packing
    from qinco_jax.models import codec
    from qinco_jax.search import ondisk

    if args.xb_codes:
        nbits = packing.code_nbits(model.code_sizes)
        sources = []
        for f in args.xb_codes:  # a QINCo2 encoded set (.npz header + parts) is one file per part
            sources += ondisk.encoded_set_sources(f)[0] if f.endswith(".npz") else \
                [ondisk.code_file_source(f, model.code_width, nbits)]
        ondisk.check_sources(sources)  # a file given twice: said before the count it doubles
        counts = [s.n_rows for s in sources]
        if sum(counts) != ds.nb:
            raise cli.UsageError(f"--xb_codes files hold {sum(counts)} codes ({' + '.join(map(str, counts))}), "
                                 f"the database {ds.name} has {ds.nb} vectors")
        return sources
    options = encode_options(args)
    return [ondisk.encoded_source(ds.database_rows, ds.nb, model.code_width,
                                  lambda x: codec.encode(model, x, options, progress=None), name=f"{ds.name} database")]


def run_add(args, model, ds, index, stats, slot=None):
    """Fill the trained index (in memory, or on disk with --ondisk: this process's
    share, merged by the last process). Returns the full index, or None on a process
    that left the merge to another."""
    import time

    from qinco_jax.search import index as ivf
    from qinco_jax.search import ondisk

    ivf.check_index_matches_model(index, model)
    if index.ntotal:
        raise cli.UsageError(f"the trained index already holds {index.ntotal} vectors; add needs an empty one")
    sources = database_sources(args, model, ds)
    ondisk.check_sources(sources, index)
    from qinco_jax import distributed

    slot = slot or distributed.ProcessSlot()
    process_index, process_count, barrier = slot.index, slot.count, slot.barrier
    t0 = time.time()
    if args.ondisk:
        index = ondisk.build_ondisk(index, sources, args.index, process_index=process_index,
                                    process_count=process_count, barrier=barrier, chunk_rows=args.add_bs, log=log)
    else:
        ondisk.build_in_memory(index, sources, chunk_rows=args.add_bs, log=log)
    stats["t_add"] = time.time() - t0
    if index is not None:
        log(f"add done in {stats['t_add']:.3f} s, {index.ntotal} vectors")
    return index


def run_train_pairwise(args, model, ds):
    from qinco_jax.models import pairwise
    from qinco_jax.search import pairwise_stage

    xt = ds.get_train(args.nt)
    xt_codes = packing.read_codes_file(args.xt_codes, model) if args.xt_codes else None
    log(f"training the pairwise decoder on {xt.shape} vectors ({args.n_pairwise_codebooks} tables per step)")
    training = pairwise_stage.train_for_model(model, xt, xt_codes, n_tables_per_code=args.n_pairwise_codebooks,
                                              options=encode_options(args), shrinkage=args.pairwise_shrinkage)
    log(f"pairwise decoder training MSE {training.train_mse[-1]:g} (IVF centroids alone {training.train_mse[0]:g})")
    log(pairwise_stage.describe_shrinkage(training))
    from qinco_jax.search.provenance import model_fingerprint

    pairwise.save_pairwise_decoder(training.decoder, args.pairwise_decoder, model_fingerprint=model_fingerprint(model),
                                   shrinkage=training.shrinkage, shrinkage_chosen=training.shrinkage_chosen)
    log(f"stored the pairwise decoder in {args.pairwise_decoder}")
    return training


def check_belongs(args, model, index, index_path: str) -> None:
    """Refuse an index read from a file whose codes the model did not make."""
    from qinco_jax.search import provenance

    found = provenance.check_index_belongs(index, model, index_path=index_path, model_path=args.model,
                                           allow_mismatch=args.allow_mismatch, override_hint="--allow_mismatch",
                                           log=log)
    if found.disagreement is not None:
        log(f"model and index checked ({found.by}): disagreement {found.disagreement:.3f} on a sample of "
            "stored entries")
    else:
        log(f"model and index checked ({found.by})")


def write_index(index, model, path: str, what: str) -> None:
    """The index and its metadata (the model's fingerprint), beside it."""
    from qinco_jax.search import index as ivf
    from qinco_jax.search import provenance

    ivf.write_index(index, path)
    provenance.write_metadata(path, index, model)
    log(f"stored {what} in {path} (model fingerprint in {provenance.metadata_path(path)})")


def run_search(args, model, ds, index) -> list[dict]:
    from qinco_jax.search import report
    from qinco_jax.search.sweep import sweep_index

    if index.ntotal != ds.nb:
        raise cli.UsageError(f"the index holds {index.ntotal} vectors, the database {ds.name} has {ds.nb}")
    xq = ds.get_queries()
    gt = ds.get_groundtruth()
    log(f"queries {xq.shape}, ground truth {gt.shape}")
    decoder = None
    if args.pairwise_decoder:
        from qinco_jax.search import pairwise_stage

        decoder = pairwise_stage.load_checked(args.pairwise_decoder, model, index, table_dtype=args.pairwise_table_dtype,
                                              model_path=args.model, allow_mismatch=args.allow_mismatch,
                                              override_hint="--allow_mismatch", log=log)
        log(f"three-stage search with the pairwise decoder {args.pairwise_decoder} ({decoder.table_dtype} "
            f"tables), nmid_short {args.nmid_short}")
    results = sweep_index(index, model, xq, gt, nprobe=args.nprobe, nshort=args.nshort,
                          ef_search=args.quantizer_efSearch, n_autotune=args.n_autotune,
                          pairwise_decoder=decoder, nmid_short=args.nmid_short, reranker_dtype=cli.dtype_from_args(args),
                          engine=args.engine, engine_fallback=args.engine_fallback, log=log)
    log("\n" + report.format_table(results, len(xq)))
    return results


def main(argv=None):
    args = build_parser().parse_args(argv)
    cli.print_args(args)
    check_args(args)
    from qinco_jax import distributed

    slot = distributed.ProcessSlot()
    if "add" in args.todo:
        slot = distributed.process_slot()  # before any JAX computation (jax.distributed)
    cli.select_device(args.device)
    set_threads(args.nthreads)
    if slot.count > 1 and (args.todo != ["add"] or not args.ondisk or not args.trained_index):
        raise cli.UsageError(f"on {slot.count} processes only --todo add --ondisk --trained_index <file> runs (train "
                             "the index once on one process, then add on several, then search)")
    ds = datasets.get_dataset(args.db)
    log(f"Prepared dataset {ds}")
    stats: dict = {}

    if "train_centroids" in args.todo:
        log("======== k-means clustering to compute IVF centroids")
        centroids = train_centroids(args, ds)
        if args.IVF_centroids:
            from qinco_jax.formats.io import save_npy

            save_npy(args.IVF_centroids, centroids)
            log(f"stored centroids in {args.IVF_centroids}")
        if args.todo == ["train_centroids"]:
            return

    from qinco_jax.search import index as ivf
    model = cli.load_model_arg(args.model)
    ivf.require_ivf_model(model)
    if model.d != ds.d:
        raise cli.UsageError(f"the model ({model.describe()}) has dimension {model.d}, "
                             f"the data set {ds.name} has dimension {ds.d}")

    index = None
    if "train" in args.todo:
        log("====================== training")
        index = run_train(args, model, ds, stats)
        if args.trained_index:
            write_index(index, model, args.trained_index, "trained index")

    if "add" in args.todo:
        log("====================== adding")
        if index is None:
            if not args.trained_index:
                raise cli.UsageError("add needs a trained index: run --todo train too, or give --trained_index")
            index = ivf.read_index(args.trained_index, "trained index")
            check_belongs(args, model, index, args.trained_index)
        index = run_add(args, model, ds, index, stats, slot)
        if index is None:  # on-disk shard written; another process merges
            return
        if args.index and not args.ondisk:
            write_index(index, model, args.index, "index")
        elif args.index:  # written by the merge: its metadata beside it
            from qinco_jax.search import ondisk, provenance

            provenance.write_metadata(args.index, index, model)
            log(f"stored index in {args.index} + {ondisk.ivfdata_path(args.index)} (model fingerprint in "
                f"{provenance.metadata_path(args.index)})")

    if "train_pairwise_decoder" in args.todo:
        log("====================== training the pairwise decoder")
        run_train_pairwise(args, model, ds)

    if "search" in args.todo:
        log("====================== searching")
        if index is None:
            if not args.index:
                raise cli.UsageError("search needs an index: run --todo train add too, or give --index")
            index = ivf.read_index(args.index, "index")
            check_belongs(args, model, index, args.index)
        results = run_search(args, model, ds, index)
        if args.json:
            from qinco_jax.search import report

            report.save_results(args.json, results, nq=int(ds.nq),
                                db=ds.name, model=model.describe(), stats=stats, engine=args.engine)
            log(f"wrote {len(results)} results to {args.json}")
    if stats:
        log("stats: " + json.dumps(stats))


def run() -> None:
    """Console entry point: bad input ends with one 'error:' line and exit status 2."""
    cli.run_main(main)


if __name__ == "__main__":
    run()
