"""qinco-jax: QINCo and IVF-QINCo (residual quantization with implicit neural codebooks) in JAX.

Start from:
    qinco_jax.formats.checkpoint.load_model / save_model   reference .pt files and library model directories
    qinco_jax.models.codec.encode / decode                batched, jitted, numpy in raw units (config.EncodeOptions)
    qinco_jax.training.recipe.train_model                   training from data: RQ init -> parameters -> training.fit
    qinco_jax.training.pq.train_pq                          PQ-QINCo: OPQ, split, per-part training, recombine
    qinco_jax.search.QincoIndex                    an IVF-QINCo index used like faiss (build, add, search)
    qinco_jax.search.sweep / two_stage             operating-point sweeps, flat two-stage search
    qinco_jax.experiments.evaluation.evaluate                  a model's MSE and recalls on a data set
    qinco_jax.data.datasets.get_dataset                 the reference's data sets, folders, built-in synthetic data
    qinco_jax.cli                                  the qinco-* commands
Modules are imported on use: `import qinco_jax` alone loads nothing heavy.
"""

__version__ = "0.1.0"
