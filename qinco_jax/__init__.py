"""qinco-jax: QINCo and IVF-QINCo (residual quantization with implicit neural codebooks) in JAX.

Start from:
    qinco_jax.checkpoint.load_model / save_model   reference .pt files and library model directories
    qinco_jax.codec.encode / decode                batched, jitted, numpy in raw units (beam search optional)
    qinco_jax.training.fit                         training, data-parallel over devices, resumable
    qinco_jax.ivf                                  IVF-RQ indexes from a model, QINCo re-ranking search
    qinco_jax.datasets.get_dataset                 the reference's data sets, folders, built-in synthetic data
Modules are imported on use: `import qinco_jax` alone loads nothing heavy.
"""

__version__ = "0.1.0"
