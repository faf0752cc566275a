"""Timing helpers shared by the benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_time(fn: Callable[[], object], repeat: int, cleanup: Callable[[], object] = lambda: None) -> float:
    """Median wall seconds of `fn` over `repeat` runs; `cleanup` runs after each, untimed."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        cleanup()
    return statistics.median(times)
