"""The command-line programs (one module each, installed as console scripts) and the
helpers they share. Programs only parse flags, call the library and print.

    qinco-train          qinco_jax.cli.train          train/train_qinco.py
    qinco-train-pq       qinco_jax.cli.train_pq       train/pq_qinco.py
    qinco-codec          qinco_jax.cli.codec          convert/codec_qinco.py
    qinco-convert        qinco_jax.cli.convert        convert/convert_checkpoint.py
    qinco-eval           qinco_jax.cli.evaluate       search/eval_qinco.py
    qinco-index          qinco_jax.cli.index          search/search_ivf.py
    qinco-search-2stage  qinco_jax.cli.search_2stage  search/search_2stage.py
    qinco-plot           qinco_jax.cli.plot           search/plot_results.py

The scripts under train/, search/ and convert/ keep the reference's names and run these.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from qinco_jax.config import PRESELECT_PROXIES


class UsageError(ValueError):
    """A problem with the user's input, reported as one clear line (no traceback)."""


def run_main(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run a CLI entry point; bad input (ValueError, OSError) becomes 'error: ...' and
    exit status 2 instead of a traceback. Set QINCO_TRACEBACK=1 to see the traceback."""
    import os

    try:
        main(argv)
    except (ValueError, OSError, KeyError) as e:
        if os.environ.get("QINCO_TRACEBACK"):
            raise
        prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "qinco"
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every flag's default, except an unset (None) one whose help already says
    what it defaults to: one default per flag, not "(default: 1e-4) (default: None)"."""

    def _get_help_string(self, action):
        if action.default is None and "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parser(description: str) -> argparse.ArgumentParser:
    """An ArgumentParser that shows every flag's default in --help."""
    return argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)


def add_compute_args(group, *, batch_flag: str = "--batch_size", batch_default: int | None = None) -> None:
    group.add_argument(batch_flag, default=batch_default, type=int,
                       help="vectors per jitted batch; unset: sized from the model to bound memory on the device")
    group.add_argument("--device", default="",
                       help="JAX device: 'cpu', 'gpu', 'cuda:N' or 'gpu:N'; empty: JAX's default device")
    group.add_argument("--float16", default=False, action="store_true",
                       help="run the network in float16, like the reference's --float16")
    group.add_argument("--dtype", default="", choices=["", "float32", "float16", "bfloat16"],
                       help="network dtype, overrides --float16 (distances are always float32); empty: float32")


def add_search_args(group) -> None:
    """--beam / --preselect / --proxy: how codes are searched, wherever vectors are encoded
    (see qinco_jax.config.EncodeOptions)."""
    group.add_argument("--beam", default=None, type=int,
                       help="beam size for encoding: 1 = greedy, as the reference; B keeps the B best "
                            "partial codes at every step (lower error, about B times the work); "
                            "unset: the model's default (1)")
    group.add_argument("--preselect", default=None, type=int,
                       help="run the network on only this many codewords per step, pre-selected by a "
                            "cheap proxy of the step (0 = all K, as the reference); unset: the model's default (0)")
    group.add_argument("--proxy", default=None, choices=list(PRESELECT_PROXIES),
                       help="how --preselect ranks codewords; unset: the model's default (linear)")


def add_db_arg(group, default: str = "bigann1M") -> None:
    """--db: a data set name or folder (qinco_jax.data.datasets.get_dataset)."""
    from qinco_jax.data import datasets

    group.add_argument("--db", default=default,
                       help=f"data set: one of {', '.join(datasets.AVAILABLE_NAMES)}, or a folder holding "
                            f"base.*, query.* (and learn.*, gt.*) vector files; files are looked up under "
                            f"$QINCO_DATA (default ./data)")


def load_model_arg(path: str):
    """The --model of a command line (.pt file or model directory), announced on stdout."""
    if not path:
        raise UsageError("--model is required")
    from qinco_jax.formats.checkpoint import load_model as load

    print("loading model", path, flush=True)
    model = load(path)
    print("  ", model.describe(), flush=True)
    return model


def dtype_from_args(args) -> str:
    return args.dtype or ("float16" if getattr(args, "float16", False) else "float32")


def encode_options_from_args(args, batch_size: int | None = None):
    """The EncodeOptions of --beam/--preselect/--proxy and --dtype/--float16 (when the
    program has them); batch_size: the program's encode batch flag."""
    from qinco_jax.config import EncodeOptions

    try:
        return EncodeOptions(beam=args.beam, preselect=args.preselect, proxy=getattr(args, "proxy", None),
                             dtype=dtype_from_args(args) if hasattr(args, "dtype") else "float32",
                             batch_size=batch_size)
    except ValueError as e:
        raise UsageError(str(e)) from None


def select_device(spec: str) -> None:
    """Make `spec` ('cpu', 'gpu', 'cuda:1', ...) JAX's default device."""
    if not spec:
        return
    import jax

    kind, _, index = spec.partition(":")
    platform = {"cuda": "gpu", "gpu": "gpu", "cpu": "cpu", "tpu": "tpu"}.get(kind)
    if platform is None:
        raise UsageError(f"unknown device {spec!r}: use cpu, gpu, cuda:N or gpu:N")
    try:
        devices = jax.devices(platform)
    except RuntimeError as e:
        raise UsageError(f"device {spec!r} is not available here: {e}") from None
    i = int(index or 0)
    if i >= len(devices):
        raise UsageError(f"device {spec!r} does not exist: {len(devices)} {platform} device(s)")
    jax.config.update("jax_default_device", devices[i])


def print_args(args) -> None:
    print("args:", " ".join(f"{k}={v}" for k, v in vars(args).items()), flush=True)
