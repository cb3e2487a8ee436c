"""The training controller: step loop, data position, bias balancer, metrics, checkpoints, resume.

:class:`TrainController` is what the :class:`raymoe.actors.Coordinator` actor runs. It talks to the ranks only
through a :class:`WorkerGroup` of typed calls (``step(list[StepPlan]) -> list[StepResult]``, ``evaluate``,
``save``, ``load``), so it is unit-testable in one process with :class:`LocalWorkerGroup` and runs on Ray with
``RayWorkerGroup`` (actors/). Each step is a pass through named phases (:class:`Phase`):

  PLAN     → next global batch from the resumable sampler, per-rank micro-batches (the topology's data-rank
             slices), lr(tokens), the rank's op list from the schedule
  EXECUTE  → one ``step`` call per rank (its op list, gradient reduction, optimizer step; counts all-reduced)
  BALANCE  → bias update b ← b + γ·sign(mean − c) from the global counts of every routing layer (MTP included),
             sent with the next plan; metrics; then EVAL / CHECKPOINT every N steps

The control-plane share of a step (``perf/control_plane_share``) is the step's wall time minus the slowest rank's
own step time, over the step's wall time: coordinator work plus Ray call overhead.

Checkpoints (:mod:`raymoe.checkpoint`) hold the ranks' files (sharded safetensors for the native runtime; DeepSpeed
engine files for ``dp_impl=deepspeed``) plus ``coordinator.json`` / ``coordinator.safetensors`` (step, tokens,
sampler state, biases, history — no pickles) and ``layout.json``. They live under ``train.storage_path`` (default: the
run directory; an object store such as ``s3://bucket/run`` when the nodes share no disk, :mod:`raymoe.storage`): each
rank puts its own files there and reports their hashes, the controller writes the manifest last, and
``train.resume=auto`` continues from the newest valid one — from any node and any run directory — so an interrupted
run followed by a resume reproduces the uninterrupted loss curve exactly (fp32). A checkpoint whose file fails its
hash while being loaded is skipped for the previous one. The HF export (``hf/``) and ``summary.json`` are uploaded
to the storage too; ``metrics.jsonl`` and wandb stay in the (node-local) run directory.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import enum
import itertools
import json
import logging
import pathlib
import threading
import time
from typing import Any, Iterator, Optional, Protocol

import torch

from raymoe import checkpoint as ckpt
from raymoe.balance import BiasBalancer, maxvio
from raymoe.config import RunConfig
from raymoe.metrics import MetricsLogger
from raymoe.model.plan import train_flops_per_token
from raymoe.optim import lr_at
from raymoe.storage import Storage, stage_and_put
from raymoe.train.export import EXTRA_DIR, export_checkpoint, write_extra
from raymoe.train.plans import EvalPlan, EvalResult, StepPlan, StepResult
from raymoe.train.run_state import check_compatible, load_coordinator_state, plain, save_coordinator_state
from raymoe.train.topology import Topology

__all__ = ["WorkerGroup", "LocalWorkerGroup", "TrainController", "StepFailed", "RankFailure", "TrainingFailed",
           "GroupFactory", "make_worker", "dp_impl", "Phase"]

log = logging.getLogger(__name__)
# what the coordinator itself reads from a checkpoint (the ranks read the rest)
_COORDINATOR_FILES = ("coordinator.json", "coordinator.safetensors", "config.json", "layout.json")


class StepFailed(RuntimeError):
    pass


class RankFailure(RuntimeError):
    """A rank died, hung past ``train.step_timeout_s`` or raised; the message names the rank and the call.
    Worker groups raise it (the Ray layer's ``StageError`` is one); the controller recovers from it."""


class TrainingFailed(RuntimeError):
    """The run stopped for good (more failures than ``train.max_failures``, or no room to restart)."""


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


class Phase(str, enum.Enum):
    """Named phases of the controller's loop (``status()["phase"]``; each one's time is a ``control/`` metric)."""

    SETUP = "setup"
    RESUME = "resume"
    PLAN = "plan"
    EXECUTE = "execute"
    BALANCE = "balance"
    EVAL = "eval"
    CHECKPOINT = "checkpoint"
    EXPORT = "export"
    DONE = "done"


class TrainController:
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
        tc = self.run.train
        ids = self.sampler.next_batch(self.global_batch)
        bias = self.balancer.bias.clone()
        fault = self.fault_at.get(self.step)
        out = []
        for r in range(self.topo.world_size):
            mbs = self.topo.microbatches(r, list(ids), tc.micro_batch_size)
            out.append(StepPlan(step=self.step, lr=lr, mtp_lambda=tc.mtp_lambda, biases=bias,
                                microbatches=tuple(tuple(int(i) for i in m) for m in mbs), ops=self._ops[r],
                                fault=fault))
        return out, [int(i) for i in ids]

    # ------------------------------------------------------------------ checkpoint / resume
    def layout(self) -> dict[str, Any]:
        p = self.run.parallel
        return {"pp": p.pp, "ep": p.ep, "dp": p.dp, "schedule": p.schedule, "dp_impl": self.impl}

    def resume_if_requested(self) -> None:
        """``train.resume``: ``auto`` continues from the newest valid checkpoint in the storage, if any (one whose file
        fails its hash while loading is skipped for the previous one); a directory or storage URI continues from that
        checkpoint (any problem is an error); ``never`` starts fresh."""
        mode = self.run.train.resume
        if mode == "never":
            return
        explicit = mode != "auto"
        cands = iter([self.store.open(mode)]) if explicit else self.store.candidates()
        first = next(cands, None)
        if first is None:
            return
        with self._phase(Phase.RESUME):
            target = self._load_first(itertools.chain([first], cands), check=True, fallback=not explicit)
        if target is None:
            return
        self.resumed_from = target.location
        log.info("resumed from %s at step %d", target.location, self.step)

    def save_checkpoint(self) -> ckpt.CheckpointRef:
        """Every rank puts its files under this step's checkpoint location and reports their hashes; the controller
        adds its own files (state, config, layout, expert load) the same way, writes the manifest last and prunes."""
        with self._phase(Phase.CHECKPOINT):
            dest = self.store.begin(self.step)
            tables = list(self.group.save(dest))
            state = {"step": self.step, "tokens": self.tokens, "sampler": self.sampler.state_dict(),
                     "balancer": self.balancer.state_dict(), "history": self.history,
                     "load_window": list(self.load_window)}
            tables.append(stage_and_put(dest, lambda d: self._write_own_files(d, state)))
            ref = self.store.commit(dest, self.step, ckpt.merge_files(tables), {"tokens": self.tokens})
            self.store.prune(self.run.train.keep_checkpoints)
            self.last_ckpt = ref
        return ref

    def _write_own_files(self, d: pathlib.Path, state: dict[str, Any]) -> None:
        save_coordinator_state(d, state)
        self.write_expert_load(d)
        write_extra(d / EXTRA_DIR, self.data_info, self.run.model.max_position_embeddings)  # tokenizer + generation config: any checkpoint exports alone
        (d / "config.json").write_text(json.dumps(plain(dataclasses.asdict(self.run)), indent=2))
        (d / "layout.json").write_text(json.dumps(self.layout(), indent=2))
        self._write_data_files(d)

    def _write_data_files(self, d: pathlib.Path) -> None:
        """``data.json``: the tokenizer's special ids, vocabulary size and sha256, the dataset directories (the
        tokenizer files themselves are under ``hf_extra/``, :func:`raymoe.train.export.write_extra`)."""
        keys = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "tokenizer_sha256", "dataset_dir",
                "dataset_dirs", "train_samples", "val_samples", "train_tokens", "val_tokens")
        (d / "data.json").write_text(json.dumps({k: self.data_info[k] for k in keys if k in self.data_info},
                                                indent=2))

    # ------------------------------------------------------------------ eval
    def evaluate(self) -> dict[str, Any]:
        tc = self.run.train
        n = min(tc.eval_batches * tc.micro_batch_size, self.val_size)
        ids = list(range(n))
        batches = tuple(tuple(ids[i:i + tc.micro_batch_size]) for i in range(0, n, tc.micro_batch_size))
        with self._phase(Phase.EVAL):
            res: EvalResult = self.group.evaluate(EvalPlan(batches=batches, biases=self.balancer.bias.clone()))
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
        with self._phase(Phase.EXECUTE):
            results = self.group.step(plans)
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
        text = json.dumps(summary, indent=2)
        (self.run_dir / "summary.json").write_text(text)
        if self._storage_elsewhere():
            self.storage.write_bytes("summary.json", text.encode())
        self.logger.summary(summary)
        self._set_status(phase=Phase.DONE, step=self.step)
        return summary

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

    # ------------------------------------------------------------------ elasticity and recovery
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

    def _load_first(self, cands: Iterator[ckpt.CheckpointRef], check: bool,
                    fallback: bool = True) -> Optional[ckpt.CheckpointRef]:
        """Load the first of ``cands`` (newest first) that passes its hash checks while loading; ``check``: refuse a
        checkpoint of another model or optimizer format. None when there is no candidate at all."""
        tried: list[str] = []
        for ref in cands:
            self._set_status(checkpoint=ref.location)
            try:
                self._load(ref, check=check)
                return ref
            except ckpt.ChecksumMismatch as e:
                if not fallback:
                    raise
                log.warning("checkpoint %s failed its hash check while loading (%s); falling back to the previous "
                            "one", ref.location, e)
                tried.append(ref.location)
        if tried:  # some ranks may hold a checkpoint's state by now: never continue as if from scratch
            raise ckpt.CheckpointCorrupt(f"no checkpoint in {self.store.uri} loads: {', '.join(tried)} failed their "
                                         "hash checks; train.resume=never starts from scratch")
        return None

    def _load(self, target: ckpt.CheckpointRef, check: bool = False) -> None:
        """Coordinator state and every rank's share of one checkpoint (from an object store the coordinator fetches
        just its own small files into scratch; each rank fetches what it reads)."""
        with ckpt.local_copy(target, [f for f in _COORDINATOR_FILES if f in target.files]) as d:
            if check:
                check_compatible(d, self.run, self.impl, name=target.location)
            state = load_coordinator_state(d)
        self.group.load(target)
        self.step, self.tokens = state["step"], state["tokens"]
        self.sampler.load_state_dict(state["sampler"])
        self.balancer.load_state_dict(state["balancer"])
        self.history = state.get("history", [])
        self.load_window.clear()
        self.load_window.extend(state.get("load_window", []))

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

    def write_expert_load(self, d: pathlib.Path) -> pathlib.Path:
        """``expert_load.safetensors``: tensor ``expert_load`` float32 ``[num_router_layers, E]`` — token counts per
        routed expert summed over the last ``balance.load_window_steps`` optimizer steps (rows: main MoE layers in
        order, then the MTP blocks); metadata ``window_steps`` (steps actually in the window), ``step``. Serving
        seeds its redundant-expert placement (EPLB) from it."""
        from safetensors.torch import save_file

        mc = self.run.model
        load = (torch.stack(list(self.load_window)).sum(0).float() if self.load_window
                else torch.zeros(mc.num_router_layers, mc.n_routed_experts))
        out = pathlib.Path(d) / "expert_load.safetensors"
        save_file({"expert_load": load.contiguous()}, str(out),
                  metadata={"window_steps": str(len(self.load_window)), "step": str(self.step)})
        return out

    def export_hf(self, path: str) -> str:
        """Write the model (with the balancer's current biases) as a HF DeepseekV3 checkpoint from this step's
        checkpoint (saved first when needed), any layout, either checkpoint format — the same code as
        ``python -m raymoe.jobs.export`` (:mod:`raymoe.train.export`): weights, config, tokenizer files,
        ``generation_config.json`` and ``expert_load.safetensors``.

        ``path`` is a local directory (the run directory's ``hf/``); when the storage is elsewhere the export is also
        put under ``<storage>/hf/`` (an older export there is deleted first, so files of two exports never mix)."""
        if self.last_ckpt is None or self.last_ckpt.step != self.step:
            self.save_checkpoint()
        export_checkpoint(self.last_ckpt, path)
        if self._storage_elsewhere():
            self.storage.delete("hf")
            self.storage.child("hf").put_dir(path)
        return path

    def _storage_elsewhere(self) -> bool:
        """True when ``train.storage_path`` is not the run directory: what must survive a node is copied there."""
        root = self.storage.local_root
        return root is None or root.resolve() != self.run_dir.resolve()

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
            "losses": [h["train/loss"] for h in self.history],
        }

    def close(self) -> None:
        self.logger.finish()
