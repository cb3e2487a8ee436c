"""The engine side of remote expert shards against a real registry actor (no Serve): shards that register join the
placement at the next poll, a draining shard is re-planned away and its connection closed (so its replica may
stop), greedy output never changes; and the Serve autoscaling policy's decisions on synthetic contexts."""
from __future__ import annotations

import copy
import time
from types import SimpleNamespace

import pytest
import torch

from raymoe.engine import EngineConfig, LLMEngine, Placement, ReplicatedExperts, SamplingParams
from raymoe.engine.remote import ShardServer

PROMPTS = ["The river runs past", "Every expert in the layer reads"]
KEYS = ["layers.1", "layers.2", "mtp.0"]


@pytest.fixture(scope="module")
def base(tiny_base):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_base
    torch.set_num_threads(n)


def greedy(eng: LLMEngine) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in eng.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0))]


def _poll_until(m, backend, pred, timeout_s: float = 20.0):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        m.poll(backend)
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"membership did not converge: {[s.name for s in backend.shards]}")


def test_join_and_drain_follow_the_registry(ray_session, base) -> None:
    import ray

    from raymoe.actors.serve.expert_shards import ExpertMembership, get_registry, kill_registry

    model, tok, eos = base
    app = "membership-test"
    reg = get_registry(app)
    servers = [ShardServer("127.0.0.1") for _ in range(3)]
    try:
        for i, s in enumerate(servers[:2]):
            ray.get(reg.register.remote(f"m{i}", s.host, s.port))
        m = ExpertMembership(app)
        shards = m.wait_for(2, 10)
        backend = ReplicatedExperts(Placement.trivial(KEYS, 8, 8, 2), shard_factory=lambda i: shards[i])
        eng = LLMEngine(copy.deepcopy(model), tok, EngineConfig(block_size=8), eos, expert_backend=backend)
        ref = [o.outputs[0].token_ids for o in LLMEngine(copy.deepcopy(model), tok, EngineConfig(block_size=8), eos)
               .generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0))]
        assert greedy(eng) == ref
        # a third shard registers: the next polls connect it and re-plan over 12 slots
        ray.get(reg.register.remote("m2", servers[2].host, servers[2].port))
        _poll_until(m, backend, lambda: len(backend.shards) == 3)
        assert m.events[-1]["kind"] == "scale_up" and backend.placement.num_slots == 12
        assert greedy(eng) == ref and servers[2].stats()["rows_total"] > 0
        # m0 drains (its replica is stopping): the engine moves its slots away and closes the connection
        ray.get(reg.drain.remote("m0"))
        _poll_until(m, backend, lambda: len(backend.shards) == 2)
        assert m.events[-1]["kind"] == "scale_down" and "m0" not in m.events[-1]["members"]
        assert servers[0].wait_idle(5.0)
        rows0 = servers[0].stats()["rows_total"]
        assert greedy(eng) == ref and servers[0].stats()["rows_total"] == rows0
        m.close()
    finally:
        for s in servers:
            s.close()
        assert kill_registry(app) == 1


def _ctx(rates, conns=None, n=None, target=None, now=0.0):
    ids = [f"r{i}" for i in range(len(rates))]
    n = len(rates) if n is None else n
    return SimpleNamespace(
        aggregated_metrics={"expert_rows_per_s": dict(zip(ids, rates)),
                            "expert_connections": dict(zip(ids, conns or [1.0] * len(rates)))},
        running_replicas=ids, current_num_replicas=n, target_num_replicas=n if target is None else target,
        policy_state={}, current_time=now, capacity_adjusted_min_replicas=2, capacity_adjusted_max_replicas=4)


def test_serve_policy_scales_on_replica_balance() -> None:
    from raymoe.actors.serve.expert_shards import ExpertRedundancyPolicy

    pol = ExpertRedundancyPolicy(interval_s=1.0, min_shards=2, max_shards=4, up_balance=1.3, down_balance=1.05,
                                 patience=2, cooldown_s=10, min_tokens=10)
    skew = [300.0, 100.0]  # balance 1.5
    assert pol(_ctx(skew, now=0.0))[0] == 2  # one observation: patience 2 not reached
    assert pol(_ctx(skew, now=0.5))[0] == 2  # within interval_s: not an observation
    target, state = pol(_ctx(skew, now=1.0))
    assert target == 3 and state["last"]["action"] == "add" and abs(state["last"]["balance"] - 1.5) < 1e-9
    # the new replica has no engine connection yet: hold, whatever the numbers say
    assert pol(_ctx([300.0, 100.0, 0.0], conns=[1, 1, 0], now=20.0))[0] == 3
    # in cooldown (10 s after the add) even a persistent skew keeps 3
    assert pol(_ctx([300.0, 100.0, 100.0], now=5.0))[0] == 3
    # balanced and past cooldown: two low observations remove one (hysteresis band 1.05..1.3)
    even = [100.0, 101.0, 99.0]
    assert pol(_ctx(even, now=30.0))[0] == 3
    assert pol(_ctx(even, now=31.0))[0] == 2
    # never below Serve's capacity-adjusted minimum
    pol2 = ExpertRedundancyPolicy(interval_s=0.0, min_shards=1, max_shards=4, down_balance=1.05, patience=1,
                                  cooldown_s=0, min_tokens=1)
    assert pol2(_ctx([100.0, 100.0], now=1.0))[0] == 2
