"""bench gemm_read on the tiny model's shapes, small pool: every way runs, and its rate is bytes over time."""
from __future__ import annotations

import math

from raymoe.jobs.benches import gemm_read
from raymoe.model import cpu_kernels


def test_gemm_read_tiny_shapes() -> None:
    out = gemm_read.run({"model": "tiny", "rows": "1,4", "reps": "1", "pool_mb": "2"})
    ways = {(r["shape"].split(" [")[0], r["rows"], r["way"]) for r in out["rows"]}
    assert ("lm_head", 1, "mv") in ways and ("lm_head", 4, "mv") not in ways
    assert {("routed experts", 4, w) for w in ("sum (read)", "mm (per expert)", "W·xᵀ (per expert)", "bmm",
                                                "bf16 bmm")} <= ways
    assert ("routed gate+up", 1, "W·xᵀ (per expert)") in ways
    if cpu_kernels.available():  # raymoe's own kernels beside torch's
        assert {("lm_head", 4, "native"), ("lm_head", 4, "native packed"),
                ("routed experts", 1, "native (per expert)")} <= ways
    for r in out["rows"]:
        if r["ms"] is None:
            continue
        shape = [int(v) for v in r["shape"].split("[")[1].rstrip("]").split(", ")]
        nbytes = math.prod(shape) * (2 if r["way"].startswith("bf16") else 4)
        ok = abs(r["GB/s"] - nbytes / (r["ms"] / 1e3) / 1e9) <= 1e-6 * r["GB/s"]
        assert ok, r
        assert r["vs_sum"] > 0
