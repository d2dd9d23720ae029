"""Training on several processes: JAX's multi-process runtime started from the
launcher's environment.

A cluster launcher starts one process per machine (or per GPU group) with either JAX's
own coordinator variables (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)
or SLURM / Open MPI's, which `jax.distributed.initialize()` reads itself. After
`start_from_environment()`, the training loop's mesh spans the devices of every
process; each process reads only its own rows of every global batch (loop.BatchFeeder).
"""

from __future__ import annotations

import os


def launched_on_several_processes() -> bool:
    """Whether a launcher that jax.distributed.initialize() understands started this
    process as one of several (SLURM, Open MPI, or JAX's coordinator variables)."""
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


def start_from_environment() -> int:
    """Start jax.distributed when a launcher's variables say this process is one of
    several (once; call it before any JAX computation). Returns the number of processes.
    With a bare coordinator address the count and this process's id come from
    JAX_NUM_PROCESSES / JAX_PROCESS_ID."""
    import jax

    if launched_on_several_processes() and not jax.distributed.is_initialized():
        jax.distributed.initialize(num_processes=_env_int("JAX_NUM_PROCESSES"),
                                   process_id=_env_int("JAX_PROCESS_ID"))
    return jax.process_count()
