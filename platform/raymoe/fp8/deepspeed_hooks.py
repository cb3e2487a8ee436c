"""DeepSpeed path for FP8 training: bf16 + ZeRO-1 engine with FP8 Linears swapped in before ``deepspeed.initialize``.

Order (the only supported one)::

    model = build_model(cfg)                    # plain bf16/fp32 nn.Module
    model = fp8_pre_initialize(model, fp8_cfg)  # the hook: swap nn.Linear → FP8Linear (parameters are shared)
    engine = deepspeed.initialize(model, optimizer, ds_config(...))   # bf16 module copy, fp32 master, ZeRO-1

``FP8Linear`` keeps ``nn.Linear``'s parameter names, so the DeepSpeed checkpoint of an FP8 model is the checkpoint of
the BF16 model; only the GEMMs change. Master weights and Adam moments stay fp32 in DeepSpeed's ZeRO-1 optimizer.

What DeepSpeed 0.19.8 does on this CPU (gloo, no oneCCL/IPEX; checked by ``tests/unit/test_fp8_deepspeed.py``)
    Works, for real, single-process and 2-rank gloo:
      * ``bf16`` + ZeRO stage 1 (``DeepSpeedZeroOptimizer``) with a client ``torch.optim.AdamW`` — the engine casts the
        module to bf16, keeps fp32 master partitions sharded over the DP group, all-reduces grads over gloo;
      * ``gradient_clipping`` (global-norm clipping inside ZeRO; ``engine.get_global_grad_norm()`` reports it);
      * ``bf16.check_grad_overflow`` (default true): a non-finite gradient makes ZeRO-1 drop the step and clear the
        grads; ``engine.was_step_applied()`` is False and ``engine.skipped_steps`` counts it;
      * ``save_checkpoint``/``load_checkpoint`` (model + ZeRO optimizer states, ``bf16_zero_pp_rank_*`` files);
      * ``managed_gradient_accumulation: false``: ``backward`` only accumulates locally, ``step()`` reduces and
        updates. That is what the deferred weight-gradient mode needs — queued Wgrads are flushed into ``.grad`` after
        the last ``Bi`` and before ``step()``; the result is bit-identical to immediate Wgrad. With the default managed
        mode ZeRO's reduction epilogue runs at the end of each ``engine.backward`` and a later flush is *not* reduced
        (measured: different grad norm), so :func:`ds_config` turns managed accumulation off.
      * Deferred Wgrad under ZeRO-2 (``zero_stage=2``), via :func:`attach_wgrad_store` (done by :func:`initialize`
        when given a store). ZeRO-2 moves every gradient into its partition from a post-accumulate-grad hook. Three
        things make a deferred ``W`` land there exactly once (deferred == immediate bit for bit,
        tests/unit/test_wgrad.py): the store adds gradients through autograd (:func:`raymoe.wgrad.accumulate_grads`),
        so the hook fires; during ``Bi`` autograd still fires it with ``param.grad is None``, which ZeRO-2 cannot
        reduce, so the store marks parked parameters ``ds_grad_is_ready = False`` (DeepSpeed's "not final yet")
        until their ``W``; and a ``W`` runs outside ``engine.backward``, where nothing runs ZeRO's reduction epilogue
        (the bucket kept the grads and the next backward failed), so a run hook on the store runs it after each cell.
    Does not work / not used here, and the fallback:
      * BF16 Adam moments (paper §3.3.3): DeepSpeed only offers ``bf16_optimizer_states`` together with
        ``bf16_master_weights_and_grads`` (bf16 master weights), which the recipe forbids. Fallback: fp32 moments
        (2× the optimizer-state memory of the paper, numerically at least as good).
      * DeepSpeed's own FP8 (``fp_quantizer`` op, TransformerEngine integration): CUDA-only op builders, absent from
        the CPU accelerator's op list. Fallback: our :class:`~raymoe.fp8.FP8Linear`, which is all torch on CPU.
      * A config-declared optimizer without ``torch_adam`` or ``offload_optimizer``: JIT-builds ``cpu_adam`` (~45 s the
        first time). Fallback: pass a client ``torch.optim.AdamW`` (what :func:`initialize` expects).
      * NVMe offload: no libaio on this machine. Not needed.
      * oneCCL backend: not installed; DeepSpeed falls back to gloo by itself.

Weight caches: ZeRO writes the updated bf16 weights through its flat buffers, which bumps no version counter of the
parameters; FP8Linear's per-step weight cache is therefore keyed on a process-wide optimizer-step count as well (see
:mod:`raymoe.fp8.linear`), :func:`train_step` drops the caches at the start of each step, and :func:`load_checkpoint`
after loading.

Non-finite steps: :func:`train_step` asks :class:`~raymoe.fp8.FP8Guard` after each forward; when a loss or an amax is
non-finite it back-propagates ``loss · NaN`` instead, so the gradients are NaN and DeepSpeed's own overflow path
skips the step (it also clears the ZeRO buffers correctly, which user code should not touch). The guard's report
names the layer and phase.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from raymoe.fp8.config import FP8Config
from raymoe.fp8.guard import FP8Guard
from raymoe.fp8.linear import convert_to_fp8, invalidate_weight_caches
from raymoe.wgrad import WeightGradStore

__all__ = [
    "init_deepspeed_dist",
    "attach_wgrad_store",
    "ds_config",
    "fp8_pre_initialize",
    "initialize",
    "train_step",
    "load_checkpoint",
    "StepReport",
    "init_single_process_dist",
]

log = logging.getLogger("raymoe.fp8")


def ds_config(*, micro_batch_size: int, grad_accum: int = 1, zero_stage: int = 1, grad_clip: float = 1.0,
              bf16: bool = True, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """DeepSpeed config for the FP8 recipe: bf16 + ZeRO-``zero_stage``, overflow check on, unmanaged accumulation.

    ``train_micro_batch_size_per_gpu`` × ``gradient_accumulation_steps`` is only used for DeepSpeed's bookkeeping
    (samples/s); with unmanaged accumulation every ``engine.step()`` is a boundary.
    """
    if zero_stage not in (0, 1, 2):
        raise ValueError(f"zero_stage={zero_stage}: the FP8 path supports ZeRO 0–2 (stage 3 partitions the weights "
                         "FP8Linear caches per step)")
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "managed_gradient_accumulation": False,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": bf16, "check_grad_overflow": True},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    for k, v in (extra or {}).items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return cfg


def fp8_pre_initialize(model: nn.Module, fp8: FP8Config, *, filter: Callable[[str, nn.Linear], bool] | None = None,
                       wgrad_store: WeightGradStore | None = None) -> nn.Module:
    """The hook the training stack runs right before ``deepspeed.initialize``: swap Linears when ``fp8.enabled``."""
    if not fp8.enabled:
        return model
    return convert_to_fp8(model, filter, config=fp8, wgrad_store=wgrad_store)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_deepspeed_dist(backend: str, **kwargs: Any) -> None:
    """``deepspeed.init_distributed`` without DeepSpeed's CPU shared-memory all-reduce op.

    On its CPU accelerator DeepSpeed JIT-compiles the ``deepspeed_shm_comm`` op (ninja, ~65 s on 2 cores) when it
    first initializes, into ``~/.cache/torch_extensions/<py>_cpu/deepspeed_shm_comm`` — keyed by name only, with the
    venv's absolute paths in its ``build.ninja``, so any other checkout rebuilds it. DeepSpeed uses the op only in
    ``inference_all_reduce``; training reductions (ours and ZeRO's) are ``torch.distributed`` collectives, so the op
    is marked incompatible here and never built."""
    import deepspeed
    import deepspeed.ops

    try:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except (AttributeError, TypeError):  # another DeepSpeed layout: it builds the op as before, nothing else changes
        pass
    deepspeed.init_distributed(dist_backend=backend, **kwargs)


def init_single_process_dist(port: int | None = None) -> None:
    """World of one over gloo (tests, single-process runs): sets the env DeepSpeed reads, then initializes."""
    if torch.distributed.is_initialized():
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port or _free_port()))
    init_deepspeed_dist("gloo")


def initialize(model: nn.Module, optimizer: torch.optim.Optimizer | Callable[[Iterable[nn.Parameter]], Any],
               config: dict[str, Any], *, fp8: FP8Config | None = None,
               filter: Callable[[str, nn.Linear], bool] | None = None, wgrad_store: WeightGradStore | None = None,
               **ds_kwargs: Any):
    """Swap in FP8 (if enabled), then ``deepspeed.initialize``. ``torch.distributed`` must already be initialized
    (gloo on CPU; :func:`init_single_process_dist` for one process).

    Args:
        optimizer: a torch optimizer over ``model``'s parameters, or a factory ``params -> optimizer`` (called after
            the swap; parameters are shared so either works).
        config: DeepSpeed config, usually from :func:`ds_config`.
        wgrad_store: the store deferred weight grads go to (see :func:`train_step`); attached to the engine with
            :func:`attach_wgrad_store`. With ``fp8`` it is also recorded on the FP8 layers.
        ds_kwargs: forwarded to ``deepspeed.initialize`` (e.g. ``mpu`` to give ZeRO the data-parallel group).

    Returns:
        ``(engine, guard)`` — the guard covers the engine's module.
    """
    import deepspeed

    if not torch.distributed.is_initialized():
        raise RuntimeError("torch.distributed is not initialized; call deepspeed.init_distributed('gloo') "
                           "(or raymoe.fp8.deepspeed_hooks.init_single_process_dist()) first")
    if fp8 is not None:
        model = fp8_pre_initialize(model, fp8, filter=filter, wgrad_store=wgrad_store)
    opt = optimizer if isinstance(optimizer, torch.optim.Optimizer) else optimizer(model.parameters())
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config, **ds_kwargs)
    if wgrad_store is not None:
        attach_wgrad_store(engine, wgrad_store)
    return engine, FP8Guard(engine.module)


def _end_deferred_backward(engine: Any) -> None:
    """After a deferred ``W`` (outside ``engine.backward``): leave the backward context the ZeRO gradient hooks
    re-entered and, under ZeRO-2, run the reduction epilogue ``engine.backward`` runs at its end."""
    opt = engine.optimizer
    if not hasattr(opt, "exit_backward"):  # not a ZeRO optimizer: nothing is pending
        return
    while getattr(opt, "_backward_active_depth", 0) > 0:
        opt.exit_backward()
    if engine.zero_optimization_partition_gradients():
        opt.overlapping_partition_gradients_reduce_epilogue()


def attach_wgrad_store(engine: Any, store: WeightGradStore):
    """Make every ``W`` of ``store`` (``run``/``pop``/``flush``) correct for ``engine`` (see the module docstring):
    after each cell's deferred grads are in, finish the backward for ZeRO. Returns the hook's removable handle.

    With a data-parallel group every rank must run its ``W`` cells in the same order (ZeRO-2 reduces per cell).
    """
    return store.register_run_hook(lambda _cell: _end_deferred_backward(engine))


def load_checkpoint(engine: Any, load_dir: str, tag: str | None = None, **kwargs: Any) -> Any:
    """``engine.load_checkpoint`` followed by dropping the FP8 weight caches (the loaded weights may arrive through
    DeepSpeed's flat buffers, which bump no version counter)."""
    out = engine.load_checkpoint(load_dir, tag=tag, **kwargs)
    invalidate_weight_caches(engine.module)
    return out


@dataclass
class StepReport:
    loss: float
    applied: bool
    grad_norm: float | None
    problems: list[str] = field(default_factory=list)


def train_step(engine: Any, micro_batches: Iterable[Any], loss_fn: Callable[[Any, Any], torch.Tensor],
               guard: FP8Guard, *, wgrad_store: WeightGradStore | None = None) -> StepReport:
    """One optimizer step over ``micro_batches`` (unmanaged gradient accumulation, see module docstring).

    ``loss_fn(engine, micro_batch) -> scalar loss``. Wgrads are deferred into ``wgrad_store`` (if given; attach it to
    the engine first, as :func:`initialize` does) during each backward and flushed before ``engine.step()`` — the same
    dataflow a zero-bubble pipeline stage uses.
    """
    problems: list[str] = []
    losses: list[float] = []
    invalidate_weight_caches(engine.module)  # belt and braces: the optimizer-step hook already covers ZeRO updates
    for mb in micro_batches:
        loss = loss_fn(engine, mb)
        fwd = guard.problems(loss, grads=False)
        losses.append(float(loss.detach().float()))
        if fwd:
            problems.extend(fwd)
            loss = loss * float("nan")  # poison: DeepSpeed's overflow check drops the whole step
        if wgrad_store is not None:
            with wgrad_store.defer():
                engine.backward(loss)
        else:
            engine.backward(loss)
    if wgrad_store is not None:
        wgrad_store.flush()
    problems.extend(guard.problems())
    engine.step()
    applied = bool(engine.was_step_applied())
    if problems:
        guard.report(problems, step=engine.global_steps)
        guard.skipped_steps += 1
        if applied:
            log.error("fp8 guard: DeepSpeed applied a step the guard flagged: %s", problems)
    gn = engine.get_global_grad_norm()
    gn = None if gn is None else float(gn)
    mean_loss = sum(losses) / max(len(losses), 1)
    return StepReport(loss=mean_loss, applied=applied, grad_norm=gn, problems=problems)
