"""The serving-side expert benches: `python -m raymoe.jobs.bench eplb serving=1 remote=1` (shards in their own
processes over gloo, a policy scale-up under a skewed mix; greedy tokens identical in every phase, the scale-up lowers
the measured imbalance and the modelled EP critical path) and `python -m raymoe.jobs.bench expert_transport`."""
from __future__ import annotations

from rich.console import Console

from raymoe.jobs.benches.eplb import run_serving


def test_remote_serving_bench(tmp_path) -> None:
    out = run_serving({"remote": "1", "requests": "6", "max_tokens": "16", "reps": "2",
                       "metrics_dir": str(tmp_path / "m")}, Console(width=150, file=open(tmp_path / "log", "w")))
    s = out["serving"]
    assert s["remote"] and s["tokens_identical"]
    b, a = s["before"], s["after"]
    assert s["decision"]["action"] == "add" and a["num_shards"] == b["num_shards"] + 1
    assert a["balance"] < b["balance"] and a["critical_rows_per_token"] < b["critical_rows_per_token"]
    assert s["in_process"]["balance"] == b["balance"]  # same placement, same routing: same measured balance
    assert (tmp_path / "m" / "metrics.jsonl").exists()


def test_expert_transport_bench(ray_session) -> None:
    """Both transports return the in-process outputs (the bench asserts it) and every timing is recorded."""
    from raymoe.jobs.benches.expert_transport import run

    out = run({"rows": "8,64", "reps": "3", "dim": "128", "inter": "64"})
    assert [r["rows_per_shard"] for r in out["rows"]] == [8, 64]
    assert all(r["gloo_ms"] > 0 and r["ray_ms"] > 0 and r["in_process_ms"] > 0 for r in out["rows"])
