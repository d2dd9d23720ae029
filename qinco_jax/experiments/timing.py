"""Wall-clock timing and resident-memory sampling shared by the benchmarks (`bench/`) and
the device check."""

from __future__ import annotations

import threading
import time
from typing import Callable


def timed(fn: Callable[[], object], min_seconds: float = 1.0, min_runs: int = 3) -> float:
    """Best wall time of `fn()` in seconds over several runs (at least `min_runs`, for at
    least `min_seconds`), after one warm-up run that compiles. The best, not the mean: on
    a shared machine the other runs measure the neighbours."""
    fn()
    times = []
    t_end = time.perf_counter() + min_seconds
    while len(times) < min_runs or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def status_kb(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in kB (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class PeakMemory(threading.Thread):
    """The peaks of /proc/self/status `fields` (kB), sampled every `period` seconds from
    start() until stop(), which returns them: what a process really holds at its worst
    (VmHWM alone also counts the reclaimable pages of memory-mapped files)."""

    def __init__(self, fields=("VmRSS", "RssAnon"), period: float = 0.005):
        super().__init__(daemon=True)
        self.period, self._done = period, threading.Event()
        self.peak_kb = dict.fromkeys(fields, 0)

    def sample(self) -> None:
        for k in self.peak_kb:
            self.peak_kb[k] = max(self.peak_kb[k], status_kb(k))

    def run(self) -> None:
        while not self._done.is_set():
            self.sample()
            time.sleep(self.period)

    def stop(self) -> dict:
        self._done.set()
        self.join()
        self.sample()
        return self.peak_kb
