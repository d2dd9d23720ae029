"""Decode cost per candidate: the pairwise additive decoder against the full model,
with its tables stored as float32, float16 and int8 (`pairwise.compact`).

Two settings, each timed in one process (best of several runs, see timing.py); every
table storage is timed against the same model decode:

- fixture: the v1 IVF model of tests/fixtures (IVF64, d=32, M=4, K=256, L=1, h=32); a
  pairwise decoder is trained on the model's codes of ivf_xt (the reference cannot: 64
  lists < K=256), and the MSE on ivf_xb of the model, of the pairwise decoder in each
  storage and of the AQ decoder (least squares on the same codes, what the IVF-RQ index
  scans with) is reported;
- paper: random IVF models of the paper's size (d=128, M=8, K=256, h=256, IVF1024,
  L=2 and L=16 residual blocks per step) and a random pairwise decoder of the matching shape (2·M tables of K² rows:
  537 MB), on random codes — only the speed is meaningful there.

    python bench/bench_pairwise.py [--json out.json] [--paper_L 2,16] [--table_dtypes float32,int8]

Each decoder is timed twice: through its numpy-facing, batched entry point
(codec.decode, pairwise.decode: checks, padding, copies in and out included), and as
its jitted function alone on one batch already on the device (codec.decode_batch,
pairwise.decode_batch) — what the search pays, since its middle stage runs the pairwise
decode fused with the distances and the top-k. The pairwise batch is
pairwise.DECODE_BATCH_SIZE = 16384 rows (the fastest of 4096 / 16384 / 65536 for every
storage when measured; --pairwise_batch_size to try others); the model's numpy-facing
decode uses its own default, its jitted one min(16384, --n_model_decode) rows.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


import jax
import jax.numpy as jnp
from qinco_jax.experiments.timing import timed

from qinco_jax.search import aq
from qinco_jax.models import codec
from qinco_jax.models import pairwise
from qinco_jax.formats.checkpoint import load_model
from qinco_jax.config import QincoConfig
from qinco_jax.formats.io import write_bytes
from qinco_jax.search.index import ivf_centroids
from qinco_jax.models.qinco import QincoModel

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
JITTED_MODEL_ROWS = 16384  # rows of the model's jitted decode batch at most


def time_all(model, decoder, centroids, codes, n_model: int, label: str, table_dtypes, batch_size: int) -> dict:
    """Seconds per candidate of the model decode (on the first `n_model` codes: a slow
    model would otherwise dominate the run) and of the pairwise decode in each table
    storage (on all `codes`), all in this process."""
    n = len(codes)
    n_model = min(n, n_model)
    t_model = timed(lambda: codec.decode(model, codes[:n_model])) / n_model
    # the jitted decodes alone, on batches already on the device
    model_batch = jnp.asarray(codes[:min(n_model, JITTED_MODEL_ROWS)])
    params = jax.device_put(codec.network_params(model.params))
    dt = codec.resolve_dtype(None)
    t_model_jit = timed(lambda: jax.block_until_ready(
        codec.decode_batch(params, model_batch, dt, model.config.outer_skip))) / len(model_batch)
    pair_batch = jnp.asarray(codes[:batch_size])
    jcentroids = jnp.asarray(centroids)
    res = {"n_candidates": n, "n_candidates_model": n_model, "pairwise_batch_size": len(pair_batch),
           "model_jitted_batch_size": len(model_batch), "model_decode_vps": 1 / t_model,
           "model_us_per_candidate": 1e6 * t_model, "model_jitted_us_per_candidate": 1e6 * t_model_jit,
           "pairwise": {}}
    print(f"[{label}] model decode {1 / t_model:12.0f} vec/s ({1e6 * t_model:.3f} us/cand; "
          f"jitted alone {1e6 * t_model_jit:.3f})")
    for dtype in table_dtypes:
        # as a search keeps it: compacted once, on the device, checked once
        dev = jax.device_put(pairwise.compact(decoder, dtype))
        t_pair = timed(lambda: pairwise.decode(dev, codes, centroids, batch_size=batch_size)) / n
        t_jit = timed(lambda: jax.block_until_ready(
            pairwise.decode_batch(dev, jcentroids, pair_batch))) / len(pair_batch)
        res["pairwise"][dtype] = {"table_bytes": int(dev.tables.nbytes), "decode_vps": 1 / t_pair,
                                  "us_per_candidate": 1e6 * t_pair, "speedup": t_model / t_pair,
                                  "jitted_us_per_candidate": 1e6 * t_jit, "jitted_speedup": t_model_jit / t_jit}
        print(f"[{label}] pairwise {dtype:7s} tables ({dev.tables.nbytes / 1e6:4.0f} MB) {1 / t_pair:10.0f} vec/s "
              f"({1e6 * t_pair:.3f} us/cand): {t_model / t_pair:5.1f}x cheaper than the model; "
              f"jitted alone {1e6 * t_jit:.3f} us/cand: {t_model_jit / t_jit:5.1f}x", flush=True)
        del dev
    return res


def fixture_setting(n_decode: int, n_model: int, table_dtypes, batch_size: int) -> dict:
    model = load_model(os.path.join(FIXTURES, "ivf_qinco_d32_IVF64_M4_K256_L1_h32.pt"))
    c = model.config
    xt = np.load(os.path.join(FIXTURES, "ivf_xt.npy"))
    xb = np.load(os.path.join(FIXTURES, "ivf_xb.npy"))
    centroids = ivf_centroids(model)
    t0 = time.perf_counter()
    codes_t = codec.encode(model, xt)
    codes_b = codec.encode(model, xb)
    t_enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    trained = pairwise.train_pairwise_decoder(xt, codes_t, centroids, K=c.K)
    t_train = time.perf_counter() - t0
    dec = trained.decoder
    print(f"[fixture] {c.describe()}: encoded {len(xt) + len(xb)} vectors in {t_enc:.1f} s, "
          f"trained {dec.n_tables} tables in {t_train:.1f} s")

    def mse(xhat):
        return float(((xb - xhat) ** 2).sum(1).mean())

    resid_t = xt - centroids[codes_t[:, 0]]
    books = aq.fit_codebooks(resid_t, codes_t[:, 1:], K=c.K)
    res = {"config": c.describe(), "train_seconds": t_train, "n_train": len(xt),
           "train_mse": list(trained.train_mse),
           "xb_mse_model": mse(codec.decode(model, codes_b)),
           "xb_mse_pairwise": {dtype: mse(pairwise.decode(pairwise.compact(dec, dtype), codes_b, centroids))
                               for dtype in table_dtypes},
           "xb_mse_aq": mse(centroids[codes_b[:, 0]] + aq.reconstruct(codes_b[:, 1:], books)),
           "xb_mse_centroid_only": mse(centroids[codes_b[:, 0]])}
    pair_mse = ", ".join(f"{dtype} {v:.3f}" for dtype, v in res["xb_mse_pairwise"].items())
    print(f"[fixture] MSE on ivf_xb: model {res['xb_mse_model']:.1f}, pairwise ({pair_mse}), "
          f"AQ {res['xb_mse_aq']:.1f}, centroid only {res['xb_mse_centroid_only']:.1f}; "
          f"pairwise train MSE {trained.train_mse[0]:.1f} -> {trained.train_mse[-1]:.1f}")
    reps = -(-n_decode // len(codes_b))
    codes = np.tile(codes_b, (reps, 1))[:n_decode]
    res.update(time_all(model, dec, centroids, codes, n_model, "fixture", table_dtypes, batch_size))
    return res


def paper_setting(n_decode: int, n_model: int, L: int, table_dtypes, batch_size: int) -> dict:
    cfg = QincoConfig(d=128, K=256, M=8, L=L, h=256, variant="ivf", K_IVF=1024)
    model = QincoModel.init(cfg, 0)
    rs = np.random.RandomState(0)
    T = pairwise.DEFAULT_TABLES_PER_CODE * cfg.M
    decoder = pairwise.PairwiseDecoder(
        ivf_subcodes=rs.randint(cfg.K, size=(cfg.K_IVF, pairwise.IVF_SUBCODE_STAGES)).astype(np.int32),
        pairs=np.stack([rs.randint(cfg.M + 5, size=T), rs.randint(cfg.M + 5, size=T)]).astype(np.int32),
        tables=np.random.default_rng(0).standard_normal((T, cfg.K * cfg.K, cfg.d), dtype=np.float32))
    codes = np.concatenate([rs.randint(cfg.K_IVF, size=(n_decode, 1)),
                            rs.randint(cfg.K, size=(n_decode, cfg.M))], 1).astype(np.int32)
    res = {"config": cfg.describe(), "n_tables": T, "table_bytes": int(decoder.tables.nbytes)}
    res.update(time_all(model, decoder, ivf_centroids(model), codes, n_model, f"paper L={L}", table_dtypes,
                        batch_size))
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_decode", type=int, default=65536, help="candidates per decode timing")
    p.add_argument("--n_model_decode", type=int, default=8192, help="candidates per model decode timing")
    p.add_argument("--paper_L", default="2,16", help="comma-separated residual blocks per step of the "
                   "paper-size models (the v1 paper uses L=2 and L=16); empty: skip them")
    p.add_argument("--table_dtypes", default=",".join(pairwise.TABLE_DTYPES),
                   help="comma-separated storages of the pairwise tables to time (pairwise.TABLE_DTYPES)")
    p.add_argument("--pairwise_batch_size", type=int, default=pairwise.DECODE_BATCH_SIZE,
                   help="rows per jitted pairwise decode call")
    p.add_argument("--skip_fixture", action="store_true", help="only the paper-size settings")
    p.add_argument("--json", default="", help="write the figures here")
    args = p.parse_args(argv)
    dtypes = [v for v in args.table_dtypes.split(",") if v]
    bad = [v for v in dtypes if v not in pairwise.TABLE_DTYPES]
    if bad or not dtypes:
        p.error(f"--table_dtypes: use some of {', '.join(pairwise.TABLE_DTYPES)}, got {args.table_dtypes!r}")
    if args.pairwise_batch_size < 1:
        p.error(f"--pairwise_batch_size must be >= 1, got {args.pairwise_batch_size}")
    res = {"device": str(jax.devices()[0])}
    if not args.skip_fixture:
        res["fixture"] = fixture_setting(args.n_decode, args.n_model_decode, dtypes, args.pairwise_batch_size)
    for L in [int(v) for v in args.paper_L.split(",") if v]:
        res[f"paper_L{L}"] = paper_setting(args.n_decode, args.n_model_decode, L, dtypes, args.pairwise_batch_size)
    if args.json:
        write_bytes(args.json, json.dumps(res, indent=1).encode())


if __name__ == "__main__":
    main()
