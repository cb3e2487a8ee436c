"""The training controller's elasticity and recovery: go on after a rank failure, grow DP when the cluster has room.

Two ways to recover from a :class:`~raymoe.train.worker_group.RankFailure` (``elastic.recovery``):

* **hand-off** (default, :mod:`raymoe.train.handoff`): the DP replicas whose every rank is alive keep their
  processes and in-memory state; the lost replicas are dropped, the controller waits for room
  (``elastic.settle_s``, ``elastic.wait_for_resources_s``), and the group is re-formed around the survivors at the
  same DP degree when the cluster can host it, else at the largest allowed smaller one; new replicas take their
  state from the survivors over the process group. The controller's own state (step, data position, balancer) never
  left memory, so no completed step is recomputed; the step that was executing is redone with the same samples
  from the survivors' pre-step state (or counted, when the survivors had already applied it). A failure in an
  evaluation or a checkpoint save re-runs that call on the new group.
* **from storage** (``elastic.recovery=checkpoint``, and the fall-back when no replica survived whole, the optimizer
  state is sharded over DP, or re-forming failed): the group is torn down and re-created, the newest valid
  checkpoint is reloaded and the steps since it are recomputed.

After ``train.max_failures`` failures, or with no room to go on, the run stops with :class:`TrainingFailed`. Every
``elastic.monitor_every_steps`` steps it grows DP at a step boundary when the cluster has room (hand-off to the new
replicas; from storage: checkpoint, relaunch, reload). Each event is a ``recoveries`` entry of the summary (reason,
node, DP before/after, seconds, steps recomputed, ``recovery``: handoff | checkpoint, and why not a hand-off) and an
``elastic/`` metric.

:class:`ElasticMixin` is a part of :class:`raymoe.train.controller.TrainController` (it uses the controller's run,
group, factory, checkpoint store and loading, and phase clock) kept in its own module.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional, TypeVar

from raymoe import checkpoint as ckpt
from raymoe.train.handoff import handoff_unavailable, pick_survivors
from raymoe.train.phases import Phase
from raymoe.train.plans import StepPlan, StepResult
from raymoe.train.worker_group import RankFailure

T = TypeVar("T")

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

    def _wait_for_room(self) -> tuple[int, Optional[int]]:
        """Capacity (DP replicas the cluster could host, counting what the current group holds) and the DP degree
        to go on with, waiting up to ``elastic.wait_for_resources_s`` for one allowed degree to fit."""
        deadline = time.monotonic() + self.run.elastic.wait_for_resources_s
        while True:
            capacity = self.factory.capacity_dp(self.run, self.group)
            dp = self._pick_dp(capacity)
            if dp is not None or time.monotonic() > deadline:
                return capacity, dp
            time.sleep(1.0)

    def _handoff_blocker(self) -> Optional[str]:
        why = handoff_unavailable(self.run, self.impl)
        if why is None and (self.factory is None or not hasattr(self.group, "reform")):
            why = "the worker group cannot re-form (a world of one in this process)"
        return why

    def _execute(self, plans: list[StepPlan], ids: list[int], lr: float) -> tuple[list[StepResult], float]:
        """EXECUTE: one ``step`` per rank. On a rank failure the group is re-formed by hand-off and the step redone
        with the same samples on the new layout (or its results taken from the survivors when they had applied it);
        when a hand-off is not possible the failure goes up to the checkpoint path. Returns the results and the
        seconds spent recovering."""
        lost = 0.0
        while True:
            try:
                with self._phase(Phase.EXECUTE):
                    return self.group.step(plans), lost
            except RankFailure as err:
                t0 = time.perf_counter()
                done = self._handoff(err, in_flight=self.step)
                lost += time.perf_counter() - t0
                if done is not None:
                    return done, lost
                plans = self._plans_for(ids, lr)

    def _survive(self, call: Callable[[], T]) -> T:
        """``call()`` (a group call outside the step: evaluate, save); after a rank failure it is re-run on the group
        re-formed by hand-off (the failure goes up to the checkpoint path when a hand-off is not possible)."""
        while True:
            try:
                return call()
            except RankFailure as err:
                self._handoff(err, in_flight=None)

    def _handoff(self, err: RankFailure, in_flight: Optional[int]) -> Optional[list[StepResult]]:
        """Recover from ``err`` by hand-off (module docstring). Returns the survivors' results of step ``in_flight``
        when they had completed it, else None (redo it). Re-raises ``err`` — with ``handoff_skipped`` saying why —
        when no hand-off is possible: ``run_loop`` then recovers from storage (:meth:`_recover`)."""
        why = self._handoff_blocker()
        if why is not None or self.failures + 1 > self.run.train.max_failures:
            err.handoff_skipped = why or "train.max_failures reached"
            raise err
        t0 = time.perf_counter()
        step_before, dp_before, p = self.step, self.run.parallel.dp, self.run.parallel
        log.warning("step %d: %s; recovering by hand-off from the surviving replicas (failure %d of at most %d)",
                    self.step, err, self.failures + 1, self.run.train.max_failures)
        try:
            with self._phase(Phase.RESUME):
                surv = pick_survivors(p.pp, p.ep, p.dp, self.group.probe(), in_flight)
                if not surv.replicas:
                    err.handoff_skipped = surv.why
                    raise err
                self.group.drop(surv.lost)
                time.sleep(self.run.elastic.settle_s)  # let the cluster release (or lose) the lost ranks' resources
                capacity, dp = self._wait_for_room()
                if dp is None:
                    err.handoff_skipped = f"no room for parallel.dp >= {min(self.run.elastic_degrees())}"
                    raise err
                keep = surv.replicas[:dp]
                run = self.run.with_dp(dp) if dp != p.dp else self.run
                info = self.group.reform(run, keep)
                self._set_layout(run)
        except RankFailure as e:
            if e is not err:
                err.handoff_skipped = f"re-forming the group failed: {str(e).splitlines()[0][:200]}"
            raise err
        except Exception as e:  # noqa: BLE001 - any trouble while re-forming: recover from storage instead
            err.handoff_skipped = f"re-forming the group failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            raise err from e
        self.failures += 1
        rec = {"step": step_before, "resumed_step": self.step, "reason": str(err).splitlines()[0][:300],
               "recovery": "handoff", "node": getattr(err, "node", None), "lost_nodes": getattr(err, "lost_nodes", []),
               "steps_recomputed": 0,
               "redone_step": in_flight if in_flight is not None and not surv.completed_in_flight else None,
               "in_flight_completed": surv.completed_in_flight,
               "dp_before": dp_before, "dp_after": self.run.parallel.dp, "seconds": time.perf_counter() - t0,
               "survivors": keep, "lost_replicas": surv.lost, "new_ranks": info["new_ranks"],
               "handoff_bytes": info["bytes"], "capacity_dp": capacity,
               "cluster": getattr(self.factory, "last_view", None), "checkpoint": None}
        self.recoveries.append(rec)
        self.logger.log({"elastic/recovery_s": rec["seconds"], "elastic/dp": self.run.parallel.dp,
                         "elastic/failures": self.failures}, step=self.step)
        log.warning("recovered by hand-off in %.1f s: dp %d -> %d, survivors %s, %d new rank(s), %s", rec["seconds"],
                    dp_before, self.run.parallel.dp, keep, len(info["new_ranks"]),
                    f"step {in_flight} redone" if rec["redone_step"] is not None else "no step redone")
        return surv.results if surv.completed_in_flight else None

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
        why = getattr(err, "handoff_skipped", None) or self._handoff_blocker()
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
        reason = str(err).splitlines()[0][:300] + (f"; from storage: {why}" if why else "")
        rec = {"step": step_before, "resumed_step": self.step, "reason": reason, "recovery": "checkpoint",
               "handoff_skipped": why, "node": getattr(err, "node", None), "lost_nodes": getattr(err, "lost_nodes", []),
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
        if self._handoff_blocker() is None:
            self._grow_by_handoff(dp, t0)
            return
        if self.last_ckpt is None or self.last_ckpt.step != self.step:
            self.save_checkpoint()
        with self._phase(Phase.RESUME):
            self.group.shutdown()
            self._relaunch(dp)
            self._restore()
        rec = {"step": step_before, "resumed_step": self.step, "reason": "grow: resources available",
               "recovery": "checkpoint", "handoff_skipped": self._handoff_blocker(), "node": None, "lost_nodes": [], "steps_recomputed": max(0, step_before - self.step),
               "dp_before": dp_before, "dp_after": dp, "seconds": time.perf_counter() - t0,
               "checkpoint": self.last_ckpt.location if self.last_ckpt else None}
        self.recoveries.append(rec)
        self.logger.log({"elastic/recovery_s": rec["seconds"], "elastic/dp": dp}, step=self.step)
        log.info("grew dp %d -> %d in %.1f s at step %d", dp_before, dp, rec["seconds"], self.step)

    def _grow_by_handoff(self, dp: int, t0: float) -> None:
        """Grow to ``dp`` at a step boundary: every current replica survives, the new ones take its state over the
        process group (no checkpoint written or read). A failure while re-forming is a rank failure (checkpoint
        path)."""
        dp_before = self.run.parallel.dp
        run = self.run.with_dp(dp)
        try:
            with self._phase(Phase.RESUME):
                info = self.group.reform(run, list(range(dp_before)))
                self._set_layout(run)
        except RankFailure:
            raise
        except Exception as e:  # noqa: BLE001 - a half re-formed group: recover from storage
            raise RankFailure(f"growing dp {dp_before} -> {dp} by hand-off failed: {e}") from e
        rec = {"step": self.step, "resumed_step": self.step, "reason": "grow: resources available",
               "recovery": "handoff", "node": None, "lost_nodes": [], "steps_recomputed": 0, "redone_step": None,
               "dp_before": dp_before, "dp_after": dp, "seconds": time.perf_counter() - t0,
               "survivors": list(range(dp_before)), "new_ranks": info["new_ranks"], "handoff_bytes": info["bytes"],
               "checkpoint": None}
        self.recoveries.append(rec)
        self.logger.log({"elastic/recovery_s": rec["seconds"], "elastic/dp": dp}, step=self.step)
        log.info("grew dp %d -> %d by hand-off in %.1f s at step %d", dp_before, dp, rec["seconds"], self.step)
