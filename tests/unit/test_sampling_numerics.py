"""Sampling numerics at the edges of the accepted range: a tiny temperature is the greedy limit, never NaN."""
from __future__ import annotations

import torch

from raymoe.engine.sampling import SamplingParams, probs_from_logits, sample_token, speculative_accept


def test_tiny_temperature_is_the_greedy_limit_not_nan() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(512, generator=g) * 8
    best = int(torch.argmax(logits))
    for t in (1e-40, 1e-30, 1e-12):
        p = probs_from_logits(logits, SamplingParams(temperature=t))
        assert torch.isfinite(p).all() and int(torch.argmax(p)) == best and float(p[best]) == 1.0, t
        assert sample_token(logits, SamplingParams(temperature=t), torch.Generator().manual_seed(1)) == best
    # speculative verification at a tiny temperature: the target's argmax is the only token it can emit
    target = torch.stack([logits, logits.roll(3)])
    out = speculative_accept([best], torch.full((1, 512), 1 / 512), target, SamplingParams(temperature=1e-40),
                             torch.Generator().manual_seed(2))
    assert out == [best, int(torch.argmax(target[1]))]


def test_ordinary_temperatures_unchanged() -> None:
    logits = torch.randn(300, generator=torch.Generator().manual_seed(3)) * 4
    for t, k, p in ((1.0, 0, 1.0), (0.7, 20, 1.0), (1.3, 0, 0.9), (0.05, 5, 0.5)):
        got = probs_from_logits(logits, SamplingParams(temperature=t, top_k=k, top_p=p))
        x = logits / t  # the unshifted reference
        if k:
            x = x.masked_fill(x < torch.topk(x, k).values[-1], float("-inf"))
        ref = x.softmax(-1)
        if p < 1.0:
            sp, idx = torch.sort(ref, descending=True)
            keep = (sp.cumsum(-1) - sp) < p
            mask = torch.zeros_like(keep).scatter_(0, idx, keep)
            ref = x.masked_fill(~mask, float("-inf")).softmax(-1)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
