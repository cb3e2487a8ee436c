"""`python -m raymoe.jobs.bench pipeline` on the tiny model: rows, positive times, parameter bytes, the PNG."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.usefixtures("ray_session")


def test_bench_pipeline_tiny_pp2(tmp_path) -> None:
    import ray

    from raymoe.jobs.benches import pipeline

    out = pipeline.run({"model": "tiny", "pp": "2", "schedules": "1f1b,dualpipe", "steps": "2", "seq_len": "32",
                        "plot": str(tmp_path)})
    assert ray.is_initialized()  # the bench reused the session's Ray and left it running
    rows = out["rows"]
    assert [(r["pp"], r["schedule"], r["microbatches"]) for r in rows] == [(2, "1f1b", 4), (2, "dualpipe", 4)]
    for r in rows:
        assert "error" not in r, r.get("error")
        assert r["steps_timed"] == 2
        assert r["step_s"] > 0 and r["pipe_s"] > 0 and r["tokens_per_s"] > 0
        assert r["pipe_s"] <= max(r["step_s_all"])
        assert r["sim"]["net"]["makespan_s"] > 0 and r["sim"]["raw"]["makespan_s"] >= r["sim"]["net"]["makespan_s"]
        assert len(r["idle_s"]) == len(r["sim"]["net"]["idle_s"]) == 2
        assert all(b > 0 for b in r["busy_s"]) and all(w >= 0 for w in r["wait_s"])
        assert r["op_ms"]["net"]["F"] > 0 and r["op_ms"]["raw"]["F"] >= r["op_ms"]["net"]["F"]
        assert all(a > 0 for a in r["peak_activation_bytes"])
        assert 0 <= r["control_plane_share"] < 1
        for meas, pred in zip(r["param_bytes"], r["param_bytes_pred"]):
            assert abs(meas - pred) <= 0.05 * pred, (r["schedule"], r["param_bytes"], r["param_bytes_pred"])
        assert len(r["timeline"]) == 2 and all(r["timeline"])
    one, dual = rows
    assert set(one["op_count"]) == {"F", "B"}  # 1F1B: full backwards only
    assert "FB" in dual["op_count"]  # DualPipe overlaps F&B pairs
    assert dual["param_bytes"][0] == dual["param_bytes"][1]  # DualPipe pp=2: both ranks hold the whole model
    png = tmp_path / "pipeline_pp2.png"
    assert out["plots"] == {"pp2": str(png)}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_invalid_layout_is_listed_with_the_reason() -> None:
    from raymoe.jobs.benches import pipeline

    out = pipeline.run({"model": "tiny", "pp": "4", "schedules": "dualpipev", "steps": "1", "seq_len": "32"})
    (row,) = out["rows"]
    assert row["schedule"] == "dualpipev" and "8 stages" in row["error"]


def test_op_kinds_and_costs() -> None:
    from raymoe.jobs.benches.pipeline import op_kind, sim_costs

    assert [op_kind(t) for t in ("F3", "B1r", "Bi0", "W2", "F4&B0r", "F0r&Bi1")] == ["F", "B", "Bi", "W", "FB", "FB"]
    assert sim_costs({"F": 1.0, "Bi": 1.0, "W": 0.5}) == {"F": 1.0, "B": 1.5, "W": 0.5, "FB": 2.5}
    assert sim_costs({"F": 1.0, "B": 2.0}) == {"F": 1.0, "B": 2.0, "W": 0.0, "FB": 3.0}
