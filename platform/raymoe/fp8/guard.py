"""Overflow / NaN guard for FP8 training: name the layer, skip the step.

E4M3 has no infinity and a 448 maximum, and a block scale is computed from the block itself, so an FP8 GEMM cannot
overflow on finite inputs; what it can do is propagate a non-finite *input*: one ``inf`` makes its tile's amax
``inf``, its scale ``inf`` and the whole tile ``NaN`` after quantization. Every :class:`~raymoe.fp8.FP8Linear`
(and every grouped expert GEMM) therefore records (on device, without a host sync) whether any scale it computed was non-finite, per phase
(``fprop.input``, ``weight``, ``dgrad.grad_output``, ``wgrad.operands``). At the step boundary
:meth:`FP8Guard.problems` reads all flags at once (one sync), adds a non-finite loss and, optionally, non-finite
gradients of named parameters, logs them, and the step is skipped: gradients are dropped, parameters and optimizer
state are untouched, ``skipped_steps`` counts it.

Under DeepSpeed the optimizer-side skip is DeepSpeed's own (``bf16.check_grad_overflow``, which ZeRO-1 honours; see
:mod:`raymoe.fp8.deepspeed_hooks`); the guard supplies the names and forces the skip when only the loss is bad.
"""
from __future__ import annotations

import logging
import torch
from torch import nn

from raymoe.fp8.linear import FP8LayerState

__all__ = ["FP8Guard", "NonFiniteStep"]

log = logging.getLogger("raymoe.fp8")


class NonFiniteStep(RuntimeError):
    """Raised by :meth:`FP8Guard.raise_if_bad` (for callers that prefer an exception to a skipped step)."""


class FP8Guard:
    """Per-model collector of non-finite amax flags, loss and gradient checks.

    Args:
        model: the (converted) model; FP8 layers and named parameters are looked up once.
        check_grads: also scan parameter gradients for non-finite values (one fused reduction + one sync).
    """

    def __init__(self, model: nn.Module, *, check_grads: bool = True) -> None:
        self.layers: dict[str, FP8LayerState] = {
            n: m for n, m in model.named_modules() if isinstance(m, FP8LayerState)
        }
        self.params: dict[str, nn.Parameter] = dict(model.named_parameters())
        self.check_grads = check_grads
        self.skipped_steps = 0
        self.last_problems: list[str] = []

    def problems(self, loss: torch.Tensor | float | None = None, *, grads: bool | None = None) -> list[str]:
        """Everything non-finite since the last call: ``"<layer>: non-finite amax in <phase>"``, ``"loss=nan"``,
        ``"<param>: non-finite grad"`` (``grads`` overrides ``check_grads``). Resets the layer flags."""
        out: list[str] = []
        if loss is not None:
            lv = float(loss.detach().float()) if isinstance(loss, torch.Tensor) else float(loss)
            if not torch.isfinite(torch.tensor(lv)):
                out.append(f"loss={lv}")
        for name, layer in self.layers.items():
            for phase in layer.pop_nonfinite():
                out.append(f"{layer.fp8_name or name}: non-finite amax in {phase}")
        if self.check_grads if grads is None else grads:
            named = [(n, p.grad) for n, p in self.params.items() if p.grad is not None]
            if named:
                ok = torch.stack([torch.isfinite(g).all() for _, g in named]).tolist()
                out.extend(f"{n}: non-finite grad" for (n, _), good in zip(named, ok) if not good)
        self.last_problems = out
        return out

    def report(self, problems: list[str], step: int | None = None) -> None:
        where = f" at step {step}" if step is not None else ""
        shown = "; ".join(problems[:8]) + (f"; … {len(problems) - 8} more" if len(problems) > 8 else "")
        log.warning("fp8 guard: skipping optimizer step%s: %s", where, shown)

    def raise_if_bad(self, loss: torch.Tensor | float | None = None) -> None:
        probs = self.problems(loss)
        if probs:
            raise NonFiniteStep("; ".join(probs))

    def step(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor | float | None = None,
             step: int | None = None) -> bool:
        """Apply ``optimizer.step()`` unless something is non-finite; returns whether the step was applied.

        Gradients are zeroed (set to None) when the step is skipped; on success the caller zeroes them as usual.
        """
        probs = self.problems(loss)
        if probs:
            self.report(probs, step)
            self.skipped_steps += 1
            optimizer.zero_grad(set_to_none=True)
            return False
        optimizer.step()
        return True

    def reset(self) -> None:
        for layer in self.layers.values():
            layer.pop_nonfinite()
        self.last_problems = []

