"""QINCo2 training: time per epoch and validation MSE against QINCo2's reference, at the
fixture's training config (tests/fixtures/qinco2/train_reference_qinco2.json: M=4 K=64
L=2 de=48 dh=64 A=8 B=4, batch 256, ds.loop=4096, 5 cosine epochs + 3 ramp, 9000/1000
vectors), float32 and bfloat16.

    PYTHONPATH=. python bench/bench_train_qinco2.py [--reference_dir /work/ref] [--seeds 0 1 2]
    PYTHONPATH=. python bench/bench_train_qinco2.py --precision float32 bfloat16 --seeds 0

--precision: the dtypes to train with, one after the other in this process on the same
data and seeds (default both: the cost of mixed precision, `precision=bf16` /
`--dtype bfloat16`, in validation MSE and seconds per epoch). On a CPU bfloat16 is
usually slower than float32 (no bfloat16 matrix units: XLA converts around every
product); its speed-up is a GPU / TPU matter (bench/device_check.py, section
mixed_precision). --v1 adds the same comparison for QINCo v1 (M=4 K=16 L=2 h=32, its
recipe, 6 epochs on the fixture's 9000 / 1000 vectors).

One seed is not enough to compare curves: the RQ initialisation and the random
projections make the untrained model vary a lot (seed 0 here: 2346 before training,
seed 1: 5094), so the curve is the mean over --seeds.

With --reference_dir, the reference's `run.py task=train cpu=true` runs in a subprocess
on the same data (same machine, same run) and its per-epoch seconds are read from its
log; without it, the fixture's recorded epoch seconds are shown (other run: indicative).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures"
REF_JSON = FIX / "qinco2" / "train_reference_qinco2.json"


def ours(x, seed, dtype):
    from qinco_jax.training import recipe
    from qinco_jax.training import loop as training

    xt, xval = x[:-1000], x[-1000:]
    spec = recipe.ModelSpec(arch="qinco2", M=4, K=64, L=2, de=48, h=64, A=8, B=4, seed=seed)
    cfg = training.qinco2_train_config(batch_size=256, epochs=5, epoch_size=4096, stop_patience=2, seed=seed,
                                       dtype=dtype, ngpu=1, progress=False)
    res = recipe.train_model(xt, xval, spec, cfg)
    ep = res.history["epochs"]
    return [e["val_mse"] for e in ep], [e["seconds"] for e in ep]


def v1_precision(dtypes, epochs=6):
    """QINCo v1 trained from the same RQ in each dtype, in this process: {dtype:
    (val MSE per epoch, median s/epoch after the first)}."""
    from qinco_jax.training import recipe
    from qinco_jax.training import loop as training

    xt, xval = np.load(FIX / "train_xt.npy"), np.load(FIX / "train_xval.npy")
    spec = recipe.ModelSpec(M=4, K=16, L=2, h=32, seed=0)
    codebooks = recipe.train_rq_codebooks(xt, spec)
    out = {}
    for dtype in dtypes:
        cfg = training.TrainConfig(lr=1e-3, batch_size=256, max_epochs=epochs, ngpu=1, progress=False, dtype=dtype)
        res = training.fit(recipe.initial_model(xt, spec, codebooks), xt, xval, cfg, log=lambda msg: None)
        ep = res.history["epochs"]
        out[dtype] = ([e["val_mse"] for e in ep], float(np.median([e["seconds"] for e in ep][1:])))
        print(f"v1 {dtype}: val MSE per epoch {np.round(out[dtype][0], 1).tolist()}, "
              f"median s/epoch {out[dtype][1]:.3f}")
    return out


def reference(ref_dir, x, seed):
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "x.npy", x)
        cmd = [sys.executable, "run.py", "task=train", "cpu=true", f"seed={seed}", f"trainset={tmp}/x.npy",
               "M=4", "K=64", "L=2", "de=48", "dh=64", "A=8", "B=4", "lr=0.0008", "wd=0.1", "grad_clip=0.1",
               "batch=256", "epochs=5", "ds.loop=4096", "ds.valset=1000", "scheduler.ramp_epochs=3",
               "scheduler.stop_patience=2", f"output={tmp}/m.pt"]
        env = dict(os.environ, OMP_NUM_THREADS="2")
        proc = subprocess.run(cmd, cwd=ref_dir, capture_output=True, text=True, env=env, timeout=1800)
        log = proc.stdout + proc.stderr
        if proc.returncode:
            raise RuntimeError(f"reference failed:\n{log[-3000:]}")
        return log


def reference_epoch_seconds(log: str) -> list[float]:
    """Seconds from each 'Start epoch N' to 'End of epoch N' line of the reference's
    log (its timestamps have millisecond resolution; validation included, as ours)."""
    from datetime import datetime

    stamp = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"
    parse = lambda t: datetime.strptime(t, "%Y-%m-%d %H:%M:%S,%f")  # noqa: E731
    starts = {int(e): parse(t) for t, e in re.findall(stamp + r"[^\n]*Start epoch (\d+)", log)}
    ends = {int(e): parse(t) for t, e in re.findall(stamp + r"[^\n]*End of epoch (\d+)", log)}
    return [(ends[e] - starts[e]).total_seconds() for e in sorted(starts) if e in ends]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference_dir", default="")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="our seeds (the curve is their mean, as the fixture's is of seeds 0 1 2)")
    p.add_argument("--precision", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"],
                   help="network dtypes to train with, in this order, in this process")
    p.add_argument("--v1", action="store_true", help="also compare the dtypes for QINCo v1 training")
    args = p.parse_args()
    x = np.concatenate([np.load(FIX / "train_xt.npy"), np.load(FIX / "train_xval.npy")])
    if args.v1:
        v1 = v1_precision(args.precision)
        if len(v1) == 2:
            (a, ta), (b, tb) = v1["float32"], v1["bfloat16"]
            print(f"v1 bfloat16 vs float32: final val MSE {b[-1]:.1f} vs {a[-1]:.1f} "
                  f"({100 * (b[-1] / a[-1] - 1):+.2f} %); s/epoch {tb:.3f} vs {ta:.3f} ({tb / ta:.2f}x the time)")
    ref = json.loads(REF_JSON.read_text())
    ref_curve = ref["mean_val_mse"]
    ref_log = None
    if args.reference_dir:
        t0 = time.time()
        ref_log = reference(args.reference_dir, x, args.seeds[0])
        print(f"reference run took {time.time() - t0:.1f} s")
    out = {}
    for dtype in args.precision:
        curves, secs = [], []
        for seed in args.seeds:
            c, s = ours(x, seed, dtype)
            curves.append(c)
            secs.append(np.median(s[1:]))  # epoch 0 includes compilation
            print(f"ours {dtype} seed {seed}: s/epoch {np.round(s, 3).tolist()}")
        out[dtype] = (np.mean(curves, 0), float(np.mean(secs)))
        print(f"ours {dtype}: val MSE per epoch {np.round(out[dtype][0], 1).tolist()}, "
              f"median s/epoch {out[dtype][1]:.3f}")
    ref_secs = float(np.mean([np.median(r["epoch_seconds"]) for r in ref["runs"]]))
    src = "fixture record (another run)"
    if ref_log is not None:
        found = reference_epoch_seconds(ref_log)
        if found:
            ref_secs, src = float(np.median(found[1:] or found)), "measured in this run"
            print(f"reference s/epoch (start to end incl. validation): {np.round(found, 2).tolist()}")
    print(f"reference: val MSE per epoch {np.round(ref_curve, 1).tolist()}, s/epoch {ref_secs:.3f} ({src})")
    f32, bf16 = out.get("float32"), out.get("bfloat16")
    if f32 is not None:
        print(f"speed-up per epoch (float32): {ref_secs / f32[1]:.2f}x")
        print(f"final val MSE float32 {f32[0][-1]:.1f} vs reference mean {ref_curve[-1]:.1f} "
              f"({100 * (f32[0][-1] / ref_curve[-1] - 1):+.1f} %)")
    if f32 is not None and bf16 is not None:
        print(f"bfloat16 vs float32 (same process, seeds {args.seeds}): final val MSE {bf16[0][-1]:.1f} vs "
              f"{f32[0][-1]:.1f} ({100 * (bf16[0][-1] / f32[0][-1] - 1):+.2f} %), best {min(bf16[0]):.1f} vs "
              f"{min(f32[0]):.1f}; s/epoch {bf16[1]:.3f} vs {f32[1]:.3f} ({bf16[1] / f32[1]:.2f}x the time)")


if __name__ == "__main__":
    main()
