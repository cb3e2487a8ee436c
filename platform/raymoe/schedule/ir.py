"""Pipeline-schedule IR: ops, their text form, and the per-rank op lists of a :class:`Schedule`.

A pipeline schedule is data. For every pipeline rank it is an ordered list of compute ops; the sends and receives
are implied by where each op's producer and consumer live (``Schedule.with_comms`` spells them out). The same data
drives the validator (:mod:`.validate`), the cost simulator (:mod:`.simulate`), the plots (:mod:`.plot`) and the
executor (:mod:`.executor`), so a schedule that passes the validator runs unchanged everywhere.

Vocabulary (DeepSeek-V3 report §3.2.1, ZeroBubble paper):

* ``F``  forward of one micro-batch through one stage chunk;
* ``B``  full backward (input grad and weight grad together);
* ``Bi`` backward for the input only (ZeroBubble's "B"); its weight grad is deferred to a later
* ``W``  weight-grad op of the same micro-batch and stage, on the same rank;
* ``F&B`` an overlapped pair: the forward of one micro-batch and the backward (``B`` or ``Bi``) of another, run as
  one unit so that one's communication hides behind the other's compute (DualPipe's main step).

Micro-batches and directions. A micro-batch visits the model's stages ``0 .. S-1`` in order. ``direction`` says
which way its data flows across ranks at that stage: ``0`` toward higher ranks, ``1`` toward lower ranks (text
suffix ``r``). Under DualPipe the two directions are two *streams* of ``C/2`` micro-batches each, fed from the two
ends of the pipeline, and ``mb`` counts within its stream (``F3r`` is reverse-stream micro-batch 3, i.e. global
micro-batch ``C/2 + 3``). Under V-shaped schedules (DualPipeV, ZBV) there is one stream and the direction is a
property of the stage (the way back up the V is ``r``). :meth:`Schedule.mb_id` maps an op to its global micro-batch.

Placement. Every ``(stage, direction)`` pair has exactly one hosting rank (``Schedule.placement``); a rank's chunks
are the pairs it hosts. DualPipe hosts stage ``s`` twice: ``(s, 0)`` on rank ``s`` and ``(s, 1)`` on rank
``PP-1-s`` (two parameter copies whose gradients must be summed).

Example::

    >>> from raymoe.schedule import build
    >>> s = build("dualpipe", 4, 8)
    >>> s.text(0)
    'F0 F1 F2 F0r Bi0r W0r F1r F3&B1r F2r&B0 B2r F3r&B1 B3r Bi2 W2 Bi3 W3'
"""
from __future__ import annotations

import dataclasses
import enum
import re
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

__all__ = ["OpKind", "Op", "Schedule", "ScheduleError", "parse_op", "COMPUTE_KINDS"]


class ScheduleError(ValueError):
    """A schedule request or a schedule's data breaks a rule; the message states the rule."""


class OpKind(str, enum.Enum):
    """Kinds of pipeline ops; the value is the text-form prefix."""

    F = "F"
    B = "B"
    BI = "Bi"
    W = "W"
    FB = "&"  # overlapped pair; text form ``F7&B3r``
    SEND_F = "sendF"
    RECV_F = "recvF"
    SEND_B = "sendB"
    RECV_B = "recvB"


COMPUTE_KINDS = frozenset({OpKind.F, OpKind.B, OpKind.BI, OpKind.W, OpKind.FB})
_BACKWARD_KINDS = frozenset({OpKind.B, OpKind.BI})


@dataclass(frozen=True)
class Op:
    """One op of a rank's list.

    Attributes:
        kind: what the op does.
        mb: micro-batch index within its stream (see module docstring); ``-1`` for a pair.
        stage: model stage index ``0 .. S-1`` that the op computes (for send/recv: the stage that produced or
            consumes the tensor on this rank); ``-1`` for a pair.
        direction: 0 (data flows toward higher ranks) or 1 (toward lower ranks, text suffix ``r``).
        pair: for ``FB`` only, the ``(forward, backward)`` ops run as one overlapped unit.
        peer: for send/recv only, the other rank.
    """

    kind: OpKind
    mb: int = -1
    stage: int = -1
    direction: int = 0
    pair: Optional[tuple["Op", "Op"]] = None
    peer: int = -1

    def __post_init__(self) -> None:
        if self.kind is OpKind.FB:
            if self.pair is None or len(self.pair) != 2:
                raise ScheduleError("an F&B op needs pair=(forward op, backward op)")
            f, b = self.pair
            if f.kind is not OpKind.F or b.kind not in _BACKWARD_KINDS:
                raise ScheduleError(f"an F&B pair is (F, B or Bi), got ({f}, {b})")
        elif self.pair is not None:
            raise ScheduleError(f"only F&B ops carry a pair, got kind {self.kind.name}")
        elif self.mb < 0 or self.stage < 0:
            raise ScheduleError(f"{self.kind.name} op needs mb >= 0 and stage >= 0, got mb={self.mb} stage={self.stage}")
        if self.direction not in (0, 1):
            raise ScheduleError(f"direction is 0 or 1, got {self.direction}")

    # -- helpers -------------------------------------------------------------------------------------------------
    @property
    def is_compute(self) -> bool:
        return self.kind in COMPUTE_KINDS

    @property
    def parts(self) -> tuple["Op", ...]:
        """The elementary compute ops this op stands for (two for a pair, else itself)."""
        return self.pair if self.pair is not None else (self,)

    @property
    def key(self) -> tuple[int, int, int]:
        """``(mb, direction, stage)``: identifies the micro-batch/stage cell within a schedule."""
        return (self.mb, self.direction, self.stage)

    def __str__(self) -> str:
        if self.pair is not None:
            return f"{self.pair[0]}&{self.pair[1]}"
        return f"{self.kind.value}{self.mb}{'r' if self.direction else ''}"

    def __repr__(self) -> str:
        if self.pair is not None:
            return f"Op({self})"
        peer = f"->{self.peer}" if self.kind in (OpKind.SEND_F, OpKind.SEND_B) else (
            f"<-{self.peer}" if self.kind in (OpKind.RECV_F, OpKind.RECV_B) else "")
        return f"Op({self}@s{self.stage}{peer})"


_OP_RE = re.compile(r"^(sendF|recvF|sendB|recvB|Bi|F|B|W)(\d+)(r?)$")


def parse_op(text: str, stage_of: Optional[dict[int, int]] = None, *, stage: int = -1) -> Op:
    """Parse the text form (``F3``, ``Bi0r``, ``F7&B3r``) back into an :class:`Op`.

    Args:
        text: the text form.
        stage_of: optional ``{direction: stage}`` map used to fill ``stage`` (a rank's chunk per direction).
        stage: the stage to use when ``stage_of`` is not given.
    """
    text = text.strip()
    if "&" in text:
        a, b = text.split("&", 1)
        return Op(OpKind.FB, pair=(parse_op(a, stage_of, stage=stage), parse_op(b, stage_of, stage=stage)))
    m = _OP_RE.match(text)
    if not m:
        raise ScheduleError(f"cannot parse op {text!r}; expected e.g. F3, F3r, B3, Bi3, W3 or F7&B3r")
    kind = {k.value: k for k in OpKind}[m.group(1)]
    direction = 1 if m.group(3) else 0
    st = stage_of[direction] if stage_of is not None else stage
    return Op(kind, int(m.group(2)), max(st, 0), direction)


@dataclass
class Schedule:
    """Per-rank op lists plus the placement that gives them meaning.

    Attributes:
        name: builder name (``1f1b``, ``zb1p``, ``dualpipe``, ``dualpipev``, or ``torch:<Class>``).
        num_ranks: pipeline ranks ``R``.
        num_microbatches: micro-batches per step ``C`` (all streams together).
        num_stages: model stages ``S`` (``R`` for 1F1B/ZB1P/DualPipe, ``2R`` for V and interleaved schedules).
        placement: ``{(stage, direction): rank}``; each hosted pair is one chunk (an ``nn.Module`` on that rank).
        rank_ops: ``rank_ops[r]`` is rank r's ordered op list.
        two_streams: True when the two directions are separate micro-batch streams (DualPipe); False when the
            direction is a property of the stage (single stream).
        meta: builder annotations, e.g. ``meta["step_iterations"][r]``: DualPipe's 8 step counts on rank r.
    """

    name: str
    num_ranks: int
    num_microbatches: int
    num_stages: int
    placement: dict[tuple[int, int], int]
    rank_ops: list[list[Op]]
    two_streams: bool = False
    meta: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.rank_ops) != self.num_ranks:
            raise ScheduleError(f"rank_ops has {len(self.rank_ops)} lists for {self.num_ranks} ranks")
        if self.two_streams and self.num_microbatches % 2:
            raise ScheduleError("a two-stream schedule needs an even micro-batch count")
        self._dir_of_stage: dict[int, int] = {}
        if not self.two_streams:
            for (s, d) in self.placement:
                if s in self._dir_of_stage:
                    raise ScheduleError(f"single-stream schedule places stage {s} in both directions")
                self._dir_of_stage[s] = d
        if sorted({s for s, _ in self.placement}) != list(range(self.num_stages)):
            raise ScheduleError(f"placement must cover stages 0..{self.num_stages - 1}")

    # -- public queries ------------------------------------------------------------------------------------------
    def ops(self, rank: int) -> list[Op]:
        """Rank ``rank``'s ordered compute ops."""
        if not 0 <= rank < self.num_ranks:
            raise ScheduleError(f"rank {rank} out of range 0..{self.num_ranks - 1}")
        return list(self.rank_ops[rank])

    def chunks(self, rank: int) -> list[tuple[int, int]]:
        """``(stage, direction)`` pairs hosted by ``rank``, in order of first use by its op list."""
        hosted = [k for k, r in self.placement.items() if r == rank]
        order: dict[tuple[int, int], int] = {}
        for op in self.rank_ops[rank]:
            for p in op.parts:
                if p.kind in COMPUTE_KINDS:
                    order.setdefault((p.stage, p.direction), len(order))
        return sorted(hosted, key=lambda k: (order.get(k, len(order)), k))

    def rank_of(self, stage: int, direction: int) -> int:
        """Rank hosting ``(stage, direction)``."""
        try:
            return self.placement[(stage, direction)]
        except KeyError:
            raise ScheduleError(f"{self.name}: stage {stage} direction {direction} is not placed") from None

    @property
    def microbatches_per_stream(self) -> int:
        return self.num_microbatches // 2 if self.two_streams else self.num_microbatches

    def mb_id(self, op: Op) -> int:
        """Global micro-batch index ``0 .. C-1`` of an elementary op (reverse stream comes second)."""
        return op.mb + (self.microbatches_per_stream if (self.two_streams and op.direction) else 0)

    def direction_of(self, mb_id: int, stage: int) -> int:
        """Direction of global micro-batch ``mb_id`` at ``stage``."""
        if self.two_streams:
            return int(mb_id >= self.microbatches_per_stream)
        return self._dir_of_stage[stage]

    def local_mb(self, mb_id: int) -> int:
        return mb_id - (self.microbatches_per_stream if self.two_streams and mb_id >= self.microbatches_per_stream
                        else 0)

    def cell(self, mb_id: int, stage: int) -> tuple[int, int, int]:
        """The ``Op.key`` of global micro-batch ``mb_id`` at ``stage``."""
        return (self.local_mb(mb_id), self.direction_of(mb_id, stage), stage)

    def next_cell(self, op: Op) -> Optional[tuple[int, int, int]]:
        """Key of the stage after ``op``'s stage for the same micro-batch (None at the last stage)."""
        if op.stage + 1 >= self.num_stages:
            return None
        return self.cell(self.mb_id(op), op.stage + 1)

    def prev_cell(self, op: Op) -> Optional[tuple[int, int, int]]:
        """Key of the stage before ``op``'s stage for the same micro-batch (None at stage 0)."""
        if op.stage == 0:
            return None
        return self.cell(self.mb_id(op), op.stage - 1)

    @property
    def model_copies(self) -> int:
        """How many times each stage's parameters exist across the ranks (2 under DualPipe)."""
        return len(self.placement) // self.num_stages

    def with_comms(self, rank: int) -> list[Op]:
        """Rank ``rank``'s op list with the implied sends and receives spelled out.

        A receive is placed right before the first compute op that needs the tensor, a send right after the op
        that produced it. Transfers between two chunks of the same rank (the V's turn) need none.
        """
        out: list[Op] = []
        for op in self.rank_ops[rank]:
            sends: list[Op] = []
            for p in op.parts:
                if p.kind is OpKind.F:
                    prev, nxt = self.prev_cell(p), self.next_cell(p)
                    if prev is not None and (src := self.rank_of(prev[2], prev[1])) != rank:
                        out.append(dataclasses.replace(p, kind=OpKind.RECV_F, peer=src))
                    if nxt is not None and (dst := self.rank_of(nxt[2], nxt[1])) != rank:
                        sends.append(dataclasses.replace(p, kind=OpKind.SEND_F, peer=dst))
                elif p.kind in _BACKWARD_KINDS:
                    prev, nxt = self.prev_cell(p), self.next_cell(p)
                    if nxt is not None and (src := self.rank_of(nxt[2], nxt[1])) != rank:
                        out.append(dataclasses.replace(p, kind=OpKind.RECV_B, peer=src))
                    if prev is not None and (dst := self.rank_of(prev[2], prev[1])) != rank:
                        sends.append(dataclasses.replace(p, kind=OpKind.SEND_B, peer=dst))
            out.append(op)
            out.extend(sends)
        return out

    def text(self, rank: Optional[int] = None) -> str:
        """Space-separated text form of one rank's ops, or of all ranks (one line each)."""
        ranks: Iterable[int] = range(self.num_ranks) if rank is None else (rank,)
        return "\n".join(" ".join(str(o) for o in self.rank_ops[r]) for r in ranks)

    def __str__(self) -> str:
        return f"Schedule({self.name}, ranks={self.num_ranks}, microbatches={self.num_microbatches}, " \
               f"stages={self.num_stages})"

    @classmethod
    def from_text(cls, name: str, lines: Sequence[str], num_microbatches: int, num_stages: int,
                  placement: dict[tuple[int, int], int], two_streams: bool = False) -> "Schedule":
        """Build a schedule from per-rank text lines (used by tests to write schedules by hand).

        Each op's stage is recovered from the placement: the chunk of that rank in the op's direction (so a rank
        may host at most one chunk per direction here; build interleaved schedules from :class:`Op` s instead).
        """
        rank_ops: list[list[Op]] = []
        for r, line in enumerate(lines):
            stage_of = {d: s for (s, d), rr in placement.items() if rr == r}
            rank_ops.append([parse_op(t, stage_of) for t in line.split()])
        return cls(name, len(lines), num_microbatches, num_stages, dict(placement), rank_ops, two_streams)
