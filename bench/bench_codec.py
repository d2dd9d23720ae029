"""Encode / decode throughput on the paper's model size, against the machine's sgemm
rate, faiss.QINCo (C++) and, with --reference_dir, the PyTorch reference — all on the
same random weights, in one process, so the ratios are meaningful on a shared machine.

    python bench/bench_codec.py                                   # jax + faiss
    python bench/bench_codec.py --reference_dir /tmp/ref/qinco_v1 # + the torch reference

Useful work per encoded vector: every neural step runs its L residual blocks on all K
candidates, 4·K·L·d·h flops, plus the K·d² input half of the concat block and the
candidates' distances; decode does the same for one candidate.
"""

from __future__ import annotations

import argparse
import json

import numpy as np


import jax
from qinco_jax.experiments.timing import timed

from qinco_jax.models import codec
from qinco_jax.formats.io import write_bytes
from qinco_jax.config import EncodeOptions, QincoConfig
from qinco_jax.models.qinco import QincoModel


def sgemm_gflops(n=2048):
    a = np.random.rand(n, n).astype(np.float32)
    b = np.random.rand(n, n).astype(np.float32)
    t = timed(lambda: a @ b, 1.0)
    return 2 * n**3 / t / 1e9


def xla_sgemm_gflops(n=2048):
    import jax.numpy as jnp

    a = jnp.asarray(np.random.rand(n, n).astype(np.float32))
    f = jax.jit(lambda a: a @ a)
    t = timed(lambda: f(a).block_until_ready(), 1.0)
    return 2 * n**3 / t / 1e9


def flops_per_vector(c: QincoConfig, candidates: int) -> float:
    per_step = candidates * (4 * c.L * c.d * c.h + 2 * c.d) + 2 * c.d * c.d
    return (c.M - 1) * per_step


def faiss_qinco(model: QincoModel):
    """A faiss.QINCo with the model's weights (through the library's converter)."""
    from qinco_jax.formats.checkpoint import to_faiss_qinco

    return to_faiss_qinco(model)


def torch_reference(model: QincoModel, reference_dir: str):
    import torch

    from qinco_jax.experiments.reference import import_reference

    model_qinco = import_reference(reference_dir, "utils", "model_qinco")  # the reference's module

    from qinco_jax.formats.state_dict import state_dict_from_params

    c = model.config
    net = model_qinco.QINCo(c.d, c.K, c.L, c.M, c.h)
    sd = state_dict_from_params(c, model.numpy_params())
    net.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()})
    net.eval()
    return net


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--M", type=int, default=8)
    p.add_argument("--K", type=int, default=256)
    p.add_argument("--L", type=int, default=2)
    p.add_argument("--h", type=int, default=256)
    p.add_argument("--n_encode", type=int, default=1024, help="vectors per encode timing")
    p.add_argument("--n_decode", type=int, default=65536, help="vectors per decode timing")
    p.add_argument("--batch_sizes", default="", help="comma-separated encode batch sizes to sweep "
                   "(default: the library's default only)")
    p.add_argument("--decode_batch_sizes", default="", help="comma-separated decode batch sizes to sweep")
    p.add_argument("--reference_dir", default="", help="a checkout of the reference's qinco_v1 folder "
                   "(needs torch): also time its encode and decode")
    p.add_argument("--reference_bs", type=int, default=1024, help="batch size for the reference's encode")
    p.add_argument("--json", default="", help="write the figures here")
    args = p.parse_args(argv)

    cfg = QincoConfig(d=args.d, K=args.K, M=args.M, L=args.L, h=args.h)
    model = QincoModel.init(cfg, 0)
    rs = np.random.RandomState(0)
    x = rs.randn(args.n_encode, cfg.d).astype(np.float32)
    codes_d = rs.randint(cfg.K, size=(args.n_decode, cfg.M)).astype(np.int32)
    enc_flops = flops_per_vector(cfg, cfg.K)
    res = {"config": cfg.describe(), "device": str(jax.devices()[0]), "encode_gflop_per_vector": enc_flops / 1e9}

    res["numpy_sgemm_gflops"] = sgemm_gflops()
    res["xla_sgemm_gflops"] = xla_sgemm_gflops()
    res["sgemm_gflops"] = max(res["numpy_sgemm_gflops"], res["xla_sgemm_gflops"])
    print(f"{cfg.describe()} on {res['device']}")
    print(f"machine sgemm (2048^3): numpy {res['numpy_sgemm_gflops']:.0f}, XLA {res['xla_sgemm_gflops']:.0f} GFLOP/s")

    default_bs = codec.default_encode_batch_size(model)
    sweep = [int(b) for b in args.batch_sizes.split(",") if b] or [default_bs]
    for bs in sweep:
        t = timed(lambda: codec.encode(model, x, EncodeOptions(batch_size=bs)))
        vps = len(x) / t
        res[f"jax_encode_vps_bs{bs}"] = vps
        print(f"jax encode  (batch {bs:5d}): {vps:8.1f} vec/s  {vps * enc_flops / 1e9:6.1f} GFLOP/s "
              f"({100 * vps * enc_flops / 1e9 / res['sgemm_gflops']:.0f}% of sgemm)")
    res["jax_encode_vps"] = res[f"jax_encode_vps_bs{default_bs}"] if default_bs in sweep else max(
        v for k, v in res.items() if k.startswith("jax_encode_vps_bs"))
    for bs in [int(b) for b in args.decode_batch_sizes.split(",") if b] or [codec.default_decode_batch_size()]:
        t = timed(lambda: codec.decode(model, codes_d, batch_size=bs))
        res[f"jax_decode_vps_bs{bs}"] = args.n_decode / t
        print(f"jax decode  (batch {bs:5d}): {args.n_decode / t:10.0f} vec/s")
    res["jax_decode_vps"] = max(v for k, v in res.items() if k.startswith("jax_decode_vps_bs"))

    try:
        fq = faiss_qinco(model)
        import faiss

        nx = min(len(x), 256)
        t = timed(lambda: fq.encode(faiss.Tensor2D(x[:nx])), 2.0)
        res["faiss_encode_vps"] = nx / t
        ct = faiss.Int32Tensor2D(codes_d[:16384])
        t = timed(lambda: fq.decode(ct))
        res["faiss_decode_vps"] = 16384 / t
        print(f"faiss.QINCo encode: {res['faiss_encode_vps']:8.1f} vec/s   decode {res['faiss_decode_vps']:10.0f} vec/s")
    except ImportError as e:
        print(f"faiss.QINCo skipped: {e}")

    if args.reference_dir:
        import torch

        net = torch_reference(model, args.reference_dir)
        nx = min(len(x), args.reference_bs)
        xt = torch.from_numpy(x[:nx])
        with torch.no_grad():
            t = timed(lambda: net.encode(xt), 2.0)
            res["torch_encode_vps"] = nx / t
            ct = torch.from_numpy(codes_d[:16384].astype(np.int64))
            t = timed(lambda: net.decode(ct))
            res["torch_decode_vps"] = 16384 / t
        ref_codes = net.encode(xt)[0].numpy()
        res["codes_equal_to_reference"] = float((ref_codes == codec.encode(model, x[:nx])).mean())
        print(f"torch reference encode: {res['torch_encode_vps']:8.1f} vec/s   decode {res['torch_decode_vps']:10.0f} vec/s"
              f"   (codes equal to ours: {100 * res['codes_equal_to_reference']:.2f}%)")

    print("ratios:")
    for base in ("faiss", "torch"):
        if f"{base}_encode_vps" in res:
            for op in ("encode", "decode"):
                r = res[f"jax_{op}_vps"] / res[f"{base}_{op}_vps"]
                res[f"{op}_speedup_vs_{base}"] = r
                print(f"  {op} jax / {base}: {r:.2f}x")
    res["encode_fraction_of_sgemm"] = res["jax_encode_vps"] * enc_flops / 1e9 / res["sgemm_gflops"]
    print(f"  encode useful GFLOP/s / sgemm GFLOP/s: {res['encode_fraction_of_sgemm']:.2f}")
    if args.json:
        write_bytes(args.json, json.dumps(res, indent=1).encode())


if __name__ == "__main__":
    main()
