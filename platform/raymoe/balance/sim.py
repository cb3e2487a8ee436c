"""Toy simulation of auxiliary-loss-free balancing on a frozen, skewed router (docs/balance.md §5).

Setup (all from one seed): router weight ``W ~ N(0, 1/d)`` ``[d, E]`` and a per-expert skew ``~ N(0, 1)`` ``[E]``
are drawn once and never trained; each step draws fresh tokens ``x ~ N(0, 1)`` ``[T, d]``, routes them with the
real router (:func:`raymoe.model.moe.route`: sigmoid scores, bias for the choice only, group-limited top-k) on
logits ``x·W + skew``, counts tokens per expert and applies the bias update. Because the router is frozen, the
only thing that can balance the load is the bias, so the curve of MaxVio_batch over steps isolates the update rule.

With the defaults (E = 256, top-8, 8 groups keep 4, d = 64, T = 8192, seed 0) MaxVio_batch starts near 20 (the
skew sends most tokens to a few experts); γ = 1e-3 (sign) brings it to ≈ 0.2 — the sampling-noise floor
3/√m for m = 256 tokens per expert — within 300–500 steps; γ = 1e-2 gets there in ~50 steps but then oscillates
around 0.7–1.3 because each step over-corrects; γ = 1e-4 is still above 9 after 1000 steps (docs/balance.md §5).

Several runs (different γ or rules) share the same token stream, so their curves differ only by the rule.
Cost: one ``route`` call per run per step (~20–50 ms at T = 8192 on one CPU core, dominated by ``topk``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from raymoe.balance.bias import update_bias
from raymoe.balance.stats import maxvio

__all__ = ["SimRun", "simulate_frozen_router"]


@dataclass
class SimRun:
    """One simulated balancing run: its settings, MaxVio_batch per step (before that step's update), final bias."""

    gamma: float
    rule: str
    steps: int
    maxvio_batch: list[float] = field(default_factory=list)  # [steps + 1]: step 0 = unbiased router
    bias: Optional[torch.Tensor] = None  # [E] fp32 after the last update
    maxvio_global: Optional[float] = None  # on held-out tokens with the final bias (if eval_tokens > 0)

    def first_step_below(self, threshold: float, window: int = 1) -> Optional[int]:
        """First step whose trailing ``window``-step mean of MaxVio_batch is below ``threshold`` (None if never)."""
        mv = self.maxvio_batch
        for s in range(window - 1, len(mv)):
            if sum(mv[s - window + 1 : s + 1]) / window < threshold:
                return s
        return None


def simulate_frozen_router(
    gammas: Sequence[float],
    steps: int | Sequence[int],
    rule: str | Sequence[str] = "sign",
    *,
    num_experts: int = 256,
    top_k: int = 8,
    n_group: int = 8,
    topk_group: int = 4,
    dim: int = 64,
    tokens_per_step: int = 8192,
    eval_tokens: int = 0,
    seed: int = 0,
) -> list[SimRun]:
    """Run one balancing simulation per ``gammas[i]`` on a shared token stream.

    Args:
        gammas: update speed of each run.
        steps: number of updates of each run (one int for all, or one per run).
        rule: ``"sign"`` or ``"proportional"`` (one for all, or one per run).
        num_experts, top_k, n_group, topk_group: router shape (V3: 256, 8, 8, 4).
        dim: token dimension ``d``; tokens_per_step: ``T`` tokens routed per step.
        eval_tokens: held-out tokens for MaxVio_global with each run's final bias (0 = skip).
        seed: seeds the router, the skew and both token streams.
    Returns:
        One :class:`SimRun` per γ, with ``maxvio_batch[s]`` for ``s = 0..steps``.
    """
    from raymoe.model.moe import route  # the real router; imported lazily to keep raymoe.balance light

    n = len(gammas)
    steps_l = [steps] * n if isinstance(steps, int) else list(steps)
    rules = [rule] * n if isinstance(rule, str) else list(rule)
    if len(steps_l) != n or len(rules) != n:
        raise ValueError("steps and rule must be scalars or have one entry per gamma")
    gen = torch.Generator().manual_seed(seed)
    W_DE = torch.randn(dim, num_experts, generator=gen) / math.sqrt(dim)
    skew_E = torch.randn(num_experts, generator=gen)
    biases = [torch.zeros(1, num_experts) for _ in range(n)]
    runs = [SimRun(g, r, s) for g, r, s in zip(gammas, rules, steps_l)]

    def counts_of(logits_TE: torch.Tensor, bias_1E: torch.Tensor) -> torch.Tensor:
        res = route(logits_TE, bias_1E[0], n_group, topk_group, top_k, 1.0)
        return res.counts.reshape(1, num_experts)

    for step in range(max(steps_l) + 1):
        x_TD = torch.randn(tokens_per_step, dim, generator=gen)
        logits_TE = x_TD @ W_DE + skew_E
        for run, bias in zip(runs, biases):
            if step > run.steps:
                continue
            c_1E = counts_of(logits_TE, bias)
            run.maxvio_batch.append(float(maxvio(c_1E)[0]))
            if step < run.steps:
                update_bias(bias, c_1E, run.gamma, run.rule)
    for run, bias in zip(runs, biases):
        run.bias = bias[0].clone()

    if eval_tokens > 0:
        eval_gen = torch.Generator().manual_seed(seed + 1)
        totals = [torch.zeros(1, num_experts, dtype=torch.long) for _ in runs]
        for start in range(0, eval_tokens, tokens_per_step):
            x_TD = torch.randn(min(tokens_per_step, eval_tokens - start), dim, generator=eval_gen)
            logits_TE = x_TD @ W_DE + skew_E
            for total, bias in zip(totals, biases):
                total += counts_of(logits_TE, bias)
        for run, total in zip(runs, totals):
            run.maxvio_global = float(maxvio(total)[0])
    return runs
