"""The reference's `convert/convert_checkpoint.py` command; the program is `qinco-convert` (qinco_jax.cli.convert)."""

from qinco_jax.cli.convert import run

if __name__ == "__main__":
    run()
