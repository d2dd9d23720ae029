"""The documented commands run: every program command of README.md and docs/ (read from
the pages by tests/test_docs.py's extraction, never copied here) is run on tiny data.

How (see docs/development.md, "Documentation that stays true"):
- page by page, each page's commands in page order, in one scratch folder per page, so
  that what a command writes feeds the next (centroids -> index -> search -> plot);
  relative paths resolve in that folder;
- in-process: a command's words go to its qinco_jax.cli module's main(argv) (the shims in
  train/ search/ convert/ and run.py name it); a bench script runs as __main__; `srun ...
  python X` runs X as one real process (jax.distributed on a one-process cluster);
  `make demo` runs the main job once per session (later pages get its outputs);
- what a user downloads is a tiny stand-in (write_stand_ins: the named data sets in the
  reference's file layout, MODEL_STAND_INS made with the library's own functions and
  saved in the reference's format, VECTOR_STAND_INS, the files of docs/search.md's m.pt);
  a file that a command of the page writes is never a stand-in (checked: no command may
  rewrite one, but for PAGE_REWRITES);
- VALUES are adapted by one explicit table (ADAPT: sizes, device and thread counts) and
  tiny-run words are appended (APPEND: one epoch of a few hundred vectors); flags and keys
  stay verbatim (checked), so a renamed flag or key still fails;
- what does not run is an exception with its reason (EXCEPTIONS), listed by a test.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import runpy
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests import test_docs as docs

ROOT = docs.ROOT

# --------------------------------------------------------------------------------------
# The commands of a page, in page order
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Command:
    where: str   # page:line of its block
    line: str    # the logical line as the page writes it


def page_commands(page: Path, blocks=None) -> list[Command]:
    """The command lines of a page in page order (fenced blocks and inline commands,
    patterns such as `python run.py task=<task> ...` and bare program names left out,
    as test_docs does)."""
    blocks = docs.page_blocks(page) if blocks is None else blocks
    runnable = [b for b in blocks if b.lang in ("bash", "inline") and b.not_run is None]
    out = []
    for b in sorted(runnable, key=lambda b: b.line):  # stable: a block's lines stay in order
        for line in docs.command_lines(b.text):
            if b.lang == "inline" and (re.search(r"<\w+>|\.\.\.", line) or " " not in line.strip()
                                       or re.fullmatch(r"python3? [\w/]+\.py", line.strip())):
                continue  # a pattern, or a program's name (`qinco-run`, `python run.py`) in prose
            out.append(Command(f"{page.name}:{b.line}", line.split(" #")[0].strip()))
    return out


# --------------------------------------------------------------------------------------
# Values adapted to tiny data (never flags or keys)
# --------------------------------------------------------------------------------------

# Stand-in sizes: the named data sets hold N_LEARN training, N_BASE database and N_QUERY
# query vectors; IVF models have K_IVF lists; models have M_TINY codebooks of 16 entries (--K 16 appended to trainings).
N_LEARN, N_BASE, N_QUERY = 800, 600, 20
K_IVF, M_TINY = 16, 2

# (pattern, replacement, why): applied in order to the command line's text. Only values
# change: test_adaptations_change_values_only checks that every flag and key survives.
ADAPT = [
    # training-set sizes (--nt, QINCo2's epoch size): a few hundred vectors
    (r"(--nt) 10_010_000", r"\1 600", "PQ-QINCo's prepared vectors: the --nt + --nval of its trainings"),
    (r"(--nt) \d[\d_]{4,}", r"\1 500", "training vectors: 500 of the stand-in's 800"),
    (r"(--nval) [\d_]+", r"\1 100", "validation vectors"),
    (r"(ds\.valset)=\d+", r"\1=100", "validation vectors"),
    (r"(--epoch_size) [\d_]+", r"\1 400", "QINCo2 samples per epoch"),
    # IVF sizes: 16 lists, in flags, run.py keys and faiss index keys
    (r"(--n_centroids) \d+", rf"\1 {K_IVF}", "IVF centroids"),
    (r"(ivf_K)=\d+", rf"\1={K_IVF}", "IVF centroids"),
    (r"\bIVF(65536|1048576)(?=[_,])", f"IVF{K_IVF}", "IVF lists in a faiss index key"),
    # model sizes: M_TINY codebooks, one residual block, small hidden / embedding widths
    (r"(--M) \d+", rf"\1 {M_TINY}", "codebooks"),
    (r"(?<![\w.])(M)=\d+", rf"\1={M_TINY}", "codebooks"),
    (r",RQ\d+x8", f",RQ{M_TINY}x4", "the index's RQ: the model's M_TINY codebooks of 16 (4 bits)"),
    (r"(--L) \d+", r"\1 1", "residual blocks"),
    (r"(--h|--dh|--de) \d+", r"\1 32", "hidden / embedding width"),
    (r"(--A) \d+", r"\1 4", "pre-selected candidates"),
    (r"(--B) \d+", r"\1 4", "beam"),
    (r"(?<![\w.])(A)=\d+", r"\1=4", "pre-selected candidates"),
    (r"(?<![\w.])(B)=\d+", r"\1=4", "beam"),
    # devices and threads: the CPU of a 2-core machine
    (r"(--ngpu) [1-9]\d*", r"\1 1", "devices: this machine has one"),
    (r"(--nthreads?) \d+", r"\1 2", "threads"),
    (r"(--batch_size) \d+", r"\1 256", "batch: the stand-in sets hold 800 vectors"),
    # row ranges and shard counts of the sharded 1B recipe: two shards of the stand-in
    (r"\* 10000000\)\)", f"* {N_BASE // 2}))", "database rows per encoding shard"),
    (r"(QINCO_PROCESS_COUNT)=\d+", r"\1=2", "processes adding shards"),
    # search sweeps: lists and shortlists that fit 16 lists and 600 vectors
    (r"(--nprobe)((?: \d+)+)", lambda m: m.group(1) + _cap(m.group(2), K_IVF), "nprobe <= the lists"),
    (r"(--quantizer_efSearch)((?: \d+)+)", lambda m: m.group(1) + _cap(m.group(2), 64), "efSearch"),
    (r"(--nshort)((?: \d+)+)", lambda m: m.group(1) + _cap(m.group(2), 200), "shortlists <= 200"),
    # benchmarks: a few vectors
    (r"(--n_encode) \d+", r"\1 16", "vectors per encode timing"),
]


def _cap(values: str, limit: int) -> str:
    kept = [v for v in values.split() if int(v) <= limit]
    return " " + " ".join(kept or [str(limit)])


# Words appended to every run of a program: one short epoch, small shortlists, tiny
# QINCo2 models. They are the programs' own flags and keys (a renamed one fails too).
APPEND = {
    "qinco_jax.cli.train": ("--nt 500 --K 16 --h 32 --max_epochs 1 --nval 100 --batch_size 256 --stop_patience 0 "
                            "--progress off"),
    "qinco_jax.cli.index": "--nt 500 --kmeans_iter 4",
    "qinco_jax.cli.search_2stage": "--nt 500 --nshort 10 50",
    "bench/bench_codec.py": "--M 2 --K 16 --L 1 --h 32 --n_decode 256",
    "qinco_jax.cli.main_job": ("--epochs 1 --nt 600 --nval 100 --n_centroids 16 --M 2 --h 16 --aq_train 400 "
                               "--rq_beam 2 --nprobe 1 4 --nshort 10 --jax_engine off --qinco2_L 1 --qinco2_h 16 "
                               "--qinco2_de 16 --qinco2_A 4 --qinco2_B 1 --qinco2_epochs 1 --progress off "
                               "--kmeans_niter 4 --train_preselect 4 --encode_beam 2 --encode_preselect 4 --val_queries 0"),
}
# run.py keys appended only where the task takes them
RUN_TASK_KEYS = {"train": ("ds.loop=400 ds.valset=100 epochs=1 scheduler.stop_patience=0 batch=256 "
                           "K=16 L=1 dh=32 de=32 A=4 B=4"),
                 "ivf_centroids": "ds.valset=100", "encode": "",
                 "train_pairwise_decoder": "ds.valset=100",
                 # the default index key (RQ${M}x8) assumes K=256: the tiny models' K=16 codes have 4 bits
                 "build_index": "ds.valset=100 search.index_key=IVF16_HNSW32,RQ2x4_Nqint8",
                 "eval": "", "search": ""}


def adapt(line: str) -> str:
    for pattern, repl, _why in ADAPT:
        line = re.sub(pattern, repl, line)
    return line


def option_words(line: str) -> list[str]:
    """The flags (--x) and keys (key= of key=value) of a line, in order."""
    out = []
    for w in shlex.split(line.replace("$", "")):
        if w.lstrip("[").startswith("-") and not re.fullmatch(r"-\d.*", w):
            out.append(w.lstrip("[").split("=")[0])
        elif re.fullmatch(r"\[?[\w.]+=.*", w):
            out.append(w.lstrip("[").split("=")[0])
    return out


# --------------------------------------------------------------------------------------
# What does not run, and why
# --------------------------------------------------------------------------------------

# (pattern on the command line, reason). Each match is listed by
# test_exceptions_are_listed_with_their_reason; no other command is left out.
EXCEPTIONS = [
    (r"^make test\b", "it is this test suite (CI runs it: .ci/run)"),
    (r"^make docs\b", "the site build: test_docs.py::test_docs_build_strict builds it (mkdocs --strict) once"),
    (r"^make install\b", "installs packages into .venv (the Makefile target is checked by test_docs)"),
    (r"^pip install\b", "installs packages (test_docs checks that every extra named exists)"),
    (r"^make demo .*EXTRA=", "a GPU set-up (installs jax[cuda12] / faiss-gpu)"),
    (r"^make demo .*DEMO_ARGS=", "a variant of the main job: its DEMO_ARGS go through the main job's parser and "
                                 "MainJobConfig's checks (a renamed flag or a bad value fails) but it is not run: "
                                 "with the tiny sizes appended it would repeat the tiny job `make demo` ran (on "
                                 "synthetic_small for --db synthetic_small), some 30 s each"),
]


# Stand-ins a page writes again, legitimately: path -> why.
PAGE_REWRITES = {
    "i.faissindex": "docs/search.md: the v1 search reads the user's index i.faissindex, then run.py "
                    "task=build_index shows how QINCo2's command line builds one under the same name",
}


def exception_reason(line: str) -> str | None:
    return next((why for pattern, why in EXCEPTIONS if re.search(pattern, line)), None)


# --------------------------------------------------------------------------------------
# Stand-ins for what a user downloads
# --------------------------------------------------------------------------------------

def _mixture(n: int, d: int, seed: int) -> np.ndarray:
    from qinco_jax.data.datasets import gaussian_mixture

    return gaussian_mixture(n, d, seed=seed)


def write_data_sets(root: Path) -> None:
    """The reference's named data sets, tiny, in the layout of its download scripts
    (data/bigann/, data/deep1b/, data/fb_ssnpp/) and the built-in sift_images: the
    dimension and dtype of each (bigann, sift: 128-d uint8; deep: 96-d float32;
    FB_ssnpp: 256-d uint8), N_LEARN / N_BASE / N_QUERY vectors and the exact ground truth
    in the published ground-truth files (the same file for bigann1M, 10M and 1B)."""
    from qinco_jax.data.groundtruth import exact_groundtruth
    from qinco_jax.formats import vecs_io

    def split(d, seed, dtype):
        x = _mixture(N_LEARN + N_BASE + N_QUERY, d, seed)
        if dtype == np.uint8:
            x = np.clip(x * 2, 0, 255).astype(np.uint8)
        xt, xb, xq = x[:N_LEARN], x[N_LEARN:N_LEARN + N_BASE], x[N_LEARN + N_BASE:]
        return xt, xb, xq, exact_groundtruth(xq.astype(np.float32), xb.astype(np.float32)).astype(np.int32)

    data = root / "data"
    for folder, names, d, dtype in (
            ("bigann", ("bigann_learn.bvecs", "bigann_base.bvecs", "bigann_query.bvecs",
                        "gnd/idx_1M.ivecs", "gnd/idx_10M.ivecs", "gnd/idx_1000M.ivecs"), 128, np.uint8),
            ("sift_images", ("learn.bvecs", "base.bvecs", "query.bvecs", "gt.ivecs"), 128, np.uint8),
            ("deep1b", ("learn.fvecs", "base.fvecs", "deep1B_queries.fvecs",
                        "deep1M_groundtruth.ivecs", "deep1B_groundtruth.ivecs"), 96, np.float32),
            ("fb_ssnpp", ("training_set10010k.npy", "database1M.npy", "queries.npy", "ground_truth1M.npy"),
             256, np.uint8)):
        (data / folder / "gnd").mkdir(parents=True)
        xt, xb, xq, gt = split(d, len(folder), dtype)
        for name in names:
            x = (xt if "learn" in name or "training" in name else xb if "base" in name
                 else xq if "quer" in name else gt)
            vecs_io.write_vectors(data / folder / name, x)


def tiny_named_data_sets(monkeypatch, root: Path) -> None:
    """get_dataset's named sets read the tiny files: sizes from the files (bigann1M would
    want a million rows), ground truth computed (none is written), sift_images not built."""
    from qinco_jax.data import datasets

    original = datasets._reference_dataset

    def tiny(name):
        ds = original(name)
        return None if ds is None else datasets.FileDataset(name, ds._files, compute_missing_gt=True)

    def sift_images(name="sift_images", spec=None, root=None):
        ds = datasets.folder_dataset(datasets.data_root() / name)
        ds.name = name
        return ds

    monkeypatch.setattr(datasets, "_reference_dataset", tiny)
    monkeypatch.setattr(datasets, "sift_images_dataset", sift_images)


# Downloads named by the pages: path -> (kind, data set folder, file in it for the vectors).
# Models are tiny (M_TINY codebooks of 16, one block, width 32), made with the library
# (QincoModel.init with the data's scale, IVF centroids and RQ codebooks) and saved in the reference's
# .pt format, as the published files are.
MODEL_STAND_INS = {
    "models/bigann_8x8_L2.pt": ("qinco", "bigann"),
    "models/bigann_8x8_L4.pt": ("qinco", "bigann"),
    "models/bigann_8x8_L16.pt": ("qinco", "bigann"),
    "models/bigann_IVF65k_16x8_L2.pt": ("ivf", "bigann"),
    "models/bigann_IVF1M_8x8_L2.pt": ("ivf", "bigann"),
    "models/qinco2_L-bigann1M-8x8.pt": ("qinco2", "bigann"),
    "models/IVF-qinco2_S-deep1B-8x8.pt": ("ivf-qinco2", "deep1b"),
    # the second part of the PQ-QINCo example (the page trains the first, "one per part")
    "models/pq_training/sub_model_1.pt": ("qinco", "fb_ssnpp/half"),
    # docs/search.md's pairwise decoder: "m.pt", the user's IVF model (and its files below)
    "m.pt": ("ivf", "bigann"),
}
# Vector files a user brings: path -> the data set whose training vectors they hold.
VECTOR_STAND_INS = {
    "xq.npy": "bigann",                        # docs/models.md: --i xq.npy (queries of the user's own)
    "xt.npy": "deep1b",                        # docs/training.md: run.py trainset=xt.npy (96-d: the
                                               # deep1M training's compilations serve it too)
    "models/bigann_centroids_65k.npy": "bigann/centroids",  # the published IVF centroids
}


def _learn(root: Path, folder: str) -> np.ndarray:
    from qinco_jax.formats import vecs_io

    half = folder.endswith("/half")
    folder = folder.split("/")[0]
    path = next(p for p in (root / "data" / folder).iterdir() if "learn" in p.name or "training" in p.name)
    x = np.asarray(vecs_io.read_vectors(path), np.float32)
    return x[:, :x.shape[1] // 2] if half else x


def _tiny_model(kind: str, xt: np.ndarray):
    from qinco_jax import QincoConfig, QincoModel

    d = xt.shape[1]
    ivf = kind.startswith("ivf")
    common = dict(d=d, M=M_TINY, K=16, L=1, h=32, variant="ivf" if ivf else "qinco", K_IVF=K_IVF if ivf else 0)
    if "qinco2" in kind:
        return QincoModel.init(QincoConfig(arch="qinco2", de=32, A=4, B=4, **common), 0,
                               codebook0=xt[:K_IVF] if ivf else None)
    # v1: the reference's initialisation, an RQ of the (IVF residuals of the) training
    # vectors, so that the codes spread over the codebooks as a trained model's do
    from qinco_jax.training.rq_init import train_rq

    scale = float(np.abs(xt).max())
    x = xt / scale
    if ivf:
        centroids = x[:K_IVF]
        x = x - centroids[((x[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)]
    config = QincoConfig(db_scale=scale, **common)
    codebooks = train_rq(x, config.num_steps + (0 if ivf else 1), 16, log=lambda msg: None)
    return QincoModel.init(config, 0, codebooks=codebooks, codebook0=centroids if ivf else None)


def write_stand_ins(root: Path) -> list[str]:
    """Every stand-in under root (data sets, models, vector files); their paths."""
    import faiss

    from qinco_jax import save_model

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # faiss's idle threads spin on a loaded machine
    try:
        write_data_sets(root)
        models = {}
        for path, (kind, folder) in MODEL_STAND_INS.items():  # one tiny model per kind and data set
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            if (kind, folder) not in models:
                models[kind, folder] = _tiny_model(kind, _learn(root, folder))
            save_model(models[kind, folder], root / path)
        pairwise_files = write_files_of_m(root)
    finally:
        faiss.omp_set_num_threads(threads)
    for path, folder in VECTOR_STAND_INS.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        x = _learn(root, folder.split("/")[0])
        np.save(root / path, x[:K_IVF] if folder.endswith("/centroids") else x)
    return [*MODEL_STAND_INS, *VECTOR_STAND_INS, *pairwise_files]


def write_files_of_m(root: Path) -> list[str]:
    """The files docs/search.md's pairwise-decoder commands name beside m.pt, made from
    m.pt by the library's programs: its IVF centroids c.npy, the codes of the training
    vectors xt_codes.npy, QINCo2's encoded sets xt.npz / xb.npz (run.py task=encode) and
    an index i.faissindex (search_ivf.py)."""
    from qinco_jax import encode, get_dataset, load_model
    from qinco_jax.cli import index, run

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("QINCO_DATA", str(root / "data"))
        tiny_named_data_sets(mp, root)
        model = load_model("m.pt")
        np.save("c.npy", np.asarray(model.params["codebook0"]) * model.config.db_scale)
        np.save("xt_codes.npy", encode(model, np.asarray(get_dataset("bigann1M").get_train(), np.float32)[:500]))
        run.main("task=encode db=bigann1M model=m.pt output=xb.npz".split())
        run.main("task=encode db=bigann1M encode_trainset=true model=m.pt output=xt.npz ds.valset=100".split())
        index.main(f"--todo train add --db bigann1M --model m.pt --index i.faissindex "
                   f"--index_key IVF{K_IVF},RQ{M_TINY}x4_Nqint8 --nt 500".split())
    return ["c.npy", "xt_codes.npy", "xb.npz", "xt.npz", "i.faissindex"]


# --------------------------------------------------------------------------------------
# Running a command
# --------------------------------------------------------------------------------------


def shell_words(line: str, i: int = 0) -> list[str]:
    """The words bash makes of the line, with the loop variable i of the sharded recipe."""
    docs.shell_words(line)  # its one-command-per-line check
    out = subprocess.run(["bash", "-c", f"i={i}; printf '%s\\0' " + line], capture_output=True, text=True, check=True)
    return docs.documentation_words(out.stdout.split("\0")[:-1])


def with_tiny_words(program: docs.Program) -> docs.Program:
    """APPEND's words added (for run.py: the task's keys that the command does not set)."""
    if program.target == "qinco_jax.cli.run":
        given = {a.split("=", 1)[0] for a in program.args}
        task = next((a.split("=", 1)[1] for a in program.args if a.startswith("task=")), None)
        extra = [w for w in RUN_TASK_KEYS.get(task, "").split() if w.split("=", 1)[0] not in given]
        return dataclasses.replace(program, args=program.args + tuple(extra))
    if program.kind == "script":
        module = str(Path(program.target).relative_to(ROOT))
    else:
        module = program.target if program.kind == "main" else docs.shim_module(Path(program.target))
    return dataclasses.replace(program, args=program.args + tuple(APPEND.get(module, "").split()))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_program(program: docs.Program, where: str, work: Path) -> None:
    """One command: in-process (main(argv), or the script as __main__), or for srun one
    real process (jax.distributed on a one-process cluster cannot start inside pytest)."""
    import faiss

    threads = faiss.omp_get_max_threads()
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in program.env:
                mp.setenv(k, v)
            if program.kind == "srun":
                env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
                       "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{_free_port()}",
                       "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}  # + the session's compilation cache
                proc = subprocess.run([sys.executable, program.target, *program.args], cwd=work, env=env,
                                      capture_output=True, text=True, timeout=300)
                assert proc.returncode == 0, f"{where}: {program.target} failed:\n{proc.stderr[-3000:]}"
                return
            if program.kind == "script":
                mp.setattr(sys, "argv", [program.target, *program.args])
                runpy.run_path(program.target, run_name="__main__")
                return
            try:
                importlib.import_module(program.target).main(list(program.args))
            except SystemExit as e:
                if e.code not in (0, None):
                    raise AssertionError(f"{where}: exit status {e.code}") from e
    finally:
        faiss.omp_set_num_threads(threads)


def file_states(work: Path, paths: list[str]) -> dict[str, tuple[int, int]]:
    return {p: ((work / p).stat().st_mtime_ns, (work / p).stat().st_size) for p in paths if (work / p).exists()}


_MAIN_JOB_RUNS: dict[tuple[str, ...], Path] = {}  # one run of each main job per session


def run_page(commands: list[Command], work: Path, stand_ins: list[str], log=print) -> dict[str, int]:
    """Run a page's commands in order in `work`: counts of commands run and excepted."""
    counts = {"run": 0, "excepted": 0, "same as the line before": 0, "make demo: outputs of its run": 0}
    done: set[docs.Program] = set()
    for cmd in commands:
        reason = exception_reason(cmd.line)
        if reason:
            if cmd.line.startswith("make demo") and "DEMO_ARGS=" in cmd.line and "EXTRA=" not in cmd.line:
                check_main_job_variant(shell_words(cmd.line), cmd.where)
            log(f"{cmd.where}: not run: {cmd.line}  ({reason})")
            counts["excepted"] += 1
            continue
        line = adapt(cmd.line)
        for i in range(2 if "$i" in line else 1):  # the sharded recipe's machines: two of them
            program = with_tiny_words(docs.resolve(shell_words(line, i), cmd.where))
            if program in done:  # the reference's line and this repository's, once resolved the same
                counts["same as the line before"] += 1
                continue
            done.add(program)
            kept = [p for p in stand_ins if p not in PAGE_REWRITES]
            before = file_states(work, kept)
            t0 = time.time()
            if program.target == "qinco_jax.cli.main_job" and program.args in _MAIN_JOB_RUNS:
                out = program.args[1]
                if _MAIN_JOB_RUNS[program.args] != work / out:
                    import shutil

                    shutil.copytree(_MAIN_JOB_RUNS[program.args], work / out, dirs_exist_ok=True)
                counts["make demo: outputs of its run"] += 1
                continue
            else:
                run_program(program, cmd.where, work)
                if program.target == "qinco_jax.cli.main_job":
                    _MAIN_JOB_RUNS[program.args] = work / program.args[1]
            assert file_states(work, kept) == before, f"{cmd.where}: {cmd.line!r} rewrote a stand-in"
            log(f"{cmd.where}: {time.time() - t0:5.1f} s  {' '.join(program.args)[:150]}")
            counts["run"] += 1
    return counts


def check_main_job_variant(words: list[str], where: str) -> None:
    from qinco_jax.cli import main_job

    variables = dict(w.split("=", 1) for w in words[1:] if "=" in w)
    args = main_job.build_parser().parse_args(variables.get("DEMO_ARGS", "").split())
    main_job.config_from_args(args)


# --------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------

RUN_PAGES = [p for p in docs.PAGES if page_commands(p)]


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs_stand_ins")
    return root, write_stand_ins(root)


@pytest.mark.parametrize("page", RUN_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_documented_commands_run(page: Path, stand_ins, tmp_path: Path, monkeypatch):
    import shutil

    root, paths = stand_ins
    work = tmp_path / "work"
    shutil.copytree(root, work)
    monkeypatch.chdir(work)
    monkeypatch.setenv("QINCO_DATA", str(work / "data"))
    tiny_named_data_sets(monkeypatch, work)
    counts = run_page(page_commands(page), work, paths)
    print(f"{page.relative_to(ROOT)}: {counts}")


def test_adaptations_change_values_only():
    """ADAPT keeps every flag and key of every command, in order (a renamed flag still
    fails), and each of its rules is used by some page."""
    used = set()
    for page in RUN_PAGES:
        for cmd in page_commands(page):
            assert option_words(adapt(cmd.line)) == option_words(cmd.line), f"{cmd.where}: {cmd.line}"
            used |= {why for pattern, _, why in ADAPT if re.search(pattern, cmd.line)}
    assert used == {why for _, _, why in ADAPT}, {why for _, _, why in ADAPT} - used


def test_exceptions_are_listed_with_their_reason():
    """What does not run: each line with its reason; every rule matches some line."""
    excepted = [(cmd, exception_reason(cmd.line)) for page in RUN_PAGES for cmd in page_commands(page)]
    excepted = [(cmd, why) for cmd, why in excepted if why]
    for cmd, why in excepted:
        assert why
        print(f"not run: {cmd.where}: {cmd.line}  ({why})")
    matched = {why for _, why in excepted}
    assert matched == {why for _, why in EXCEPTIONS}, "a rule that matches nothing: drop it"
    assert len(excepted) < 40


def test_stand_ins_are_named_by_the_pages():
    text = "\n".join(p.read_text() for p in docs.PAGES)
    for path in [*MODEL_STAND_INS, *VECTOR_STAND_INS, "c.npy", "xt_codes.npy", "xb.npz", "xt.npz", "i.faissindex"]:
        assert path in text, f"stand-in {path} is named by no page: drop it"


SYNTHETIC_PAGE = """# A page

```bash
python search/search_ivf.py --todo train_centroids --n_centroids 1048576 --nt 50_000_000 --IVF_centroids models/c.npy
python convert/codec_qinco.py --model models/bigann_8x8_L2.pt --encode --i models/c.npy --o codes.npy
```

and then `python convert/codec_qinco.py --model models/bigann_8x8_L2.pt --decode --i codes.npy --o decoded.npy`.
"""


def test_the_runner_catches_what_it_should(stand_ins, tmp_path, monkeypatch):
    """On a synthetic page: as written its commands run, each feeding the next; a renamed
    flag fails, a changed default that breaks the next command fails (train_centroids
    on another data set by default: 96-d centroids for a 128-d model), a program that
    raises fails, and a command that rewrites a stand-in fails."""
    import shutil

    from qinco_jax.cli import index as index_cli

    root, paths = stand_ins
    page = tmp_path / "page.md"

    def run_text(text: str, name: str) -> None:
        page.write_text(text)
        work = tmp_path / name
        shutil.copytree(root, work)
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(work)
            mp.setenv("QINCO_DATA", str(work / "data"))
            tiny_named_data_sets(mp, work)
            run_page(page_commands(page), work, paths, log=lambda msg: None)

    run_text(SYNTHETIC_PAGE, "as_written")
    assert np.load(tmp_path / "as_written" / "decoded.npy").shape == (K_IVF, 128)
    with pytest.raises(AssertionError, match="exit status 2"):
        run_text(SYNTHETIC_PAGE.replace("--IVF_centroids", "--ivf_centroids"), "renamed_flag")
    build_parser = index_cli.build_parser

    def other_default():
        p = build_parser()
        p.set_defaults(db="deep1M")
        return p

    monkeypatch.setattr(index_cli, "build_parser", other_default)
    with pytest.raises(Exception, match="96|128|dimension"):
        run_text(SYNTHETIC_PAGE, "changed_default")
    monkeypatch.setattr(index_cli, "build_parser", build_parser)
    with pytest.raises(Exception, match="no_such_file"):
        run_text(SYNTHETIC_PAGE.replace("--i codes.npy", "--i no_such_file.npy"), "raises")
    with pytest.raises(AssertionError, match="rewrote a stand-in"):
        run_text(SYNTHETIC_PAGE.replace("--o codes.npy", "--o xq.npy").replace("--i codes.npy", "--i xq.npy"),
                 "rewrites")
