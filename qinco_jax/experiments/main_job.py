"""The main job (`make demo`): IVF-QINCo against what a user would otherwise pick at the
same code size, faiss IVF-PQ and IVF-RQ, on the same IVF centroids, on real descriptors.

    from qinco_jax.experiments.main_job import MainJobConfig, run
    summary = run(MainJobConfig(out="runs/demo"))

Stages: data set (built on first use) -> k-means IVF centroids -> IVF-QINCo training
(exact-RQ initialisation: training starts at the RQ's error) -> IVF-QINCo index (AQ
shortlist fitted to the model's reconstructions of its codes, `aq_fit`, + QINCo
re-ranking), IVF-PQ and IVF-RQ indexes -> every method swept over nprobe (x nshort) on
validation queries, each IVF-QINCo(2)'s operating points chosen there
(`choose_operating_points`) -> the test queries searched by the baselines' sweeps and at
those points (faiss's scan, and the JAX engine in one batch) -> MSE table,
`summary.json`, `pareto.png` in `out`, and the figures beside the README's
(`published.format_comparison`).
IVF-QINCo2 is trained and searched beside IVF-QINCo from the same RQ start (`qinco2=False`
leaves it out). Every stage's wall and CPU seconds are stored in the summary's data
section.

The defaults are the best recipe measured on `sift_images` within the demo's budget (10
minutes on 2 cores, install included).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from qinco_jax.experiments import baselines, published

PQ_NAME, RQ_NAME, QINCO_NAME, QINCO2_NAME = "IVF-PQ", "IVF-RQ", "IVF-QINCo", "IVF-QINCo2"
INITS = ("rq_exact", "random")  # the models' initialisations (MainJobConfig.init)
AQ_FITS = ("decoded", "reference")  # how the AQ shortlist codebooks are fitted (MainJobConfig.aq_fit)
SHORTLIST_SUFFIX = ": AQ shortlist only"
JAX_ENGINE_SUFFIX = " (JAX engine, batch)"


@dataclasses.dataclass(frozen=True)
class MainJobConfig:
    """Everything the main job does, sizes and recipe. Bytes per vector: M (8-bit codes)."""

    db: str = "sift_images"
    out: str = "runs/demo"
    # IVF and code size, shared by every method
    n_centroids: int = 256
    kmeans_niter: int = 10
    M: int = 8
    # IVF-QINCo model and training (nt training vectors, nval held out for validation)
    nt: int = 95_000
    nval: int = 5_000
    L: int = 1
    h: int = 64
    epochs: int = 3
    lr: float = 3e-4                # measured: 1e-4 ties IVF-RQ after 3 epochs, 3e-4 passes it, 1e-3 overshoots
    batch_size: int = 256
    init: str = "rq_exact"          # "rq_exact" (starts at the RQ error) or "random" (the reference's)
    train_preselect: int = 64       # candidates pre-selected per step while training (0: all K)
    # encoding of the database (and of the vectors that fit the AQ shortlist codebooks)
    encode_beam: int = 8
    encode_preselect: int = 32      # 0: all K
    aq_train: int = 10_000
    # the AQ shortlist: "decoded" fits its codebooks to the model's own reconstructions of
    # the aq_train training codes and of the database codes (the AQ approximates the QINCo
    # decoder; no vector noise in the targets) and trains the norm range on the stored
    # norms; "reference" fits them to the aq_train training vectors and trains the norm
    # range on the AQ errors, as the reference (measured on sift_images: database AQ MSE
    # 21,248 -> 17,129 for IVF-QINCo2, 20,215 -> 16,837 for IVF-QINCo; 30 % and 23 % of the
    # stored norms clipped -> none; see docs/benchmarks.md)
    aq_fit: str = "decoded"
    # baselines
    rq_beam: int = baselines.DEFAULT_RQ_BEAM
    # search sweeps
    nprobe: tuple[int, ...] = (1, 2, 4, 8, 16)
    nshort: tuple[int, ...] = (10, 20, 50)  # with the decoded AQ shortlist 10 often re-ranks as well as 50
    # validation queries (the first of the nval held-out vectors, ground truth in the
    # database computed here): every method is swept on them, and each IVF-QINCo(2) is
    # searched on the test queries at its operating points chosen there
    # (`choose_operating_points`); 0: every swept point, on the test queries
    val_queries: int = 2_000
    search_threads: int = 1         # faiss threads while searching (timed; 0: faiss's default, all cores)
    jax_engine: bool = True         # also search the IVF-QINCo indexes with the JAX engine, all queries in one batch
    build_threads: int = 1          # faiss threads while building (0: all cores; they spin on a busy machine)
    # IVF-QINCo2 beside IVF-QINCo: QINCo2's recipe (AdamW, cosine schedule), same exact-RQ
    # start; trained greedily (B = 1) over A pre-selected candidates, the database
    # encoded with beam encode_beam over A (measured on sift_images, 3 epochs, validation
    # MSE from 17632 at the start: B = 1 64 s CPU -> 13778; B = 2 and 8 cost 1.5x and
    # 3.5x per epoch for less; lr 8e-4 (the recipe's) trails, 4e-3 ties 2e-3).
    # 6 epochs: about the training CPU time of IVF-QINCo's 3 (IVF-QINCo's epoch, over 64
    # pre-selected candidates, costs about twice this one's over 32: 177 s vs 167 s CPU in
    # the published run). Exhaustive recall@1 minus IVF-QINCo's on the test queries, 3
    # seeds (bench/bench_main_job_seeds.py): -0.002 to +0.014 at 3 epochs, +0.012 to
    # +0.032 at 6
    qinco2: bool = True
    qinco2_L: int = 1
    qinco2_h: int = 64
    qinco2_de: int = 64
    qinco2_A: int = 32
    qinco2_B: int = 1
    qinco2_epochs: int = 6
    qinco2_lr: float | None = 2e-3  # None: QINCo2's default (8e-4, for 60-epoch runs)
    # both QINCo models' training seed (network initialisation, data order, codebook
    # noise), added to the recipe's own seeds: 0 is the published run; other values show
    # how much the figures move with training alone (bench/bench_main_job_seeds.py)
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        object.__setattr__(self, "nprobe", tuple(int(p) for p in self.nprobe))
        object.__setattr__(self, "nshort", tuple(int(s) for s in self.nshort))
        positive = ("n_centroids", "kmeans_niter", "M", "nt", "nval", "L", "h", "batch_size", "encode_beam",
                    "aq_train", "rq_beam", "qinco2_L", "qinco2_h", "qinco2_de", "qinco2_A", "qinco2_B")
        for key in positive:
            if getattr(self, key) < 1:
                raise ValueError(f"main job: {key} must be >= 1, got {getattr(self, key)}")
        nonnegative = ("epochs", "qinco2_epochs", "train_preselect", "encode_preselect", "search_threads",
                       "build_threads", "val_queries", "seed")
        for key in nonnegative:
            if getattr(self, key) < 0:
                raise ValueError(f"main job: {key} must be >= 0, got {getattr(self, key)}")
        if not self.nprobe or not self.nshort or min(self.nprobe + self.nshort) < 1:
            raise ValueError(f"main job: nprobe and nshort need values >= 1, got {self.nprobe} and {self.nshort}")
        if max(self.nprobe) > self.n_centroids:
            raise ValueError(f"main job: nprobe {max(self.nprobe)} > n_centroids {self.n_centroids}")
        if self.init not in INITS:
            raise ValueError(f"main job: init must be 'rq_exact' or 'random', got {self.init!r}")
        if self.aq_fit not in AQ_FITS:
            raise ValueError(f"main job: aq_fit must be 'decoded' or 'reference', got {self.aq_fit!r}")
        if not self.lr > 0 or (self.qinco2_lr is not None and not self.qinco2_lr > 0):
            raise ValueError("main job: learning rates must be > 0")

    @property
    def index_key(self) -> str:
        return f"IVF{self.n_centroids},RQ{self.M}x8_Nqint8"


class Stages:
    """Times named stages (wall and process-CPU seconds) and logs their start and end."""

    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self.times: dict[str, dict] = {}

    def __call__(self, name: str):
        stages = self

        class _Stage:
            def __enter__(self):
                stages.log(f"\n=== {name} ===")
                self.t0, self.c0 = time.perf_counter(), time.process_time()

            def __exit__(self, *exc):
                wall, cpu = time.perf_counter() - self.t0, time.process_time() - self.c0
                stages.times[name] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}
                stages.log(f"--- {name}: {wall:.1f} s wall, {cpu:.1f} s CPU")

        return _Stage()


@dataclasses.dataclass
class TrainedIvfModel:
    """An IVF-QINCo(2) model, its IVF index and its database codes' MSEs."""

    name: str
    model: object
    index: object
    db_mse: float           # QINCo decode of the database codes
    shortlist_mse: float    # the AQ approximation the shortlist searches with
    val_mse: dict           # validation MSE: {"rq_init": ..., "trained": ...}


def _encode_options(cfg: MainJobConfig, model=None):
    from qinco_jax.config import EncodeOptions

    if model is not None and model.config.is_qinco2:
        return EncodeOptions(beam=cfg.encode_beam)  # over the model's A candidates, pre-selected by its substep codebook
    return EncodeOptions(beam=cfg.encode_beam, preselect=cfg.encode_preselect or None)


def scaled_sizes(cfg: MainJobConfig, available: int, log: Callable[[str], None] = print) -> MainJobConfig:
    """cfg with nt and nval cut, in the same proportion, to a data set of `available`
    training vectors when it has fewer than nt + nval (e.g. `--db synthetic_small`);
    aq_train at most the new nt."""
    if cfg.nt + cfg.nval <= available:
        return cfg
    if available < 4:
        raise ValueError(f"{cfg.db} has {available} training vectors: too few for the main job")
    nval = max(1, min(available // 2, round(available * cfg.nval / (cfg.nt + cfg.nval))))
    nt = available - nval
    log(f"{cfg.db} has {available} training vectors, fewer than nt + nval = {cfg.nt} + {cfg.nval}: "
        f"using nt={nt} and nval={nval} (the same split)")
    return dataclasses.replace(cfg, nt=nt, nval=nval, aq_train=min(cfg.aq_train, nt),
                               val_queries=min(cfg.val_queries, nval))


@dataclasses.dataclass(frozen=True)
class JobData:
    """The job's vectors, as `load_data` reads them (float32; gt: the queries' ids)."""

    cfg: MainJobConfig   # nt and nval scaled to the data set (`scaled_sizes`)
    name: str            # the data set's
    xt_all: np.ndarray   # the nt training vectors, then the nval held out
    xb: np.ndarray
    xq: np.ndarray
    gt: np.ndarray

    @property
    def xt(self) -> np.ndarray:
        return self.xt_all[:self.cfg.nt]

    @property
    def xval(self) -> np.ndarray:
        return self.xt_all[self.cfg.nt:]


def load_data(cfg: MainJobConfig, log: Callable[[str], None] = print) -> JobData:
    """The job's vectors from its data set `cfg.db` (built on first use), nt and nval
    scaled to what the data set holds."""
    from qinco_jax.data import datasets

    ds = datasets.get_dataset(cfg.db)
    cfg = scaled_sizes(cfg, int(ds.nt), log)
    xt_all = np.asarray(ds.get_train(cfg.nt + cfg.nval), np.float32)
    if len(xt_all) < cfg.nt + cfg.nval:
        raise ValueError(f"{cfg.db} has {len(xt_all)} training vectors, the job needs nt + nval = {cfg.nt + cfg.nval}")
    log(str(ds))
    return JobData(cfg, ds.name, xt_all, np.asarray(ds.get_database(), np.float32),
                   np.asarray(ds.get_queries(), np.float32), ds.get_groundtruth())


def _no_worse_than_start(res, start: Callable[[], object], name: str, log) -> tuple[object, dict]:
    """The trained model, or the model training started from when no epoch beat its
    validation MSE (a learning rate too high for the data): what the job saves never
    does worse on validation than its start."""
    history = res.history
    before = history.get("before")
    epochs = history.get("epochs") or []
    best = min((e["val_mse"] for e in epochs), default=None)
    if before is None or best is None or best <= before:
        return res.best, history
    log(f"{name}: no epoch beat the starting point on validation (best {best:g} > {before:g} at the start): "
        "keeping the starting model")
    return start(), {**history, "kept_start": True}


def _seeds(cfg: MainJobConfig) -> tuple[int, int]:
    """(network initialisation seed, training seed) of both QINCo models: the recipe's
    defaults moved by cfg.seed, so seed 0 trains exactly as the recipe does."""
    from qinco_jax.training import recipe
    from qinco_jax.training import loop as training

    return recipe.ModelSpec.seed + cfg.seed, training.TrainConfig.seed + cfg.seed


def train_qinco(cfg: MainJobConfig, xt, xval, centroids, log, rq_codebooks=None) -> tuple[object, dict]:
    """The IVF-QINCo model of the recipe and its training history, from the RQ codebooks
    `rq_codebooks` (M, K, d) on the residuals to the IVF centroids (None: trained here);
    the starting model itself if training did not improve on it."""
    from qinco_jax.training import recipe
    from qinco_jax.training import loop as training
    from qinco_jax.config import EncodeOptions

    model_seed, train_seed = _seeds(cfg)
    spec = recipe.ModelSpec(M=cfg.M, L=cfg.L, h=cfg.h, variant="ivf", init=cfg.init, seed=model_seed)
    tc = training.TrainConfig(lr=cfg.lr, max_epochs=cfg.epochs, batch_size=cfg.batch_size, ngpu=0, seed=train_seed,
                              encode=EncodeOptions(preselect=cfg.train_preselect or None), progress=cfg.progress)
    if rq_codebooks is None:
        rq_codebooks = recipe.train_rq_codebooks(xt, spec, xval, centroids, log=log)
    res = recipe.train_model(xt, xval, spec, tc, ivf_centroids=centroids, rq_codebooks=rq_codebooks, log=log)
    return _no_worse_than_start(res, lambda: recipe.initial_model(xt, spec, rq_codebooks, centroids), QINCO_NAME, log)


def train_qinco2(cfg: MainJobConfig, xt, xval, centroids, log, rq_codebooks=None) -> tuple[object, dict]:
    """The IVF-QINCo2 model (the QINCo2 training recipe, its defaults but sizes, length
    and learning rate) and its training history, from the RQ codebooks `rq_codebooks`
    (None: QINCo2's own RQ initialisation, trained here)."""
    from qinco_jax.training import recipe
    from qinco_jax.training import loop as training

    model_seed, train_seed = _seeds(cfg)
    spec = recipe.ModelSpec(arch="qinco2", M=cfg.M, L=cfg.qinco2_L, h=cfg.qinco2_h, de=cfg.qinco2_de,
                            A=cfg.qinco2_A, B=cfg.qinco2_B, variant="ivf", init=cfg.init, seed=model_seed)
    overrides = dict(max_epochs=cfg.qinco2_epochs, batch_size=cfg.batch_size, ngpu=0, progress=cfg.progress,
                     seed=train_seed)
    if cfg.qinco2_epochs > 0:  # the cosine schedule spans this short run, not 60 epochs
        overrides.update(epochs=cfg.qinco2_epochs, ramp_epochs=min(3.0, cfg.qinco2_epochs / 3))
    if cfg.qinco2_lr is not None:
        overrides["lr"] = cfg.qinco2_lr
    tc = training.qinco2_train_config(**overrides)
    res = recipe.train_model(xt, xval, spec, tc, ivf_centroids=centroids, rq_codebooks=rq_codebooks, log=log)
    start = lambda: recipe.qinco2_initial_model(xt, spec, tc, xval=xval, ivf_centroids=centroids,  # noqa: E731
                                                rq_codebooks=rq_codebooks)[0]
    return _no_worse_than_start(res, start, QINCO2_NAME, log)


def _val_mse(history: dict, init: str) -> dict:
    epochs = history.get("epochs") or []
    trained = min(e["val_mse"] for e in epochs) if epochs else None
    if history.get("kept_start"):
        trained = history.get("before")
    return {"rq_init": history.get("before") if init == "rq_exact" else None, "trained": trained,
            "kept_start": bool(history.get("kept_start"))}


def build_qinco_index(name: str, model, history: dict, cfg: MainJobConfig, xt, xb, log) -> TrainedIvfModel:
    """The database encoded (beam search within each vector's nearest IVF list), the AQ
    shortlist codebooks fitted to the QINCo codes of aq_train training vectors (with
    cfg.aq_fit "decoded": to the model's reconstructions of those codes and of the
    database's, see MainJobConfig), the database added."""
    from qinco_jax.models import codec
    from qinco_jax.metrics import mean_squared_error
    from qinco_jax.search import index as ivf

    options = _encode_options(cfg, model)
    xt_aq = xt[:cfg.aq_train]
    xt_codes = codec.encode(model, xt_aq, options, progress=f"{name}: encode AQ training set" if cfg.progress
                               else None)
    codes = codec.encode(model, xb, options, progress=f"{name}: encode database" if cfg.progress else None)
    decoded = codec.decode(model, codes)
    if cfg.aq_fit == "decoded":
        fit_codes = np.concatenate([xt_codes, codes])
        targets = np.concatenate([codec.decode(model, xt_codes), decoded])
        index, _ = ivf.train_index_on_codes(ivf.ivf_centroids(model), targets, fit_codes, cfg.index_key,
                                            model.config.K, norm_training="reconstructions", log=log)
    else:
        index, _ = ivf.train_index(model, xt_aq, cfg.index_key, xt_codes=xt_codes, options=options, log=log)
    ivf.add_codes(index, model, codes)
    db_mse = mean_squared_error(decoded, xb)
    shortlist_mse = mean_squared_error(index.sa_decode(ivf.sa_codes(index, codes)), xb)
    return TrainedIvfModel(name, model, index, db_mse, shortlist_mse, _val_mse(history, cfg.init))


def save_trained(trained: TrainedIvfModel, out: Path) -> tuple[Path, Path]:
    """The model (the reference's .pt format) and its index (.faissindex) in `out`, named
    after the method (ivf_qinco.pt, ivf_qinco2.faissindex, ...), written atomically: what
    search_ivf.py / run.py task=search take to search the database again."""
    from qinco_jax.formats.checkpoint import save_model
    from qinco_jax.search import index as ivf

    from qinco_jax.search import provenance

    stem = trained.name.lower().replace("-", "_")
    model_path, index_path = out / f"{stem}.pt", out / f"{stem}.faissindex"
    save_model(trained.model, model_path)
    ivf.write_index(trained.index, index_path)
    # the model's fingerprint beside the index: searching it with another model is refused
    provenance.write_metadata(index_path, trained.index, trained.model)
    return model_path, index_path


def validation_mse_table(name: str, model, xval, cfg: MainJobConfig, val: dict) -> list[tuple[str, float]]:
    """Validation MSE rows of one model: the RQ it starts from, the model's own encode
    (QINCo: greedy, the reference's; QINCo2: greedy over its A pre-selected candidates,
    as trained), and the demo's beam / pre-selection setting within the nearest IVF
    list (the codec keeps every IVF model's vectors in their nearest list, as the
    database is indexed)."""
    from qinco_jax.training import loop as training

    options = _encode_options(cfg, model)
    c = model.config
    if c.is_qinco2:
        search = "greedy" if c.B == 1 else f"beam {c.B}"
        own, setting = f"{search} over {c.A or c.K} pre-selected", f"beam {cfg.encode_beam} over {c.A or c.K} pre-selected"
    else:
        own, setting = "greedy encode", f"beam {cfg.encode_beam} over {cfg.encode_preselect or 'all'} pre-selected"
    rows = []
    if val.get("rq_init") is not None:  # measured with the model's own encode, as training measures it
        rows.append((f"IVF-RQ codebooks, {own} ({name}'s start)", float(val["rq_init"])))
    rows.append((f"{name}, {own}", training.validation_mse(model, xval)))
    rows.append((f"{name}, {setting}, nearest list (as indexed)", training.validation_mse(model, xval, options)))
    return rows


def format_equal_time(methods: Sequence[baselines.Method], target: str) -> str:
    """For each point of `target`, the best recall@1 of every other method within its time."""
    by_name = {m.name: m for m in methods}
    others = [m for m in methods if m.name != target and not m.name.endswith(SHORTLIST_SUFFIX)]
    lines = [f"recall@1 at equal time: each {target} point against the best point of each method within its time",
             f"{'ms/query':>9s} {target:>11s} " + " ".join(f"{m.name:>11s}" for m in others) + "  parameters"]
    for p in sorted(by_name[target].points, key=lambda p: p["ms_per_query"]):
        t = p["ms_per_query"]
        lines.append(f"{t:9.3f} {p['recall@1']:11.3f} "
                     + " ".join(_recall_cell(baselines.best_recall_within(m.points, t)) for m in others)
                     + f"  {p['parameters']}")
    return "\n".join(lines)


def _recall_cell(recall: float | None) -> str:
    return f"{'-':>11s}" if recall is None else f"{recall:11.3f}"  # "-": no point of that method is as fast


def _sweep_ivf(trained: TrainedIvfModel, xq, gt, cfg: MainJobConfig, log, engine=None) -> list[dict]:
    from qinco_jax.search.sweep import explore

    return explore(trained.index, trained.model, xq, gt, nprobe=cfg.nprobe, nshort=cfg.nshort, log=log,
                   engine=engine)


def _search_at(trained: TrainedIvfModel, xq, gt, parameters: Sequence[dict], log, engine=None) -> list[dict]:
    """The search results (sweep.explore's) at each of the given operating points."""
    from qinco_jax.search import report
    from qinco_jax.search.sweep import explore

    names = ["nprobe", "nshort"]
    log(report.format_header(names))
    results = []
    for p in parameters:
        r = explore(trained.index, trained.model, xq, gt, nprobe=[p["nprobe"]], nshort=[p["nshort"]],
                    log=lambda _: None, engine=engine)[0]
        log(report.format_row(r, names, len(xq)))
        results.append(r)
    return results


# A slower point joins the front only if it recalls at least this much more than the
# previous one: gains of a query or two in 2,000 are noise (measured: such points, e.g.
# nshort 20 over 10 at +0.0005, fell below IVF-RQ on the test queries of a second run).
MIN_RECALL_GAIN = 0.002
OPERATING_POINT_RULE = ("the points of its validation sweep on the Pareto front of recall@1 against time (each "
                        f"at least {MIN_RECALL_GAIN} above the previous one) that beat every baseline's validation "
                        "recall@1 at equal time (the whole front when none does)")


def choose_operating_points(points: Sequence[dict], others: Sequence[Sequence[dict]],
                            min_gain: float = MIN_RECALL_GAIN) -> tuple[list[dict], bool]:
    """A method's operating points from its validation sweep `points` (dicts with
    ms_per_query and recall@1) and the other methods' validation sweeps `others`: the
    points on its Pareto front (by time, each recalling at least `min_gain` more than the
    previous one kept) whose recall@1 is above the best of every other method within its
    time — where a user would pick this method over them. Returns (points, True), or
    (the whole front, False) when no point beats every other method. Order: by time."""
    from qinco_jax.search.report import pareto_front

    front = []
    for p in sorted((points[i] for i in pareto_front([(p["ms_per_query"], p["recall@1"]) for p in points])),
                    key=lambda p: p["ms_per_query"]):
        if not front or p["recall@1"] >= front[-1]["recall@1"] + min_gain - 1e-12:
            front.append(p)

    def beats_all(p):
        within = (baselines.best_recall_within(o, p["ms_per_query"]) for o in others)
        return all(best is None or p["recall@1"] > best for best in within)

    chosen = [p for p in front if beats_all(p)]
    return (chosen, True) if chosen else (front, False)


def _validation_sweeps(cfg: MainJobConfig, xval, xb, pq, rq, rq_name: str, trained: Sequence[TrainedIvfModel],
                       log) -> dict[str, dict]:
    """Every method swept on the validation queries (the first cfg.val_queries held-out
    vectors; exact ground truth in the database), and each IVF-QINCo(2)'s operating
    points chosen on them (`choose_operating_points` against IVF-PQ and IVF-RQ).
    Returns {method: {"validation": points, "chosen": parameters, ...}} (the summary's
    data.operating_points)."""
    from qinco_jax.data.groundtruth import exact_groundtruth

    xv = np.ascontiguousarray(xval[:cfg.val_queries])
    gv = exact_groundtruth(xv, xb, baselines.SEARCH_K)
    log(f"{len(xv)} validation queries (held-out training vectors), ground truth computed in the database")
    out = {}
    for name, index in ((PQ_NAME, pq), (rq_name, rq)):
        log(name)
        out[name] = {"validation": baselines.search_sweep(index, xv, gv, cfg.nprobe, log=log)}
    for t in trained:
        log(t.name)
        points = baselines.points_from_search_results(_sweep_ivf(t, xv, gv, cfg, log))
        chosen, beat = choose_operating_points(points, [out[PQ_NAME]["validation"], out[rq_name]["validation"]])
        out[t.name] = {"validation": points, "chosen": [p["parameters"] for p in chosen],
                       "beat_the_baselines": beat, "rule": OPERATING_POINT_RULE, "nq": len(xv)}
        log(f"{t.name}: operating points " + ", ".join(f"(nprobe {p['nprobe']}, nshort {p['nshort']})"
                                                        for p in out[t.name]["chosen"])
            + ("" if beat else ": none beats both baselines on the validation queries, its whole Pareto front"))
    return out


def run(cfg: MainJobConfig = MainJobConfig(), log: Callable[[str], None] = print) -> dict:
    """Run the main job; writes summary.json, pareto.png, centroids.npy and each trained
    model and its index (ivf_qinco.pt / .faissindex, ivf_qinco2.*) to cfg.out and
    returns the summary ({"data": ..., "methods": [...]}, see baselines)."""
    import faiss

    from qinco_jax.formats.io import save_npy

    before_threads = faiss.omp_get_max_threads()
    if cfg.build_threads:
        faiss.omp_set_num_threads(cfg.build_threads)
    try:
        return _run(cfg, log, save_npy)
    finally:
        faiss.omp_set_num_threads(before_threads)


def _run(cfg: MainJobConfig, log, save_npy) -> dict:
    import faiss

    from qinco_jax.search import index as ivf

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stage = Stages(log)
    M = cfg.M

    with stage("data"):
        job = load_data(cfg, log)
        cfg, xt_all, xt, xval, xb, xq, gt = job.cfg, job.xt_all, job.xt, job.xval, job.xb, job.xq, job.gt
    with stage("IVF k-means"):
        centroids = ivf.train_ivf_centroids(xt_all, cfg.n_centroids, cfg.kmeans_niter, verbose=cfg.progress)
        save_npy(out / "centroids.npy", centroids)

    with stage("IVF-PQ index"):
        pq = baselines.build_ivf_pq(xt, centroids, M)
        baselines.add_database(pq, xb, progress=cfg.progress)
        pq_mse = baselines.reconstruction_mse(pq, xb)
    with stage("IVF-RQ index"):
        rq = baselines.build_ivf_rq(xt, centroids, M, beam=cfg.rq_beam)
        baselines.add_database(rq, xb, progress=cfg.progress)
        rq_mse = baselines.reconstruction_mse(rq, xb)
        # IVF-QINCo starts from these very codebooks (exact-RQ initialisation)
        rq_codebooks = baselines.rq_codebooks(rq)

    trained: list[TrainedIvfModel] = []
    val_rows: list[tuple[str, float]] = []
    histories = {}
    families = [(QINCO_NAME, functools.partial(train_qinco, rq_codebooks=rq_codebooks), cfg.epochs)]
    if cfg.qinco2:
        families.append((QINCO2_NAME, functools.partial(train_qinco2, rq_codebooks=rq_codebooks), cfg.qinco2_epochs))
    for name, train_fn, epochs in families:
        with stage(f"{name} training ({epochs} epochs)"):
            model, history = train_fn(cfg, xt, xval, centroids, log)
        with stage(f"{name} index"):
            t = build_qinco_index(name, model, history, cfg, xt, xb, log)
            saved = save_trained(t, out)
            log(f"{name}: model {saved[0]}, index {saved[1]}")
        trained.append(t)
        histories[name] = t.val_mse
        with stage(f"{name} validation MSE"):
            val_rows += validation_mse_table(name, model, xval, cfg, t.val_mse)

    rq_name = f"{RQ_NAME} (beam {cfg.rq_beam})"
    methods: list[baselines.Method] = []
    operating_points: dict[str, dict] = {}
    if cfg.search_threads:  # each method timed on the same number of faiss threads
        faiss.omp_set_num_threads(cfg.search_threads)
    if cfg.val_queries:
        with stage("validation sweeps"):
            operating_points = _validation_sweeps(cfg, xval, xb, pq, rq, rq_name, trained, log)
    with stage("search"):
        log(PQ_NAME)
        methods.append(baselines.Method(PQ_NAME, M, pq_mse, tuple(baselines.search_sweep(pq, xq, gt, cfg.nprobe,
                                                                                          log=log))))
        log(rq_name)
        methods.append(baselines.Method(rq_name, M, rq_mse, tuple(baselines.search_sweep(rq, xq, gt, cfg.nprobe,
                                                                                          log=log))))
        for t in trained:
            chosen = operating_points.get(t.name, {}).get("chosen")

            def search(engine=None):
                if chosen is None:
                    return _sweep_ivf(t, xq, gt, cfg, log, engine=engine)
                return _search_at(t, xq, gt, chosen, log, engine=engine)

            log(t.name + ("" if chosen is None else f": at its {len(chosen)} operating points chosen on the "
                                                    "validation queries"))
            results = search()
            methods.append(baselines.Method(t.name + SHORTLIST_SUFFIX, M, t.shortlist_mse,
                                            tuple(baselines.points_from_search_results(results, reranked=False))))
            methods.append(baselines.Method(t.name, M, t.db_mse, tuple(baselines.points_from_search_results(results))))
            if cfg.jax_engine:  # the same index and shortlists, every query in one batch
                from qinco_jax.search.jax_engine import JaxIvfEngine

                log(t.name + JAX_ENGINE_SUFFIX)
                results = search(engine=JaxIvfEngine(t.index))
                methods.append(baselines.Method(t.name + JAX_ENGINE_SUFFIX, M, t.db_mse,
                                                tuple(baselines.points_from_search_results(results))))

    data = {"name": job.name, "d": int(xb.shape[1]), "nt": cfg.nt, "nval": cfg.nval, "nb": int(len(xb)), "nq": int(len(xq)),
            "K_IVF": cfg.n_centroids, "M": M, "config": _jsonable(dataclasses.asdict(cfg)),
            "val_mse": {name: v for name, v in histories.items()},
            "val_mse_table": [{"name": n, "mse": float(v)} for n, v in val_rows],
            "operating_points": operating_points,
            "stages": stage.times,
            "total": {"wall_s": round(sum(v["wall_s"] for v in stage.times.values()), 1),
                      "cpu_s": round(sum(v["cpu_s"] for v in stage.times.values()), 1)}}
    s = baselines.write_summary(out / "summary.json", data, methods)
    baselines.plot_methods(s, out / "pareto.png",
                           title=f"{job.name}: {M} bytes per vector, K_IVF={cfg.n_centroids}, {len(xq)} queries")
    log("\ndatabase MSE (every method at the same bytes per vector)\n" + baselines.format_mse_table(s))
    if val_rows:
        log("\nvalidation MSE\n" + "\n".join(f"{n:66s} {v:12.6g}" for n, v in val_rows))
    for t in trained:
        log("\n" + format_equal_time(methods, t.name))
    log("\n" + published.format_comparison(s))  # the README's figures, for the default configuration
    log(f"\ntotal {data['total']['wall_s']:.0f} s wall, {data['total']['cpu_s']:.0f} s CPU; "
        f"results in {out}/summary.json, plot {out}/pareto.png")
    return s


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
