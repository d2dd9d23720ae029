"""Every command-line program answers --help, and every flag it has says what it does."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The reference's script names and the package modules they run.
SCRIPT_MODULES = {
    "train/train_qinco.py": "qinco_jax.cli.train",
    "train/pq_qinco.py": "qinco_jax.cli.train_pq",
    "search/search_ivf.py": "qinco_jax.cli.index",
    "search/search_2stage.py": "qinco_jax.cli.search_2stage",
    "search/eval_qinco.py": "qinco_jax.cli.evaluate",
    "search/plot_results.py": "qinco_jax.cli.plot",
    "convert/codec_qinco.py": "qinco_jax.cli.codec",
    "convert/convert_checkpoint.py": "qinco_jax.cli.convert",
}
SCRIPTS = list(SCRIPT_MODULES)


def _module(rel):
    return importlib.import_module(SCRIPT_MODULES[rel])


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


# The commands of the reference's docs (../shared/seed/IVF_search.md), script path changed only.
SEED_COMMANDS = {
    "search/search_ivf.py": [
        "--todo train_centroids --n_centroids 1048576 --nt 50_000_000 --IVF_centroids models/bigann_centroids_1M_repro.npy",
        "--db bigann10M --model models/bigann_IVF65k_16x8_L2.pt --index index/bigann10M_IVF65k_16x8_L2.faissindex "
        "--index_key IVF65536,RQ16x8_Nqint8",
        "--db bigann10M --model models/bigann_IVF65k_16x8_L2.pt --index index/bigann10M_IVF65k_16x8_L2.faissindex "
        "--todo search --nthread 32",
        "--todo train add --db bigann1B --quantizer_efConstruction 200 --index_key IVF1048576_HNSW32,RQ8x8_Nqint8 "
        "--nt 1000_000 --index index/bigann1B_IVF1M_8x8_L2.faissindex --bs 512",
        "--todo search --db bigann1B --model simple/models/bigann_IVF1M_8x8_L2.pt "
        "--index index/bigann1B_IVF1M_8x8_L2.faissindex --nthread 32 --nshort 10 20 50 100 200 500 1000 2000 "
        "--nprobe 4 8 16 32 64 128 256 512 1024 2048 4096 --quantizer_efSearch 4 8 16 32 64 128 256 512 1024 2048 4096",
    ],
    "train/train_qinco.py": [
        "--ivf --db bigann1M --nt 500_000 --M 8 --L 2 --lr 0.001 --IVF_centroids models/bigann_centroids_65k.npy "
        "--ngpu 8 --model models/test_ivf_train.pt",
    ],
}


@pytest.mark.parametrize("rel,line", [(r, line) for r, lines in SEED_COMMANDS.items() for line in lines])
def test_the_reference_docs_commands_parse(rel, line):
    args = _module(rel).build_parser().parse_args(line.split())
    if "--nthread" in line:
        assert args.nthreads == 32
    if "--nt 1000_000" in line:
        assert args.nt == 1_000_000
    if "--quantizer_efSearch" in line:
        assert args.quantizer_efSearch[-1] == 4096 and args.nshort[-1] == 2000
    if "--ivf" in line:
        assert args.ivf and args.ngpu == 8 and args.nt == 500_000
