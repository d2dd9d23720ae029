"""The reference's `convert/codec_qinco.py` command; the program is `qinco-codec` (qinco_jax.cli.codec)."""

from qinco_jax.cli.codec import run

if __name__ == "__main__":
    run()
