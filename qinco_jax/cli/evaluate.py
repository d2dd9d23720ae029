"""Evaluate a QINCo model on a data set (the reference's eval_qinco.py).

Encodes the database, decodes it, and reports the reconstruction MSE and the
1-recall@1/10/100 of exact search (faiss, L2) of the queries among the decoded vectors,
against the data set's ground truth.

    python search/eval_qinco.py --db bigann1M --model models/bigann_8x8_L2.pt
    python search/eval_qinco.py --db synthetic --model run/model --json eval.json
"""

from __future__ import annotations

import json

from qinco_jax import cli
from qinco_jax.data import datasets
from qinco_jax.experiments import evaluation
from qinco_jax.formats.io import write_bytes


def build_parser():
    p = cli.parser(__doc__.split("\n\n")[0])
    g = p.add_argument_group("files")
    g.add_argument("--model", default="", help="QINCo model: a reference .pt file or a qinco-jax checkpoint directory")
    g.add_argument("--json", default="", help="also write the results to this JSON file")
    g = p.add_argument_group("computation options")
    cli.add_compute_args(g)
    cli.add_search_args(g)
    g = p.add_argument_group("database")
    cli.add_db_arg(g)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    cli.print_args(args)
    if not args.model:
        raise cli.UsageError("--model is required")
    cli.select_device(args.device)
    ds = datasets.get_dataset(args.db)
    print(f"Prepared dataset {ds}", flush=True)
    options = cli.encode_options_from_args(args, batch_size=args.batch_size)
    model = cli.load_model_arg(args.model)
    if model.d != ds.d:
        raise cli.UsageError(f"the model ({model.describe()}) has dimension {model.d}, "
                             f"the data set {ds.name} has dimension {ds.d}")
    result = evaluation.evaluate(model, ds, options, log=lambda m: print(m, flush=True), progress=True)
    if args.json:
        result["model_path"] = args.model
        write_bytes(args.json, (json.dumps(result, indent=2) + "\n").encode())
        print("wrote", args.json)


def run() -> None:
    """Console entry point: bad input ends with one 'error:' line and exit status 2."""
    cli.run_main(main)


if __name__ == "__main__":
    run()
