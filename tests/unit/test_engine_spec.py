"""Speculative sampling keeps the target distribution: the acceptance rule on synthetic distributions, and the whole
engine (MTP drafts, one verify forward) against the exact token distribution of a tiny-vocabulary model.

Chi-square goodness-of-fit at significance 0.001 (cells with expected count < 5 merged); all draws are seeded, so the
tests are deterministic."""
from __future__ import annotations

import copy

import pytest
import torch

from raymoe.config import ModelConfig
from raymoe.engine import EngineConfig, LLMEngine, SamplingParams, probs_from_logits, speculative_accept
from raymoe.model import DeepSeekV3

CHI2_CRIT_0001 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12, 9: 27.88}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def chi2_ok(counts: torch.Tensor, probs: torch.Tensor) -> tuple[bool, float]:
    n = float(counts.sum())
    exp = probs.double() * n
    order = torch.argsort(exp)
    obs_b, exp_b, acc_o, acc_e = [], [], 0.0, 0.0
    for i in order.tolist():  # merge the smallest cells until each bin expects >= 5
        acc_o += float(counts[i])
        acc_e += float(exp[i])
        if acc_e >= 5:
            obs_b.append(acc_o)
            exp_b.append(acc_e)
            acc_o = acc_e = 0.0
    if acc_e > 0 and exp_b:
        obs_b[-1] += acc_o
        exp_b[-1] += acc_e
    stat = sum((o - e) ** 2 / e for o, e in zip(obs_b, exp_b))
    df = len(exp_b) - 1
    return (df == 0 or stat < CHI2_CRIT_0001[df]), stat


def test_acceptance_rule_preserves_target_distribution() -> None:
    g = torch.Generator().manual_seed(0)
    V, N = 6, 6000
    target = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 0.3], [0.0, 2.5, 0.0, 1.0, 0.0, 0.0]])  # p_1, p_2 logits
    draft_logits = torch.tensor([[0.0, 2.0, 1.0, 1.5, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])  # q far from p
    sp = SamplingParams(temperature=1.0)
    q = torch.stack([probs_from_logits(x, sp) for x in draft_logits])
    first = torch.zeros(V)
    second_given_accept = torch.zeros(V)
    accepted = 0
    for _ in range(N):
        drafts = [int(torch.multinomial(q[0], 1, generator=g))]
        out = speculative_accept(drafts, q[:1], torch.cat([target, target[:1]]), sp, g)
        first[out[0]] += 1
        accepted += len(out) - 1
        if len(out) == 2:
            second_given_accept[out[1]] += 1  # the bonus token, drawn from p_2
    p1, p2 = probs_from_logits(target[0], sp), probs_from_logits(target[1], sp)
    ok, stat = chi2_ok(first, p1)
    assert ok, stat
    ok, stat = chi2_ok(second_given_accept, p2)
    assert ok, stat
    expected_rate = float(torch.minimum(p1, q[0]).sum())  # P(accept) = Σ min(p, q) = 1 − TV(p, q)
    assert abs(accepted / N - expected_rate) < 0.03


def test_engine_speculative_sampling_matches_exact_distribution() -> None:
    torch.manual_seed(3)
    cfg = ModelConfig.preset("tiny").replace(vocab_size=8)
    model = DeepSeekV3(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # peaked, input-dependent distributions (MTP shares the head)
    prompt = [1, 2, 3]
    with torch.no_grad():  # exact P(t1), P(t2 | t1), P(t3 | t1, t2) by full forwards
        p1 = model(torch.tensor([prompt])).logits[0, -1].softmax(-1)
        x2 = torch.tensor([prompt + [a] for a in range(8)])
        p2 = model(x2).logits[:, -1].softmax(-1)  # [8, 8]
        x3 = torch.tensor([prompt + [a, b] for a in range(8) for b in range(8)])
        p3 = model(x3).logits[:, -1].softmax(-1).view(8, 8, 8)
    joint12 = p1[:, None] * p2
    marg2 = joint12.sum(0)
    marg3 = (joint12[:, :, None] * p3).sum((0, 1))

    eng = LLMEngine(copy.deepcopy(model), None, EngineConfig(num_speculative_tokens=1, max_num_seqs=512,
                                                             max_num_batched_tokens=2048, num_blocks=2048))
    c1, c2, c3 = torch.zeros(8), torch.zeros(8), torch.zeros(8)
    n_per, rounds, reqs = 50, 4, 6
    for r in range(rounds):
        params = [SamplingParams(max_tokens=3, temperature=1.0, n=n_per, seed=1000 * r + i, ignore_eos=True)
                  for i in range(reqs)]
        for out in eng.generate([prompt] * reqs, params):
            for c in out.outputs:
                t1, t2, t3 = c.token_ids
                c1[t1] += 1
                c2[t2] += 1
                c3[t3] += 1
    m = eng.metrics()
    assert 0.05 < m["spec_acceptance_rate"] < 0.95, m  # both the accept and the residual branch were exercised
    for counts, probs in ((c1, p1), (c2, marg2), (c3, marg3)):
        ok, stat = chi2_ok(counts, probs)
        assert ok, (stat, counts.tolist(), (probs * counts.sum()).tolist())
