"""Schedule builders: 1F1B, ZB1P (ZeroBubble ZB-H1), DualPipe and DualPipeV, written from their papers' rules.

Notation: ``R`` pipeline ranks, ``C`` micro-batches per step, ``F``/``B``/``W`` the costs of a forward, a full
backward and a weight-grad chunk, ``F&B`` an overlapped pair. Bubbles quoted are per rank, idle time within the
step's makespan.

* **1F1B** (PipeDream-flush). Rank ``r`` runs ``R-1-r`` warm-up forwards, then alternates one forward and one
  backward, then drains the backwards. One stage per rank; ``R`` stages. Bubble ``(R-1)(F+B)``; peak activations
  ``R - r`` on rank ``r``.
* **ZB1P** (ZeroBubble ZB-H1, Qi et al. 2023). The 1F1B order with every backward split into ``Bi`` (input grad,
  sent upstream at once) and ``W`` (weight grad). Rank ``r`` runs each ``W`` ``r`` backwards late: the last rank
  finishes its ``Bi`` s earliest, so the gradient chain of the final micro-batch starts ``(R-1)W`` sooner and runs
  at ``Bi`` per hop, and the late ``W`` s fill the drain where 1F1B idles. Bubble ``(R-1)(F+B-2W)``: the simulator
  reproduces it exactly whenever ``C >= R`` and ``W <= F`` (tested); with ``W > F`` or ``C < R`` it is larger
  (e.g. R=4, F=1, B=4, W=2: 6 against 3). Peak activations as 1F1B (a pending ``W`` keeps only the saved GEMM
  inputs, which we do not count).
* **DualPipe** (DeepSeek-V3 §3.2.1). ``R`` even ranks, ``C`` even micro-batches, ``C >= 2R``. Half of the
  micro-batches enter at rank 0 (direction 0), half at rank ``R-1`` (direction 1, text ``r``); rank ``r`` hosts
  stage ``r`` for the first and stage ``R-1-r`` for the second, so the model exists twice. With the local rank
  ``h = min(r, R-1-r)``, ``H = R/2``, ``C' = C/2`` and "phase 0" the direction that reaches rank ``r`` first
  (direction 0 in the first half of the ranks, 1 in the second), rank ``r`` runs eight steps:

  ====  ==========================================  ==================
  step  ops                                         iterations
  ====  ==========================================  ==================
  1     F0                                          2(H-h-1)
  2     F0 F1                                       h+1
  3     Bi1 W1 F1   (zero-bubble: send grad first)  H-h-1
  4     F0&B1  F1&B0   (main overlapped step)       C'-R+h+1
  5     B1  F1&B0                                   H-h-1
  6     B1 B0   (Bi from the middle iteration on)   h+1
  7     W  Bi0                                      H-h-1
  8     W                                           h+1
  ====  ==========================================  ==================

  Step 4 needs ``C' >= R-h`` on every rank, i.e. ``C >= 2R``. In step 6 the split starts at iteration
  ``(h+1)//2``: with the ``B1`` of that iteration when ``h`` is odd, with its ``B0`` when ``h`` is even, so that
  exactly ``h+1`` backwards are split and steps 7-8 have a ``W`` for each. ``W`` s run first-in first-out. The two
  middle ranks (``h = H-1``) run their first step-4 pair as ``F0`` then ``B1`` (not overlapped) so the forward's
  output leaves one backward earlier. Bubble ``(R/2-1)(F&B+B-3W)`` (exact when ``B-W = F`` and ``W <= F``);
  peak activations ``R+1`` counting the F&B transient.
* **DualPipeV** ("cut in half"). ``n`` ranks, ``2n`` stages, one stream; rank ``r`` hosts stage ``r`` (down the V,
  direction 0) and stage ``2n-1-r`` (back up, direction 1); the last rank turns the V locally. Rank ``r`` runs
  exactly the DualPipe rank ``r`` program with ``R = 2n``, ``h = r``, ``C' = C``; hence ``C >= 2n`` and no parity
  rule.

All builders are pure functions of ``(R, C)``; :func:`build` dispatches and states the rule on bad input.
"""
from __future__ import annotations

from collections import deque
from typing import Callable

from .ir import Op, OpKind, Schedule, ScheduleError

__all__ = ["build", "BUILDERS", "build_1f1b", "build_zb1p", "build_dualpipe", "build_dualpipev"]


def _check_counts(name: str, num_ranks: int, num_microbatches: int) -> None:
    if not isinstance(num_ranks, int) or isinstance(num_ranks, bool) or num_ranks < 1:
        raise ScheduleError(f"{name}: num_ranks must be a positive int, got {num_ranks!r}")
    if not isinstance(num_microbatches, int) or isinstance(num_microbatches, bool) or num_microbatches < 1:
        raise ScheduleError(f"{name}: num_microbatches must be a positive int, got {num_microbatches!r}")


def _linear_placement(num_ranks: int) -> dict[tuple[int, int], int]:
    return {(r, 0): r for r in range(num_ranks)}


def build_1f1b(num_ranks: int, num_microbatches: int) -> Schedule:
    """1F1B: ``R-1-r`` warm-up forwards on rank ``r``, then one forward / one backward, then the drain."""
    _check_counts("1f1b", num_ranks, num_microbatches)
    R, C = num_ranks, num_microbatches
    rank_ops: list[list[Op]] = []
    for r in range(R):
        warm = min(R - 1 - r, C)
        ops = [Op(OpKind.F, m, r) for m in range(warm)]
        nf = warm
        for nb in range(C):
            if nf < C:
                ops.append(Op(OpKind.F, nf, r))
                nf += 1
            ops.append(Op(OpKind.B, nb, r))
        rank_ops.append(ops)
    return Schedule("1f1b", R, C, R, _linear_placement(R), rank_ops)


def build_zb1p(num_ranks: int, num_microbatches: int) -> Schedule:
    """ZB-H1: the 1F1B order with ``B = Bi + W``; rank ``r`` keeps ``r`` weight-grads pending until the drain."""
    _check_counts("zb1p", num_ranks, num_microbatches)
    R, C = num_ranks, num_microbatches
    rank_ops: list[list[Op]] = []
    for r in range(R):
        warm = min(R - 1 - r, C)
        ops = [Op(OpKind.F, m, r) for m in range(warm)]
        pending: deque[int] = deque()
        nf = warm
        for nb in range(C):
            if nf < C:
                ops.append(Op(OpKind.F, nf, r))
                nf += 1
            ops.append(Op(OpKind.BI, nb, r))
            pending.append(nb)
            if len(pending) > r:  # later ranks lag their W's: their Bi's (and the gradient chain) run earlier
                ops.append(Op(OpKind.W, pending.popleft(), r))
        ops.extend(Op(OpKind.W, m, r) for m in pending)
        rank_ops.append(ops)
    return Schedule("zb1p", R, C, R, _linear_placement(R), rank_ops)


class _Program:
    """Emits one DualPipe-style rank program: per-phase counters and a FIFO of deferred weight grads."""

    def __init__(self, stage: tuple[int, int], direction: tuple[int, int]) -> None:
        self.stage, self.direction = stage, direction
        self.nf = [0, 0]
        self.nb = [0, 0]
        self.wq: deque[Op] = deque()
        self.ops: list[Op] = []

    def f(self, phase: int) -> Op:
        op = Op(OpKind.F, self.nf[phase], self.stage[phase], self.direction[phase])
        self.nf[phase] += 1
        return op

    def b(self, phase: int, split: bool) -> Op:
        op = Op(OpKind.BI if split else OpKind.B, self.nb[phase], self.stage[phase], self.direction[phase])
        self.nb[phase] += 1
        if split:
            self.wq.append(op)
        return op

    def w(self) -> Op:
        bi = self.wq.popleft()
        return Op(OpKind.W, bi.mb, bi.stage, bi.direction)

    def emit(self, *ops: Op) -> None:
        self.ops.extend(ops)

    def pair(self, phase_f: int, phase_b: int) -> None:
        f = self.f(phase_f)
        self.ops.append(Op(OpKind.FB, pair=(f, self.b(phase_b, split=False))))


def _dualpipe_program(h: int, H: int, N: int, Cp: int, stage: tuple[int, int],
                      direction: tuple[int, int]) -> tuple[list[Op], list[int]]:
    """The eight steps of DualPipe for local rank ``h`` (see module docstring); phase 0 arrives first.

    Returns:
        The op list and the iteration count of each of the eight steps.
    """
    steps = [2 * (H - h - 1), h + 1, H - h - 1, Cp - N + h + 1, H - h - 1, h + 1, H - h - 1, h + 1]
    p = _Program(stage, direction)
    for _ in range(2 * (H - h - 1)):                       # step 1: nF0
        p.emit(p.f(0))
    for _ in range(h + 1):                                 # step 2: nF0F1
        p.emit(p.f(0), p.f(1))
    for _ in range(H - h - 1):                             # step 3: nB1W1F1 (zero bubble)
        p.emit(p.b(1, split=True))
        p.emit(p.w())
        p.emit(p.f(1))
    for i in range(Cp - N + h + 1):                        # step 4: nF0B1F1B0 (main)
        if i == 0 and h == H - 1:                          # middle ranks: first pair not overlapped
            p.emit(p.f(0), p.b(1, split=False))
        else:
            p.pair(0, 1)
        p.pair(1, 0)
    for _ in range(H - h - 1):                             # step 5: nB1F1B0
        p.emit(p.b(1, split=False))
        p.pair(1, 0)
    split = False
    for i in range(h + 1):                                 # step 6: nB1B0, split from the middle iteration
        if i == (h + 1) // 2 and h % 2 == 1:
            split = True
        p.emit(p.b(1, split))
        if i == (h + 1) // 2 and h % 2 == 0:
            split = True
        p.emit(p.b(0, split))
    for _ in range(H - h - 1):                             # step 7: nWB0
        p.emit(p.w())
        p.emit(p.b(0, split=True))
    for _ in range(h + 1):                                 # step 8: nW
        p.emit(p.w())
    assert not p.wq, "DualPipe program left deferred weight grads"
    assert p.nf == [Cp, Cp] and p.nb == [Cp, Cp], (p.nf, p.nb)
    return p.ops, steps


def build_dualpipe(num_ranks: int, num_microbatches: int) -> Schedule:
    """DualPipe: bidirectional, 2 parameter copies; needs even ``R`` and even ``C >= 2R``."""
    _check_counts("dualpipe", num_ranks, num_microbatches)
    N, C = num_ranks, num_microbatches
    if N % 2 or C % 2 or C < 2 * N:
        raise ScheduleError(
            f"dualpipe needs an even number of ranks and an even micro-batch count >= 2*ranks "
            f"(got ranks={N}, microbatches={C}); e.g. ranks={N + N % 2}, "
            f"microbatches={max(2 * (N + N % 2), C + C % 2)}")
    H, Cp = N // 2, C // 2
    placement = {(s, 0): s for s in range(N)} | {(s, 1): N - 1 - s for s in range(N)}
    rank_ops, steps = [], []
    for r in range(N):
        first_half = r < H
        h = r if first_half else N - 1 - r
        # phase 0 is the direction that reaches this rank first
        direction = (0, 1) if first_half else (1, 0)
        stage = (r, N - 1 - r) if first_half else (N - 1 - r, r)
        ops, st = _dualpipe_program(h, H, N, Cp, stage, direction)
        rank_ops.append(ops)
        steps.append(st)
    return Schedule("dualpipe", N, C, N, placement, rank_ops, two_streams=True, meta={"step_iterations": steps})


def build_dualpipev(num_ranks: int, num_microbatches: int) -> Schedule:
    """DualPipeV: ``n`` ranks, ``2n`` stages in a V; needs ``C >= 2n``."""
    _check_counts("dualpipev", num_ranks, num_microbatches)
    n, C = num_ranks, num_microbatches
    if C < 2 * n:
        raise ScheduleError(
            f"dualpipev needs microbatches >= 2*ranks (got ranks={n}, microbatches={C}); "
            f"use microbatches >= {2 * n}")
    placement = {(s, 0): s for s in range(n)} | {(2 * n - 1 - r, 1): r for r in range(n)}
    progs = [_dualpipe_program(r, n, 2 * n, C, (r, 2 * n - 1 - r), (0, 1)) for r in range(n)]
    return Schedule("dualpipev", n, C, 2 * n, placement, [o for o, _ in progs], two_streams=False,
                    meta={"step_iterations": [st for _, st in progs]})


BUILDERS: dict[str, Callable[[int, int], Schedule]] = {
    "1f1b": build_1f1b,
    "zb1p": build_zb1p,
    "dualpipe": build_dualpipe,
    "dualpipev": build_dualpipev,
}


def build(name: str, num_ranks: int, num_microbatches: int) -> Schedule:
    """Build a schedule by name.

    Args:
        name: one of ``1f1b``, ``zb1p``, ``dualpipe``, ``dualpipev`` (case-insensitive).
        num_ranks: pipeline ranks (devices in the pipeline group).
        num_microbatches: micro-batches per optimizer step, all directions together.

    Returns:
        The :class:`Schedule`; ``schedule.ops(rank)`` gives rank ``rank``'s ordered ops.

    Raises:
        ScheduleError: unknown name, or a (ranks, micro-batches) combination the schedule does not support.
    """
    key = str(name).lower().replace("-", "").replace("_", "")
    if key not in BUILDERS:
        raise ScheduleError(f"unknown schedule {name!r}; choose one of {', '.join(BUILDERS)}")
    return BUILDERS[key](num_ranks, num_microbatches)
