"""QINCo2's command line: `python run.py task=<task> key=value ...` (also `qinco-run`).

The words are QINCo2's Hydra overrides (qinco_jax.cli.run_config: its keys, defaults and
model_args presets); the task runs from the module that owns it, imported only when
asked for, so each task's dependencies load with it:

    train, eval_valset                         qinco_jax.cli.qinco2_train
    eval, eval_time, encode, ivf_centroids, convert   qinco_jax.cli.qinco2_tasks
    train_pairwise_decoder, build_index, search       qinco_jax.cli.qinco2_search

A task is the function of that name, `task(cfg: RunConfig, log=print)`. `cpu=true` runs
JAX on the CPU. An unknown key, value or task is an error naming it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable

from qinco_jax import cli
from qinco_jax.cli.run_config import TASKS, RunConfig, RunConfigError, parse_run_args, valid_keys

TASK_MODULES = {
    "train": "qinco_jax.cli.qinco2_train",
    "eval_valset": "qinco_jax.cli.qinco2_train",
    "eval": "qinco_jax.cli.qinco2_tasks",
    "eval_time": "qinco_jax.cli.qinco2_tasks",
    "encode": "qinco_jax.cli.qinco2_tasks",
    "ivf_centroids": "qinco_jax.cli.qinco2_tasks",
    "convert": "qinco_jax.cli.qinco2_tasks",
    "train_pairwise_decoder": "qinco_jax.cli.qinco2_search",
    "build_index": "qinco_jax.cli.qinco2_search",
    "search": "qinco_jax.cli.qinco2_search",
}
assert set(TASK_MODULES) == set(TASKS), "every run_config task needs a module"


def task_function(name: str) -> Callable[..., object]:
    """The function that runs task `name`, imported on demand."""
    if name not in TASK_MODULES:
        raise RunConfigError(f"unknown task {name!r}: use one of {', '.join(TASK_MODULES)}")
    module_name = TASK_MODULES[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise  # a missing dependency of the module: say which
        raise RunConfigError(f"task={name} is not available: its module {module_name} is not installed") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise RunConfigError(f"task={name} is not available: {module_name} defines no {name}()")
    return fn


def use_cpu() -> None:
    """Run JAX on the CPU (cpu=true), before any computation picks a backend."""
    import jax

    jax.config.update("jax_platforms", "cpu")


def program_name() -> str:
    """How the user called this program: `qinco-run` (the installed command) by that
    name, `python run.py` (or any .py / python -m) as run.py."""
    name = os.path.basename(sys.argv[0] if sys.argv and sys.argv[0] else "")
    return name if name and not name.endswith(".py") else "run.py"


def build_parser() -> argparse.ArgumentParser:
    """The --help of run.py (its arguments are key=value words, parsed by run_config)."""
    keys = ", ".join(valid_keys())
    prog = program_name()
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="QINCo2's tasks, with QINCo2's key=value arguments (defaults: its config/qinco_cfg.yaml; "
                    "model_args=<qinco1|qinco2-S|qinco2-M|qinco2-L> presets).",
        epilog=f"tasks: {', '.join(TASK_MODULES)}\nkeys: {keys}\n"
               f"example: {prog} task=eval model=model.pt db=deep1M A=16 B=32 (default values: see run_config)\n"
               "batch is per device, as in the reference: task=train's global batch is batch x the devices of "
               "all processes\n(several processes: started by a launcher setting JAX_COORDINATOR_ADDRESS, "
               "JAX_NUM_PROCESSES, JAX_PROCESS_ID, or SLURM / Open MPI)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="task=<task> and any keys (default: none)")
    return p


def main(argv: list[str] | None = None) -> object:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        build_parser().print_help()
        return None
    cfg: RunConfig = parse_run_args(argv)
    if cfg.task is None:
        raise RunConfigError(f"task is required: task=<{'|'.join(TASK_MODULES)}>")
    fn = task_function(cfg.task)
    if cfg.cpu:
        use_cpu()
    print(f"====================== RUNNING TASK {cfg.task}")
    result = fn(cfg, log=print)
    print("Task done")
    return result


def run() -> None:
    """Console entry point (qinco-run): bad input ends with one 'error:' line, status 2."""
    cli.run_main(main)


if __name__ == "__main__":
    run()
