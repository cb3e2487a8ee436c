"""Prefix-affinity routing (raymoe.engine.routing): the policy's rules, and its effect on real engines — two tiny
engines behind it keep >= 90% of one engine's prefix-cache hit rate on a shared-prefix trace, where random routing
loses more than that."""
from __future__ import annotations

import copy
import random

import pytest

from raymoe.engine import EngineConfig, LLMEngine, SamplingParams
from raymoe.engine.routing import PrefixAffinity

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_longest_match_wins_and_new_prefixes_hash_consistently() -> None:
    p = PrefixAffinity(chunk_tokens=4)
    reps = ["a", "b", "c"]
    base = list(range(100, 124))
    p.record(base[:8] + [1, 2, 3, 4], "a")  # a holds 2 chunks of base (3 with its own tail)
    p.record(base[:16], "b")  # b holds 4
    assert p.rank(base[:20], reps, {})[0] == ["b"]
    assert p.rank(base[:8] + [1, 2, 3, 4, 5], reps, {})[0] == ["a"]
    assert p.rank(base[:4] + [9] * 8, reps, {})[0] == ["a", "b"]  # both hold the first chunk: a tie
    # nobody holds it: rendezvous hashing, the same answer from an independent router; spread over replicas
    fresh = [[7, i, i, i, 5] for i in range(60)]
    q = PrefixAffinity(chunk_tokens=4)
    picks = [p.rank(f, reps, {})[0] for f in fresh]
    assert picks == [q.rank(f, reps, {})[0] for f in fresh] and all(len(x) == 1 for x in picks)
    counts = {r: sum(x == [r] for x in picks) for r in reps}
    assert min(counts.values()) >= 10, counts
    # removing a replica moves only the prefixes it owned
    moved = [x[0] for x, f in zip(picks, fresh) if q.rank(f, ["a", "b"], {})[0][0] != x[0]]
    assert set(moved) == {"c"}
    # the second rank holds everything else, least loaded first
    assert p.rank(base[:20], reps, {"a": 3, "b": 0, "c": 1}) == [["b"], ["c", "a"]]


def test_load_guard_and_forget() -> None:
    p = PrefixAffinity(chunk_tokens=4, imbalance=2)
    prompt = list(range(12))
    p.record(prompt, "a")
    assert p.rank(prompt, ["a", "b"], {"a": 2, "b": 0})[0] == ["a"]  # within the imbalance: affinity
    assert p.rank(prompt, ["a", "b"], {"a": 3, "b": 0}) == [["b", "a"]]  # beyond: least loaded first
    assert p.rank(prompt, ["a", "b"], {"a": 9, "b": None})[0] == ["a"]  # unknown loads are not evidence
    p.forget("a")
    assert p.stats()["keys"] == 0
    with pytest.raises(ValueError, match="chunk_tokens"):
        PrefixAffinity(chunk_tokens=0)


def test_other_replicas_are_offered_only_after_spill_after_attempts() -> None:
    p = PrefixAffinity(chunk_tokens=4, spill_after=2)
    prompt = list(range(12))
    p.record(prompt, "a")
    # a preferred replica that missed a queue-length probe must not lose its prefix group at the first miss
    assert p.rank(prompt, ["a", "b", "c"], {}, attempt=0) == [["a"]]
    assert p.rank(prompt, ["a", "b", "c"], {}, attempt=1) == [["a"]]
    assert p.rank(prompt, ["a", "b", "c"], {}, attempt=2) == [["a"], ["b", "c"]]
    assert p.rank(prompt, ["a", "b", "c"], {}) == [["a"], ["b", "c"]]  # no attempt count: every rank
    # the load guard is not patience: an overloaded preferred replica spills at once
    assert p.rank(prompt, ["a", "b"], {"a": 20, "b": 0}, attempt=0) == [["b", "a"]]
    assert len(PrefixAffinity(chunk_tokens=4, spill_after=0).rank(prompt, ["a", "b"], {}, attempt=0)) == 2
    with pytest.raises(ValueError, match="spill_after"):
        PrefixAffinity(spill_after=-1)


def test_index_is_bounded_lru() -> None:
    p = PrefixAffinity(chunk_chars=2, capacity=4)
    p.record("aabbcc", "x")  # 3 keys
    p.record("ddee", "y")  # 2 more: the oldest key (of "aa") goes
    assert p.stats()["keys"] == 4
    assert p.rank("aabbcc", ["x", "y"], {})[0] != [] and p.keys("aabbcc")[0] not in p._owners


def _hit_rate(engines: list[LLMEngine], route, trace: list[list[int]]) -> tuple[float, list[int]]:
    sp = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    served = [0] * len(engines)
    hits = queries = 0
    for prompt in trace:
        i = route(prompt)
        served[i] += 1
        out = engines[i].generate([prompt], sp)[0]
        hits += out.num_cached_tokens
        queries += len(prompt)
    return hits / queries, served


def test_two_engines_keep_one_engines_hit_rate(tiny_base) -> None:
    model, tok, eos = tiny_base
    V = model.config.vocab_size
    rng = random.Random(0)
    systems = [[rng.randrange(V) for _ in range(rng.randrange(12, 30))] for _ in range(8)]
    trace = [s + [rng.randrange(V) for _ in range(rng.randrange(2, 9))] for s in systems for _ in range(4)]
    rng.shuffle(trace)

    def engines(n: int) -> list[LLMEngine]:
        return [LLMEngine(copy.deepcopy(model), tok, EngineConfig(block_size=4), eos_token_id=eos) for _ in range(n)]

    one, _ = _hit_rate(engines(1), lambda p: 0, trace)
    policy = PrefixAffinity(chunk_tokens=4)

    def affinity(prompt: list[int]) -> int:
        r = policy.rank(prompt, ["r0", "r1"], {})[0][0]
        policy.record(prompt, r)
        return int(r[1])

    two, served = _hit_rate(engines(2), affinity, trace)
    coin = random.Random(1)
    rand, _ = _hit_rate(engines(2), lambda p: coin.randrange(2), trace)
    print(f"hit rate: one engine {one:.3f}, two with affinity {two:.3f} (served {served}), two random {rand:.3f}")
    assert one > 0.3
    assert two >= 0.9 * one, (two, one)
    assert min(served) >= len(trace) // 4, served  # both engines did work
    assert rand < 0.9 * one, (rand, one)  # what the policy buys on this trace

