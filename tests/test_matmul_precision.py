"""The codec's kernels compile their float32 matmuls at the chosen precision."""

import os
import subprocess
import sys

import numpy as np
import pytest

from qinco_jax.models import codec
from qinco_jax.config import QincoConfig
from qinco_jax.models.qinco import QincoModel

CFG = QincoConfig(d=8, K=16, M=3, L=1, h=16, db_scale=10.0)


def _dot_precisions(model):
    x = np.zeros((8, CFG.d), np.float32)
    hlo = codec.encode_batch.lower(codec.network_params(model.params), x, None, np.float32, (1, 0, "linear")).as_text()
    return {line.split("precision = [")[1].split(",")[0] for line in hlo.splitlines() if "dot_general" in line}


def test_kernels_default_to_highest_and_follow_the_setting():
    model = QincoModel.init(CFG, 0)
    assert codec.matmul_precision() == "highest"
    assert _dot_precisions(model) == {"HIGHEST"}
    x = (np.random.RandomState(0).randn(50, CFG.d) * 10).astype(np.float32)
    exact = codec.encode(model, x)
    try:
        codec.set_matmul_precision("default")
        assert _dot_precisions(model) == {"DEFAULT"}
        # on a CPU every precision computes in float32: the same codes
        if codec.backend() == "cpu":
            np.testing.assert_array_equal(codec.encode(model, x), exact)
    finally:
        codec.set_matmul_precision("highest")
    assert _dot_precisions(model) == {"HIGHEST"}


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="unknown matmul precision 'fastest'"):
        codec.set_matmul_precision("fastest")
    assert codec.matmul_precision() == "highest"


def test_unknown_precision_in_the_environment_is_refused_at_import():
    env = dict(os.environ, QINCO_MATMUL_PRECISION="fastest", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", "import qinco_jax.models.codec"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "unknown QINCO_MATMUL_PRECISION 'fastest'" in proc.stderr
