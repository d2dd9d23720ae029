"""Decode cost per candidate: the pairwise additive decoder against the full model.

Two settings, each timed in one process (best of several runs, see timing.py):

- fixture: the v1 IVF model of tests/fixtures (IVF64, d=32, M=4, K=256, L=1, h=32); a
  pairwise decoder is trained on the model's codes of ivf_xt (the reference cannot: 64
  lists < K=256), and both decoders' MSE on ivf_xb is reported beside the AQ decoder's
  (least squares on the same codes, what the IVF-RQ index scans with);
- paper: random IVF models of the paper's size (d=128, M=8, K=256, h=256, IVF1024,
  L=2 and L=16 residual blocks per step) and a random pairwise decoder of the matching shape (2·M tables of K² rows:
  537 MB), on random codes — only the speed is meaningful there.

    python bench/bench_pairwise.py [--json out.json] [--paper_L 2,16]

Both decoders are timed through their numpy-facing, batched entry points
(codec.decode, pairwise.decode), each at its default batch size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
from timing import timed  # noqa: E402

from qinco_jax import aq, codec, pairwise  # noqa: E402
from qinco_jax.checkpoint import load_model  # noqa: E402
from qinco_jax.config import QincoConfig  # noqa: E402
from qinco_jax.io import write_bytes  # noqa: E402
from qinco_jax.search.index import ivf_centroids  # noqa: E402
from qinco_jax.model import QincoModel  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")


def time_both(model, decoder, centroids, codes, n_model: int, label: str) -> dict:
    """Seconds per candidate of both decoders: the pairwise one on all `codes`, the
    model on the first `n_model` (a slow model would otherwise dominate the run)."""
    n = len(codes)
    n_model = min(n, n_model)
    decoder = jax.device_put(decoder)  # as a search keeps it: on the device, checked once
    t_model = timed(lambda: codec.decode(model, codes[:n_model])) / n_model
    t_pair = timed(lambda: pairwise.decode(decoder, codes, centroids)) / n
    res = {"n_candidates": n, "n_candidates_model": n_model, "model_decode_vps": 1 / t_model,
           "pairwise_decode_vps": 1 / t_pair, "model_us_per_candidate": 1e6 * t_model,
           "pairwise_us_per_candidate": 1e6 * t_pair, "speedup": t_model / t_pair}
    print(f"[{label}] model decode {res['model_decode_vps']:12.0f} vec/s "
          f"({res['model_us_per_candidate']:.3f} us/cand), pairwise {res['pairwise_decode_vps']:12.0f} vec/s "
          f"({res['pairwise_us_per_candidate']:.3f} us/cand): pairwise {res['speedup']:.1f}x cheaper")
    return res


def fixture_setting(n_decode: int, n_model: int) -> dict:
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
           "xb_mse_pairwise": mse(pairwise.decode(dec, codes_b, centroids)),
           "xb_mse_aq": mse(centroids[codes_b[:, 0]] + aq.reconstruct(codes_b[:, 1:], books)),
           "xb_mse_centroid_only": mse(centroids[codes_b[:, 0]])}
    print(f"[fixture] MSE on ivf_xb: model {res['xb_mse_model']:.1f}, pairwise {res['xb_mse_pairwise']:.1f}, "
          f"AQ {res['xb_mse_aq']:.1f}, centroid only {res['xb_mse_centroid_only']:.1f}; "
          f"pairwise train MSE {trained.train_mse[0]:.1f} -> {trained.train_mse[-1]:.1f}")
    reps = -(-n_decode // len(codes_b))
    codes = np.tile(codes_b, (reps, 1))[:n_decode]
    res.update(time_both(model, dec, centroids, codes, n_model, "fixture"))
    return res


def paper_setting(n_decode: int, n_model: int, L: int) -> dict:
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
    res.update(time_both(model, decoder, ivf_centroids(model), codes, n_model, f"paper L={L}"))
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_decode", type=int, default=65536, help="candidates per decode timing")
    p.add_argument("--n_model_decode", type=int, default=8192, help="candidates per model decode timing")
    p.add_argument("--paper_L", default="2,16", help="comma-separated residual blocks per step of the "
                   "paper-size models (the v1 paper uses L=2 and L=16); empty: skip them")
    p.add_argument("--json", default="", help="write the figures here")
    args = p.parse_args(argv)
    res = {"device": str(jax.devices()[0]), "fixture": fixture_setting(args.n_decode, args.n_model_decode)}
    for L in [int(v) for v in args.paper_L.split(",") if v]:
        res[f"paper_L{L}"] = paper_setting(args.n_decode, args.n_model_decode, L)
    if args.json:
        write_bytes(args.json, json.dumps(res, indent=1).encode())


if __name__ == "__main__":
    main()
