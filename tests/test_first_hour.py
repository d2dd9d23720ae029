"""What a new user met in the first hour (issue 22, items 3-7): each now works or says
what is going on. (Items 3-6 have their tests beside the code they exercise:
test_search3 (run.py tasks without K=), test_main_job (synthetic_small, never worse
than the start), test_device_check (the venv's python), test_provenance (settings kept
by write / read).)"""

from __future__ import annotations

import sys

import pytest

from conftest import FIXTURES
from qinco_jax.cli import main_job as main_job_cli
from qinco_jax.cli import run as run_cli
from qinco_jax.cli import run_config
from qinco_jax.cli import train as train_cli
from qinco_jax.cli import train_pq as train_pq_cli
from qinco_jax.formats import checkpoint
from qinco_jax.formats.torch_pickle import CheckpointError


def _help(parser) -> str:
    return " ".join(parser.format_help().split())


def test_train_qinco_help_gives_one_default_per_flag_and_explains_max_epochs():
    text = _help(train_cli.build_parser())
    lr = text.split("--lr LR")[-1].split("--max_epochs")[0]
    assert lr.count("default") == 1 and "1e-4" in lr and "8e-4" in lr and "None" not in lr
    epochs = text.split("--max_epochs MAX_EPOCHS")[-1].split("--wd")[0]
    assert "not a hard cap" in epochs and "--stop_patience" in epochs and "up to 14" in epochs


def test_train_pq_says_nval_is_part_of_nt():
    text = _help(train_pq_cli.build_parser())
    nval = text.split("--nval NVAL")[-1].split("--db_scale")[0]
    assert "part of --nt" in nval and "additional" not in nval
    assert "in addition" in _help(train_cli.build_parser()).split("--nval NVAL")[-1].split("--db_scale")[0]


def test_main_job_init_lists_its_choices():
    parser = main_job_cli.build_parser()
    assert "--init {rq_exact,random}" in _help(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--init", "zeros"])


def test_run_help_calls_itself_by_its_invoked_name(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/qinco-run", "--help"])
    run_cli.main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: qinco-run") and "example: qinco-run task=eval" in out
    monkeypatch.setattr(sys, "argv", ["run.py", "--help"])
    run_cli.main(["--help"])
    assert capsys.readouterr().out.startswith("usage: run.py")


def test_run_db_typo_lists_the_data_set_names():
    with pytest.raises(run_config.RunConfigError, match=r"db=sift_image is neither.*did you mean db=sift_images\?.*"
                       r"bigann1M.*sift_images"):
        run_config.resolve_data(run_config.parse_run_args(["db=sift_image"]))
    # a path (maybe written later) is still taken as a file
    assert run_config.resolve_data(run_config.parse_run_args(["db=data/x.fvecs"])).db == "data/x.fvecs"


def test_a_pairwise_decoder_given_as_a_model_says_what_it_is():
    path = FIXTURES / "qinco2" / "pairwise_decoder_ivf64_K16.pt"
    with pytest.raises(CheckpointError, match=r"is a pairwise decoder .* not a model: give it as --pairwise_decoder"):
        checkpoint.load_model(path)
