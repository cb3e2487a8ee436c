"""``Coordinator``: the Ray actor that owns a training run.

It checks the layout against the cluster, creates one ``StageActor`` per rank of the topology (pp × ep × dp), wires
their torch.distributed groups, and runs :class:`raymoe.train.controller.TrainController` — the step loop, data
position, bias balancer, metrics and checkpoints — in its own thread, so the driver can poll ``status()`` for a
progress bar while ``run_training()`` is in flight (``max_concurrency``). A failed rank surfaces as
:class:`raymoe.actors.errors.StageError` naming the rank and the call, within ``timeout_s``; a partial start kills
what it created.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Optional

import ray
import torch

from raymoe.actors.errors import StageDied, StageError
from raymoe.actors.stage import StageActor
from raymoe.checkpoint import CheckpointRef, ChecksumMismatch
from raymoe.config import RunConfig, check_layout
from raymoe.train.placement import NodeCapacity, PlacementInfeasible, max_placeable_dp, plan_placement
from raymoe.train.plans import EvalPlan, EvalResult, StepPlan, StepResult

__all__ = ["Coordinator", "RayWorkerGroup", "RayGroupFactory"]

log = logging.getLogger(__name__)
NODE_ID_LABEL = "ray.io/node-id"
NODE_LOCAL_ENV = ("RAYMOE_LOCAL_DIR", "RAYMOE_NODE_INDEX", "RAYMOE_SCRATCH_DIR")  # per node, set before `ray start`  # every Ray node carries this label (placement-group bundle selectors)


def check_cluster(run: RunConfig) -> None:
    """One-line :class:`ConfigError` when the cluster cannot host the layout (before any actor starts)."""
    p = run.parallel
    res = ray.cluster_resources()
    gpus_per_rank = 1.0 if p.backend == "nccl" else 0.0
    check_layout(p.pp, p.ep, p.dp, p.schedule, run.train.num_microbatches, run.model,
                 available_cpus=res.get("CPU", 0.0), cpus_per_rank=p.num_cpus_per_rank,
                 available_gpus=res.get("GPU", 0.0), gpus_per_rank=gpus_per_rank)


class RayWorkerGroup:
    """The ranks as Ray actors; each typed call fans out one Ray call per rank and gathers the results."""

    def __init__(self, run: RunConfig, timeout_s: Optional[float] = None) -> None:
        p = run.parallel
        self.run = run
        self.size = p.world_size
        self.timeout_s = timeout_s if timeout_s is not None else run.train.step_timeout_s
        self.cpus_per_rank = p.num_cpus_per_rank
        self.gpus_per_rank = 1.0 if p.backend == "nccl" else 0.0
        self.pg_timeout_s = 60.0
        self.probe_timeout_s = 5.0  # after a failure, a rank that does not answer within it is hung: lost
        self.threads = max(1, (os.cpu_count() or 1) // self.size)
        self.actors: list[Any] = []
        self.pgs: dict[int, Any] = {}  # one placement group per DP replica: a lost replica's is released alone
        self._starting: list[Any] = []  # actors being created by reform (killed with the group if it fails)
        # rank -> node: the plan (EP groups on one node, DP replicas spread), reserved per replica
        self.plan = self._plan(p.pp, p.ep, p.dp, p.num_cpus_per_rank, self.gpus_per_rank)
        try:
            strategies = self._reserve(self.plan, p.pp, p.ep, p.dp, list(range(p.dp)))
            self.actors = [self._start(run, r, st) for r, st in enumerate(strategies)]
            addr, port = ray.get(self.actors[0].rendezvous_address.remote(), timeout=120)
            self.where = self._gather("init", [a.init.remote(addr, port, self.threads) for a in self.actors])
        except Exception:
            self.shutdown()
            raise

    def _start(self, run: RunConfig, rank: int, strategy: Any) -> Any:
        env = {"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "OMP_NUM_THREADS": str(self.threads)}
        # e.g. cache dir, test hooks; never a node's own settings (its scratch dir), which each node keeps
        env.update({k: v for k, v in os.environ.items() if k.startswith("RAYMOE_") and k not in NODE_LOCAL_ENV})
        opts: dict[str, Any] = {"num_cpus": self.cpus_per_rank, "runtime_env": {"env_vars": env}}
        if self.gpus_per_rank:
            opts["num_gpus"] = 1
        return StageActor.options(**opts, scheduling_strategy=strategy).remote(run, rank)

    def _plan(self, pp: int, ep: int, dp: int, cpus: float, gpus: float) -> list[NodeCapacity]:
        """The placement plan over the alive nodes; retried for ``pg_timeout_s`` while a group that was just torn
        down still holds its resources (Ray releases them asynchronously)."""
        deadline = time.monotonic() + self.pg_timeout_s
        while True:
            try:
                return plan_placement(pp, ep, dp, alive_nodes(), cpus, gpus)
            except PlacementInfeasible as e:
                if time.monotonic() > deadline:
                    raise StageError(f"cannot place pp={pp} x ep={ep} x dp={dp}: {e}") from e
                time.sleep(0.5)

    def _reserve(self, plan: list[NodeCapacity], pp: int, ep: int, dp: int, replica_ids: list[int]) -> list[Any]:
        """One scheduling strategy per rank of ``plan`` (a ``pp × ep × dp`` layout): a bundle of its DP replica's
        placement group, pinned to the planned node by its ``ray.io/node-id`` label (all or nothing per replica,
        every replica ready before any actor starts); ``replica_ids[d]`` names replica ``d``'s group in
        ``self.pgs``. Ranks that reserve no resources (a bundle cannot be empty) are pinned by node affinity."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

        from raymoe.train.handoff import replica_ranks

        cpus, gpus = self.cpus_per_rank, self.gpus_per_rank
        if cpus <= 0 and gpus <= 0:
            return [NodeAffinitySchedulingStrategy(n.node_id, soft=False) for n in plan]
        bundle = {"CPU": float(cpus)} if cpus > 0 else {}
        if gpus > 0:
            bundle["GPU"] = float(gpus)
        out: list[Any] = [None] * len(plan)
        for d in range(dp):
            ranks = replica_ranks(pp, ep, dp, d)
            pg = ray.util.placement_group([dict(bundle) for _ in ranks], strategy="PACK",
                                          bundle_label_selector=[{NODE_ID_LABEL: plan[r].node_id} for r in ranks])
            self.pgs[replica_ids[d]] = pg
            for i, r in enumerate(ranks):
                out[r] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)
        for d in range(dp):
            try:
                ray.get(self.pgs[replica_ids[d]].ready(), timeout=self.pg_timeout_s)
            except ray.exceptions.GetTimeoutError as e:
                raise StageError(f"the placement group of {len(plan)} rank(s) on nodes "
                                 f"{sorted({n.ip for n in plan})} was not ready within {self.pg_timeout_s:.0f} s "
                                 "(a planned node died or its resources are taken)") from e
        return out

    def placement(self) -> list[dict[str, Any]]:
        """Per rank: node IP and id, pid, and where its ``raymoe`` code was imported from (``summary.json``)."""
        return [dict(w) for w in getattr(self, "where", [])]

    def _gather(self, what: str, refs: list, ranks: Optional[list[int]] = None) -> list[Any]:
        """Results of one call per rank. On failure the error names the root cause: a rank that died is reported
        before the peers whose collectives then broke; a rank that does not answer within ``timeout_s`` is a hang."""
        ranks = list(range(len(refs))) if ranks is None else ranks
        deadline = time.monotonic() + self.timeout_s
        pending = list(refs)
        failed = False
        while pending:
            # once something failed, give the others a short grace period to surface their own outcome
            left = deadline - time.monotonic() if not failed else min(10.0, deadline - time.monotonic())
            if left <= 0:
                break
            done, pending = ray.wait(pending, num_returns=1, timeout=left)
            for ref in done:
                try:
                    ray.get(ref, timeout=0)
                except Exception:  # noqa: BLE001 - classified below
                    failed = True
        died, errors, hung = [], [], []
        out = []
        for r, ref in zip(ranks, refs):
            if ref in pending:
                hung.append(r)
                continue
            try:
                out.append(ray.get(ref, timeout=0))
            except ray.exceptions.RayActorError as e:  # died, or unreachable (its node is gone)
                died.append((r, e))
            except ray.exceptions.RayTaskError as e:
                errors.append((r, e))
        if died:
            r, e = died[0]
            node = self.plan[r].ip if r < len(self.plan) and self.plan[r] is not None else "?"
            planned = [n for n in self.plan if n is not None]
            gone = unreachable_nodes({n.node_id for n in planned})
            lost = sorted({n.ip for n in planned if n.node_id in gone})
            why = f"node {lost[0]} lost" if lost else "actor process gone"
            err = StageDied(f"rank {r} on node {node} died during {what} ({why}: {str(e).splitlines()[0][:200]})")
            err.node, err.lost_nodes = node, lost
            raise err from e
        if errors:
            r, e = errors[0]
            raise StageError(f"rank {r} failed in {what}: {e.cause!r}") from e
        if hung:
            raise StageError(f"rank {hung[0]} did not finish {what} within {self.timeout_s:.0f} s (hung collective "
                             "or dead peer); ranks still busy: " + ", ".join(map(str, hung)))
        return out

    def step(self, plans: list[StepPlan]) -> list[StepResult]:
        return self._gather(f"step {plans[0].step}", [a.step.remote(p) for a, p in zip(self.actors, plans)])

    def evaluate(self, plan: EvalPlan) -> EvalResult:
        return self._gather("evaluate", [a.evaluate.remote(plan) for a in self.actors])[0]

    def save(self, dest: str) -> list[dict[str, dict[str, Any]]]:
        """Every rank stages its files and puts them under ``dest``; one ``{relpath: {sha256, bytes}}`` per rank."""
        return self._gather("save", [a.save.remote(dest) for a in self.actors])

    def load(self, ref: CheckpointRef) -> None:
        """Every rank loads its share of ``ref``. A rank that finds a file damaged (size or sha256 against the
        manifest) raises :class:`ChecksumMismatch` here, not a rank failure: the controller then falls back to the
        previous checkpoint instead of restarting the group."""
        try:
            self._gather("load", [a.load.remote(ref) for a in self.actors])
        except StageError as e:
            cause = getattr(e.__cause__, "cause", None)
            if isinstance(cause, ChecksumMismatch):
                raise ChecksumMismatch(str(cause)) from e
            raise

    def set_biases(self, biases: torch.Tensor) -> None:
        self._gather("set_biases", [a.set_biases.remote(biases) for a in self.actors])

    def peak_flops(self) -> float:
        return float(sum(self._gather("peak_flops", [a.peak_flops.remote() for a in self.actors])))

    def export_hf(self, path: str, biases: torch.Tensor) -> str:
        return self._gather("export_hf", [self.actors[0].export_hf.remote(path, biases)])[0]

    def inspect(self, what: str) -> list[Any]:
        """Per-rank ``get_biases`` / ``param_state`` / ``bias_in_optimizer`` / ``pid`` / ``memory_stats`` (tests,
        inspection, ``bench memory``)."""
        if what not in ("get_biases", "param_state", "bias_in_optimizer", "pid", "memory_stats"):
            raise ValueError(f"cannot inspect {what!r}")
        return self._gather(what, [getattr(a, what).remote() for a in self.actors])

    def close(self) -> None:
        try:
            self._gather("close", [a.close.remote() for a in self.actors])
        except StageError as e:
            log.warning("closing the ranks: %s", e)

    def shutdown(self) -> None:
        for a in [*self.actors, *self._starting]:
            try:
                ray.kill(a)
            except Exception:  # already dead
                pass
        self._starting = []
        for pg in self.pgs.values():
            try:
                ray.util.remove_placement_group(pg)
            except Exception:  # noqa: BLE001 - its node may be gone
                pass
        self.pgs = {}

    # ------------------------------------------------------------------ hand-off (raymoe.train.handoff)
    def probe(self) -> list[Optional[dict[str, Any]]]:
        """Per rank, after a failure: its last completed step and result, or None when it died or does not answer
        within ``probe_timeout_s`` (hung in a collective with a dead peer)."""
        refs = [a.probe.remote() for a in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.probe_timeout_s)
        out: list[Optional[dict[str, Any]]] = []
        for ref in refs:
            try:
                out.append(ray.get(ref, timeout=0) if ref in ready else None)
            except Exception:  # noqa: BLE001 - died: lost
                out.append(None)
        return out

    def drop(self, replicas: list[int]) -> None:
        """Kill the ranks of DP replicas ``replicas`` (old DP indices) and release their placement groups: a lost
        replica's resources go back to the cluster before its capacity is counted."""
        from raymoe.train.handoff import replica_ranks

        p = self.run.parallel
        for d in replicas:
            for r in replica_ranks(p.pp, p.ep, p.dp, d):
                try:
                    ray.kill(self.actors[r])
                except Exception:  # noqa: BLE001 - already dead
                    pass
                self.plan[r] = None  # its resources no longer count as this group's (alive_nodes)
            pg = self.pgs.pop(d, None)
            if pg is not None:
                try:
                    ray.util.remove_placement_group(pg)
                except Exception:  # noqa: BLE001 - its node may be gone
                    pass

    def reform(self, run: RunConfig, keep: list[int]) -> dict[str, Any]:
        """Re-form the group as ``run``'s layout (same pp × ep, any DP) around the surviving DP replicas ``keep`` (old
        DP indices; they become DP ranks 0..k-1 in this order, keeping their processes and state); the other
        replicas are dropped, new ones are placed on free resources, started, and take their state from the
        survivors by broadcast (:meth:`StageActor.handoff`). Raises :class:`StageError` when that fails (the caller
        then restarts everything from storage). Returns ``{"new_ranks", "bytes"}``."""
        from raymoe.train.handoff import replica_ranks

        old, p = self.run.parallel, run.parallel
        if (p.pp, p.ep) != (old.pp, old.ep) or not keep or len(keep) > p.dp:
            raise StageError(f"cannot re-form pp={old.pp} x ep={old.ep} x dp={old.dp} as pp={p.pp} x ep={p.ep} x "
                             f"dp={p.dp} around replicas {keep}")
        self.drop([d for d in range(old.dp)
                   if d not in keep and any(self.plan[r] is not None for r in replica_ranks(p.pp, p.ep, old.dp, d))])
        n_new = p.dp - len(keep)
        actors: list[Any] = [None] * p.world_size
        plan: list[Any] = [None] * p.world_size
        pgs: dict[int, Any] = {}
        for j, d in enumerate(keep):
            for r_old, r_new in zip(replica_ranks(p.pp, p.ep, old.dp, d), replica_ranks(p.pp, p.ep, p.dp, j)):
                actors[r_new], plan[r_new] = self.actors[r_old], self.plan[r_old]
            if d in self.pgs:
                pgs[j] = self.pgs.pop(d)
        self.pgs = {**self.pgs, **pgs}  # the dropped ones are gone already; survivors under their new index
        self.actors, self.plan, self.run, self.size = actors, plan, run, p.world_size
        self.threads = max(1, (os.cpu_count() or 1) // self.size)
        fresh: list[int] = []
        if n_new:
            sub = self._plan(p.pp, p.ep, n_new, self.cpus_per_rank, self.gpus_per_rank)
            ids = list(range(len(keep), p.dp))
            strategies = self._reserve(sub, p.pp, p.ep, n_new, ids)
            for dd, j in enumerate(ids):
                for r_sub, r_new in zip(replica_ranks(p.pp, p.ep, n_new, dd), replica_ranks(p.pp, p.ep, p.dp, j)):
                    plan[r_new] = sub[r_sub]
                    actors[r_new] = self._start(run, r_new, strategies[r_sub])
                    self._starting.append(actors[r_new])
                    fresh.append(r_new)
        addr, port = ray.get(actors[0].rendezvous_address.remote(), timeout=120)
        refs = [a.init.remote(addr, port, self.threads) if r in fresh else a.reform.remote(run, r, addr, port)
                for r, a in enumerate(actors)]
        self.where = self._gather("re-forming the group", refs)
        self._starting = []
        sizes = self._gather("hand-off", [a.handoff.remote() for a in actors]) if fresh else [0] * len(actors)
        return {"new_ranks": fresh, "bytes": int(sum(sizes[r] for r in fresh))}


class RayGroupFactory:
    """Creates :class:`RayWorkerGroup` s and reads the cluster's free CPUs (GPUs on NCCL) for elastic decisions."""

    def create(self, run: RunConfig) -> RayWorkerGroup:
        return RayWorkerGroup(run)

    def capacity_dp(self, run: RunConfig, current: Optional[RayWorkerGroup]) -> int:
        """The largest allowed DP degree the alive nodes can place (the current group's reservations count as
        free: it is replaced, not joined); 0 when none fits."""
        p = run.parallel
        gpus = 1.0 if p.backend == "nccl" else 0.0
        nodes = alive_nodes(give_back=current)
        dp = max_placeable_dp(p.pp, p.ep, run.elastic_degrees(), nodes, p.num_cpus_per_rank, gpus)
        self.last_view = {"nodes": {n.ip: n.cpus for n in nodes}, "cpus_per_rank": p.num_cpus_per_rank,
                          "ranks_per_replica": p.pp * p.ep, "placeable_dp": dp}
        return dp or 0


def _raylet_answers(node: dict[str, Any], timeout_s: float = 1.0) -> bool:
    """Whether a node (a row of ``ray.nodes()``) is alive for the GCS and its raylet accepts a TCP connection. The
    GCS marks a node dead only after several missed health checks (seconds to tens of seconds); a SIGKILLed raylet
    refuses connections at once, so recovery does not plan onto a node that is already gone."""
    import socket

    if not node.get("Alive"):
        return False
    try:
        with socket.create_connection((node["NodeManagerAddress"], int(node["NodeManagerPort"])), timeout=timeout_s):
            return True
    except OSError:
        return False


def unreachable_nodes(node_ids: set[str]) -> set[str]:
    """Those of ``node_ids`` that are gone (unknown to the GCS, dead, or their raylet does not answer)."""
    rows = {n["NodeID"]: n for n in ray.nodes()}
    return {nid for nid in node_ids if nid not in rows or not _raylet_answers(rows[nid])}


def alive_nodes(give_back: Optional[RayWorkerGroup] = None) -> list[NodeCapacity]:
    """Nodes the GCS reports alive whose raylet answers, with their free CPUs/GPUs (plus what ``give_back``'s
    placement holds on each, when it is about to be replaced), in a stable order (by IP)."""
    from ray._private.state import available_resources_per_node

    free = available_resources_per_node()
    held: dict[str, list[float]] = {}
    if give_back is not None:
        for n in give_back.plan:
            if n is None:  # a dropped replica's rank: its resources went back to the cluster
                continue
            h = held.setdefault(n.node_id, [0.0, 0.0])
            h[0] += give_back.cpus_per_rank
            h[1] += 1.0 if give_back.gpus_per_rank else 0.0
    out = []
    for n in ray.nodes():
        nid = n["NodeID"]
        if not _raylet_answers(n):
            continue
        f = free.get(nid, {})
        h = held.get(nid, [0.0, 0.0])
        cpus, gpus = float(f.get("CPU", 0.0)) + h[0], float(f.get("GPU", 0.0)) + h[1]
        if n["Resources"].get("CPU", 0.0) <= 0 and n["Resources"].get("GPU", 0.0) <= 0:
            continue  # a head started with --num-cpus=0 hosts no ranks
        out.append(NodeCapacity(nid, n["NodeManagerAddress"], cpus, gpus))
    return sorted(out, key=lambda x: tuple(int(p) if p.isdigit() else 0 for p in x.ip.split(".")))


@ray.remote(num_cpus=0, max_concurrency=4)
class Coordinator:
    def __init__(self, run: RunConfig) -> None:
        logging.basicConfig(level=logging.INFO)
        self.run = run
        self.group: Optional[RayWorkerGroup] = None
        self.controller = None

    def setup(self) -> dict[str, Any]:
        from raymoe.data import prepare_data
        from raymoe.train.controller import TrainController

        from raymoe.actors.data import ray_encoder

        check_cluster(self.run)
        # tokenizer + shards built once, before the ranks open them (data.source files: on Ray Data, over the cluster)
        info = prepare_data(self.run, encoder=ray_encoder)
        self.group = RayWorkerGroup(self.run)
        self.controller = TrainController(self.run, self.group, info["train_samples"], info["val_samples"],
                                          factory=RayGroupFactory(), data_info=info)
        self.controller.resume_if_requested()
        return {"world_size": self.group.size, **info, "resumed_from": self.controller.resumed_from,
                "start_step": self.controller.step}

    def run_training(self) -> dict[str, Any]:
        try:
            return self.controller.run_loop()
        finally:
            self.controller.close()

    def status(self) -> dict[str, Any]:
        return self.controller.status() if self.controller else {"phase": "setup"}

    def inspect(self, what: str) -> list[Any]:
        return self._group().inspect(what)

    def _group(self) -> RayWorkerGroup:
        # after a recovery the controller holds the new group
        return self.controller.group if self.controller is not None else self.group

    def shutdown(self) -> None:
        g = self._group() if self.group is not None else None
        if g is not None:
            g.close()
            g.shutdown()



