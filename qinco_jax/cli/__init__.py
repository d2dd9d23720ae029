"""Small helpers shared by the command-line programs in train/, search/ and convert/."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

import jax


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


def parser(description: str) -> argparse.ArgumentParser:
    """An ArgumentParser that shows every flag's default in --help."""
    return argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)


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
    """--beam / --preselect: how codes are searched (issue 6), wherever vectors are encoded."""
    group.add_argument("--beam", default=1, type=int,
                       help="beam size for encoding: 1 = greedy, as the reference; B keeps the B best "
                            "partial codes at every step (lower error, about B times the work)")
    group.add_argument("--preselect", default=0, type=int,
                       help="run the network on only this many codewords per step, pre-selected by a "
                            "cheap linear proxy of the step (0 = all K, as the reference)")


def add_db_arg(group, default: str = "bigann1M") -> None:
    """--db: a data set name or folder (qinco_jax.datasets.get_dataset)."""
    from qinco_jax import datasets

    group.add_argument("--db", default=default,
                       help=f"data set: one of {', '.join(datasets.AVAILABLE_NAMES)}, or a folder holding "
                            f"base.*, query.* (and learn.*, gt.*) vector files; files are looked up under "
                            f"$QINCO_DATA (default ./data)")


def load_model(path: str):
    """The --model of a command line (.pt file or model directory), announced on stdout."""
    if not path:
        raise UsageError("--model is required")
    from qinco_jax.checkpoint import load_model as load

    print("loading model", path, flush=True)
    model = load(path)
    print("  ", model.describe(), flush=True)
    return model


def dtype_from_args(args) -> str:
    return args.dtype or ("float16" if args.float16 else "float32")


def select_device(spec: str) -> None:
    """Make `spec` ('cpu', 'gpu', 'cuda:1', ...) JAX's default device."""
    if not spec:
        return
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
