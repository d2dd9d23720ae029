"""The pairwise decoder's shrinkage on real data: held-out MSE and the three-stage search.

Takes a main job's output (`make demo` writes ivf_qinco2.pt and ivf_qinco2.faissindex
to runs/demo) and its data set, encodes the training and database vectors with the
model, trains one pairwise decoder per shrinkage value on the training codes (2·M
tables of K² rows, the reference's recipe when shrinkage is 0) and reports, for each:

- the MSE of the pairwise reconstructions of the database (vectors the decoder never
  saw) beside the model's own MSE;
- the three-stage search at every (nprobe, nshort, nmid_short) of the grid (nmid_short
  1: no middle stage), recall@1 / @10 and ms per query, the pairwise tables stored as
  --table_dtype (auto: the search's default choice, `pairwise_stage.choose_table_dtype`);
- the best recall@1 with and without the middle stage.

A shrinkage of "auto" is the library's default (chosen on held-out training rows).

    python bench/bench_pairwise_shrinkage.py --run runs/demo [--db sift_images] [--nt 20000] \\
        [--shrinkage auto 0 16 64 256] [--nprobe 8] [--nshort 5 10 20] [--nmid_short 1 2 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


from qinco_jax.experiments import baselines
from qinco_jax.formats import checkpoint
from qinco_jax.models import codec
from qinco_jax.data import datasets
from qinco_jax.models import pairwise
from qinco_jax.formats.io import write_bytes
from qinco_jax.metrics import mean_squared_error
from qinco_jax.search import index as ivf
from qinco_jax.search import pairwise_stage, provenance
from qinco_jax.search.sweep import explore


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/demo", help="a main job's output folder")
    p.add_argument("--stem", default="ivf_qinco2", help="which of its models: ivf_qinco2 or ivf_qinco")
    p.add_argument("--db", default="sift_images")
    p.add_argument("--nt", type=int, default=95_000, help="training vectors (the main job's nt)")
    p.add_argument("--shrinkage", nargs="+", default=["auto", "0", "16", "64", "256"],
                   help="values to train with; auto: chosen on held-out training rows (the default)")
    p.add_argument("--nprobe", type=int, nargs="+", default=[8])
    p.add_argument("--nshort", type=int, nargs="+", default=[5, 10, 20])
    p.add_argument("--nmid_short", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--table_dtype", default="auto", choices=("auto",) + pairwise.TABLE_DTYPES)
    p.add_argument("--json", default="")
    args = p.parse_args(argv)

    run = Path(args.run)
    model = checkpoint.load_model(run / f"{args.stem}.pt")
    index = ivf.read_index(run / f"{args.stem}.faissindex")
    ds = datasets.get_dataset(args.db)
    xt = np.asarray(ds.get_train(args.nt), np.float32)
    xb = np.asarray(ds.get_database(), np.float32)
    xq, gt = np.asarray(ds.get_queries(), np.float32), ds.get_groundtruth()
    xt_codes = codec.encode(model, xt, progress="encode training set")
    xb_codes = codec.encode(model, xb, progress="encode database")
    centroids = ivf.ivf_centroids(model)
    out = {"model": model.describe(), "nt": len(xt), "nb": len(xb), "nq": len(xq),
           "model_db_mse": mean_squared_error(codec.decode(model, xb_codes), xb), "runs": []}
    print(f"{model.describe()}: database MSE of the model's decode {out['model_db_mse']:.0f}")
    for text in args.shrinkage:
        lam = None if text == "auto" else float(text)
        t0 = time.time()
        training = pairwise_stage.train_for_model(model, xt, xt_codes, shrinkage=lam, progress=False)
        t_train = time.time() - t0
        print(f"\n{pairwise_stage.describe_shrinkage(training)} (trained in {t_train:.1f} s)")
        db_mse = mean_squared_error(pairwise.decode(training.decoder, xb_codes, centroids), xb)
        table_dtype = args.table_dtype
        if table_dtype == "auto":
            sample = provenance.stored_codes_sample(index, pairwise_stage.COMPACT_CHECK_SAMPLE)
            table_dtype, mses = pairwise_stage.choose_table_dtype(training.decoder, model, sample)
            print(f"tables stored as {table_dtype}: " + ", ".join(f"{k} {v:.6g}" for k, v in mses.items()))
        mid = pairwise_stage.middle_stage(training.decoder, model, table_dtype=table_dtype)
        results = explore(index, model, xq, gt, nprobe=args.nprobe, nshort=args.nshort,
                          nmid_short=args.nmid_short, mid=mid, log=lambda _: None)
        points = sorted(baselines.points_from_search_results(results),
                        key=lambda q: tuple(q["parameters"].values()))
        two = max(q["recall@1"] for q in points if q["parameters"].get("nmid_short", 1) <= 1)
        three = max((q["recall@1"] for q in points if q["parameters"].get("nmid_short", 1) > 1), default=None)
        out["runs"].append({"shrinkage": text, "trained_with": training.shrinkage,
                            "validation_mse": training.validation_mse, "t_train": t_train,
                            "train_mse": training.train_mse[-1], "db_mse": db_mse, "table_dtype": table_dtype,
                            "best_recall1_two_stage": two, "best_recall1_three_stage": three, "points": points})
        print(f"shrinkage {text} ({training.shrinkage:g}): pairwise training MSE {training.train_mse[-1]:.0f}, "
              f"database (held-out) MSE {db_mse:.0f}")
        for q in points:
            print(f"  {q['parameters']}: "
                  f"R@1 {q['recall@1']:.3f} R@10 {q['recall@10']:.3f} {q['ms_per_query']:.3f} ms")
        print(f"  best recall@1: two stages {two:.3f}, three stages {three if three is None else f'{three:.3f}'}")
    if args.json:
        write_bytes(args.json, json.dumps(out, indent=1).encode())


if __name__ == "__main__":
    main()
