"""Wall-clock timing shared by the benchmarks (`bench/`) and the device check."""

from __future__ import annotations

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
