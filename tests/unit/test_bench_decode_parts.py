"""``bench decode_parts`` on the tiny preset: every part is timed for each engine, the parts add up to no more than
the step, and each part's floors are its bytes and flops over the rates measured in the same run."""
from __future__ import annotations

import pytest

from raymoe.jobs.benches import decode_parts

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_decode_parts_tiny() -> None:
    out = decode_parts.run({"model": "tiny", "batch": "3", "prompt_len": "8", "steps": "3"})
    parts = {r["part"]: r for r in out["parts"]}
    assert set(parts) == set(decode_parts.PARTS) | {"rest"}
    for name in ("default", "torch", "unfused"):
        assert all(parts[p][f"{name}_ms"] > 0 for p in decode_parts.PARTS), name
        assert parts["rest"][f"{name}_ms"] >= 0
    for p in decode_parts.PARTS:
        r = parts[p]
        assert r["bw_floor_ms"] == pytest.approx(r["mb"] * 1e6 / (out["stream_gb_s"] * 1e9) * 1e3)
        assert r["compute_floor_ms"] == pytest.approx(r["gflop"] / out["matmul_gflops"] * 1e3)
    assert 0 < out["touched_experts_per_layer"] <= 3 * 2  # tiny: 3 rows, top-2 of its experts
    assert out["floor_ms"]["bandwidth"] == pytest.approx(sum(parts[p]["bw_floor_ms"] for p in decode_parts.PARTS))
