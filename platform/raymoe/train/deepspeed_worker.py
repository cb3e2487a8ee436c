"""The DeepSpeed ZeRO-1 data-parallel worker (``parallel.dp_impl=deepspeed``; layouts with pp = ep = 1).

``StageWorker`` holds the whole model in a DeepSpeed engine; it is the default for pure data parallelism, where
ZeRO-1 shards the optimizer state over the replicas. Pipeline and expert parallel layouts run on
:class:`raymoe.train.worker.PipelineWorker` instead. Both answer the same typed calls (``step(StepPlan) ->
StepResult``, ``evaluate(EvalPlan) -> EvalResult``, ``save``, ``load``), so the controller and the actors do not
care which one runs. One call per rank per step: ``step(plan)`` executes the micro-batches of the plan (forward, backward through DeepSpeed), all-reduces the
expert token counts and the loss statistics over the data-parallel group, applies (or vetoes) the optimizer step and
returns the step's metrics.

Data-parallel replicas form a ``torch.distributed`` process group created here (gloo on CPU, NCCL on GPU) through
``deepspeed.init_distributed``; DeepSpeed owns gradient all-reduce, ZeRO-1 optimizer sharding and clipping. The
expert-load bias is *not* trained: the coordinator computes it from the all-reduced counts and sends it with the next
plan, so every replica routes with the same bias.

Non-finite guard: a micro-batch whose loss is NaN/Inf on any replica (a MAX all-reduce of the flag keeps replicas in
agreement) makes the whole step a no-op for the optimizer (:meth:`StageWorker._engine_step`), and is reported with the
step number; the FP8 amax guard (when FP8 is on) is folded into the same flag and names the offending layer.

Checkpoint loading never executes code from the checkpoint: DeepSpeed's engine files are torch pickles, and its
checkpoint engine loads them with ``weights_only=False``. The worker replaces the engine's ``checkpoint_engine.load``
with :func:`safe_torch_load` (``weights_only=True`` plus the three DeepSpeed classes those files legitimately hold,
see ``_deepspeed_safe_globals``); the RNG file is loaded the same way. A file that holds anything else (a pickled
callable, an unknown class) or is not a torch file raises :class:`raymoe.checkpoint.CheckpointCorrupt` naming it.
"""
from __future__ import annotations

import logging
import os
import pathlib
import time
from typing import Any, Optional

import torch

from raymoe.checkpoint import CheckpointCorrupt
from raymoe.config import RunConfig
from raymoe.malloc import keep_freed_memory
from raymoe.model import DeepSeekV3
from raymoe.model.recompute import set_recompute
from raymoe.model.transformer import mtp_greedy_acceptance
from raymoe.optim import GuardedAdamW, deepspeed_config, param_groups
from raymoe.train.plans import EvalPlan, EvalResult, LossSums, StepPlan, StepResult
from raymoe.train.worker import measure_matmul_peak

__all__ = ["StageWorker", "safe_torch_load"]

log = logging.getLogger(__name__)


def _deepspeed_safe_globals() -> list[Any]:
    """The non-tensor classes DeepSpeed 0.19 pickles into its engine checkpoint files, all in the ZeRO (stage 1 and 2)
    ``*optim_states.pt`` file's ``optimizer_state_dict`` (found by loading the files of every ``zero_stage`` x
    ``bf16`` setting of :func:`raymoe.optim.deepspeed_config` with ``weights_only=True``):

    * ``ZeroStageEnum`` (``zero_stage``), an ``IntEnum``;
    * ``LossScaler`` (``loss_scaler``; the static scaler, kept even for fp32/bf16), plain attributes only;
    * ``fragment_address`` (``param_slice_mappings`` values), a dataclass of two ints.

    The ``mp_rank_*_model_states.pt`` files hold only tensors, containers and plain scalars. The weights-only
    unpickler only constructs these three from plain data (an enum lookup by value; ``__new__`` plus attribute state),
    so allowing them runs no code from the file.
    """
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


def safe_torch_load(path: Any, map_location: Any = None, allow: tuple[Any, ...] = ()) -> Any:
    """``torch.load(path, weights_only=True)`` with the extra classes ``allow``; any failure (a pickled callable, a
    class outside the allow list, a truncated or foreign file) raises :class:`CheckpointCorrupt` naming ``path``."""
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except OSError as e:
        raise CheckpointCorrupt(f"{path}: cannot read checkpoint file ({e.strerror or e})") from None
    except Exception as e:  # UnpicklingError, RuntimeError (not a zip / torch file), EOFError, ...
        # torch's weights-only message is many lines of advice ("set weights_only=False", "allowlist this global if
        # you trust it": exactly what must not happen here); keep only what was found.
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = next((ln for ln in lines if "WeightsUnpickler error" in ln), lines[0] if lines else "")
        why = why.split(". Please", 1)[0].removeprefix("WeightsUnpickler error: ")
        raise CheckpointCorrupt(f"{path}: refusing to load checkpoint file: it is not a plain tensor file "
                                f"({type(e).__name__}: {why[:300]})") from None


def _make_checkpoint_loads_safe(engine: Any) -> None:
    """Route every file DeepSpeed's ``load_checkpoint`` reads through :func:`safe_torch_load`.

    DeepSpeed 0.19 reads the model-states and ZeRO optimizer-states files of a (non-universal) checkpoint only through
    ``engine.checkpoint_engine.load(path, map_location=...)``; the instance attribute shadows the class method, so the
    checkpoint engine keeps its type for DeepSpeed's own checks."""
    allow = tuple(_deepspeed_safe_globals())

    def load(path: str, map_location: Any = None) -> Any:
        return safe_torch_load(path, map_location=map_location, allow=allow)

    engine.checkpoint_engine.load = load


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
            from raymoe.fp8.deepspeed_hooks import init_deepspeed_dist

            init_deepspeed_dist(backend, auto_mpi_discovery=False, verbose=False)
        self.group = torch.distributed.group.WORLD

        from raymoe.data import open_datasets  # local import keeps raymoe.stage importable without data deps

        self.train_ds, self.val_ds = open_datasets(run)

        torch.manual_seed(run.train.seed)
        model = DeepSeekV3(run.model, seed=run.train.seed)  # the native runtime's initial weights, on every replica
        if run.train.init_from:
            from raymoe.train.pretrained import load_pretrained

            load_pretrained(model, run.train.init_from)
        set_recompute(model, run.train.recompute)
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
        _make_checkpoint_loads_safe(self.engine)  # no code execution when a checkpoint is loaded (module docstring)
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
    def step(self, plan: StepPlan) -> StepResult:
        """Execute one optimizer step over this replica's micro-batches."""
        t0 = time.perf_counter()
        self.set_biases(plan.biases)
        self._set_lr(plan.lr)
        self.engine.train()
        cfg = self.run.model
        counts = torch.zeros(cfg.num_router_layers, cfg.n_routed_experts, dtype=torch.long)
        sums = torch.zeros(5, dtype=torch.float64)  # loss, main, mtp, aux, n_microbatches
        bad = torch.zeros(1)
        mbs = plan.microbatches
        for i, ids in enumerate(mbs):
            x, y = self.train_ds.batch(list(ids))
            out = self.engine(x, labels=y, mtp_weight=plan.mtp_lambda)
            loss = out.loss
            if plan.fault == "nan_loss":  # test-only fault injection
                loss = loss * float("nan")
            if not torch.isfinite(loss.detach()):
                bad.fill_(1)
            self.engine.backward(loss)
            counts += out.expert_counts
            parts = [loss, out.main_loss, out.mtp_mean_loss, out.aux_loss]  # MTP unweighted, comparable to val
            sums += torch.tensor([float(t.detach()) if t is not None else 0.0 for t in parts] + [1.0],
                                 dtype=torch.float64)
            if i < len(mbs) - 1:
                self.engine.step()
        bad_layers = self._fp8_bad_layers()
        if bad_layers:
            bad.fill_(1)
        self._allreduce(bad, torch.distributed.ReduceOp.MAX)
        skipped = bool(bad.item())
        self._engine_step(veto=skipped)
        self._allreduce(counts)
        self._allreduce(sums)
        gn = self.engine.get_global_grad_norm()
        gn = float(gn) if gn is not None else float("nan")
        dt = time.perf_counter() - t0
        return StepResult(step=plan.step, rank=self.dp_rank,
                          losses=LossSums(*(float(v) for v in sums[:4]), int(sums[4].item())),
                          counts=counts, grad_norm=gn, skipped=skipped, nonfinite=bad_layers, busy_s=dt, step_s=dt,
                          param_bytes=sum(p.numel() * p.element_size() for p in self.model.parameters()))

    def _engine_step(self, veto: bool) -> None:
        """``engine.step()`` at the accumulation boundary; ``veto``: parameters and optimizer state stay untouched.

        Not ``GuardedAdamW.skip_next`` (a one-shot veto of the next ``step()`` call), for two reasons found under
        ZeRO-1/2: ZeRO calls the base optimizer's ``step()`` once per parameter group, so a one-shot veto spares only
        the first group (the other one still steps; hit when the FP8 amax guard vetoes a step whose gradients are
        finite); and when ZeRO sees the non-finite gradient norm itself (a NaN loss) it drops the step without calling
        the base optimizer at all, so the veto stayed armed and ate the first group's update of the next, healthy
        step. Here every base-optimizer call inside this ``engine.step()`` is a no-op, and the veto ends with it.
        DeepSpeed still runs its boundary bookkeeping (gradients cleared, counters advanced).
        """
        opt = self.optimizer
        opt.skip_next = False  # never armed across steps
        if not veto:
            self.engine.step()
            return
        opt.step = lambda closure=None: None  # type: ignore[method-assign]  # shadows GuardedAdamW.step, this call only
        try:
            self.engine.step()
        finally:
            del opt.step  # type: ignore[method-assign]
        opt.skipped_steps += 1

    @torch.no_grad()
    def evaluate(self, plan: EvalPlan) -> EvalResult:
        """Validation loss (main, mtp) and summed expert counts over the plan's validation sample-id batches."""
        self.set_biases(plan.biases)
        batches = [list(b) for b in plan.batches]
        self.engine.eval()
        cfg = self.run.model
        counts = torch.zeros(cfg.num_router_layers, cfg.n_routed_experts, dtype=torch.long)
        main = mtp = 0.0
        acc = drafted = 0
        for ids in batches:
            x, y = self.val_ds.batch(ids)
            out = self.model(x, labels=y)
            main += out.main_loss.item()
            mtp += out.mtp_mean_loss.item() if out.mtp_losses else 0.0
            counts += out.expert_counts
            a, t = mtp_greedy_acceptance(out)
            acc, drafted = acc + a, drafted + t
        n = max(1, len(batches))
        self.engine.train()
        return EvalResult(val_loss=main / n, val_mtp_loss=mtp / n, counts=counts,
                          mtp_acceptance=acc / drafted if drafted else None)

    # ------------------------------------------------------------------ checkpoint
    def save(self, dest: str) -> dict[str, dict[str, Any]]:
        """Collective over the DP group: DeepSpeed engine files + this replica's RNG state, written into this rank's
        own staging directory and put under ``dest`` (local checkpoint directory or storage URI); returns
        ``{relpath: {sha256, bytes}}`` of the files this rank wrote (the ZeRO partitions differ per rank)."""
        from raymoe.storage import stage_and_put

        def write(root: pathlib.Path) -> None:
            d = root / f"stage{self.stage}"
            d.mkdir(parents=True, exist_ok=True)
            self.engine.save_checkpoint(str(d), tag="engine", save_latest=False)
            torch.save({"torch": torch.get_rng_state()}, d / f"rng_dp{self.dp_rank}.pt")

        return stage_and_put(dest, write)

    def load(self, ref: Any) -> None:
        """Restore the engine (weights, ZeRO optimizer state) and this replica's RNG from checkpoint ``ref``
        (:class:`raymoe.checkpoint.CheckpointRef`; from an object store the ``stage<i>/`` files are downloaded into
        node-local scratch first, hash-checked). Every file is loaded weights-only (:func:`safe_torch_load`), and a
        hostile or damaged file raises :class:`CheckpointCorrupt` naming it."""
        from raymoe.checkpoint import local_copy

        prefix = f"stage{self.stage}/"
        with local_copy(ref, None if ref.local else [f for f in ref.files if f.startswith(prefix)]) as root:
            self._load_dir(root / f"stage{self.stage}")

    def _load_dir(self, d: pathlib.Path) -> None:
        path, _ = self.engine.load_checkpoint(str(d), tag="engine", load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load {d}/engine")
        rng_path = d / f"rng_dp{self.dp_rank}.pt"
        rng = safe_torch_load(rng_path)
        if not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor):
            raise CheckpointCorrupt(f"{rng_path}: not an RNG state file (expected {{'torch': <uint8 tensor>}})")
        torch.set_rng_state(rng["torch"])
        if self.fp8_guard is not None:
            from raymoe.fp8 import invalidate_weight_caches

            invalidate_weight_caches(self.model)  # weights changed behind the FP8 per-step weight cache

    def export_hf(self, path: str, biases: Optional[torch.Tensor] = None) -> str:
        """Write the model as a HF checkpoint to ``path``: a local directory, or a storage URI (staged in node-local
        scratch and uploaded, so the export survives this node)."""
        from raymoe.model import hf
        from raymoe.storage import is_local, stage_and_put

        if biases is not None:
            self.set_biases(biases)
        model = self.model
        if any(p.dtype != torch.float32 for p in model.parameters()):
            import copy

            model = copy.deepcopy(model).float()
        if is_local(path):
            hf.save(model, path)
        else:
            stage_and_put(path, lambda d: hf.save(model, str(d)))
        return path

    def param_state(self) -> dict[str, torch.Tensor]:
        """Every parameter by name (tests: replicas must hold identical tensors)."""
        return {n: p.detach().cpu().clone() for n, p in self.model.named_parameters()}

    def close(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        _forget_deepspeed_groups()


def _forget_deepspeed_groups() -> None:
    """Drop DeepSpeed's module-level caches of process groups (``deepspeed.utils.groups``: the cloned world group,
    the expert / data-parallel group maps). They outlive ``destroy_process_group``, so a second engine in the same
    process (an in-process restart, a test after another) would broadcast over a group torch no longer knows
    ("Group ... is not registered")."""
    from deepspeed.utils import groups

    for name, value in list(vars(groups).items()):
        if name.startswith("_") and name.endswith(("_GROUP", "_GROUP_RANKS")) and not callable(value):
            setattr(groups, name, {} if isinstance(value, dict) else None)
