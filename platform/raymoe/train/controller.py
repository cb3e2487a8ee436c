"""The training controller: step loop, data position, bias balancer, metrics, checkpoints, resume.

:class:`TrainController` is what the :class:`raymoe.actors.Coordinator` actor runs. It talks to the stage replicas
only through a :class:`StageGroup` (``call(method, per_rank_args)`` → per-rank results), so it is unit-testable in
one process with :class:`LocalStageGroup` and runs on Ray with ``RayStageGroup`` (actors/). Each step is:

  observe  → next global batch from the resumable sampler, per-rank micro-batch assignment, lr(tokens), γ(tokens)
  execute  → one ``run_step`` call per rank (forward/backward/optimizer step inside, counts all-reduced over DP)
  decide   → bias update b ← b + γ·sign(mean − c) from the global counts of every routing layer (MTP included),
             sent with the next plan; metrics; evaluation, checkpoint every N steps

Checkpoints (:mod:`raymoe.checkpoint`) hold the stage engines' files plus ``coordinator.pt`` (step, tokens, sampler
state, biases, RNG) and are committed atomically; ``train.resume=auto`` continues from the newest valid one, so an
interrupted run followed by a resume reproduces the uninterrupted loss curve exactly (fp32).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import threading
import time
from typing import Any, Optional, Protocol

import torch

from raymoe import checkpoint as ckpt
from raymoe.balance import BiasBalancer, maxvio
from raymoe.config import RunConfig
from raymoe.metrics import MetricsLogger
from raymoe.model.plan import train_flops_per_token
from raymoe.optim import lr_at

__all__ = ["StageGroup", "LocalStageGroup", "TrainController", "StepFailed"]

log = logging.getLogger(__name__)


class StepFailed(RuntimeError):
    pass


class StageGroup(Protocol):
    size: int

    def call(self, method: str, args: Optional[list[tuple]] = None, ranks: Optional[list[int]] = None) -> list[Any]:
        """Invoke ``method`` on the given ranks (all by default) concurrently; ``args[i]`` for the i-th rank."""
        ...

    def shutdown(self) -> None: ...


class LocalStageGroup:
    """DP=1 in-process group around a :class:`raymoe.stage.StageWorker` (tests, debugging)."""

    def __init__(self, run: RunConfig, master_port: int) -> None:
        from raymoe.stage import StageWorker

        if run.parallel.dp != 1:
            raise ValueError("LocalStageGroup supports parallel.dp=1 only; use Ray for DP>1")
        self.size = 1
        self.workers = [StageWorker(run, 0, "127.0.0.1", master_port)]

    def call(self, method: str, args: Optional[list[tuple]] = None, ranks: Optional[list[int]] = None) -> list[Any]:
        ranks = list(range(self.size)) if ranks is None else ranks
        return [getattr(self.workers[r], method)(*(args[i] if args else ())) for i, r in enumerate(ranks)]

    def shutdown(self) -> None:
        for w in self.workers:
            w.close()


class TrainController:
    def __init__(self, run: RunConfig, group: StageGroup, train_size: int, val_size: int) -> None:
        from raymoe.data import ResumableSampler

        self.run, self.group = run, group
        self.run_dir = pathlib.Path(run.run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        tc, mc = run.train, run.model
        self.global_batch = run.parallel.dp * tc.num_microbatches * tc.micro_batch_size
        self.sampler = ResumableSampler(train_size, seed=tc.seed)
        self.val_size = val_size
        self.balancer = BiasBalancer(mc.num_router_layers, mc.n_routed_experts, gamma=run.balance.gamma,
                                     rule=run.balance.rule)
        self.step = 0
        self.tokens = 0
        self.total_tokens = tc.steps * run.tokens_per_step
        self.flops_per_token = train_flops_per_token(mc, run.data.seq_len)
        self.peak = None
        self.history: list[dict[str, Any]] = []
        self.last_eval: dict[str, Any] = {}
        self.last_ckpt: Optional[pathlib.Path] = None
        self.resumed_from: Optional[str] = None
        self._lock = threading.Lock()
        self._status: dict[str, Any] = {"phase": "init", "step": 0, "steps": tc.steps}
        self.logger = MetricsLogger(self.run_dir, run.logger, _plain(dataclasses.asdict(run)))

    # ------------------------------------------------------------------ status (read by the driver)
    def status(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._status)

    def _set_status(self, **kw: Any) -> None:
        with self._lock:
            self._status.update(kw)

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

    def _plans(self) -> list[tuple]:
        tc = self.run.train
        ids = self.sampler.next_batch(self.global_batch)
        per_rank = len(ids) // self.group.size
        plans = []
        for r in range(self.group.size):
            mine = ids[r * per_rank : (r + 1) * per_rank]
            mbs = [mine[i * tc.micro_batch_size : (i + 1) * tc.micro_batch_size] for i in range(tc.num_microbatches)]
            plans.append(({
                "step": self.step,
                "lr": self._lr(),
                "mtp_lambda": tc.mtp_lambda,
                "biases": self.balancer.bias.clone(),
                "microbatches": mbs,
            },))
        return plans

    # ------------------------------------------------------------------ checkpoint / resume
    def resume_if_requested(self) -> None:
        mode = self.run.train.resume
        if mode == "never":
            return
        target = ckpt.latest_valid(self.ckpt_root) if mode == "auto" else pathlib.Path(mode)
        if target is None:
            return
        if mode != "auto":
            ckpt.verify(target)
        self._set_status(phase="resuming", checkpoint=str(target))
        state = torch.load(target / "coordinator.pt", weights_only=False)
        self.group.call("load", [(str(target),)] * self.group.size)
        self.step, self.tokens = state["step"], state["tokens"]
        self.sampler.load_state_dict(state["sampler"])
        self.balancer.load_state_dict(state["balancer"])
        self.history = state.get("history", [])
        self.resumed_from = str(target)
        log.info("resumed from %s at step %d", target, self.step)

    def save_checkpoint(self) -> pathlib.Path:
        self._set_status(phase="checkpoint")
        tmp = ckpt.new_tmp_dir(self.ckpt_root, self.step)
        self.group.call("save", [(str(tmp),)] * self.group.size)
        torch.save(
            {
                "step": self.step,
                "tokens": self.tokens,
                "sampler": self.sampler.state_dict(),
                "balancer": self.balancer.state_dict(),
                "history": self.history,
                "rng": torch.get_rng_state(),
            },
            tmp / "coordinator.pt",
        )
        (tmp / "config.json").write_text(json.dumps(_plain(dataclasses.asdict(self.run)), indent=2))
        final = ckpt.commit(tmp, self.step, {"tokens": self.tokens})
        ckpt.prune(self.ckpt_root, self.run.train.keep_checkpoints)
        self.last_ckpt = final
        return final

    # ------------------------------------------------------------------ eval
    def evaluate(self) -> dict[str, Any]:
        tc = self.run.train
        n = min(tc.eval_batches * tc.micro_batch_size, self.val_size)
        ids = list(range(n))
        batches = [ids[i : i + tc.micro_batch_size] for i in range(0, n, tc.micro_batch_size)]
        res = self.group.call("evaluate", [(batches,)], ranks=[0])[0]
        mv = maxvio(res["counts"].double())
        out = {"val/loss": res["val_loss"], "val/mtp_loss": res["val_mtp_loss"],
               "balance/maxvio_global": float(mv.mean()) if mv.numel() else 0.0}
        self.last_eval = out
        return out

    # ------------------------------------------------------------------ loop
    def run_loop(self) -> dict[str, Any]:
        tc = self.run.train
        stop_at = tc.steps if tc.stop_after_steps is None else min(tc.steps, tc.stop_after_steps)
        t_start = time.perf_counter()
        tokens_at_start = self.tokens
        while self.step < stop_at:
            t0 = time.perf_counter()
            lr, gamma = self._lr(), self._gamma()
            self._set_status(phase="train", step=self.step, lr=lr)
            results = self.group.call("run_step", self._plans())
            r0 = results[0]
            for r in results[1:]:
                if not torch.equal(r["counts"], r0["counts"]):
                    raise StepFailed(f"step {self.step}: DP ranks disagree on the all-reduced expert counts")
            counts = r0["counts"]
            if r0["skipped"]:
                log.warning("step %d skipped: non-finite loss/amax %s", self.step, r0["nonfinite_layers"] or "")
            else:
                self.balancer.gamma = gamma
                self.balancer.update(counts)
            self.step += 1
            self.tokens += self.run.tokens_per_step
            dt = time.perf_counter() - t0
            tps = self.run.tokens_per_step / dt
            if self.peak is None:
                self.peak = float(sum(self.group.call("peak_flops")))
            mv = maxvio(counts.double())
            bias = self.balancer.bias
            m: dict[str, Any] = {
                "train/loss": r0["loss"], "train/main_loss": r0["main_loss"], "train/mtp_loss": r0["mtp_loss"],
                "train/aux_loss": r0["aux_loss"], "train/lr": lr, "train/grad_norm": r0["grad_norm"],
                "train/tokens": self.tokens, "train/skipped": int(r0["skipped"]),
                "perf/tokens_per_s": tps, "perf/step_s": dt, "perf/mfu": tps * self.flops_per_token / self.peak,
                "balance/maxvio_batch": float(mv.mean()), "balance/bias_std": float(bias.std(dim=1).mean()),
                "balance/gamma": gamma,
            }
            for layer in range(counts.shape[0]):
                m[f"balance/maxvio_batch/layer_{layer}"] = float(mv[layer])
            if self.step % self.run.balance.histogram_every == 0 or self.step == stop_at:
                m["balance/counts"] = counts.tolist()
                m["balance/bias"] = bias.tolist()
            if self.step % tc.eval_every == 0 or self.step == tc.steps:
                self._set_status(phase="eval")
                m.update(self.evaluate())
            self.history.append({k: v for k, v in m.items() if not isinstance(v, list)})
            self.logger.log(m, step=self.step)
            self._set_status(phase="train", step=self.step, loss=r0["loss"], tokens_per_s=tps,
                             maxvio=float(mv.mean()))
            if self.step % tc.checkpoint_every == 0 or self.step == stop_at:
                self.save_checkpoint()
        # replicas hold the bias they last routed with; give them the final one (export, inspection, serving)
        self.group.call("set_biases", [(self.balancer.bias.clone(),)] * self.group.size)
        wall = time.perf_counter() - t_start
        summary = self.summary(wall, self.tokens - tokens_at_start, finished=self.step >= tc.steps)
        if summary["finished"] and tc.export_hf:
            summary["hf_export"] = self.export_hf(str(self.run_dir / "hf"))
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self.logger.summary(summary)
        self._set_status(phase="done", step=self.step)
        return summary

    def export_hf(self, path: str) -> str:
        """Write the model (DP rank 0, with the balancer's current biases) as a HF DeepseekV3 checkpoint."""
        return self.group.call("export_hf", [(path, self.balancer.bias.clone())], ranks=[0])[0]

    def summary(self, wall: float, tokens_run: int, finished: bool) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        return {
            "run_dir": str(self.run_dir),
            "finished": finished,
            "steps": self.step,
            "tokens": self.tokens,
            "final_train_loss": last.get("train/loss"),
            "final_mtp_loss": last.get("train/mtp_loss"),
            "val_loss": self.last_eval.get("val/loss"),
            "maxvio_global": self.last_eval.get("balance/maxvio_global"),
            "maxvio_batch": last.get("balance/maxvio_batch"),
            "tokens_per_s": (tokens_run / wall) if wall > 0 else None,
            "checkpoint": str(self.last_ckpt) if self.last_ckpt else None,
            "resumed_from": self.resumed_from,
            "wandb_dir": self.logger.wandb_dir,
            "metrics_file": str(self.logger.jsonl_path),
            "hf_export": None,  # set by run_loop when a finished run is exported (train.export_hf)
            "losses": [h["train/loss"] for h in self.history],
        }

    def close(self) -> None:
        self.logger.finish()


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj
