"""Training from a memory-mapped file against training from RAM: seconds per epoch of
the same QINCo2 run (a small model, epochs of `--loop` rows) on a generated uint8 bvecs
file, read from disk batch by batch or converted to float32 in RAM first. The two runs
train the same model (checked); the figure is the streamed / in-RAM ratio of the
median epoch time (target: within 10 %).

    python bench/bench_train_streaming.py [--n 400000] [--loop 20000] [--epochs 4]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from qinco_jax.formats.vecs_io import read_vectors
from qinco_jax.training import loop as training
from qinco_jax.training import recipe


def write_bvecs(path: Path, n: int, d: int, seed: int = 0) -> None:
    rows = np.memmap(path, dtype=np.uint8, mode="w+", shape=(n, 4 + d))
    rs = np.random.RandomState(seed)
    for i0 in range(0, n, 100_000):
        chunk = rows[i0:i0 + 100_000]
        chunk[:, :4] = np.frombuffer(np.int32(d).tobytes(), np.uint8)
        chunk[:, 4:] = rs.randint(0, 256, (len(chunk), d), dtype=np.uint8)
    rows.flush()


def epoch_seconds(xt, xval, args) -> tuple[list[float], list[float]]:
    spec = recipe.ModelSpec(arch="qinco2", M=4, K=64, L=1, h=64, de=64, A=8, B=2, seed=0)
    cfg = training.qinco2_train_config(batch_size=512, epochs=args.epochs, stop_patience=0, epoch_size=args.loop,
                                       ngpu=1, progress=False, max_epochs=args.epochs)
    res = recipe.train_model(xt, xval, spec, cfg, log=lambda m: None)
    return [e["seconds"] for e in res.history["epochs"]], [e["val_mse"] for e in res.history["epochs"]]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=400_000, help="rows of the generated file (d=128 uint8)")
    p.add_argument("--loop", type=int, default=20_000, help="rows per epoch (ds.loop)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--out", default="", help="JSON results file")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.bvecs"
        write_bvecs(path, args.n, 128)
        x = read_vectors(path)
        nval = 2000
        t0 = time.time()
        ram = np.asarray(x, np.float32)
        load_s = time.time() - t0
        # the first epoch compiles: compare the median of the later ones
        streamed_s, streamed_mse = epoch_seconds(x[:-nval], x[-nval:], args)
        ram_s, ram_mse = epoch_seconds(ram[:-nval], ram[-nval:], args)
    same = streamed_mse == ram_mse
    s_med, r_med = float(np.median(streamed_s[1:])), float(np.median(ram_s[1:]))
    result = {"n": args.n, "loop": args.loop, "epochs": args.epochs, "streamed_epoch_s": streamed_s,
              "in_ram_epoch_s": ram_s, "in_ram_load_s": load_s, "median_ratio": s_med / r_med,
              "same_validation_mse": same}
    print(f"{args.n} rows, epochs of {args.loop}: streamed {s_med:.2f} s / epoch, in RAM {r_med:.2f} s / epoch "
          f"(ratio {s_med / r_med:.3f}); in-RAM load {load_s:.1f} s; same model: {same}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
