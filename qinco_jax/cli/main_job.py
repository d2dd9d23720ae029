"""The main job (`make demo`): IVF-QINCo and IVF-QINCo2 against faiss IVF-PQ and IVF-RQ at the same
bytes per vector, on the built-in real descriptors (sift_images) by default.

    qinco-main-job --out runs/demo                 # the demo's recipe
    qinco-main-job --db synthetic_small --epochs 1 --nt 3000 --nval 300 --n_centroids 16

Writes summary.json, pareto.png, centroids.npy and the trained models with their indexes
(ivf_qinco.pt + ivf_qinco.faissindex, ivf_qinco2.*) to --out and prints the MSE tables
and the recall@1 comparison at equal time. Every flag is a field of
qinco_jax.experiments.main_job.MainJobConfig (defaults shown by --help).
"""

from __future__ import annotations

import dataclasses
import typing

from qinco_jax import cli

_ON_OFF = {"on": True, "off": False}

HELP = {
    "db": "data set: sift_images (built-in real descriptors), synthetic, synthetic_small, bigann1M, ...",
    "out": "folder for summary.json, pareto.png, centroids.npy, the models (.pt) and their indexes (.faissindex)",
    "n_centroids": "IVF centroids (k-means), shared by every method",
    "kmeans_niter": "k-means iterations of the IVF centroids",
    "M": "bytes per vector of every method (M codes of 8 bits)",
    "nt": "training vectors (QINCo, PQ, RQ); with nval, cut in proportion to a data set that has fewer",
    "nval": "validation vectors held out after the nt training vectors",
    "L": "IVF-QINCo residual blocks per step",
    "h": "IVF-QINCo hidden dimension",
    "epochs": "IVF-QINCo training epochs",
    "lr": "IVF-QINCo learning rate",
    "batch_size": "training batch size",
    "init": "rq_exact: start exactly at the IVF-RQ baseline's error; random: the reference's initialisation",
    "train_preselect": "candidates pre-selected per step in the training encode (0: all K)",
    "encode_beam": "beam of the IVF-QINCo and IVF-QINCo2 database encodes",
    "encode_preselect": "candidates pre-selected per step in the database encode (0: all K)",
    "aq_train": "training vectors whose QINCo codes fit the AQ shortlist codebooks",
    "aq_fit": "decoded: AQ shortlist codebooks fitted to the model's reconstructions of the aq_train training codes "
              "and the database codes, norm range from the stored norms; reference: fitted to the aq_train training "
              "vectors, norm range from the AQ errors (the reference's index)",
    "rq_beam": "beam of the IVF-RQ baseline (training and database encode)",
    "nprobe": "IVF lists visited: the search sweep of every method",
    "nshort": "shortlist lengths re-ranked by QINCo (IVF-QINCo sweep, x nprobe)",
    "val_queries": "held-out vectors searched as validation queries: each IVF-QINCo(2) is searched on the test "
                   "queries at the operating points chosen on them (its Pareto front's points that beat both "
                   "baselines at equal time); 0: every swept point",
    "search_threads": "faiss threads while searching, the same for every method (0: all cores)",
    "jax_engine": "also search each IVF-QINCo index with the JAX engine (qinco_jax.search.jax_engine), "
                  "all queries in one batch: the same shortlists, its own curve",
    "build_threads": "faiss threads while building (k-means, PQ, RQ; 0: all cores, which spin on a busy machine)",
    "qinco2": "also train and search IVF-QINCo2 (QINCo2's training recipe, from the same RQ start)",
    "qinco2_L": "IVF-QINCo2 residual blocks per step",
    "qinco2_h": "IVF-QINCo2 hidden dimension",
    "qinco2_de": "IVF-QINCo2 embedding dimension",
    "qinco2_A": "IVF-QINCo2 candidates pre-selected per step by its substep codebook",
    "qinco2_B": "IVF-QINCo2 beam while training (the database is encoded with --encode_beam)",
    "qinco2_epochs": "IVF-QINCo2 training epochs",
    "qinco2_lr": "IVF-QINCo2 learning rate",
    "seed": "training seed of both QINCo models, added to the recipe's (0: the published run)",
    "progress": "progress bars",
}


def build_parser():
    from qinco_jax.experiments.main_job import MainJobConfig

    p = cli.parser(__doc__.split("\n\n")[0])
    hints = typing.get_type_hints(MainJobConfig)
    for f in dataclasses.fields(MainJobConfig):
        flag, hint = f"--{f.name}", hints[f.name]
        if hint is bool:
            p.add_argument(flag, choices=sorted(_ON_OFF), default="on" if f.default else "off", help=HELP[f.name])
        elif typing.get_origin(hint) is tuple:
            p.add_argument(flag, type=int, nargs="+", default=list(f.default), help=HELP[f.name])
        elif f.name == "init":
            from qinco_jax.experiments.main_job import INITS

            p.add_argument(flag, choices=INITS, default=f.default, help=HELP[f.name])
        elif f.name == "aq_fit":
            from qinco_jax.experiments.main_job import AQ_FITS

            p.add_argument(flag, choices=AQ_FITS, default=f.default, help=HELP[f.name])
        elif hint == (float | None):
            p.add_argument(flag, type=float, default=f.default, help=HELP[f.name])
        else:
            p.add_argument(flag, type=hint, default=f.default, help=HELP[f.name])
    return p


def config_from_args(args):
    from qinco_jax.experiments.main_job import MainJobConfig

    values = {}
    for f in dataclasses.fields(MainJobConfig):
        v = getattr(args, f.name)
        values[f.name] = _ON_OFF[v] if isinstance(v, str) and v in _ON_OFF and isinstance(f.default, bool) else v
    try:
        return MainJobConfig(**values)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None


def main(argv=None):
    from qinco_jax.experiments import main_job

    args = build_parser().parse_args(argv)
    cli.print_args(args)
    return main_job.run(config_from_args(args), log=lambda msg: print(msg, flush=True))


def run() -> None:
    """Console entry point: bad input ends with one 'error:' line and exit status 2."""
    cli.run_main(main)


if __name__ == "__main__":
    run()
