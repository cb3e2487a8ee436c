"""Expert shards as their own Serve deployment (experts.backend=remote): the engine replicas hold no routed expert
(attention, dense and shared-expert weights only; the shards read their slots' rows from the checkpoint), reach the
ExpertShards replicas over gloo pairs, Serve's autoscaler (our ExpertRedundancyPolicy over the replicas' reported
rows/s) adds a replica under a skewed prompt mix, the engines re-plan onto it, and a replica SIGKILLed under load
costs no request (the survivors read its slots from the checkpoint). Two engine replicas share the shards (one connection each, own slots). Greedy completions over HTTP equal the
local-experts engine token for token throughout."""
from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import time
import warnings

import pytest

openai = pytest.importorskip("openai")

from raymoe.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from serving_helpers import free_port, tiny_checkpoint  # noqa: E402

warnings.filterwarnings("ignore")
MODEL = "tiny-remote"
ENGINE = {"block_size": 8, "num_blocks": 256, "num_speculative_tokens": 1, "max_num_batched_tokens": 128,
          "prefill_chunk": 64}
PROMPTS = ["The river runs", "The draft model guesses"]
SKEWED = ["She counted the stars: one, two, three, four, five"] * 4  # one prompt kind: a few hot experts


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("serve_remote"), MODEL)


@pytest.fixture(scope="module")
def server(ckpt):
    from raymoe.jobs.serve import start_server, stop_server

    experts = {"backend": "remote", "num_shards": 2, "redundant_slots": 0, "min_shards": 2, "max_shards": 3,
               "remote": {"num_cpus": 0.5, "interval_s": 0.5, "drain_timeout_s": 10},
               "policy": {"up_balance": 1.02, "down_balance": 1.01, "patience": 2, "cooldown_s": 3600,
                          "min_tokens": 32, "rollback_drop": 0.99}}
    args = {"model_path": str(ckpt), "served_model_name": MODEL, "engine": ENGINE, "experts": experts,
            # two engine replicas: each opens its own gloo pair to every shard and follows the registry by itself
            "autoscaling": {"min_replicas": 2, "max_replicas": 2, "target_ongoing_requests": 8},
            # Serve's default router: the skewed trace is one prompt, which prefix routing would send to one replica
            # only (the idle one would never step, so never adopt the third shard)
            "prefix_routing": False}
    url = start_server(args, "127.0.0.1", free_port(), num_cpus=4, timeout_s=180)
    yield url
    stop_server()


def _info() -> dict:
    """One engine replica's view (the handle picks either)."""
    from ray import serve

    return serve.get_deployment_handle("EngineDeployment", app_name="raymoe").info.remote().result()["experts"]


def _all_infos() -> list[dict]:
    """Every engine replica's view: ask until two distinct replica pids answered."""
    from ray import serve

    h = serve.get_deployment_handle("EngineDeployment", app_name="raymoe")
    seen: dict[int, dict] = {}
    for _ in range(40):
        i = h.info.remote().result()
        seen[i["pid"]] = i["experts"]
        if len(seen) == 2:
            break
    return list(seen.values())


def _shard_pids() -> set[int]:
    """PIDs of the ExpertShards replicas (the handle routes to any replica: ask until every member answered)."""
    from ray import serve

    h = serve.get_deployment_handle("ExpertShards", app_name="raymoe")
    names = set(_info()["shard_names"])
    pids: dict[str, int] = {}
    for _ in range(50):
        st = h.stats.remote().result()
        pids[st["member_id"]] = st["pid"]
        if names <= set(pids):
            break
    return {pids[n] for n in names if n in pids}


def _shard_stats() -> dict[str, dict]:
    """``{member id: stats}`` of every ExpertShards replica the engines use."""
    from ray import serve

    h = serve.get_deployment_handle("ExpertShards", app_name="raymoe")
    names = set(_info()["shard_names"])
    out: dict[str, dict] = {}
    for _ in range(50):
        st = h.stats.remote().result()
        out[st["member_id"]] = st
        if names <= set(out):
            break
    return out


def _params() -> list[dict]:
    """Every engine replica's parameter summary (raymoe.engine.experts.param_summary)."""
    from ray import serve

    h = serve.get_deployment_handle("EngineDeployment", app_name="raymoe")
    seen: dict[int, dict] = {}
    for _ in range(40):
        i = h.info.remote().result()
        seen[i["pid"]] = i["params"]
        if len(seen) == 2:
            break
    return list(seen.values())


def _wait(pred, timeout_s: float, what: str, tick=None):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        if tick is not None:
            tick()
        else:
            time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}; experts: {_info()}")


def _check_data_plane_exposure() -> None:
    """A shard listens on the node IP Ray reports and refuses a connection that cannot prove the app's secret; the
    secret (from the app's registry) appears nowhere in what Serve reports."""
    import ray
    from ray import serve

    from raymoe.actors.serve.expert_shards import get_registry
    from raymoe.engine.remote import RemoteShard, ShardUnavailable

    h = serve.get_deployment_handle("ExpertShards", app_name="raymoe")
    st = h.stats.remote().result()
    assert st["address"][0] == ray.util.get_node_ip_address()
    with pytest.raises(ShardUnavailable, match="refused: wrong or missing secret"):
        RemoteShard(tuple(st["address"]), "outsider", connect_timeout_s=10)
    secret = ray.get(get_registry("raymoe").secret.remote())
    assert len(secret) == 32
    shown = str(serve.status()) + str(ray.util.list_named_actors(all_namespaces=True))
    assert secret.hex() not in shown and repr(secret) not in shown


def test_remote_shards_scale_up_and_survive_a_kill(server, ckpt) -> None:
    import torch

    url = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
    info = _info()
    assert info["backend"] == "remote" and info["num_shards"] == 2 and len(set(info["shard_names"])) == 2
    _check_data_plane_exposure()
    torch.set_num_threads(1)
    local = LLMEngine.from_pretrained(ckpt, EngineConfig(**ENGINE))
    # the engine replicas hold attention / dense / shared-expert weights only: the local engine's minus its routed
    # experts, to the byte; the shards read every slot they hold from the checkpoint
    from raymoe.engine.experts import param_summary

    full = param_summary(local.model)
    for ps in _params():
        assert ps["routed_expert_bytes"] == 0 and ps["names_with_routed_experts"] == [], ps
        assert ps["bytes"] == full["bytes"] - full["routed_expert_bytes"] > 0
    assert full["routed_expert_bytes"] > 0
    # 2 engines x 3 MoE layers x 8 slots, each read once per connection
    assert sum(st["fetched_rows"] for st in _shard_stats().values()) == 2 * 3 * 8
    sp = SamplingParams(max_tokens=12, temperature=0)
    for p in PROMPTS:
        got = client.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0).choices[0].text
        assert got == local.generate([p], sp)[0].outputs[0].text, p
    ref = local.generate([SKEWED[0]], SamplingParams(max_tokens=16, temperature=0))[0].outputs[0].text

    def skewed_round() -> None:
        with cf.ThreadPoolExecutor(4) as ex:
            outs = list(ex.map(lambda p: client.completions.create(model=MODEL, prompt=p, max_tokens=16,
                                                                   temperature=0).choices[0].text, SKEWED))
        assert outs == [ref] * len(SKEWED)

    # skewed traffic: per-replica rows/s diverge, Serve's autoscaler (our policy) starts a third replica, the engine
    # connects it at a step boundary and re-plans 8 -> 12 slots
    balance_before = _info()["balance"]
    _wait(lambda: all(i["num_shards"] == 3 for i in _all_infos()), 120, "the scale-up to 3 shards",
          tick=skewed_round)
    infos = _all_infos()
    assert len(infos) == 2 and all(len(i["shard_names"]) == 3 for i in infos)
    info = infos[0]
    ups = [e for e in info["events"] if e["kind"] == "scale_up"]
    assert ups and ups[-1]["num_slots"] == 12 and ups[-1]["pause_s"] < 2.0, info["events"]
    assert info["redundant_slots"] == 4
    skewed_round()
    print(f"balance before {balance_before:.3f} after {_info()['balance']:.3f}; scale-up pause "
          f"{1e3 * ups[-1]['pause_s']:.1f} ms")
    got = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0).choices[0].text
    assert got == local.generate([PROMPTS[0]], sp)[0].outputs[0].text

    # SIGKILL one replica's process while requests run: the engine drops it mid-forward and re-plans; no request
    # fails, and Serve's replacement replica joins afterwards
    victim = sorted(_shard_pids())[0]
    fetched = {m: st["fetched_rows"] for m, st in _shard_stats().items() if st["pid"] != victim}
    with cf.ThreadPoolExecutor(4) as ex:
        futs = [ex.submit(lambda p=p: client.completions.create(model=MODEL, prompt=p, max_tokens=24,
                                                                temperature=0).choices[0].text)
                for p in SKEWED * 3]
        time.sleep(0.5)
        os.kill(victim, signal.SIGKILL)
        texts = [f.result() for f in futs]
    long_ref = local.generate([SKEWED[0]], SamplingParams(max_tokens=24, temperature=0))[0].outputs[0].text
    assert texts == [long_ref] * len(texts)
    assert any(any(e["kind"] == "shard_failed" for e in i["events"]) for i in _all_infos())
    # the survivors read the dead shard's experts from the checkpoint (nothing came from the engines)
    after = _shard_stats()
    assert sum(after[m]["fetched_rows"] for m in fetched if m in after) > sum(fetched.values()), (fetched, after)
    _wait(lambda: _info()["num_shards"] >= 2 and victim not in _shard_pids(), 120, "the replacement shard")
    skewed_round()


def test_requests_succeed_while_the_registry_is_killed(server, ckpt) -> None:
    """SIGKILL the app's registry process under load: no request fails (the data plane never goes through it; the
    engines' polls fail quietly while it restarts); it comes back with the same secret and the shards' heartbeats
    refill its member list."""
    import ray
    import torch

    from raymoe.actors.serve.expert_shards import get_registry

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0, timeout=120)
    torch.set_num_threads(1)
    local = LLMEngine.from_pretrained(ckpt, EngineConfig(**ENGINE))
    ref = local.generate([PROMPTS[1]], SamplingParams(max_tokens=16, temperature=0))[0].outputs[0].text
    reg = get_registry("raymoe")
    secret = ray.get(reg.secret.remote())
    live = set(_info()["shard_names"])  # the shards the engines use (alive: each heartbeats)
    assert live <= set(ray.get(reg.snapshot.remote())[1])

    def registry_pid() -> int:
        alive = [a for a in ray._private.state.actors().values()
                 if a["ActorClassName"] == "ExpertRegistry" and a["State"] == "ALIVE"]
        assert len(alive) == 1, alive
        return int(alive[0]["Pid"])

    pid = registry_pid()
    with cf.ThreadPoolExecutor(4) as ex:
        futs = [ex.submit(lambda: client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=16,
                                                            temperature=0).choices[0].text) for _ in range(12)]
        time.sleep(0.3)
        os.kill(pid, signal.SIGKILL)
        texts = [f.result() for f in futs]
    assert texts == [ref] * len(texts)
    _wait(lambda: live <= set(ray.get(reg.snapshot.remote(), timeout=30)[1]), 60, "heartbeats refilling the registry")
    assert registry_pid() != pid and ray.get(reg.secret.remote()) == secret
    got = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=16, temperature=0).choices[0].text
    assert got == ref
