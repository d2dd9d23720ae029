"""Training benchmark: quality against the reference's recorded curves, and time per
epoch against the PyTorch reference run in the same process on the same machine.

    python bench/bench_train.py                                    # quality (3 seeds)
    python bench/bench_train.py --reference_dir /tmp/ref/qinco_v1  # + time vs torch

(make the reference checkout with
 `mkdir -p /tmp/ref && git -C <Qinco mirror> archive HEAD qinco_v1 | tar -x -C /tmp/ref`).

Quality: tests/fixtures/train_reference.json holds the reference's validation MSE
per epoch for QINCo M=4 K=16 L=2 h=32, lr 1e-3, batch 256, 10 epochs on
train_xt / train_xval, for three torch seeds. We train the same configuration (RQ
initialisation, same data order) from three JAX seeds and compare the final MSE with
the reference's mean (target: within 3 %).

Time: one epoch = the training pass over the 9000 vectors + the validation MSE, both
sides; JAX is timed after its first epoch (compilation), the reference runs its own
`train_one_epoch` and `compute_MSE`. Ratios are only meaningful within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

import jax  # noqa: E402

from qinco_jax.training import rq_init  # noqa: E402
from qinco_jax.training import loop as training
from qinco_jax.config import QincoConfig  # noqa: E402
from qinco_jax.formats.io import write_bytes  # noqa: E402
from qinco_jax.models.qinco import QincoModel, init_params  # noqa: E402

FIX = os.path.join(ROOT, "tests", "fixtures")


def load():
    with open(os.path.join(FIX, "train_reference.json")) as f:
        ref = json.load(f)
    xt = np.load(os.path.join(FIX, "train_xt.npy"))
    xval = np.load(os.path.join(FIX, "train_xval.npy"))
    return ref, xt, xval


def jax_run(ref, xt, xval, cb, seed, epochs, ngpu):
    c = ref["config"]
    scale = np.float32(xt.max())
    config = QincoConfig(d=xt.shape[1], K=c["K"], M=c["M"], L=c["L"], h=c["h"], db_scale=float(scale))
    model = QincoModel(config, init_params(config, jax.random.key(seed), codebooks=cb / scale))
    cfg = training.TrainConfig(lr=c["lr"], batch_size=c["bs"], max_epochs=epochs, ngpu=ngpu, progress=False)
    return training.fit(model, xt, xval, cfg, log=lambda m: None).history


def torch_epoch_times(ref_dir, ref, xt, xval, cb, epochs, threads):
    import torch
    from torch import optim

    from qinco_jax.experiments.reference import import_reference

    model_qinco = import_reference(ref_dir, "utils", "model_qinco")
    train_qinco = import_reference(ref_dir, "datasets", "train_qinco")

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    c = ref["config"]
    model = model_qinco.QINCo(xt.shape[1], c["K"], c["L"], c["M"], c["h"])
    model.db_scale = xt.max()
    train_qinco.initialize_model(model, cb, None)
    times, mses = [], []
    for epoch in range(epochs):
        batches = training.epoch_batches(len(xt), c["bs"], epoch)  # the same order as the JAX side
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            opt = optim.Adam(model.parameters(), lr=c["lr"])
            train_qinco.train_one_epoch(model, xt, None, batches, opt, verbose=False)
            mses.append(train_qinco.compute_MSE(model, xval, bs=c["bs"]))
        times.append(time.perf_counter() - t0)
    return times, mses, torch.get_num_threads()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seeds", default=[0, 1, 2], type=int, nargs="+", help="JAX initialisation seeds")
    p.add_argument("--epochs", default=10, type=int, help="epochs (the reference curves have 10)")
    p.add_argument("--ngpu", default=-1, type=int, help="devices to train on (-1: all)")
    p.add_argument("--reference_dir", default="", help="qinco_v1 checkout: also time the torch reference")
    p.add_argument("--reference_epochs", default=3, type=int, help="epochs of the reference to time")
    p.add_argument("--torch_threads", default=0, type=int, help="torch threads (0: torch's default)")
    p.add_argument("--json", default="", help="write the results here")
    for name in ("M", "K", "L", "h"):
        p.add_argument(f"--{name}", default=0, type=int,
                       help=f"override the fixture config's {name} (timing only: no reference curve then)")
    p.add_argument("--nt", default=0, type=int,
                   help="use only the first nt training vectors (0: all 9000; timing only: no reference curve then)")
    args = p.parse_args(argv)

    ref, xt, xval = load()
    overrides = {n: getattr(args, n) for n in ("M", "K", "L", "h") if getattr(args, n)}
    if overrides:
        ref["config"].update(overrides)
        ref["mean_val_mse"] = []  # the recorded curves are for the fixture config only
        print(f"config overridden: {ref['config']}")
    if args.nt:
        xt = xt[:args.nt]
        ref["mean_val_mse"] = []  # recorded on all 9000 vectors: no comparison on fewer
    print(f"device: {jax.devices()[0].platform} x{len(jax.devices())}, cpu cores {os.cpu_count()}")
    cb = rq_init.train_rq(xt, ref["config"]["M"], ref["config"]["K"], ref["rq_beam_size"], xval)
    ref_final = ref["mean_val_mse"][args.epochs - 1] if args.epochs <= len(ref["mean_val_mse"]) else None
    out = {"reference_mean_val_mse": ref["mean_val_mse"], "rq_val_mse": ref["rq_val_mse"], "runs": []}
    for seed in args.seeds:
        h = jax_run(ref, xt, xval, cb, seed, args.epochs, args.ngpu)
        mses = [e["val_mse"] for e in h["epochs"]]
        secs = [e["seconds"] for e in h["epochs"]]
        out["runs"].append({"seed": seed, "val_mse": mses, "seconds": secs})
        rel = f" ({100 * (mses[-1] / ref_final - 1):+.2f} % vs reference mean {ref_final:.1f})" if ref_final else ""
        print(f"jax seed {seed}: val MSE per epoch {' '.join(f'{m:.1f}' for m in mses)}{rel}")
    finals = np.array([r["val_mse"][-1] for r in out["runs"]])
    jax_epoch = float(np.median([s for r in out["runs"] for s in r["seconds"][1:]] or [np.nan]))
    out["jax_final_mean"] = float(finals.mean())
    out["jax_epoch_seconds"] = jax_epoch
    if ref_final:
        out["relative_to_reference"] = float(finals.mean() / ref_final - 1)
        print(f"JAX mean final val MSE {finals.mean():.1f} vs reference mean {ref_final:.1f}: "
              f"{100 * out['relative_to_reference']:+.2f} % (target within 3 %); RQ {ref['rq_val_mse']:.1f}")
    print(f"JAX time per epoch (train + validation, after compilation): {jax_epoch:.3f} s")

    if args.reference_dir:
        times, mses, threads = torch_epoch_times(args.reference_dir, ref, xt, xval, cb,
                                                 args.reference_epochs, args.torch_threads)
        # re-time JAX right after, in the same conditions
        h = jax_run(ref, xt, xval, cb, args.seeds[0], max(2, args.reference_epochs + 1), args.ngpu)
        jax_now = float(np.median([e["seconds"] for e in h["epochs"][1:]]))
        torch_epoch = float(np.median(times))
        out.update(torch_epoch_seconds=torch_epoch, torch_threads=threads, torch_val_mse=[float(m) for m in mses],
                   jax_epoch_seconds_same_run=jax_now, speedup=torch_epoch / jax_now)
        print(f"torch reference ({threads} threads): {torch_epoch:.3f} s per epoch "
              f"(val MSE {' '.join(f'{m:.1f}' for m in mses)})")
        print(f"JAX: {jax_now:.3f} s per epoch -> {torch_epoch / jax_now:.1f}x faster (target >= 1.5x)")
    if args.json:
        write_bytes(args.json, json.dumps(out, indent=1).encode())


if __name__ == "__main__":
    main()
