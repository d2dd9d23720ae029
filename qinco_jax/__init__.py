"""qinco-jax: QINCo, IVF-QINCo and QINCo2 (residual quantization with implicit neural
codebooks) in JAX.

The public API is the names below, imported from `qinco_jax` itself; everything else is
reached through its subpackage (`qinco_jax.models`, `.formats`, `.data`, `.training`,
`.search`, `.experiments`, `.cli`) and may move between releases.

Configurations (plain frozen dataclasses):
    QincoConfig       a model's architecture (d, M, K, L, h, QINCo2's de / dh / A / B, IVF)
    PQConfig          a PQ-QINCo model (sub-models after an optional OPQ rotation)
    EncodeOptions     how vectors are encoded: beam, pre-selection, dtype, batch size
    ModelSpec         what to train: the architecture, its initialisation and seed
    TrainConfig       how to train: learning rate, epochs, batch, devices, checkpoints
    PQSpec            what PQ-QINCo trains: parts, OPQ, the sub-models' ModelSpec
    MainJobConfig     the main job (`make demo`): data set, sizes, epochs, sweeps

Models and their files:
    load_model        a reference `.pt` file (v1 or QINCo2) or a library model directory
    save_model        the same formats back (`.pt` when the path ends in `.pt`)
    QincoModel        a QINCo / QINCo2 model: config + parameter pytree (`describe()`)
    PQQincoModel      a PQ-QINCo model
    to_faiss_qinco    a `faiss.QINCo` with the same weights (flat QINCo and QINCo-LR)

Encoding and decoding (numpy in, numpy out, raw units; batched and jitted):
    encode            vectors -> codes (greedy, or beam / pre-selection by EncodeOptions)
    decode            codes -> vectors
    set_matmul_precision   float32 matmul precision of the jitted kernels ("highest" default)

Training:
    train_model       RQ initialisation -> parameters -> the training loop (v1 or QINCo2)
    qinco2_train_config    a TrainConfig with QINCo2's recipe defaults
    train_pq          PQ-QINCo: OPQ, split, one model per part, recombine

Indexes and search:
    QincoIndex        an IVF-QINCo index used like a faiss one: build, add, search, write, read
    explore           the operating-point sweep (nprobe x efSearch x nshort [x nmid_short])
    run_two_stage     flat two-stage search: AQ shortlist, QINCo re-ranking
    PairwiseDecoder   QINCo2's pairwise additive decoder (the three-stage search's middle stage)
    train_pairwise_decoder   an IVF model's pairwise decoder, trained on its codes of xt
    load_pairwise_decoder, save_pairwise_decoder   its file (the reference's), checked against the model

Data and measurements:
    get_dataset       the reference's data sets, a folder of vector files, built-in sets
    Dataset           what get_dataset returns (xt, xb, xq, gt; memory-mapped where it can)
    read_vectors, write_vectors   .npy / .fvecs / .ivecs / .bvecs / .fbin / .ibin / .u8bin
    read_codes        QINCo2's encoded-codes files (`.npz` header + parts)
    evaluate          a model's MSE and recalls on a data set
    mean_squared_error, one_recall_at   the metrics
    run_main_job      the main job: IVF-QINCo(2) against faiss IVF-PQ / IVF-RQ at equal bytes

`import qinco_jax` is cheap: each name is imported from its module on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> (module, attribute in it): the one table of the public API.
_EXPORTS: dict[str, tuple[str, str]] = {
    # configurations
    "QincoConfig": ("qinco_jax.config", "QincoConfig"),
    "PQConfig": ("qinco_jax.config", "PQConfig"),
    "EncodeOptions": ("qinco_jax.config", "EncodeOptions"),
    "ModelSpec": ("qinco_jax.training.recipe", "ModelSpec"),
    "TrainConfig": ("qinco_jax.training.loop", "TrainConfig"),
    "PQSpec": ("qinco_jax.training.pq", "PQSpec"),
    "MainJobConfig": ("qinco_jax.experiments.main_job", "MainJobConfig"),
    # models and their files
    "load_model": ("qinco_jax.formats.checkpoint", "load_model"),
    "save_model": ("qinco_jax.formats.checkpoint", "save_model"),
    "QincoModel": ("qinco_jax.models.qinco", "QincoModel"),
    "PQQincoModel": ("qinco_jax.models.qinco", "PQQincoModel"),
    "to_faiss_qinco": ("qinco_jax.formats.checkpoint", "to_faiss_qinco"),
    # encoding and decoding
    "encode": ("qinco_jax.models.codec", "encode"),
    "decode": ("qinco_jax.models.codec", "decode"),
    "set_matmul_precision": ("qinco_jax.models.codec", "set_matmul_precision"),
    # training
    "train_model": ("qinco_jax.training.recipe", "train_model"),
    "qinco2_train_config": ("qinco_jax.training.loop", "qinco2_train_config"),
    "train_pq": ("qinco_jax.training.pq", "train_pq"),
    # indexes and search
    "QincoIndex": ("qinco_jax.search.qinco_index", "QincoIndex"),
    "explore": ("qinco_jax.search.sweep", "explore"),
    "run_two_stage": ("qinco_jax.search.two_stage", "run_two_stage"),
    "PairwiseDecoder": ("qinco_jax.models.pairwise", "PairwiseDecoder"),
    "train_pairwise_decoder": ("qinco_jax.search.pairwise_stage", "train_for_model"),
    "load_pairwise_decoder": ("qinco_jax.search.pairwise_stage", "load_for_model"),
    "save_pairwise_decoder": ("qinco_jax.models.pairwise", "save_pairwise_decoder"),
    # data and measurements
    "get_dataset": ("qinco_jax.data.datasets", "get_dataset"),
    "Dataset": ("qinco_jax.data.datasets", "Dataset"),
    "read_vectors": ("qinco_jax.formats.vecs_io", "read_vectors"),
    "write_vectors": ("qinco_jax.formats.vecs_io", "write_vectors"),
    "read_codes": ("qinco_jax.formats.code_parts", "read_codes"),
    "evaluate": ("qinco_jax.experiments.evaluation", "evaluate"),
    "mean_squared_error": ("qinco_jax.metrics", "mean_squared_error"),
    "one_recall_at": ("qinco_jax.metrics", "one_recall_at"),
    "run_main_job": ("qinco_jax.experiments.main_job", "run"),
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use (PEP 562), then keep it here."""
    try:
        module, attribute = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'qinco_jax' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ does this lazily
    from qinco_jax.config import EncodeOptions, PQConfig, QincoConfig
    from qinco_jax.data.datasets import Dataset, get_dataset
    from qinco_jax.experiments.evaluation import evaluate
    from qinco_jax.experiments.main_job import MainJobConfig
    from qinco_jax.experiments.main_job import run as run_main_job
    from qinco_jax.formats.checkpoint import load_model, save_model, to_faiss_qinco
    from qinco_jax.formats.code_parts import read_codes
    from qinco_jax.formats.vecs_io import read_vectors, write_vectors
    from qinco_jax.metrics import mean_squared_error, one_recall_at
    from qinco_jax.models.codec import decode, encode, set_matmul_precision
    from qinco_jax.models.pairwise import PairwiseDecoder, save_pairwise_decoder
    from qinco_jax.models.qinco import PQQincoModel, QincoModel
    from qinco_jax.search.pairwise_stage import load_for_model as load_pairwise_decoder
    from qinco_jax.search.pairwise_stage import train_for_model as train_pairwise_decoder
    from qinco_jax.search.qinco_index import QincoIndex
    from qinco_jax.search.sweep import explore
    from qinco_jax.search.two_stage import run_two_stage
    from qinco_jax.training.loop import TrainConfig, qinco2_train_config
    from qinco_jax.training.pq import PQSpec, train_pq
    from qinco_jax.training.recipe import ModelSpec, train_model
