"""The reference's `train/train_qinco.py` command; the program is `qinco-train` (qinco_jax.cli.train)."""

from qinco_jax.cli.train import run

if __name__ == "__main__":
    run()
