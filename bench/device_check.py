"""One prepared check of every accelerator path, in one run under a time budget.

    python bench/device_check.py --out runs/device_check                       # GPU if JAX sees one
    python bench/device_check.py --out runs/dc --reference_dir .ref/qinco_v1   # + the PyTorch reference

On a GPU (the full mode, < 8 minutes on an H100) it checks and measures, in order:
  correctness   every reference fixture of tests/fixtures encoded and decoded on the
                device against the reference's outputs; a few sharded training steps
                (the loss must fall); with faiss, the fixture IVF index searched with
                QINCo re-ranking against the reference's recalls;
  precision     code agreement at each float32 matmul precision (the library's
                "highest" default, XLA's "default" / "high", bf16 passes, the network in
                bfloat16), on the fixtures and at the paper's size;
  matmul        the card's dense matmul rate (float32 highest, TF32, bf16) in this run;
  throughput    at the paper's size (d=128 M=8 K=256 L=2 h=256, random weights): encode
                greedy and with the README's beam / pre-selection settings, decode,
                shortlist re-ranking (qinco_jax Reranker), the sharded train step
                (training.make_mesh / make_train_step, the path that runs on eight
                devices), IVF assignment to K_IVF = 2^20 centroids; encode's useful
                FLOP rate as a fraction of the matmul rate;
  qinco2        every QINCo2 fixture of tests/fixtures/qinco2 at each (A, B) the
                reference recorded, on the device: rows of codes equal to the
                reference's, MSE, decoding of the reference's codes; then QINCo2-S
                (D = De = 128, Dh = 256, L = 2, M = 8, K = 256, random weights) encode
                throughput at (A, B) = (16, 32);
  jax_engine    the JAX IVF search engine (qinco_jax.search.jax_engine) on generated
                tables of the reference's bigann 10M index size (K_IVF = 65,536 lists,
                10M codes of 8 bytes, d = 128, uneven list sizes): its shortlists
                against a float64 brute-force scan of the same tables (a few queries),
                then ms per query at batch 10,000 for nprobe 16 and 64, shortlist only,
                and with faiss present the whole search (QINCo re-ranking of nshort at
                the paper's model size in the same jit);
  mixed precision
                QINCo2 trained (training.fit, its recipe) a few epochs in float32 then
                with the network in bfloat16 (precision=bf16 / --dtype bfloat16), same
                data and seeds: validation MSE and seconds per epoch of each, their
                ratios (informational: not part of the overall verdict);
  reference     with --reference_dir (a copy of the reference's qinco_v1 folder and
                torch), the reference's own encode, decode, re-ranking, train step and
                IVF assignment on the same device and weights, in the same run: ratios.
Without a GPU it runs the same sections at small sizes (the smoke mode) so that the
script is tested on every CI run. Each section has a time estimate; once the global
budget (--budget_s) would be overrun, the remaining sections are skipped with a note.
device_check.json (every figure, device, versions) is rewritten after every section
and the summary (summary.txt) is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from qinco_jax.models import codec  # noqa: E402
from qinco_jax.training import loop as training
from qinco_jax.formats.checkpoint import load_model, save_model  # noqa: E402
from qinco_jax.config import EncodeOptions, QincoConfig  # noqa: E402
from qinco_jax.formats.io import write_bytes  # noqa: E402
from qinco_jax.models.qinco import QincoModel  # noqa: E402

FIXTURES = os.path.join(ROOT, "tests", "fixtures")
# The reference models of tests/fixtures, by their key prefix in reference_outputs.npz.
REFERENCE_MODELS = {
    "qinco": "qinco_d32_M4_K16_L2_h32.pt",
    "qinco_lr": "qinco_lr_d32_M4_K16_L2_h32.pt",
    "ivf_qinco": "ivf_qinco_d32_IVF64_M4_K256_L1_h32.pt",
    "pq_qinco": "pq_qinco_2x_d16_M3_K16_L1_h16_opq.pt",
}
# What the CPU tests require of the same fixtures (tests/test_parity.py).
MIN_CODE_AGREEMENT = 0.995
MAX_DECODE_REL_ERROR = 1e-4
# (name, matmul precision, network dtype): the library default first.
PRECISIONS = [
    ("highest", "highest", "float32"),
    ("default", "default", "float32"),
    ("high", "high", "float32"),
    ("bf16_passes", "BF16_BF16_F32", "float32"),
    ("bfloat16_network", "highest", "bfloat16"),
]
# The QINCo2 fixtures: (file, key prefix in reference_outputs_qinco2.npz, [(A, B, key
# suffix)]); qinco2_q1 at B=4 exists only on the reference's training path.
QINCO2_FIXTURES = os.path.join(FIXTURES, "qinco2")
QINCO2_MODELS = [
    ("qinco2_d32_M4_K256_L2_de48_dh64_A8_B8.pt", "qinco2", [(8, 8, ""), (4, 1, ""), (16, 16, "")]),
    ("qinco2_qinco1mode_d32_M4_K256_L2_dh64.pt", "qinco2_q1", [(0, 1, ""), (0, 4, "_train")]),
    ("ivf_qinco2_d32_IVF64_M4_K256_L2_de48_dh64_A8_B8.pt", "ivf_qinco2", [(8, 8, ""), (4, 1, ""), (16, 16, "")]),
]
# What tests/test_qinco2.py requires of them on the CPU (issue 10).
QINCO2_MIN_EQUAL_ROWS = 0.99
QINCO2_MAX_MSE_REL = 1e-3
# QINCo2-S encode setting timed (A pre-selected candidates, B beam)
QINCO2_S_AB = (16, 32)
# (beam, preselect) settings of the README's table, greedy first.
ENCODE_SETTINGS = [(1, 0), (1, 32), (1, 16), (4, 32), (8, 0)]


# --------------------------------------------------------------------------------------
# Sizes of the two modes
# --------------------------------------------------------------------------------------

FULL = dict(d=128, M=8, K=256, L=2, h=256, n_encode=32768, n_encode_search=8192, n_decode=1 << 20,
            rerank_queries=1000, nshort=1000, train_batch=1024, train_steps=20, k_ivf=1 << 20,
            n_assign=65536, matmul_n=8192, n_precision=4096, ref_encode=4096, n_qinco2=4096, budget_s=400,
            engine_nlist=65536, engine_ntotal=10_000_000, engine_queries=10_000, engine_nprobe=(16, 64),
            engine_nshort=100,
            mp_train=65536, mp_val=4096, mp_epoch=16384, mp_epochs=3, mp_batch=1024, mp_A=16, mp_B=8)
SMOKE = dict(d=32, M=4, K=64, L=1, h=32, n_encode=512, n_encode_search=256, n_decode=4096,
             rerank_queries=20, nshort=100, train_batch=256, train_steps=4, k_ivf=4096,
             n_assign=1024, matmul_n=512, n_precision=256, ref_encode=256, n_qinco2=128, budget_s=150,
             engine_nlist=256, engine_ntotal=20_000, engine_queries=300, engine_nprobe=(4, 16), engine_nshort=20,
             mp_train=1024, mp_val=256, mp_epoch=512, mp_epochs=2, mp_batch=256, mp_A=4, mp_B=2)


def has_gpu() -> bool:
    return jax.default_backend() != "cpu"


# --------------------------------------------------------------------------------------
# Book-keeping: results, budget, sections
# --------------------------------------------------------------------------------------


class Check:
    def __init__(self, out_dir: str, sizes: dict, mode: str, budget_s: float):
        self.out_dir = out_dir
        self.sizes = sizes
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + budget_s
        self.results: dict = {"mode": mode, "budget_s": budget_s, "sizes": sizes, "sections": {},
                              "notes": []}
        os.makedirs(out_dir, exist_ok=True)

    def time_left(self) -> float:
        return self.deadline - time.perf_counter()

    def note(self, msg: str) -> None:
        self.results["notes"].append(msg)
        print(f"  note: {msg}", flush=True)

    def section(self, name: str, estimate_s: float, fn, *args) -> None:
        """Run fn(*args) -> dict of figures under results[name], unless the budget
        cannot hold its estimate; an exception fails this section only."""
        entry = {"estimate_s": estimate_s}
        if self.time_left() < estimate_s:
            entry.update(status="skipped", note=f"{self.time_left():.0f} s of the budget left, "
                                                f"section needs about {estimate_s:.0f} s")
            print(f"[{name}] skipped: {entry['note']}", flush=True)
        else:
            print(f"[{name}] ...", flush=True)
            t = time.perf_counter()
            try:
                self.results[name] = fn(*args)
                entry["status"] = "ok"
            except Exception as e:  # noqa: BLE001  (one failing section must not lose the others)
                entry.update(status="failed", error=f"{type(e).__name__}: {e}",
                             traceback=traceback.format_exc(limit=8))
                print(f"[{name}] FAILED: {entry['error']}", flush=True)
            entry["seconds"] = round(time.perf_counter() - t, 2)
            print(f"[{name}] {entry['status']} in {entry['seconds']:.1f} s", flush=True)
        self.results["sections"][name] = entry
        self.save()

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.perf_counter() - self.t0, 2)
        write_bytes(os.path.join(self.out_dir, "device_check.json"),
                    json.dumps(self.results, indent=1, default=_jsonable).encode())


def _jsonable(v):
    if isinstance(v, (np.floating, np.integer, np.bool_)):
        return v.item()
    return str(v)


def best_time(fn, check: Check, seconds: float = 1.0, max_runs: int = 5) -> float:
    """Best wall time of fn() (which must block until its result is ready) after one
    warm-up run that compiles; runs stop after `seconds` or when the budget ends."""
    fn()
    times = []
    t_end = min(time.perf_counter() + seconds, check.deadline)
    while not times or (len(times) < max_runs and time.perf_counter() < t_end):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


# --------------------------------------------------------------------------------------
# The PyTorch reference (optional)
# --------------------------------------------------------------------------------------


class Reference:
    """The reference's own modules from --reference_dir, run with this machine's torch on
    the GPU when it has one (else its CPU)."""

    def __init__(self, reference_dir: str):
        import torch

        self.torch = torch
        self.dir = os.path.abspath(reference_dir)
        if not os.path.isfile(os.path.join(self.dir, "model_qinco.py")):
            raise FileNotFoundError(f"--reference_dir {reference_dir}: no model_qinco.py there "
                                    f"(give a copy of the reference's qinco_v1 folder)")
        from qinco_jax.experiments.reference import import_reference

        reference_utils = import_reference(self.dir, "utils")
        import_reference(self.dir, "model_qinco")  # torch.load of its pickled modules needs it importable

        self.utils = reference_utils
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":  # smoke mode: torch's thread pool spins on a busy machine
            torch.set_num_threads(1)

    def load(self, path: str):
        net = self.torch.load(path, map_location=self.device, weights_only=False)
        return net.eval()

    def from_model(self, model: QincoModel):
        """The reference module holding exactly `model`'s weights (through the .pt the
        library writes, the format the reference reads)."""
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.pt")
            save_model(model, path)
            return self.load(path)

    def sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def info(self) -> dict:
        t = self.torch
        out = {"torch": t.__version__, "device": str(self.device)}
        if self.device.type == "cuda":
            out.update(name=t.cuda.get_device_name(0), allow_tf32=bool(t.backends.cuda.matmul.allow_tf32),
                       cuda=t.version.cuda)
        return out


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------


def environment() -> dict:
    dev = jax.devices()[0]
    out = {"platform": dev.platform, "device_kind": dev.device_kind, "device_count": jax.device_count(),
           "jax": jax.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
           "library_matmul_precision": codec.matmul_precision()}
    try:
        import jaxlib

        out["jaxlib"] = jaxlib.__version__
    except ImportError:
        pass
    try:
        import faiss

        out["faiss"] = faiss.__version__
    except ImportError:
        out["faiss"] = None
    return out


def matmul_rates(check: Check) -> dict:
    """The card's dense matmul rate, n^3 products, per precision (GFLOP/s)."""
    n = check.sizes["matmul_n"]
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    out = {"n": n}
    for name, prec, dt in [("float32_highest", "highest", jnp.float32), ("float32_default", "default", jnp.float32),
                           ("bfloat16", "default", jnp.bfloat16)]:
        with jax.default_matmul_precision(prec):
            f = jax.jit(lambda m: m @ m)
        x = a.astype(dt)
        t = best_time(lambda: f(x).block_until_ready(), check, 0.5)
        out[f"{name}_gflops"] = 2 * n**3 / t / 1e9
    return out


def at_every_precision(encode_fn, errors: dict) -> dict:
    """{name: encode_fn(dtype)} for every setting of PRECISIONS (the kernels' matmul
    precision changed in turn: each change recompiles); a setting this backend refuses
    is noted in errors["errors"]. The library default is restored after."""
    out = {}
    try:
        for name, prec, dt in PRECISIONS:
            try:
                codec.set_matmul_precision(prec)
                out[name] = encode_fn(dt)
            except Exception as e:  # noqa: BLE001  (an unsupported mode must not stop the others)
                errors.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
    finally:
        codec.set_matmul_precision("highest")
    return out


def fixtures_correctness(check: Check) -> dict:
    """Every reference fixture at every precision: code agreement and decode error."""
    with np.load(os.path.join(FIXTURES, "reference_outputs.npz")) as f:
        outputs = {k: f[k] for k in f.files}
    x = outputs["x"]
    models = {key: load_model(os.path.join(FIXTURES, fname)) for key, fname in REFERENCE_MODELS.items()}
    out: dict = {"models": {}}
    by_precision = at_every_precision(lambda dt: {k: codec.encode(m, x, EncodeOptions(dtype=dt)) for k, m in models.items()}, out)
    passed = True
    for key, model in models.items():
        codes_ref, dec_ref = outputs[f"{key}_codes"], outputs[f"{key}_decoded"]
        res: dict = {"agreement": {name: float(np.mean(codes[key] == codes_ref))
                                   for name, codes in by_precision.items()}}
        dec = codec.decode(model, codes_ref)
        res["decode_rel_error"] = float(np.linalg.norm(dec - dec_ref) / np.linalg.norm(dec_ref))
        if key == "ivf_qinco":  # the IVF lists imposed, as the index build does
            res["agreement_code0"] = float(np.mean(codec.encode(model, x, code0=codes_ref[:, 0]) == codes_ref))
        res["passed"] = (res["agreement"].get("highest", 0.0) >= MIN_CODE_AGREEMENT
                         and res["decode_rel_error"] < MAX_DECODE_REL_ERROR
                         and res.get("agreement_code0", 1.0) >= MIN_CODE_AGREEMENT)
        passed &= res["passed"]
        out["models"][key] = res
    out["passed"] = bool(passed)
    return out


def qinco2_correctness(check: Check) -> dict:
    """Every QINCo2 fixture at every (A, B) the reference recorded, encoded and decoded
    on the device (library default precision) against the reference's outputs."""
    with np.load(os.path.join(QINCO2_FIXTURES, "reference_outputs_qinco2.npz")) as f:
        outputs = {k: f[k] for k in f.files}
    x = outputs["x"]
    out: dict = {"models": {}}
    passed = True
    for fname, prefix, settings in QINCO2_MODELS:
        model = load_model(os.path.join(QINCO2_FIXTURES, fname))
        for A, B, suffix in settings:
            key = f"{prefix}_A{A}_B{B}"
            codes, err = codec.encode(model, x, EncodeOptions(beam=B, preselect=A), return_errors=True)
            ref_codes, ref_mse = outputs[f"{key}_codes{suffix}"], float(outputs[f"{key}_mse{suffix}"])
            dec_ref = outputs[f"{key}_decoded{suffix}"]
            dec = codec.decode(model, ref_codes)
            res = {"equal_rows": float(np.mean(np.all(codes == ref_codes, axis=1))),
                   "mse": float(err.mean()), "reference_mse": ref_mse,
                   "mse_rel_diff": abs(float(err.mean()) - ref_mse) / ref_mse,
                   "decode_rel_error": float(np.abs(dec - dec_ref).max() / np.abs(dec_ref).max())}
            res["passed"] = bool(res["equal_rows"] >= QINCO2_MIN_EQUAL_ROWS and res["mse_rel_diff"] <= QINCO2_MAX_MSE_REL
                                 and res["decode_rel_error"] <= MAX_DECODE_REL_ERROR)
            passed &= res["passed"]
            out["models"][key + suffix] = res
    out["passed"] = bool(passed)
    return out


def qinco2_s_model(check: Check) -> QincoModel:
    """QINCo2-S at the issue's size (De = D) in the full mode, the smoke sizes otherwise."""
    s = check.sizes
    A, _ = QINCO2_S_AB
    return QincoModel.init(QincoConfig(d=s["d"], K=s["K"], M=s["M"], L=s["L"], h=s["h"], de=s["d"], arch="qinco2",
                                       A=min(A, s["K"]), B=QINCO2_S_AB[1]), 0)


def qinco2_encode_throughput(check: Check) -> dict:
    """QINCo2-S encoding at (A, B) = (16, 32) with its substep pre-selection (random
    weights; the figure depends on the sizes, not the values)."""
    model = qinco2_s_model(check)
    c = model.config
    n = check.sizes["n_qinco2"]
    x = np.random.RandomState(0).randn(n, c.d).astype(np.float32)
    opts = EncodeOptions(beam=c.B, preselect=c.A, proxy="substep")
    t = best_time(lambda: codec.encode(model, x, opts), check)
    out = {"model": c.describe(), "A": c.A, "B": c.B, "n": n, "vectors_per_s": n / t,
           "batch_size": codec.default_encode_batch_size(model, c.B, c.A),
           "useful_gflops": n / t * flops_per_vector(c, c.A, c.B) / 1e9}
    print(f"  QINCo2 encode A={c.A} B={c.B}: {n / t:,.0f} vec/s", flush=True)
    check.note("the QINCo2 reference is not timed here (--reference_dir is the QINCo v1 folder); "
               "bench/bench_qinco2.py times QINCo2 encoding against it")
    return out


def mixed_precision(check: Check) -> dict:
    """QINCo2 training in float32 and in mixed precision (network bfloat16, weights,
    optimizer and loss float32), one after the other on the same data and initial
    model: validation MSE and seconds per epoch (the first epoch, which compiles, left
    out; validation included). Data: random vectors of a 16-dimensional subspace plus
    noise, so that there is structure to learn."""
    s = check.sizes
    c = QincoConfig(d=s["d"], K=s["K"], M=s["M"], L=s["L"], h=s["h"], de=s["d"], arch="qinco2",
                    A=min(s["mp_A"], s["K"]), B=s["mp_B"])
    rs = np.random.RandomState(0)
    basis = rs.randn(16, c.d).astype(np.float32)
    n = s["mp_train"] + s["mp_val"]
    # scaled to unit variance per dimension, the scale of the random initial codebooks
    x = (rs.randn(n, 16).astype(np.float32) @ basis / 4 + 0.1 * rs.randn(n, c.d).astype(np.float32))
    xt, xval = x[:s["mp_train"]], x[s["mp_train"]:]
    model = QincoModel.init(c, 0)
    out = {"model": c.describe(), "n_train": len(xt), "n_val": len(xval), "epoch_size": s["mp_epoch"],
           "batch_size": s["mp_batch"], "epochs": s["mp_epochs"]}
    for dtype in ("float32", "bfloat16"):
        cfg = training.qinco2_train_config(batch_size=s["mp_batch"], epochs=s["mp_epochs"], ramp_epochs=1,
                                           epoch_size=s["mp_epoch"], stop_patience=s["mp_epochs"],
                                           max_epochs=s["mp_epochs"], dtype=dtype, progress=False)
        res = training.fit(model, xt, xval, cfg, log=lambda msg: None)
        epochs = res.history["epochs"]
        secs = [e["seconds"] for e in epochs]
        out[dtype] = {"val_mse": [e["val_mse"] for e in epochs], "seconds": secs,
                      "seconds_per_epoch": float(np.median(secs[1:] or secs)),
                      "weights_float32": all(a.dtype == np.float32 for a in jax.tree.leaves(res.last.params))}
        print(f"  {dtype}: val MSE {out[dtype]['val_mse'][-1]:.4g}, {out[dtype]['seconds_per_epoch']:.2f} s/epoch",
              flush=True)
    f32, bf16 = out["float32"], out["bfloat16"]
    out["mse_ratio"] = bf16["val_mse"][-1] / f32["val_mse"][-1]
    out["time_ratio"] = bf16["seconds_per_epoch"] / f32["seconds_per_epoch"]
    out["passed"] = bool(np.isfinite(out["mse_ratio"]) and out["mse_ratio"] < 1.1 and bf16["weights_float32"])
    if not has_gpu():
        check.note("mixed precision timed on the CPU: bfloat16 is no faster there (no bfloat16 matrix units)")
    return out


def load_reference(check: Check, reference_dir: str, holder: dict) -> dict:
    """Import torch and the reference (after the JAX correctness sections, so that a
    failure here loses none of them); its own encode of the fixtures on this device."""
    ref = Reference(reference_dir)
    holder["ref"] = ref
    with np.load(os.path.join(FIXTURES, "reference_outputs.npz")) as f:
        outputs = {k: f[k] for k in f.files}
    out = ref.info()
    out["fixture_agreement_on_device"] = {}
    for key, fname in REFERENCE_MODELS.items():
        if key == "pq_qinco":  # its encode is a numpy / faiss pipeline
            continue
        net = ref.load(os.path.join(FIXTURES, fname))
        with ref.torch.no_grad():
            xt = ref.torch.from_numpy(outputs["x"] / np.float32(net.db_scale)).to(ref.device)
            codes = net.encode(xt)[0].cpu().numpy()
        out["fixture_agreement_on_device"][key] = float(np.mean(codes == outputs[f"{key}_codes"]))
    return out


def _sharded_trainer(model: QincoModel, batch_size: int, lr: float):
    """The training loop's own pieces (training.fit's set-up): mesh over all local
    devices, replicated parameters, rows of every batch sharded over the mesh."""
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = training.make_mesh(-1)
    training.check_batch_size(batch_size, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    optimizer = training.make_optimizer()
    step = training.make_train_step(training.make_encode_fn(), optimizer, mesh)
    trainable, frozen = training.split_trainable(model.params, model.config.is_ivf)
    trainable = jax.device_put(trainable, replicated)
    frozen = jax.device_put(frozen, replicated)
    state = {"trainable": trainable, "opt": jax.device_put(optimizer.init(trainable), replicated)}

    def run(xb, cb, wb):
        state["trainable"], state["opt"], loss = step(state["trainable"], state["opt"], frozen, xb, cb, wb, lr)
        return loss

    return mesh, run


def train_correctness(check: Check) -> dict:
    """Training steps on the fixture training set through the sharded step: the loss
    must fall."""
    with open(os.path.join(FIXTURES, "train_reference.json")) as f:
        c = json.load(f)["config"]
    xt = np.load(os.path.join(FIXTURES, "train_xt.npy"))
    cfg = QincoConfig(d=xt.shape[1], K=c["K"], M=c["M"], L=c["L"], h=c["h"], db_scale=float(np.float32(xt.max())))
    model = QincoModel.init(cfg, 0)
    mesh, run = _sharded_trainer(model, c["bs"], c["lr"])
    feeder = training.BatchFeeder(xt, None, cfg.db_scale, c["bs"], mesh)
    batches = training.epoch_batches(len(xt), c["bs"], 0)[:30]
    losses = [float(run(*feeder(idx))) for idx in batches]
    first, last = float(np.mean(losses[:5])), float(np.mean(losses[-5:]))
    return {"model": cfg.describe(), "steps": len(losses), "devices": int(mesh.devices.size),
            "loss_first5": first, "loss_last5": last, "losses": losses,
            "passed": bool(np.all(np.isfinite(losses)) and last < 0.9 * first)}


def ivf_search_correctness(check: Check) -> dict:
    """The fixture IVF512 index searched with QINCo re-ranking, against the reference's
    recalls (needs faiss)."""
    try:
        from qinco_jax.search import index as ivf
        from qinco_jax.search.sweep import explore
    except ImportError as e:
        return {"skipped": f"qinco_jax.search needs faiss ({e}): carry the faiss wheel (README, GPU section)",
                "passed": None}
    model = load_model(os.path.join(FIXTURES, "ivf_qinco_d32_IVF512_M4_K256_L1_h32.pt"))
    index = ivf.read_index(os.path.join(FIXTURES, "ivf512_rq4x8.faissindex"))
    xq, gt = np.load(os.path.join(FIXTURES, "ivf_xq.npy")), np.load(os.path.join(FIXTURES, "ivf_gt.npy"))
    with open(os.path.join(FIXTURES, "ivf512_rq4x8.json")) as f:
        expected = {json.dumps(r["parameters"], sort_keys=True): r["recalls"] for r in json.load(f)["results"]}
    results = explore(index, model, xq, gt, nprobe=[1, 4, 16], nshort=[10, 50, 100], log=lambda m: None)
    worst = max(abs(float(r["recalls"][k]) - float(expected[json.dumps(r["parameters"], sort_keys=True)][k]))
                for r in results for k in ("1", "10", "100"))
    # the CPU test's slack: two queries of 200 (ties broken differently)
    return {"points": len(results), "max_recall_difference": worst, "passed": bool(worst <= 0.01 + 1e-9)}


def paper_model(check: Check) -> QincoModel:
    s = check.sizes
    return QincoModel.init(QincoConfig(d=s["d"], K=s["K"], M=s["M"], L=s["L"], h=s["h"]), 0)


def paper_precision(check: Check, ref: Reference | None) -> dict:
    """At the paper's size (random weights): codes at each precision against "highest",
    and against the reference's when given."""
    model = paper_model(check)
    x = np.random.RandomState(1).randn(check.sizes["n_precision"], model.d).astype(np.float32)
    out: dict = {"n": len(x)}
    codes = at_every_precision(lambda dt: codec.encode(model, x, EncodeOptions(dtype=dt)), out)
    out["agreement_with_highest"] = {n: float(np.mean(c == codes["highest"])) for n, c in codes.items()}
    if ref is not None:
        net = ref.from_model(model)
        with ref.torch.no_grad():
            rc = net.encode(ref.torch.from_numpy(x).to(ref.device))[0].cpu().numpy()
        out["agreement_with_reference"] = {n: float(np.mean(c == rc)) for n, c in codes.items()}
    return out


def flops_per_vector(c: QincoConfig, candidates: int, beam: int = 1) -> float:
    """Useful work of an encode: every neural step runs its L residual blocks on the
    candidates (4·L·d·h each) plus their distances, and the input half of the concat."""
    per_step = beam * (candidates * (4 * c.L * c.d * c.h + 2 * c.d) + 2 * c.d * c.d)
    return c.num_steps * per_step


def encode_throughput(check: Check, ref: Reference | None) -> dict:
    model = paper_model(check)
    c = model.config
    s = check.sizes
    rs = np.random.RandomState(0)
    out: dict = {"model": c.describe(), "settings": {}}
    for beam, pre in ENCODE_SETTINGS:
        n = s["n_encode"] if (beam, pre) == (1, 0) else s["n_encode_search"]
        x = rs.randn(n, c.d).astype(np.float32)
        t = best_time(lambda: codec.encode(model, x, EncodeOptions(beam=beam, preselect=pre)), check)
        cands = c.K if not pre else min(pre, c.K)
        vps = n / t
        out["settings"][f"beam{beam}_pre{pre}"] = {
            "vectors_per_s": vps, "n": n, "batch_size": codec.default_encode_batch_size(model, beam, pre),
            "useful_gflops": vps * flops_per_vector(c, cands, beam) / 1e9}
        print(f"  encode beam={beam} preselect={pre}: {vps:,.0f} vec/s", flush=True)
    out["greedy_vectors_per_s"] = out["settings"]["beam1_pre0"]["vectors_per_s"]
    out["greedy_useful_gflops"] = out["settings"]["beam1_pre0"]["useful_gflops"]
    if ref is not None:
        net = ref.from_model(model)
        xr = ref.torch.from_numpy(rs.randn(s["ref_encode"], c.d).astype(np.float32)).to(ref.device)

        def run():
            with ref.torch.no_grad():
                net.encode(xr)
            ref.sync()

        out["reference_greedy_vectors_per_s"] = s["ref_encode"] / best_time(run, check)
        out["speedup_vs_reference"] = out["greedy_vectors_per_s"] / out["reference_greedy_vectors_per_s"]
    return out


def decode_throughput(check: Check, ref: Reference | None) -> dict:
    model = paper_model(check)
    c = model.config
    n = check.sizes["n_decode"]
    codes = np.random.RandomState(0).randint(c.K, size=(n, c.M)).astype(np.int32)
    out = {"vectors_per_s": n / best_time(lambda: codec.decode(model, codes), check), "n": n}
    if ref is not None:
        net = ref.from_model(model)
        nr = min(n, 1 << 18)
        cr = ref.torch.from_numpy(codes[:nr].astype(np.int64)).to(ref.device)

        def run():
            with ref.torch.no_grad():
                net.decode(cr)
            ref.sync()

        out["reference_vectors_per_s"] = nr / best_time(run, check)
        out["speedup_vs_reference"] = out["vectors_per_s"] / out["reference_vectors_per_s"]
    return out


def rerank_throughput(check: Check, ref: Reference | None) -> dict:
    """Shortlist re-ranking: decode nq x nshort codes, exact distances, best 100."""
    try:
        from qinco_jax.search.rerank import Reranker
    except ImportError as e:
        return {"skipped": f"the Reranker's module (qinco_jax.search.rerank) imports faiss ({e}): carry the faiss wheel"}
    model = paper_model(check)
    c = model.config
    nq, ns = check.sizes["rerank_queries"], check.sizes["nshort"]
    rs = np.random.RandomState(0)
    xq = rs.randn(nq, c.d).astype(np.float32)
    codes = rs.randint(c.K, size=(nq, ns, c.M)).astype(np.int32)
    valid = np.ones((nq, ns), bool)
    reranker = Reranker(model)
    reranker.warm_up(nq, ns)
    t = best_time(lambda: reranker(xq, codes, valid), check)
    out = {"queries": nq, "nshort": ns, "queries_per_s": nq / t, "shortlist_entries_per_s": nq * ns / t}
    if ref is not None:
        # the reference's steps (search_ivf.py): decode in batches of its --bs 4096,
        # then numpy distances and argsort; its decode runs on this device here
        net = ref.from_model(model)
        flat = ref.torch.from_numpy(codes.reshape(-1, c.M).astype(np.int64))

        def run():
            with ref.torch.no_grad():
                parts = [net.decode(flat[i:i + 4096].to(ref.device)).cpu().numpy()
                         for i in range(0, len(flat), 4096)]
            short = np.vstack(parts).reshape(nq, ns, c.d)
            dis = ((xq.reshape(nq, 1, c.d) - short) ** 2).sum(2)
            np.argsort(dis, axis=1)[:, :100]

        out["reference_queries_per_s"] = nq / best_time(run, check, max_runs=2)
        out["speedup_vs_reference"] = out["queries_per_s"] / out["reference_queries_per_s"]
    return out


def generated_ivf_tables(nlist: int, ntotal: int, d: int, M: int, K: int, seed: int = 0):
    """IVF-AQ tables as a faiss index would hold them, generated: Gaussian centroids
    and codebooks, uneven list sizes (Gamma(2)-distributed, as k-means lists are),
    random codes and 8-bit-like decoded norms."""
    from qinco_jax.search.jax_engine import IvfTables

    rs = np.random.default_rng(seed)
    weights = rs.gamma(2.0, 1.0, nlist)
    sizes = rs.multinomial(ntotal, weights / weights.sum())
    list_offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    centroids = (10 * rs.standard_normal((nlist, d))).astype(np.float32)
    codebooks = (rs.standard_normal((M * K, d)) / np.sqrt(M)).astype(np.float32)
    codes = rs.integers(0, K, (ntotal, M), dtype=np.int32)
    norms = rs.uniform(0.5 * d, 1.5 * d, ntotal).astype(np.float32)
    return IvfTables(centroids, codebooks, np.arange(M + 1, dtype=np.int64) * K, codes, norms,
                     rs.permutation(ntotal).astype(np.int64), list_offsets, "qint8")


def brute_force_shortlist(tables, xq: np.ndarray, nprobe: int, n: int):
    """faiss's scan in float64 by its own formula: ‖q − c‖² + n(x̂) − 2⟨q − c, x̂⟩ over
    the exact nprobe nearest lists. Returns per query (distances, ids), nearest first."""
    c = tables.centroids.astype(np.float64)
    cb = tables.codebooks.astype(np.float64)
    out = []
    for q in xq.astype(np.float64):
        coarse = ((c - q) ** 2).sum(1)
        lists = np.argsort(coarse)[:nprobe]
        dis, ids = [], []
        for l in lists:
            a, b = tables.list_offsets[l], tables.list_offsets[l + 1]
            rec = sum(cb[tables.offsets[m] + tables.codes[a:b, m]] for m in range(tables.M))
            dis.append(coarse[l] + tables.norms[a:b] - 2 * (rec @ (q - c[l])))
            ids.append(tables.ids[a:b])
        dis, ids = np.concatenate(dis), np.concatenate(ids)
        order = np.argsort(dis, kind="stable")[:n]
        out.append((dis[order], ids[order]))
    return out


def jax_engine_search(check: Check) -> dict:
    """The JAX IVF engine at the bigann 10M index size (generated tables): correctness
    against a float64 brute-force scan, then ms per query at each nprobe."""
    from qinco_jax.search.jax_engine import JaxIvfEngine

    sz = check.sizes
    d, M, K = 128, 8, 256
    t = time.perf_counter()
    tables = generated_ivf_tables(sz["engine_nlist"], sz["engine_ntotal"], d, M, K)
    t_generate = time.perf_counter() - t
    t = time.perf_counter()
    engine = JaxIvfEngine.from_tables(tables)
    t_build = time.perf_counter() - t
    rs = np.random.default_rng(1)
    nq, ns = sz["engine_queries"], sz["engine_nshort"]
    xq = (tables.centroids[rs.integers(0, tables.nlist, nq)] + rs.standard_normal((nq, d))).astype(np.float32)
    sizes = np.diff(tables.list_offsets)
    out = {"nlist": tables.nlist, "ntotal": tables.ntotal, "d": d, "M": M, "K": K, "queries": nq, "nshort": ns,
           "list_size_mean": float(sizes.mean()), "list_size_max": int(sizes.max()), "generate_s": t_generate,
           "build_s": t_build, "chunk": engine.layout.chunk, "block_bytes": engine.block_bytes}
    # correctness: the same shortlists as the float64 scan, up to float ties at the edge
    nprobe0 = sz["engine_nprobe"][0]
    n_check = 16
    D, I = engine.shortlist(xq[:n_check], nprobe0, ns)
    agree = []
    for (dref, iref), dq, iq in zip(brute_force_shortlist(tables, xq[:n_check], nprobe0, ns), D, I):
        edge = dref[-1] if len(dref) else 0.0
        common = len(set(iref) & set(iq[iq >= 0]))
        at_edge = np.sum(np.abs(dref - edge) <= 1e-5 * max(abs(edge), 1.0))
        agree.append(common >= len(iref) - at_edge)
    out["shortlists_checked"] = n_check
    out["shortlists_equal"] = int(sum(agree))
    out["passed"] = bool(all(agree))
    for nprobe in sz["engine_nprobe"]:
        t_s = best_time(lambda: engine.shortlist(xq, nprobe, ns), check, seconds=2.0, max_runs=3)
        blocks, _ = engine.plan(np.ascontiguousarray(xq), nprobe)
        out[f"nprobe{nprobe}"] = {"shortlist_ms_per_query": 1000 * t_s / nq, "queries_per_s": nq / t_s,
                                  "blocks": len(blocks), "shapes": len({b.slots.shape for b in blocks}),
                                  "codes_scanned_per_query": float(sizes[engine.coarse(xq[:256], nprobe)[1]].sum(1).mean())}
    try:
        from qinco_jax.search.rerank import Reranker
    except ImportError as e:
        out["rerank"] = f"skipped: the re-ranking's module (qinco_jax.search.rerank) imports faiss ({e})"
        return out
    model = QincoModel.init(QincoConfig(d=d, K=K, M=M, L=2, h=256, variant="ivf", K_IVF=tables.nlist))
    reranker = Reranker(model)
    side = (reranker.params, reranker.mean, reranker.std)
    for nprobe in sz["engine_nprobe"]:
        t_f = best_time(lambda: engine.search(xq, nprobe, ns, 10, side), check, seconds=2.0, max_runs=3)
        out[f"nprobe{nprobe}"]["search_ms_per_query"] = 1000 * t_f / nq
    return out


def train_throughput(check: Check, ref: Reference | None) -> dict:
    """The sharded train step (make_mesh / make_train_step) at the paper's size."""
    model = paper_model(check)
    c = model.config
    bs, steps = check.sizes["train_batch"], check.sizes["train_steps"]
    rs = np.random.RandomState(0)
    xt = rs.randn(bs * 4, c.d).astype(np.float32)
    mesh, run = _sharded_trainer(model, bs, 1e-4)
    feeder = training.BatchFeeder(xt, None, c.db_scale, bs, mesh)
    placed = [feeder(np.arange(i * bs, (i + 1) * bs)) for i in range(4)]
    float(run(*placed[0]))  # compile
    t = time.perf_counter()
    for i in range(steps):
        loss = run(*placed[i % 4])
    float(loss)
    step_s = (time.perf_counter() - t) / steps
    out = {"model": c.describe(), "batch_size": bs, "devices": int(mesh.devices.size),
           "mesh_axis": list(mesh.axis_names), "step_s": step_s, "vectors_per_s": bs / step_s}
    if ref is not None:
        torch = ref.torch
        net = ref.from_model(model).train()
        opt = torch.optim.Adam(net.parameters(), lr=1e-4)
        batches = [torch.from_numpy(xt[i * bs:(i + 1) * bs]).to(ref.device) for i in range(4)]

        def one(i):  # the body of the reference's train_one_epoch
            net.zero_grad()
            _, _, losses = net(batches[i % 4])
            loss = losses.sum() / bs / c.d
            loss.backward()
            opt.step()
            return loss.item()

        one(0)
        n_ref = max(2, steps // 4)
        t = time.perf_counter()
        for i in range(n_ref):
            one(i)
        ref.sync()
        out["reference_step_s"] = (time.perf_counter() - t) / n_ref
        out["speedup_vs_reference"] = out["reference_step_s"] / step_s
    return out


def ivf_assign_throughput(check: Check, ref: Reference | None) -> dict:
    """Exact nearest of K_IVF centroids (the IVF step of encoding) for n vectors."""
    s = check.sizes
    rs = np.random.RandomState(0)
    centroids = rs.randn(s["k_ivf"], s["d"]).astype(np.float32)
    x = rs.randn(s["n_assign"], s["d"]).astype(np.float32)
    t = best_time(lambda: codec.nearest_rows(x, centroids), check)
    out = {"k_ivf": s["k_ivf"], "n": len(x), "vectors_per_s": len(x) / t,
           "gflops": 2 * len(x) * s["k_ivf"] * s["d"] / t / 1e9}
    if ref is not None:
        torch = ref.torch
        xc = torch.from_numpy(centroids).to(ref.device)
        xr = torch.from_numpy(x).to(ref.device)

        def run():
            ref.utils.assign_to_codebook(xr, xc)
            ref.sync()

        out["reference_vectors_per_s"] = len(x) / best_time(run, check, max_runs=2)
        out["speedup_vs_reference"] = out["vectors_per_s"] / out["reference_vectors_per_s"]
    return out


# --------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------


def summary(r: dict) -> str:
    env = r.get("environment", {})
    lines = [f"QINCo device check ({r['mode']} mode) on {env.get('device_kind', '?')} x{env.get('device_count', '?')}, "
             f"jax {env.get('jax', '?')}, torch {r.get('reference', {}).get('torch')}, "
             f"faiss {env.get('faiss')}, {r['elapsed_s']:.0f} s of a {r['budget_s']:.0f} s budget"]
    fx = r.get("fixtures", {})
    if fx:
        lines.append(f"correctness: fixtures {'PASS' if fx['passed'] else 'FAIL'}")
        for k, m in fx["models"].items():
            agree = " ".join(f"{n} {100 * v:.1f}%" for n, v in m["agreement"].items())
            lines.append(f"  {k:10s} code agreement: {agree}; decode rel. error {m['decode_rel_error']:.1e}")
    tr = r.get("train")
    if tr:
        lines.append(f"  training: {tr['steps']} sharded steps on {tr['devices']} device(s), loss "
                     f"{tr['loss_first5']:.4g} -> {tr['loss_last5']:.4g}: {'PASS' if tr['passed'] else 'FAIL'}")
    sr = r.get("ivf_search")
    if sr:
        lines.append("  IVF search: " + (sr["skipped"] if "skipped" in sr else
                                         f"max recall difference {sr['max_recall_difference']:.3f} over "
                                         f"{sr['points']} points: {'PASS' if sr['passed'] else 'FAIL'}"))
    q2 = r.get("qinco2")
    if q2:
        lines.append(f"correctness: QINCo2 fixtures {'PASS' if q2['passed'] else 'FAIL'}")
        for k, m in q2["models"].items():
            lines.append(f"  {k:22s} rows equal {100 * m['equal_rows']:.1f}%, MSE {m['mse']:.2f} "
                         f"(reference {m['reference_mse']:.2f}), decode rel. error {m['decode_rel_error']:.1e}")
    rf = r.get("reference")
    if rf:
        lines.append(f"reference on {rf['device']} (torch {rf['torch']}, TF32 {rf.get('allow_tf32')}): fixture codes "
                     "equal to its CPU outputs: " + " ".join(
                         f"{k} {100 * v:.1f}%" for k, v in rf["fixture_agreement_on_device"].items()))
    pp = r.get("paper_precision")
    if pp:
        lines.append("precision at the paper's size, codes equal to 'highest': " + " ".join(
            f"{n} {100 * v:.1f}%" for n, v in pp["agreement_with_highest"].items()))
        if "agreement_with_reference" in pp:
            lines.append("  ... equal to the reference's: " + " ".join(
                f"{n} {100 * v:.1f}%" for n, v in pp["agreement_with_reference"].items()))
    mm = r.get("matmul")
    if mm:
        lines.append(f"matmul {mm['n']}^3: float32 {mm['float32_highest_gflops']:,.0f}, default (TF32 on GPUs) "
                     f"{mm['float32_default_gflops']:,.0f}, bfloat16 {mm['bfloat16_gflops']:,.0f} GFLOP/s")
    en = r.get("encode")
    if en:
        lines.append(f"encode {en['model']}:")
        for k, v in en["settings"].items():
            lines.append(f"  {k:14s} {v['vectors_per_s']:12,.0f} vec/s  {v['useful_gflops']:10,.0f} useful GFLOP/s")
        if mm:
            lines.append(f"  greedy reaches {100 * en['greedy_useful_gflops'] / mm['float32_highest_gflops']:.0f}% of "
                         f"the float32 matmul rate")
    for key, label, unit in [("decode", "decode", "vectors_per_s"), ("rerank", "re-rank", "queries_per_s"),
                             ("ivf_assign", "IVF assign", "vectors_per_s")]:
        v = r.get(key)
        if v:
            lines.append(f"{label}: " + (v["skipped"] if "skipped" in v else f"{v[unit]:,.0f} {unit.replace('_', ' ')}"))
    qe = r.get("qinco2_encode")
    if qe:
        lines.append(f"QINCo2 encode {qe['model']} at A={qe['A']} B={qe['B']}: {qe['vectors_per_s']:,.0f} vec/s, "
                     f"{qe['useful_gflops']:,.0f} useful GFLOP/s")
    je = r.get("jax_engine")
    if je:
        lines.append(f"JAX IVF engine, {je['nlist']} lists, {je['ntotal']:,} codes, batch {je['queries']}: shortlists "
                     f"{je['shortlists_equal']}/{je['shortlists_checked']} equal to the float64 scan")
        for key in sorted((k for k in je if k.startswith("nprobe")), key=lambda k: int(k[len("nprobe"):])):
            v = je[key]
            full_search = (f", whole search {v['search_ms_per_query']:.4f} ms/query"
                           if "search_ms_per_query" in v else "")
            lines.append(f"  {key}: shortlist {v['shortlist_ms_per_query']:.4f} ms/query "
                         f"({v['queries_per_s']:,.0f} q/s, {v['codes_scanned_per_query']:,.0f} codes/query){full_search}")
    mp = r.get("mixed_precision")
    if mp:
        lines.append(f"mixed precision training {mp['model']}: bfloat16 val MSE {mp['bfloat16']['val_mse'][-1]:.4g} "
                     f"vs float32 {mp['float32']['val_mse'][-1]:.4g} ({mp['mse_ratio']:.3f}x), "
                     f"{mp['bfloat16']['seconds_per_epoch']:.2f} vs {mp['float32']['seconds_per_epoch']:.2f} s/epoch "
                     f"({mp['time_ratio']:.2f}x the time): {'PASS' if mp['passed'] else 'FAIL'} (informational)")
    tt = r.get("train_step")
    if tt:
        lines.append(f"sharded train step (batch {tt['batch_size']}, {tt['devices']} device(s)): "
                     f"{1000 * tt['step_s']:.1f} ms, {tt['vectors_per_s']:,.0f} vec/s")
    ratios = {k: r[k]["speedup_vs_reference"] for k in ("encode", "decode", "rerank", "train_step", "ivf_assign")
              if isinstance(r.get(k), dict) and "speedup_vs_reference" in r[k]}
    if ratios:
        lines.append("speed-up over the PyTorch reference (same device, weights, run): "
                     + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    else:
        lines.append("no PyTorch reference timed (give --reference_dir with torch installed)")
    bad = [f"{k} ({v['status']})" for k, v in r["sections"].items() if v["status"] != "ok"]
    if bad:
        lines.append("sections not completed: " + ", ".join(bad))
    for n in r["notes"]:
        lines.append(f"note: {n}")
    lines.append(f"overall: {'PASS' if r.get('passed') else 'FAIL'}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/device_check", help="folder for device_check.json and summary.txt")
    p.add_argument("--reference_dir", default="", help="a copy of the reference's qinco_v1 folder: time it too")
    p.add_argument("--mode", choices=["auto", "full", "smoke"], default="auto",
                   help="auto: full sizes where JAX finds a GPU, smoke sizes otherwise")
    p.add_argument("--budget_s", type=float, default=0, help="global time budget (0: the mode's default)")
    p.add_argument("--sections", default="", help="comma-separated sections to run (default: all), e.g. "
                   "environment,jax_engine")
    for k in ("d", "M", "K", "L", "h", "k_ivf", "n_encode", "n_decode", "train_batch"):
        p.add_argument(f"--{k}", type=int, default=0, help=f"override the mode's {k}")
    args = p.parse_args(argv)

    mode = args.mode if args.mode != "auto" else ("full" if has_gpu() else "smoke")
    sizes = dict(FULL if mode == "full" else SMOKE)
    sizes.update({k: getattr(args, k) for k in ("d", "M", "K", "L", "h", "k_ivf", "n_encode", "n_decode",
                                                 "train_batch") if getattr(args, k)})
    check = Check(args.out, sizes, mode, args.budget_s or sizes["budget_s"])
    if args.sections:
        wanted = {w.strip() for w in args.sections.split(",") if w.strip()} | {"environment"}
        section = check.section
        check.section = lambda name, *a: section(name, *a) if name in wanted else None
    if not args.reference_dir:
        check.note("no --reference_dir: the PyTorch reference is not timed, no ratios")
    if mode == "smoke":
        check.note("smoke mode (no GPU found or --mode smoke): small sizes, figures are not the paper's size")

    full = mode == "full"
    check.section("environment", 0, environment)
    check.section("fixtures", 60 if full else 15, fixtures_correctness, check)
    check.section("train", 30 if full else 10, train_correctness, check)
    check.section("ivf_search", 20 if full else 10, ivf_search_correctness, check)
    check.section("qinco2", 30 if full else 15, qinco2_correctness, check)
    check.section("matmul", 15 if full else 3, matmul_rates, check)
    holder: dict = {}
    if args.reference_dir:
        check.section("reference", 20 if full else 5, load_reference, check, args.reference_dir, holder)
    ref = holder.get("ref")
    check.section("paper_precision", 40 if full else 5, paper_precision, check, ref)
    check.section("encode", 70 if full else 10, encode_throughput, check, ref)
    check.section("decode", 15 if full else 3, decode_throughput, check, ref)
    check.section("train_step", 40 if full else 10, train_throughput, check, ref)
    check.section("rerank", 20 if full else 5, rerank_throughput, check, ref)
    check.section("ivf_assign", 25 if full else 5, ivf_assign_throughput, check, ref)
    check.section("qinco2_encode", 30 if full else 5, qinco2_encode_throughput, check)
    check.section("jax_engine", 120 if full else 10, jax_engine_search, check)
    check.section("mixed_precision", 60 if full else 30, mixed_precision, check)

    r = check.results
    verdicts = [r.get(k, {}).get("passed") for k in ("fixtures", "train", "ivf_search", "qinco2", "jax_engine")]
    ran = set(r["sections"])
    required = [r.get(k, {}).get("passed") for k in ("fixtures", "train") if k in ran or not args.sections]
    r["passed"] = bool(all(v is not False for v in verdicts) and all(required) and
                       any(v is not None for v in verdicts))
    check.save()
    text = summary(r)
    write_bytes(os.path.join(args.out, "summary.txt"), (text + "\n").encode())
    print("\n" + text)
    return 0 if r["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
