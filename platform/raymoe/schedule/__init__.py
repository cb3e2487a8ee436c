"""Pipeline schedules as data: op IR, builders, validator, cost simulator, plots, torch comparison, executor.

Public entry points::

    from raymoe.schedule import build, simulate, validate
    s = build("dualpipe", 8, 20)           # ScheduleError if (name, ranks, micro-batches) breaks the rule
    [str(op) for op in s.ops(0)][:8]       # ['F0', 'F1', 'F2', 'F3', 'F4', 'F5', 'F6', 'F0r']
    r = simulate(s, F=1, B=2, W=1, FB=3)   # r.bubble == [6.0] * 8, r.makespan == 66.0, r.peak_activations == [9] * 8

Pure PyTorch (no Ray, no Hydra). See the module docstrings: :mod:`.ir` (vocabulary), :mod:`.builders` (the
schedules and their rules), :mod:`.simulate` (timing model, formulas and where they are exact), :mod:`.executor`
(stage-chunk contract, weight-grad store).
"""
from __future__ import annotations

from .builders import BUILDERS, build
from .executor import (
    DeferredLinear,
    QueueTransport,
    SequentialExecutor,
    StageRunner,
    WeightGradStore,
    reference_step,
    swap_linears,
)
from .ir import Op, OpKind, Schedule, ScheduleError, parse_op
from .plot import plot_timeline, timeline_html
from .simulate import Costs, Deadlock, SimResult, bubble_formula, simulate
from .torch_compat import TORCH_SCHEDULES, TorchScheduleUnavailable, torch_schedule, torch_schedule_available
from .validate import validate

__all__ = [
    "build", "BUILDERS", "simulate", "validate", "Schedule", "Op", "OpKind", "ScheduleError", "Deadlock", "parse_op",
    "Costs", "SimResult", "bubble_formula", "plot_timeline", "timeline_html", "torch_schedule", "TORCH_SCHEDULES",
    "TorchScheduleUnavailable", "torch_schedule_available", "SequentialExecutor", "StageRunner", "QueueTransport",
    "WeightGradStore", "DeferredLinear", "swap_linears", "reference_step",
]
