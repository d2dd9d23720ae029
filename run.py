"""QINCo2's `python run.py task=... key=value ...` (see qinco_jax/cli/run.py)."""
from qinco_jax.cli.run import run

if __name__ == "__main__":
    run()
