"""`pip install` of a wheel built from the repository gives the library and every
command: the wheel goes into a fresh virtual environment outside the checkout (its
dependencies are those of the running environment, through a .pth file, so nothing is
downloaded), then every console script answers --help and the codec encodes a fixture
from another directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, REFERENCE_MODELS
from test_layout import entry_points

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout[-2000:]}{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    pytest.importorskip("setuptools")  # the build backend, installed by `make test` (the test extra)
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"  # a copy, so that the build leaves nothing in the checkout
    shutil.copytree(ROOT / "qinco_jax", src / "qinco_jax", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", str(tmp / "dist"), str(src)])
    (wheel,) = (tmp / "dist").glob("qinco_jax-*.whl")
    env_dir = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)])
    python = env_dir / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
          str(wheel)])
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "zz_test_dependencies.pth").write_text("\n".join(sorted(deps)) + "\n")
    return env_dir, tmp


def _clean_env():
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def test_the_wheel_installs_the_package_and_not_the_checkout(venv):
    env_dir, tmp = venv
    out = _run([str(env_dir / "bin" / "python"), "-c", "import qinco_jax.cli, qinco_jax.search; "
                "print(qinco_jax.__file__)"], cwd=tmp, env=_clean_env()).stdout
    assert Path(out.strip()).is_relative_to(env_dir)


def test_every_console_script_answers_help(venv):
    env_dir, tmp = venv
    names = sorted(entry_points())
    procs = {name: subprocess.Popen([str(env_dir / "bin" / name), "--help"], cwd=tmp, env=_clean_env(),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in names}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name} --help: {err[-2000:]}"
        assert "usage:" in out and "--" in out, name


def test_the_installed_codec_encodes_a_fixture_from_another_directory(venv):
    from qinco_jax.models import codec
    from qinco_jax.formats.checkpoint import load_model

    env_dir, tmp = venv
    work = tmp / "elsewhere"
    work.mkdir()
    model_path = FIXTURES / REFERENCE_MODELS["qinco"]
    x = np.load(FIXTURES / "reference_outputs.npz")["x"][:50]
    np.save(work / "x.npy", x)
    _run([str(env_dir / "bin" / "qinco-codec"), "--model", str(model_path), "--encode", "--i", "x.npy",
          "--o", "codes.npy"], cwd=work, env=_clean_env())
    np.testing.assert_array_equal(np.load(work / "codes.npy"), codec.encode(load_model(model_path), x))
    bad = subprocess.run([str(env_dir / "bin" / "qinco-codec"), "--model", str(model_path), "--encode",
                          "--decode", "--i", "x.npy", "--o", "c.npy"], cwd=work, env=_clean_env(),
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "exactly one of --encode and --decode" in bad.stderr
