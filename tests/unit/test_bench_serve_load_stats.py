"""The open-loop load bench's arithmetic (no Ray): Poisson arrival offsets and a level's summary of records."""
from __future__ import annotations

import math

import pytest
import torch

from raymoe.jobs.benches.serve_load import _summary, poisson_arrivals


def test_poisson_arrivals_exponential_gaps() -> None:
    a = poisson_arrivals(8.0, 20_000, torch.Generator().manual_seed(0))
    assert len(a) == 20_000 and a[0] == 0.0 and all(y > x for x, y in zip(a, a[1:]))
    gaps = [y - x for x, y in zip(a, a[1:])]
    mean = sum(gaps) / len(gaps)
    # exponential(rate 8): mean 1/8 (standard error 1/8/sqrt(n) ~ 0.7%), P(gap > mean) = e^-1
    assert mean == pytest.approx(1 / 8, rel=0.03)
    assert sum(g > 1 / 8 for g in gaps) / len(gaps) == pytest.approx(math.exp(-1), abs=0.01)
    # seeded: the same offsets again (cache on and off replay the same arrivals)
    assert poisson_arrivals(8.0, 50, torch.Generator().manual_seed(0)) == a[:50]
    assert poisson_arrivals(2.0, 1, torch.Generator().manual_seed(0)) == [0.0]
    with pytest.raises(ValueError, match="rates must be > 0"):
        poisson_arrivals(0.0, 3, torch.Generator())


def test_summary_of_a_level() -> None:
    ok = lambda i, send, first, last, end, cached: {  # noqa: E731
        "i": i, "ok": True, "error": None, "send": send, "first": first, "last": last, "end": end, "ntok": 5,
        "prompt_tokens": 64, "cached": cached, "text": "x"}
    recs = [ok(0, 10.0, 10.1, 10.5, 10.6, 0), ok(1, 10.5, 10.8, 11.6, 11.7, 32),
            ok(2, 11.0, 11.2, 11.4, 12.0, 48),
            {"i": 3, "ok": False, "error": "APIStatusError: 503", "send": 12.0, "end": 12.1}]
    s = _summary(recs, 2.0, 5)
    assert (s["requests"], s["ok"], s["failed"]) == (4, 3, 1)
    assert s["sent_req_s"] == pytest.approx(3 / 2.0)  # 4 sends over 2 s
    assert s["window_s"] == pytest.approx(2.0)  # first send 10.0 → last completion 12.0
    assert s["achieved_req_s"] == pytest.approx(1.5) and s["output_tokens_per_s"] == pytest.approx(7.5)
    # nearest rank over [0.1, 0.2, 0.3] (TTFT) and [0.1, 0.2, 0.05] (TPOT: (last − first) / 4)
    assert s["ttft_p50"] == pytest.approx(0.2) and s["ttft_p99"] == pytest.approx(0.3)
    assert s["tpot_p50"] == pytest.approx(0.1) and s["tpot_p99"] == pytest.approx(0.2)
    assert (s["prompt_tokens"], s["cached_tokens"]) == (192, 80) and s["hit_rate"] == pytest.approx(80 / 192)
    assert s["errors"] == ["APIStatusError: 503"]
