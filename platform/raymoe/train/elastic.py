"""The training controller's elasticity and recovery: restart after a rank failure, grow DP when the cluster has room.

A :class:`~raymoe.train.worker_group.RankFailure` out of a step tears the worker group down; the controller waits for
room (``elastic.settle_s``, ``elastic.wait_for_resources_s``), re-creates the group through its
:class:`~raymoe.train.worker_group.GroupFactory` at the same DP degree when the cluster can host it, else at the
largest allowed smaller one, reloads the newest valid checkpoint and continues; after ``train.max_failures``
failures, or with no room to restart, it stops with :class:`TrainingFailed`. Every ``elastic.monitor_every_steps``
steps it grows DP at a step boundary when the cluster has room (checkpoint, relaunch, reload). Each event is a
``recoveries`` entry of the summary and an ``elastic/`` metric.

:class:`ElasticMixin` is a part of :class:`raymoe.train.controller.TrainController` (it uses the controller's run,
group, factory, checkpoint store and loading, and phase clock) kept in its own module.
"""
from __future__ import annotations

import logging
import time
from typing import Optional

from raymoe import checkpoint as ckpt
from raymoe.train.phases import Phase
from raymoe.train.worker_group import RankFailure

__all__ = ["ElasticMixin", "TrainingFailed"]

# the controller's one logger, whichever of its modules the code lives in (log filters and tests name it)
log = logging.getLogger("raymoe.train.controller")


class TrainingFailed(RuntimeError):
    """The run stopped for good (more failures than ``train.max_failures``, or no room to restart)."""


class ElasticMixin:
    """Recovery and growth methods of :class:`~raymoe.train.controller.TrainController`."""

    def _pick_dp(self, capacity: int) -> Optional[int]:
        fits = [d for d in self.run.elastic_degrees() if d <= capacity]
        return max(fits) if fits else None

    def _restore(self) -> Optional[ckpt.CheckpointRef]:
        """Load the newest valid checkpoint into the (new) group and the controller; from scratch when none."""
        from raymoe.data import ResumableSampler

        target = self._load_first(self.store.candidates(), check=False)
        if target is None:
            self.step = self.tokens = 0
            self.sampler = ResumableSampler(self.train_size, seed=self.run.train.seed)
            self.balancer.bias.copy_(self.initial_bias)
            self.balancer.steps = 0
            self.history = []
            self.load_window.clear()
            return None
        self.last_ckpt = target
        return target

    def _relaunch(self, dp: int) -> None:
        run = self.run.with_dp(dp) if dp != self.run.parallel.dp else self.run
        self._set_layout(run)
        assert self.factory is not None
        self.group = self.factory.create(run)

    def _recover(self, err: RankFailure) -> None:
        """Tear the group down, re-create it (same DP when the cluster has room, else the largest allowed smaller
        one), reload the newest valid checkpoint and continue; bounded by ``train.max_failures``."""
        t0 = time.perf_counter()
        phase = self.status().get("phase")
        self.failures += 1
        step_before, dp_before = self.step, self.run.parallel.dp
        newest_ref = self.store.latest_valid()
        newest = newest_ref.location if newest_ref else None
        if self.factory is None or self.failures > self.run.train.max_failures:
            try:
                self.group.shutdown()
            finally:
                raise TrainingFailed(
                    f"stopping after {self.failures} failure(s) (train.max_failures={self.run.train.max_failures}) at "
                    f"step {self.step}: {err}; checkpoints are intact, newest valid: {newest}") from err
        log.warning("step %d: %s; recovering (failure %d of at most %d)", self.step, err, self.failures,
                    self.run.train.max_failures)
        if phase == Phase.CHECKPOINT.value:
            log.warning("the failure hit while the checkpoint of step %d was being written: it was not committed; "
                        "resuming from the previous one (%s)", self.step, newest)
        with self._phase(Phase.RESUME):
            self.group.shutdown()
            time.sleep(self.run.elastic.settle_s)  # let the cluster release (or lose) the failed ranks' resources
            deadline = time.monotonic() + self.run.elastic.wait_for_resources_s
            while True:
                capacity = self.factory.capacity_dp(self.run, None)
                dp = self._pick_dp(capacity)
                if dp is not None or time.monotonic() > deadline:
                    break
                time.sleep(1.0)
            if dp is None:
                raise TrainingFailed(f"no room to restart: the cluster cannot host parallel.dp >= "
                                     f"{min(self.run.elastic_degrees())} after {err}; checkpoints are intact, newest "
                                     f"valid: {newest}") from err
            self._relaunch(dp)
            target = self._restore()
        rec = {"step": step_before, "resumed_step": self.step, "reason": str(err).splitlines()[0][:300],
               "node": getattr(err, "node", None), "lost_nodes": getattr(err, "lost_nodes", []),
               "steps_recomputed": max(0, step_before - self.step),
               "dp_before": dp_before, "dp_after": self.run.parallel.dp, "seconds": time.perf_counter() - t0,
               "capacity_dp": capacity, "cluster": getattr(self.factory, "last_view", None),
               "checkpoint": target.location if target else None}
        self.recoveries.append(rec)
        self.logger.log({"elastic/recovery_s": rec["seconds"], "elastic/dp": self.run.parallel.dp,
                         "elastic/failures": self.failures}, step=self.step)
        log.warning("recovered in %.1f s: dp %d -> %d, continuing from step %d", rec["seconds"], dp_before,
                    self.run.parallel.dp, self.step)

    def _maybe_grow(self) -> None:
        """At a step boundary every ``elastic.monitor_every_steps`` steps: grow DP when the cluster has room."""
        el = self.run.elastic
        if self.factory is None or self.step == 0 or self.step % el.monitor_every_steps:
            return
        degrees = self.run.elastic_degrees()
        if self.run.parallel.dp >= max(degrees):
            return
        dp = self._pick_dp(self.factory.capacity_dp(self.run, self.group))
        if dp is None or dp <= self.run.parallel.dp:
            return
        t0 = time.perf_counter()
        dp_before, step_before = self.run.parallel.dp, self.step
        if self.last_ckpt is None or self.last_ckpt.step != self.step:
            self.save_checkpoint()
        with self._phase(Phase.RESUME):
            self.group.shutdown()
            self._relaunch(dp)
            self._restore()
        rec = {"step": step_before, "resumed_step": self.step, "reason": "grow: resources available",
               "node": None, "lost_nodes": [], "steps_recomputed": max(0, step_before - self.step),
               "dp_before": dp_before, "dp_after": dp, "seconds": time.perf_counter() - t0,
               "checkpoint": self.last_ckpt.location if self.last_ckpt else None}
        self.recoveries.append(rec)
        self.logger.log({"elastic/recovery_s": rec["seconds"], "elastic/dp": dp}, step=self.step)
        log.info("grew dp %d -> %d in %.1f s at step %d", dp_before, dp, rec["seconds"], self.step)
