"""Process-wide count of optimizer steps: the epoch of the FP8 weight caches.

Both :mod:`raymoe.fp8.gemm` (dequantized-operand cache) and :mod:`raymoe.fp8.linear` (per-layer FP8 weight cache)
key their caches on it, so it lives here, below both (imports only torch). Every ``torch.optim.Optimizer.step`` —
including the inner optimizer DeepSpeed wraps — fires a global post-step hook, registered once when this module is
first imported, that advances the count. See "Weight cache validity" in :mod:`raymoe.fp8.linear` for why the
parameters' version counters alone are not enough.
"""
from __future__ import annotations

import torch.optim.optimizer as _torch_optimizer

__all__ = ["optimizer_step_count"]

# A one-element list, not a rebound global, so the hook and readers share it without `global`.
_OPT_STEPS = [0]


def _count_optimizer_step(*_args, **_kwargs) -> None:
    _OPT_STEPS[0] += 1


_STEP_HOOK = _torch_optimizer.register_optimizer_step_post_hook(_count_optimizer_step)


def optimizer_step_count() -> int:
    """Optimizer steps taken in this process (any ``torch.optim.Optimizer``), the weight caches' epoch."""
    return _OPT_STEPS[0]
