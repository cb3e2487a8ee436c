"""Auxiliary-loss-free balancing: the per-expert routing bias and its update rule (DeepSeek-V3 §2.1.2).

Every routing layer (main MoE layers and the MTP blocks' MoE layers) owns a bias ``b ∈ R^E`` (fp32, starts at 0).
The router adds it to the sigmoid scores **only to choose** the top-k experts; the gates use the unbiased scores.
Once per optimizer step, after the step, the balancer moves each bias against its expert's load::

    c̄ = mean_i c_i                      (per layer; c = tokens routed to each expert in the step)
    sign rule (V3, default):            b_i ← b_i + γ · sign(c̄ − c_i)
    proportional rule (Wang et al.):    b_i ← b_i + γ · (c̄ − c_i) / c̄

Overloaded experts lose γ, underloaded ones gain γ, exactly balanced ones keep their bias. ``c`` must be the load of
the **whole global batch**: summed over micro-batches, data-parallel ranks and expert shards (all-reduced) — the
caller's job. The update is then a pure, elementwise function of ``(b, c, γ)``: every rank that applies it to the
same all-reduced counts gets bit-identical biases, so the coordinator may compute it once and broadcast, or each
rank may compute it locally.

γ (the "bias update speed") is 1e-3 in V3 for the first 14.3T tokens and 0 for the last 500B, which freezes the
biases; ``γ = 0`` is a no-op here (the bias tensor is left untouched, not even ``+ 0.0``). Wang et al.'s Fig. 4:
γ = 1e-4 converges too slowly, 1e-2 keeps fluctuating; our toy simulation (docs/balance.md §5, reproduced in
``tests/unit/test_balance.py``) shows the same ordering.

The proportional error is normalised by c̄ (Wang et al. leave the normalisation unspecified), so γ has the same
meaning — bias change of an expert that is off by 100 % of the mean — under both rules.

The bias is a buffer, never a parameter: it receives no gradient and must stay out of the optimizer and of weight
decay. It is checkpointed (``BiasBalancer.state_dict``) and exported to HF as ``e_score_correction_bias``.
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

__all__ = [
    "RULES", "bias_delta", "update_bias", "BiasBalancer", "TokenSchedule", "V3_GAMMA", "V3_MTP_LAMBDA", "gamma_at",
]

RULES = ("sign", "proportional")


def _check_counts(counts: torch.Tensor) -> torch.Tensor:
    if counts.dim() != 2:
        raise ValueError(f"counts must be [L, E] (layers × experts), got shape {tuple(counts.shape)}")
    c = counts.detach().to("cpu", torch.float64)
    if not torch.isfinite(c).all() or (c < 0).any():
        raise ValueError("counts must be finite and non-negative")
    return c


def bias_delta(counts: torch.Tensor, gamma: float, rule: str = "sign") -> torch.Tensor:
    """The bias change for one step.

    Args:
        counts: ``[L, E]`` global tokens per expert of each routing layer in the step.
        gamma: update speed (≥ 0).
        rule: ``"sign"`` (γ·sign(c̄ − c)) or ``"proportional"`` (γ·(c̄ − c)/c̄; 0 for a layer with no tokens).
    Returns:
        ``[L, E]`` fp32 delta (computed in float64 from the counts, then rounded once).

    Example::

        >>> bias_delta(torch.tensor([[2, 1, 1, 0]]), 1e-3)
        tensor([[-0.0010,  0.0000,  0.0000,  0.0010]])
    """
    if rule not in RULES:
        raise ValueError(f"rule={rule!r}; allowed: {', '.join(RULES)}")
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    c = _check_counts(counts)
    mean = c.mean(dim=1, keepdim=True)
    if rule == "sign":
        err = torch.sign(mean - c)
    else:
        err = torch.where(mean > 0, (mean - c) / mean.clamp_min(1e-300), torch.zeros_like(c))
    return (gamma * err).to(torch.float32)


def update_bias(bias: torch.Tensor, counts: torch.Tensor, gamma: float, rule: str = "sign",
                inplace: bool = True) -> torch.Tensor:
    """Apply one balancing step to ``bias`` ``[L, E]`` (fp32) from ``counts`` ``[L, E]``.

    With ``inplace`` (default) ``bias`` is modified and returned; otherwise a new tensor is returned. ``gamma == 0``
    leaves the values bit-identical.
    """
    if bias.dtype != torch.float32:
        raise TypeError(f"bias must be float32 (the router adds it to fp32 scores), got {bias.dtype}")
    if tuple(bias.shape) != tuple(counts.shape):
        raise ValueError(f"bias shape {tuple(bias.shape)} != counts shape {tuple(counts.shape)}")
    out = bias if inplace else bias.clone()
    delta = bias_delta(counts, gamma, rule)  # validates even when gamma == 0
    if gamma == 0:
        return out
    with torch.no_grad():
        out.add_(delta.to(out.device))
    return out


class BiasBalancer:
    """Owns the biases of every routing layer ``[L, E]`` and applies the update once per optimizer step.

    The coordinator holds one; the stage replicas receive ``balancer.bias`` with the next step's plan. ``gamma``
    may be changed between steps (a schedule by tokens, :func:`gamma_at`).

    Example::

        bal = BiasBalancer(num_layers=2, num_experts=4, gamma=1e-3)
        bal.update(torch.tensor([[2, 1, 1, 0], [1, 1, 1, 1]]))
        bal.bias      # tensor([[-0.001, 0., 0., 0.001], [0., 0., 0., 0.]])
    """

    def __init__(self, num_layers: int, num_experts: int, gamma: float = 1e-3, rule: str = "sign",
                 bias: Optional[torch.Tensor] = None) -> None:
        if num_layers < 0 or num_experts < 1:
            raise ValueError(f"need num_layers >= 0 and num_experts >= 1, got {num_layers}, {num_experts}")
        if rule not in RULES:
            raise ValueError(f"rule={rule!r}; allowed: {', '.join(RULES)}")
        if not gamma >= 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.num_layers, self.num_experts = num_layers, num_experts
        self.gamma, self.rule = float(gamma), rule
        self.steps = 0
        if bias is None:
            self.bias = torch.zeros(num_layers, num_experts, dtype=torch.float32)
        else:
            if tuple(bias.shape) != (num_layers, num_experts):
                raise ValueError(f"bias shape {tuple(bias.shape)} != [{num_layers}, {num_experts}]")
            self.bias = bias.detach().to("cpu", torch.float32).clone()

    def update(self, counts: torch.Tensor) -> torch.Tensor:
        """Apply ``b ← b + γ·rule(c)`` for this step's global counts ``[L, E]``; returns the new bias (owned)."""
        if tuple(counts.shape) != (self.num_layers, self.num_experts):
            raise ValueError(f"counts shape {tuple(counts.shape)} != [L, E] = [{self.num_layers}, "
                             f"{self.num_experts}] (sum micro-batches, ranks and shards; include the MTP layers)")
        update_bias(self.bias, counts, self.gamma, self.rule, inplace=True)
        self.steps += 1
        return self.bias

    def state_dict(self) -> dict[str, Any]:
        return {"bias": self.bias.clone(), "gamma": self.gamma, "rule": self.rule, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        bias = state["bias"]
        if tuple(bias.shape) != (self.num_layers, self.num_experts):
            raise ValueError(f"checkpointed bias shape {tuple(bias.shape)} != [{self.num_layers}, "
                             f"{self.num_experts}]: the model's routing layers changed")
        self.bias = bias.detach().to("cpu", torch.float32).clone()
        self.steps = int(state.get("steps", 0))
        # gamma and rule come from the current config (a resumed run may change them on purpose).

    def __repr__(self) -> str:
        return (f"BiasBalancer(layers={self.num_layers}, experts={self.num_experts}, gamma={self.gamma}, "
                f"rule={self.rule!r}, steps={self.steps})")


@dataclass(frozen=True)
class TokenSchedule:
    """Piecewise-constant value by tokens consumed: ``points = ((start_tokens, value), ...)``, first start 0.

    Example: ``V3_GAMMA(14_299_999_999_999) == 1e-3``, ``V3_GAMMA(14_300_000_000_000) == 0.0``.
    """

    points: tuple[tuple[int, float], ...]

    def __post_init__(self) -> None:
        starts = [p[0] for p in self.points]
        if not starts or starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])):
            raise ValueError(f"schedule points must start at 0 tokens and strictly increase, got {self.points}")

    def __call__(self, tokens: int) -> float:
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        return float(self.points[bisect_right([p[0] for p in self.points], tokens) - 1][1])

    @classmethod
    def of(cls, points: Sequence[tuple[int, float]]) -> "TokenSchedule":
        return cls(tuple((int(t), float(v)) for t, v in points))


V3_GAMMA = TokenSchedule.of([(0, 1e-3), (14_300_000_000_000, 0.0)])  # γ: 1e-3, frozen for the last 500B tokens
V3_MTP_LAMBDA = TokenSchedule.of([(0, 0.3), (10_000_000_000_000, 0.1)])  # MTP loss weight λ: 0.3, then 0.1


def gamma_at(tokens: int, gamma: float, freeze_after_tokens: Optional[int] = None) -> float:
    """``gamma`` until ``freeze_after_tokens`` tokens have been consumed, then 0 (``BalanceConfig`` semantics)."""
    if freeze_after_tokens is not None and tokens >= freeze_after_tokens:
        return 0.0
    return float(gamma)
