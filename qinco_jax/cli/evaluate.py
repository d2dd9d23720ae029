"""Evaluate a QINCo model on a data set (the reference's eval_qinco.py).

Encodes the database, decodes it, and reports the reconstruction MSE and the
1-recall@1/10/100 of exact search (faiss, L2) of the queries among the decoded vectors,
against the data set's ground truth.

    python search/eval_qinco.py --db bigann1M --model models/bigann_8x8_L2.pt
    python search/eval_qinco.py --db synthetic --model run/model --json eval.json
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

from qinco_jax import cli, datasets, metrics
from qinco_jax.io import write_bytes

SEARCH_K = 100


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


def evaluate(model, ds, *, batch_size=None, dtype="float32", beam=1, preselect=0) -> dict:
    """Encode, decode and search `ds` with `model`; returns the results as a dict."""
    from qinco_jax import codec

    if model.d != ds.d:
        raise cli.UsageError(f"the model ({model.describe()}) has dimension {model.d}, "
                             f"the data set {ds.name} has dimension {ds.d}")
    xb = ds.get_database()
    print(f"Encoding database vectors of size {xb.shape}", flush=True)
    t0 = time.time()
    codes = codec.encode(model, xb, batch_size=batch_size, dtype=dtype, progress="encoding",
                         beam=beam, preselect=preselect)
    t_encode = time.time() - t0
    print(f"Encoding done in {t_encode:.2f} s; decoding", flush=True)
    t0 = time.time()
    recons = codec.decode(model, codes, batch_size=batch_size, dtype=dtype, progress="decoding")
    t_decode = time.time() - t0
    mse = metrics.mean_squared_error(xb, recons)
    print(f"Decoding done in {t_decode:.2f} s, MSE={mse:g}", flush=True)
    print("Performing search", flush=True)
    t0 = time.time()
    ids = datasets.exact_groundtruth(ds.get_queries(), recons, SEARCH_K)
    t_search = time.time() - t0
    recalls = metrics.one_recall_at(ids, ds.get_groundtruth())
    for rank, r in recalls.items():
        print(f"1-recall@{rank}: {r:.4f}")
    return {"db": ds.name, "model": model.describe(), "nb": int(ds.nb), "nq": int(ds.nq),
            "mse": mse, "recalls": recalls, "beam": beam, "preselect": preselect, "dtype": dtype,
            "t_encode": t_encode, "t_decode": t_decode, "t_search": t_search}


def main(argv=None):
    args = build_parser().parse_args(argv)
    cli.print_args(args)
    if not args.model:
        raise cli.UsageError("--model is required")
    cli.select_device(args.device)
    ds = datasets.get_dataset(args.db)
    print(f"Prepared dataset {ds}", flush=True)
    model = cli.load_model(args.model)
    result = evaluate(model, ds, batch_size=args.batch_size, dtype=cli.dtype_from_args(args),
                      beam=args.beam, preselect=args.preselect)
    if args.json:
        result["model_path"] = args.model
        write_bytes(args.json, (json.dumps(result, indent=2) + "\n").encode())
        print("wrote", args.json)


if __name__ == "__main__":
    cli.run_main(main)
