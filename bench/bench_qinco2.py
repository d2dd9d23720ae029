"""QINCo2 encoding speed: qinco-jax against the QINCo2 reference's own float32 CPU
encoding, in one run on the same weights.

    python bench/bench_qinco2.py --reference_dir /work/ref
    python bench/bench_qinco2.py --reference_dir /work/ref --n 2048 --settings 16x32,32x64

The model is qinco2-S-sized (D = De = 128, Dh = 256, L = 2, M = 8, K = 256) with random
weights (speed does not depend on training; the codes of both sides are compared so
that the two runs do the same work). It is written as a QINCo2 `.pt` by qinco-jax and
loaded by the reference through its own evaluation task (`QincoEvalTask`, inference
wrapper, TorchScript, float32 on CPU), then both encode the same vectors at each (A, B).
The reference needs hydra-core, accelerate, einops, torcheval, tensorboard importable.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np


from qinco_jax.models import codec
from qinco_jax.formats.checkpoint import save_model
from qinco_jax.config import EncodeOptions, QincoConfig
from qinco_jax.formats.io import write_bytes
from qinco_jax.models.qinco import QincoModel

from qinco_jax.experiments.timing import timed


def random_qinco2(d: int, de: int, dh: int, L: int, M: int, K: int, A: int, B: int, seed: int = 0) -> QincoModel:
    """A QINCo2 model whose every weight is random (an untrained one has zero layers,
    which would make the network trivially cheap to reason about, not to run)."""
    import jax

    config = QincoConfig(d=d, K=K, M=M, L=L, h=dh, de=de if de != d else 0, arch="qinco2", A=A, B=B)
    base = QincoModel.init(config, seed)
    rs = np.random.RandomState(seed)
    params = jax.tree.map(lambda a: (rs.randn(*np.shape(a)) / np.sqrt(max(1, np.shape(a)[-1] if np.ndim(a) else 1)))
                          .astype(np.float32), base.numpy_params())
    params["codebook0"] = rs.randn(K, d).astype(np.float32)
    params["normalisation"] = {"mean": np.zeros(d, np.float32), "std": np.ones((), np.float32)}
    params["xtarget_stats"] = base.numpy_params()["xtarget_stats"]
    return QincoModel(config, params)


def reference_encoder(reference_dir: str, model_path: str, db_path: str, A: int, B: int, threads: int):
    """The reference's evaluation model for this file at (A, B): a function x -> codes."""
    import torch
    from hydra import compose, initialize_config_dir

    from qinco_jax.experiments.reference import import_reference

    import_reference(reference_dir, "qinco")  # the reference's package, for the import below
    from qinco.qinco_tasks import QincoEvalTask

    torch.set_num_threads(threads)
    with initialize_config_dir(config_dir=os.path.join(os.path.abspath(reference_dir), "config"), version_base=None):
        cfg = compose("qinco_cfg", overrides=["task=eval", "cpu=true", "verbose=false", f"model={model_path}",
                                              f"db={db_path}", f"A={A}", f"B={B}"])
    task = QincoEvalTask(cfg)
    model = task.qinco_model.eval()

    def encode(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            codes = model(torch.from_numpy(x), step="encode")
        return codes.T.numpy() if codes.shape[0] != len(x) else codes.numpy()

    return encode


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference_dir", required=True, help="root of the QINCo2 reference (has qinco/, config/)")
    p.add_argument("--n", type=int, default=1024, help="vectors to encode")
    p.add_argument("--settings", default="16x32,32x64", help="AxB pairs")
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--de", type=int, default=128)
    p.add_argument("--dh", type=int, default=256)
    p.add_argument("--L", type=int, default=2)
    p.add_argument("--M", type=int, default=8)
    p.add_argument("--K", type=int, default=256)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads for the reference")
    p.add_argument("--min_seconds", type=float, default=2.0)
    p.add_argument("--json", default="")
    args = p.parse_args(argv)

    settings = [tuple(int(v) for v in s.split("x")) for s in args.settings.split(",")]
    max_A = max(a for a, _ in settings)
    model = random_qinco2(args.d, args.de, args.dh, args.L, args.M, args.K, A=max_A, B=settings[0][1])
    x = np.random.RandomState(1).randn(args.n, args.d).astype(np.float32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_path, db_path = os.path.join(tmp, "qinco2_S.pt"), os.path.join(tmp, "x.npy")
        save_model(model, model_path)
        np.save(db_path, x)
        for A, B in settings:
            ref_encode = reference_encoder(args.reference_dir, model_path, db_path, A, B, args.threads)
            ref_codes = ref_encode(x)
            ours = codec.encode(model, x, EncodeOptions(beam=B, preselect=A))
            agree = float(np.mean(np.all(ours == ref_codes, axis=1)))
            t_ref = timed(lambda: ref_encode(x), args.min_seconds)
            t_ours = timed(lambda: codec.encode(model, x, EncodeOptions(beam=B, preselect=A)), args.min_seconds)
            row = {"A": A, "B": B, "n": args.n, "ref_s": t_ref, "ours_s": t_ours, "speedup": t_ref / t_ours,
                   "ref_vec_per_s": args.n / t_ref, "ours_vec_per_s": args.n / t_ours, "codes_equal_rows": agree}
            rows.append(row)
            print(f"A={A:3d} B={B:3d}: reference {args.n / t_ref:8.0f} vec/s, qinco-jax {args.n / t_ours:8.0f} vec/s, "
                  f"speed-up {t_ref / t_ours:5.2f}x, codes equal {agree:.1%}", flush=True)
    result = {"model": model.describe(), "threads": args.threads, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
              "rows": rows}
    if args.json:
        write_bytes(args.json, (json.dumps(result, indent=2) + "\n").encode())
    return result


if __name__ == "__main__":
    main()
