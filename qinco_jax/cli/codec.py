"""Encode vectors to QINCo codes, or decode codes to vectors (the reference's codec_qinco.py).

    python convert/codec_qinco.py --model m.pt --encode --i base.fvecs --o codes.npy
    python convert/codec_qinco.py --model m.pt --encode --i base.fvecs --o codes.raw --raw
    python convert/codec_qinco.py --model m.pt --decode --i codes.raw --raw --o recons.npy

--raw writes the codes as packed bit strings with no header (faiss.pack_bitstrings
layout), so the file size is the true compressed size: n x ceil(sum of bits / 8) bytes,
log2(K) bits per code. For IVF-QINCo the first code (the IVF list) takes log2(K_IVF) bits;
the reference packs every column with log2(K) bits, which loses IVF lists when
K_IVF > K, so raw IVF files differ from (and fix) the reference's there.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from qinco_jax import cli
from qinco_jax.formats import packing
from qinco_jax.formats import vecs_io
from qinco_jax.formats.io import write_bytes

CODE_EXTENSIONS = (".npy", ".ivecs", ".ibin")
VECTOR_EXTENSIONS = (".npy", ".fvecs", ".fbin")  # float32 formats: decoded vectors are not integers


def build_parser():
    p = cli.parser(__doc__.split("\n\n")[0])
    g = p.add_argument_group("what to do")
    g.add_argument("--encode", default=False, action="store_true", help="vectors -> codes")
    g.add_argument("--decode", default=False, action="store_true", help="codes -> vectors")
    g = p.add_argument_group("files")
    g.add_argument("--model", default="", help="QINCo model: a reference .pt file or a qinco-jax checkpoint directory")
    g.add_argument("--i", required=True,
                   help="input: vectors to encode (.npy .fvecs .bvecs .ivecs .fbin .u8bin .ibin), or codes to "
                        "decode (.npy .ivecs .ibin, or packed bytes with --raw)")
    g.add_argument("--o", required=True,
                   help="output: codes (.npy int64, .ivecs, .ibin, or packed bytes with --raw), or decoded "
                        "vectors (.npy .fvecs .fbin)")
    g.add_argument("--i0", default=0, type=int,
                   help="encode input rows [i0, i1) only: one shard of a large database, so that several "
                        "machines can encode it in parallel (see --xb_codes of search_ivf.py)")
    g.add_argument("--i1", default=-1, type=int, help="end of the row range to encode (-1: the end)")
    g.add_argument("--raw", default=False, action="store_true",
                   help="codes are in raw format (packed bits, no header), to directly measure sizes")
    g = p.add_argument_group("computation options")
    cli.add_compute_args(g)
    cli.add_search_args(g)
    return p


def encode_file(model, args) -> None:
    from qinco_jax.models import codec

    x = vecs_io.read_vectors(args.i)  # memory-mapped: encoded batch by batch
    i1 = len(x) if args.i1 < 0 else args.i1
    if not 0 <= args.i0 < i1 <= len(x):
        raise cli.UsageError(f"row range [--i0 {args.i0}, --i1 {args.i1}) is empty or outside the "
                             f"{len(x)} vectors of {args.i}")
    x = x[args.i0:i1]
    if x.shape[1] != model.d:
        raise cli.UsageError(f"{args.i} holds vectors of dimension {x.shape[1]}, "
                             f"the model ({model.describe()}) expects d={model.d}")
    if not args.raw and Path(args.o).suffix.lower() not in CODE_EXTENSIONS:
        raise cli.UsageError(f"--o {args.o}: codes are written as {' '.join(CODE_EXTENSIONS)}, "
                             f"or as packed bytes with --raw")
    print(f"encoding input vectors of size {x.shape}", flush=True)
    t0 = time.time()
    options = cli.encode_options_from_args(args, batch_size=args.batch_size)
    codes, err = codec.encode(model, x, options, progress="encoding", return_errors=True)
    print(f"Encoding done in {time.time() - t0:.2f} s, MSE={float(np.mean(err, dtype=np.float64)):g}", flush=True)
    if args.raw:
        nbits = packing.code_nbits(model.code_sizes)
        packed = packing.pack_codes(codes, nbits)
        print(f"Packed {len(codes)} codes of {len(nbits)} x {nbits} bits into {packed.shape[1]} bytes each, "
              f"storing {packed.size} bytes in {args.o}", flush=True)
        write_bytes(args.o, packed.tobytes())
    else:
        print(f"Storing codes of size {codes.shape} in {args.o}", flush=True)
        vecs_io.write_vectors(args.o, codes.astype(np.int64))  # int64, as the reference's np.save


def decode_file(model, args) -> None:
    from qinco_jax.models import codec

    if Path(args.o).suffix.lower() not in VECTOR_EXTENSIONS:
        raise cli.UsageError(f"--o {args.o}: decoded vectors are written as one of {' '.join(VECTOR_EXTENSIONS)}")
    codes = packing.read_codes_file(args.i, model, raw=args.raw)
    print(f"Decoding input codes of size {codes.shape}", flush=True)
    t0 = time.time()
    y = codec.decode(model, codes, batch_size=args.batch_size, dtype=cli.dtype_from_args(args),
                     progress="decoding")
    print(f"Decoding done in {time.time() - t0:.2f} s", flush=True)
    print(f"Storing result of size {y.shape} in {args.o}", flush=True)
    vecs_io.write_vectors(args.o, y)


def main(argv=None):
    args = build_parser().parse_args(argv)
    cli.print_args(args)
    if args.encode == args.decode:
        raise cli.UsageError("select exactly one of --encode and --decode")
    cli.select_device(args.device)
    model = cli.load_model_arg(args.model)
    if args.encode:
        encode_file(model, args)
    else:
        decode_file(model, args)


def run() -> None:
    """Console entry point: bad input ends with one 'error:' line and exit status 2."""
    cli.run_main(main)


if __name__ == "__main__":
    run()
