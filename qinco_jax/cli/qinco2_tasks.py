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
from typing import Callable

import numpy as np

from qinco_jax.formats import checkpoint
from qinco_jax.models import codec
from qinco_jax.formats import vecs_io
from qinco_jax.formats.code_parts import CodeFileHeader, encode_to_parts
from qinco_jax.config import EncodeOptions
from qinco_jax.formats.io import save_npy
from qinco_jax.models.qinco import QincoModel
from qinco_jax.cli.run_config import RunConfig, RunConfigError, check_task, resolve_data

Log = Callable[[str], None]

# Set per process to split an encode over processes started without jax.distributed
# (any launcher that numbers its processes); both or neither.
PROCESS_INDEX_ENV, PROCESS_COUNT_ENV = "QINCO_PROCESS_INDEX", "QINCO_PROCESS_COUNT"


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
    if not path:
        raise RunConfigError(f"no {role} file given")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{role} file {path} not found")
    return vecs_io.read_vectors(path, mmap=True)


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
    path = resolve_data(cfg).trainset
    log(f"Loading training data from {path}")
    xt = read_vector_file(path, "training")
    nval = cfg.ds.valset
    if nval > len(xt) // 2:
        raise RunConfigError(f"ds.valset={nval} validation vectors is more than half of the {len(xt)} "
                             f"vectors of {path}: lower ds.valset")
    xt, xval = xt[:-nval], xt[-nval:]
    ntrain = min(cfg.ds.trainset or len(xt), len(xt))
    log(f"Split into {ntrain} training vectors and {len(xval)} validation vectors")
    return xt[:ntrain], xval


class _Rows:
    """Rows of several arrays end to end, sliced without copying them all (the encoded
    training set is the training vectors then the validation vectors)."""

    def __init__(self, *arrays: np.ndarray):
        self.arrays = arrays
        self.shape = (sum(len(a) for a in arrays), arrays[0].shape[1])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(len(self))
        out, offset = [], 0
        for a in self.arrays:
            lo, hi = max(start - offset, 0), min(stop - offset, len(a))
            if lo < hi:
                out.append(np.asarray(a[lo:hi]))
            offset += len(a)
        return np.concatenate(out) if out else np.zeros((0, self.shape[1]), np.float32)


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
    given = np.load(cfg.ivf_centroids)
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


def _chunks(n: int, size: int):
    for i0 in range(0, n, size):
        yield i0, min(n, i0 + size)


def eval(cfg: RunConfig, log: Log = print) -> dict:  # noqa: A001 - the reference's task name
    """MSE of the model on the database (see the module docstring)."""
    cfg = with_folder_data(cfg)
    check_task(cfg)
    model = load_model(cfg, log)
    opts = encode_options(cfg, model)
    xb = database_vectors(cfg, log)
    mse_scale = resolve_data(cfg).mse_scale
    log(f"Test set: {xb.shape}; encoding with A={opts.preselect} B={opts.beam}")
    total, t_encode, t_decode = 0.0, 0.0, 0.0
    for i0, i1 in _chunks(len(xb), max(1, cfg.enc_max_bs)):
        x = np.asarray(xb[i0:i1], dtype=np.float32)
        t0 = time.perf_counter()
        codes = codec.encode(model, x, opts)
        t1 = time.perf_counter()
        xhat = codec.decode(model, codes)
        t2 = time.perf_counter()
        total += float(np.sum((x.astype(np.float64) - xhat) ** 2))
        t_encode, t_decode = t_encode + t1 - t0, t_decode + t2 - t1
    mse = total / len(xb) * mse_scale
    log(f"Test metrics: MSE={mse:g}")
    result = {"mse": mse, "n": int(len(xb)), "A": opts.preselect, "B": opts.beam, "mse_scale": mse_scale,
              "t_encode": t_encode, "t_decode": t_decode}
    if cfg.task == "eval_time":
        log(f"Encoding time: {t_encode:.3f} s | Decoding time: {t_decode:.3f} s")
        log(f"Encoding time / vector: {t_encode / len(xb) * 1e6:.1f}μs")
        log(f"Decoding time / vector: {t_decode / len(xb) * 1e6:.1f}μs")
    return result


eval_time = eval


def process_slot() -> tuple[int, int, Callable[[str], None] | None]:
    """(index, count, barrier) of this encoding process: from QINCO_PROCESS_INDEX /
    QINCO_PROCESS_COUNT when set, else from jax.distributed (started here when a cluster
    launcher's variables are present, as `--distributed` does for training; the barrier
    waits for every process), else (0, 1). Call it before any JAX computation."""
    env_i, env_n = os.environ.get(PROCESS_INDEX_ENV), os.environ.get(PROCESS_COUNT_ENV)
    if (env_i is None) != (env_n is None):
        raise RunConfigError(f"set both {PROCESS_INDEX_ENV} and {PROCESS_COUNT_ENV}, or neither")
    if env_i is not None:
        try:
            index, count = int(env_i), int(env_n)
        except ValueError:
            raise RunConfigError(f"{PROCESS_INDEX_ENV}={env_i!r} and {PROCESS_COUNT_ENV}={env_n!r} must be "
                                 "integers") from None
        if not 0 <= index < count:
            raise RunConfigError(f"{PROCESS_INDEX_ENV}={index} must lie in [0, {PROCESS_COUNT_ENV}={count})")
        return index, count, None
    import jax

    if _launched_on_several_processes() and not jax.distributed.is_initialized():
        # JAX reads the coordinator's address from JAX_COORDINATOR_ADDRESS itself; the
        # process count and id come from the launcher (SLURM, Open MPI) or, with a bare
        # coordinator address, from JAX_NUM_PROCESSES / JAX_PROCESS_ID.
        def env_int(name):
            v = os.environ.get(name)
            if v is not None and not v.isdigit():
                raise RunConfigError(f"{name}={v!r} must be a non-negative integer")
            return None if v is None else int(v)

        jax.distributed.initialize(num_processes=env_int("JAX_NUM_PROCESSES"), process_id=env_int("JAX_PROCESS_ID"))
    if jax.process_count() == 1:
        return 0, 1, None
    from jax.experimental import multihost_utils

    return jax.process_index(), jax.process_count(), multihost_utils.sync_global_devices


def _launched_on_several_processes() -> bool:
    """Whether a cluster launcher that jax.distributed.initialize() understands started
    this process as one of several (SLURM, Open MPI, or JAX's own coordinator variables)."""
    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(var, "1").isdigit() and int(os.environ.get(var, "1")) > 1:
            return True
    return "JAX_COORDINATOR_ADDRESS" in os.environ


def encode(cfg: RunConfig, log: Log = print) -> Path:
    """Codes of the database or training set in the reference's part files."""
    cfg = with_folder_data(cfg)
    check_task(cfg)
    index, count, barrier = process_slot()  # before any JAX computation (jax.distributed)
    model = load_model(cfg, log)
    opts = encode_options(cfg, model)
    if cfg.encode_trainset:
        xt, xval = training_vectors(cfg, log)
        vectors = _Rows(xt, xval)
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
                           batch_size=max(1, cfg.enc_max_bs), barrier=barrier, log=log if cfg.verbose else _quiet)
    log(f"Stored codes part {index} in {part} ({time.perf_counter() - t0:.1f} s); header: {cfg.output}")
    return part


def _quiet(_msg: str) -> None:
    pass


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
