"""``Coordinator``: the Ray actor that owns a training run.

It creates the stage replicas (``StageActor``, one per DP rank), wires their torch.distributed group, and runs
:class:`raymoe.controller.TrainController` — the step loop, data position, bias balancer, metrics and checkpoints —
in its own thread, so the driver can poll ``status()`` for a progress bar while ``run()`` is in flight
(``max_concurrency``). A failed stage call surfaces as :class:`raymoe.actors.errors.StageError` naming the rank; a
partial start kills what it created.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

import ray

from raymoe.actors.errors import StageDied, StageError
from raymoe.actors.stage import StageActor
from raymoe.config import RunConfig

__all__ = ["Coordinator", "RayStageGroup"]

log = logging.getLogger(__name__)


class RayStageGroup:
    """Stage replicas as Ray actors; ``call`` fans one Ray call out per rank and gathers the results."""

    def __init__(self, run: RunConfig, timeout_s: float = 600.0) -> None:
        p = run.parallel
        self.size = p.dp
        self.timeout_s = timeout_s
        cpus = os.cpu_count() or 1
        threads = max(1, cpus // self.size)
        env = {"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "OMP_NUM_THREADS": str(threads)}
        self.actors = [
            StageActor.options(num_cpus=p.num_cpus_per_rank, runtime_env={"env_vars": env}).remote(run, r)
            for r in range(self.size)
        ]
        try:
            addr, port = ray.get(self.actors[0].rendezvous_address.remote(), timeout=120)
            ray.get([a.init.remote(addr, port, threads) for a in self.actors], timeout=timeout_s)
        except Exception:
            self.shutdown()
            raise

    def call(self, method: str, args: Optional[list[tuple]] = None, ranks: Optional[list[int]] = None) -> list[Any]:
        ranks = list(range(self.size)) if ranks is None else ranks
        refs = [self.actors[r].call.remote(method, *(args[i] if args else ())) for i, r in enumerate(ranks)]
        out = []
        for r, ref in zip(ranks, refs):
            try:
                out.append(ray.get(ref, timeout=self.timeout_s))
            except ray.exceptions.ActorDiedError as e:
                raise StageDied(f"stage replica dp_rank={r} died during {method}(): {e}") from e
            except ray.exceptions.RayTaskError as e:
                raise StageError(f"stage replica dp_rank={r} failed in {method}(): {e.cause!r}") from e
        return out

    def shutdown(self) -> None:
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:  # already dead
                pass


@ray.remote(num_cpus=0, max_concurrency=4)
class Coordinator:
    def __init__(self, run: RunConfig) -> None:
        logging.basicConfig(level=logging.INFO)
        self.run = run
        self.group: Optional[RayStageGroup] = None
        self.controller = None

    def setup(self) -> dict[str, Any]:
        from raymoe.controller import TrainController
        from raymoe.data import prepare_data

        info = prepare_data(self.run)  # tokenizer + shards built once, before the replicas open them
        self.group = RayStageGroup(self.run)
        self.controller = TrainController(self.run, self.group, info["train_samples"], info["val_samples"])
        self.controller.resume_if_requested()
        return {"dp": self.group.size, **info, "resumed_from": self.controller.resumed_from,
                "start_step": self.controller.step}

    def run_training(self) -> dict[str, Any]:
        try:
            return self.controller.run_loop()
        finally:
            self.controller.close()

    def status(self) -> dict[str, Any]:
        return self.controller.status() if self.controller else {"phase": "setup"}

    def stage_call(self, method: str, *args: Any) -> list[Any]:
        """Fan a call out to every replica (tests/inspection: biases, fingerprints, optimizer membership)."""
        return self.group.call(method, [args] * self.group.size if args else None)

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.call("close")
            self.group.shutdown()
