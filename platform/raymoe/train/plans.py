"""Typed contracts across the actor boundary: one :class:`StepPlan` per rank per step in, one :class:`StepResult` out.

The coordinator never calls workers by method-name strings or with untyped dicts: each message is a frozen
dataclass that pickles as plain data (ints, floats, lists, CPU tensors). A worker checks the plan it gets against
its own topology (``ops`` must be the op list the schedule gives its pipeline rank) before running anything.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

__all__ = ["StepPlan", "StepResult", "EvalPlan", "EvalResult", "OpTiming", "LossSums"]


@dataclass(frozen=True)
class StepPlan:
    """What one rank does in one optimizer step.

    Attributes:
        step: optimizer step index (0-based) this plan produces.
        lr: learning rate for this step (token-based schedule, computed by the coordinator).
        mtp_lambda: λ of the MTP loss.
        biases: ``[num_router_layers, E]`` fp32 routing biases every rank routes with this step.
        microbatches: this rank's ``C`` micro-batches as lists of sample ids (data-rank slice of the global batch).
        ops: this rank's op list in text form (``F0 F1 B0 ...``), from the schedule; validated before the step.
        sample_ids: the whole step's sample ids (global batch, for the metrics' sample log); may be empty.
    """

    step: int
    lr: float
    mtp_lambda: float
    biases: torch.Tensor
    microbatches: tuple[tuple[int, ...], ...]
    ops: tuple[str, ...] = ()
    fault: Optional[str] = None  # test-only fault injection ("nan_loss"); None in real runs


@dataclass
class OpTiming:
    """Wall-clock span of one op on a rank, relative to the step start (seconds)."""

    op: str
    start: float
    end: float


@dataclass
class LossSums:
    """Loss statistics summed over the micro-batches of the whole step (all ranks), and their count."""

    loss: float = 0.0  # the objective: main + (λ/D)·Σ_k L_MTP^k + aux
    main: float = 0.0  # main-model cross-entropy (what val/loss measures)
    mtp: float = 0.0  # unweighted (1/D)·Σ_k L_MTP^k (what val/mtp_loss measures)
    aux: float = 0.0
    n: int = 0

    def mean(self, which: str) -> float:
        return getattr(self, which) / max(1, self.n)


@dataclass
class StepResult:
    """What one rank reports after a step. Global quantities (losses, counts, grad norm, skipped) are already
    reduced over the world and are identical on every rank; ``busy_s``, ``idle_s`` and ``timings`` are this rank's.
    """

    step: int
    rank: int
    losses: LossSums
    counts: torch.Tensor  # [num_router_layers, E] int64, summed over every rank and micro-batch (MTP included)
    grad_norm: float
    skipped: bool
    nonfinite: list[str] = field(default_factory=list)
    busy_s: float = 0.0  # time in compute ops (the step minus waiting for peers)
    idle_s: float = 0.0  # time blocked waiting for activations/gradients
    step_s: float = 0.0  # worker-side wall time of the step (plan received → result ready)
    timings: list[OpTiming] = field(default_factory=list)
    peak_activation_bytes: int = 0
    param_bytes: int = 0
    a2a_count: int = 0  # expert all-to-alls this rank issued in the step's ops (raymoe.experts.overlap.METER)
    a2a_s: float = 0.0  # their summed time, issue to completion
    a2a_exposed_s: float = 0.0  # the part of it during which this rank computed nothing (blocked in the exchange)


@dataclass(frozen=True)
class EvalPlan:
    """Validation: micro-batches of validation sample ids, all sent through the pipeline forward only."""

    batches: tuple[tuple[int, ...], ...]
    biases: torch.Tensor


@dataclass
class EvalResult:
    val_loss: float
    val_mtp_loss: float
    counts: torch.Tensor
    mtp_acceptance: Optional[float] = None
