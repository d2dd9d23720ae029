"""QINCo2's `run.py` tasks eval, eval_time, encode, ivf_centroids and convert
(`python run.py task=<name> key=value ...`, see qinco_jax.cli.run).

Each task is `task(cfg: RunConfig, log=print)`: it checks what it needs, calls the library
and prints what the reference prints (its MSE lines, file names); it returns what it
computed (for tests and drivers).

- eval: the model's MSE on the database (the first ds.db rows), at the model's own A/B or
  the command line's, times mse_scale (set by a named data set), as the reference's eval
  task reports it: mean over vectors of the squared L2 error in raw units. eval_time also
  prints the encoding / decoding time per vector.
- encode: codes of the database (or of the training + validation vectors with
  encode_trainset=true) in the reference's `.npz` header + `.part_<i>.npz` format
  (qinco_jax.formats.code_parts). Launched on several processes (a cluster launcher that sets up
  `jax.distributed`, or QINCO_PROCESS_INDEX / QINCO_PROCESS_COUNT set per process), each
  process encodes its block of rows and writes its own part.
- ivf_centroids: faiss k-means (100 iterations) of ivf_K centroids on the training
  vectors, saved as a .npy (float32, raw units).
- convert: the reference's convert upgrades QINCo2 checkpoints saved before its release
  (no `parameters`, per-block projections) with per-data-set normalisation constants it
  hard-codes; those files are not published. Here it converts a model between the formats
  qinco-jax reads and writes: any model file (reference .pt of QINCo or QINCo2, or a
  qinco-jax model directory) to `output` (.pt: the reference's format; else a directory).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import numpy as np

from qinco_jax import distributed
from qinco_jax.cli.run_config import RunConfig, RunConfigError, check_task, resolve_data
from qinco_jax.config import EncodeOptions
from qinco_jax.data import training_set
from qinco_jax.experiments.evaluation import reconstruction_error
from qinco_jax.formats import checkpoint
from qinco_jax.formats.code_parts import CodeFileHeader, encode_to_parts
from qinco_jax.formats.io import save_npy
from qinco_jax.logs import Log, quiet
from qinco_jax.models import codec
from qinco_jax.models.qinco import QincoModel


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def with_folder_data(cfg: RunConfig) -> RunConfig:
    """db=<folder> (base.*, learn.*, query.*, gt.* files, as qinco_jax.data.datasets reads a
    folder) replaced by its files: db = the base file, and trainset / queries / queries_gt
    from the folder where the command line leaves them unset."""
    if not (cfg.db and os.path.isdir(cfg.db)):
        return cfg
    from qinco_jax.data import datasets

    ds = datasets.folder_dataset(cfg.db)

    def path(role):
        p = ds.path_of(role)
        return os.fspath(p) if p is not None and p.exists() else None

    return dataclasses.replace(cfg, db=path("base"), trainset=cfg.trainset or path("train"),
                               queries=cfg.queries or path("query"), queries_gt=cfg.queries_gt or path("gt"))


def read_vector_file(path: str | None, role: str) -> np.ndarray:
    """A vector file named by a run.py key, memory-mapped; a clear error if it is not given or missing."""
    try:
        return training_set.read_vector_file(path, role)
    except FileNotFoundError:
        raise
    except ValueError as e:
        raise RunConfigError(str(e)) from None


def read_ivf_centroids(cfg: RunConfig, d: int | None = None) -> np.ndarray:
    """The centroids of ivf_centroids= (float32, raw units), of dimension d when given."""
    if not cfg.ivf_centroids:
        raise RunConfigError(f"task={cfg.task} needs ivf_centroids=<file.npy>")
    try:
        return training_set.read_ivf_centroids(cfg.ivf_centroids, d=d)
    except FileNotFoundError:
        raise
    except ValueError as e:
        raise RunConfigError(f"ivf_centroids={cfg.ivf_centroids}: {e}") from None


def split_training_file(cfg: RunConfig) -> tuple[np.ndarray, np.ndarray]:
    """(training, validation) memory-mapped views of the training file, split as the
    reference splits it (training_set.split_validation: the last ds.valset rows
    validate, at most ds.trainset of the others train)."""
    path = resolve_data(cfg).trainset
    read_vector_file(path, "training")  # no file given / missing: the error names the role
    try:
        return training_set.read_training_split(path, cfg.ds.valset, cfg.ds.trainset)
    except ValueError as e:
        raise RunConfigError(str(e)) from None


def database_vectors(cfg: RunConfig, log: Log = print) -> np.ndarray:
    """The database (a memory map): db= a named data set or a vector file, cut to its
    first ds.db rows (the 1M data sets: to a million)."""
    data = resolve_data(cfg)
    log(f"Loading database from {data.db}")
    xb = read_vector_file(data.db, "database")
    limit = min(data.db_limit or len(xb), len(xb))
    if limit < len(xb):
        log(f"Will use only {limit} elements from the database")
    return xb[:limit]


def training_vectors(cfg: RunConfig, log: Log = print) -> tuple[np.ndarray, np.ndarray]:
    """(training, validation) vectors as the reference splits its training file: the last
    ds.valset rows validate, the first ds.trainset of the others train."""
    log(f"Loading training data from {resolve_data(cfg).trainset}")
    xt, xval = split_training_file(cfg)
    log(f"Split into {len(xt)} training vectors and {len(xval)} validation vectors")
    return xt, xval


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------

# run.py keys that describe the model, and how a loaded model answers them
_MODEL_KEYS = {"M": lambda c: c.M, "K": lambda c: c.K, "L": lambda c: c.L, "dh": lambda c: c.h,
               "de": lambda c: c.de or c.d, "ivf_K": lambda c: c.K_IVF if c.is_ivf else None,
               "qinco1_mode": lambda c: c.qinco1_mode}


def load_model(cfg: RunConfig, log: Log = print) -> QincoModel:
    """The model of model=, checked against the model keys the command line gives (the
    reference fills null keys from the file; a different value cannot load)."""
    model = checkpoint.load_model(cfg.model)
    if not isinstance(model, QincoModel):
        raise RunConfigError(f"model={cfg.model} is a {model.describe()}; QINCo2's tasks take QINCo / QINCo2 models")
    c = model.config
    for key, of_model in _MODEL_KEYS.items():
        given = getattr(cfg, key)
        if key == "de" and given == 0:
            given = c.d
        if key == "ivf_K" and not c.is_ivf:
            continue  # the reference reads ivf_K only for IVF models (the presets set it for all)
        if given is not None and given != of_model(c):
            raise RunConfigError(f"{key}={given} given, but model={cfg.model} has {key}={of_model(c)}")
    if cfg.A and c.is_qinco2 and not c.has_substep:
        raise RunConfigError(f"A={cfg.A}: model={cfg.model} was trained with A=0 (no substep codebooks), "
                             "it cannot pre-select candidates; use A=0")
    if cfg.ivf_centroids:
        _check_ivf_centroids(cfg, model)
    log(f"Model: {model.describe()}")
    return model


def _check_ivf_centroids(cfg: RunConfig, model: QincoModel) -> None:
    """ivf_centroids= with a model task must be the model's own (the file holds them)."""
    from qinco_jax.search.index import ivf_centroids

    if not model.config.is_ivf:
        raise RunConfigError(f"ivf_centroids={cfg.ivf_centroids} given, but model={cfg.model} is not an IVF model")
    given = read_ivf_centroids(cfg)
    own = ivf_centroids(model)
    if given.shape != own.shape or not np.allclose(given, own, rtol=1e-4, atol=1e-4 * float(np.abs(own).max())):
        raise RunConfigError(f"ivf_centroids={cfg.ivf_centroids} ({given.shape}) are not the IVF centroids of "
                             f"model={cfg.model} ({own.shape}); leave ivf_centroids unset, the model holds them")


def encode_options(cfg: RunConfig, model: QincoModel) -> EncodeOptions:
    """A (pre-selected candidates) and B (beam) from the command line, else the model's."""
    beam, preselect, proxy = codec.model_encode_defaults(model)
    if cfg.A is not None:
        preselect = cfg.A
        proxy = "substep" if cfg.A and model.config.has_substep else proxy
    return EncodeOptions(beam=cfg.B if cfg.B is not None else beam, preselect=preselect, proxy=proxy)


# --------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------


def eval(cfg: RunConfig, log: Log = print) -> dict:  # noqa: A001 - the reference's task name
    """MSE of the model on the database (see the module docstring)."""
    cfg = with_folder_data(cfg)
    check_task(cfg)
    model = load_model(cfg, log)
    opts = encode_options(cfg, model)
    xb = database_vectors(cfg, log)
    mse_scale = resolve_data(cfg).mse_scale
    log(f"Test set: {xb.shape}; encoding with A={opts.preselect} B={opts.beam}")
    if xb.shape[1] != model.d:
        raise RunConfigError(f"the database vectors have dimension {xb.shape[1]}, model={cfg.model} encodes {model.d}")
    measured = reconstruction_error(model, xb, opts, batch_size=max(1, cfg.enc_max_bs))
    mse, t_encode, t_decode = measured.mse * mse_scale, measured.t_encode, measured.t_decode
    log(f"Test metrics: MSE={mse:g}")
    result = {"mse": mse, "n": int(len(xb)), "A": opts.preselect, "B": opts.beam, "mse_scale": mse_scale,
              "t_encode": t_encode, "t_decode": t_decode}
    if cfg.task == "eval_time":
        log(f"Encoding time: {t_encode:.3f} s | Decoding time: {t_decode:.3f} s")
        log(f"Encoding time / vector: {t_encode / len(xb) * 1e6:.1f}μs")
        log(f"Decoding time / vector: {t_decode / len(xb) * 1e6:.1f}μs")
    return result


eval_time = eval


def encode(cfg: RunConfig, log: Log = print) -> Path:
    """Codes of the database or training set in the reference's part files."""
    cfg = with_folder_data(cfg)
    check_task(cfg)
    try:
        slot = distributed.process_slot()  # before any JAX computation (jax.distributed)
    except ValueError as e:
        raise RunConfigError(str(e)) from None
    index, count = slot.index, slot.count
    model = load_model(cfg, log)
    opts = encode_options(cfg, model)
    if cfg.encode_trainset:
        xt, xval = training_vectors(cfg, log)
        vectors = training_set.ConcatenatedRows(xt, xval)
        log(f"Training + validation sets: {vectors.shape}")
    else:
        vectors = database_vectors(cfg, log)
        log(f"Database: {vectors.shape}")
    if vectors.shape[1] != model.d:
        raise RunConfigError(f"the vectors have dimension {vectors.shape[1]}, model={cfg.model} encodes {model.d}")
    c = model.config
    header = CodeFileHeader(n_parts=count, K=c.K, M=c.M, D=model.d)
    width = c.M + 1 if c.is_ivf else c.M
    log(f"Encoding {len(vectors)} vectors using {count} process(es), A={opts.preselect} B={opts.beam}")
    t0 = time.perf_counter()
    part = encode_to_parts(cfg.output, vectors, lambda x: codec.encode(model, x, opts), width=width,
                           header=header, process_index=index, process_count=count,
                           batch_size=max(1, cfg.enc_max_bs), barrier=slot.barrier, log=log if cfg.verbose else quiet)
    log(f"Stored codes part {index} in {part} ({time.perf_counter() - t0:.1f} s); header: {cfg.output}")
    return part


def ivf_centroids(cfg: RunConfig, log: Log = print) -> np.ndarray:
    """k-means IVF centroids of ivf_K on the training vectors, saved to output (.npy)."""
    from qinco_jax.search.index import train_ivf_centroids
    from qinco_jax.training.streaming import kmeans_sample

    cfg = with_folder_data(cfg)
    check_task(cfg)
    xt, _ = training_vectors(cfg, log)
    log(f"Training set: {xt.shape}; k-means with {cfg.ivf_K} centroids")
    # only the rows faiss's k-means samples are read from the (memory-mapped) file
    centroids = train_ivf_centroids(kmeans_sample(xt, cfg.ivf_K), cfg.ivf_K, niter=100, verbose=cfg.verbose)
    log(f"Storing IVF centroids to {cfg.output}")
    save_npy(cfg.output, np.asarray(centroids, dtype=np.float32))
    return centroids


def convert(cfg: RunConfig, log: Log = print) -> None:
    """model= (any model file qinco-jax reads) written to output= (see the docstring)."""
    if not cfg.model or not cfg.output:
        raise RunConfigError("task=convert needs model=<model file> and output=<file.pt or model directory>")
    if Path(cfg.model).is_file():
        from qinco_jax.formats import torch_pickle

        obj = torch_pickle.load_pt(cfg.model)
        if isinstance(obj, dict) and "model" in obj and "parameters" not in obj and "data_dim" not in obj:
            raise RunConfigError(
                f"model={cfg.model} is a QINCo2 checkpoint from before the reference's release (no "
                "'parameters'); the reference's convert upgrades those with normalisation constants of its "
                "own data sets, which qinco-jax does not carry. Convert it with the QINCo2 code first.")
    model = checkpoint.load_model(cfg.model)
    log(f"Model: {model.describe()}")
    checkpoint.save_model(model, cfg.output)
    log(f"Saving model to {cfg.output}")
