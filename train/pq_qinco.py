"""The reference's `train/pq_qinco.py` command; the program is `qinco-train-pq` (qinco_jax.cli.train_pq)."""

from qinco_jax.cli.train_pq import run

if __name__ == "__main__":
    run()
