"""Shared test helpers: where the fixtures are, the reference outputs, optional torch."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"

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
