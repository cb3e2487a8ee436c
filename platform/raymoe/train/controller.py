"""The training controller: step loop, data position, bias balancer, metrics, checkpoints, resume.

:class:`TrainController` is what the :class:`raymoe.actors.Coordinator` actor runs. It talks to the ranks only
through a :class:`~raymoe.train.worker_group.WorkerGroup` of typed calls (``step(list[StepPlan]) ->
list[StepResult]``, ``evaluate``, ``save``, ``load``), so it is unit-testable in one process with
:class:`~raymoe.train.worker_group.LocalWorkerGroup` and runs on Ray with ``RayWorkerGroup`` (actors/). Each step
is a pass through named phases (:class:`~raymoe.train.phases.Phase`):

  PLAN     → next global batch from the resumable sampler, per-rank micro-batches (the topology's data-rank
             slices), lr(tokens), the rank's op list from the schedule
  EXECUTE  → one ``step`` call per rank (its op list, gradient reduction, optimizer step; counts all-reduced)
  BALANCE  → bias update b ← b + γ·sign(mean − c) from the global counts of every routing layer (MTP included),
             sent with the next plan; metrics; then EVAL / CHECKPOINT every N steps

The control-plane share of a step (``perf/control_plane_share``) is the step's wall time minus the slowest rank's
own step time, over the step's wall time: coordinator work plus Ray call overhead.

The pieces live beside it: the ranks' side of the protocol in :mod:`raymoe.train.worker_group`, checkpoints, resume
and the HF export in :mod:`raymoe.train.checkpointing`, recovery after a rank failure and growing DP in
:mod:`raymoe.train.elastic`, the phase names in :mod:`raymoe.train.phases`.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import pathlib
import threading
import time
from typing import Any, Iterator, Optional

import torch

from raymoe import checkpoint as ckpt
from raymoe.balance import BiasBalancer, maxvio
from raymoe.config import RunConfig
from raymoe.metrics import MetricsLogger
from raymoe.model.plan import train_flops_per_token
from raymoe.optim import lr_at
from raymoe.storage import Storage
from raymoe.train.checkpointing import CheckpointMixin
from raymoe.train.elastic import ElasticMixin, TrainingFailed
from raymoe.train.phases import Phase
from raymoe.train.plans import EvalPlan, EvalResult, StepPlan, StepResult
from raymoe.train.run_state import plain
from raymoe.train.topology import Topology
from raymoe.train.worker_group import GroupFactory, RankFailure, WorkerGroup, dp_impl

# TrainingFailed is re-exported: it is what run_loop raises to its caller
__all__ = ["TrainController", "StepFailed", "TrainingFailed"]

log = logging.getLogger(__name__)


class StepFailed(RuntimeError):
    pass


class TrainController(CheckpointMixin, ElasticMixin):
    """The step loop as a small state machine: PLAN → EXECUTE → BALANCE (→ EVAL) (→ CHECKPOINT) per step.

    Args:
        run: the run config.
        group: the ranks (:class:`WorkerGroup`).
        train_size, val_size: sample counts of the training and validation sets.
    """

    def __init__(self, run: RunConfig, group: WorkerGroup, train_size: int, val_size: int,
                 factory: Optional[GroupFactory] = None, data_info: Optional[dict[str, Any]] = None) -> None:
        from raymoe.data import ResumableSampler

        self.run, self.group, self.factory = run, group, factory
        self.train_size = train_size
        self.failures = 0
        self.recoveries: list[dict[str, Any]] = []
        self.data_info = dict(data_info or {})
        self.load_window: collections.deque[torch.Tensor] = collections.deque(maxlen=run.balance.load_window_steps)
        self.run_dir = pathlib.Path(run.run_dir)
        # where everything that must survive a node goes: checkpoints, hf/, summary.json (raymoe.storage)
        self.storage_uri = run.train.storage_path or str(self.run_dir)
        self.storage = Storage(self.storage_uri)
        self.store = ckpt.CheckpointStore(self.storage_uri)
        tc, mc, p = run.train, run.model, run.parallel
        self._set_layout(run)
        self.global_batch = self.topo.data_parallel_size * tc.num_microbatches * tc.micro_batch_size
        self.sampler = ResumableSampler(train_size, seed=tc.seed)
        self.val_size = val_size
        self.balancer = BiasBalancer(mc.num_router_layers, mc.n_routed_experts, gamma=run.balance.gamma,
                                     rule=run.balance.rule)
        # the biases a run starts from: the pretrained checkpoint's (train.init_from) or zeros
        self.initial_bias = torch.zeros_like(self.balancer.bias)
        if tc.init_from:
            from raymoe.train.pretrained import initial_biases

            self.initial_bias = initial_biases(tc.init_from, mc)
        self.balancer.bias.copy_(self.initial_bias)
        self.step = 0
        self.tokens = 0
        self.total_tokens = tc.steps * run.tokens_per_step
        self.flops_per_token = train_flops_per_token(mc, run.data.seq_len)
        self.peak: Optional[float] = None
        self.history: list[dict[str, Any]] = []
        self.last_eval: dict[str, Any] = {}
        self.last_ckpt: Optional[ckpt.CheckpointRef] = None
        self.resumed_from: Optional[str] = None
        self.phase_s: dict[str, float] = {}
        self._lock = threading.Lock()
        self._status: dict[str, Any] = {"phase": Phase.SETUP.value, "step": 0, "steps": tc.steps}
        self.logger = MetricsLogger(self.run_dir, run.logger, plain(dataclasses.asdict(run)))
        self.fault_at: dict[int, str] = {}  # test-only: {step: fault} injected into that step's plans

    def _set_layout(self, run: RunConfig) -> None:
        p = run.parallel
        self.run = run
        self.topo = Topology(p.pp, p.ep, p.dp, p.schedule, run.train.num_microbatches, run.model)
        self.impl = dp_impl(run)
        self._ops = {r: tuple(str(o) for o in self.topo.schedule.ops(self.topo.coords(r).pp_rank))
                     for r in range(self.topo.world_size)}

    # ------------------------------------------------------------------ status (read by the driver)
    def status(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._status)

    def _set_status(self, **kw: Any) -> None:
        with self._lock:
            self._status.update({k: (v.value if isinstance(v, Phase) else v) for k, v in kw.items()})

    @contextlib.contextmanager
    def _phase(self, phase: Phase) -> Iterator[None]:
        self._set_status(phase=phase)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phase_s[phase.value] = self.phase_s.get(phase.value, 0.0) + time.perf_counter() - t0

    # ------------------------------------------------------------------ plans
    def _gamma(self) -> float:
        b = self.run.balance
        if b.freeze_after_tokens is not None and self.tokens >= b.freeze_after_tokens:
            return 0.0
        return b.gamma

    def _lr(self) -> float:
        tc = self.run.train
        return lr_at(self.tokens, tc.lr, tc.min_lr, tc.warmup_tokens, tc.constant_tokens, tc.decay_tokens,
                     self.total_tokens)

    def plans(self, lr: float) -> tuple[list[StepPlan], list[int]]:
        """One :class:`StepPlan` per rank for the next step (at learning rate ``lr``), and the step's sample ids."""
        ids = self.sampler.next_batch(self.global_batch)
        return self._plans_for([int(i) for i in ids], lr), [int(i) for i in ids]

    def _plans_for(self, ids: list[int], lr: float) -> list[StepPlan]:
        """The current layout's per-rank plans of this step's samples ``ids`` (again after a hand-off: the step in
        flight is redone with the same samples, lr and biases on the new layout)."""
        tc = self.run.train
        bias = self.balancer.bias.clone()
        fault = self.fault_at.get(self.step)
        out = []
        for r in range(self.topo.world_size):
            mbs = self.topo.microbatches(r, list(ids), tc.micro_batch_size)
            out.append(StepPlan(step=self.step, lr=lr, mtp_lambda=tc.mtp_lambda, biases=bias,
                                microbatches=tuple(tuple(int(i) for i in m) for m in mbs), ops=self._ops[r],
                                fault=fault))
        return out

    # ------------------------------------------------------------------ eval
    def evaluate(self) -> dict[str, Any]:
        tc = self.run.train
        n = min(tc.eval_batches * tc.micro_batch_size, self.val_size)
        ids = list(range(n))
        batches = tuple(tuple(ids[i:i + tc.micro_batch_size]) for i in range(0, n, tc.micro_batch_size))
        plan = EvalPlan(batches=batches, biases=self.balancer.bias.clone())
        with self._phase(Phase.EVAL):
            res: EvalResult = self._survive(lambda: self.group.evaluate(plan))
        mv = maxvio(res.counts.double())
        out = {"val/loss": res.val_loss, "val/mtp_loss": res.val_mtp_loss,
               "balance/maxvio_global": float(mv.mean()) if mv.numel() else 0.0}
        if res.mtp_acceptance is not None:
            out["eval/mtp_acceptance"] = res.mtp_acceptance
        self.last_eval = out
        return out

    # ------------------------------------------------------------------ loop
    def train_step(self) -> tuple[list[StepResult], dict[str, Any]]:
        """PLAN → EXECUTE → BALANCE for one step; returns the ranks' results and the step's metrics."""
        t0 = time.perf_counter()
        with self._phase(Phase.PLAN):
            lr, gamma = self._lr(), self._gamma()
            plans, sample_ids = self.plans(lr)
        t_exec = time.perf_counter()
        results, lost_s = self._execute(plans, sample_ids, lr)  # a hand-off on the way: its time is no step's
        t0, t_exec = t0 + lost_s, t_exec + lost_s
        t_exec_end = time.perf_counter()
        with self._phase(Phase.BALANCE):
            r0 = results[0]
            for r in results[1:]:
                if not torch.equal(r.counts, r0.counts):
                    raise StepFailed(f"step {self.step}: ranks {r0.rank} and {r.rank} disagree on the all-reduced "
                                     "expert counts")
            counts = r0.counts
            if r0.skipped:
                log.warning("step %d skipped: non-finite loss/amax %s; weights, optimizer state and biases unchanged",
                            self.step, r0.nonfinite or "")
            else:
                self.balancer.gamma = gamma
                self.balancer.update(counts)
                self.load_window.append(counts.clone())
            self.step += 1
            self.tokens += self.run.tokens_per_step
        dt = time.perf_counter() - t0
        slowest = max(r.step_s for r in results)
        control = (t_exec - t0) + (t_exec_end - t_exec - slowest) + (time.perf_counter() - t_exec_end)
        tps = self.run.tokens_per_step / dt
        if self.peak is None:
            self.peak = self.group.peak_flops()
        mv = maxvio(counts.double())
        L = r0.losses
        m: dict[str, Any] = {
            "train/loss": L.mean("loss"), "train/main_loss": L.mean("main"), "train/mtp_loss": L.mean("mtp"),
            "train/aux_loss": L.mean("aux"), "train/lr": lr, "train/grad_norm": r0.grad_norm,
            "train/tokens": self.tokens, "train/skipped": int(r0.skipped),
            "perf/tokens_per_s": tps, "perf/step_s": dt, "perf/mfu": tps * self.flops_per_token / self.peak,
            "perf/control_plane_s": control, "perf/control_plane_share": control / dt if dt > 0 else 0.0,
            "perf/idle_s_max": max(r.idle_s for r in results), "perf/busy_s_max": max(r.busy_s for r in results),
            "balance/maxvio_batch": float(mv.mean()), "balance/bias_std": float(self.balancer.bias.std(dim=1).mean()),
            "balance/gamma": gamma,
            "data/sample_ids": sample_ids,
        }
        for layer in range(counts.shape[0]):
            m[f"balance/maxvio_batch/layer_{layer}"] = float(mv[layer])
        return results, m

    def run_loop(self) -> dict[str, Any]:
        tc = self.run.train
        stop_at = tc.steps if tc.stop_after_steps is None else min(tc.steps, tc.stop_after_steps)
        t_start = time.perf_counter()
        tokens_at_start = self.tokens
        while self.step < stop_at:
            try:
                self._maybe_grow()
                self._one_step(stop_at)
            except RankFailure as e:
                self._recover(e)
        # ranks hold the bias they last routed with; give them the final one (export, inspection, serving)
        self.group.set_biases(self.balancer.bias.clone())
        wall = time.perf_counter() - t_start
        summary = self.summary(wall, self.tokens - tokens_at_start, finished=self.step >= tc.steps)
        if summary["finished"] and tc.export_hf:
            with self._phase(Phase.EXPORT):
                summary["hf_export"] = self.export_hf(str(self.run_dir / "hf"))
                summary["hf_export_uri"] = self.storage.uri_of("hf") if self._storage_elsewhere() else None
                summary["val_task"] = self.write_val_task(str(self.run_dir / "lm_eval"))
        text = json.dumps(summary, indent=2)
        (self.run_dir / "summary.json").write_text(text)
        if self._storage_elsewhere():
            self.storage.write_bytes("summary.json", text.encode())
        self.logger.summary(summary)
        self._set_status(phase=Phase.DONE, step=self.step)
        return summary

    def write_val_task(self, path: str) -> dict[str, Any]:
        """The samples ``val/loss`` covers as an lm-evaluation-harness task in ``path``
        (:mod:`raymoe.data.evaltask`): the harness' perplexity on the served export is then this run's ``val/loss``.
        Never fails the run: what could not be written is ``{"skipped": reason}``."""
        from raymoe.data import open_datasets
        from raymoe.data.evaltask import write_val_task

        tc = self.run.train
        try:
            _, val_ds = open_datasets(self.run)
            meta = write_val_task(val_ds, self.data_info["tokenizer_path"], tc.eval_batches * tc.micro_batch_size,
                                  path)
        except Exception as e:  # noqa: BLE001 - an optional by-product of a finished run
            return {"skipped": f"{type(e).__name__}: {e}"}
        if "skipped" not in meta and self._storage_elsewhere():
            self.storage.delete("lm_eval")
            self.storage.child("lm_eval").put_dir(path)
        return meta

    def _one_step(self, stop_at: int) -> None:
        tc = self.run.train
        results, m = self.train_step()
        if self.step % self.run.balance.histogram_every == 0 or self.step == stop_at:
            m["balance/counts"] = results[0].counts.tolist()
            m["balance/bias"] = self.balancer.bias.tolist()
        if self.step % tc.eval_every == 0 or self.step == tc.steps:
            m.update(self.evaluate())
        self.history.append({k: v for k, v in m.items() if not isinstance(v, list)})
        self.logger.log(m, step=self.step)
        self._set_status(phase=Phase.EXECUTE, step=self.step, loss=m["train/loss"],
                         tokens_per_s=m["perf/tokens_per_s"], maxvio=m["balance/maxvio_batch"],
                         dp=self.run.parallel.dp, recoveries=len(self.recoveries))
        if self.step % tc.checkpoint_every == 0 or self.step == stop_at:
            self.save_checkpoint()

    def summary(self, wall: float, tokens_run: int, finished: bool) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        return {
            "run_dir": str(self.run_dir),
            "finished": finished,
            "steps": self.step,
            "tokens": self.tokens,
            "layout": self.layout(),
            # per rank: node, pid, where its code came from (Ray groups; None for in-process groups)
            "placement": self.group.placement() if hasattr(self.group, "placement") else None,
            "final_train_loss": last.get("train/loss"),
            "final_mtp_loss": last.get("train/mtp_loss"),
            "val_loss": self.last_eval.get("val/loss"),
            "mtp_acceptance": self.last_eval.get("eval/mtp_acceptance"),
            "maxvio_global": self.last_eval.get("balance/maxvio_global"),
            "maxvio_batch": last.get("balance/maxvio_batch"),
            "tokens_per_s": (tokens_run / wall) if wall > 0 else None,
            "control_plane_share": (sum(h.get("perf/control_plane_s", 0.0) for h in self.history)
                                    / max(1e-9, sum(h.get("perf/step_s", 0.0) for h in self.history))),
            "phase_s": dict(self.phase_s),
            "recoveries": list(self.recoveries),
            "failures": self.failures,
            "checkpoint": self.last_ckpt.location if self.last_ckpt else None,
            "storage": self.storage_uri,
            "resumed_from": self.resumed_from,
            "wandb_dir": self.logger.wandb_dir,
            "metrics_file": str(self.logger.jsonl_path),
            "hf_export": None,  # set by run_loop when a finished run is exported (train.export_hf)
            "val_task": None,  # with the export: the lm-eval task of val/loss's samples (raymoe.data.evaltask)
            "losses": [h["train/loss"] for h in self.history],
        }

    def close(self) -> None:
        self.logger.finish()
