"""Prefix caching through the Serve app over real HTTP with the real `openai` client: reused prompt tokens in
``usage.prompt_tokens_details.cached_tokens`` (non-streamed and streamed), and cache-aware routing over 2 engine
replicas keeping >= 90% of one engine's hit rate on a shared-prefix trace, each request where the policy puts it."""
from __future__ import annotations

import random
import time
import warnings
from typing import Optional

import pytest

openai = pytest.importorskip("openai")

from raymoe.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from raymoe.engine.routing import PrefixAffinity  # noqa: E402
from serving_helpers import free_port, tiny_checkpoint  # noqa: E402

warnings.filterwarnings("ignore")
MODEL = "tiny"
ENGINE = {"block_size": 8, "num_blocks": 256, "num_speculative_tokens": 1, "max_num_batched_tokens": 128,
          "prefill_chunk": 64}
WORDS = ("river mill baker morning stars memory block table draft model token guess forward pass request "
         "sequence queue winter garden lantern harbor").split()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("prefix"), MODEL)


@pytest.fixture(scope="module")
def server(ckpt):
    from raymoe.jobs.serve import start_server, stop_server

    args = {"model_path": str(ckpt), "served_model_name": MODEL, "engine": ENGINE,
            "autoscaling": {"min_replicas": 2, "max_replicas": 2, "initial_replicas": 2}}
    url = start_server(args, "127.0.0.1", free_port(), num_cpus=4, timeout_s=180)
    yield url
    stop_server()


@pytest.fixture(scope="module")
def client(server):
    c = openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=120)
    wait_until_the_router_uses_both_replicas(c)
    return c


def wait_until_the_router_uses_both_replicas(client, timeout_s: float = 120) -> None:
    """``start_server`` returns once ``/health`` answers 200, i.e. once *one* engine replica is up; the second may
    still be loading, and the router only offers it once Serve has told it about it. Requests meant for it go to the
    other one until then, which the exact-routing check below would count against the policy. So: for each replica,
    fresh warm-up prompts that the policy sends to it (never sharing a chunk with the trace), until one arrives there
    (its prefix-cache query counter grows)."""
    deadline = time.time() + timeout_s
    pending: Optional[set[str]] = None
    k = 0
    while time.time() < deadline:
        try:
            stats = replica_stats()
        except Exception:  # noqa: BLE001 - a replica whose constructor has not finished cannot answer yet
            stats = {}
        ids = sorted(name.split("#")[-1] for name in stats)
        if len(ids) == 2:
            pending = set(ids) if pending is None else pending
            if not pending:
                return
            target = sorted(pending)[0]
            while True:  # a prompt whose new prefix the policy puts on `target`
                k += 1
                prompt = f"warm-up {k}: " + " ".join(WORDS[(k * 7 + i) % len(WORDS)] for i in range(12))
                if PrefixAffinity().rank(prompt, ids, {})[0][0] == target:
                    break
            before = {n.split("#")[-1]: v["prefix_cache_queries"] for n, v in stats.items()}
            client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0)
            after = {n.split("#")[-1]: v["prefix_cache_queries"] for n, v in replica_stats().items()}
            if after[target] > before[target]:
                pending.discard(target)
            continue
        time.sleep(0.5)
    raise AssertionError(f"the router did not send a request to each of the 2 engine replicas within {timeout_s} s")


def trace(n_groups: int = 10, per_group: int = 3) -> list[str]:
    """Groups of requests that share a long 'system' text and differ in a short question, shuffled."""
    rng = random.Random(0)
    systems = [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(30, 50))) for _ in range(n_groups)]
    out = [f"{s}. Q{g}.{i}: {' '.join(rng.choice(WORDS) for _ in range(3))}?" for g, s in enumerate(systems)
           for i in range(per_group)]
    rng.shuffle(out)
    return out


def replica_stats() -> dict[str, dict]:
    """Each engine replica's prefix-cache counters, from its Serve routing-stats hook (read on every replica)."""
    import ray

    actors = [a for a in ray.util.list_named_actors(all_namespaces=True)
              if a["name"].startswith("SERVE_REPLICA::raymoe#EngineDeployment#")]
    stats = ray.get([ray.get_actor(a["name"], namespace=a["namespace"]).record_routing_stats.remote()
                     for a in actors])
    return {a["name"]: s for a, s in zip(actors, stats)}


def test_usage_reports_cached_tokens(client) -> None:
    prompt = "The harbor lantern burned all winter, and the baker counted the stars above the mill. " * 2
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
    again = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
    L, bs = first.usage.prompt_tokens, ENGINE["block_size"]
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == bs * ((L - 1) // bs) > 0  # routed to the same replica
    assert again.choices[0].text == first.choices[0].text
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == bs * ((L - 1) // bs)
    msgs = [{"role": "system", "content": prompt}, {"role": "user", "content": "And then?"}]
    client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2, temperature=0)
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2, temperature=0)
    assert r.usage.prompt_tokens_details.cached_tokens == bs * ((r.usage.prompt_tokens - 1) // bs)


def test_two_replicas_keep_one_replicas_hit_rate(client, ckpt) -> None:
    import torch

    prompts = trace()
    before = replica_stats()
    hits = queries = 0
    for p in prompts:  # one at a time, as one replica would see them
        r = client.completions.create(model=MODEL, prompt=p, max_tokens=2, temperature=0)
        hits += r.usage.prompt_tokens_details.cached_tokens
        queries += r.usage.prompt_tokens
    two = hits / queries
    torch.set_num_threads(1)
    local = LLMEngine.from_pretrained(ckpt, EngineConfig(**ENGINE))  # one engine, the same requests in order
    outs = [local.generate([p], SamplingParams(max_tokens=2, temperature=0))[0] for p in prompts]
    one = sum(o.num_cached_tokens for o in outs) / sum(len(o.prompt_token_ids) for o in outs)
    print(f"hit rate: 2 replicas over HTTP {two:.3f}, one engine {one:.3f}")
    assert one > 0.5
    assert two >= 0.9 * one, (two, one)
    after = replica_stats()
    assert len(after) == 2 and set(after) == set(before)
    served = {k.split("#")[-1]: after[k]["prefix_cache_queries"] - before[k]["prefix_cache_queries"] for k in after}
    # the router did what its policy says with these replica ids: new prefixes spread by rendezvous hashing, every
    # later request of a group to its group's replica (prompt tokens per replica, exactly)
    policy, expect = PrefixAffinity(), dict.fromkeys(served, 0)
    for p in prompts:
        r = policy.rank(p, sorted(served), {})[0][0]
        policy.record(p, r)
        expect[r] += len(local.encode(p))
    assert served == expect and sum(served.values()) == queries


def test_app_refuses_bad_routing_options(tmp_path) -> None:
    from raymoe.actors.serve.app import build_app

    with pytest.raises(ValueError, match="chunk_tokens"):
        build_app({"model_path": str(tmp_path), "prefix_routing": {"chunk_tokens": 0}})
    with pytest.raises(ValueError, match="options: chunk_tokens"):
        build_app({"model_path": str(tmp_path), "prefix_routing": {"chunk_size": 4}})
    with pytest.raises(ValueError, match="mapping"):
        build_app({"model_path": str(tmp_path), "prefix_routing": "yes"})
