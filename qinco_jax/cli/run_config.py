"""QINCo2's `run.py key=value ...` configuration, as typed frozen dataclasses.

The QINCo2 reference (facebookresearch/Qinco, root `run.py` + `config/`) takes Hydra
overrides: `task=train model_args=qinco2-S db=deep1M M=16 ds.loop=100_000
search.nprobe=[1,4,16] ivf_centroids=null resume=true ...`. `parse_run_args` reads
the same words into a `RunConfig` holding the reference's defaults (written here in
our own words), then the preset named by `model_args` (its values replace the
defaults; the command line's replace both), then the command line.

Values: `null`, `true` / `false` (any case), integers (`10_000` allowed), floats
(`1e-3`, `inf`), lists `[1,4,16]`, quoted strings; a path stays a string. Every key is
typed: a wrong type, an unknown key (with the closest valid key suggested), a key given
twice or a word that is not `key=value` is an error naming it.

What the keys mean is derived, not stored: `resolve_data(cfg)` turns `db=<name>` into
the reference's data files (via qinco_jax.data.datasets, so QINCO_DATA moves them) or keeps
a file path; `index_key(cfg)` expands `${ivf_K}` / `${M}` in search.index_key;
`check_task(cfg)` says what a task still misses.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import typing
from pathlib import Path
from typing import Any, Sequence

TASKS = ("train", "eval", "eval_valset", "eval_time", "encode", "ivf_centroids",
         "train_pairwise_decoder", "build_index", "search", "convert")
SCHEDULERS = ("cosine", "reduce_lr_plateau")
OPTIMIZERS = ("adamw", "adam")
# qinco_jax.models.pairwise.TABLE_DTYPES, spelled out so that this module does not import jax
PAIRWISE_TABLE_DTYPES = ("float32", "float16", "int8")
# precision= (training): the network's dtype; parameters, optimizer and loss stay float32
PRECISIONS = {"fp32": "float32", "bf16": "bfloat16"}


class RunConfigError(ValueError):
    """A run.py argument is wrong: unknown key, bad value, missing requirement."""


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """`scheduler.*`. cosine: linear ramp over ramp_epochs, then cosine decay over
    `epochs`, floor factor lr * lr_min_fact; stop after epochs + stop_patience (see
    qinco2_recipe.CosineSchedule). reduce_lr_plateau (the qinco1 preset): lr *
    reduce_fact after `patience` epochs without a relative improvement of
    threshold_frac, never below lr * lr_min_fact. Both stop early after stop_patience
    epochs without improvement."""

    name: str = "cosine"
    ramp_epochs: float = 3
    lr_min_fact: float = 1e-3
    stop_patience: int = 10
    # reduce_lr_plateau only (the reference defines them in its qinco1 preset only)
    reduce_fact: float = 0.1
    patience: int = 10
    threshold_frac: float = 1e-10


@dataclasses.dataclass(frozen=True)
class DataLimits:
    """`ds.*`: trainset: keep at most this many training vectors (null: all);
    valset: the last valset rows of the training file validate; db: use only the first
    db database vectors (null: all); loop: samples per training epoch, cycling through
    the training set (null or >= its size: all of it every epoch)."""

    trainset: int | None = None
    valset: int = 10_000
    db: int | None = None
    loop: int | None = 10_000_000


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """`search.*`: the large-scale search task's index and operating points;
    batch_size: shortlist entries the model decodes per batch when re-ranking."""

    index_key: str = "IVF${ivf_K}_HNSW32,RQ${M}x8_Nqint8"
    aq_training_samples: int = 1_000_000
    nthreads: int = 32
    batch_size: int = 12288
    nshort: tuple[int, ...] = (4, 10)
    nprobe: tuple[int, ...] = (4,)
    quantizer_efSearch: tuple[int, ...] = (4,)
    nmid_short: tuple[int, ...] = (1, 4)
    # not the reference's: how the three-stage search stores the pairwise tables
    # (qinco_jax.models.pairwise.TABLE_DTYPES; float16 / int8 look up faster); null (default):
    # int8 / float16 when within 0.1 % of float32's MSE (search.pairwise_stage.choose_table_dtype)
    pairwise_table_dtype: str | None = None
    # not the reference's: "faiss" (its IVF-RQ scan) or "jax" (qinco_jax.search.jax_engine);
    # engine_fallback: with "jax", search with faiss if the JAX engine cannot read the index
    engine: str = "faiss"
    engine_fallback: bool = False


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Every key of the reference's qinco_cfg.yaml, with its default.

    Model: M steps (bytes when K=256), K codebook size, L residual blocks, de embedding
    width (null: = data dimension), dh hidden width, A pre-selected candidates per beam
    entry (0: none), B beam size (1: no beam), ivf_K IVF centroids (set from the
    ivf_centroids file when given). null model keys are filled from a loaded model.
    Training: optimizer, lr, wd, grad_clip (by value; 0: none), batch (per device: the global batch is batch x the devices of all processes),
    epochs, grad_accumulate, seed, codebook_noise_init, enc_max_bs, qinco1_mode,
    precision (fp32, or bf16: mixed precision, the network in bfloat16).
    Paths: output, model, tensorboard (a directory for TensorBoard event files of
    task=train), ivf_centroids, index, encoded_db,
    encoded_trainset, pairwise_decoder; data: db (a data-set name or file), trainset,
    queries, queries_gt. mse_scale multiplies reported MSEs (set by the data set).
    ondisk (qinco-jax's): build_index writes the inverted lists to <output>.ivfdata
    beside the .faissindex, memory-mapped at search time; on several processes each
    adds its share of the parts and the shards are merged on disk."""

    task: str | None = None
    cpu: bool = False
    inference: bool = True
    verbose: bool = True
    resume: bool = False
    model_args: str | None = None

    M: int | None = None
    K: int | None = None
    L: int | None = None
    de: int | None = None
    dh: int | None = None
    A: int | None = None
    B: int | None = None
    ivf_K: int | None = None

    optimizer: str = "adamw"
    lr: float = 0.0008
    wd: float = 0.1
    grad_clip: float = 0.1
    batch: int = 1024
    epochs: int = 60
    grad_accumulate: int = 1
    precision: str = "fp32"

    output: str | None = None
    model: str | None = None
    tensorboard: str | None = None
    ivf_centroids: str | None = None
    index: str | None = None
    encoded_db: str | None = None
    encoded_trainset: str | None = None
    pairwise_decoder: str | None = None

    db: str | None = None
    trainset: str | None = None
    queries: str | None = None
    queries_gt: str | None = None
    ds: DataLimits = DataLimits()

    encode_trainset: bool = False
    n_pairwise_codebooks: int = 2
    # qinco-jax's: table entries sum / (count + this); 0 = the reference's means; null (default):
    # chosen on held-out training rows (qinco_jax.models.pairwise.choose_shrinkage)
    pairwise_shrinkage: float | None = None
    ondisk: bool = False  # qinco-jax's: build_index puts the inverted lists in <output>.ivfdata (faiss on-disk)
    allow_model_mismatch: bool = False  # qinco-jax's: task=search with a model that did not make index= (expert)

    seed: int = 0
    qinco1_mode: bool | None = None
    codebook_noise_init: float = 0.1
    enc_max_bs: int = 65536
    ivf_in_use: bool | None = None
    mse_scale: float = 1.0

    scheduler: SchedulerConfig = SchedulerConfig()
    search: SearchConfig = SearchConfig()

    @property
    def uses_ivf(self) -> bool:
        """The reference sets ivf_in_use when IVF centroids are given."""
        return bool(self.ivf_in_use or self.ivf_centroids)

    def describe(self) -> str:
        model = " ".join(f"{k}={getattr(self, k)}" for k in ("M", "K", "L", "de", "dh", "A", "B")
                         if getattr(self, k) is not None)
        return f"task={self.task} {model}".strip()


# The reference's model_args presets (config/model_args/*.yaml), as dotted overrides.
_QINCO2_SIZES = {"S": (2, 128, 256), "M": (4, 384, 384), "L": (16, 384, 384)}
PRESETS: dict[str, dict[str, Any]] = {
    **{f"qinco2-{size}": {"L": L, "de": de, "dh": dh, "A": 16, "B": 32, "M": 8, "K": 256, "ivf_K": 1 << 20}
       for size, (L, de, dh) in _QINCO2_SIZES.items()},
    # QINCo (v1) trained as in its paper: Adam, no beam / pre-selection, plateau schedule
    "qinco1": {"L": 16, "de": None, "dh": 256, "A": 0, "B": 1, "M": 8, "K": 256, "ivf_K": 1 << 20,
               "optimizer": "adam", "lr": 0.0001, "wd": 0.0, "grad_clip": 0.0, "batch": 1024, "epochs": 60,
               "qinco1_mode": True, "scheduler.name": "reduce_lr_plateau", "scheduler.lr_min_fact": 0.01,
               "scheduler.reduce_fact": 0.1, "scheduler.patience": 10, "scheduler.threshold_frac": 1e-10,
               "scheduler.ramp_epochs": 3, "scheduler.stop_patience": 20},
}

# The reference's named data sets: the library's data-set name, the MSE scale it
# reports in, and whether the database is cut to the data set's size (its 1M sets
# read the first million vectors of the billion-vector files).
_NAMED_DATA = {
    "bigann1M": ("bigann1M", 1e-4, True),
    "bigann1B": ("bigann1B", 1e-4, False),
    "deep1M": ("deep1M", 1.0, True),
    "deep1B": ("deep1B", 1.0, False),
    "FB_ssnpp1M": ("FB_ssnpp1M", 1e-4, False),
    "contriever1M": ("Contriever1M", 1.0, False),
    "sift_images": ("sift_images", 1e-4, False),  # qinco-jax's built-in SIFT set (the main job's)
}
DATASET_NAMES = tuple(_NAMED_DATA)


# --------------------------------------------------------------------------------------
# Keys and values
# --------------------------------------------------------------------------------------

_SECTIONS = {"ds": DataLimits, "scheduler": SchedulerConfig, "search": SearchConfig}


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def valid_keys() -> dict[str, Any]:
    """Every settable dotted key and its type."""
    out = {}
    for name, tp in _field_types(RunConfig).items():
        if name in _SECTIONS:
            out.update({f"{name}.{sub}": t for sub, t in _field_types(_SECTIONS[name]).items()})
        else:
            out[name] = tp
    return out


_INT = re.compile(r"[+-]?\d+(_\d+)*")
_FLOAT = re.compile(r"[+-]?((\d+(_\d+)*)?\.\d+(_\d+)*|\d+(_\d+)*\.?)([eE][+-]?\d+)?")


def parse_value(text: str) -> Any:
    """A Hydra override value: null, bool, int, float, [list], 'quoted' or a string."""
    t = text.strip()
    if t.lower() == "null":
        return None
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    if _INT.fullmatch(t):
        return int(t.replace("_", ""))
    if _FLOAT.fullmatch(t) or t.lower().lstrip("+-") in ("inf", "nan"):
        return float(t.replace("_", ""))
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "'\"":
        return t[1:-1]
    if t.startswith("[") and t.endswith("]"):
        inner = t[1:-1].strip()
        return [parse_value(v) for v in inner.split(",")] if inner else []
    return t


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """value as the field's type, or a RunConfigError naming key and expectation."""
    args = typing.get_args(tp)
    optional = type(None) in args
    if value is None:
        if optional:
            return None
        raise RunConfigError(f"{key} cannot be null")
    base = next((a for a in args if a is not type(None)), tp) if args and optional else tp
    origin = typing.get_origin(base)
    if origin is tuple:
        items = value if isinstance(value, list) else [value]
        return tuple(_coerce(f"{key}[{i}]", v, typing.get_args(base)[0]) for i, v in enumerate(items))
    if base is bool:
        if isinstance(value, bool):
            return value
        raise RunConfigError(f"{key} must be true or false, got {value!r}")
    if base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise RunConfigError(f"{key} must be an integer{' or null' if optional else ''}, got {value!r}")
    if base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise RunConfigError(f"{key} must be a number, got {value!r}")
    if base is str:
        if isinstance(value, list):
            raise RunConfigError(f"{key} must be a string{' or null' if optional else ''}, got {value!r}")
        return value if isinstance(value, str) else str(value)
    raise AssertionError(f"unhandled type {tp} for {key}")


def _unknown_key(key: str) -> RunConfigError:
    keys = list(valid_keys())
    close = [k for k in keys if k.lower() == key.lower()]  # a wrong case
    close = close or [k for k in keys if k.startswith(key)]  # a truncated key
    close = close or difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return RunConfigError(f"unknown key {key!r}{hint} (valid keys: {', '.join(keys)})")


def _is_str_key(tp) -> bool:
    return tp is str or str in typing.get_args(tp)


def _apply(cfg: RunConfig, key: str, value: Any, text: str | None = None) -> RunConfig:
    """cfg with key set; `text` is the command line's word, kept verbatim for string
    keys (output=1e3 names the file "1e3", not "1000.0")."""
    types = valid_keys()
    if key not in types:
        raise _unknown_key(key)
    if text is not None and _is_str_key(types[key]) and value is not None and not isinstance(value, list):
        value = value if isinstance(value, str) and text.strip()[:1] in "'\"" else text.strip()
    value = _coerce(key, value, types[key])
    if "." in key:
        section, sub = key.split(".", 1)
        return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{sub: value})})
    return dataclasses.replace(cfg, **{key: value})


# The keys each task reads (beside ANY_TASK_KEYS); a key given on the command line that
# its task does not read is an error naming it, never silently ignored.
ANY_TASK_KEYS = ("task", "cpu", "verbose", "inference", "seed", "mse_scale", "model_args")
_MODEL_FILE_KEYS = ("model", "M", "K", "L", "de", "dh", "A", "B", "ivf_K", "qinco1_mode", "ivf_in_use",
                    "ivf_centroids")  # a model task checks these against the file
_TRAINSET_KEYS = ("db", "trainset", "ds.trainset", "ds.valset")
TASK_KEYS: dict[str, tuple[str, ...]] = {
    "train": (*_MODEL_FILE_KEYS, *_TRAINSET_KEYS, "output", "resume", "tensorboard", "precision", "optimizer", "lr", "wd", "grad_clip",
              "batch", "epochs", "grad_accumulate", "ds.loop", "codebook_noise_init",
              *(f"scheduler.{f.name}" for f in dataclasses.fields(SchedulerConfig))),
    "eval": (*_MODEL_FILE_KEYS, "db", "ds.db", "enc_max_bs"),
    "eval_time": (*_MODEL_FILE_KEYS, "db", "ds.db", "enc_max_bs"),
    "eval_valset": (*_MODEL_FILE_KEYS, *_TRAINSET_KEYS),
    "encode": (*_MODEL_FILE_KEYS, *_TRAINSET_KEYS, "output", "encode_trainset", "ds.db", "enc_max_bs"),
    "ivf_centroids": (*_TRAINSET_KEYS, "ivf_K", "output"),
    "train_pairwise_decoder": (*_TRAINSET_KEYS, "ivf_centroids", "ivf_K", "encoded_trainset", "output", "K", "M",
                               "model", "n_pairwise_codebooks", "pairwise_shrinkage", "allow_model_mismatch"),
    "build_index": (*_TRAINSET_KEYS, "ivf_centroids", "ivf_K", "encoded_trainset", "encoded_db", "output", "K", "M",
                    "model", "ds.db", "search.index_key", "search.aq_training_samples", "ondisk"),
    "search": (*_MODEL_FILE_KEYS, "db", "queries", "queries_gt", "ds.db", "enc_max_bs", "index", "pairwise_decoder",
               "output", "resume", "allow_model_mismatch",
               *(f"search.{f.name}" for f in dataclasses.fields(SearchConfig))),
    "convert": ("model", "output", "db"),
}
assert set(TASK_KEYS) == set(TASKS)


def check_keys_used(task: str | None, given: Sequence[str]) -> None:
    """A RunConfigError naming the keys of the command line that `task` does not read."""
    if task not in TASK_KEYS:
        return
    unused = [k for k in given if k not in ANY_TASK_KEYS and k not in TASK_KEYS[task]]
    if unused:
        raise RunConfigError(f"task={task} does not use {', '.join(unused)}: remove "
                             f"{'it' if len(unused) == 1 else 'them'} (keys of task={task}: "
                             f"{', '.join(TASK_KEYS[task])})")


def parse_run_args(argv: Sequence[str]) -> RunConfig:
    """`key=value` words (run.py's command line, program name excluded) -> RunConfig."""
    overrides: dict[str, Any] = {}
    for word in argv:
        if word.startswith(("+", "~")):
            raise RunConfigError(f"{word!r}: Hydra's +key / ~key forms are not supported; use key=value")
        key, sep, text = word.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RunConfigError(f"{word!r} is not key=value (e.g. task=train, M=8, ds.loop=100_000)")
        if key in overrides:
            raise RunConfigError(f"{key} is given twice")
        if key not in valid_keys():
            raise _unknown_key(key)
        overrides[key] = (parse_value(text), text)

    cfg = RunConfig()
    preset = overrides.get("model_args", (None,))[0]
    if preset is not None:
        if preset not in PRESETS:
            raise RunConfigError(f"unknown model_args {preset!r}: use one of {', '.join(PRESETS)}")
        for key, value in PRESETS[preset].items():
            cfg = _apply(cfg, key, value)
    for key, (value, text) in overrides.items():
        cfg = _apply(cfg, key, value, text)
    if "ivf_centroids" in overrides and "ivf_K" not in overrides:
        # the centroids file decides how many IVF lists there are, not a preset's ivf_K
        cfg = dataclasses.replace(cfg, ivf_K=None)
    check_values(cfg)
    check_keys_used(cfg.task, list(overrides))
    return cfg


def check_values(cfg: RunConfig) -> None:
    """Values that cannot be right whatever the task."""
    if cfg.task is not None and cfg.task not in TASKS:
        raise RunConfigError(f"unknown task {cfg.task!r}: use one of {', '.join(TASKS)}")
    if cfg.optimizer.lower() not in OPTIMIZERS:
        raise RunConfigError(f"unknown optimizer {cfg.optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
    if cfg.scheduler.name not in SCHEDULERS:
        raise RunConfigError(f"unknown scheduler.name {cfg.scheduler.name!r}: use one of {', '.join(SCHEDULERS)}")
    positive = {"M": cfg.M, "K": cfg.K, "dh": cfg.dh, "B": cfg.B, "ivf_K": cfg.ivf_K, "batch": cfg.batch,
                "grad_accumulate": cfg.grad_accumulate, "ds.valset": cfg.ds.valset,
                "search.batch_size": cfg.search.batch_size}
    for key, v in positive.items():
        if v is not None and v < 1:
            raise RunConfigError(f"{key} must be >= 1, got {v}")
    non_negative = {"L": cfg.L, "de": cfg.de, "A": cfg.A, "epochs": cfg.epochs, "ds.trainset": cfg.ds.trainset,
                    "ds.db": cfg.ds.db, "ds.loop": cfg.ds.loop, "enc_max_bs": cfg.enc_max_bs,
                    "scheduler.stop_patience": cfg.scheduler.stop_patience,
                    "scheduler.ramp_epochs": cfg.scheduler.ramp_epochs, "pairwise_shrinkage": cfg.pairwise_shrinkage}
    for key, v in non_negative.items():
        if v is not None and v < 0:
            raise RunConfigError(f"{key} must be >= 0, got {v}")
    for key in ("lr", "wd", "grad_clip", "codebook_noise_init", "mse_scale"):
        v = getattr(cfg, key)
        if not (math.isfinite(v) and v >= 0) or (key in ("lr", "mse_scale") and v == 0):
            raise RunConfigError(f"{key} must be a finite number {'> 0' if key in ('lr', 'mse_scale') else '>= 0'}, "
                                 f"got {v}")
    if cfg.A and cfg.K and cfg.A > cfg.K:
        raise RunConfigError(f"A={cfg.A} pre-selected candidates cannot exceed K={cfg.K} codewords")
    for key in ("nshort", "nprobe", "quantizer_efSearch", "nmid_short"):
        if any(v < 1 for v in getattr(cfg.search, key)):
            raise RunConfigError(f"search.{key} values must be >= 1, got {list(getattr(cfg.search, key))}")
    if cfg.search.engine not in ("faiss", "jax"):
        raise RunConfigError(f"unknown search.engine {cfg.search.engine!r}: use faiss or jax")
    if cfg.precision not in PRECISIONS:
        raise RunConfigError(f"unknown precision {cfg.precision!r}: use one of {', '.join(PRECISIONS)}")
    if cfg.search.pairwise_table_dtype is not None and cfg.search.pairwise_table_dtype not in PAIRWISE_TABLE_DTYPES:
        raise RunConfigError(f"unknown search.pairwise_table_dtype {cfg.search.pairwise_table_dtype!r}: "
                             f"use one of {', '.join(PAIRWISE_TABLE_DTYPES)}")


# --------------------------------------------------------------------------------------
# Derived values
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DataFiles:
    """What `db` and the data keys resolve to. name: the reference data-set name, or
    None for files; db_limit: database vectors to use (None: all); mse_scale."""

    name: str | None
    db: str | None
    trainset: str | None
    queries: str | None
    queries_gt: str | None
    db_limit: int | None
    mse_scale: float


def resolve_data(cfg: RunConfig) -> DataFiles:
    """The reference's data-set presets: `db=<name>` (bigann1M, bigann1B, deep1M,
    deep1B, FB_ssnpp1M, contriever1M; and the built-in sift_images) sets db, trainset, queries and queries_gt to that
    data set's files (under $QINCO_DATA, default ./data, as qinco_jax.data.datasets lays
    them out; like the reference, they replace any trainset / queries given), cuts the
    database to the data set's size for the 1M sets and sets the MSE scale. Any other
    db is a vector file path, used with the trainset / queries keys as given."""
    limit = cfg.ds.db
    if cfg.db in _NAMED_DATA:
        from qinco_jax.data import datasets

        lib_name, scale, cut = _NAMED_DATA[cfg.db]
        ds = datasets.get_dataset(lib_name)
        if cut:
            limit = min(limit or ds.nb, ds.nb)
        path = lambda role: os.fspath(ds.path_of(role))  # noqa: E731
        return DataFiles(cfg.db, path("base"), path("train"), path("query"), path("gt"), limit, scale)
    if cfg.db is not None and not os.path.exists(cfg.db) and not _looks_like_a_path(cfg.db):
        close = difflib.get_close_matches(cfg.db, DATASET_NAMES, n=1)
        hint = f" (did you mean db={close[0]}?)" if close else ""
        raise RunConfigError(f"db={cfg.db} is neither a data-set name nor an existing file{hint}: "
                             f"data-set names are {', '.join(DATASET_NAMES)}; a file is .npy, .fvecs, .bvecs, "
                             ".fbin or .u8bin")
    return DataFiles(None, cfg.db, cfg.trainset, cfg.queries, cfg.queries_gt, limit, cfg.mse_scale)


def _looks_like_a_path(db: str) -> bool:
    """A db= value meant as a file (one to be read later, perhaps not there yet): it
    has a folder or a suffix. A bare word is meant as a data-set name."""
    return os.sep in db or "/" in db or bool(os.path.splitext(db)[1])


_INTERP = re.compile(r"\$\{([A-Za-z_][\w.]*)\}")


def index_key(cfg: RunConfig, **known: int) -> str:
    """search.index_key with ${key} replaced by the config's value (e.g. ${ivf_K},
    ${M}); `known` supplies values read elsewhere (ivf_K from the centroids file, M
    from the model) for keys the command line left null."""

    def sub(m):
        key = m.group(1)
        if key in known:
            return str(known[key])
        if key not in valid_keys():
            raise RunConfigError(f"search.index_key refers to unknown key ${{{key}}}")
        section, _, sub_key = key.partition(".")
        value = getattr(getattr(cfg, section), sub_key) if sub_key else getattr(cfg, key)
        if value is None:
            raise RunConfigError(f"search.index_key needs {key}, which is null: set {key}=...")
        return str(value)

    return _INTERP.sub(sub, cfg.search.index_key)


_OUTPUT_SUFFIX = {"train": ".pt", "train_pairwise_decoder": ".pt", "ivf_centroids": ".npy", "encode": ".npz",
                  "build_index": ".faissindex", "convert": ".pt"}
_MODEL_KEYS = ("L", "dh", "M", "K", "A", "B")


def missing_for_task(cfg: RunConfig) -> list[str]:
    """What the task still needs, one message per missing requirement ([] when ready).
    A model file given with `model=` (or resume=true and an existing output) supplies
    the model keys; `db=<name>` supplies trainset, queries and queries_gt."""
    if cfg.task is None:
        return [f"task is required: task=<{'|'.join(TASKS)}>"]
    task, need = cfg.task, []
    data = resolve_data(cfg)
    suffix = _OUTPUT_SUFFIX.get(task)
    if suffix and not cfg.output:
        need.append(f"task={task} needs output=<file{suffix}>")
    elif suffix and not cfg.output.endswith(suffix):
        need.append(f"task={task} writes a {suffix} file: output={cfg.output} must end with {suffix}")
    if task == "search" and cfg.index and cfg.output and not cfg.output.endswith(".json"):
        need.append(f"task=search writes its results as JSON: output={cfg.output} must end with .json")
    has_model = cfg.model is not None or (cfg.resume and cfg.output is not None and Path(cfg.output).exists())
    if task == "train":
        if not has_model:
            need += [f"task=train needs {k}=... (or model_args=<{'|'.join(PRESETS)}>, or model=<file.pt> "
                     f"to resume)" for k in _MODEL_KEYS if getattr(cfg, k) is None]
    elif task in ("eval", "eval_valset", "eval_time", "encode", "search", "convert"):
        if cfg.model is None:
            need.append(f"task={task} needs model=<file.pt>")
    needs_trainset = task in ("train", "eval_valset", "ivf_centroids", "train_pairwise_decoder", "build_index") \
        or (task == "encode" and cfg.encode_trainset)
    if needs_trainset and not data.trainset:
        need.append(f"task={task} needs trainset=<vector file> or db=<{'|'.join(DATASET_NAMES)}>")
    if task in ("eval", "eval_time") or (task == "encode" and not cfg.encode_trainset):
        if not data.db:
            need.append(f"task={task} needs db=<vector file or {'|'.join(DATASET_NAMES)}>")
    if task in ("train_pairwise_decoder", "build_index"):
        if not cfg.ivf_centroids:
            need.append(f"task={task} needs ivf_centroids=<file.npy>")
        if not cfg.encoded_trainset:
            need.append(f"task={task} needs encoded_trainset=<file.npz> (task=encode encode_trainset=true)")
    if task == "build_index" and not cfg.encoded_db:
        need.append("task=build_index needs encoded_db=<file.npz> (task=encode)")
    if task == "ivf_centroids" and cfg.ivf_K is None:
        need.append("task=ivf_centroids needs ivf_K=<number of centroids>")
    if task == "search":
        if not cfg.index and not data.db:
            need.append("task=search needs index=<file.faissindex> (large-scale search) or db=... "
                        "(search the fully decoded database)")
        if not (data.queries and data.queries_gt):
            need.append(f"task=search needs queries=... and queries_gt=... or db=<{'|'.join(DATASET_NAMES)}>")
    if task == "convert" and cfg.db not in ("bigann1M", "deep1M", "contriever1M", "FB_ssnpp1M",
                                            "bigann1B", "deep1B"):
        need.append("task=convert needs db=<bigann1M|deep1M|contriever1M|FB_ssnpp1M> (its normalisation)")
    return need


def check_task(cfg: RunConfig) -> None:
    """Raise a RunConfigError listing everything the task misses."""
    need = missing_for_task(cfg)
    if need:
        raise RunConfigError("; ".join(need))
