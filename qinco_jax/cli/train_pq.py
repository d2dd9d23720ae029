"""PQ-QINCo training (JAX port of the reference pq_qinco.py): cut the vectors into
--nsub consecutive sub-vectors (after an optional OPQ rotation), train one QINCo per
sub-vector, recombine them into one PQ-QINCo model.

The reference's three steps work as there:

    python train/pq_qinco.py --prepare --db FB_ssnpp1M --nt 10_010_000 --nsub 2 \\
        [--opq --OPQMatrix models/pq/OPQ.npy] --training_subvectors models/pq/trainset_{0..1}.npy
    python train/train_qinco.py --training_data models/pq/trainset_0.npy --M 16 ... --model models/pq/sub_0.pt
    python train/pq_qinco.py --recombine --nsub 2 [--opq --OPQMatrix models/pq/OPQ.npy] \\
        --in_models models/pq/sub_{0..1}.pt --out_model models/pq_qinco_2x16x8.pt

Without --prepare or --recombine it does all three in one run: the last --nval of the
--nt vectors are held out, every sub-model is trained with the training flags below
(--checkpoint DIR keeps one resumable checkpoint per sub-model in DIR/sub<i>), and the
recombined model goes to --out_model (sub-models also to --in_models if given).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

try:
    import qinco_jax  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import train_qinco  # noqa: E402
from qinco_jax import cli  # noqa: E402


def build_parser():
    p = cli.parser(__doc__.split("\n\n")[0])
    group = p.add_argument_group("what to do")
    group.add_argument("--prepare", default=False, action="store_true",
                       help="prepare the training sub-vectors and possibly train OPQ")
    group.add_argument("--recombine", default=False, action="store_true",
                       help="recombine the QINCo models (and OPQ) into one PQ-QINCo model")
    group.add_argument("--opq", default=False, action="store_true", help="also train (or use) an OPQ rotation")
    group.add_argument("--OPQMatrix", default="", help="where to store or load the OPQ matrix (npy)")
    train_qinco.add_data_args(p, nt_default=510_000)
    p.set_defaults(nval=10_000)
    group = p.add_argument_group("for prepare")
    group.add_argument("--training_subvectors", default=[], nargs="+", help="where to store the training sub-vectors")
    group = p.add_argument_group("PQ parameters")
    group.add_argument("--nsub", default=4, type=int, help="number of sub-vectors")
    group.add_argument("--opq_dim", default=-1, type=int,
                       help="OPQ output dimension (default: the data dimension)")
    group = p.add_argument_group("for recombine")
    group.add_argument("--in_models", default=[], nargs="+", help="trained QINCo models to combine")
    group.add_argument("--out_model", default="", help="output PQ-QINCo model (.pt or a library directory)")
    train_qinco.add_model_args(p)
    train_qinco.add_optim_args(p)
    group = p.add_argument_group("files (one-shot training)")
    group.add_argument("--checkpoint", default="", help="directory of per-sub-model training checkpoints")
    return p


def load_vectors(args, log=print) -> np.ndarray:
    """The first --nt vectors (validation included, as in the reference's prepare)."""
    return train_qinco.load_training_vectors(argparse.Namespace(training_data=args.training_data, db=args.db,
                                                                nt=args.nt, nval=0), log=log)


def train_opq(xt: np.ndarray, nsub: int, opq_dim: int, log=print) -> np.ndarray:
    """A faiss OPQ matrix (d_out x d_in) for nsub sub-vectors."""
    import faiss

    d = xt.shape[1]
    d_out = opq_dim if opq_dim > 0 else d
    if d_out % nsub:
        raise cli.UsageError(f"the OPQ output dimension {d_out} is not divisible by --nsub {nsub}")
    log(f"training OPQ {d} -> {d_out} for {nsub} sub-vectors")
    opq = faiss.OPQMatrix(d, nsub, d_out)
    opq.train(np.ascontiguousarray(xt, np.float32))
    return faiss.vector_to_array(opq.A).reshape(opq.d_out, opq.d_in).astype(np.float32)


def split(x: np.ndarray, nsub: int) -> list[np.ndarray]:
    d = x.shape[1]
    if nsub < 1 or d % nsub:
        raise cli.UsageError(f"the number of sub-vectors must divide the dimension: {d} is not divisible by {nsub}")
    ds = d // nsub
    return [np.ascontiguousarray(x[:, i * ds:(i + 1) * ds]) for i in range(nsub)]


def load_opq(path: str) -> np.ndarray:
    if not path:
        raise cli.UsageError("--opq needs --OPQMatrix (the npy file of the OPQ matrix)")
    a = np.load(path)
    if a.ndim != 2:
        raise cli.UsageError(f"{path}: an OPQ matrix must be 2-D, got shape {a.shape}")
    return a.astype(np.float32)


def recombine(sub_models, opq: np.ndarray | None):
    from qinco_jax.model import PQQincoModel, QincoModel

    for i, m in enumerate(sub_models):
        if not isinstance(m, QincoModel) or m.config.is_ivf:
            raise cli.UsageError(f"sub-model {i} is {m.describe()}: PQ-QINCo combines QINCo / QINCo-LR models")
    return PQQincoModel(tuple(sub_models), opq)


def prepare(args, log=print) -> None:
    from qinco_jax.io import save_npy

    if len(args.training_subvectors) != args.nsub:
        raise cli.UsageError(f"--training_subvectors needs {args.nsub} file names (--nsub), "
                             f"got {len(args.training_subvectors)}")
    xt = load_vectors(args, log)
    if args.opq:
        if not args.OPQMatrix:
            raise cli.UsageError("--opq needs --OPQMatrix to store the matrix in")
        A = train_opq(xt, args.nsub, args.opq_dim, log)
        save_npy(args.OPQMatrix, A)
        xt = xt @ A.T
    for path, sub in zip(args.training_subvectors, split(xt, args.nsub)):
        log(f"writing training sub-vectors {sub.shape} to {path}")
        save_npy(path, sub)


def do_recombine(args, log=print):
    from qinco_jax.checkpoint import load_model, save_model

    if not args.in_models or not args.out_model:
        raise cli.UsageError("--recombine needs --in_models and --out_model")
    if len(args.in_models) != args.nsub:
        log(f"note: {len(args.in_models)} models given, --nsub is {args.nsub}: using the models")
    model = recombine([load_model(p) for p in args.in_models], load_opq(args.OPQMatrix) if args.opq else None)
    log(f"storing {model.describe()} to {args.out_model}")
    save_model(model, args.out_model)
    return model


def train_all(args, log=print):
    """One-shot: OPQ, split, train every sub-model, recombine, save."""
    from qinco_jax.checkpoint import save_model
    from qinco_jax.training import validation_mse

    if args.ivf:
        raise cli.UsageError("PQ-QINCo with IVF-QINCo sub-quantizers is not supported (as in the reference)")
    if not args.out_model:
        raise cli.UsageError("one-shot PQ-QINCo training needs --out_model (or use --prepare / --recombine)")
    if args.in_models and len(args.in_models) != args.nsub:
        raise cli.UsageError(f"--in_models needs {args.nsub} names (--nsub) to store the sub-models")
    if args.nt <= args.nval:
        raise cli.UsageError(f"--nt {args.nt} must exceed --nval {args.nval} (the validation vectors are part of nt)")
    xt = load_vectors(args, log)
    xval = xt[-args.nval:]  # input space
    A = None
    if args.opq:
        A = train_opq(xt[:-args.nval], args.nsub, args.opq_dim, log)
        if args.OPQMatrix:
            from qinco_jax.io import save_npy

            save_npy(args.OPQMatrix, A)
        xt = xt @ A.T
    subs = []
    for i, xs in enumerate(split(xt, args.nsub)):
        log(f"====================== sub-quantizer {i} / {args.nsub}: d={xs.shape[1]}")
        sub_args = argparse.Namespace(**vars(args))
        sub_args.todo = ["train_rq", "train"]
        sub_args.nt = args.nt - args.nval
        sub_args.IVF_centroids = sub_args.RQ_filename = sub_args.history = ""
        sub_args.model = args.in_models[i] if args.in_models else ""
        sub_args.checkpoint = os.path.join(args.checkpoint, f"sub{i}") if args.checkpoint else ""
        subs.append(train_qinco.run(sub_args, xs, log=log).best)
    model = recombine(subs, A)
    log(f"PQ-QINCo validation MSE {validation_mse(model, xval):g}; storing {model.describe()} "
        f"to {args.out_model}")
    save_model(model, args.out_model)
    return model


def main(argv=None):
    args = build_parser().parse_args(argv)
    cli.print_args(args)
    if args.nsub < 1:
        raise cli.UsageError(f"--nsub must be >= 1, got {args.nsub}")
    if args.prepare and args.recombine:
        raise cli.UsageError("--prepare and --recombine are separate steps: give one")
    if args.prepare:
        return prepare(args)
    if args.recombine:
        return do_recombine(args)
    if args.distributed:
        import jax

        jax.distributed.initialize()
    return train_all(args)


if __name__ == "__main__":
    cli.run_main(main)
