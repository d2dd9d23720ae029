"""What limits the main job's IVF-QINCo(2) search, on a main job's saved models and
indexes (runs/demo/ivf_qinco*.pt + .faissindex; no retraining): the AQ shortlist's
database MSE and recall for each way of fitting it, and the ceiling of the re-ranking.

For each model:
- `reference`: the index as the reference builds it (AQ codebooks fitted to the aq_train
  training vectors, norm range trained on the AQ errors: the share of entries whose
  stored norm is clipped at the range's top is printed);
- `reference, norm range on the stored norms`: the same codebooks, the range trained on
  the reconstructions' norms;
- `decoded`: codebooks fitted to the model's reconstructions of the training codes and
  the database codes (the main job's `aq_fit="decoded"`);
- each searched with the JAX engine (recalls only; the faiss engine gives the same
  shortlists): recall@1 of the AQ shortlist, whether the true neighbour is in it, and
  recall@1 after QINCo re-ranking, at each (nprobe, nshort);
- the ceiling: recall@1 of an exhaustive search over the whole database decoded by the
  model (no IVF, no shortlist), and the paired difference between the two models on the
  same queries with its standard error, on the test queries and on the main job's nval
  held-out training vectors used as queries (its validation queries are the first of them).

    python bench/bench_main_job_shortlist.py --run runs/demo --nprobe 2,8,16 --nshort 10,20,50
"""

from __future__ import annotations

import argparse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/demo", help="the main job's output folder (models, indexes)")
    p.add_argument("--nprobe", default="2,8,16")
    p.add_argument("--nshort", default="10,20,50")
    p.add_argument("--aq_train", type=int, default=10_000, help="training vectors of the AQ fit (the main job's)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import numpy as np

    from qinco_jax.data.groundtruth import exact_groundtruth
    from qinco_jax.experiments.main_job import MainJobConfig, _encode_options, load_data
    from qinco_jax.formats.checkpoint import load_model
    from qinco_jax.metrics import mean_squared_error, one_recall_at, paired_difference
    from qinco_jax.models import codec
    from qinco_jax.search import aq, jax_engine
    from qinco_jax.search import index as ivf
    from qinco_jax.search.rerank import Reranker

    job = load_data(MainJobConfig())
    cfg, xt, xval, xb, xq, gt = job.cfg, job.xt[:args.aq_train], job.xval, job.xb, job.xq, job.gt
    nprobes, nshorts = [int(v) for v in args.nprobe.split(",")], [int(v) for v in args.nshort.split(",")]
    gval = exact_groundtruth(xval, xb, 1)
    top1, top1_val = {}, {}
    for stem in ("ivf_qinco", "ivf_qinco2"):
        model = load_model(f"{args.run}/{stem}.pt")
        saved = ivf.read_index(f"{args.run}/{stem}.faissindex")
        tables = jax_engine.read_ivf_tables(saved)
        codes = np.empty((tables.ntotal, tables.M + 1), np.int32)  # the database codes, in id order
        codes[tables.ids, 0] = np.repeat(np.arange(tables.nlist), tables.list_sizes())
        codes[tables.ids, 1:] = tables.codes
        decoded = codec.decode(model, codes)
        xt_codes = codec.encode(model, xt, _encode_options(cfg, model))
        centroids = ivf.ivf_centroids(model)
        print(f"\n{stem}: database MSE {mean_squared_error(decoded, xb):.0f}")

        def build(vectors, fit_codes, norm_training):
            index, _ = ivf.train_index_on_codes(centroids, vectors, fit_codes, cfg.index_key, model.config.K,
                                                norm_training=norm_training, log=lambda _: None)
            ivf.add_codes(index, model, codes)
            return index

        variants = {
            "reference": build(xt, xt_codes, "errors"),
            "reference, norm range on the stored norms": build(xt, xt_codes, "reconstructions"),
            "decoded": build(np.concatenate([codec.decode(model, xt_codes), decoded]),
                             np.concatenate([xt_codes, codes]), "reconstructions"),
        }
        reranker = Reranker(model)
        for name, index in variants.items():
            t = jax_engine.read_ivf_tables(index)
            exact = (aq.reconstruct(t.codes, ivf.index_codebooks(index)).astype(np.float64) ** 2).sum(1)
            shortlist_mse = mean_squared_error(index.sa_decode(ivf.sa_codes(index, codes)), xb)
            print(f"  {name}: AQ database MSE {shortlist_mse:.0f}; stored norms clipped "
                  f"{(exact > index.rq.norm_max * (1 + 1e-5)).mean():.1%}, mean |error| "
                  f"{np.abs(t.norms - exact).mean():.0f}")
            engine = jax_engine.JaxIvfEngine(index)
            for nprobe in nprobes:
                for nshort in nshorts:
                    r = jax_engine.search_ivf(engine, xq, nprobe, nshort, reranker)
                    short = one_recall_at(r.I_short, gt, ranks=(1, nshort))
                    print(f"    nprobe {nprobe:3d} nshort {nshort:3d}: AQ R@1 {short['1']:.4f}, "
                          f"neighbour in the shortlist {short[str(nshort)]:.4f}, "
                          f"re-ranked R@1 {one_recall_at(r.I, gt, ranks=(1,))['1']:.4f}")
        decoded = np.ascontiguousarray(decoded, np.float32)
        top1[stem] = exact_groundtruth(xq, decoded, 1)[:, 0] == gt[:, 0]
        top1_val[stem] = exact_groundtruth(xval, decoded, 1)[:, 0] == gval[:, 0]
        print(f"  ceiling: exhaustive search of the decoded database, recall@1 {top1[stem].mean():.4f} "
              f"(test queries), {top1_val[stem].mean():.4f} (held-out training vectors)")
    for what, hits in (("test queries", top1), ("held-out training vectors", top1_val)):
        a, b = hits["ivf_qinco"], hits["ivf_qinco2"]
        diff, stderr = paired_difference(a, b)
        print(f"ceiling, IVF-QINCo2 - IVF-QINCo on the same {len(a)} {what}: {diff:+.4f} ± {stderr:.4f} (1 s.e.; "
              f"QINCo2 right where QINCo is wrong {(b & ~a).mean():.3f}, the reverse {(a & ~b).mean():.3f})")


if __name__ == "__main__":
    main()
