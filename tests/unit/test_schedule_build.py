"""Schedule builders: rules on (name, ranks, micro-batches), op text form, op counts, DualPipe's step structure."""
from __future__ import annotations

from collections import Counter

import pytest

from raymoe.schedule import Op, OpKind, ScheduleError, build, parse_op, validate


def _counts(sched, rank):
    n: Counter = Counter()
    for op in sched.ops(rank):
        for p in op.parts:
            n[p.kind] += 1
        if op.pair:
            n[OpKind.FB] += 1
    return n


@pytest.mark.parametrize("name,ranks,mbs", [
    ("dualpipe", 4, 6), ("dualpipe", 3, 6), ("dualpipe", 4, 9), ("dualpipe", 8, 14), ("dualpipev", 4, 7),
    ("dualpipev", 3, 5), ("1f1b", 0, 4), ("zb1p", 4, 0), ("nope", 4, 8),
])
def test_invalid_combinations_are_rejected_with_the_rule(name, ranks, mbs):
    with pytest.raises(ScheduleError) as e:
        build(name, ranks, mbs)
    msg = str(e.value)
    if name == "dualpipe":
        assert "even number of ranks" in msg and ">= 2*ranks" in msg
    elif name == "dualpipev":
        assert "microbatches >= 2*ranks" in msg
    elif name == "nope":
        assert "choose one of" in msg


@pytest.mark.parametrize("name,ranks,mbs", [
    ("dualpipe", 8, 18), ("dualpipe", 2, 4), ("dualpipev", 3, 6), ("dualpipev", 4, 9), ("dualpipev", 1, 2),
    ("1f1b", 4, 3), ("zb1p", 5, 7),
])
def test_valid_combinations_build_and_validate(name, ranks, mbs):
    s = validate(build(name, ranks, mbs))
    assert s.num_ranks == ranks and s.num_microbatches == mbs


def test_text_form_and_parse_round_trip():
    f = Op(OpKind.F, 7, 0, 0)
    b = Op(OpKind.B, 3, 7, 1)
    assert str(f) == "F7" and str(b) == "B3r"
    assert str(Op(OpKind.FB, pair=(f, b))) == "F7&B3r"
    assert str(Op(OpKind.BI, 3, 2)) == "Bi3" and str(Op(OpKind.W, 3, 2)) == "W3" and str(Op(OpKind.F, 3, 2, 1)) == "F3r"
    for text in ("F3", "F3r", "B3", "Bi3", "W3", "F7&B3r", "Bi0r"):
        assert str(parse_op(text, stage=0)) == text
    with pytest.raises(ScheduleError):
        parse_op("X3")
    with pytest.raises(ScheduleError):
        Op(OpKind.FB, pair=(b, f))  # a pair is (forward, backward)


def test_dualpipe_rank0_text():
    assert build("dualpipe", 4, 8).text(0) == "F0 F1 F2 F0r Bi0r W0r F1r F3&B1r F2r&B0 B2r F3r&B1 B3r Bi2 W2 Bi3 W3"


@pytest.mark.parametrize("name,ranks,mbs", [("dualpipe", 8, 20), ("dualpipe", 4, 10), ("dualpipev", 3, 7),
                                             ("dualpipev", 4, 8)])
def test_dualpipe_counts(name, ranks, mbs):
    """DualPipe: each rank runs C forwards and C backwards (C/2 per chunk; an F&B counts one of each); DualPipeV: C
    per chunk. #W = #Bi."""
    s = build(name, ranks, mbs)
    per_rank = mbs if name == "dualpipe" else 2 * mbs
    for r in range(ranks):
        n = _counts(s, r)
        assert n[OpKind.F] == per_rank
        assert n[OpKind.B] + n[OpKind.BI] == per_rank
        assert n[OpKind.W] == n[OpKind.BI] > 0
        assert len(s.chunks(r)) == 2


def test_dualpipe_step4_counts_pp8_c20():
    """docs/schedules.md §2: step-4 iterations 3/4/5/6/6/5/4/3, each holding two F&B pairs."""
    s = build("dualpipe", 8, 20)
    assert [st[3] for st in s.meta["step_iterations"]] == [3, 4, 5, 6, 6, 5, 4, 3]
    # independent check from the op lists: step 4's first pair is F(phase 0)&B(phase 1); the middle ranks run
    # their first one unoverlapped
    for r in range(8):
        h = min(r, 7 - r)
        phase0 = 0 if r < 4 else 1
        n = sum(1 for op in s.ops(r) if op.pair and op.pair[0].direction == phase0)
        assert n + (h == 3) == [3, 4, 5, 6, 6, 5, 4, 3][r]


def test_dualpipe_placement_mirrors_stages():
    s = build("dualpipe", 8, 16)
    for r in range(8):
        assert sorted(s.chunks(r)) == sorted([(r, 0), (7 - r, 1)])
    assert s.model_copies == 2
    v = build("dualpipev", 4, 8)
    assert [sorted(v.chunks(r)) for r in range(4)] == [[(0, 0), (7, 1)], [(1, 0), (6, 1)], [(2, 0), (5, 1)],
                                                       [(3, 0), (4, 1)]]
    assert v.num_stages == 8 and v.model_copies == 1


def test_1f1b_and_zb1p_shapes():
    s = build("1f1b", 4, 6)
    assert s.text(0) == "F0 F1 F2 F3 B0 F4 B1 F5 B2 B3 B4 B5"
    assert s.text(3) == "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5"
    z = build("zb1p", 4, 6)
    assert z.text(0) == "F0 F1 F2 F3 Bi0 W0 F4 Bi1 W1 F5 Bi2 W2 Bi3 W3 Bi4 W4 Bi5 W5"
    # the last rank holds its W's back by R-1 = 3 backwards
    assert z.text(3) == "F0 Bi0 F1 Bi1 F2 Bi2 F3 Bi3 W0 F4 Bi4 W1 F5 Bi5 W2 W3 W4 W5"


def test_with_comms_spells_out_sends_and_receives():
    s = build("dualpipev", 2, 4)
    last = [str(o) + (f"->{o.peer}" if o.kind in (OpKind.SEND_F, OpKind.SEND_B) else
                      f"<-{o.peer}" if o.kind in (OpKind.RECV_F, OpKind.RECV_B) else "") for o in s.with_comms(1)]
    assert last[:3] == ["recvF0<-0", "F0", "F0r"]  # the V turns on the last rank: no comm between its chunks
    assert "sendF0r->0" in last
    kinds = Counter(o.kind for r in range(2) for o in s.with_comms(r))
    assert kinds[OpKind.SEND_F] == kinds[OpKind.RECV_F] and kinds[OpKind.SEND_B] == kinds[OpKind.RECV_B] > 0
