"""Prefix caching: the reference-counted, content-addressed block pool (LRU eviction of unreferenced blocks), the
reused-token counts against their formula, and greedy outputs with the cache on equal to those with it off (same
engine, same kernels) on shared-prefix traces, with MTP drafts and under preemption."""
from __future__ import annotations

import copy

import pytest

from raymoe.engine import EngineConfig, LLMEngine, SamplingParams
from raymoe.engine.paged import BlockAllocator, NoFreeBlocks, block_digest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT = ("A block of memory holds sixteen tokens; a table of blocks holds the whole sequence. The draft model guesses "
        "the next token, and the large model checks every guess in one forward pass, keeping what it agrees with. "
        "When the memory is full, the newest request waits, and its tokens are computed again later.")


@pytest.fixture(scope="module")
def ids(tiny_base) -> list[int]:
    _, tok, _ = tiny_base
    out = tok.encode(TEXT).ids
    assert len(out) >= 60
    return out


def make_engine(base, **kw) -> LLMEngine:
    model, tok, eos = base
    return LLMEngine(copy.deepcopy(model), tok, EngineConfig(**kw), eos_token_id=eos)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def run_trace(eng: LLMEngine, trace: list[tuple[int, list[int]]], max_tokens: int = 6) -> dict[str, tuple]:
    """Requests ``(arrival step, prompt)``, staggered; → request id → (output ids, cached tokens)."""
    finals: dict[str, tuple] = {}
    pending = sorted(enumerate(trace), key=lambda x: x[1][0])
    step = 0
    while len(finals) < len(trace):
        while pending and pending[0][1][0] <= step:
            i, (_, p) = pending.pop(0)
            eng.add_request(f"r{i}", p, greedy(max_tokens))
        for o in eng.step():
            if o.finished:
                finals[o.request_id] = (o.outputs[0].token_ids, o.num_cached_tokens)
        for seq in eng.scheduler.running:  # only blocks whose latents are final (MTP layer too) are findable
            final = seq.mtp_computed if eng.num_spec else seq.num_computed
            assert seq.num_registered * eng.cache.block_size <= final
        step += 1
        assert step < 2000
    return finals


# ------------------------------------------------------------------------------------------------ block pool
def test_block_pool_refcounts_sharing_and_lru_eviction() -> None:
    d = [block_digest(None, [i, i + 1]) for i in range(4)]
    a = BlockAllocator(4)
    x = a.allocate(3)
    assert x == [0, 1, 2] and a.num_free == 1
    assert a.register(x[0], d[0]) and a.register(x[1], d[1])
    assert not a.register(x[2], d[0])  # digest already cached by block 0: block 2 stays anonymous
    assert not a.register(x[0], d[2])  # a block keeps its first digest
    assert a.lookup([d[0], d[1], d[2]]) == [0, 1] and a.lookup([d[1]]) == [1] and a.lookup([d[3], d[0]]) == []
    a.acquire([0, 1])  # a second sequence shares blocks 0 and 1
    assert a.ref(0) == 2 and a.num_free == 1
    a.free(x)  # the first sequence ends: 0, 1 still referenced, 2 (anonymous) free
    assert (a.ref(0), a.ref(1), a.ref(2)) == (1, 1, 0) and a.num_free == 2 and a.num_cached == 2
    a.free([0, 1])  # the second ends: both cached, evictable; released in reverse, so block 1 (the tail) is LRU
    assert a.num_free == 4 and a.num_used == 0 and a.num_cached == 2
    assert a.allocate(2) == [2, 3]  # anonymous free blocks go first: nothing evicted
    assert a.num_evictions == 0 and a.lookup([d[0], d[1]]) == [0, 1]
    assert a.allocate(1) == [1]  # then the least recently released cached block: the tail
    assert a.num_evictions == 1 and a.lookup([d[0], d[1]]) == [0] and a.num_cached == 1
    a.acquire([0])  # re-used while evictable: no longer evictable
    with pytest.raises(NoFreeBlocks):
        a.allocate(1)
    a.free([0])
    a.free([3])
    assert a.allocate(2) == [3, 0] and a.lookup([d[0]]) == [] and a.num_evictions == 2
    with pytest.raises(ValueError, match="released more often"):
        a.free([3, 3, 3])
    with pytest.raises(ValueError, match="not a cached block"):
        a.acquire([2])


def test_unregister_makes_blocks_unfindable_in_use_or_evictable() -> None:
    d = [block_digest(None, [i]) for i in range(3)]
    a = BlockAllocator(3)
    x = a.allocate(3)
    for b, dig in zip(x, d):
        a.register(b, dig)
    a.free([x[1]])  # block 1: cached, evictable; blocks 0 and 2 in use
    assert a.unregister([0, 1, 1]) == 2  # a block without a digest (1, the second time) is skipped
    assert a.lookup([d[0]]) == [] and a.lookup([d[1]]) == [] and a.lookup([d[2]]) == [2] and a.num_cached == 1
    assert a.num_free == 1 and a.allocate(1) == [1] and a.num_evictions == 0  # 1 became free, not evictable
    a.free([0])  # in use when unregistered: freed, not cached
    assert a.num_cached == 1 and a.allocate(1) == [0] and a.num_evictions == 0


def test_block_digest_chains_the_prefix() -> None:
    a, b = block_digest(None, [1, 2, 3]), block_digest(None, [1, 2, 4])
    assert a != b and len(a) == 32
    assert block_digest(a, [7, 8, 9]) != block_digest(b, [7, 8, 9])  # same tokens, different prefix
    assert block_digest(a, [7, 8, 9]) == block_digest(block_digest(None, [1, 2, 3]), [7, 8, 9])


# ------------------------------------------------------------------------------------------------ engine
@pytest.mark.parametrize("spec, bs", [(0, 4), (1, 3)])
def test_cached_tokens_follow_the_formula(tiny_base, ids, spec, bs) -> None:
    """A first request A, then requests that share ``s`` tokens with A's prompt and diverge: each reuses
    ``bs · min(⌊(s − la) / bs⌋, ⌊(L − 1) / bs⌋)`` tokens (la = 1 with MTP drafts, whose layer keys a block by
    the next token too; L the prompt length), and produces the same greedy tokens as with the cache off."""
    V = tiny_base[0].config.vocab_size
    la = 1 if spec else 0
    a_prompt = ids[:41]
    trace = [a_prompt]
    shared = [41, 40, 33, 21, 12, 9, 5, 2, 1]  # distinct: each query's longest common prefix is with A
    for j, s in enumerate(shared):
        tail = [(a_prompt[s] + 1 + t) % V for t in range(j % 4)] if s < len(a_prompt) else []
        trace.append(a_prompt[:s] + tail)
    on = make_engine(tiny_base, block_size=bs, num_speculative_tokens=spec)
    off = make_engine(tiny_base, block_size=bs, num_speculative_tokens=spec, enable_prefix_caching=False)
    outs_on = [on.generate([p], greedy(5))[0] for p in trace]  # one after another: A is cached before the rest
    outs_off = [off.generate([p], greedy(5))[0] for p in trace]
    assert [o.outputs[0].token_ids for o in outs_on] == [o.outputs[0].token_ids for o in outs_off]
    expect = [0] + [bs * max(0, min((s - la) // bs, (len(p) - 1) // bs)) for s, p in zip(shared, trace[1:])]
    assert [o.num_cached_tokens for o in outs_on] == expect
    assert [o.num_cached_tokens for o in outs_off] == [0] * len(trace)
    m = on.metrics()
    assert m["prefix_cache_hits"] == sum(expect) and m["prefix_cache_queries"] == sum(map(len, trace))
    assert m["prefix_cache_hit_rate"] == pytest.approx(sum(expect) / sum(map(len, trace)))
    assert m["prefix_cached_blocks"] > 0 and m["kv_blocks_used"] == 0
    assert off.metrics()["prefix_cached_blocks"] == 0 and off.metrics()["prefix_cache_hit_rate"] == 0.0


@pytest.mark.parametrize("spec", [0, 1])
def test_shared_prefix_trace_same_greedy_output(tiny_base, ids, spec) -> None:
    """Concurrent requests with common system prefixes, joining while others decode (some reuse blocks that a
    running request is still using): the same greedy tokens as the cache off."""
    sys_a, sys_b = ids[:26], ids[30:49]
    q = [ids[50:53], ids[53:58], ids[58:60], ids[26:30], ids[49:52]]
    trace = [(0, sys_a + q[0]), (0, sys_b + q[1]), (1, sys_a + q[1]), (3, sys_a + q[2]), (3, sys_b + q[3]),
             (6, sys_a + q[0]), (9, sys_b + q[4]), (9, sys_a + q[3] + q[4]), (14, sys_b)]
    kw = dict(block_size=4, num_speculative_tokens=spec, max_num_batched_tokens=24, prefill_chunk=12)
    on = run_trace(make_engine(tiny_base, **kw), trace)
    off = run_trace(make_engine(tiny_base, enable_prefix_caching=False, **kw), trace)
    assert {k: v[0] for k, v in on.items()} == {k: v[0] for k, v in off.items()}
    assert sum(v[1] for v in on.values()) > 0 and all(v[1] == 0 for v in off.values())
    assert on["r5"][1] >= 24  # r5 repeats r0's prompt, which finished long before


def test_preemption_with_prefix_cache_same_greedy_output(tiny_base, ids) -> None:
    """A pool too small for the batch: sequences are preempted (their blocks released, the registered ones kept
    cached) and re-admitted (reusing what is left), with shared prefixes and MTP drafts; same output as cache off."""
    sys_a = ids[:13]
    trace = [(0, sys_a + ids[20:24]), (0, sys_a + ids[24:27]), (0, ids[30:41]), (1, sys_a + ids[27:29]),
             (2, sys_a + ids[20:24]), (4, ids[30:41] + ids[41:44])]
    kw = dict(block_size=4, num_blocks=16, num_speculative_tokens=1, max_num_batched_tokens=32, prefill_chunk=16)
    eng_on = make_engine(tiny_base, **kw)
    on = run_trace(eng_on, trace, max_tokens=14)
    eng_off = make_engine(tiny_base, enable_prefix_caching=False, **kw)
    off = run_trace(eng_off, trace, max_tokens=14)
    assert {k: v[0] for k, v in on.items()} == {k: v[0] for k, v in off.items()}
    m = eng_on.metrics()
    assert m["preemptions"] > 0 and eng_off.metrics()["preemptions"] > 0
    assert m["prefix_cache_hits"] > 0 and m["kv_blocks_used"] == 0


def test_lru_eviction_keeps_the_most_recent_prefixes(tiny_base, ids) -> None:
    """12 blocks of 4: three 17-token prompts (5 blocks each, 4 of them registered) overflow the pool; the third
    evicts the least recently released cached block, the first prompt's tail. Re-asked, the second prompt reuses
    all 4 blocks, the first only its 3 remaining ones."""
    eng = make_engine(tiny_base, block_size=4, num_blocks=12)
    p1, p2, p3 = ids[0:17], ids[20:37], ids[40:57]
    for p in (p1, p2, p3):
        assert eng.generate([p], greedy(2))[0].num_cached_tokens == 0
    assert eng.metrics()["prefix_cache_evictions"] == 1 and eng.metrics()["prefix_cached_blocks"] == 11
    assert eng.generate([p2], greedy(2))[0].num_cached_tokens == 16
    assert eng.generate([p1], greedy(2))[0].num_cached_tokens == 12


def test_prefix_caching_config_is_checked() -> None:
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        EngineConfig(enable_prefix_caching="false")


def test_prefix_bench_counts_hits_by_the_formula(tiny_ckpt) -> None:
    """``bench serve parts=prefix`` at minimal size: 0% hits on distinct prompts; one request at a time on 2 groups
    sharing 32 of 40 tokens (blocks of 16), every request after its group's first reuses ``16 · ⌊32 / 16⌋``."""
    from raymoe.jobs.benches.serve import prefix_bench

    rows = prefix_bench("tiny", tiny_ckpt, n=6, conc=1, prefix_len=32, suffix=8, groups=2, new_tokens=2, reps=1)
    assert [r["trace"] for r in rows] == ["distinct", "shared"]
    assert rows[0]["hit_rate"] == 0.0 and all(r["outputs_equal"] for r in rows)
    assert rows[1]["hit_rate"] == pytest.approx(4 * 32 / (6 * 40))
    assert all(r["on_s"] > 0 and r["off_s"] > 0 for r in rows)
