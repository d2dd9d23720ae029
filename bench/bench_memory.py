"""Peak resident memory of encoding a memory-mapped file larger than what should be
held in RAM: the encoder must stream it batch by batch (no full copy, no float32
conversion of the whole file, no resident map of the whole file).

    python bench/bench_memory.py --size_gb 4          # 4 GB of uint8 .bvecs, generated in /tmp, deleted after
    python bench/bench_memory.py --size_mb 64 --json out.json   # small: tests/test_reliability.py runs this

Generates random uint8 vectors (d=512 by default) as a .bvecs file, encodes them with a
small random QINCo model (the network's size does not matter for memory), and
reports the file size, the peak resident memory of the process during encoding
(VmHWM after resetting it, and VmRSS sampled every 2 ms), and that peak minus the
resident memory before encoding.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np


import jax

from qinco_jax.models import codec
from qinco_jax.experiments.timing import PeakMemory, status_kb
from qinco_jax.formats import vecs_io
from qinco_jax.config import EncodeOptions, QincoConfig
from qinco_jax.formats.io import write_bytes
from qinco_jax.models.qinco import QincoModel, init_params


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(path: str, batch_size: int, M: int = 2, K: int = 4) -> dict:
    """Peak memory of opening `path` (row headers checked) and encoding all of it."""
    n, d = vecs_io.vectors_shape(path)
    config = QincoConfig(d=d, K=K, M=M, L=1, h=16, variant="qinco", db_scale=255.0)
    model = QincoModel(config, init_params(config, jax.random.key(0)))
    # compile, and let the allocators reach their steady state, outside the measurement
    warm = np.random.default_rng(1).integers(0, 256, (64 * batch_size, d), dtype=np.uint8)
    codec.encode(model, warm, EncodeOptions(batch_size=batch_size))
    del warm
    before = {k: status_kb(k) for k in ("VmRSS", "RssAnon", "RssFile")}
    before_kb = before["VmRSS"]
    hwm_reset = reset_peak()
    sampler = PeakMemory(("VmRSS", "RssAnon", "RssFile"), period=0.002)
    sampler.start()
    t0 = time.time()
    x = vecs_io.read_vectors(path)  # memory map
    codes = codec.encode(model, x, EncodeOptions(batch_size=batch_size))
    seconds = time.time() - t0
    sampled = sampler.stop()
    peak_kb = max(sampled["VmRSS"], status_kb("VmHWM")) if hwm_reset else sampled["VmRSS"]
    file_bytes = os.path.getsize(path)
    return {
        "file_bytes": file_bytes, "n": int(n), "d": int(d), "batch_size": batch_size,
        "batch_bytes_float32": batch_size * d * 4, "codes_bytes": int(codes.nbytes),
        "rss_before_bytes": before_kb * 1024, "peak_rss_bytes": peak_kb * 1024,
        "peak_increase_bytes": (peak_kb - before_kb) * 1024,
        "peak_increase_over_file": round((peak_kb - before_kb) * 1024 / file_bytes, 4),
        # resident pages of the map (released as batches are done) / heap (batches, outputs)
        "peak_file_increase_bytes": (sampled["RssFile"] - before["RssFile"]) * 1024,
        "peak_anon_increase_bytes": (sampled["RssAnon"] - before["RssAnon"]) * 1024,
        "vmhwm_reset": hwm_reset, "encode_seconds": round(seconds, 2),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--size_gb", type=float, default=4.0)
    g.add_argument("--size_mb", type=float)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=16384)
    p.add_argument("--tmpdir", default=None, help="where the file is generated (default: the system's /tmp)")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    size = args.size_mb * 2**20 if args.size_mb else args.size_gb * 2**30
    n = max(1, int(size // (4 + args.d)))
    with tempfile.TemporaryDirectory(dir=args.tmpdir) as tmp:
        path = os.path.join(tmp, "vectors.bvecs")
        t0 = time.time()
        vecs_io.write_random_bvecs(path, n, args.d)
        print(f"generated {n} x {args.d} uint8 vectors ({os.path.getsize(path) / 2**30:.2f} GiB) "
              f"in {time.time() - t0:.1f} s", flush=True)
        res = measure(path, args.batch_size)
    mib = lambda b: f"{b / 2**20:.0f} MiB"
    print(f"file {mib(res['file_bytes'])}; resident before encoding {mib(res['rss_before_bytes'])}, "
          f"peak during encoding {mib(res['peak_rss_bytes'])} (+{mib(res['peak_increase_bytes'])}, "
          f"{100 * res['peak_increase_over_file']:.1f}% of the file); encoded in {res['encode_seconds']} s",
          flush=True)
    print(json.dumps(res))
    if args.json:
        write_bytes(args.json, json.dumps(res, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
