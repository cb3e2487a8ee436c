"""Translate ``torch.distributed.pipelining`` schedules into our IR, to simulate them side by side with ours.

PyTorch builds every rank's action list on CPU without a process group: the private helper
``torch.distributed.pipelining._schedule_visualizer.get_schedule_ops(schedule, pp_degree, num_microbatches,
num_stages_per_rank)`` instantiates the schedule class with mocked stages and returns ``pipeline_order``, one list of
``_Action(stage_index, computation_type, microbatch_index, sub_actions)`` per rank (``None`` marks spacing). The
helper is private, so this module checks the torch version and the helper's presence and fails with a clear
:class:`TorchScheduleUnavailable` rather than an ``AttributeError`` when either moves.

Mapping. ``F`` -> ``F``; ``I`` (backward input) -> ``Bi``; ``W`` -> ``W``; ``B`` -> ``B``; ``OVERLAP_F_B`` with
sub-actions ``(F, B|I)`` -> our ``F&B`` pair. Stage placement follows torch's styles: single-stage schedules put
stage ``s`` on rank ``s``; "loop" multi-stage schedules (Interleaved*) put stage ``s`` on rank ``s % R``; "v"
schedules (ZBV, DualPipeV) put stage ``s`` on rank ``s`` for ``s < R`` and on ``2R-1-s`` after the turn. Under "v"
the way back up is direction 1 (text ``r``), as in our DualPipeV. Comms and reshard actions are dropped (our IR
implies them).

Torch's schedules are translated as they are: if one breaks a rule (e.g. ``Schedule1F1B``'s visualized order in
some torch versions lists micro-batch indices beyond ``C-1`` on the last rank), :func:`raymoe.schedule.validate`
says so and the bench prints the reason instead of numbers.
"""
from __future__ import annotations

import re
from typing import Any

import torch

from .ir import Op, OpKind, Schedule, ScheduleError

__all__ = ["TORCH_SCHEDULES", "TorchScheduleUnavailable", "torch_schedule", "torch_schedule_available"]

#: torch class name -> (stages per rank, placement style)
TORCH_SCHEDULES: dict[str, tuple[int, str]] = {
    "1F1B": (1, "loop"),
    "InterleavedZeroBubble": (2, "loop"),
    "ZBVZeroBubble": (2, "v"),
    "DualPipeV": (2, "v"),
}
_MIN_TORCH = (2, 7)  # oldest version whose get_schedule_ops has num_stages_per_rank and DualPipeV (checked on 2.13)


class TorchScheduleUnavailable(ScheduleError):
    """This torch build lacks the private schedule helper (or the requested class)."""


def _torch_version() -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", torch.__version__)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _get_schedule_ops() -> Any:
    if _torch_version() < _MIN_TORCH:
        raise TorchScheduleUnavailable(
            f"torch {torch.__version__} is older than {'.'.join(map(str, _MIN_TORCH))}; torch's schedules cannot be "
            f"listed (need torch.distributed.pipelining._schedule_visualizer.get_schedule_ops)")
    try:
        from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops
    except Exception as e:  # private API: any import failure means "not available here"
        raise TorchScheduleUnavailable(f"torch {torch.__version__}: private get_schedule_ops is unavailable ({e})") \
            from e
    return get_schedule_ops


def torch_schedule_available() -> bool:
    try:
        _get_schedule_ops()
    except TorchScheduleUnavailable:
        return False
    return True


def torch_schedule(name: str, num_ranks: int, num_microbatches: int) -> Schedule:
    """Torch's schedule ``name`` (a key of :data:`TORCH_SCHEDULES`) for ``num_ranks`` x ``num_microbatches``.

    Returns:
        A :class:`Schedule` named ``torch:<name>`` with ``num_ranks * stages_per_rank`` stages. It is not validated.

    Raises:
        TorchScheduleUnavailable: torch too old or the helper moved.
        ScheduleError: unknown name, or torch rejected the combination (its message is included).
    """
    if name not in TORCH_SCHEDULES:
        raise ScheduleError(f"unknown torch schedule {name!r}; choose one of {', '.join(TORCH_SCHEDULES)}")
    get_schedule_ops = _get_schedule_ops()
    per_rank, style = TORCH_SCHEDULES[name]
    R, C = num_ranks, num_microbatches
    try:
        actions = get_schedule_ops(name, R, C, num_stages_per_rank=per_rank)
    except Exception as e:  # torch raises ValueError/AssertionError/RuntimeError for unsupported sizes
        raise ScheduleError(f"torch {name} rejects ranks={R}, microbatches={C}: {e}") from e
    S = R * per_rank
    if style == "v":
        placement = {(s, 0 if s < R else 1): (s if s < R else 2 * R - 1 - s) for s in range(S)}
    else:
        placement = {(s, 0): s % R for s in range(S)}
    direction = {s: d for (s, d) in placement}

    def conv(a: Any) -> list[Op]:
        kind = a.computation_type.value
        if kind == "OVERLAP_F_B":
            parts = [p for sub in a.sub_actions for p in conv(sub)]
            if len(parts) == 2 and parts[0].kind is OpKind.F and parts[1].kind in (OpKind.B, OpKind.BI):
                return [Op(OpKind.FB, pair=(parts[0], parts[1]))]
            return parts
        ours = {"F": OpKind.F, "I": OpKind.BI, "W": OpKind.W, "B": OpKind.B}.get(kind)
        if ours is None:  # comms, (un)shard, reduce-grad: implied or out of scope
            return []
        s = int(a.stage_index)
        return [Op(ours, int(a.microbatch_index), s, direction.get(s, 0))]

    rank_ops = [[op for a in row if a is not None for op in conv(a)] for row in actions]
    return Schedule(f"torch:{name}", R, C, S, placement, rank_ops, two_streams=False)
