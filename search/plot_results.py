"""The reference's `search/plot_results.py` command; the program is `qinco-plot` (qinco_jax.cli.plot)."""

from qinco_jax.cli.plot import run

if __name__ == "__main__":
    run()
