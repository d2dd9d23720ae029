"""Running on several processes: `jax.distributed` start-up and this process's slot.

Two ways to run one job on several processes:
- a cluster launcher that `jax.distributed.initialize()` understands (SLURM, Open MPI,
  or JAX's own JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES / JAX_PROCESS_ID):
  `start()` joins the processes (`required=True` where the user asked for it, e.g.
  `train_qinco.py --distributed`; otherwise only when such a launcher is detected);
- for embarrassingly parallel work (encoding a database by blocks), any launcher that
  numbers its processes: QINCO_PROCESS_INDEX / QINCO_PROCESS_COUNT set per process,
  no coordinator needed (`process_slot`).

Call these before any JAX computation: JAX fixes its backend on first use.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

# Set per process to split work over processes started without jax.distributed; both or neither.
PROCESS_INDEX_ENV, PROCESS_COUNT_ENV = "QINCO_PROCESS_INDEX", "QINCO_PROCESS_COUNT"


def launched_on_several_processes() -> bool:
    """Whether a cluster launcher that jax.distributed.initialize() understands started
    this process as one of several (SLURM, Open MPI, or JAX's own coordinator variables)."""
    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        value = os.environ.get(var, "1")
        if value.isdigit() and int(value) > 1:
            return True
    return "JAX_COORDINATOR_ADDRESS" in os.environ


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is not None and not value.isdigit():
        raise ValueError(f"{name}={value!r} must be a non-negative integer")
    return None if value is None else int(value)


def start(required: bool = False) -> bool:
    """Join this process to the others of its job with jax.distributed.initialize():
    always when `required`, else only when a cluster launcher started several processes.
    JAX reads the coordinator's address from JAX_COORDINATOR_ADDRESS itself; the process
    count and id come from the launcher or, with a bare coordinator address, from
    JAX_NUM_PROCESSES / JAX_PROCESS_ID. Returns whether jax.distributed is running
    (started here or before)."""
    import jax

    if jax.distributed.is_initialized():
        return True
    if not (required or launched_on_several_processes()):
        return False
    jax.distributed.initialize(num_processes=_env_int("JAX_NUM_PROCESSES"), process_id=_env_int("JAX_PROCESS_ID"))
    return True


@dataclasses.dataclass(frozen=True)
class ProcessSlot:
    """This process's share of a job: process `index` of `count`; `barrier(name)` waits
    for every process (None when there is nothing to wait for)."""

    index: int = 0
    count: int = 1
    barrier: Callable[[str], None] | None = None


def process_slot() -> ProcessSlot:
    """This process's slot: from QINCO_PROCESS_INDEX / QINCO_PROCESS_COUNT when set
    (no barrier), else from jax.distributed (started here when a launcher's variables are
    present; the barrier waits for every process), else the only process."""
    env_i, env_n = os.environ.get(PROCESS_INDEX_ENV), os.environ.get(PROCESS_COUNT_ENV)
    if (env_i is None) != (env_n is None):
        raise ValueError(f"set both {PROCESS_INDEX_ENV} and {PROCESS_COUNT_ENV}, or neither")
    if env_i is not None:
        try:
            index, count = int(env_i), int(env_n)
        except ValueError:
            raise ValueError(f"{PROCESS_INDEX_ENV}={env_i!r} and {PROCESS_COUNT_ENV}={env_n!r} must be "
                             "integers") from None
        if not 0 <= index < count:
            raise ValueError(f"{PROCESS_INDEX_ENV}={index} must lie in [0, {PROCESS_COUNT_ENV}={count})")
        return ProcessSlot(index, count)
    start()
    import jax

    if jax.process_count() == 1:
        return ProcessSlot()
    from jax.experimental import multihost_utils

    return ProcessSlot(jax.process_index(), jax.process_count(), multihost_utils.sync_global_devices)
