"""Flat two-stage search with QINCo (the reference's search_2stage.py, the paper's Table 4).

Encodes the training set, fits least-squares AQ codebooks to its QINCo codes, encodes the
database; then, for every shortlist size, searches the AQ reconstructions of the whole
database exhaustively and re-ranks the shortlist with the exact QINCo decoding.

    python search/search_2stage.py --model models/bigann_8x8_L2.pt --db bigann1M
    python search/search_2stage.py --model run/model --db synthetic --nt 20000 --json two_stage.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

try:
    import qinco_jax  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qinco_jax import cli, datasets


def build_parser():
    p = cli.parser(__doc__.split("\n\n")[0])
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True,
                   help="QINCo, QINCo-LR or IVF-QINCo model: a reference .pt file or a qinco-jax model directory")
    g = p.add_argument_group("database")
    cli.add_db_arg(g)
    g.add_argument("--nt", default=500_000, type=int, help="nb training vectors")
    g = p.add_argument_group("how to compute")
    cli.add_compute_args(g, batch_flag="--bs")
    cli.add_search_args(g)
    g.add_argument("--nthreads", default=-1, type=int, help="number of OpenMP threads (-1: faiss's default)")
    g = p.add_argument_group("search")
    g.add_argument("--nshort", default=[10, 20, 50, 100, 200, 500, 1000], type=int, nargs="+",
                   help="shortlist sizes to try")
    g.add_argument("--json", default="", help="write the results to this JSON file (a list of "
                   "{parameters, recalls, recalls_orig, t_search, t_decode, t_dis})")
    return p


def log(msg: str) -> None:
    print(msg, flush=True)


def main(argv=None):
    args = build_parser().parse_args(argv)
    cli.print_args(args)
    if args.nt < 1:
        raise cli.UsageError(f"--nt must be >= 1, got {args.nt}")
    if args.bs is not None and args.bs < 1:
        raise cli.UsageError(f"--bs must be >= 1, got {args.bs}")
    if any(v < 1 for v in args.nshort):
        raise cli.UsageError(f"--nshort values must be >= 1, got {args.nshort}")
    cli.select_device(args.device)
    import faiss

    if args.nthreads != -1:
        faiss.omp_set_num_threads(max(1, args.nthreads))

    from qinco_jax import codec, ivf, metrics, report
    model = cli.load_model(args.model)
    ivf.require_flat_model(model)
    ds = datasets.get_dataset(args.db)
    log(f"Prepared dataset {ds}")
    if model.d != ds.d:
        raise cli.UsageError(f"the model ({model.describe()}) has dimension {model.d}, "
                             f"the data set {ds.name} has dimension {ds.d}")
    if max(args.nshort) > ds.nb:
        raise cli.UsageError(f"--nshort {max(args.nshort)} is larger than the database ({ds.nb} vectors)")
    kw = dict(batch_size=args.bs, dtype=cli.dtype_from_args(args))
    stats: dict = {}

    xt = ds.get_train(args.nt)
    log(f"encode the training set {xt.shape}")
    xt_codes = codec.encode(model, xt, progress="encode train", beam=args.beam, preselect=args.preselect, **kw)
    stats["MSE_train"] = metrics.mean_squared_error(xt, codec.decode(model, xt_codes, **kw))
    log(f"xt decoded MSE={stats['MSE_train']:g}")
    t0 = time.time()
    codebooks = ivf.fit_flat_aq(model, xt, xt_codes)
    stats["t_train_codebook"] = time.time() - t0
    stats["MSE_train_AQ"] = metrics.mean_squared_error(xt, ivf.flat_aq_reconstruct(model, xt_codes, codebooks))
    log(f"AQ codebooks fitted in {stats['t_train_codebook']:.2f} s, MSE on the training set "
        f"{stats['MSE_train_AQ']:g}")

    xb = ds.get_database()
    log(f"encode the database {xb.shape}")
    xb_codes = codec.encode(model, xb, progress="encode db", beam=args.beam, preselect=args.preselect, **kw)
    xb_aq = ivf.flat_aq_reconstruct(model, xb_codes, codebooks)
    stats["MSE_db"] = metrics.mean_squared_error(xb, codec.decode(model, xb_codes, progress="decode db", **kw))
    stats["MSE_db_AQ"] = metrics.mean_squared_error(xb, xb_aq)
    log(f"database MSE: QINCo {stats['MSE_db']:g}, AQ {stats['MSE_db_AQ']:g}")

    xq, gt = ds.get_queries(), ds.get_groundtruth()
    log(ivf.format_header(["nshort"]))
    results = ivf.two_stage_search(model, xq, gt, xb_codes, xb_aq, args.nshort,
                                   ivf.Reranker(model, dtype=kw["dtype"]), log=log)
    log("\n" + report.format_table(results, len(xq)))
    log("stats: " + json.dumps(stats))
    if args.json:
        from qinco_jax.io import write_bytes

        write_bytes(args.json, (json.dumps(results, indent=1) + "\n").encode())
        log(f"wrote {len(results)} results to {args.json}")


if __name__ == "__main__":
    cli.run_main(main)
