"""The main job (`make demo`): IVF-QINCo against faiss IVF-PQ and IVF-RQ at the same
bytes per vector, on the built-in real descriptors (sift_images) by default.

    qinco-main-job --out runs/demo                 # the demo's recipe
    qinco-main-job --db synthetic_small --epochs 1 --nt 3000 --nval 300 --n_centroids 16

Writes summary.json, pareto.png and centroids.npy to --out and prints the MSE tables
and the recall@1 comparison at equal time. Every flag is a field of
qinco_jax.main_job.MainJobConfig (defaults shown by --help).
"""

from __future__ import annotations

import dataclasses
import typing

from qinco_jax import cli

_ON_OFF = {"on": True, "off": False}


def build_parser():
    from qinco_jax.main_job import MainJobConfig

    p = cli.parser(__doc__.split("\n\n")[0])
    hints = typing.get_type_hints(MainJobConfig)
    for f in dataclasses.fields(MainJobConfig):
        flag, hint = f"--{f.name}", hints[f.name]
        if hint is bool:
            p.add_argument(flag, choices=sorted(_ON_OFF), default="on" if f.default else "off",
                           help="(default: %(default)s)")
        elif typing.get_origin(hint) is tuple:
            p.add_argument(flag, type=int, nargs="+", default=list(f.default), help="(default: %(default)s)")
        elif hint == (float | None):
            p.add_argument(flag, type=float, default=f.default, help="(default: the recipe's)")
        else:
            p.add_argument(flag, type=hint, default=f.default, help="(default: %(default)s)")
    return p


def config_from_args(args):
    from qinco_jax.main_job import MainJobConfig

    values = {}
    for f in dataclasses.fields(MainJobConfig):
        v = getattr(args, f.name)
        values[f.name] = _ON_OFF[v] if isinstance(v, str) and v in _ON_OFF and isinstance(f.default, bool) else v
    try:
        return MainJobConfig(**values)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None


def main(argv=None):
    from qinco_jax import main_job

    args = build_parser().parse_args(argv)
    cli.print_args(args)
    return main_job.run(config_from_args(args), log=lambda msg: print(msg, flush=True))


def run() -> None:
    """Console entry point: bad input ends with one 'error:' line and exit status 2."""
    cli.run_main(main)


if __name__ == "__main__":
    run()
