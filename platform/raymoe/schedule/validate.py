"""Schedule validator: the rules every schedule must satisfy before anything runs it.

Rules, each raised as a :class:`~raymoe.schedule.ir.ScheduleError` naming the rank, the op and the rule:

1. **Placement.** Every op's ``(stage, direction)`` is hosted by the rank that runs it; every rank hosts at least
   one chunk; the micro-batch indices are in range (``0 .. C-1``, or ``0 .. C/2-1`` per stream under DualPipe).
2. **Coverage.** Every micro-batch has, at every stage it visits, exactly one forward and exactly one backward:
   either one full ``B``, or one ``Bi`` followed later on the same rank by one ``W`` (so each rank's deferred-W
   queue is empty at the end of the step).
3. **Local order.** On its rank, a micro-batch's backward comes after its forward and its ``W`` after its ``Bi``.
   An ``F&B`` pair holds a forward and a backward of *different* cells (an op cannot consume its partner's output).
4. **No deadlock.** Each rank runs its list in order and blocks on inputs from other ranks; the validator replays
   that with unit costs (:func:`.simulate.run_dependencies`) and names the blocked head ops if nothing can move.
   Sends are asynchronous in this model (as in our executor and with NCCL/gloo isend), so rule 4 checks data
   dependencies, not matching blocking send/recv pairs.
"""
from __future__ import annotations

from collections import Counter

from .ir import COMPUTE_KINDS, OpKind, Schedule, ScheduleError
from .simulate import Costs, run_dependencies

__all__ = ["validate"]


def validate(schedule: Schedule) -> Schedule:
    """Check ``schedule`` against the rules in the module docstring.

    Returns:
        The schedule itself, so ``validate(build(...))`` chains.

    Raises:
        ScheduleError: the first broken rule, with rank, op and rule in the message.
    """
    s = schedule
    name = s.name
    per_stream = s.microbatches_per_stream
    for r in range(s.num_ranks):
        if not any(rr == r for rr in s.placement.values()):
            raise ScheduleError(f"{name}: rank {r} hosts no stage chunk")

    fwd: Counter = Counter()
    full_b: Counter = Counter()
    bi: Counter = Counter()
    w: Counter = Counter()
    for r in range(s.num_ranks):
        seen_f: set = set()
        seen_bi: set = set()
        for i, op in enumerate(s.rank_ops[r]):
            where = f"{name}: rank {r} op #{i} {op}"
            if op.kind not in COMPUTE_KINDS:
                raise ScheduleError(f"{where}: op lists hold compute ops only; sends/receives are implied")
            if op.pair is not None:
                f, b = op.pair
                if f.key == b.key:
                    raise ScheduleError(f"{where}: an F&B pair must pair two different micro-batch/stage cells")
            for p in op.parts:
                if not 0 <= p.mb < per_stream:
                    raise ScheduleError(f"{where}: micro-batch {p.mb} out of range 0..{per_stream - 1}")
                if (p.stage, p.direction) not in s.placement:
                    raise ScheduleError(f"{where}: stage {p.stage} direction {p.direction} is not placed anywhere")
                if s.placement[(p.stage, p.direction)] != r:
                    raise ScheduleError(f"{where}: stage {p.stage} direction {p.direction} lives on rank "
                                        f"{s.placement[(p.stage, p.direction)]}, not rank {r}")
                if s.direction_of(s.mb_id(p), p.stage) != p.direction:
                    raise ScheduleError(f"{where}: micro-batch {p.mb} cannot be at stage {p.stage} in direction "
                                        f"{p.direction}")
                k = p.key
                if p.kind is OpKind.F:
                    fwd[k] += 1
                    seen_f.add(k)
                elif p.kind in (OpKind.B, OpKind.BI):
                    if k not in seen_f:
                        raise ScheduleError(f"{where}: backward of {p} before its forward on this rank")
                    (full_b if p.kind is OpKind.B else bi)[k] += 1
                    if p.kind is OpKind.BI:
                        seen_bi.add(k)
                else:
                    if k not in seen_bi:
                        raise ScheduleError(f"{where}: weight-grad {p} before its input-grad backward Bi{p.mb}"
                                            f"{'r' if p.direction else ''} on this rank")
                    w[k] += 1

    for mb_id in range(s.num_microbatches):
        for stage in range(s.num_stages):
            k = s.cell(mb_id, stage)
            label = f"micro-batch {k[0]}{'r' if k[1] else ''} (global {mb_id}) at stage {stage}"
            if fwd[k] != 1:
                raise ScheduleError(f"{name}: {label} has {fwd[k]} forwards; each needs exactly one")
            nb = full_b[k] + bi[k]
            if nb != 1:
                raise ScheduleError(f"{name}: {label} has {nb} backwards (B or Bi); each needs exactly one")
            if w[k] != bi[k]:
                raise ScheduleError(f"{name}: {label} has {bi[k]} Bi and {w[k]} W; every Bi needs exactly one W "
                                    f"(the deferred weight-grad queue must be empty at the end of the step)")
    extra = set(fwd) | set(full_b) | set(bi) | set(w)
    valid = {s.cell(m, st) for m in range(s.num_microbatches) for st in range(s.num_stages)}
    if extra - valid:
        raise ScheduleError(f"{name}: ops for cells outside the schedule: {sorted(extra - valid)[:5]}")

    run_dependencies(s, Costs(1.0, 2.0, 1.0, 3.0, 0.0))  # raises Deadlock naming the blocked heads
    return s
