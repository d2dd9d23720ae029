"""Batch search on one IVF-QINCo index: faiss's IVF-RQ scan (one thread, and all
threads) against the JAX engine (`qinco_jax.search.jax_engine`) at query batches of 1,
100 and 1,000+, ms per query at each nprobe with the recalls side by side.

Both engines do the whole search (shortlist of nshort, QINCo decode, exact re-ranking),
and the shortlist alone ("scan": faiss's t_search, its search_and_return_codes; the JAX
engine's `shortlist`, coarse assignment included). Times are the best of a few runs
after a warm-up (compilation excluded), per query. The re-ranking (a QINCo decode of
nshort entries per query) costs the same in both engines, so it bounds the whole
search's speed-up.

The index: the main job's (runs/demo/ivf_qinco2.pt + .faissindex, or ivf_qinco.*), or,
when absent, one built here (--build): IVF centroids by k-means, an RQ trained on the
residuals, an IVF-QINCo model that decodes exactly as that RQ (zero networks: its codes
are RQ codes, so the build needs no training), the AQ shortlist fitted to its codes as
the main job fits it. Data: the built-in sift_images set (--db sift_images, built under
$QINCO_DATA on first use) or a synthetic Gaussian mixture (--db synthetic).

    python bench/bench_batch_search.py                       # runs/demo, else builds on sift_images
    python bench/bench_batch_search.py --db synthetic --nb 50000
    python bench/bench_batch_search.py --jax_threads 1       # XLA on one thread (set before jax starts)
"""

from __future__ import annotations

import argparse
import json
import os
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/demo", help="the main job's output folder (its saved index and model)")
    p.add_argument("--build", action="store_true", help="build an index here even if --run has one")
    p.add_argument("--cache", default="runs/bench_batch_search",
                   help="where a built index, its model and queries are saved (and read back next time)")
    p.add_argument("--db", default="sift_images", choices=["sift_images", "synthetic"], help="data when building")
    p.add_argument("--nt", type=int, default=20000, help="training vectors when building (k-means, RQ, AQ)")
    p.add_argument("--nb", type=int, default=50000, help="database size for --db synthetic")
    p.add_argument("--nq", type=int, default=5000, help="queries (at most the data set's)")
    p.add_argument("--nlist", type=int, default=256)
    p.add_argument("--M", type=int, default=8)
    p.add_argument("--nprobe", default="1,2,4,8,16")
    p.add_argument("--nshort", type=int, default=20)
    p.add_argument("--batches", default="1,100,1000,5000", help="JAX engine query batch sizes")
    p.add_argument("--batch1_queries", type=int, default=100, help="queries timed at batch 1 (slow)")
    p.add_argument("--jax_threads", type=int, default=0, help="XLA CPU threads (0: its default, all cores)")
    p.add_argument("--json", default="", help="write the table here")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.jax_threads:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                                   f"intra_op_parallelism_threads={args.jax_threads}").strip()
    import faiss
    import numpy as np

    from qinco_jax.metrics import one_recall_at
    from qinco_jax.search import QincoIndex

    index, model, xq, gt, source = load_or_build(args)
    xq, gt = xq[:args.nq], gt[:args.nq]
    nprobes = [int(v) for v in args.nprobe.split(",")]
    batches = [int(v) for v in args.batches.split(",")]
    all_threads = faiss.omp_get_max_threads()
    print(f"index: {source}; {index.ntotal} vectors, {index.nlist} lists (mean {index.ntotal / index.nlist:.0f}, "
          f"max {max(index.invlists.list_size(l) for l in range(index.nlist))}), {len(xq)} queries, nshort "
          f"{args.nshort}; faiss threads 1 and {all_threads}; XLA threads {args.jax_threads or 'default'}")

    faiss_index = QincoIndex(index, model, nshort=args.nshort)
    jax_index = QincoIndex(index, model, nshort=args.nshort, engine="jax")
    t0 = time.time()
    jax_index.jax_engine()
    print(f"JAX engine built in {time.time() - t0:.2f} s")
    rows = []
    for nprobe in nprobes:
        faiss_index.nprobe = jax_index.nprobe = nprobe
        row = {"nprobe": nprobe}
        for threads in sorted({1, all_threads}):
            faiss.omp_set_num_threads(threads)
            r, total = best_of(lambda: faiss_index.search_detailed(xq, 10))
            row[f"faiss_{threads}t"] = dict(ms=1000 * total / len(xq), scan_ms=1000 * r.t_search / len(xq),
                                            r1=one_recall_at(r.I, gt)["1"], r10=one_recall_at(r.I, gt)["10"],
                                            short_r10=one_recall_at(r.I_short, gt)["10"])
        faiss.omp_set_num_threads(all_threads)
        for b in batches:
            q = xq[:args.batch1_queries] if b == 1 else xq
            g = gt[:len(q)]

            def run():
                parts = [jax_index.search_detailed(q[i:i + b], 10) for i in range(0, len(q), b)]
                return np.concatenate([p.I for p in parts]), np.concatenate([p.I_short for p in parts])

            (I, I_short), total = best_of(run, runs=1 if b == 1 else 3)
            engine = jax_index.jax_engine()

            def scan():
                return np.concatenate([engine.shortlist(q[i:i + b], nprobe, args.nshort)[1] for i in range(0, len(q), b)])

            I_scan, t_scan = best_of(scan, runs=1 if b == 1 else 3)
            row[f"jax_b{b}"] = dict(ms=1000 * total / len(q), scan_ms=1000 * t_scan / len(q), r1=one_recall_at(I, g)["1"],
                                    r10=one_recall_at(I, g)["10"], short_r10=one_recall_at(I_short, g)["10"],
                                    scan_r10=one_recall_at(I_scan, g)["10"], nq=len(q))
        rows.append(row)
        print_row(row, all_threads, batches)
    big = [b for b in batches if b >= 1000]
    if big:
        print("\nJAX engine (batch >= 1000) speed-up over faiss, same process (shortlist scan | whole search):")
        for row in rows:
            jax_ms = min(row[f"jax_b{b}"]["ms"] for b in big)
            jax_scan = min(row[f"jax_b{b}"]["scan_ms"] for b in big)
            f1, fa = row["faiss_1t"], row[f"faiss_{all_threads}t"]
            print(f"  nprobe {row['nprobe']:3d}: scan x{f1['scan_ms'] / jax_scan:5.1f} vs faiss 1 thread, "
                  f"x{fa['scan_ms'] / jax_scan:5.1f} vs {all_threads} threads | whole search "
                  f"x{f1['ms'] / jax_ms:5.1f} vs 1 thread, x{fa['ms'] / jax_ms:5.1f} vs {all_threads} threads")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"source": source, "nq": len(xq), "nshort": args.nshort, "faiss_threads": all_threads,
                       "jax_threads": args.jax_threads, "rows": rows}, f, indent=1)


def best_of(fn, runs: int = 3):
    """(result of the fastest run, its wall time) over a warm-up and `runs` timed runs."""
    fn()
    best, result = float("inf"), None
    for _ in range(runs):
        t0 = time.perf_counter()
        r = fn()
        t = time.perf_counter() - t0
        if t < best:
            best, result = t, r
    return result, best


def print_row(row, all_threads, batches):
    cells = [f"nprobe {row['nprobe']:3d}"]
    for key in sorted({"faiss_1t", f"faiss_{all_threads}t"}):
        c = row[key]
        cells.append(f"{key}: {c['ms']:.4f} ms (scan {c['scan_ms']:.4f}) R@1 {c['r1']:.3f} R@10 {c['r10']:.3f}")
    for b in batches:
        c = row[f"jax_b{b}"]
        cells.append(f"jax b={b}{'' if c['nq'] > 1000 else ' (' + str(c['nq']) + ' q)'}: {c['ms']:.4f} ms "
                     f"(scan {c['scan_ms']:.4f}) R@1 {c['r1']:.3f} R@10 {c['r10']:.3f}")
    print(" | ".join(cells), flush=True)


# --------------------------------------------------------------------------------------
# The index: the main job's, or one built here
# --------------------------------------------------------------------------------------


def load_or_build(args):
    from pathlib import Path

    import numpy as np

    from qinco_jax.formats.checkpoint import load_model
    from qinco_jax.search import index as ivf_index

    run = Path(args.run)
    if not args.build:
        for stem in ("ivf_qinco2", "ivf_qinco"):
            if (run / f"{stem}.pt").is_file() and (run / f"{stem}.faissindex").is_file():
                model = load_model(run / f"{stem}.pt")
                index = ivf_index.read_index(run / f"{stem}.faissindex")
                summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
                xq, gt = main_job_queries(summary.get("data", {}).get("name", "sift_images"))
                return index, model, xq, gt, f"{run / stem}.faissindex"
        print(f"no main-job index in {run}")
    cache = Path(args.cache) / args.db
    if not args.build and (cache / "ivf_qinco.faissindex").is_file():
        return (ivf_index.read_index(cache / "ivf_qinco.faissindex"), load_model(cache / "ivf_qinco.pt"),
                np.load(cache / "xq.npy"), np.load(cache / "gt.npy"), f"{cache}/ivf_qinco.faissindex (built by this bench)")
    print(f"building one on {args.db}")
    index, model, xq, gt, source = build_index(args)
    from qinco_jax.formats.checkpoint import save_model

    cache.mkdir(parents=True, exist_ok=True)
    save_model(model, cache / "ivf_qinco.pt")
    ivf_index.write_index(index, cache / "ivf_qinco.faissindex")
    np.save(cache / "xq.npy", xq)
    np.save(cache / "gt.npy", gt)
    return index, model, xq, gt, source


def main_job_queries(name: str):
    from qinco_jax.data.datasets import get_dataset

    ds = get_dataset(name)
    return ds.get_queries(), ds.get_groundtruth()


def build_index(args):
    import jax
    import numpy as np

    from qinco_jax.config import QincoConfig
    from qinco_jax.data.datasets import exact_groundtruth, gaussian_mixture, get_dataset
    from qinco_jax.models import codec
    from qinco_jax.models.qinco import QincoModel, init_params
    from qinco_jax.search import index as ivf_index
    from qinco_jax.training.rq_init import assign_to_centroids, train_rq, zero_network_init

    t0 = time.time()
    if args.db == "sift_images":
        ds = get_dataset("sift_images")
        xt, xb, xq, gt = ds.get_train(args.nt), ds.get_database(), ds.get_queries(), ds.get_groundtruth()
    else:
        x = gaussian_mixture(args.nt + args.nb + args.nq, d=128, seed=0, centres=200)
        xt, xb, xq = x[:args.nt], x[args.nt:args.nt + args.nb], x[args.nt + args.nb:]
        gt = exact_groundtruth(xq, xb)
    xt, xb, xq = (np.ascontiguousarray(a, np.float32) for a in (xt, xb, xq))
    centroids = ivf_index.train_ivf_centroids(xt, args.nlist, verbose=False)
    assign = assign_to_centroids(xt, centroids)
    codebooks = train_rq(xt - centroids[assign], args.M, 256, log=lambda _: None)
    config = QincoConfig(d=xt.shape[1], K=256, M=args.M, L=1, h=64, variant="ivf", K_IVF=args.nlist)
    params = zero_network_init(init_params(config, jax.random.key(0), codebooks=codebooks, codebook0=centroids))
    model = QincoModel(config, params)
    key = f"IVF{args.nlist},RQ{args.M}x8_Nqint8"
    xt_codes = codec.encode(model, xt)
    index, _ = ivf_index.train_index(model, xt, key, xt_codes=xt_codes, log=lambda _: None)
    ivf_index.add_codes(index, model, codec.encode(model, xb))
    print(f"built {key} on {args.db} ({len(xb)} vectors) in {time.time() - t0:.1f} s")
    return index, model, xq, gt, f"built here: {key} on {args.db}"


if __name__ == "__main__":
    main()
