"""raymoe.balance: MaxVio, load accumulators, bias spread, the bias update rules, the balancer's state, schedules."""
from __future__ import annotations

import doctest

import pytest
import torch

from raymoe.balance import (
    V3_GAMMA,
    V3_MTP_LAMBDA,
    BiasBalancer,
    LoadStats,
    TokenSchedule,
    bias_delta,
    bias_spread,
    gamma_at,
    maxvio,
    update_bias,
)


# ------------------------------------------------------------------------------------------------ MaxVio
def test_maxvio_of_the_paper_example_and_edge_cases():
    assert maxvio(torch.tensor([2, 1, 1, 0])).item() == 1.0
    mv = maxvio(torch.tensor([[2, 1, 1, 0], [3, 3, 3, 3], [0, 0, 0, 0], [8, 0, 0, 0]]))
    assert mv.shape == (4,) and mv.dtype == torch.float64
    assert mv.tolist() == [1.0, 0.0, 0.0, 3.0]  # perfect → 0, empty layer → 0 (not NaN), all on one → E − 1
    assert maxvio(torch.tensor([[2.0, 1.0, 1.0, 0.0]], dtype=torch.float32)).dtype == torch.float32
    with pytest.raises(ValueError):
        maxvio(torch.tensor(3))


def test_load_stats_batch_vs_global():
    stats = LoadStats(num_layers=2, num_experts=4)
    assert stats.add(torch.tensor([[2, 1, 1, 0], [1, 1, 1, 1]])).tolist() == [1.0, 0.0]
    stats.add(torch.tensor([[0, 1, 1, 2], [1, 1, 1, 1]]))
    assert stats.maxvio_batch().tolist() == [1.0, 0.0]
    assert stats.maxvio_global().tolist() == [0.0, 0.0]  # the two batches cancel out
    assert stats.summary() == {"maxvio_batch": 0.5, "maxvio_global": 0.0, "batches": 2.0}
    restored = LoadStats(2, 4)
    restored.load_state_dict(stats.state_dict())
    assert restored.summary() == stats.summary()
    with pytest.raises(ValueError, match="\\[L, E\\]"):
        stats.add(torch.zeros(3, 4))


def test_bias_spread():
    b = torch.tensor([[-1.0, 1.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]])
    s = bias_spread(b)
    assert s["bias_range"] == pytest.approx(1.0) and s["bias_min"] == -1.0 and s["bias_max"] == 1.0
    assert s["bias_std"] == pytest.approx(float(b.std(dim=1).mean()))  # the controller's balance/bias_std
    assert s["bias_abs_max"] == 1.0


# ------------------------------------------------------------------------------------------------ update rule
def test_sign_rule_moves_overloaded_down_and_underloaded_up_by_gamma():
    counts = torch.tensor([[2, 1, 1, 0], [5, 1, 3, 3]])
    d = bias_delta(counts, 1e-3)
    assert d.dtype == torch.float32
    g = torch.tensor(1e-3, dtype=torch.float32).item()
    assert d.tolist() == [[-g, 0.0, 0.0, g], [-g, g, 0.0, 0.0]]  # exactly-mean experts keep their bias


def test_proportional_rule_is_normalised_by_the_mean():
    d = bias_delta(torch.tensor([[2, 1, 1, 0]]), 1e-2, rule="proportional")
    assert torch.allclose(d, torch.tensor([[-1e-2, 0.0, 0.0, 1e-2]]))
    d = bias_delta(torch.tensor([[3, 1, 0, 0]]), 1e-2, rule="proportional")  # mean 1
    assert torch.allclose(d, torch.tensor([[-2e-2, 0.0, 1e-2, 1e-2]]))
    assert bias_delta(torch.zeros(1, 4), 1e-2, rule="proportional").abs().sum() == 0  # empty layer: no NaN


def test_gamma_zero_freezes_the_bias_exactly():
    bal = BiasBalancer(3, 16, gamma=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        bal.update(torch.randint(0, 100, (3, 16), generator=gen))
    frozen = bal.bias.clone()
    bal.gamma = 0.0
    for _ in range(50):
        bal.update(torch.randint(0, 100, (3, 16), generator=gen))
    assert torch.equal(bal.bias, frozen) and bal.bias.abs().sum() > 0
    b = torch.tensor([[0.1, -0.2]])
    before = b.clone()
    assert update_bias(b, torch.tensor([[5, 1]]), 0.0) is b and torch.equal(b, before)


def test_update_is_a_pure_function_of_the_global_counts():
    """Ranks that all-reduce the same counts (in any summation order) hold bit-identical biases."""
    gen = torch.Generator().manual_seed(1)
    per_mb_rank = torch.randint(0, 50, (4, 2, 3, 32), generator=gen)  # [micro-batch, rank, L, E]
    a, b = BiasBalancer(3, 32, gamma=1e-3), BiasBalancer(3, 32, gamma=1e-3)
    for step in range(30):
        counts_a = per_mb_rank.sum(dim=(0, 1)) + step
        counts_b = per_mb_rank.flip(0).transpose(0, 1).reshape(8, 3, 32).sum(0) + step  # other order
        a.update(counts_a)
        b.update(counts_b)
    assert torch.equal(a.bias, b.bias) and a.bias.dtype == torch.float32
    fresh = torch.zeros(3, 32)
    assert torch.equal(update_bias(fresh, per_mb_rank.sum((0, 1)), 1e-3, inplace=False),
                       bias_delta(per_mb_rank.sum((0, 1)), 1e-3)) and fresh.abs().sum() == 0


def test_update_rejects_bad_inputs():
    bal = BiasBalancer(2, 4)
    with pytest.raises(ValueError, match="include the MTP layers"):
        bal.update(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="non-negative"):
        bal.update(torch.tensor([[1, -1, 0, 0], [0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="allowed: sign, proportional"):
        BiasBalancer(2, 4, rule="softmax")
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        bias_delta(torch.zeros(1, 4), -1e-3)
    with pytest.raises(TypeError, match="float32"):
        update_bias(torch.zeros(1, 4, dtype=torch.bfloat16), torch.zeros(1, 4), 1e-3)


def test_balancer_state_round_trip_keeps_the_bias():
    bal = BiasBalancer(2, 4, gamma=1e-3)
    bal.update(torch.tensor([[2, 1, 1, 0], [1, 1, 1, 1]]))
    state = bal.state_dict()
    restored = BiasBalancer(2, 4, gamma=1e-3)
    restored.load_state_dict(state)
    assert torch.equal(restored.bias, bal.bias) and restored.steps == 1
    state["bias"][0, 0] = 99.0  # the state is a copy, not a view of the live bias
    assert bal.bias[0, 0] != 99.0
    with pytest.raises(ValueError, match="routing layers changed"):
        BiasBalancer(3, 4).load_state_dict(bal.state_dict())


def test_biased_choice_balances_a_skewed_toy_router_quickly():
    """Small, fast sanity check (top-1, no groups): the sign rule cancels a fixed per-expert skew."""
    gen = torch.Generator().manual_seed(0)
    skew_E = torch.linspace(-1.0, 1.0, 8)
    bal = BiasBalancer(1, 8, gamma=1e-2)
    mv = []
    for _ in range(200):
        scores_TE = torch.sigmoid(torch.randn(4096, 8, generator=gen) * 0.3 + skew_E)
        choice = (scores_TE + bal.bias[0]).argmax(dim=-1)
        counts = torch.bincount(choice, minlength=8)[None]
        mv.append(float(maxvio(counts)[0]))
        bal.update(counts)
    assert mv[0] > 3.0 and sum(mv[-20:]) / 20 < 0.3
    assert bal.bias[0].argmin() == 7 and bal.bias[0].argmax() == 0  # the skew is mirrored by the bias


# ------------------------------------------------------------------------------------------------ schedules
def test_v3_schedules_switch_exactly():
    assert V3_GAMMA(0) == 1e-3 and V3_GAMMA(14_300_000_000_000 - 1) == 1e-3 and V3_GAMMA(14_300_000_000_000) == 0.0
    assert V3_MTP_LAMBDA(10_000_000_000_000 - 1) == 0.3 and V3_MTP_LAMBDA(10_000_000_000_000) == 0.1
    assert gamma_at(99, 1e-3, freeze_after_tokens=100) == 1e-3 and gamma_at(100, 1e-3, 100) == 0.0
    assert gamma_at(10**15, 1e-3) == 1e-3
    with pytest.raises(ValueError, match="start at 0"):
        TokenSchedule.of([(5, 1.0)])


def test_docstring_examples_hold():
    import raymoe.balance.bias
    import raymoe.balance.stats

    for mod in (raymoe.balance.stats, raymoe.balance.bias):
        res = doctest.testmod(mod)
        assert res.attempted > 0 and res.failed == 0, mod.__name__
