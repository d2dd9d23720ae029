"""The reference's `search/search_2stage.py` command; the program is `qinco-search-2stage` (qinco_jax.cli.search_2stage)."""

from qinco_jax.cli.search_2stage import run

if __name__ == "__main__":
    run()
