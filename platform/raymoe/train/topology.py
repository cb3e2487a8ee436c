"""The one object that knows the training layout: PP stages × EP expert shards × DP replicas.

World = ``pp × ep × dp`` ranks, one stage actor each. Expert parallelism is carved out of data parallelism (as in
DeepSeek-V3 and Megatron): the ``ep × dp`` ranks that share a pipeline rank each get their own micro-batches, hold
the same attention / dense / shared-expert weights, and split the routed experts ``ep`` ways (each expert is then
replicated over ``dp``). Global batch = ``dp × ep × num_microbatches × micro_batch_size`` sequences.

Rank numbering (global rank → coordinates)::

    data_rank = ep_rank * dp + dp_rank            # which slice of the global batch this rank trains on
    rank      = pp_rank * (ep * dp) + data_rank   # pipeline-major: the ep×dp ranks of one pipeline rank are adjacent

A pipeline rank hosts the stage chunk(s) the schedule places on it (:meth:`Topology.chunks`): one stage for 1F1B /
ZB1P, stages ``r`` and ``PP-1-r`` for DualPipe (two parameter copies of every stage exist in the pipeline, on ranks
``s`` and ``PP-1-s``), the V-shaped pair ``r`` and ``2PP-1-r`` for DualPipeV.

Process groups (:meth:`Topology.group_specs`; created by :func:`build_process_groups` in the same order on every
rank, as ``torch.distributed.new_group`` requires):

* ``p2p``: two 2-rank groups per communicating pair of pipeline ranks of one data slice, one per direction
  (activations one way, gradients the other; on NCCL a single communicator would serialise the two directions and
  DualPipe's two-way exchange could deadlock once messages exceed NCCL's buffers);
* ``ep``: the ``ep`` ranks of one (pipeline rank, dp rank) — the all-to-all dispatch/combine group;
* ``expert_dp``: the ``dp`` ranks that hold the same expert shard — expert gradient all-reduce;
* ``dense_dp``: the ``ep × dp`` ranks of one pipeline rank — gradient all-reduce of everything but routed experts;
* ``shared``: pipeline ranks of one data slice that hold copies of the same parameter (the DualPipe pair; the
  embedding that the last stage's MTP reuses) — their gradients are summed;
* ``model``: the ``pp × ep`` ranks of one dp rank — the global gradient norm.

Nothing else in raymoe computes ranks from the config: workers, the controller, checkpoints and the benchmark ask
this object.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional

from raymoe.config import ModelConfig, check_layout
from raymoe.schedule import Schedule, build, validate

__all__ = ["RankCoords", "Topology", "GroupSpec", "ProcessGroups", "build_process_groups"]


@dataclass(frozen=True)
class RankCoords:
    rank: int
    pp_rank: int
    ep_rank: int
    dp_rank: int
    data_rank: int  # ep_rank * dp + dp_rank: index of this rank's slice of the global batch


@dataclass(frozen=True)
class GroupSpec:
    """One process group: ``kind`` (see module docstring), an identifying ``key`` and its global ``ranks``."""

    kind: str
    key: tuple
    ranks: tuple[int, ...]


class Topology:
    """Layout of one training run.

    Args:
        pp, ep, dp: pipeline, expert and data parallel degrees.
        schedule: pipeline schedule name (``1f1b``, ``zb1p``, ``dualpipe``, ``dualpipev``).
        num_microbatches: micro-batches per step per data rank (the schedule's ``C``).
        model: the model config (needed for stage cuts and the shared-parameter groups).

    Raises:
        ConfigError: a layout the schedule or the model cannot take, naming the key and what is allowed.
    """

    def __init__(self, pp: int, ep: int, dp: int, schedule: str, num_microbatches: int, model: ModelConfig) -> None:
        self.pp, self.ep, self.dp = pp, ep, dp
        self.schedule_name, self.num_microbatches, self.model = schedule, num_microbatches, model
        check_layout(pp, ep, dp, schedule, num_microbatches, model)
        self.schedule: Schedule = validate(build(schedule if pp > 1 else "1f1b", pp, num_microbatches))

    # ------------------------------------------------------------------ ranks
    @property
    def world_size(self) -> int:
        return self.pp * self.ep * self.dp

    @property
    def data_parallel_size(self) -> int:
        """Number of batch slices: ``ep × dp``."""
        return self.ep * self.dp

    @property
    def num_stages(self) -> int:
        return self.schedule.num_stages

    def coords(self, rank: int) -> RankCoords:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} out of range 0..{self.world_size - 1}")
        pp_rank, data_rank = divmod(rank, self.data_parallel_size)
        ep_rank, dp_rank = divmod(data_rank, self.dp)
        return RankCoords(rank, pp_rank, ep_rank, dp_rank, data_rank)

    def rank_of(self, pp_rank: int, ep_rank: int, dp_rank: int) -> int:
        return pp_rank * self.data_parallel_size + ep_rank * self.dp + dp_rank

    def chunks(self, rank: int) -> list[tuple[int, int]]:
        """``(stage, direction)`` chunks hosted by ``rank`` (from the schedule's placement)."""
        return self.schedule.chunks(self.coords(rank).pp_rank)

    def stages_of(self, rank: int) -> list[int]:
        return sorted({s for s, _ in self.chunks(rank)})

    def pipeline_peers(self, rank: int) -> dict[int, int]:
        """``{pp_rank: global rank}`` of the pipeline that ``rank`` belongs to (same ep and dp rank)."""
        c = self.coords(rank)
        return {p: self.rank_of(p, c.ep_rank, c.dp_rank) for p in range(self.pp)}

    def ep_group(self, rank: int) -> tuple[int, ...]:
        c = self.coords(rank)
        return tuple(self.rank_of(c.pp_rank, e, c.dp_rank) for e in range(self.ep))

    def expert_dp_group(self, rank: int) -> tuple[int, ...]:
        c = self.coords(rank)
        return tuple(self.rank_of(c.pp_rank, c.ep_rank, d) for d in range(self.dp))

    def dense_dp_group(self, rank: int) -> tuple[int, ...]:
        c = self.coords(rank)
        return tuple(self.rank_of(c.pp_rank, e, d) for e in range(self.ep) for d in range(self.dp))

    def model_group(self, rank: int) -> tuple[int, ...]:
        c = self.coords(rank)
        return tuple(self.rank_of(p, e, c.dp_rank) for p in range(self.pp) for e in range(self.ep))

    def microbatches(self, rank: int, global_ids: list[int], micro_batch_size: int) -> list[list[int]]:
        """This rank's ``C`` micro-batches (sample ids) out of the step's global batch (data-rank-major)."""
        per = self.num_microbatches * micro_batch_size
        if len(global_ids) != per * self.data_parallel_size:
            raise ValueError(f"global batch has {len(global_ids)} ids, expected {per * self.data_parallel_size}")
        d = self.coords(rank).data_rank
        mine = global_ids[d * per:(d + 1) * per]
        return [mine[i * micro_batch_size:(i + 1) * micro_batch_size] for i in range(self.num_microbatches)]

    # ------------------------------------------------------------------ parameters
    @functools.cached_property
    def _stage_params(self) -> list[frozenset[str]]:
        """Full-model parameter names each stage chunk holds (computed on the meta device)."""
        from raymoe.train.parallelize import stage_param_names

        return stage_param_names(self.model, self.num_stages)

    def param_names(self, pp_rank: int) -> frozenset[str]:
        """Full-model names of the parameters a pipeline rank holds (every ep rank holds them all, experts sliced)."""
        names: set[str] = set()
        for s, _ in self.schedule.chunks(pp_rank):
            names |= self._stage_params[s]
        return frozenset(names)

    @functools.cached_property
    def shared_param_sets(self) -> dict[tuple[int, ...], tuple[str, ...]]:
        """``{pp ranks: names}`` for parameters held by more than one pipeline rank (gradients must be summed)."""
        holders: dict[str, list[int]] = {}
        for p in range(self.pp):
            for n in self.param_names(p):
                holders.setdefault(n, []).append(p)
        out: dict[tuple[int, ...], list[str]] = {}
        for n, ps in holders.items():
            if len(ps) > 1:
                out.setdefault(tuple(ps), []).append(n)
        return {k: tuple(sorted(v)) for k, v in sorted(out.items())}

    def grad_norm_owner(self, name: str, pp_rank: int) -> bool:
        """Whether ``pp_rank`` counts parameter ``name`` in the global gradient norm (each copy counted once)."""
        for ranks, names in self.shared_param_sets.items():
            if pp_rank in ranks and name in names:
                return pp_rank == ranks[0]
        return True

    # ------------------------------------------------------------------ groups
    def group_specs(self) -> list[GroupSpec]:
        """Every process group of the layout, in one deterministic order."""
        specs: list[GroupSpec] = []
        pairs = sorted({tuple(sorted((a, b))) for a, b in _p2p_pairs(self.schedule)})
        for e in range(self.ep):
            for d in range(self.dp):
                for a, b in pairs:  # one group per direction: NCCL serialises two-way traffic on one communicator
                    ranks = (self.rank_of(a, e, d), self.rank_of(b, e, d))
                    specs.append(GroupSpec("p2p", (a, b, e, d), ranks))
                    specs.append(GroupSpec("p2p", (b, a, e, d), ranks))
                for ranks in self.shared_param_sets:
                    specs.append(GroupSpec("shared", (ranks, e, d), tuple(self.rank_of(p, e, d) for p in ranks)))
        for p in range(self.pp):
            for d in range(self.dp):
                specs.append(GroupSpec("ep", (p, d), tuple(self.rank_of(p, e, d) for e in range(self.ep))))
            for e in range(self.ep):
                specs.append(GroupSpec("expert_dp", (p, e), tuple(self.rank_of(p, e, d) for d in range(self.dp))))
            specs.append(GroupSpec("dense_dp", (p,), self.dense_dp_group(self.rank_of(p, 0, 0))))
        for d in range(self.dp):
            specs.append(GroupSpec("model", (d,), self.model_group(self.rank_of(0, 0, d))))
        return specs

    def describe(self) -> dict[str, Any]:
        return {"pp": self.pp, "ep": self.ep, "dp": self.dp, "schedule": self.schedule.name,
                "world_size": self.world_size, "num_stages": self.num_stages,
                "chunks": {r: self.chunks(r) for r in range(self.world_size)}}

    def __repr__(self) -> str:
        return f"Topology(pp={self.pp}, ep={self.ep}, dp={self.dp}, schedule={self.schedule.name})"


def _p2p_pairs(s: Schedule) -> set[tuple[int, int]]:
    out = set()
    for (stage, d), r in s.placement.items():
        if stage + 1 < s.num_stages:
            for (stage2, d2), r2 in s.placement.items():
                if stage2 == stage + 1 and r2 != r and (not s.two_streams or d2 == d):
                    out.add((r, r2))
    return out


class ProcessGroups:
    """The torch.distributed groups of one rank (``None`` entries: the rank is not a member / group of one)."""

    def __init__(self, topo: Topology, rank: int, groups: dict[tuple[str, tuple], Any]) -> None:
        self.topo, self.rank, self._g = topo, rank, groups
        c = topo.coords(rank)
        self.coords = c
        self.ep = groups.get(("ep", (c.pp_rank, c.dp_rank)))
        self.expert_dp = groups.get(("expert_dp", (c.pp_rank, c.ep_rank)))
        self.dense_dp = groups.get(("dense_dp", (c.pp_rank,)))
        self.model = groups.get(("model", (c.dp_rank,)))
        self.shared = {ranks: groups.get(("shared", (ranks, c.ep_rank, c.dp_rank)))
                       for ranks in topo.shared_param_sets if c.pp_rank in ranks}

    def p2p(self, peer_pp_rank: int) -> Any:
        a, b = sorted((self.coords.pp_rank, peer_pp_rank))
        return self.p2p_link(a, b)

    def p2p_link(self, src_pp_rank: int, dst_pp_rank: int) -> Any:
        """The group carrying traffic from pipeline rank ``src`` to ``dst`` (one per direction)."""
        c = self.coords
        key = ("p2p", (src_pp_rank, dst_pp_rank, c.ep_rank, c.dp_rank))
        if key not in self._g:
            raise KeyError(f"rank {self.rank}: no P2P group from pipeline rank {src_pp_rank} to {dst_pp_rank}")
        return self._g[key]


def build_process_groups(topo: Topology, rank: int, timeout_s: Optional[float] = None) -> ProcessGroups:
    """Create every group of ``topo.group_specs()`` (collective over the world; call on every rank in step)."""
    import datetime

    import torch.distributed as dist

    kw = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
    groups: dict[tuple[str, tuple], Any] = {}
    for spec in topo.group_specs():
        if len(spec.ranks) == 1:
            if rank in spec.ranks:
                groups[(spec.kind, spec.key)] = None  # a group of one needs no communication
            continue
        g = dist.new_group(list(spec.ranks), **kw)
        if rank in spec.ranks:
            groups[(spec.kind, spec.key)] = g
    return ProcessGroups(topo, rank, groups)

