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

import numpy as np

from qinco_jax import cli
from qinco_jax.cli import train as train_cli


def build_parser():
    p = cli.parser(__doc__.split("\n\n")[0])
    group = p.add_argument_group("what to do")
    group.add_argument("--prepare", default=False, action="store_true",
                       help="prepare the training sub-vectors and possibly train OPQ")
    group.add_argument("--recombine", default=False, action="store_true",
                       help="recombine the QINCo models (and OPQ) into one PQ-QINCo model")
    group.add_argument("--opq", default=False, action="store_true", help="also train (or use) an OPQ rotation")
    group.add_argument("--OPQMatrix", default="", help="where to store or load the OPQ matrix (npy)")
    train_cli.add_data_args(p, nt_default=510_000, nval_help="validation vectors: the last --nval of the --nt "
                            "training vectors (part of --nt, not in addition; --nt must exceed it)")
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
    train_cli.add_model_args(p)
    train_cli.add_optim_args(p)
    group = p.add_argument_group("files (one-shot training)")
    group.add_argument("--checkpoint", default="", help="directory of per-sub-model training checkpoints")
    return p


def load_vectors(args, log=print) -> np.ndarray:
    """The first --nt vectors (validation included, as in the reference's prepare)."""
    return train_cli.load_training_vectors(argparse.Namespace(training_data=args.training_data, db=args.db,
                                                              nt=args.nt, nval=0), log=log)


def load_opq(path: str) -> np.ndarray:
    from qinco_jax.training import pq

    if not path:
        raise cli.UsageError("--opq needs --OPQMatrix (the npy file of the OPQ matrix)")
    return pq.check_opq_matrix(np.load(path), f"{path}: an OPQ matrix")


def pq_spec_from_args(args):
    from qinco_jax.training import pq

    try:
        return pq.PQSpec(nsub=args.nsub, opq=args.opq, opq_dim=args.opq_dim if args.opq_dim > 0 else None,
                         sub=train_cli.model_spec_from_args(args))
    except ValueError as e:
        raise cli.UsageError(str(e)) from None


def prepare(args, log=print) -> None:
    from qinco_jax.training import pq
    from qinco_jax.formats.io import save_npy

    if len(args.training_subvectors) != args.nsub:
        raise cli.UsageError(f"--training_subvectors needs {args.nsub} file names (--nsub), "
                             f"got {len(args.training_subvectors)}")
    xt = load_vectors(args, log)
    if args.opq:
        if not args.OPQMatrix:
            raise cli.UsageError("--opq needs --OPQMatrix to store the matrix in")
        A = pq.train_opq(xt, args.nsub, args.opq_dim if args.opq_dim > 0 else None, log)
        save_npy(args.OPQMatrix, A)
        xt = xt @ A.T
    for path, sub in zip(args.training_subvectors, pq.split_subvectors(xt, args.nsub)):
        log(f"writing training sub-vectors {sub.shape} to {path}")
        save_npy(path, sub)


def do_recombine(args, log=print):
    from qinco_jax.training import pq
    from qinco_jax.formats.checkpoint import load_model, save_model

    if not args.in_models or not args.out_model:
        raise cli.UsageError("--recombine needs --in_models and --out_model")
    if len(args.in_models) != args.nsub:
        log(f"note: {len(args.in_models)} models given, --nsub is {args.nsub}: using the models")
    model = pq.recombine([load_model(p) for p in args.in_models], load_opq(args.OPQMatrix) if args.opq else None)
    log(f"storing {model.describe()} to {args.out_model}")
    save_model(model, args.out_model)
    return model


def train_all(args, log=print):
    """One-shot: OPQ, split, train every sub-model, recombine, save (qinco_jax.training.pq.train_pq)."""
    from qinco_jax.training import pq
    from qinco_jax.formats.checkpoint import save_model
    from qinco_jax.formats.io import save_npy
    from qinco_jax.training.loop import validation_mse

    if args.ivf:
        raise cli.UsageError("PQ-QINCo with IVF-QINCo sub-quantizers is not supported (as in the reference)")
    if not args.out_model:
        raise cli.UsageError("one-shot PQ-QINCo training needs --out_model (or use --prepare / --recombine)")
    if args.in_models and len(args.in_models) != args.nsub:
        raise cli.UsageError(f"--in_models needs {args.nsub} names (--nsub) to store the sub-models")
    if args.nt <= args.nval:
        raise cli.UsageError(f"--nt {args.nt} must exceed --nval {args.nval} (the validation vectors are part of nt)")
    spec = pq_spec_from_args(args)
    cfg = train_cli.train_config_from_args(args)
    x = load_vectors(args, log)
    xt, xval = x[:-args.nval], x[-args.nval:]
    try:
        model = pq.train_pq(xt, xval, spec, cfg, sub_model_paths=args.in_models or None,
                            checkpoint_dir=args.checkpoint or None, log=log)
    except ValueError as e:
        if "divisible" in str(e):
            raise cli.UsageError(str(e)) from None
        raise
    if args.opq and args.OPQMatrix:
        save_npy(args.OPQMatrix, model.opq)
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


def run() -> None:
    """Console entry point: bad input ends with one 'error:' line and exit status 2."""
    cli.run_main(main)


if __name__ == "__main__":
    run()
