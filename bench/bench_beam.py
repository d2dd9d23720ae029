"""MSE and encode speed of beam search (B) with candidate pre-selection (A) against
greedy encoding, on a trained model — the table of the README.

    python bench/bench_beam.py                      # the trained IVF512 fixture, K = 256
    python bench/bench_beam.py --model M.pt --db bigann1M --n 10000
    python bench/bench_beam.py --model paper --n 1024  # speed at the paper's size (random weights)

No retraining: the same decoder, only the search for codes changes.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


from qinco_jax.models import codec
from qinco_jax.config import EncodeOptions
from qinco_jax.formats.io import write_bytes
from qinco_jax.formats.checkpoint import load_model

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(FIXTURES, "ivf_qinco_d32_IVF512_M4_K256_L1_h32.pt"),
                   help="a model file, or 'paper': random weights at d=128 M=8 K=256 L=2 h=256 on Gaussian "
                        "data (for speed; its MSE figures say little)")
    p.add_argument("--db", default="", help="data set name or folder (default: the fixture database ivf_xb)")
    p.add_argument("--n", type=int, default=4000, help="database vectors to encode")
    p.add_argument("--preselect", default="0,32,16,8", help="A values (0 = all K)")
    p.add_argument("--beam", default="1,2,4,8", help="B values")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)

    if args.model == "paper":
        from qinco_jax.config import QincoConfig
        from qinco_jax.models.qinco import QincoModel

        model = QincoModel.init(QincoConfig(d=128, K=256, M=8, L=2, h=256), 0)
        x = np.random.RandomState(0).randn(args.n, 128).astype(np.float32)
    else:
        model = load_model(args.model)
    if args.model == "paper":
        pass
    elif args.db:
        from qinco_jax.data.datasets import get_dataset

        x = np.asarray(get_dataset(args.db).get_database()[: args.n], np.float32)
    else:
        x = np.load(os.path.join(FIXTURES, "ivf_xb.npy"))[: args.n]
    K = model.config.K
    rows = []
    base = None
    for A in [int(a) for a in args.preselect.split(",")]:
        for B in [int(b) for b in args.beam.split(",")]:
            bs = codec.default_encode_batch_size(model, B, A)
            codec.encode(model, x[:bs], EncodeOptions(beam=B, preselect=A))  # compile the batch shape timed below
            t0 = time.perf_counter()
            _, err = codec.encode(model, x, EncodeOptions(beam=B, preselect=A), return_errors=True)
            t = time.perf_counter() - t0
            row = {"A": A or K, "B": B, "mse": float(err.mean()), "vec_per_s": len(x) / t}
            if base is None:
                base = row
            row["mse_vs_greedy"] = row["mse"] / base["mse"]
            row["speed_vs_greedy"] = row["vec_per_s"] / base["vec_per_s"]
            rows.append(row)
            print(f"A={row['A']:4d} B={B}: MSE {row['mse']:10.2f} ({100 * (row['mse_vs_greedy'] - 1):+6.1f}%)"
                  f"  {row['vec_per_s']:9.0f} vec/s ({row['speed_vs_greedy']:.2f}x greedy)", flush=True)
    print(f"\n{model.describe()}, {len(x)} vectors\n")
    print("| A \\ B | " + " | ".join(f"B={b}" for b in args.beam.split(",")) + " |")
    print("|---|" + "---|" * len(args.beam.split(",")))
    for A in sorted({r["A"] for r in rows}, reverse=True):
        cells = [f"{100 * (r['mse_vs_greedy'] - 1):+.1f}% MSE, {r['speed_vs_greedy']:.2f}x"
                 for r in rows if r["A"] == A]
        print(f"| A={A} | " + " | ".join(cells) + " |")
    if args.json:
        write_bytes(args.json, json.dumps({"model": model.describe(), "n": len(x), "rows": rows}, indent=1).encode())


if __name__ == "__main__":
    main()
