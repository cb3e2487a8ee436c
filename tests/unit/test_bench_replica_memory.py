"""The replica_memory bench on the tiny preset (fresh processes, 2 shard processes reading the checkpoint): the
remote engine's parameters are the local engine's minus its routed experts, the shards hold exactly those experts,
and greedy tokens match (the bench raises otherwise; the values are checked here too)."""
from __future__ import annotations


def test_replica_memory_tiny() -> None:
    from raymoe.jobs.benches import replica_memory

    r = replica_memory.run({"presets": "tiny", "tokens": "4", "num_blocks": "32"})["presets"]["tiny"]
    loc, rem = r["local"], r["remote"]
    assert loc["routed_expert_bytes"] > 0 and rem["routed_expert_bytes"] == 0 and rem["routed_expert_params"] == 0
    assert rem["param_bytes"] == loc["param_bytes"] - loc["routed_expert_bytes"] == r["non_expert_bytes"]
    assert rem["shard_slot_bytes"] == loc["routed_expert_bytes"]
    assert rem["kv_bytes"] == loc["kv_bytes"] > 0 and len(rem["shard_rss_bytes"]) == 2
