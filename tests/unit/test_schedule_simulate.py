"""Cost simulator vs the paper's formulas and the numbers in docs/schedules.md §3; torch translation; plots."""
from __future__ import annotations

import pytest

from raymoe.schedule import (
    Costs,
    Deadlock,
    Schedule,
    ScheduleError,
    build,
    plot_timeline,
    simulate,
    timeline_html,
    torch_schedule,
    torch_schedule_available,
    validate,
)


@pytest.mark.parametrize("mbs", [16, 18, 20, 32])
def test_dualpipe_pp8_bubble_is_6(mbs):
    r = simulate(build("dualpipe", 8, mbs), F=1, B=2, W=1, FB=3)
    assert r.bubble == [6.0] * 8
    assert r.formula == 6.0
    assert r.peak_activations == [9] * 8  # PP + 1
    assert r.param_chunks == [2] * 8


def test_techniques_numbers():
    assert simulate(build("1f1b", 8, 20)).bubble == [21.0] * 8
    assert simulate(build("zb1p", 8, 20)).bubble == [7.0] * 8
    assert simulate(build("dualpipev", 4, 8)).bubble == [6.0] * 4
    assert simulate(build("dualpipe", 4, 8)).bubble == [2.0] * 4
    assert simulate(build("dualpipev", 3, 6)).bubble == [4.0] * 3
    r16 = simulate(build("dualpipe", 16, 32))
    assert r16.bubble == [14.0] * 16 and r16.peak_activations == [17] * 16
    assert simulate(build("dualpipev", 8, 16)).bubble == [14.0] * 8
    r = simulate(build("dualpipe", 8, 20))
    assert r.peak_activations_steady == [8, 8, 8, 9, 9, 8, 8, 8]
    assert r.makespan == 66.0
    assert simulate(build("1f1b", 8, 20)).peak_activations == [8, 7, 6, 5, 4, 3, 2, 1]


def test_dualpipe_uneven_pairs_and_off_regime():
    """F&B < F+B: the end ranks idle less; off B-W=F the formula is only approximate (6.0 vs 4.5, 9.5 vs 10.5)."""
    s = build("dualpipe", 8, 20)
    assert simulate(s, FB=2.5).bubble == [3.5, 4.0, 4.5, 4.5, 4.5, 4.5, 4.0, 3.5]
    r = simulate(s, F=1, B=1, W=0.5, FB=2)
    assert max(r.bubble) == 6.0 and r.formula == 4.5
    r = simulate(s, F=1, B=2, W=0.5, FB=3)
    assert max(r.bubble) == 9.5 and r.formula == 10.5


@pytest.mark.parametrize("name,ranks", [("dualpipe", 2), ("dualpipe", 4), ("dualpipe", 8), ("dualpipev", 2),
                                        ("dualpipev", 3), ("dualpipev", 4)])
def test_dualpipe_formula_exact_when_b_minus_w_is_f(name, ranks):
    for F, W in [(1.0, 1.0), (1.0, 0.5), (2.0, 1.0), (1.0, 0.0)]:
        B = F + W
        for FB in [F + B, F + B - 0.5, F + B - 1.0]:
            for mbs in [2 * ranks, 2 * ranks + 2, 4 * ranks]:
                r = simulate(build(name, ranks, mbs), F=F, B=B, W=W, FB=FB)
                assert max(r.bubble) == pytest.approx(r.formula), (name, ranks, mbs, F, B, W, FB)


@pytest.mark.parametrize("ranks", [2, 3, 4, 8])
def test_1f1b_and_zb1p_formulas(ranks):
    for F, B, W in [(1, 2, 1), (1, 3, 1), (1, 2, 0.5), (2, 2, 1), (1, 1.5, 0.5), (1, 2, 0)]:
        for mbs in [ranks, 2 * ranks + 1, 4 * ranks]:
            for name in ("1f1b", "zb1p"):
                r = simulate(build(name, ranks, mbs), F=F, B=B, W=W)
                assert r.bubble == pytest.approx([r.formula] * ranks), (name, ranks, mbs, F, B, W)
    # ZB1P's formula needs a full pipeline (C >= R) and W <= F; outside, the simulation is larger
    assert max(simulate(build("zb1p", 8, 4)).bubble) > 7.0
    assert max(simulate(build("zb1p", 4, 8), F=1, B=4, W=2).bubble) == 6.0  # formula says 3


def test_p2p_latency_only_adds_bubble():
    for name in ("1f1b", "zb1p", "dualpipe"):
        s = build(name, 4, 8)
        b = [max(simulate(s, p2p=t).bubble) for t in (0.0, 0.25, 0.5)]
        assert b[0] == simulate(s).formula and b[0] < b[1] < b[2]


def test_costs_are_checked_and_deadlock_raises():
    with pytest.raises(ScheduleError, match="must not exceed"):
        Costs(W=3.0, B=2.0)
    with pytest.raises(ScheduleError, match=">= 0"):
        Costs(F=-1.0)
    bad = Schedule.from_text("hand", ["F0 B0 F1 B1", "F1 B1 F0 B0"], 2, 2, {(0, 0): 0, (1, 0): 1})
    with pytest.raises(Deadlock):
        simulate(bad)


def test_timeline_is_consistent():
    r = simulate(build("dualpipe", 4, 8), FB=2.5, p2p=0.1)
    for row in r.timeline:
        for (_, s0, e0), (_, s1, _) in zip(row, row[1:]):
            assert e0 <= s1 + 1e-12
    assert r.busy == [sum(e - s for _, s, e in row) for row in r.timeline]
    assert r.as_dict()["max_bubble"] == max(r.bubble)


needs_torch_schedules = pytest.mark.skipif(not torch_schedule_available(),
                                           reason="torch lacks pipelining._schedule_visualizer.get_schedule_ops")


@needs_torch_schedules
@pytest.mark.parametrize("ranks,mbs", [(2, 4), (4, 8), (4, 16), (8, 16)])
def test_torch_dualpipev_simulates_like_ours(ranks, mbs):
    theirs = simulate(validate(torch_schedule("DualPipeV", ranks, mbs)))
    ours = simulate(build("dualpipev", ranks, mbs))
    assert theirs.bubble == ours.bubble and theirs.makespan == ours.makespan
    assert theirs.peak_activations == ours.peak_activations


@needs_torch_schedules
def test_torch_zero_bubble_schedules_translate():
    for name in ("InterleavedZeroBubble", "ZBVZeroBubble"):
        s = validate(torch_schedule(name, 4, 8))
        assert s.num_stages == 8 and s.name == f"torch:{name}"
        assert max(simulate(s).bubble) == 3.0
    with pytest.raises(ScheduleError, match="unknown torch schedule"):
        torch_schedule("GPipeX", 4, 8)


def test_plots(tmp_path):
    r = simulate(build("dualpipev", 2, 4))
    png = plot_timeline(r, tmp_path / "t.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    page = timeline_html(r)
    assert "F3&amp;B1r" in page and "F2r&amp;B0" in page
    assert page.count('class="row"') == 2
