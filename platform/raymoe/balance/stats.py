"""Expert-load statistics: MaxVio (batch and global) and the spread of the balancing biases.

MaxVio (Wang et al. 2024, "Loss-Free Balancing", docs/balance.md §4) measures how far the most loaded expert is
above perfect balance::

    MaxVio = (max_i Load_i − mean_i Load_i) / mean_i Load_i

where the mean is the per-expert load under perfect balance (total routed tokens·k / E). ``[2, 1, 1, 0]`` → 1.0;
perfect balance → 0; all tokens on one expert → E − 1 with top-1, E/k − 1 with top-k.

* **MaxVio_batch**: computed from each training batch's counts (one optimizer step, all micro-batches and ranks),
  then averaged over batches. It cannot go below the sampling noise of the batch: with m tokens per expert the max
  over E experts sits about 3/√m above the mean (≈ 0.19 for m = 256).
* **MaxVio_global**: computed once from the counts summed over a whole evaluation set.

Both are per MoE layer; papers report the average over layers (``summary()`` does that). A layer that routed no
token has MaxVio 0 by convention (there is nothing to balance), never NaN.
"""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["maxvio", "LoadStats", "bias_spread"]


def maxvio(counts: torch.Tensor) -> torch.Tensor:
    """Per-layer MaxVio of expert loads.

    Args:
        counts: ``[..., E]`` tokens routed to each expert (any numeric dtype), typically ``[L, E]``.
    Returns:
        ``[...]`` (e.g. ``[L]``): ``(max − mean) / mean`` over the last dim; float64 for integer input, else the
        input dtype; 0 where the layer routed nothing.

    Example::

        >>> maxvio(torch.tensor([[2, 1, 1, 0], [1, 1, 1, 1]]))
        tensor([1., 0.], dtype=torch.float64)
    """
    if counts.dim() == 0 or counts.shape[-1] == 0:
        raise ValueError(f"counts must have an expert dimension, got shape {tuple(counts.shape)}")
    c = counts if counts.is_floating_point() else counts.to(torch.float64)
    mean = c.mean(dim=-1)
    mv = (c.amax(dim=-1) - mean) / mean
    return torch.where(mean > 0, mv, torch.zeros_like(mv))


class LoadStats:
    """Accumulates per-step counts ``[L, E]``: MaxVio_batch (mean over steps) and MaxVio_global (summed counts).

    Example::

        stats = LoadStats(num_layers=2, num_experts=4)
        stats.add(torch.tensor([[2, 1, 1, 0], [1, 1, 1, 1]]))   # → batch MaxVio per layer: [1.0, 0.0]
        stats.add(torch.tensor([[0, 1, 1, 2], [1, 1, 1, 1]]))
        stats.maxvio_batch()    # [1.0, 0.0]  (mean of the per-batch values)
        stats.maxvio_global()   # [0.0, 0.0]  (the two batches balance each other out)
    """

    def __init__(self, num_layers: int, num_experts: int) -> None:
        self.num_layers, self.num_experts = num_layers, num_experts
        self.reset()

    def reset(self) -> None:
        self.total = torch.zeros(self.num_layers, self.num_experts, dtype=torch.float64)
        self.batch_sum = torch.zeros(self.num_layers, dtype=torch.float64)
        self.batches = 0

    def add(self, counts: torch.Tensor) -> torch.Tensor:
        """Record one step's global counts ``[L, E]``; returns that batch's MaxVio ``[L]`` (float64)."""
        if tuple(counts.shape) != (self.num_layers, self.num_experts):
            raise ValueError(f"counts shape {tuple(counts.shape)} != [L, E] = "
                             f"[{self.num_layers}, {self.num_experts}]")
        c = counts.detach().to("cpu", torch.float64)
        mv = maxvio(c)
        self.total += c
        self.batch_sum += mv
        self.batches += 1
        return mv

    def maxvio_batch(self) -> torch.Tensor:
        """Mean over recorded steps of the per-step MaxVio, per layer ``[L]``."""
        return self.batch_sum / max(1, self.batches)

    def maxvio_global(self) -> torch.Tensor:
        """MaxVio of the counts summed over all recorded steps, per layer ``[L]``."""
        return maxvio(self.total)

    def summary(self) -> dict[str, float]:
        """Layer-averaged ``maxvio_batch`` and ``maxvio_global`` (what the papers report)."""
        return {"maxvio_batch": float(self.maxvio_batch().mean()), "maxvio_global": float(self.maxvio_global().mean()),
                "batches": float(self.batches)}

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total.clone(), "batch_sum": self.batch_sum.clone(), "batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total = state["total"].to(torch.float64).clone()
        self.batch_sum = state["batch_sum"].to(torch.float64).clone()
        self.batches = int(state["batches"])


def bias_spread(bias: torch.Tensor) -> dict[str, float]:
    """How far the balancing biases ``[L, E]`` have moved apart (only differences between experts matter).

    Returns ``bias_std`` (per-layer std over experts, averaged over layers — the ``balance/bias_std`` metric),
    ``bias_range`` (per-layer max − min, averaged), ``bias_min``, ``bias_max`` and ``bias_abs_max`` over all layers.
    """
    if bias.dim() != 2:
        raise ValueError(f"bias must be [L, E], got shape {tuple(bias.shape)}")
    b = bias.detach().to(torch.float64)
    if b.numel() == 0:
        return {"bias_std": 0.0, "bias_range": 0.0, "bias_min": 0.0, "bias_max": 0.0, "bias_abs_max": 0.0}
    std = b.std(dim=1) if b.shape[1] > 1 else torch.zeros(b.shape[0], dtype=b.dtype)
    return {
        "bias_std": float(std.mean()),
        "bias_range": float((b.amax(dim=1) - b.amin(dim=1)).mean()),
        "bias_min": float(b.min()),
        "bias_max": float(b.max()),
        "bias_abs_max": float(b.abs().max()),
    }
