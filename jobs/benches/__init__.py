"""Benchmark suites for `python -m raymoe.jobs.bench <suite>`, and the timing helper they share."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable


def median_seconds(fn: Callable[[], Any], iters: int, warmup: int = 0) -> float:
    """Median wall time of ``iters`` calls of ``fn`` (seconds), after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)
