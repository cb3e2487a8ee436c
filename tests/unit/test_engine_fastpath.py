"""The engine's decode fast path (:class:`raymoe.engine.paged.DecodeBatch`, one batch row per token attending to its
own sequence's latents) against the packed path (:class:`~raymoe.engine.paged.PackedBatch`, block-diagonal mask):
same slots and visibility, the same logits (1e-5) and the same tokens step by step, with sequences of different
lengths crossing block boundaries, with and without MTP draft verification."""
from __future__ import annotations

import copy

import pytest
import torch

from raymoe.config import ModelConfig
from raymoe.engine import EngineConfig, LLMEngine, SamplingParams
from raymoe.engine.paged import PREFILL_GROUP_ROWS, DecodeBatch, PagedLatentCache
from raymoe.model import DeepSeekV3

PROMPT_LENS = (3, 7, 12, 17, 30)  # block size 4: every sequence crosses block boundaries while decoding


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model() -> DeepSeekV3:
    torch.manual_seed(0)
    m = DeepSeekV3(ModelConfig.preset("tiny").replace(vocab_size=256)).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(4.0)  # input-dependent distributions, so sampled tokens differ between rows
    return m


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in PROMPT_LENS]


def recording_engine(model: DeepSeekV3, fast: bool, spec: int, expanded: bool = True,
                     **cfg) -> tuple[LLMEngine, list[torch.Tensor]]:
    """An engine whose main forwards append their logits ``[rows, V]`` to the returned list."""
    cfg = dict(dict(block_size=4, num_blocks=128, max_num_batched_tokens=256, prefill_chunk=64), **cfg)
    eng = LLMEngine(copy.deepcopy(model), None, EngineConfig(**cfg, num_speculative_tokens=spec, fast_decode=fast,
                                                             expanded_prefill=expanded))
    log: list[torch.Tensor] = []
    inner = eng._forward

    def forward(ids, segments, logit_rows):
        h, logits = inner(ids, segments, logit_rows)
        log.append(logits.clone())
        return h, logits

    eng._forward = forward  # type: ignore[method-assign]
    return eng, log


def test_decode_batch_matches_packed_batch_slots_and_mask() -> None:
    c = PagedLatentCache(num_layers=1, num_blocks=12, block_size=4, values_per_token=3)
    tables: list[list[int]] = [[], [], []]
    for bt, n in zip(tables, (6, 11, 3)):
        assert c.ensure(bt, n)
    c.buf.normal_()
    # one decode token at 5, a draft verification of 3 tokens at 8..10 (crosses a block), one decode token at 2
    segments = [(tables[0], 5, 1), (tables[1], 8, 3), (tables[2], 2, 1)]
    packed, dec = c.batch(segments), c.decode_batch(segments)
    assert isinstance(dec, DecodeBatch) and dec.num_tokens == packed.num_tokens == 5
    assert torch.equal(dec.q_slots, packed.q_slots) and dec.positions(1, "cpu").flatten().tolist() == [5, 8, 9, 10, 2]
    kv = torch.randn(5, 1, 3)
    k_packed, m_packed = packed.gather(0, kv.view(1, 5, 3))
    k_dec, m_dec = dec.gather(0, kv)
    assert k_dec.shape == (5, 11, 3) and m_dec.shape == (5, 1, 11)
    for i in range(5):  # row i sees exactly the keys the packed query i sees, in position order
        assert torch.equal(k_dec[i][~m_dec[i, 0]], k_packed[0][~m_packed[i]])
    # one token per sequence, all of the same length: nothing to mask
    same = [(tables[0], 5, 1), (tables[1], 5, 1)]
    assert c.decode_batch(same).masked is None
    with pytest.raises(ValueError, match="blocks"):
        c.decode_batch([(tables[2], 12, 1)])


@pytest.mark.parametrize("spec", [0, 2])
def test_fast_path_equals_packed_path(model, spec) -> None:
    """Greedy: the same tokens every step and logits within 1e-5; the fast path is taken for every decode step."""
    fast, fast_log = recording_engine(model, True, spec)
    packed, packed_log = recording_engine(model, False, spec)
    sp = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    for eng in (fast, packed):
        for i, p in enumerate(prompts()):
            eng.add_request(f"r{i}", p, sp)
    finals: dict[str, list[int]] = {}
    while fast.has_unfinished() or packed.has_unfinished():
        outs_f, outs_p = fast.step(), packed.step()
        assert [(o.request_id, o.outputs[0].token_ids) for o in outs_f] == \
               [(o.request_id, o.outputs[0].token_ids) for o in outs_p]
        finals.update({o.request_id: o.outputs[0].token_ids for o in outs_f if o.finished})
    assert len(fast_log) == len(packed_log) and len(finals) == len(PROMPT_LENS)
    assert all(len(t) == 20 for t in finals.values())
    for a, b in zip(fast_log, packed_log):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert packed.forward_paths["decode"] == 0
    # every main forward after the single prefill step is a decode / verify step (and with MTP the drafts too)
    assert fast.forward_paths["decode"] >= fast.stats["steps"] - 1 > 0
    if spec:
        assert fast.stats["spec_drafted"] > 0 and fast.stats == packed.stats


def test_many_prompt_prefill_takes_the_row_layout_and_matches_packed(model) -> None:
    """Without expanded prefill: 16 prompts of 9-12 tokens prefilled in one step: per token the row layout scores 12
    keys where the packed one scores all ~170, so the engine takes rows (tiny: W = 48, H = 4: rows when Σ end > 13 · S_max); logits of that
    step and every token after equal the packed engine's."""
    g = torch.Generator().manual_seed(3)
    many = [torch.randint(0, 256, (int(n),), generator=g).tolist() for n in torch.randint(9, 13, (16,), generator=g)]
    fast, fast_log = recording_engine(model, True, 1, expanded=False)
    packed, packed_log = recording_engine(model, False, 1, expanded=False)
    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    res = [e.generate(many, sp) for e in (fast, packed)]
    assert [o.outputs[0].token_ids for o in res[0]] == [o.outputs[0].token_ids for o in res[1]]
    assert fast.forward_paths["packed"] == 0 and packed.forward_paths["decode"] == 0
    assert len(fast_log) == len(packed_log)
    for a, b in zip(fast_log, packed_log):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # one long prompt alone stays packed (rows would gather more than they save)
    solo, _ = recording_engine(model, True, 0, expanded=False)
    solo.generate([many[0] * 3], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    assert solo.forward_paths["packed"] == 1


def test_prefill_batch_writes_the_same_slots_and_reads_each_sequence_keys() -> None:
    c = PagedLatentCache(num_layers=1, num_blocks=16, block_size=4, values_per_token=3)
    tables: list[list[int]] = [[], [], []]
    for bt, n in zip(tables, (6, 14, 9)):
        assert c.ensure(bt, n)
    c.buf.normal_()
    # a decode token at 5, a chunk of 6 after a cached prefix of 8 (crosses blocks), a fresh chunk of 9
    segments = [(tables[0], 5, 1), (tables[1], 8, 6), (tables[2], 0, 9)]
    packed, pre = c.batch(segments), c.prefill_batch(segments, short_max=1)
    assert pre.num_tokens == packed.num_tokens == 16 and torch.equal(pre.q_slots, packed.q_slots)
    assert torch.equal(pre.positions(16, "cpu"), packed.positions(16, "cpu"))
    assert pre.segments == [(1, 6, 8, 0, 14), (7, 9, 0, 14, 9)] and pre.short_rows.tolist() == [0]
    assert torch.equal(pre.short.q_slots, packed.q_slots[:1])
    kv = torch.randn(1, 16, 3)
    keys = pre.gather_expanded(0, kv)
    k_packed, m_packed = c.batch(segments).gather(0, kv)
    # segment j's keys are what its last query sees in the packed view (all of its positions 0..end-1)
    assert torch.equal(keys[0:14], k_packed[0][~m_packed[6]]) and torch.equal(keys[14:23], k_packed[0][~m_packed[15]])
    with pytest.raises(ValueError, match="tokens"):
        pre.positions(3, "cpu")


@pytest.mark.parametrize("spec", [0, 1])
def test_expanded_prefill_equals_absorbed_with_cached_prefix(model, spec) -> None:
    """Chunked prefill after a reused prefix (what prefix caching produces), mixed with other requests' decode
    tokens in the same steps: the expanded-K/V prefill path's logits equal the absorbed path's within fp32 tolerance
    at every step, the greedy tokens and the reused-token counts are the same, and the cache holds the same latents."""
    g = torch.Generator().manual_seed(5)
    shared = torch.randint(0, 256, (24,), generator=g).tolist()
    first = shared + torch.randint(0, 256, (5,), generator=g).tolist()
    rest = [shared + torch.randint(0, 256, (int(n),), generator=g).tolist() for n in (19, 11, 30)]
    cfg = dict(prefill_chunk=8, max_num_batched_tokens=20)  # several chunks per prompt, each after a prefix
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    runs = []
    for expanded in (True, False):
        eng, log = recording_engine(model, True, spec, expanded=expanded, **cfg)
        out0 = eng.generate([first], sp)  # caches the shared prefix's blocks
        out = eng.generate(rest, sp)
        runs.append((eng, log, [o.outputs[0].token_ids for o in out0 + out], [o.num_cached_tokens for o in out]))
    (ex, ex_log, ex_ids, ex_cached), (ab, ab_log, ab_ids, ab_cached) = runs
    assert ex_ids == ab_ids and ex_cached == ab_cached and min(ex_cached) >= 16  # whole shared blocks reused
    assert ex.forward_paths["prefill"] > 0 and ex.forward_paths["packed"] == 0 and ab.forward_paths["prefill"] == 0
    assert len(ex_log) == len(ab_log)
    for a, b in zip(ex_log, ab_log):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # the latents of every cached token (all layers, MTP included) are the same
    torch.testing.assert_close(ex.cache.buf, ab.cache.buf, atol=1e-5, rtol=1e-5)


def test_fast_path_seeded_sampling_equals_packed_path(model) -> None:
    sp = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=11, ignore_eos=True, logprobs=2)
    outs = []
    for fast in (True, False):
        eng, _ = recording_engine(model, fast, 1)
        res = eng.generate(prompts(), sp)
        outs.append([(o.outputs[0].token_ids, [e["token_id"] for e in o.outputs[0].logprobs]) for o in res])
        assert (eng.forward_paths["decode"] > 0) == fast
    assert outs[0] == outs[1]


def test_fused_weight_cache_follows_weight_changes() -> None:
    """The serving cache of fused_linear's concatenated weight: used only without autograd, rebuilt after an
    in-place weight update, never used by training."""
    from torch import nn

    from raymoe.model.layers import enable_fused_weight_cache, fused_linear

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 4, bias=False), nn.Linear(8, 6, bias=False))
    x = torch.randn(3, 8)
    assert enable_fused_weight_cache(m) == 2
    with torch.no_grad():
        a, b = fused_linear(x, m[0], m[1])
        w_cached = m[0]._fused_weight_cache["w"]
        a2, _ = fused_linear(x, m[0], m[1])
        assert m[0]._fused_weight_cache["w"] is w_cached  # reused
        # one GEMM over the concatenated weight against two: equal up to the kernel's summation order (bit-equal on
        # AVX2 hosts, 6e-8 apart with AVX-512/AMX kernels); a stale weight would be off by ~1 (the add_ below)
        tol = dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a, m[0](x), **tol)
        torch.testing.assert_close(b, m[1](x), **tol)
        m[1].weight.add_(1.0)  # an optimizer step / load: the cache must not serve stale weights
        _, b3 = fused_linear(x, m[0], m[1])
        torch.testing.assert_close(b3, m[1](x), **tol)
    a4, _ = fused_linear(x, m[0], m[1])  # with autograd: no cache, gradients reach the weights
    a4.sum().backward()
    assert m[0].weight.grad is not None


def test_prefill_groups_batch_segments_of_one_shape() -> None:
    """Long segments of one ``(n, start, end)`` share a group (one attention call), adjacent or not; each group's keys
    are contiguous, segment by segment, and are what that segment's last query sees in the packed view."""
    c = PagedLatentCache(num_layers=1, num_blocks=40, block_size=4, values_per_token=3)
    tables: list[list[int]] = [[] for _ in range(6)]
    for bt, n in zip(tables, (9, 6, 9, 14, 14, 12)):
        assert c.ensure(bt, n)
    c.buf.normal_()
    segments = [(tables[0], 0, 9), (tables[1], 5, 1), (tables[2], 0, 9), (tables[3], 8, 6), (tables[4], 8, 6),
                (tables[5], 0, 12)]
    pre = c.prefill_batch(segments, short_max=1)
    shapes = [(g.B, g.n, g.start, g.k0, g.end) for g in pre.groups]
    assert shapes == [(2, 9, 0, 0, 9), (2, 6, 8, 18, 14), (1, 12, 0, 46, 12)]
    assert pre.groups[0].rows.tolist() == list(range(0, 9)) + list(range(10, 19))  # a short row in between
    assert pre.groups[1].rows == slice(19, 31) and pre.groups[2].rows == slice(31, 43)
    assert pre.groups[0].mask is None and pre.groups[1].mask.shape == (6, 14)
    assert pre.groups[1].mask.sum(-1).tolist() == [9, 10, 11, 12, 13, 14]
    kv = torch.randn(1, 43, 3)
    keys = pre.gather_expanded(0, kv)
    k_packed, m_packed = c.batch(segments).gather(0, kv)
    last = {0: 8, 2: 18, 3: 24, 4: 30, 5: 42}  # packed row of each long segment's last query
    for (q0, n, start, k0, end), j in zip(pre.segments, (0, 2, 3, 4, 5)):
        assert q0 + n - 1 == last[j]
        assert torch.equal(keys[k0 : k0 + end], k_packed[0][~m_packed[last[j]]])
    c.group_prefill = False
    assert [(g.B, g.k0) for g in c.prefill_batch(segments, short_max=1).groups] == \
           [(1, 0), (1, 9), (1, 18), (1, 32), (1, 46)]
    # a call takes at most PREFILL_GROUP_ROWS query rows: many chunks of one shape split into several calls
    c.group_prefill = True
    many = PagedLatentCache(num_layers=1, num_blocks=200, block_size=4, values_per_token=3)
    n = PREFILL_GROUP_ROWS // 3 - 1  # 3 chunks per call
    tabs: list[list[int]] = [[] for _ in range(7)]
    for bt in tabs:
        assert many.ensure(bt, n)
    groups = many.prefill_batch([(bt, 0, n) for bt in tabs], short_max=1).groups
    assert [(g.B, g.rows, g.k0) for g in groups] == [(3, slice(0, 3 * n), 0), (3, slice(3 * n, 6 * n), 3 * n),
                                                      (1, slice(6 * n, 7 * n), 6 * n)]


def test_grouped_prefill_equals_one_call_per_segment(model) -> None:
    """Greedy, prompts of equal and unequal lengths, chunked after a cached prefix and mixed with decode tokens:
    logits within 1e-5 of the per-segment engine's at every step, the same tokens, the same cached latents."""
    g = torch.Generator().manual_seed(7)
    shared = torch.randint(0, 256, (16,), generator=g).tolist()
    lens = (20, 20, 20, 13, 20, 31, 13)
    batch = [torch.randint(0, 256, (n,), generator=g).tolist() for n in lens]
    batch += [shared + torch.randint(0, 256, (12,), generator=g).tolist() for _ in range(3)]
    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    runs = []
    for grouped in (True, False):
        eng, log = recording_engine(model, True, 0, prefill_chunk=8, max_num_batched_tokens=64)
        eng.cache.group_prefill = grouped
        calls = []
        inner = eng.cache.prefill_batch

        def prefill_batch(segments, short_max, inner=inner, calls=calls):
            view = inner(segments, short_max)
            calls.append(max(grp.B for grp in view.groups) if view.groups else 0)
            return view

        eng.cache.prefill_batch = prefill_batch  # type: ignore[method-assign]
        eng.generate([shared + [1, 2, 3, 4]], sp)  # caches the shared prefix: later prompts chunk after it
        out = eng.generate(batch, sp)
        runs.append((eng, log, [o.outputs[0].token_ids for o in out], calls))
    (gr, gr_log, gr_ids, gr_calls), (seg, seg_log, seg_ids, seg_calls) = runs
    assert gr_ids == seg_ids and len(gr_log) == len(seg_log)
    assert max(gr_calls) >= 3 and max(seg_calls) == 1  # several segments shared one call
    for a, b in zip(gr_log, seg_log):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gr.cache.buf, seg.cache.buf, atol=1e-5, rtol=1e-5)
