"""Build and search IVF-QINCo indexes (the reference's search_ivf.py).

Steps (--todo), in this order:
  train_centroids  k-means IVF centroids of the training set -> --IVF_centroids (.npy)
  train            encode the training set with the IVF-QINCo model (or read --xt_codes),
                   fit the AQ codebooks to the QINCo codes by least squares, put the
                   model's centroids in the coarse quantizer -> trained index (--trained_index)
  add              encode the database (or read --xb_codes files) and fill the inverted
                   lists -> full index (--index)
  search           shortlist of nshort from the index, QINCo decoding of the shortlist and
                   exact re-ranking, for every nprobe x efSearch x nshort; prints a table
                   and writes the results to --json

    python search/search_ivf.py --db bigann10M --model models/bigann_IVF65k_16x8_L2.pt \\
        --index index/bigann10M_IVF65k_16x8_L2.faissindex --index_key IVF65536,RQ16x8_Nqint8
    python search/search_ivf.py --todo search --db bigann10M --model models/bigann_IVF65k_16x8_L2.pt \\
        --index index/bigann10M_IVF65k_16x8_L2.faissindex --json results.json
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

try:
    import qinco_jax  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from qinco_jax import cli, datasets, packing, validation

TODO = ["train_centroids", "train", "add", "search"]


def build_parser():
    p = cli.parser(__doc__.split("\n\n")[0])
    g = p.add_argument_group("what and how to compute")
    g.add_argument("--todo", default=["train", "add", "search"], choices=TODO, nargs="+", help="what to do")
    cli.add_compute_args(g, batch_flag="--bs")
    g.add_argument("--add_bs", default=1_000_000, type=int,
                   help="database vectors read, encoded and added per batch at add time")
    g.add_argument("--nthreads", default=32, type=int,
                   help="faiss OpenMP threads, capped at the number of CPUs (-1: faiss's default)")
    g.add_argument("--json", default="", help="write the search results to this JSON file (a list of "
                   "{parameters, recalls, recalls_orig, t_search, t_decode, t_dis})")

    g = p.add_argument_group("QINCo model")
    g.add_argument("--model", default="", help="IVF-QINCo model: a reference .pt file or a qinco-jax model directory")
    cli.add_search_args(g)

    g = p.add_argument_group("database")
    cli.add_db_arg(g)
    g.add_argument("--nt", default=1_000_000, type=int, help="nb training vectors to use")
    g.add_argument("--xt_codes", default="", help="file with the model codes of the first --nt training vectors "
                   "(.npy, .ivecs, .ibin, or packed bytes as codec_qinco.py --raw writes them)")
    g.add_argument("--xb_codes", default=[], nargs="*",
                   help="files with the model codes of the database, in order (same formats as --xt_codes)")

    g = p.add_argument_group("IVF centroids training")
    g.add_argument("--n_centroids", default=65536, type=int, help="number of centroids to train")
    g.add_argument("--kmeans_iter", default=10, type=int, help="number of k-means iterations")
    g.add_argument("--IVF_centroids", default="", help="where to store the IVF centroids (.npy)")

    g = p.add_argument_group("build index")
    g.add_argument("--index_key", default="IVF65536,RQ8x8_Nfloat",
                   help="faiss index key: IVF<K_IVF>[_HNSW32],RQ<M>x<log2 K>_<norm>, matching the model")
    g.add_argument("--trained_index", default="", help="load / store the trained (empty) index")
    g.add_argument("--index", default="", help="load / store the full index")
    g.add_argument("--quantizer_efConstruction", default=-1, type=int,
                   help="efConstruction of an HNSW coarse quantizer (-1: faiss's default)")
    g.add_argument("--quantizer_efSearch", default=[], nargs="+", type=int,
                   help="efSearch values of an HNSW coarse quantizer to try at search time")

    g = p.add_argument_group("search parameters to try")
    g.add_argument("--nprobe", default=[1, 4, 16, 64, 256, 1024], type=int, nargs="+",
                   help="nprobe settings to try")
    g.add_argument("--nshort", default=[10, 20, 50, 100, 200, 500, 1000], type=int, nargs="+",
                   help="shortlist sizes to try")
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
    if args.bs is not None and args.bs < 1:
        raise cli.UsageError(f"--bs must be >= 1, got {args.bs}")
    if args.n_autotune < 0:
        raise cli.UsageError(f"--n_autotune must be >= 0, got {args.n_autotune}")
    needs_model = [t for t in args.todo if t != "train_centroids"]
    if needs_model and not args.model:
        raise cli.UsageError(f"--model is required for --todo {' '.join(needs_model)}")
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
    import faiss

    xt = ds.get_train(args.nt)
    log(f"k-means of {xt.shape} into {args.n_centroids} centroids, {args.kmeans_iter} iterations")
    if len(xt) < args.n_centroids:
        raise cli.UsageError(f"{len(xt)} training vectors cannot make {args.n_centroids} centroids")
    gpu = faiss.get_num_gpus() > 0 if hasattr(faiss, "get_num_gpus") else False
    km = faiss.Kmeans(ds.d, args.n_centroids, niter=args.kmeans_iter, verbose=True, gpu=gpu)
    with validation.faiss_step("k-means of the IVF centroids", on=f"{len(xt)} x {ds.d} training vectors of {ds.name}"):
        km.train(validation.as_finite_float32(xt, "k-means training vectors"))
    return km.centroids


def encode_kwargs(args) -> dict:
    return dict(batch_size=args.bs, dtype=cli.dtype_from_args(args), beam=args.beam, preselect=args.preselect)


def run_train(args, model, ds, stats):
    from qinco_jax import ivf

    xt = ds.get_train(args.nt)
    log(f"training vectors {xt.shape}")
    xt_codes = None
    if args.xt_codes:
        log(f"loading training codes from {args.xt_codes}")
        xt_codes = packing.read_codes_file(args.xt_codes, model)
        ivf.check_model_codes(model, xt_codes, len(xt), f"training codes of {args.xt_codes}")
    index, st = ivf.train_index(model, xt, args.index_key, xt_codes=xt_codes,
                                ef_construction=args.quantizer_efConstruction,
                                encode_kwargs=encode_kwargs(args), log=log)
    stats.update(t_xt_encode=st.t_encode, t_train_codebook=st.t_train_codebook,
                 MSE_train_residuals=st.mse_train_residuals, t_add_codebook=st.t_index)
    log(f"index ready: {args.index_key}")
    return index


def run_add(args, model, ds, index, stats) -> None:
    from qinco_jax import ivf

    ivf.check_index_matches_model(index, model)
    if index.ntotal:
        raise cli.UsageError(f"the trained index already holds {index.ntotal} vectors; add needs an empty one")
    if args.xb_codes:
        counts = [packing.count_codes_file(f, model) for f in args.xb_codes]
        if sum(counts) != ds.nb:
            raise cli.UsageError(f"--xb_codes files hold {sum(counts)} codes ({' + '.join(map(str, counts))}), "
                                 f"the database {ds.name} has {ds.nb} vectors")

        def batches():
            for f in args.xb_codes:
                log(f"  loading codes {f}")
                yield packing.read_codes_file(f, model)

        t = ivf.add_vectors(index, model, batches(), code_batches=True, expected_total=ds.nb, log=log)
    else:
        batches = ds.database_iterator(bs=args.add_bs)
        t = ivf.add_vectors(index, model, batches, expected_total=ds.nb, encode_kwargs=encode_kwargs(args), log=log)
    stats["t_add"] = t
    log(f"add done in {t:.3f} s, {index.ntotal} vectors")


def run_search(args, model, ds, index) -> list[dict]:
    from qinco_jax import ivf, report

    ivf.check_index_matches_model(index, model)
    if index.ntotal != ds.nb:
        raise cli.UsageError(f"the index holds {index.ntotal} vectors, the database {ds.name} has {ds.nb}")
    xq = ds.get_queries()
    gt = ds.get_groundtruth()
    log(f"queries {xq.shape}, ground truth {gt.shape}")
    reranker = ivf.Reranker(model, dtype=cli.dtype_from_args(args))
    log(ivf.format_header(["nprobe"] + (["efSearch"] if args.quantizer_efSearch else []) + ["nshort"]))
    results = ivf.explore(index, model, xq, gt, nprobe=args.nprobe, nshort=args.nshort,
                          ef_search=args.quantizer_efSearch, n_autotune=args.n_autotune,
                          reranker=reranker, log=log)
    log("\n" + report.format_table(results, len(xq)))
    return results


def main(argv=None):
    args = build_parser().parse_args(argv)
    cli.print_args(args)
    check_args(args)
    cli.select_device(args.device)
    set_threads(args.nthreads)
    ds = datasets.get_dataset(args.db)
    log(f"Prepared dataset {ds}")
    stats: dict = {}

    if "train_centroids" in args.todo:
        log("======== k-means clustering to compute IVF centroids")
        centroids = train_centroids(args, ds)
        if args.IVF_centroids:
            from qinco_jax.io import save_npy

            save_npy(args.IVF_centroids, centroids)
            log(f"stored centroids in {args.IVF_centroids}")
        if args.todo == ["train_centroids"]:
            return

    from qinco_jax import ivf
    model = cli.load_model(args.model)
    ivf.require_ivf_model(model)
    if model.d != ds.d:
        raise cli.UsageError(f"the model ({model.describe()}) has dimension {model.d}, "
                             f"the data set {ds.name} has dimension {ds.d}")

    index = None
    if "train" in args.todo:
        log("====================== training")
        index = run_train(args, model, ds, stats)
        if args.trained_index:
            ivf.write_index(index, args.trained_index)
            log(f"stored trained index in {args.trained_index}")

    if "add" in args.todo:
        log("====================== adding")
        if index is None:
            if not args.trained_index:
                raise cli.UsageError("add needs a trained index: run --todo train too, or give --trained_index")
            index = ivf.read_index(args.trained_index, "trained index")
        run_add(args, model, ds, index, stats)
        if args.index:
            ivf.write_index(index, args.index)
            log(f"stored index in {args.index}")

    if "search" in args.todo:
        log("====================== searching")
        if index is None:
            if not args.index:
                raise cli.UsageError("search needs an index: run --todo train add too, or give --index")
            index = ivf.read_index(args.index, "index")
        results = run_search(args, model, ds, index)
        if args.json:
            from qinco_jax.io import write_bytes

            write_bytes(args.json, (json.dumps(results, indent=1) + "\n").encode())
            log(f"wrote {len(results)} results to {args.json}")
    if stats:
        log("stats: " + json.dumps(stats))


if __name__ == "__main__":
    cli.run_main(main)
