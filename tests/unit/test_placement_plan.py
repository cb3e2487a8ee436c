"""The training placement plan (pure Python): EP groups on one node, DP replicas packed and spread, clear errors."""
from __future__ import annotations

import pytest

from raymoe.train.placement import NodeCapacity, PlacementInfeasible, max_placeable_dp, plan_placement
from raymoe.config import ModelConfig
from raymoe.train.topology import Topology


def topology(pp: int, ep: int, dp: int) -> Topology:
    """The runtime's own rank order (the plan must index ranks the way the topology does)."""
    return Topology(pp, ep, dp, "1f1b", 4, ModelConfig.preset("tiny"))


def nodes(*cpus: float) -> list[NodeCapacity]:
    return [NodeCapacity(f"n{i}", f"10.0.0.{i + 1}", c) for i, c in enumerate(cpus)]


def ids(plan: list[NodeCapacity]) -> list[str]:
    return [n.node_id for n in plan]


def replica_nodes(plan: list[NodeCapacity], pp: int, ep: int, dp: int) -> list[set[str]]:
    topo = topology(pp, ep, dp)
    out: list[set[str]] = [set() for _ in range(dp)]
    for r, n in enumerate(plan):
        out[topo.coords(r).dp_rank].add(n.node_id)
    return out


def test_replicas_are_packed_and_spread() -> None:
    plan = plan_placement(2, 1, 2, nodes(4, 4), 1.0)
    assert ids(plan) == ["n0", "n1", "n0", "n1"]  # rank = pp_rank * dp + dp_rank
    assert replica_nodes(plan, 2, 1, 2) == [{"n0"}, {"n1"}]
    # pp=2 x ep=2 x dp=2 on 3 nodes of 4 CPUs: each replica (4 ranks) whole on its own node, the third node idle
    plan = plan_placement(2, 2, 2, nodes(4, 4, 4), 1.0)
    assert replica_nodes(plan, 2, 2, 2) == [{"n0"}, {"n1"}]
    # more replicas than nodes: spread first, then the node with the most room
    plan = plan_placement(1, 1, 3, nodes(2, 1), 1.0)
    assert ids(plan) == ["n0", "n1", "n0"]


def test_a_replica_too_big_for_one_node_is_split_by_ep_group() -> None:
    # pp=2 x ep=2: a replica needs 4 CPUs, nodes have 2 -> each stage's EP group (2 ranks) on one node
    plan = plan_placement(2, 2, 1, nodes(2, 2), 1.0)
    topo = topology(2, 2, 1)
    by_stage: dict[int, set[str]] = {}
    for r, n in enumerate(plan):
        by_stage.setdefault(topo.coords(r).pp_rank, set()).add(n.node_id)
    assert by_stage == {0: {"n0"}, 1: {"n1"}}


def test_infeasible_layouts_name_what_is_missing() -> None:
    with pytest.raises(PlacementInfeasible, match=r"EP group of 4 rank\(s\) needs 4 CPU on one node"):
        plan_placement(1, 4, 1, nodes(2, 2), 1.0)
    with pytest.raises(PlacementInfeasible, match="no alive node"):
        plan_placement(1, 1, 1, [], 1.0)
    with pytest.raises(PlacementInfeasible, match="GPU"):
        plan_placement(1, 2, 1, [NodeCapacity("g", "10.0.0.9", 8.0, 1.0)], 1.0, 1.0)


def test_ranks_without_resources_still_spread() -> None:
    assert ids(plan_placement(1, 1, 4, nodes(0, 0), 0.0)) == ["n0", "n1", "n0", "n1"]


def test_max_placeable_dp_after_a_node_loss() -> None:
    degrees = [1, 2, 4]
    assert max_placeable_dp(2, 1, degrees, nodes(2, 2), 1.0) == 2
    assert max_placeable_dp(2, 1, degrees, nodes(2), 1.0) == 1  # one 2-CPU node left: one replica
    assert max_placeable_dp(2, 1, degrees, nodes(1), 1.0) is None  # 1 CPU cannot hold a 2-rank replica
