"""Flat two-stage search with QINCo (the reference's search_2stage.py, the paper's Table 4).

Encodes the training set, fits least-squares AQ codebooks to its QINCo codes, encodes the
database; then, for every shortlist size, searches the AQ reconstructions of the whole
database exhaustively and re-ranks the shortlist with the exact QINCo decoding.

    python search/search_2stage.py --model models/bigann_8x8_L2.pt --db bigann1M
    python search/search_2stage.py --model run/model --db synthetic --nt 20000 --json two_stage.json
"""

from __future__ import annotations

import json

from qinco_jax import cli
from qinco_jax.data import datasets


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
    g.add_argument("--json", default="", help="write the results to this JSON file ({\"results\": [...], ...}, "
                   "see the README's results schema)")
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

    from qinco_jax.search import report
    from qinco_jax.search import two_stage

    options = cli.encode_options_from_args(args, batch_size=args.bs)
    model = cli.load_model_arg(args.model)
    two_stage.require_flat_model(model)
    ds = datasets.get_dataset(args.db)
    log(f"Prepared dataset {ds}")
    if model.d != ds.d:
        raise cli.UsageError(f"the model ({model.describe()}) has dimension {model.d}, "
                             f"the data set {ds.name} has dimension {ds.d}")
    if max(args.nshort) > ds.nb:
        raise cli.UsageError(f"--nshort {max(args.nshort)} is larger than the database ({ds.nb} vectors)")
    xq = ds.get_queries()
    results, stats = two_stage.run_two_stage(model, ds.get_train(args.nt), ds.get_database(), xq,
                                             ds.get_groundtruth(), args.nshort, options, log=log)
    log("\n" + report.format_table(results, len(xq)))
    log("stats: " + json.dumps(stats))
    if args.json:
        report.save_results(args.json, results, nq=len(xq), db=ds.name, model=model.describe(), stats=stats)
        log(f"wrote {len(results)} results to {args.json}")


def run() -> None:
    """Console entry point: bad input ends with one 'error:' line and exit status 2."""
    cli.run_main(main)


if __name__ == "__main__":
    run()
