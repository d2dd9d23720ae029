"""Speed of the IVF-QINCo search's second stage: decode the shortlist with QINCo, exact
distances, best 100 — ours (one jitted function per query batch) against the PyTorch
reference's way (torch decode in batches of --bs, then numpy distances and argsort, as
its search_ivf.py does) and against faiss.QINCo's C++ decode followed by the same numpy
steps. All on the same weights and the same shortlists, in one process.

Part 1, the paper's model size (random weights, random shortlists): ms per query at
nshort = 100 ... 1000.
Part 2, the fixture index (tests/fixtures/ivf512_rq4x8.faissindex and its IVF512 model):
the full search (faiss shortlist + re-ranking) over nprobe x nshort, the Pareto front of
recall@1 against queries per second, with the reference's second stage timed on the
same shortlists.

    python bench/bench_search.py
    python bench/bench_search.py --reference_dir /tmp/ref/qinco_v1   # + the torch reference
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np


import jax
from qinco_jax.experiments.timing import timed

from qinco_jax.search import index as ivf_index, rerank, sweep
from qinco_jax.config import QincoConfig
from qinco_jax.models.qinco import QincoModel

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")


def timed_best_threads(fn, kind: str, min_seconds=0.5, min_runs=2):
    """timed(fn) with the library's thread pool at its default size and at one thread,
    the faster of the two: on a loaded machine a spinning thread pool can be several
    times slower than one thread, and the comparison should not hinge on that."""
    if kind == "torch":
        import torch

        get, set_ = torch.get_num_threads, torch.set_num_threads
    else:
        import faiss

        get, set_ = faiss.omp_get_max_threads, faiss.omp_set_num_threads
    default = get()
    best = None
    try:
        for n in sorted({default, 1}):
            set_(n)
            t = timed(fn, min_seconds, min_runs)
            best = t if best is None else min(best, t)
    finally:
        set_(default)
    return best


def numpy_rerank(xq, shortlist, ids, k=100):
    """The reference's host-side steps after decoding: distances, argsort, top ids."""
    nq, ns = ids.shape
    D = ((xq.reshape(nq, 1, -1) - shortlist.reshape(nq, ns, -1)) ** 2).sum(2)
    order = np.argsort(D, axis=1)
    return np.take_along_axis(ids, order[:, :k], axis=1)


def torch_reference(model: QincoModel, reference_dir: str):
    """The reference's module with the model's weights."""
    import torch

    from qinco_jax.experiments.reference import import_reference

    model_qinco = import_reference(reference_dir, "utils", "model_qinco")

    from qinco_jax.formats.state_dict import state_dict_from_params

    c = model.config
    if c.is_ivf:
        net = model_qinco.IVFQINCo(c.d, c.K_IVF, c.K, c.L, c.M, c.h)
    else:
        net = model_qinco.QINCo(c.d, c.K, c.L, c.M, c.h)
    sd = state_dict_from_params(c, model.numpy_params())
    net.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, strict=False)
    net.eval()
    return net


def reference_second_stage(net, db_scale, bs):
    """search_ivf.py's decode + re-rank: torch decode in batches of bs, numpy after."""
    import torch

    def run(xq, codes, ids):
        flat = codes.reshape(-1, codes.shape[-1]).astype(np.int64)
        with torch.no_grad():
            parts = [net.decode(torch.from_numpy(flat[i:i + bs])).numpy() * db_scale
                     for i in range(0, len(flat), bs)]
        return numpy_rerank(xq, np.vstack(parts), ids)

    return run


def faiss_second_stage(model: QincoModel):
    """faiss.QINCo (C++) decode + the same numpy steps. faiss.QINCo has no IVF step: it
    runs a plain QINCo with the same neural steps (M + 1 codes, codebook0 of K entries),
    the same work per vector but for the codebook0 lookup."""
    import faiss

    from qinco_jax.formats.checkpoint import to_faiss_qinco

    c = model.config
    plain = QincoModel.init(QincoConfig(d=c.d, K=c.K, M=c.M + 1, L=c.L, h=c.h), 0)
    fq = to_faiss_qinco(plain)

    def run(xq, codes, ids):
        flat = np.ascontiguousarray(codes.reshape(-1, codes.shape[-1]) % c.K, dtype=np.int32)
        dec = fq.decode(faiss.Int32Tensor2D(flat)).numpy()
        return numpy_rerank(xq, dec * np.float32(c.db_scale), ids)

    return run


def ours_second_stage(reranker: rerank.Reranker):
    def run(xq, codes, ids):
        valid = ids >= 0
        D, pos = reranker(xq, codes, valid)
        return rerank.gather_ids(ids, D, pos)

    return run


def bench_paper_size(args, res):
    cfg = QincoConfig(d=args.d, K=args.K, M=args.M, L=args.L, h=args.h, variant="ivf", K_IVF=args.K_IVF)
    model = QincoModel.init(cfg, 0)
    print(f"== Part 1: {cfg.describe()} (random weights), {args.nq} queries, decode + re-rank per query")
    rs = np.random.RandomState(0)
    xq = rs.randn(args.nq, cfg.d).astype(np.float32)
    reranker = rerank.Reranker(model)
    ours = ours_second_stage(reranker)
    others = {}
    try:
        others["faiss"] = faiss_second_stage(model)
    except (ImportError, AttributeError) as e:
        print(f"faiss.QINCo skipped: {e}")
    if args.reference_dir:
        others["torch"] = reference_second_stage(torch_reference(model, args.reference_dir), 1.0, args.bs)
    rows = []
    for ns in args.nshort:
        codes = np.concatenate([rs.randint(cfg.K_IVF, size=(args.nq, ns, 1)),
                                rs.randint(cfg.K, size=(args.nq, ns, cfg.M))], axis=2).astype(np.int32)
        ids = np.arange(args.nq * ns, dtype=np.int64).reshape(args.nq, ns)
        reranker.warm_up(args.nq, ns)
        row = {"nshort": ns, "jax_ms_per_query": 1000 * timed(lambda: ours(xq, codes, ids)) / args.nq}
        ours_ids = ours(xq, codes, ids)
        for name, fn in others.items():
            row[f"{name}_ms_per_query"] = 1000 * timed_best_threads(lambda: fn(xq, codes, ids), name) / args.nq
            row[f"speedup_vs_{name}"] = row[f"{name}_ms_per_query"] / row["jax_ms_per_query"]
            if name == "torch":  # same weights: the same neighbours
                row["top1_equal_to_torch"] = float(np.mean(fn(xq, codes, ids)[:, 0] == ours_ids[:, 0]))
        rows.append(row)
        print("  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    res["paper_size"] = {"config": cfg.describe(), "nq": args.nq, "rows": rows}


def bench_fixture_index(args, res):
    from qinco_jax.formats.checkpoint import load_model
    from qinco_jax.metrics import one_recall_at
    from qinco_jax.search.report import pareto_front

    model = load_model(os.path.join(FIXTURES, "ivf_qinco_d32_IVF512_M4_K256_L1_h32.pt"))
    index = ivf_index.read_index(os.path.join(FIXTURES, "ivf512_rq4x8.faissindex"))
    xq = np.load(os.path.join(FIXTURES, "ivf_xq.npy"))
    gt = np.load(os.path.join(FIXTURES, "ivf_gt.npy"))
    nq = len(xq)
    print(f"== Part 2: fixture index IVF512,RQ4x8_Nqint8 ({index.ntotal} vectors), {model.describe()}, {nq} queries")
    reranker = rerank.Reranker(model)
    ref = reference_second_stage(torch_reference(model, args.reference_dir), model.config.db_scale, args.bs) \
        if args.reference_dir else None
    points = []
    ours = ours_second_stage(reranker)
    for nprobe in args.fixture_nprobe:
        for ns in args.fixture_nshort:
            sweep.set_search_parameters(index, {"nprobe": nprobe})
            r = rerank.search_ivf(index, model, xq, ns, reranker)
            t = timed(lambda: rerank.search_ivf(index, model, xq, ns, reranker), 0.3, 3)
            p = {"nprobe": nprobe, "nshort": ns, "recalls": one_recall_at(r.I, gt), "qps": nq / t}
            # The second stage alone, ours and the reference's, on the same shortlists.
            _, I, raw = index.search_and_return_codes(xq, ns, include_listnos=True)
            listnos, fine = ivf_index.split_search_codes(index, raw, model.config.M)
            codes = np.concatenate([(listnos % index.nlist)[..., None], fine], axis=2).astype(np.int32)
            p["ours_rerank_ms"] = 1000 * timed(lambda: ours(xq, codes, I), 0.3, 3)
            if ref is not None:
                t_faiss = timed(lambda: index.search_and_return_codes(xq, ns, include_listnos=True), 0.3, 3)
                t_ref = timed_best_threads(lambda: ref(xq, codes, I), "torch", 0.3, 2)
                p["reference_rerank_ms"] = 1000 * t_ref
                p["reference_qps"] = nq / (t_faiss + t_ref)
            points.append(p)
    front = pareto_front([(1 / p["qps"], p["recalls"]["1"]) for p in points])
    print(f"  all points (QPS of the whole search; re-rank: ms for the {nq} queries' second stage):")
    for i, p in enumerate(points):
        extra = (f"  reference {p['reference_qps']:7.0f} QPS ({p['qps'] / p['reference_qps']:.2f}x), re-rank "
                 f"{p['ours_rerank_ms']:.2f} ms vs {p['reference_rerank_ms']:.2f} ms "
                 f"({p['reference_rerank_ms'] / p['ours_rerank_ms']:.2f}x)") if ref else ""
        star = "*" if i in front else " "
        print(f"   {star}nprobe={p['nprobe']:3d} nshort={p['nshort']:4d}  R@1={p['recalls']['1']:.3f} "
              f"R@10={p['recalls']['10']:.3f} R@100={p['recalls']['100']:.3f}  {p['qps']:7.0f} QPS{extra}")
    print("  (* = on the Pareto front of recall@1 vs QPS)")
    res["fixture_index"] = {"points": points, "pareto": sorted(front)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--M", type=int, default=8, help="neural steps of the IVF model")
    p.add_argument("--K", type=int, default=256)
    p.add_argument("--L", type=int, default=2)
    p.add_argument("--h", type=int, default=256)
    p.add_argument("--K_IVF", type=int, default=1024)
    p.add_argument("--nq", type=int, default=100, help="queries per timing (part 1)")
    p.add_argument("--nshort", type=int, nargs="+", default=[100, 200, 500, 1000], help="shortlist sizes (part 1)")
    p.add_argument("--bs", type=int, default=4096, help="the reference's decode batch size (its --bs default)")
    p.add_argument("--fixture_nprobe", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--fixture_nshort", type=int, nargs="+", default=[10, 50, 100, 200])
    p.add_argument("--reference_dir", default="", help="a checkout of the reference's qinco_v1 folder "
                   "(needs torch): also time its second stage")
    p.add_argument("--skip", nargs="*", default=[], choices=["paper", "fixture"], help="parts to skip")
    p.add_argument("--json", default="", help="write the figures here")
    args = p.parse_args(argv)
    res = {"device": str(jax.devices()[0])}
    if "paper" not in args.skip:
        bench_paper_size(args, res)
    if "fixture" not in args.skip:
        bench_fixture_index(args, res)
    if args.json:
        from qinco_jax.formats.io import write_bytes

        write_bytes(args.json, (json.dumps(res, indent=1) + "\n").encode())


if __name__ == "__main__":
    main()
