"""How much the main job's IVF-QINCo and IVF-QINCo2 move with their training seed alone,
and whether IVF-QINCo2 recalls more than IVF-QINCo beyond that: for each seed, both
models trained as the main job trains them (`MainJobConfig(seed=...)`, from the same IVF
centroids and IVF-RQ codebooks, built once as the job builds them), the database encoded
as the job encodes it, and the *ceiling* of each model's search: recall@1 of an
exhaustive search over the whole decoded database (no IVF probing, no AQ shortlist; the
main job's search comes within ~0.003 of it, bench_main_job_shortlist.py). Printed per
seed: training CPU seconds, database MSE, recall@1 on the test queries and on the nval
held-out training vectors, and IVF-QINCo2 − IVF-QINCo on the same queries with its
paired standard error; then the mean over seeds.

    python bench/bench_main_job_seeds.py --seeds 0 1 2
    python bench/bench_main_job_seeds.py --seeds 0 1 2 --qinco2_epochs 3   # the main job's earlier length

Any MainJobConfig field can be set as --field value (sizes, epochs, learning rates).
About 5 minutes a seed on a 2-core CPU at the main job's sizes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time


def parse_args(argv=None):
    from qinco_jax.experiments.main_job import MainJobConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--json", default=None, help="also write the per-seed figures to this file")
    for f in dataclasses.fields(MainJobConfig):
        if f.name not in ("seed", "out", "progress", "nprobe", "nshort") and isinstance(f.default, (int, float, str)) \
                and not isinstance(f.default, bool):
            p.add_argument(f"--{f.name}", type=type(f.default), default=None)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import faiss
    import numpy as np

    from qinco_jax.data.groundtruth import exact_groundtruth
    from qinco_jax.experiments import baselines
    from qinco_jax.experiments import main_job
    from qinco_jax.metrics import mean_squared_error, paired_difference
    from qinco_jax.models import codec
    from qinco_jax.search import index as ivf

    overrides = {k: v for k, v in vars(args).items() if k not in ("seeds", "json") and v is not None}
    job = main_job.load_data(main_job.MainJobConfig(progress=False, **overrides))
    cfg, xt_all, xt, xval, xb, xq, gt = job.cfg, job.xt_all, job.xt, job.xval, job.xb, job.xq, job.gt
    gval = exact_groundtruth(xval, xb, 1)
    if cfg.build_threads:  # as the main job builds: the centroids depend on faiss's thread count
        faiss.omp_set_num_threads(cfg.build_threads)
    centroids = ivf.train_ivf_centroids(xt_all, cfg.n_centroids, cfg.kmeans_niter, verbose=False)
    rq_codebooks = baselines.rq_codebooks(baselines.build_ivf_rq(xt, centroids, cfg.M, beam=cfg.rq_beam))

    def ceiling(model, c):
        decoded = np.asarray(codec.decode(model, codec.encode(model, xb, main_job._encode_options(c, model))),
                             np.float32)
        return (mean_squared_error(decoded, xb), exact_groundtruth(xq, decoded, 1)[:, 0] == gt[:, 0],
                exact_groundtruth(xval, decoded, 1)[:, 0] == gval[:, 0])

    families = ((main_job.QINCO_NAME, main_job.train_qinco, f"{cfg.epochs} epochs"),
                (main_job.QINCO2_NAME, main_job.train_qinco2, f"{cfg.qinco2_epochs} epochs"))
    rows = []
    for seed in args.seeds:
        c = dataclasses.replace(cfg, seed=seed)
        row = {"seed": seed}
        for name, train, length in families:
            t0 = time.process_time()
            model, _ = train(c, xt, xval, centroids, lambda _: None, rq_codebooks=rq_codebooks)
            cpu = time.process_time() - t0
            mse, hits_q, hits_val = ceiling(model, c)
            row[name] = {"train_cpu_s": cpu, "db_mse": mse, "test": hits_q, "val": hits_val}
            print(f"seed {seed} {name} ({length}): training {cpu:.0f} s CPU, database MSE {mse:.0f}, "
                  f"recall@1 test {hits_q.mean():.4f}, held-out {hits_val.mean():.4f}", flush=True)
        for split in ("test", "val"):
            diff, stderr = paired_difference(row[main_job.QINCO_NAME][split], row[main_job.QINCO2_NAME][split])
            row[f"diff_{split}"] = (diff, stderr)
        print(f"seed {seed} {main_job.QINCO2_NAME} - {main_job.QINCO_NAME}: test {row['diff_test'][0]:+.4f} ± "
              f"{row['diff_test'][1]:.4f}, held-out {row['diff_val'][0]:+.4f} ± {row['diff_val'][1]:.4f}", flush=True)
        rows.append(row)

    print(f"\nover {len(rows)} seeds (mean, and min-max):")
    for name, _, length in families:
        for key, what in (("db_mse", "database MSE"), ("test", "recall@1 test"), ("val", "recall@1 held-out")):
            vals = [float(np.mean(r[name][key])) for r in rows]
            print(f"  {name} ({length}) {what}: {np.mean(vals):.4f} ({min(vals):.4f}-{max(vals):.4f})")
    for split in ("test", "val"):
        diffs = [r[f"diff_{split}"][0] for r in rows]
        print(f"  {main_job.QINCO2_NAME} - {main_job.QINCO_NAME} ({split}): mean {np.mean(diffs):+.4f}, "
              f"min {min(diffs):+.4f}, max {max(diffs):+.4f}")
    if args.json:
        def plain(row):
            out = {"seed": row["seed"], "diff_test": row["diff_test"], "diff_val": row["diff_val"]}
            for name, _, _ in families:
                r = row[name]
                out[name] = {"train_cpu_s": r["train_cpu_s"], "db_mse": r["db_mse"],
                             "recall@1_test": float(r["test"].mean()), "recall@1_val": float(r["val"].mean())}
            return out

        with open(args.json, "w") as f:
            json.dump({"config": main_job._jsonable(dataclasses.asdict(cfg)), "seeds": [plain(r) for r in rows]}, f,
                      indent=1)


if __name__ == "__main__":
    main()
