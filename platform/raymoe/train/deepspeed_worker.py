"""A pipeline stage replica as a plain object: model + DeepSpeed engine + data access + step execution.

``StageWorker`` is what a :class:`raymoe.actors.StageActor` wraps (the actor only adds Ray placement and
error translation), so it runs and is tested in a single process. One call per rank per step:
``run_step(plan)`` executes the micro-batches of the plan (forward, backward through DeepSpeed), all-reduces the
expert token counts and the loss statistics over the data-parallel group, applies (or vetoes) the optimizer step and
returns the step's metrics.

Data-parallel replicas form a ``torch.distributed`` process group created here (gloo on CPU, NCCL on GPU) through
``deepspeed.init_distributed``; DeepSpeed owns gradient all-reduce, ZeRO-1 optimizer sharding and clipping. The
expert-load bias is *not* trained: the coordinator computes it from the all-reduced counts and sends it with the next
plan, so every replica routes with the same bias.

Non-finite guard: a micro-batch whose loss is NaN/Inf on any replica (a MAX all-reduce of the flag keeps replicas in
agreement) makes the whole step a no-op for the optimizer (``GuardedAdamW.skip_next``), and is reported with the
step number; the FP8 amax guard (when FP8 is on) is folded into the same flag and names the offending layer.
"""
from __future__ import annotations

import logging
import os
import pathlib
import time
from typing import Any, Optional

import torch

from raymoe.config import RunConfig
from raymoe.malloc import keep_freed_memory
from raymoe.model import DeepSeekV3
from raymoe.optim import GuardedAdamW, deepspeed_config, param_groups

__all__ = ["StageWorker", "measure_matmul_peak"]

log = logging.getLogger(__name__)


def measure_matmul_peak(dtype: torch.dtype, n: int = 1024, iters: int = 3) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


class StageWorker:
    """One data-parallel replica of stage 0 (PP=1 for now; the stage index is carried for PP>1)."""

    def __init__(
        self,
        run: RunConfig,
        dp_rank: int,
        master_addr: str,
        master_port: int,
        threads: Optional[int] = None,
        stage: int = 0,
    ) -> None:
        self.run, self.dp_rank, self.stage = run, dp_rank, stage
        keep_freed_memory()  # big CPU tensors stop paying page faults (raymoe.malloc)
        self.dp = run.parallel.dp
        if threads:
            torch.set_num_threads(threads)
        os.environ.update(
            RANK=str(dp_rank), LOCAL_RANK=str(dp_rank) if torch.cuda.is_available() else "0", WORLD_SIZE=str(self.dp),
            MASTER_ADDR=master_addr, MASTER_PORT=str(master_port),
        )
        os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
        import deepspeed  # heavy import: only in the process that owns an engine

        backend = run.parallel.backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if not torch.distributed.is_initialized():
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
        self.group = torch.distributed.group.WORLD

        from raymoe.data import open_datasets  # local import keeps raymoe.stage importable without data deps

        self.train_ds, self.val_ds = open_datasets(run)

        torch.manual_seed(run.train.seed)  # identical initial weights on every replica
        model = DeepSeekV3(run.model)
        self.fp8_guard = None
        if run.fp8.enabled:  # the DeepSpeed FP8 hook: swap Linears before deepspeed.initialize (params are shared)
            from raymoe.fp8 import FP8Guard, convert_to_fp8

            convert_to_fp8(model, config=run.fp8)
            self.fp8_guard = FP8Guard(model, check_grads=False)
        self.model_ref = model
        tc = run.train
        self.optimizer = GuardedAdamW(
            param_groups(model, tc.weight_decay), lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps
        )
        ds_cfg = deepspeed_config(
            tc.micro_batch_size, tc.num_microbatches, tc.grad_clip, run.parallel.zero_stage, tc.dtype == "bfloat16"
        )
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=ds_cfg)
        self._peak = measure_matmul_peak(torch.bfloat16 if tc.dtype == "bfloat16" else torch.float32)
        torch.manual_seed(run.train.seed + 1000 + dp_rank)  # per-replica stream for anything stochastic

    # ------------------------------------------------------------------ helpers
    def peak_flops(self) -> float:
        """Matmul FLOP/s of this replica's dtype, measured at start-up (the MFU denominator)."""
        return self._peak

    @property
    def model(self) -> DeepSeekV3:
        return self.engine.module

    def _allreduce(self, t: torch.Tensor, op=torch.distributed.ReduceOp.SUM) -> torch.Tensor:
        if self.dp > 1:
            torch.distributed.all_reduce(t, op=op, group=self.group)
        return t

    def set_biases(self, biases: torch.Tensor) -> None:
        self.model.set_expert_biases(biases)

    def get_biases(self) -> torch.Tensor:
        return self.model.expert_biases()

    def bias_in_optimizer(self) -> bool:
        bias_ids = {id(r.expert_bias) for r in self.model.routers()}
        return any(id(p) in bias_ids for g in self.optimizer.param_groups for p in g["params"])

    def _set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        for g in getattr(self.engine.optimizer, "param_groups", []):
            g["lr"] = lr

    def _fp8_bad_layers(self) -> list[str]:
        """Non-finite amax events of FP8 layers since the last step (``"<layer>: non-finite amax in <phase>"``)."""
        return self.fp8_guard.problems() if self.fp8_guard is not None else []

    # ------------------------------------------------------------------ step
    def run_step(self, plan: dict[str, Any]) -> dict[str, Any]:
        """Execute one optimizer step. ``plan``: step, lr, mtp_lambda, biases [L,E] (optional), microbatches
        (list of sample-id lists for this replica)."""
        t0 = time.perf_counter()
        if plan.get("biases") is not None:
            self.set_biases(plan["biases"])
        self._set_lr(plan["lr"])
        self.engine.train()
        cfg = self.run.model
        counts = torch.zeros(cfg.num_router_layers, cfg.n_routed_experts, dtype=torch.long)
        sums = torch.zeros(5, dtype=torch.float64)  # loss, main, mtp, aux, n_microbatches
        bad = torch.zeros(1)
        mbs = plan["microbatches"]
        for i, ids in enumerate(mbs):
            x, y = self.train_ds.batch(ids)
            out = self.engine(x, labels=y, mtp_weight=plan["mtp_lambda"])
            loss = out.loss
            if not torch.isfinite(loss.detach()):
                bad.fill_(1)
            self.engine.backward(loss)
            counts += out.expert_counts
            parts = [loss, out.main_loss, out.mtp_loss, out.aux_loss]
            sums += torch.tensor([float(t.detach()) if t is not None else 0.0 for t in parts] + [1.0],
                                 dtype=torch.float64)
            if i < len(mbs) - 1:
                self.engine.step()
        bad_layers = self._fp8_bad_layers()
        if bad_layers:
            bad.fill_(1)
        self._allreduce(bad, torch.distributed.ReduceOp.MAX)
        skipped = bool(bad.item())
        if skipped:
            self.optimizer.skip_next = True
        self.engine.step()
        self._allreduce(counts)
        self._allreduce(sums)
        n = sums[4].item()
        gn = self.engine.get_global_grad_norm()
        gn = float(gn) if gn is not None else float("nan")
        return {
            "step": plan["step"],
            "loss": sums[0].item() / n,
            "main_loss": sums[1].item() / n,
            "mtp_loss": sums[2].item() / n,
            "aux_loss": sums[3].item() / n,
            "counts": counts,
            "grad_norm": gn,
            "skipped": skipped,
            "nonfinite_layers": bad_layers,
            "compute_s": time.perf_counter() - t0,
            "dp_rank": self.dp_rank,
        }

    @torch.no_grad()
    def evaluate(self, batches: list[list[int]]) -> dict[str, Any]:
        """Validation loss (main, mtp) and summed expert counts over the given validation sample-id batches."""
        self.engine.eval()
        cfg = self.run.model
        counts = torch.zeros(cfg.num_router_layers, cfg.n_routed_experts, dtype=torch.long)
        main = mtp = 0.0
        for ids in batches:
            x, y = self.val_ds.batch(ids)
            out = self.model(x, labels=y)
            main += out.main_loss.item()
            mtp += out.mtp_losses[0].item() if out.mtp_losses else 0.0
            counts += out.expert_counts
        n = max(1, len(batches))
        self.engine.train()
        return {"val_loss": main / n, "val_mtp_loss": mtp / n, "counts": counts}

    # ------------------------------------------------------------------ checkpoint
    def save(self, ckpt_dir: str) -> None:
        """Collective over the DP group: DeepSpeed engine files + this replica's RNG state."""
        d = pathlib.Path(ckpt_dir) / f"stage{self.stage}"
        d.mkdir(parents=True, exist_ok=True)
        self.engine.save_checkpoint(str(d), tag="engine", save_latest=False)
        torch.save({"torch": torch.get_rng_state()}, d / f"rng_dp{self.dp_rank}.pt")

    def load(self, ckpt_dir: str) -> None:
        d = pathlib.Path(ckpt_dir) / f"stage{self.stage}"
        path, _ = self.engine.load_checkpoint(str(d), tag="engine", load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load {d}/engine")
        rng = torch.load(d / f"rng_dp{self.dp_rank}.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
        if self.fp8_guard is not None:
            from raymoe.fp8 import invalidate_weight_caches

            invalidate_weight_caches(self.model)  # weights changed behind the FP8 per-step weight cache

    def export_hf(self, path: str, biases: Optional[torch.Tensor] = None) -> str:
        from raymoe.model import hf

        if biases is not None:
            self.set_biases(biases)
        model = self.model
        if any(p.dtype != torch.float32 for p in model.parameters()):
            import copy

            model = copy.deepcopy(model).float()
        hf.save(model, path)
        return path

    def state_fingerprint(self) -> float:
        """Sum of all parameters (for tests: replicas must hold identical weights)."""
        return float(sum(p.detach().double().sum() for p in self.model.parameters()))

    def close(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
