"""Fuzz the `.pt` reader: mutate every fixture checkpoint in many ways and check that
each mutated file either loads the same model or is refused with CheckpointError.

    python bench/fuzz_pt.py --cases 20000          # the long run (tests/test_fuzz_pt.py runs 160)

Mutations, on the whole file (the zip's CRC-32s still describe the original bytes):
bit flips, random bytes, extreme 32-bit values (a damaged length or offset field),
truncations, insertions and deletions. And, re-zipped with valid CRC-32s so that they
reach the unpickler: data.pkl with opcodes swapped, deleted, duplicated or inserted
(including globals that would run code, 8-byte lengths, huge memo indices, LONG4),
data.pkl bit flips, zip entries removed, renamed, truncated or extended.

Outcomes: "same" (loads a model equal to the original), "refused" (CheckpointError),
"different" (a re-zipped pickle that describes another valid model: the archive is
intact, so nothing can tell it from a real file; never allowed for the raw-byte
mutations, which the CRC-32s must catch), and failures: any other exception, a case
over the time limit, or more memory than the bound (a field of the file sizing an
allocation). Exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import pickletools
import random
import signal
import struct
import sys
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

from qinco_jax.formats import checkpoint
from qinco_jax.models import pairwise
from qinco_jax.formats import torch_pickle
from qinco_jax.formats.torch_pickle import CheckpointError

FIXTURES = ROOT / "tests" / "fixtures"
EXTREME_U32 = (0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xFFFFFFFE, 0x10000, 0x40000000)

# Opcodes an attacker or a damaged stream could insert: calls to code, huge lengths.
HOSTILE_OPCODES = [
    b"cos\nsystem\n", b"cbuiltins\neval\n", b"c__builtin__\ngetattr\n", b"cposix\nsystem\n",
    b"\x8c\x02os\x8c\x06system\x93",                       # SHORT_BINUNICODE x2 + STACK_GLOBAL
    b"\x8a\xff" + b"\xff" * 255,                            # LONG1, 255 bytes
    b"\x8b\xff\xff\xff\x7f",                                # LONG4, 2 GB length
    b"X\xff\xff\xff\xff", b"B\xff\xff\xff\x7f",             # BINUNICODE / BINBYTES, 4 GB / 2 GB
    b"\x8d" + b"\xff" * 8, b"\x8e" + b"\xff" * 8,           # BINUNICODE8 / BINBYTES8
    b"\x95" + b"\xff" * 8,                                  # FRAME of 2^64 - 1
    b"r\xff\xff\xff\xff", b"j\xff\xff\xff\xff",             # LONG_BINPUT / LONG_BINGET 4e9
    b"\x82\x01", b"\x83\x01\x00", b"\x84\x01\x00\x00\x00",  # EXT1/2/4
    b"(ios\nsystem\n", b"(o", b"Pos.system\n",               # INST, OBJ, PERSID
    b"\x97", b"\x98",                                       # NEXT_BUFFER, READONLY_BUFFER
    b"L99999999999999999999999999999999999999999999999999L\n", b"I" + b"9" * 5000 + b"\n",
    b"(" * 64, b"]" * 64, b"0", b"2", b"t", b"R", b"b", b"s", b"u", b"e", b"\x81", b".",
]


# --------------------------------------------------------------------------------------
# Mutations: each returns the mutated file bytes and its family
# --------------------------------------------------------------------------------------


def read_entries(data: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return [(i.filename, zf.read(i)) for i in zf.infolist()]


def rezip(entries: list[tuple[str, bytes]]) -> bytes:
    import warnings

    out = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        warnings.simplefilter("ignore")  # "Duplicate name": a duplicated entry is one of the mutations
        for name, payload in entries:
            zf.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), payload)
    return out.getvalue()


def _raw(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    kind = rng.randrange(7)
    if kind == 0:  # bit flips
        for _ in range(rng.choice((1, 1, 2, 8))):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif kind == 1:  # random bytes
        for _ in range(rng.choice((1, 4, 16))):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif kind == 2:  # an extreme 32-bit value: a damaged length, offset or count field
        i = rng.randrange(len(b) - 4)
        b[i:i + 4] = struct.pack("<I", rng.choice(EXTREME_U32))
    elif kind == 3:  # truncation
        del b[rng.randrange(len(b)):]
    elif kind == 4:  # insertion
        i = rng.randrange(len(b))
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.choice((1, 3, 64))))
    elif kind == 5:  # deletion
        i = rng.randrange(len(b))
        del b[i:i + rng.choice((1, 4, 100))]
    else:  # a header field of the central directory or end record: the last 1/8 of the file
        i = rng.randrange(len(b) * 7 // 8, len(b) - 4)
        b[i:i + 4] = struct.pack("<I", rng.choice(EXTREME_U32))
    return bytes(b)


def _opcode_spans(pkl: bytes) -> list[tuple[int, int]]:
    ops = list(pickletools.genops(pkl))
    ends = [pos for _, _, pos in ops[1:]] + [len(pkl)]
    return [(pos, end) for (_, _, pos), end in zip(ops, ends)]


def _pickle(rng: random.Random, pkl: bytes) -> bytes:
    spans = _opcode_spans(pkl)
    kind = rng.randrange(6)
    a, b = rng.choice(spans), rng.choice(spans)
    if kind == 0:  # swap two opcodes
        (a, b) = sorted((a, b))
        if a == b or a[1] > b[0]:
            return pkl[:a[0]] + pkl[a[1]:]
        return pkl[:a[0]] + pkl[b[0]:b[1]] + pkl[a[1]:b[0]] + pkl[a[0]:a[1]] + pkl[b[1]:]
    if kind == 1:  # delete one
        return pkl[:a[0]] + pkl[a[1]:]
    if kind == 2:  # duplicate one
        return pkl[:a[1]] + pkl[a[0]:a[1]] + pkl[a[1]:]
    if kind == 3:  # insert a hostile one
        return pkl[:a[0]] + rng.choice(HOSTILE_OPCODES) + pkl[a[0]:]
    if kind == 4:  # damage an argument: the bytes after an opcode
        body = bytearray(pkl)
        i = min(a[0] + 1, len(body) - 1)
        body[i:i + 4] = struct.pack("<I", rng.choice(EXTREME_U32))[:max(0, min(4, len(body) - i))]
        return bytes(body)
    body = bytearray(pkl)  # bit flips
    for _ in range(rng.choice((1, 2, 4))):
        i = rng.randrange(len(body))
        body[i] ^= 1 << rng.randrange(8)
    return bytes(body)


def _entries(rng: random.Random, entries: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    entries = list(entries)
    i = rng.randrange(len(entries))
    name, payload = entries[i]
    kind = rng.randrange(5)
    if kind == 0:
        del entries[i]
    elif kind == 1:
        entries[i] = (name + "x" if rng.random() < 0.5 else name.replace("/", "/data/", 1), payload)
    elif kind == 2:
        entries[i] = (name, payload[:rng.randrange(len(payload) + 1)])
    elif kind == 3:
        entries[i] = (name, payload + bytes(rng.randrange(256) for _ in range(rng.choice((1, 4, 1024)))))
    else:
        entries.append(entries[rng.randrange(len(entries))])
    return entries


def mutate(rng: random.Random, data: bytes, entries: list[tuple[str, bytes]]) -> tuple[str, bytes]:
    """(family, mutated file): 'raw' keeps the original CRC-32s, 'rezip' has valid ones."""
    r = rng.random()
    if r < 0.5:
        return "raw", _raw(rng, data)
    if r < 0.85:
        pkl_i = next(i for i, (n, _) in enumerate(entries) if n.endswith("/data.pkl"))
        new = list(entries)
        new[pkl_i] = (entries[pkl_i][0], _pickle(rng, entries[pkl_i][1]))
        return "rezip", rezip(new)
    return "rezip", rezip(_entries(rng, entries))


# --------------------------------------------------------------------------------------
# Running a case
# --------------------------------------------------------------------------------------


class CaseTimeout(BaseException):
    """Raised by the alarm: a BaseException so that no `except Exception` swallows it."""


def _alarm(signum, frame):
    raise CaseTimeout()


def loader_for(path: Path):
    """The library's reader of a fixture: QINCo2's pairwise decoder files have their
    own; every other .pt (v1, QINCo2, IVF) is a model for checkpoint.load_model."""
    return pairwise.load_pairwise_decoder if path.name.startswith("pairwise_decoder") else checkpoint.load_model


def describe(obj) -> str:
    return obj.describe() if hasattr(obj, "describe") else type(obj).__name__


def loaded_arrays(obj) -> list[np.ndarray]:
    """Every array of a loaded model (all parameters, QINCo2's normalisation and target
    statistics included; PQ: every sub-model and the OPQ matrix) or pairwise decoder."""
    import jax

    if hasattr(obj, "subs"):
        tree = [s.params for s in obj.subs] + [obj.opq]
    else:
        tree = obj.params if hasattr(obj, "params") else obj
    return [np.asarray(a) for a in jax.tree.leaves(tree)]


def same_model(a, b) -> bool:
    if type(a) is not type(b) or describe(a) != describe(b):
        return False
    if hasattr(a, "config") and a.config != b.config:
        return False
    if hasattr(a, "subs") and [s.config for s in a.subs] != [s.config for s in b.subs]:
        return False
    xa, xb = loaded_arrays(a), loaded_arrays(b)
    return len(xa) == len(xb) and all(x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)
                                      for x, y in zip(xa, xb))


def load_reference(path: Path):
    """(loaded original, the file's bytes, its entries). Every fixture must load: a
    mutated case is then compared with it."""
    original = loader_for(path)(path)
    data = path.read_bytes()
    return original, data, read_entries(data)


def run_case(path: Path, family: str, original, time_limit: float, memory_limit: int) -> tuple[str, str]:
    """(outcome, detail): outcome in same / refused / different / failure."""
    signal.signal(signal.SIGALRM, _alarm)
    tracemalloc.start()
    try:
        signal.setitimer(signal.ITIMER_REAL, time_limit)
        try:
            model = loader_for(path)(path)  # torch_pickle.load_pt, then the model's own checks
        except CheckpointError as e:
            outcome, detail = "refused", str(e)[:200]
        else:
            if same_model(model, original):
                outcome, detail = "same", ""
            elif family == "rezip":
                outcome, detail = "different", describe(model)
            else:
                outcome, detail = "failure", f"a damaged file loaded silently as {describe(model)}"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except CaseTimeout:
        outcome, detail = "failure", f"over the time limit of {time_limit} s"
    except BaseException as e:  # noqa: BLE001 - any other exception is what is looked for
        if isinstance(e, KeyboardInterrupt):
            raise
        outcome, detail = "failure", f"{type(e).__name__}: {str(e)[:200]}"
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    if outcome != "failure" and peak > memory_limit:
        outcome, detail = "failure", f"allocated {peak} bytes (bound {memory_limit})"
    return outcome, detail


def fixture_paths() -> list[Path]:
    return sorted(FIXTURES.rglob("*.pt"))


def fuzz(cases: int, seed: int = 0, time_limit: float = 5.0, workdir: str | None = None,
         log=None) -> dict:
    """Run `cases` mutations spread over every fixture; returns counts and failures."""
    import tempfile

    rng = random.Random(seed)
    refs = {p: load_reference(p) for p in fixture_paths()}
    paths = list(refs)
    counts: dict[str, int] = {}
    by_fixture: dict[str, dict[str, int]] = {str(p.relative_to(FIXTURES)): {} for p in paths}
    failures: list[dict] = []
    slowest = 0.0
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for case in range(cases):
            path = paths[case % len(paths)]
            original, data, entries = refs[path]
            family, mutated = mutate(rng, data, entries)
            target = Path(tmp) / path.name
            target.write_bytes(mutated)
            # the bound: a few copies of the file (its storages are read once, converted once)
            memory_limit = 16 * len(data) + (8 << 20)
            t0 = time.perf_counter()
            outcome, detail = run_case(target, family, original, time_limit, memory_limit)
            slowest = max(slowest, time.perf_counter() - t0)
            key = f"{family}:{outcome}"
            counts[key] = counts.get(key, 0) + 1
            mine = by_fixture[str(path.relative_to(FIXTURES))]
            mine[outcome] = mine.get(outcome, 0) + 1
            if outcome == "failure":
                failures.append({"case": case, "fixture": str(path.relative_to(FIXTURES)), "family": family,
                                 "detail": detail})
                if log:
                    log(f"FAILURE {failures[-1]}")
            if log and (case + 1) % 1000 == 0:
                log(f"{case + 1} cases: {counts}")
    return {"cases": cases, "seed": seed, "fixtures": [str(p.relative_to(FIXTURES)) for p in paths],
            "counts": counts, "by_fixture": by_fixture, "failures": failures, "slowest_case_s": round(slowest, 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time_limit", type=float, default=5.0, help="seconds per case")
    p.add_argument("--json", default="", help="write the summary here")
    args = p.parse_args(argv)
    t0 = time.time()
    res = fuzz(args.cases, args.seed, args.time_limit, log=lambda m: print(m, flush=True))
    res["seconds"] = round(time.time() - t0, 1)
    print(json.dumps({k: v for k, v in res.items() if k != "failures"}, indent=1))
    for f in res["failures"][:20]:
        print("FAILURE", f)
    if args.json:
        from qinco_jax.formats.io import write_bytes

        write_bytes(args.json, json.dumps(res, indent=1).encode())
    return 1 if res["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
