"""The reference's `search/eval_qinco.py` command; the program is `qinco-eval` (qinco_jax.cli.evaluate)."""

from qinco_jax.cli.evaluate import run

if __name__ == "__main__":
    run()
