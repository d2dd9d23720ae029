"""The pipeline at scale on a generated on-disk set: peak resident memory and time of
encoding, index add, the on-disk merge and search on the on-disk index.

    python bench/bench_scale.py                                  # 20M x 128 uint8 (2.6 GB), in /tmp
    python bench/bench_scale.py --n 500000 1000000 --json scale.json   # two sizes: memory vs rows

For each size it generates random uint8 vectors as a .bvecs file, then runs every stage
in a fresh process (so each has its own peak resident memory, VmHWM), as the commands
run them on a cluster:

  encode    P processes, one after the other here, each encoding its rows of the
            memory-mapped file into its `.part_<i>.npz` (qinco_jax.formats.code_parts);
  train     the IVF-RQ index trained on a bounded sample (the first --n_train codes);
  add       P processes, each adding its share of the parts to its own on-disk shard
            (qinco_jax.search.ondisk.build_shard);
  merge     the shards merged on disk into `<index>.ivfdata`;
  search    the on-disk index opened memory-mapped, faiss shortlist + QINCo re-ranking
            of --nq queries (rows of the database file);
  rate      the encoding rate of a model of the paper's size (QINCo2-S-like: L=2, h=256,
            de=128, A=16, B=16, K_IVF=65536) on a small sample, for the cost model.

The pipeline's model is a small random IVF-QINCo2 (M=8, K=256 codes: the index's size is
the paper's); its networks' size changes encoding time, not memory. Memory is reported as
the whole process's peak (VmHWM, with the memory-mapped files' pages), the peak of its
anonymous memory (RssAnon, sampled every 5 ms: what the process really holds) and the
resident memory before the stage's work (imports, model, compiled code).

  train_epoch   QINCo2 training from the memory-mapped file (the same small model; not
            IVF, or with --train_ivf K an IVF-QINCo2 on K centroids, each batch's rows
            assigned as they are read; epochs of --train_loop rows, --train_epochs of
            them; the last 10,000 rows validate): RQ initialisation on the first epoch's
            rows, then the epochs read batch by batch (qinco_jax.training.streaming).
            Its peak memory should not depend on the file's size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from qinco_jax.experiments.timing import PeakMemory, status_kb
from qinco_jax.formats import vecs_io


class Peak(PeakMemory):
    """Peak RssAnon / VmRSS of this process, sampled until stop(), in MB with VmHWM."""

    def stop(self) -> dict:
        kb = super().stop()
        return {"peak_anon_mb": round(kb["RssAnon"] / 1024, 1), "peak_rss_mb": round(kb["VmRSS"] / 1024, 1),
                "vmhwm_mb": round(status_kb("VmHWM") / 1024, 1)}

D = 128


def pipeline_config():
    from qinco_jax.config import QincoConfig

    return QincoConfig(d=D, K=256, M=8, L=1, h=32, variant="ivf", K_IVF=1024, arch="qinco2", de=32, A=8, B=1)


def paper_config():
    from qinco_jax.config import QincoConfig

    return QincoConfig(d=D, K=256, M=8, L=2, h=256, variant="ivf", K_IVF=65536, arch="qinco2", de=128, A=16, B=16)


def make_model(config):
    import jax

    from qinco_jax.models.qinco import QincoModel, init_params

    return QincoModel(config, init_params(config, jax.random.key(0)))


# --------------------------------------------------------------------------------------
# Stages (each in its own process)
# --------------------------------------------------------------------------------------


def stage_encode(work, part, parts, batch):
    from qinco_jax.config import EncodeOptions
    from qinco_jax.formats import code_parts
    from qinco_jax.formats.code_parts import CodeFileHeader, encode_to_parts
    from qinco_jax.models import codec

    model = make_model(pipeline_config())
    opts = EncodeOptions(batch_size=batch)
    codec.encode(model, np.zeros((batch, D), np.float32), opts)  # compile outside the measurement
    x = vecs_io.read_vectors(os.path.join(work, "base.bvecs"), mmap=True)
    c = model.config
    before = status_kb("VmRSS") / 1024
    peak = Peak()
    peak.start()
    t0 = time.perf_counter()
    encode_to_parts(os.path.join(work, "codes.npz"), x, lambda v: codec.encode(model, v, opts), width=c.M + 1,
                    header=CodeFileHeader(parts, c.K, c.M, D), process_index=part, process_count=parts,
                    batch_size=65536)
    seconds = time.perf_counter() - t0
    rows = len(x) // parts if part < parts - 1 else len(x) - (parts - 1) * (len(x) // parts)
    part_bytes = os.path.getsize(code_parts.part_path(os.path.join(work, "codes.npz"), part))
    return {"seconds": round(seconds, 2), "rows": rows, "rows_per_s": round(rows / seconds),
            "part_bytes": part_bytes, "rss_before_mb": round(before, 1), **peak.stop()}


def stage_train(work, n_train):
    from qinco_jax.formats import code_parts
    from qinco_jax.search import index as ivf
    from qinco_jax.search import ondisk

    model = make_model(pipeline_config())
    sources, _ = ondisk.encoded_set_sources(os.path.join(work, "codes.npz"))
    n = min(n_train, sources[0].n_rows)
    codes = next(code_parts.iter_npz_rows(sources[0].name, [(0, n)]))  # a bounded sample: part 0's first rows
    xt = np.asarray(vecs_io.read_vectors(os.path.join(work, "base.bvecs"), mmap=True)[:n], np.float32)
    c = model.config
    t0 = time.perf_counter()
    index, _ = ivf.train_index_on_codes(ivf.ivf_centroids(model), xt, codes, f"IVF{c.K_IVF},RQ{c.M}x8_Nqint8", c.K,
                                        log=lambda _m: None)
    ivf.write_index(index, os.path.join(work, "trained.faissindex"))
    return {"seconds": round(time.perf_counter() - t0, 2), "rows": n}


def stage_add(work, process, processes, chunk):
    from qinco_jax.search import index as ivf
    from qinco_jax.search import ondisk

    trained = ivf.read_index(os.path.join(work, "trained.faissindex"))
    sources, header = ondisk.encoded_set_sources(os.path.join(work, "codes.npz"))
    ondisk.check_sources(sources, trained, header=header)
    before = status_kb("VmRSS") / 1024
    peak = Peak()
    peak.start()
    t0 = time.perf_counter()
    files = ondisk.build_shard(trained, sources, os.path.join(work, "index.faissindex"), process_index=process,
                               process_count=processes, chunk_rows=chunk, log=lambda _m: None)
    seconds = time.perf_counter() - t0
    rows = json.loads(files.manifest.read_text())["ntotal"]
    return {"seconds": round(seconds, 2), "rows": rows, "rows_per_s": round(rows / seconds),
            "rss_before_mb": round(before, 1), "shard_bytes": os.path.getsize(files.ivfdata), **peak.stop()}


def stage_merge(work, processes):
    from qinco_jax.search import ondisk

    before = status_kb("VmRSS") / 1024
    peak = Peak()
    peak.start()
    t0 = time.perf_counter()
    index = ondisk.merge_shards(os.path.join(work, "index.faissindex"), processes, log=lambda _m: None)
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 2), "rows": int(index.ntotal), "rows_per_s": round(index.ntotal / seconds),
            "rss_before_mb": round(before, 1),
            "ivfdata_bytes": os.path.getsize(ondisk.ivfdata_path(os.path.join(work, "index.faissindex"))),
            **peak.stop()}


def stage_search(work, nq, nprobe, nshort):
    from qinco_jax.search import index as ivf
    from qinco_jax.search import ondisk
    from qinco_jax.search.rerank import Reranker, search_ivf

    model = make_model(pipeline_config())
    before = status_kb("VmRSS") / 1024
    peak = Peak()
    peak.start()
    t0 = time.perf_counter()
    index = ivf.read_index(os.path.join(work, "index.faissindex"))
    t_open = time.perf_counter() - t0
    assert ondisk.ondisk_lists(index) is not None
    x = vecs_io.read_vectors(os.path.join(work, "base.bvecs"), mmap=True)
    rows = np.random.default_rng(1).choice(len(x), nq, replace=False)
    xq = np.asarray(x[np.sort(rows)], np.float32)
    index.nprobe = nprobe
    reranker = Reranker(model)
    search_ivf(index, model, xq[:16], nshort, reranker)  # compile
    t0 = time.perf_counter()
    _, I_short = index.search(xq, nshort)
    t_faiss = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = search_ivf(index, model, xq, nshort, reranker)
    t_total = time.perf_counter() - t0
    assert np.asarray(result.I).shape[0] == nq
    return {"open_seconds": round(t_open, 3), "nq": nq, "nprobe": nprobe, "nshort": nshort,
            "faiss_ms_per_query": round(1000 * t_faiss / nq, 3),
            "search_ms_per_query": round(1000 * t_total / nq, 3),
            "rss_before_mb": round(before, 1), **peak.stop()}


def stage_rate(n, batch):
    from qinco_jax.config import EncodeOptions
    from qinco_jax.models import codec

    out = {}
    for name, config in (("pipeline", pipeline_config()), ("paper", paper_config())):
        model = make_model(config)
        opts = EncodeOptions(batch_size=batch)
        x = np.random.default_rng(0).integers(0, 256, (n, D)).astype(np.float32)
        codec.encode(model, x[:batch], opts)
        t0 = time.perf_counter()
        codec.encode(model, x, opts)
        out[name] = {"rows": n, "rows_per_s": round(n / (time.perf_counter() - t0), 1),
                     "config": {k: getattr(config, k) for k in ("M", "K", "L", "h", "de", "A", "B", "K_IVF")}}
    return out


def stage_train_epoch(work, loop, epochs, batch, ivf_k=0):
    from qinco_jax.data.training_set import split_validation
    from qinco_jax.training import recipe, streaming
    from qinco_jax.training.loop import qinco2_train_config

    c = pipeline_config()
    spec = recipe.ModelSpec(M=c.M, K=c.K, L=c.L, h=c.h, arch="qinco2", de=c.de, A=c.A, B=c.B,
                            variant="ivf" if ivf_k else "qinco")
    x = vecs_io.read_vectors(os.path.join(work, "base.bvecs"), mmap=True)
    xt, xval = split_validation(x, 10_000)
    centroids = streaming.head(x, ivf_k) if ivf_k else None  # random data: any rows will do
    cfg = qinco2_train_config(epoch_size=loop, epochs=epochs, max_epochs=epochs, batch_size=batch, ngpu=0,
                              progress=False)
    before = status_kb("VmRSS") / 1024
    peak = Peak()
    peak.start()
    t0 = time.perf_counter()
    result = recipe.train_model(xt, xval, spec, cfg, ivf_centroids=centroids, log=lambda _m: None)
    seconds = time.perf_counter() - t0
    epochs_run = result.history.get("epochs", [])
    epoch_seconds = [round(e["seconds"], 2) for e in epochs_run if isinstance(e, dict) and "seconds" in e]
    return {"seconds": round(seconds, 2), "rows": loop * epochs, "rows_per_s": round(loop * epochs / seconds),
            "epoch_seconds": epoch_seconds, "file_rows": len(x), "ivf_k": ivf_k, "rss_before_mb": round(before, 1),
            **peak.stop()}


STAGES = {"encode": stage_encode, "train_epoch": stage_train_epoch, "train": stage_train, "add": stage_add, "merge": stage_merge,
          "search": stage_search, "rate": stage_rate}


def run_stage(name, *args):
    """Run a stage in a fresh process; returns its JSON result."""
    cmd = [sys.executable, __file__, "--stage", name, json.dumps(args)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"stage {name}{args} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------


def bench_size(n, args, root) -> dict:
    work = os.path.join(root, f"n{n}")
    os.makedirs(work, exist_ok=True)
    t0 = time.time()
    vecs_io.write_random_bvecs(os.path.join(work, "base.bvecs"), n, D)
    res = {"n": n, "d": D, "file_bytes": os.path.getsize(os.path.join(work, "base.bvecs")),
           "generate_seconds": round(time.time() - t0, 1)}
    print(f"n={n}: generated {res['file_bytes'] / 2**20:.0f} MiB", flush=True)
    if not args.only_train:
        res["encode"] = [run_stage("encode", work, p, args.parts, args.batch) for p in range(args.parts)]
        print(f"  encode {res['encode']}", flush=True)
        res["train"] = run_stage("train", work, args.n_train)
        res["add"] = [run_stage("add", work, p, args.processes, args.chunk) for p in range(args.processes)]
        print(f"  add {res['add']}", flush=True)
        res["merge"] = run_stage("merge", work, args.processes)
        print(f"  merge {res['merge']}", flush=True)
        res["search"] = run_stage("search", work, args.nq, args.nprobe, args.nshort)
        print(f"  search {res['search']}", flush=True)
    if args.only_train or args.train_loop:
        res["train_epoch"] = run_stage("train_epoch", work, args.train_loop, args.train_epochs, args.train_batch,
                                       args.train_ivf)
        print(f"  train_epoch {res['train_epoch']}", flush=True)
    if not args.keep:
        shutil.rmtree(work)
    return res


def table(results: list[dict]) -> str:
    head = f"{'stage':<10}{'n':>11}{'seconds':>9}{'rows/s':>11}{'peak anon MB':>14}{'VmHWM MB':>10}{'before MB':>10}"
    lines = [head, "-" * len(head)]
    for r in results:
        rows = [("encode/p", e) for e in r.get("encode", [])] + [("add/p", a) for a in r.get("add", [])] + \
            [(k, r[k]) for k in ("merge", "search") if k in r] + \
            ([("train", r["train_epoch"])] if "train_epoch" in r else [])
        for name, s in rows:
            secs = s.get("seconds", s.get("search_ms_per_query"))
            rate = s.get("rows_per_s", "")
            lines.append(f"{name:<10}{r['n']:>11}{secs:>9}{rate:>11}{s['peak_anon_mb']:>14}{s['vmhwm_mb']:>10}"
                         f"{s['rss_before_mb']:>10}")
        if "search" not in r:
            continue
        s = r["search"]
        lines.append(f"{'':<10}search: {s['search_ms_per_query']} ms/query ({s['faiss_ms_per_query']} in faiss), "
                     f"nprobe {s['nprobe']}, nshort {s['nshort']}, index opened in {s['open_seconds']} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[20_000_000], help="database sizes (rows) to run")
    p.add_argument("--parts", type=int, default=2, help="encoding processes (code parts)")
    p.add_argument("--processes", type=int, default=2, help="index-building processes (shards)")
    p.add_argument("--batch", type=int, default=1024, help="encoding batch (1024: the fastest on CPU)")
    p.add_argument("--chunk", type=int, default=1_000_000, help="codes added per chunk")
    p.add_argument("--n_train", type=int, default=100_000, help="index training sample")
    p.add_argument("--nq", type=int, default=1000)
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--nshort", type=int, default=100)
    p.add_argument("--rate_rows", type=int, default=2000, help="rows of the encoding-rate stage (0: skip it)")
    p.add_argument("--train_loop", type=int, default=100_000,
                   help="rows per QINCo2 training epoch (the reference's ds.loop; 0: skip training)")
    p.add_argument("--train_epochs", type=int, default=1, help="QINCo2 training epochs")
    p.add_argument("--train_batch", type=int, default=1024, help="QINCo2 training batch")
    p.add_argument("--train_ivf", type=int, default=0,
                   help="train an IVF-QINCo2 model with this many IVF centroids (the file's first rows; 0: no IVF)")
    p.add_argument("--only_train", action="store_true", help="generate the file, then only the training stage")
    p.add_argument("--tmpdir", default=None)
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    p.add_argument("--json", default="")
    p.add_argument("--stage", default="", help=argparse.SUPPRESS)
    p.add_argument("stage_args", nargs="?", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.stage:
        print(json.dumps(STAGES[args.stage](*json.loads(args.stage_args))))
        return 0
    root = tempfile.mkdtemp(prefix="bench_scale.", dir=args.tmpdir)
    try:
        results = [bench_size(n, args, root) for n in args.n]
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    doc = {"sizes": results, "machine": f"{os.cpu_count()} CPUs"}
    if args.rate_rows:
        doc["encode_rate"] = run_stage("rate", args.rate_rows, 1024)
    print(table(results))
    if "encode_rate" in doc:
        print("encoding rate:", json.dumps(doc["encode_rate"]))
    if args.json:
        from qinco_jax.formats.io import write_bytes

        write_bytes(args.json, json.dumps(doc, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
