"""The reference's `search/search_ivf.py` command; the program is `qinco-index` (qinco_jax.cli.index)."""

from qinco_jax.cli.index import run

if __name__ == "__main__":
    run()
