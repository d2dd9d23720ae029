"""What a person watches while a model trains: codeword usage and TensorBoard curves.

Two parts, used by the training loop (`training.loop.fit`) through one small hook:

* `codeword_stats(usage)`: from the (M, K) counts of the codewords the epoch's training
  encodes chose, per codebook step m, the entropy of the usage distribution (bits), its
  perplexity (2^entropy: the number of equally used codewords it amounts to, K at
  best) and the number of dead codewords (chosen by no training vector of the epoch).
  These go into every epoch's record of the JSON history and into the progress line.
* a monitor: an object with `on_epoch(record, steps, first_step)` that `fit` calls
  after every epoch with the epoch's record (the JSON history's) and its per-step
  values (loss, learning rate, gradient norm), numbered from `first_step`, the global
  optimizer step. `NullMonitor` does nothing (the default); `TensorBoardMonitor(dir)`
  writes TensorBoard event files with tensorboardX (no TensorFlow needed):

      train/loss, train/lr, train/grad_norm              every optimizer step
      val/mse, train/epoch_loss                          every epoch (at its last step)
      codewords/perplexity_mean, codewords/dead_total    every epoch
      codewords/perplexity/m<i>, codewords/entropy/m<i>, codewords/dead/m<i>

  Watch them with `tensorboard --logdir <dir>` (tensorboard is installed separately:
  `pip install tensorboard`). `read_scalars(dir)` reads them back without TensorBoard.

The per-step values are fetched from the device once per epoch, so watching costs the
training no synchronisation per step.
"""

from __future__ import annotations

import glob
import os
import struct
from typing import Protocol

import numpy as np


def codeword_stats(usage) -> dict[str, list]:
    """Per codebook step m of usage (M, K) counts: {"codebook_entropy": [bits],
    "codebook_perplexity": [2^bits], "dead_codewords": [codewords of count 0]}.
    A step that no vector reached (all counts 0) has entropy 0 and perplexity 1."""
    counts = np.asarray(usage, np.float64)
    if counts.ndim != 2:
        raise ValueError(f"codeword usage must be (M, K) counts, got shape {counts.shape}")
    totals = counts.sum(axis=1, keepdims=True)
    p = counts / np.maximum(totals, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.sum(np.where(p > 0, p * np.log2(p), 0.0), axis=1)
    return {"codebook_entropy": [round(float(h), 6) for h in entropy],
            "codebook_perplexity": [round(float(2 ** h), 4) for h in entropy],
            "dead_codewords": [int(n) for n in np.sum(counts == 0, axis=1)]}


def usage_summary(record: dict) -> str:
    """The progress line's part for an epoch record with codeword_stats' fields."""
    if "codebook_perplexity" not in record:
        return ""
    perp, dead = record["codebook_perplexity"], record["dead_codewords"]
    return f" perplexity {np.mean(perp):.1f} (min {min(perp):.1f}) dead {sum(dead)}"


class Monitor(Protocol):
    """The training loop's hook (see the module docstring)."""

    def on_epoch(self, record: dict, steps: dict[str, np.ndarray], first_step: int) -> None: ...


class NullMonitor:
    """Watches nothing."""

    def on_epoch(self, record: dict, steps: dict[str, np.ndarray], first_step: int) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "NullMonitor":
        return self

    def __exit__(self, *exc) -> None:
        pass


def check_writable_dir(path: str | os.PathLike, what: str = "tensorboard directory") -> str:
    """Create `path` if needed and check that a file can be written in it; a clear
    error naming it otherwise. Returns the path."""
    path = os.fspath(path)
    if not path:
        raise ValueError(f"{what}: an empty path")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{what} {path} exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"x")
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"{what} {path} cannot be written: {e.strerror or e}") from None
    return path


class TensorBoardMonitor:
    """Writes the training curves to TensorBoard event files in `logdir` (created; a
    directory that cannot be written is an error here, before any training work).
    The event file is opened at the first epoch's call, so that in a multi-process run
    only the process that reports (fit calls process 0's monitor) writes one.
    Use as a context manager or call close()."""

    def __init__(self, logdir: str | os.PathLike):
        import tensorboardX  # noqa: F401  (missing: an error now, not after an epoch)

        self.logdir = check_writable_dir(logdir)
        self.writer = None

    def on_epoch(self, record: dict, steps: dict[str, np.ndarray], first_step: int) -> None:
        if self.writer is None:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(logdir=self.logdir)
        w = self.writer
        n = 0
        for name, values in steps.items():
            values = np.asarray(values, np.float64)
            n = max(n, len(values))
            for i, v in enumerate(values):
                w.add_scalar(f"train/{name}", float(v), first_step + i + 1)
        last = first_step + max(n, 1)
        if "val_mse" in record:
            w.add_scalar("val/mse", float(record["val_mse"]), last)
        if "train_loss" in record:
            w.add_scalar("train/epoch_loss", float(record["train_loss"]), last)
        if "codebook_perplexity" in record:
            for m, (perp, ent, dead) in enumerate(zip(record["codebook_perplexity"], record["codebook_entropy"],
                                                      record["dead_codewords"])):
                w.add_scalar(f"codewords/perplexity/m{m}", perp, last)
                w.add_scalar(f"codewords/entropy/m{m}", ent, last)
                w.add_scalar(f"codewords/dead/m{m}", dead, last)
            w.add_scalar("codewords/perplexity_mean", float(np.mean(record["codebook_perplexity"])), last)
            w.add_scalar("codewords/dead_total", sum(record["dead_codewords"]), last)
        w.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def __enter__(self) -> "TensorBoardMonitor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_scalars(logdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files in `logdir`: {tag: [(step, value), ...]} in file
    order. Reads the TFRecord framing (length, its CRC, the Event proto, its CRC) with
    tensorboardX's own protos; the CRCs are not checked."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    files = sorted(glob.glob(os.path.join(os.fspath(logdir), "events.out.tfevents.*")))
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    out.setdefault(value.tag, []).append((int(event.step), float(value.simple_value)))
    return out
