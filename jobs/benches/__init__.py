"""Benchmark suites for `python -m raymoe.jobs.bench <suite>`, and the timing helpers they share."""
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


def matmul_peak(dtype: Any = None, n: int = 2048, iters: int = 5, warmup: int = 2) -> float:
    """This machine's matmul rate now (flop/s): the median of ``iters`` ``[n, n] @ [n, n]`` products of ``dtype``
    (default fp32) on the current intra-op threads, the compute roof the suites hold GEMMs to."""
    import torch  # the suites' registry imports this package without torch

    dtype = dtype or torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / median_seconds(lambda: a @ b, iters, warmup=warmup)
