"""The main job in one process: IVF-QINCo against faiss IVF-PQ and IVF-RQ at the same
bytes per vector, on the same IVF centroids, on real descriptors.

    python examples/main_job.py --db sift_images --out runs/main_job

Steps: data set (built on first use) -> k-means IVF centroids -> IVF-QINCo training
(exact-RQ initialisation) -> IVF-QINCo index (AQ shortlist + QINCo re-ranking), IVF-PQ
and IVF-RQ indexes -> search sweeps -> MSE table, summary.json, pareto.png. Every
stage's wall and CPU seconds are printed and stored in the summary's data section.

An experiment driver for finding the demo's recipe; the final demo grows from it. Its
defaults are the best recipe measured so far on sift_images (2 busy cores): QINCo
L=1 h=64, exact-RQ init, lr 1e-4, 3 epochs trained with 64 pre-selected candidates,
database encoded with beam 8 over 32 pre-selected candidates. Run with OMP_NUM_THREADS=1
on a shared machine (faiss's threads spin otherwise).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


import numpy as np  # noqa: E402


class Stages:
    """Wall and process-CPU seconds per named stage."""

    def __init__(self):
        self.times: dict[str, dict] = {}

    def __call__(self, name):
        stages = self

        class _Stage:
            def __enter__(self):
                print(f"\n=== {name} ===", flush=True)
                self.t0, self.c0 = time.perf_counter(), time.process_time()

            def __exit__(self, *exc):
                wall, cpu = time.perf_counter() - self.t0, time.process_time() - self.c0
                stages.times[name] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}
                print(f"--- {name}: {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)

        return _Stage()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--db", default="sift_images")
    p.add_argument("--out", default="runs/main_job")
    p.add_argument("--n_centroids", type=int, default=256)
    p.add_argument("--nt", type=int, default=95_000, help="QINCo training vectors (+ --nval held out)")
    p.add_argument("--nval", type=int, default=5_000)
    p.add_argument("--M", type=int, default=8, help="bytes per vector (codes of 8 bits)")
    p.add_argument("--L", type=int, default=1)
    p.add_argument("--h", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--init", default="rq_exact", choices=["rq_exact", "random"])
    p.add_argument("--train_preselect", type=int, default=64)
    p.add_argument("--rq_beam", type=int, default=5, help="beam of the IVF-RQ baseline (faiss's default)")
    p.add_argument("--encode_beam", type=int, default=8, help="beam of the QINCo database encode")
    p.add_argument("--encode_preselect", type=int, default=32,
                   help="candidates pre-selected per step in the QINCo encodes (0: all K)")
    p.add_argument("--aq_train", type=int, default=10_000,
                   help="training vectors whose QINCo codes fit the AQ shortlist codebooks")
    p.add_argument("--reuse_model", default="", help="skip training: this IVF-QINCo model (experiments)")
    p.add_argument("--nprobe", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--nshort", type=int, nargs="+", default=[10, 20, 50])
    p.add_argument("--threads", type=int, default=0, help="faiss threads (0: faiss's default)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import faiss

    from qinco_jax import baselines, codec, datasets
    from qinco_jax.cli import train as train_qinco
    from qinco_jax.config import EncodeOptions
    from qinco_jax.search import index as ivf
    from qinco_jax.search.sweep import explore
    from qinco_jax.io import save_npy
    from qinco_jax.metrics import mean_squared_error

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stage = Stages()
    M = args.M

    with stage("data"):
        ds = datasets.get_dataset(args.db)
        xt_all = ds.get_train(args.nt + args.nval)
        xb, xq, gt = ds.get_database(), ds.get_queries(), ds.get_groundtruth()
        print(ds)
    with stage("IVF k-means"):
        km = faiss.Kmeans(ds.d, args.n_centroids, niter=10, seed=1234)
        km.train(xt_all)
        centroids = km.centroids
        save_npy(out / "centroids.npy", centroids)
    if args.reuse_model:
        from qinco_jax import checkpoint

        model, history = checkpoint.load_model(args.reuse_model), {"before": None, "epochs": []}
        centroids = ivf.ivf_centroids(model)
        hist_file = Path(args.reuse_model).parent / "train_history.json"
        if hist_file.exists():
            history = json.loads(hist_file.read_text())
    else:
        with stage("IVF-QINCo training (RQ initialisation included)"):
            res = train_qinco.main([
                "--ivf", "--db", args.db, "--nt", str(args.nt), "--nval", str(args.nval), "--M", str(M),
                "--L", str(args.L), "--h", str(args.h), "--lr", str(args.lr), "--batch_size", str(args.batch_size),
                "--max_epochs", str(args.epochs), "--init", args.init, "--preselect", str(args.train_preselect),
                "--IVF_centroids", str(out / "centroids.npy"), "--model", str(out / "model.pt"),
                "--history", str(out / "train_history.json"), "--progress", "on", "--ngpu", "0"])
            model, history = res.best, res.history
    rq_init_mse = history.get("before") if args.init == "rq_exact" else None
    xt = xt_all[:args.nt]
    with stage("IVF-QINCo index"):
        options = EncodeOptions(beam=args.encode_beam, preselect=args.encode_preselect)
        index, _ = ivf.train_index(model, xt[:args.aq_train], f"IVF{args.n_centroids},RQ{M}x8_Nqint8",
                                   options=options)
        xb_codes = codec.encode(model, xb, options, progress="encode database")
        ivf.add_codes(index, model, xb_codes)
        qinco_mse = mean_squared_error(codec.decode(model, xb_codes), xb)
        aq_mse = mean_squared_error(index.sa_decode(ivf.sa_codes(index, xb_codes)), xb)
    with stage("IVF-PQ index"):
        pq = baselines.build_ivf_pq(xt, centroids, M)
        baselines.add_database(pq, xb)
        pq_mse = baselines.reconstruction_mse(pq, xb)
    with stage("IVF-RQ index"):
        rq = baselines.build_ivf_rq(xt, centroids, M, beam=args.rq_beam)
        baselines.add_database(rq, xb)
        rq_mse = baselines.reconstruction_mse(rq, xb)
    with stage("search"):
        print("IVF-PQ")
        pq_points = baselines.search_sweep(pq, xq, gt, args.nprobe, log=print)
        print("IVF-RQ")
        rq_points = baselines.search_sweep(rq, xq, gt, args.nprobe, log=print)
        print("IVF-QINCo")
        results = explore(index, model, xq, gt, nprobe=args.nprobe, nshort=args.nshort)
    methods = [
        baselines.Method("IVF-PQ", M, pq_mse, tuple(pq_points)),
        baselines.Method(f"IVF-RQ (beam {args.rq_beam})", M, rq_mse, tuple(rq_points)),
        baselines.Method("IVF-QINCo: AQ shortlist only", M, aq_mse,
                         tuple(baselines.points_from_search_results(results, reranked=False))),
        baselines.Method("IVF-QINCo", M, qinco_mse, tuple(baselines.points_from_search_results(results))),
    ]
    data = {"name": ds.name, "d": ds.d, "nt": args.nt, "nval": args.nval, "nb": ds.nb, "nq": ds.nq,
            "K_IVF": args.n_centroids, "M": M, "L": args.L, "h": args.h, "epochs": args.epochs, "lr": args.lr,
            "rq_init_val_mse": rq_init_mse, "qinco_val_mse": min(e["val_mse"] for e in history["epochs"])
            if history["epochs"] else None, "stages": stage.times}
    s = baselines.write_summary(out / "summary.json", data, methods)
    baselines.plot_methods(s, out / "pareto.png", title=f"{ds.name}: {M} bytes per vector, K_IVF={args.n_centroids}")
    print("\n" + baselines.format_mse_table(s))
    print(f"validation MSE: RQ initialisation {rq_init_mse}, QINCo {data['qinco_val_mse']}")
    qinco_pts = s["methods"][-1]["points"]
    print("\nrecall@1 at equal time (best point of each method within the time of each IVF-QINCo point):")
    for p in sorted(qinco_pts, key=lambda p: p["ms_per_query"]):
        t = p["ms_per_query"]
        print(f"  {t:8.4f} ms  QINCo {p['recall@1']:.3f}  PQ {baselines.best_recall_within(pq_points, t):.3f}  "
              f"RQ {baselines.best_recall_within(rq_points, t):.3f}   {p['parameters']}")
    total = sum(v["wall_s"] for v in stage.times.values())
    print(f"\ntotal {total:.0f} s wall, {sum(v['cpu_s'] for v in stage.times.values()):.0f} s CPU")
    return s


if __name__ == "__main__":
    main()
