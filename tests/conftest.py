"""Shared test helpers: where the fixtures are, the reference outputs, optional torch."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"


def _share_compilations() -> None:
    """One persistent XLA compilation cache for this test session: the tests build many
    identical programs (the same tiny models and batch shapes, each `fit` jitting its step
    afresh, every subprocess compiling what the last one did). XLA compiles each once; the
    cache stores exactly the executable a fresh compile would give, so no test sees a
    different program. A fresh directory per session (removed at exit): nothing carries over
    from another checkout or jax version. Environment variables, so that the subprocesses
    the tests start (which inherit them) share it too. No size limit: with one, jax rescans
    the whole directory at every write. (Of concurrent processes, only a jax.distributed
    run's process 0 writes; a reader meeting a half-written entry fails to decompress it,
    which jax reports as a warning before compiling the program itself.)"""
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:  # the caller chose one
        return
    cache = tempfile.mkdtemp(prefix="qinco-jax-test-xla-cache-")
    atexit.register(shutil.rmtree, cache, ignore_errors=True)
    settings = {"jax_compilation_cache_dir": cache, "jax_persistent_cache_min_compile_time_secs": 0.0,
                "jax_persistent_cache_min_entry_size_bytes": 0}
    os.environ.update({name.upper(): str(value) for name, value in settings.items()})
    if "jax" in sys.modules:  # imported before this file: its config has read the environment already
        import jax

        for name, value in settings.items():
            jax.config.update(name, value)


_share_compilations()

# The reference models in tests/fixtures, by their key prefix in reference_outputs.npz.
REFERENCE_MODELS = {
    "qinco": "qinco_d32_M4_K16_L2_h32.pt",
    "qinco_lr": "qinco_lr_d32_M4_K16_L2_h32.pt",
    "ivf_qinco": "ivf_qinco_d32_IVF64_M4_K256_L1_h32.pt",
    "pq_qinco": "pq_qinco_2x_d16_M3_K16_L1_h16_opq.pt",
}


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@functools.lru_cache(maxsize=None)
def load_reference_outputs() -> dict[str, np.ndarray]:
    """reference_outputs.npz as a dict: `x` and `<model>_codes`, `<model>_decoded`."""
    with np.load(FIXTURES / "reference_outputs.npz") as f:
        return {k: f[k] for k in f.files}


def require_torch():
    """Import torch, or skip the test; with QINCO_REQUIRE_TORCH=1 a missing torch fails."""
    if os.environ.get("QINCO_REQUIRE_TORCH") == "1":
        import torch  # noqa: F401  (ImportError fails the test)

        return torch
    return pytest.importorskip("torch")
