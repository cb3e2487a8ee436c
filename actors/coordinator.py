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
from raymoe.config import RunConfig
from raymoe.train.plans import EvalPlan, EvalResult, StepPlan, StepResult
from raymoe.train.topology import check_layout

__all__ = ["Coordinator", "RayWorkerGroup", "RayGroupFactory"]

log = logging.getLogger(__name__)


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
        self.size = p.world_size
        self.timeout_s = timeout_s if timeout_s is not None else run.train.step_timeout_s
        self.cpus_per_rank = p.num_cpus_per_rank
        cpus = os.cpu_count() or 1
        threads = max(1, cpus // self.size)
        env = {"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "OMP_NUM_THREADS": str(threads)}
        env.update({k: v for k, v in os.environ.items() if k.startswith("RAYMOE_")})  # e.g. cache dir, test hooks
        opts: dict[str, Any] = {"num_cpus": p.num_cpus_per_rank, "runtime_env": {"env_vars": env}}
        if p.backend == "nccl":
            opts["num_gpus"] = 1
        self.actors = [StageActor.options(**opts).remote(run, r) for r in range(self.size)]
        try:
            addr, port = ray.get(self.actors[0].rendezvous_address.remote(), timeout=120)
            self._gather("init", [a.init.remote(addr, port, threads) for a in self.actors])
        except Exception:
            self.shutdown()
            raise

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
            except ray.exceptions.ActorDiedError as e:
                died.append((r, e))
            except ray.exceptions.RayTaskError as e:
                errors.append((r, e))
        if died:
            r, e = died[0]
            raise StageDied(f"rank {r} died during {what} (actor process gone: {str(e).splitlines()[0][:200]})") from e
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

    def save(self, ckpt_dir: str) -> None:
        self._gather("save", [a.save.remote(ckpt_dir) for a in self.actors])

    def load(self, ckpt_dir: str) -> None:
        self._gather("load", [a.load.remote(ckpt_dir) for a in self.actors])

    def set_biases(self, biases: torch.Tensor) -> None:
        self._gather("set_biases", [a.set_biases.remote(biases) for a in self.actors])

    def peak_flops(self) -> float:
        return float(sum(self._gather("peak_flops", [a.peak_flops.remote() for a in self.actors])))

    def export_hf(self, path: str, biases: torch.Tensor) -> str:
        return self._gather("export_hf", [self.actors[0].export_hf.remote(path, biases)])[0]

    def inspect(self, what: str) -> list[Any]:
        """Per-rank ``get_biases`` / ``param_state`` / ``bias_in_optimizer`` / ``pid`` (tests, inspection)."""
        if what not in ("get_biases", "param_state", "bias_in_optimizer", "pid"):
            raise ValueError(f"cannot inspect {what!r}")
        return self._gather(what, [getattr(a, what).remote() for a in self.actors])

    def close(self) -> None:
        try:
            self._gather("close", [a.close.remote() for a in self.actors])
        except StageError as e:
            log.warning("closing the ranks: %s", e)

    def shutdown(self) -> None:
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:  # already dead
                pass


class RayGroupFactory:
    """Creates :class:`RayWorkerGroup` s and reads the cluster's free CPUs (GPUs on NCCL) for elastic decisions."""

    def create(self, run: RunConfig) -> RayWorkerGroup:
        return RayWorkerGroup(run)

    def capacity_dp(self, run: RunConfig, current: Optional[RayWorkerGroup]) -> int:
        p = run.parallel
        per_replica = p.pp * p.ep
        avail = ray.available_resources()
        if p.backend == "nccl":
            free = avail.get("GPU", 0.0) + (current.size if current is not None else 0)
            return int(free // per_replica)
        if p.num_cpus_per_rank <= 0:
            return max(run.elastic_degrees())
        free = avail.get("CPU", 0.0) + (current.size * current.cpus_per_rank if current is not None else 0.0)
        self.last_view = {"free_cpus": free, "cpus_per_rank": p.num_cpus_per_rank, "ranks_per_replica": per_replica}
        return int((free + 1e-9) // (p.num_cpus_per_rank * per_replica))


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

        check_cluster(self.run)
        info = prepare_data(self.run)  # tokenizer + shards built once, before the ranks open them
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



