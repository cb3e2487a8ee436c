"""The ranks of a run as the controller sees them: typed calls, one per rank per step.

:class:`WorkerGroup` is the protocol the :class:`raymoe.train.controller.TrainController` drives (``step``,
``evaluate``, ``save``, ``load``, ...); :class:`LocalWorkerGroup` runs a world of one rank in this process (tests,
debugging) and ``RayWorkerGroup`` (actors/) runs one actor per rank. :class:`GroupFactory` creates groups and says
how many DP replicas the cluster could host (elasticity). :func:`make_worker` builds the worker of one rank — the
object both groups wrap. A group that can re-form around its surviving DP replicas after a failure (``RayWorkerGroup``)
also offers ``probe()``, ``drop(replicas)`` and ``reform(run, keep)``: the controller then recovers by hand-off
(:mod:`raymoe.train.handoff`) instead of from storage.
"""
from __future__ import annotations

from typing import Any, Optional, Protocol

import torch

from raymoe import checkpoint as ckpt
from raymoe.config import RunConfig
from raymoe.train.plans import EvalPlan, EvalResult, StepPlan, StepResult

__all__ = ["WorkerGroup", "LocalWorkerGroup", "GroupFactory", "RankFailure", "make_worker", "dp_impl"]


class RankFailure(RuntimeError):
    """A rank died, hung past ``train.step_timeout_s`` or raised; the message names the rank and the call.
    Worker groups raise it (the Ray layer's ``StageError`` is one); the controller recovers from it."""


class GroupFactory(Protocol):
    """Creates worker groups for a layout and says how many DP replicas the cluster could host (elasticity)."""

    def create(self, run: RunConfig) -> "WorkerGroup": ...

    def capacity_dp(self, run: RunConfig, current: Optional["WorkerGroup"]) -> int:
        """The largest DP degree the cluster could host now, counting the resources ``current`` holds."""
        ...


class WorkerGroup(Protocol):
    """The ranks of a run, as the controller sees them (typed calls; one per rank per step)."""

    size: int

    def step(self, plans: list[StepPlan]) -> list[StepResult]: ...

    def evaluate(self, plan: EvalPlan) -> EvalResult: ...

    def save(self, dest: str) -> list[dict[str, dict[str, Any]]]:
        """Every rank puts its checkpoint files under ``dest`` (a local directory or a storage URI) and reports
        ``{relpath: {"sha256", "bytes"}}``; one table per rank."""
        ...

    def load(self, ref: ckpt.CheckpointRef) -> None:
        """Every rank loads its share of ``ref``; a damaged file raises :class:`raymoe.checkpoint.ChecksumMismatch`."""
        ...

    def set_biases(self, biases: torch.Tensor) -> None: ...

    def peak_flops(self) -> float: ...

    def shutdown(self) -> None: ...


def make_worker(run: RunConfig, rank: int, master_addr: str, master_port: int, threads: Optional[int] = None) -> Any:
    """The worker for ``rank``: DeepSpeed ZeRO-1 (pp = ep = 1, ``parallel.dp_impl`` deepspeed) or the pipeline
    worker (every layout)."""
    if dp_impl(run) == "deepspeed":
        from raymoe.train.deepspeed_worker import StageWorker

        return StageWorker(run, rank, master_addr, master_port, threads=threads)
    from raymoe.train.worker import PipelineWorker

    return PipelineWorker(run, rank, master_addr, master_port, threads=threads)


def dp_impl(run: RunConfig) -> str:
    """``auto`` → DeepSpeed ZeRO-1 for fixed-size pure data parallelism, else the native runtime (any layout,
    re-shardable checkpoints, elastic DP)."""
    p = run.parallel
    if p.dp_impl == "auto":
        lo, hi = run.elastic.bounds(p.dp)
        return "deepspeed" if p.pp == 1 and p.ep == 1 and lo == hi else "native"
    return p.dp_impl


class LocalWorkerGroup:
    """World-of-one group in this process (tests, debugging)."""

    def __init__(self, run: RunConfig, master_port: int) -> None:
        if run.parallel.world_size != 1:
            raise ValueError("LocalWorkerGroup runs a world of one rank; use Ray for more")
        self.size = 1
        self.worker = make_worker(run, 0, "127.0.0.1", master_port)

    def step(self, plans: list[StepPlan]) -> list[StepResult]:
        return [self.worker.step(plans[0])]

    def evaluate(self, plan: EvalPlan) -> EvalResult:
        return self.worker.evaluate(plan)

    def save(self, dest: str) -> list[dict[str, dict[str, Any]]]:
        return [self.worker.save(dest)]

    def load(self, ref: ckpt.CheckpointRef) -> None:
        self.worker.load(ref)

    def set_biases(self, biases: torch.Tensor) -> None:
        self.worker.set_biases(biases)

    def peak_flops(self) -> float:
        return self.worker.peak_flops()

    def export_hf(self, path: str, biases: torch.Tensor) -> str:
        return self.worker.export_hf(path, biases)

    def shutdown(self) -> None:
        self.worker.close()
