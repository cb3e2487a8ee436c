"""Which node hosts which rank: the placement plan behind the Ray placement group of a training layout.

Strategy (the shape DeepSeek-V3's cluster gives it):

1. **An EP group stays on one node.** The ``ep`` ranks of one pipeline stage of one DP replica exchange tokens in
   every MoE layer (dispatch/combine all-to-all): they belong in one NVLink domain, i.e. one node. A layout whose EP
   group does not fit any node is refused.
2. **A DP replica is packed** (its ``pp × ep`` ranks on as few nodes as possible: pipeline P2P stays local) and
   **replicas are spread** across nodes: replica ``r`` goes to the node hosting the fewest replicas so far that can
   hold all of it (ties: most free capacity, then node order). So losing a node takes whole replicas, and the
   survivors are complete replicas that can go on at a smaller DP — not one stage of every replica.
3. Only when no node can hold a whole replica is it split, one EP group at a time, onto the nodes with the most
   free capacity (again preferring nodes without other replicas).

Capacity is in Ray's logical resources: ``cpus_per_rank`` (and one GPU per rank on NCCL). A rank that reserves no
resources (``num_cpus_per_rank=0``) fits anywhere; the spread rule still applies. Pure Python, no Ray: the actor
layer feeds it the alive nodes and turns the plan into a placement group with one bundle per rank pinned by node id.

Example (2 nodes of 4 CPUs, pp=2 ep=1 dp=2, 1 CPU per rank)::

    >>> nodes = [NodeCapacity("a", "10.0.0.1", 4.0), NodeCapacity("b", "10.0.0.2", 4.0)]
    >>> [n.node_id for n in plan_placement(2, 1, 2, nodes, 1.0)]   # rank = pp_rank * (ep*dp) + ep_rank * dp + dp_rank
    ['a', 'b', 'a', 'b']
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["NodeCapacity", "PlacementInfeasible", "plan_placement", "max_placeable_dp"]


class PlacementInfeasible(RuntimeError):
    """The alive nodes cannot host the layout under the placement rules; the message says what is missing."""


@dataclass(frozen=True)
class NodeCapacity:
    node_id: str
    ip: str
    cpus: float  # free logical CPUs
    gpus: float = 0.0


def _rank(pp_rank: int, ep_rank: int, dp_rank: int, ep: int, dp: int) -> int:
    return pp_rank * ep * dp + ep_rank * dp + dp_rank


def plan_placement(pp: int, ep: int, dp: int, nodes: list[NodeCapacity], cpus_per_rank: float,
                   gpus_per_rank: float = 0.0) -> list[NodeCapacity]:
    """The node of every rank (index = global rank, the order of :class:`raymoe.train.topology.Topology`).

    Raises :class:`PlacementInfeasible` naming the first EP group or replica that does not fit."""
    if not nodes:
        raise PlacementInfeasible("no alive node with resources")
    free_c = {n.node_id: n.cpus for n in nodes}
    free_g = {n.node_id: n.gpus for n in nodes}
    hosted = {n.node_id: 0 for n in nodes}  # replicas with at least one rank on the node
    order = {n.node_id: i for i, n in enumerate(nodes)}
    by_id = {n.node_id: n for n in nodes}

    def fits(nid: str, ranks: int) -> bool:
        return (free_c[nid] + 1e-9 >= ranks * cpus_per_rank) and (free_g[nid] + 1e-9 >= ranks * gpus_per_rank)

    def take(nid: str, ranks: int) -> None:
        free_c[nid] -= ranks * cpus_per_rank
        free_g[nid] -= ranks * gpus_per_rank

    def best(candidates: list[str]) -> Optional[str]:
        if not candidates:
            return None
        return min(candidates, key=lambda nid: (hosted[nid], -free_c[nid], -free_g[nid], order[nid]))

    out: list[Optional[NodeCapacity]] = [None] * (pp * ep * dp)
    per_replica = pp * ep
    for r in range(dp):
        whole = best([nid for nid in free_c if fits(nid, per_replica)])
        if whole is not None:
            take(whole, per_replica)
            hosted[whole] += 1
            for p in range(pp):
                for e in range(ep):
                    out[_rank(p, e, r, ep, dp)] = by_id[whole]
            continue
        used: set[str] = set()
        for p in range(pp):  # split the replica: one EP group (a stage's ep ranks) at a time
            nid = best([n for n in free_c if fits(n, ep)])
            if nid is None:
                have = ", ".join(f"{by_id[n].ip}: {free_c[n]:g} CPU" for n in free_c)
                raise PlacementInfeasible(
                    f"DP replica {r}, stage {p}: its EP group of {ep} rank(s) needs {ep * cpus_per_rank:g} CPU"
                    + (f" and {ep * gpus_per_rank:g} GPU" if gpus_per_rank else "")
                    + f" on one node; free: {have}")
            take(nid, ep)
            used.add(nid)
            for e in range(ep):
                out[_rank(p, e, r, ep, dp)] = by_id[nid]
        for nid in used:
            hosted[nid] += 1
    return [n for n in out if n is not None]


def max_placeable_dp(pp: int, ep: int, degrees: list[int], nodes: list[NodeCapacity], cpus_per_rank: float,
                     gpus_per_rank: float = 0.0) -> Optional[int]:
    """The largest DP degree among ``degrees`` that :func:`plan_placement` can place on ``nodes`` (None: none)."""
    for d in sorted(degrees, reverse=True):
        try:
            plan_placement(pp, ep, d, nodes, cpus_per_rank, gpus_per_rank)
            return d
        except PlacementInfeasible:
            continue
    return None
