"""Validator: every built schedule passes; deliberately broken schedules are caught with the rule named."""
from __future__ import annotations

import dataclasses

import pytest

from raymoe.schedule import Deadlock, Schedule, ScheduleError, build, validate

LINEAR2 = {(0, 0): 0, (1, 0): 1}


@pytest.mark.parametrize("name", ["1f1b", "zb1p", "dualpipe", "dualpipev"])
def test_all_builders_validate_over_a_grid(name):
    for ranks in range(1, 9):
        for mbs in range(1, 3 * ranks + 3):
            try:
                s = build(name, ranks, mbs)
            except ScheduleError:
                continue
            validate(s)


def _two_rank(lines: list[str], mbs: int = 2) -> Schedule:
    return Schedule.from_text("hand", lines, mbs, 2, LINEAR2)


def test_hand_written_1f1b_passes():
    validate(_two_rank(["F0 F1 B0 B1", "F0 B0 F1 B1"]))
    validate(_two_rank(["F0 F1 Bi0 W0 Bi1 W1", "F0 Bi0 F1 Bi1 W0 W1"]))


def test_cross_rank_cycle_is_a_deadlock():
    # rank 1 wants F1 first, which rank 0 only sends after B0, which needs rank 1's B0
    with pytest.raises(Deadlock, match="deadlock.*rank 0: B0.*rank 1: F1"):
        validate(_two_rank(["F0 B0 F1 B1", "F1 B1 F0 B0"]))


@pytest.mark.parametrize("lines,rule", [
    (["F0 F1 B0 B1", "B0 F0 F1 B1"], "before its forward"),
    (["F0 F1 B0 B1", "F0 B0 F1 B1 F1"], "has 2 forwards"),
    (["F0 F1 B0", "F0 B0 F1 B1"], "has 0 backwards"),
    (["F0 F1 Bi0 Bi1 W1", "F0 B0 F1 B1"], "every Bi needs exactly one W"),
    (["F0 F1 W0 Bi0 B1", "F0 B0 F1 B1"], "before its input-grad backward"),
    (["F0 F1 B0 B1 B1", "F0 B0 F1 B1"], "has 2 backwards"),
    (["F0 F1 F2 B0 B1 B2", "F0 B0 F1 B1"], "out of range"),
])
def test_broken_schedules_name_the_rule(lines, rule):
    with pytest.raises(ScheduleError, match=rule):
        validate(_two_rank(lines))


def test_op_on_the_wrong_rank():
    s = build("1f1b", 2, 2)
    bad = [list(s.rank_ops[0]), list(s.rank_ops[1])]
    bad[1][0] = dataclasses.replace(bad[1][0], stage=0)
    with pytest.raises(ScheduleError, match="lives on rank 0, not rank 1"):
        validate(dataclasses.replace(s, rank_ops=bad))


def test_corrupted_dualpipe_is_caught():
    """Moving a rank's first step-4 pair to the front breaks its dependencies: the validator must notice."""
    s = build("dualpipe", 4, 8)
    ops = list(s.rank_ops[0])
    i = next(k for k, o in enumerate(ops) if o.pair)
    ops.insert(0, ops.pop(i))
    with pytest.raises(ScheduleError):
        validate(dataclasses.replace(s, rank_ops=[ops] + s.rank_ops[1:]))
    # and dropping a deferred W leaves the queue non-empty
    ops = [o for o in s.rank_ops[1] if str(o) != "W3r"]
    with pytest.raises(ScheduleError, match="every Bi needs exactly one W"):
        validate(dataclasses.replace(s, rank_ops=[s.rank_ops[0], ops] + s.rank_ops[2:]))
