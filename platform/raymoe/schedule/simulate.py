"""Discrete-event cost simulator for pipeline schedules.

Timing model (the one the DualPipe and ZeroBubble papers use for their bubble tables):

* every rank executes its op list strictly in order, one op at a time;
* an op starts when its rank is free and its inputs have arrived: a forward needs the previous stage's forward of
  the same micro-batch, a backward (``B`` or ``Bi``) needs its own forward and the next stage's backward (at the last
  stage, just its forward: the loss is part of the last chunk), a ``W`` needs its ``Bi``;
* costs per chunk: ``F``, full ``B``, ``W``, ``Bi = B - W`` and ``F&B`` for an overlapped pair, whose two outputs
  both appear when the pair ends;
* a tensor crossing ranks arrives ``p2p`` after it was produced; sends never block the sender (they run on a
  communication stream) and transfers between two chunks of one rank are free.

Because each rank is in-order, the start times are the longest paths of a DAG and do not depend on the order in
which the simulator visits ranks. The result's ``bubble[r]`` is rank ``r``'s idle time within the step's makespan
(``makespan - busy[r]``), so a schedule with uneven per-rank work shows that as bubble.

Memory. ``peak_activations[r]`` counts live forward activations in chunk units, in program order: ``F`` is +1,
``B``/``Bi`` is -1 (``W`` keeps only the saved GEMM inputs, which we do not count), and an ``F&B`` pair counts
+1 before its backward frees (the transient the DualPipe README's ``PP+1`` includes). ``param_chunks[r]`` is the
number of stage chunks (parameter sets) rank ``r`` holds.

Formulas (per rank, :func:`bubble_formula`): 1F1B ``(PP-1)(F+B)``, ZB1P ``(PP-1)(F+B-2W)``, DualPipe and DualPipeV
``(PP/2-1)(F&B+B-3W)`` with ``PP`` the stage count (DualPipeV on ``n`` ranks has ``PP = 2n``). We checked by this
simulation (tests/unit/test_schedule_simulate.py) where each formula is exact: 1F1B always; ZB1P when ``C >= R`` and
``W <= F``; DualPipe/DualPipeV (max over ranks) when ``B - W = F`` and ``W <= F``, for any ``F&B <= F+B``. Off
those regimes a formula is an approximation (DualPipe PP=8 with ``F=1, B=1, W=0.5``: simulated 6.0, formula 4.5;
``F=1, B=2, W=0.5``: 9.5 against 10.5) and the simulator is the source of truth. With ``F&B < F+B`` the ranks with
fewer pairs (the ends) idle less than the middle ones. A ``p2p`` latency only adds bubble.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .ir import Op, OpKind, Schedule, ScheduleError

__all__ = ["Costs", "SimResult", "simulate", "bubble_formula", "Deadlock", "run_dependencies"]


@dataclass(frozen=True)
class Costs:
    """Per-chunk op costs (any time unit) and the P2P latency."""

    F: float = 1.0
    B: float = 2.0
    W: float = 1.0
    FB: float = 3.0
    p2p: float = 0.0

    def __post_init__(self) -> None:
        for k in ("F", "B", "W", "FB", "p2p"):
            if getattr(self, k) < 0:
                raise ScheduleError(f"cost {k} must be >= 0, got {getattr(self, k)}")
        if self.W > self.B:
            raise ScheduleError(f"W (weight-grad) must not exceed B (full backward): W={self.W} > B={self.B}")

    @property
    def Bi(self) -> float:
        return self.B - self.W

    def of(self, op: Op) -> float:
        return {OpKind.F: self.F, OpKind.B: self.B, OpKind.BI: self.Bi, OpKind.W: self.W,
                OpKind.FB: self.FB}[op.kind]


@dataclass
class SimResult:
    """Outcome of :func:`simulate`.

    Attributes:
        schedule: the simulated schedule.
        costs: the cost model.
        makespan: time from the first op's start to the last op's end, over all ranks.
        busy: per rank, total compute time.
        bubble: per rank, ``makespan - busy``.
        peak_activations: per rank, peak live activations in chunk units (see module docstring).
        peak_activations_steady: the same without the F&B transient (the pair's backward frees first).
        param_chunks: per rank, number of stage chunks (parameter sets) held.
        timeline: per rank, ``(op, start, end)`` in execution order.
    """

    schedule: Schedule
    costs: Costs
    makespan: float
    busy: list[float]
    bubble: list[float]
    peak_activations: list[int]
    peak_activations_steady: list[int]
    param_chunks: list[int]
    timeline: list[list[tuple[Op, float, float]]] = field(repr=False)

    @property
    def max_bubble(self) -> float:
        return max(self.bubble)

    @property
    def bubble_ratio(self) -> float:
        """Mean idle fraction of the makespan over ranks."""
        return sum(self.bubble) / (self.makespan * len(self.bubble)) if self.makespan else 0.0

    @property
    def formula(self) -> Optional[float]:
        """The paper's bubble formula for this schedule and costs, if it has one."""
        return bubble_formula(self.schedule, self.costs)

    def as_dict(self) -> dict:
        return {"name": self.schedule.name, "ranks": self.schedule.num_ranks,
                "microbatches": self.schedule.num_microbatches, "stages": self.schedule.num_stages,
                "makespan": self.makespan, "bubble": self.bubble, "max_bubble": self.max_bubble,
                "bubble_ratio": self.bubble_ratio, "formula": self.formula,
                "peak_activations": self.peak_activations, "param_chunks": self.param_chunks}


class Deadlock(ScheduleError):
    """No rank can make progress: the head op of every unfinished rank waits for an op that never runs."""


def _ready_time(sched: Schedule, rank: int, op: Op, fwd: dict, bwd: dict, p2p: float) -> Optional[float]:
    """Earliest time ``op``'s inputs are on ``rank``; None if some input has not been produced yet."""
    t = 0.0
    for p in op.parts:
        if p.kind is OpKind.F:
            deps = [(sched.prev_cell(p), fwd)]
        elif p.kind in (OpKind.B, OpKind.BI):
            deps = [(p.key, fwd), (sched.next_cell(p), bwd)]
        else:  # W: its Bi, same rank
            deps = [(p.key, bwd)]
        for cell, table in deps:
            if cell is None:
                continue
            hit = table.get(cell)
            if hit is None:
                return None
            done, src = hit
            t = max(t, done + (p2p if src != rank else 0.0))
    return t


def run_dependencies(sched: Schedule, costs: Costs) -> list[list[tuple[Op, float, float]]]:
    """Schedule every rank's ops in order as early as dependencies allow; raise :class:`Deadlock` if stuck.

    Returns:
        Per rank, ``(op, start, end)`` in program order.
    """
    R = sched.num_ranks
    fwd: dict[tuple[int, int, int], tuple[float, int]] = {}
    bwd: dict[tuple[int, int, int], tuple[float, int]] = {}
    pos = [0] * R
    free = [0.0] * R
    out: list[list[tuple[Op, float, float]]] = [[] for _ in range(R)]
    lists = sched.rank_ops
    remaining = sum(len(x) for x in lists)
    while remaining:
        progressed = False
        for r in range(R):
            while pos[r] < len(lists[r]):
                op = lists[r][pos[r]]
                ready = _ready_time(sched, r, op, fwd, bwd, costs.p2p)  # None: an input is not produced yet
                if ready is None:
                    break
                start = max(ready, free[r])
                end = start + costs.of(op)
                for p in op.parts:
                    if p.kind is OpKind.F:
                        fwd.setdefault(p.key, (end, r))
                    elif p.kind in (OpKind.B, OpKind.BI):
                        bwd.setdefault(p.key, (end, r))
                out[r].append((op, start, end))
                free[r] = end
                pos[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            heads = ", ".join(f"rank {r}: {lists[r][pos[r]]} (op #{pos[r]})" for r in range(R)
                              if pos[r] < len(lists[r]))
            raise Deadlock(f"{sched.name}: deadlock, every unfinished rank waits on an input that is never "
                           f"produced: {heads}")
    return out


def _peak_activations(ops: list[Op], transient: bool = True) -> int:
    live = peak = 0
    for op in ops:
        parts = op.parts if transient or op.pair is None else op.parts[::-1]
        for p in parts:
            if p.kind is OpKind.F:
                live += 1
            elif p.kind in (OpKind.B, OpKind.BI):
                live -= 1
            peak = max(peak, live)
    return peak


def simulate(schedule: Schedule, F: float = 1.0, B: float = 2.0, W: float = 1.0, FB: float = 3.0,
             p2p: float = 0.0) -> SimResult:
    """Simulate ``schedule`` under per-chunk costs.

    Args:
        schedule: a schedule (ideally validated; a deadlock raises :class:`Deadlock`).
        F: forward chunk cost.
        B: full backward chunk cost (input + weight grads); ``Bi = B - W``.
        W: weight-grad chunk cost.
        FB: overlapped forward&backward pair cost.
        p2p: latency of a tensor crossing ranks.

    Returns:
        :class:`SimResult` with ``bubble`` and ``peak_activations`` per rank and the ``makespan``.

    Example (DualPipe, 8 ranks, 20 micro-batches, paper costs)::

        >>> r = simulate(build("dualpipe", 8, 20))
        >>> r.bubble, r.makespan, r.peak_activations
        ([6.0, 6.0, 6.0, 6.0, 6.0, 6.0, 6.0, 6.0], 66.0, [9, 9, 9, 9, 9, 9, 9, 9])
    """
    costs = Costs(F, B, W, FB, p2p)
    timeline = run_dependencies(schedule, costs)
    starts = [t[0][1] for t in timeline if t]
    ends = [t[-1][2] for t in timeline if t]
    makespan = (max(ends) - min(starts)) if ends else 0.0
    busy = [sum(e - s for _, s, e in t) for t in timeline]
    return SimResult(
        schedule=schedule, costs=costs, makespan=makespan, busy=busy,
        bubble=[makespan - b for b in busy],
        peak_activations=[_peak_activations(schedule.rank_ops[r]) for r in range(schedule.num_ranks)],
        peak_activations_steady=[_peak_activations(schedule.rank_ops[r], transient=False)
                                 for r in range(schedule.num_ranks)],
        param_chunks=[len(schedule.chunks(r)) for r in range(schedule.num_ranks)],
        timeline=timeline)


def bubble_formula(schedule: Schedule, costs: Costs) -> Optional[float]:
    """The paper's per-rank bubble for ``schedule`` (None for schedules without one, e.g. torch's).

    ``PP`` is the stage count: ranks for 1F1B/ZB1P/DualPipe, ``2n`` for DualPipeV on ``n`` ranks.
    """
    pp = schedule.num_stages
    F, B, W, FB = costs.F, costs.B, costs.W, costs.FB
    if schedule.name == "1f1b":
        return (pp - 1) * (F + B)
    if schedule.name == "zb1p":
        return (pp - 1) * (F + B - 2 * W)
    if schedule.name in ("dualpipe", "dualpipev"):
        return (pp / 2 - 1) * (FB + B - 3 * W)
    return None
