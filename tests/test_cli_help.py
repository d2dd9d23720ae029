"""Every command-line program answers --help, and every flag it has says what it does."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["train/train_qinco.py", "train/pq_qinco.py", "search/search_ivf.py", "search/search_2stage.py",
           "search/eval_qinco.py", "search/plot_results.py", "convert/codec_qinco.py",
           "convert/convert_checkpoint.py"]


def _module(rel):
    spec = importlib.util.spec_from_file_location(Path(rel).stem + "_help", ROOT / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("rel", SCRIPTS)
def test_every_flag_is_explained(rel):
    parser = _module(rel).build_parser()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 8, f"{rel}: {action.option_strings} has no help"
    text = parser.format_help()
    assert "default" in text


def test_help_runs_as_a_program():
    out = subprocess.run([sys.executable, str(ROOT / "search/search_ivf.py"), "--help"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and "--nprobe" in out.stdout and "--xb_codes" in out.stdout
