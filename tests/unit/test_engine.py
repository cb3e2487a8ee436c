"""Inference engine: greedy output equals a plain full-recompute greedy decode of the same model (batch mixes, chunked
prefill, block boundaries, MTP drafts, preemption, sharded experts) and transformers' ``generate``; seeded sampling,
stop conditions, n > 1, logprobs, request validation."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from raymoe.engine import EngineConfig, EngineError, EngineFull, LLMEngine, SamplingParams, ShardedExperts
from raymoe.engine.paged import BlockAllocator, PagedLatentCache
from raymoe.model import hf

warnings.filterwarnings("ignore")

GEN = 12
PROMPTS = [
    "The",
    "The river runs past the old mill",
    "When the memory is full, the newest request waits, and its tokens",
    "A block of memory holds sixteen tokens; a table of blocks holds the whole sequence. The draft model guesses "
    "the next token, and the large model checks",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt):
    return tiny_ckpt


@pytest.fixture(scope="module")
def base(tiny_base):
    """(model, tokenizer, eos) loaded once; every engine gets a deep copy."""
    return tiny_base


@pytest.fixture(scope="module")
def prompt_ids(base):
    _, tok, _ = base
    return [tok.encode(p).ids for p in PROMPTS]


def plain_greedy(model, ids: list[int], n: int) -> list[int]:
    """Reference: full recompute (no cache, naive MLA path) and argmax, n times."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]), compute_mtp=False).logits[0, -1].argmax()))
    return ids[-n:]


@pytest.fixture(scope="module")
def refs(ckpt, prompt_ids):
    model = hf.load(ckpt).eval()  # an untouched copy (engines wrap their MoE layers)
    return [plain_greedy(model, p, GEN) for p in prompt_ids]


def make_engine(base, **kw) -> LLMEngine:
    model, tok, eos = base
    return LLMEngine(copy.deepcopy(model), tok, EngineConfig(**kw), eos_token_id=eos)


GREEDY = SamplingParams(max_tokens=GEN, temperature=0.0, ignore_eos=True)


def test_paged_cache_blocks_and_slots() -> None:
    a = BlockAllocator(4)
    assert a.allocate(2) == [0, 1] and a.num_free == 2
    a.free([1])
    assert a.allocate(2) == [1, 2]
    c = PagedLatentCache(num_layers=2, num_blocks=6, block_size=4, values_per_token=3)
    bt: list[int] = []
    assert c.ensure(bt, 5) and bt == [0, 1]
    other: list[int] = []
    assert c.ensure(other, 4) and other == [2]
    assert c.ensure(bt, 9) and bt == [0, 1, 3]  # blocks need not be contiguous
    assert c.slots(bt, 3, 9).tolist() == [3, 4, 5, 6, 7, 12]
    assert not c.ensure(bt, 100) and bt == [0, 1, 3]  # nothing allocated when it cannot fit
    batch = c.batch([(bt, 7, 2), (other, 0, 3)])  # a decode-ish chunk at 7..8 and a prefill of 3
    kv = torch.arange(5 * 3, dtype=torch.float32).view(1, 5, 3)
    keys, masked = batch.gather(1, kv)
    assert keys.shape == (1, 9 + 3, 3) and masked.shape == (5, 12)
    assert torch.equal(c.buf[1, 7], kv[0, 0]) and torch.equal(c.buf[1, 12], kv[0, 1]) and torch.equal(c.buf[1, 8], kv[0, 2])
    # query 0 (seq 0, pos 7) sees seq 0 keys 0..7 only; query 2 (seq 1, pos 0) sees only seq 1 key 0
    assert (~masked[0]).nonzero().flatten().tolist() == list(range(8))
    assert (~masked[2]).nonzero().flatten().tolist() == [9]
    c.free(bt)
    assert bt == [] and c.allocator.num_free == 5


@pytest.mark.parametrize("spec, block_size, chunk, budget", [
    (0, 16, 256, 512),  # one step per prefill
    (0, 4, 8, 16),      # chunked prefill, small blocks, tight budget (prefill chunks mix with decodes)
    (1, 4, 8, 24),      # MTP drafts, 1 per step
    (2, 3, 5, 20),      # 2 chained drafts, odd block size
])
def test_greedy_equals_full_recompute(base, prompt_ids, refs, spec, block_size, chunk, budget) -> None:
    eng = make_engine(base, block_size=block_size, prefill_chunk=chunk, max_num_batched_tokens=budget,
                      num_blocks=64, num_speculative_tokens=spec)
    # staggered arrivals: requests join while others decode, and leave when done
    eng.add_request("r0", prompt_ids[0], GREEDY)
    eng.add_request("r3", prompt_ids[3], GREEDY)
    finals = {}
    steps_with_r0 = 0
    for step in range(400):
        if step == 2:
            eng.add_request("r1", prompt_ids[1], GREEDY)
        if step == 5:
            eng.add_request("r2", prompt_ids[2], GREEDY)
        outs = eng.step()
        steps_with_r0 += any(o.request_id == "r0" for o in outs)
        for o in outs:
            if o.finished:
                finals[o.request_id] = o.outputs[0].token_ids
        if len(finals) == 4:
            break
    for i in range(4):
        assert finals[f"r{i}"] == refs[i], f"prompt {i}"
    m = eng.metrics()
    assert m["kv_blocks_used"] == 0 and m["running"] == 0
    if spec:
        assert m["spec_drafted"] > 0 and 0 < m["spec_acceptance_rate"] <= 1
        assert m["spec_tokens_per_forward"] > 1.0  # the trained MTP head gets some drafts accepted
        assert steps_with_r0 < GEN  # ...so r0 needed fewer target forwards than tokens


def test_preemption_keeps_greedy_output(base, prompt_ids, refs) -> None:
    # 14 blocks of 4 tokens; the four requests are admitted (their prompts fit) but need 28 blocks once they have
    # generated everything: decoding runs out of blocks and the newest sequences are preempted and recomputed
    eng = make_engine(base, block_size=4, num_blocks=14, prefill_chunk=16, max_num_batched_tokens=64,
                      num_speculative_tokens=1)
    order = [1, 2, 1, 2]
    outs = eng.generate([prompt_ids[i] for i in order], GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == [refs[i] for i in order]
    assert eng.metrics()["preemptions"] > 0
    assert eng.metrics()["kv_blocks_used"] == 0


def test_sharded_expert_backend_same_output(base, prompt_ids, refs) -> None:
    backend = ShardedExperts(num_shards=3)
    model, tok, eos = base
    eng = LLMEngine(copy.deepcopy(model), tok, EngineConfig(num_speculative_tokens=1), eos_token_id=eos,
                    expert_backend=backend)
    outs = eng.generate(prompt_ids[:2], GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == refs[:2]
    assert backend.calls > 0


def test_greedy_equals_transformers_generate(ckpt, base, prompt_ids) -> None:
    transformers = pytest.importorskip("transformers")
    ref = transformers.DeepseekV3ForCausalLM.from_pretrained(ckpt).eval()
    ref.generation_config.eos_token_id = None
    ref.generation_config.pad_token_id = 1
    eng = make_engine(base, num_speculative_tokens=1)
    ours = eng.generate(prompt_ids, GREEDY)
    for p, o in zip(prompt_ids, ours):
        with torch.no_grad():
            out = ref.generate(torch.tensor([p]), max_new_tokens=GEN, do_sample=False, eos_token_id=None)
        assert out[0, len(p):].tolist() == o.outputs[0].token_ids


def test_seeded_sampling_is_reproducible(base, prompt_ids) -> None:
    sp = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, top_k=50, seed=123, ignore_eos=True)
    alone = make_engine(base, num_speculative_tokens=1).generate([prompt_ids[1]], sp)[0].outputs[0].token_ids
    eng = make_engine(base, num_speculative_tokens=1, max_num_batched_tokens=16, prefill_chunk=8)
    noise = SamplingParams(max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)
    mixed = eng.generate([prompt_ids[3], prompt_ids[1], prompt_ids[2]], [noise, sp, noise])
    assert mixed[1].outputs[0].token_ids == alone
    other = make_engine(base).generate([prompt_ids[1]], SamplingParams(**{**sp.__dict__, "seed": 124}))
    assert other[0].outputs[0].token_ids != alone


def test_n_choices_and_logprobs(base, prompt_ids, refs) -> None:
    eng = make_engine(base, num_speculative_tokens=1)
    out = eng.generate([prompt_ids[1]], SamplingParams(max_tokens=8, temperature=1.0, n=4, seed=5, ignore_eos=True,
                                                       logprobs=3))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    toks = [tuple(c.token_ids) for c in out.outputs]
    assert len(set(toks)) > 1 and all(len(t) == 8 for t in toks)
    for c in out.outputs:
        assert len(c.logprobs) == 8 and all(len(e["top"]) == 3 and e["logprob"] <= 0 for e in c.logprobs)
    g = eng.generate([prompt_ids[1]], SamplingParams(max_tokens=GEN, temperature=0, n=2, logprobs=2,
                                                      ignore_eos=True))[0]
    assert [c.token_ids for c in g.outputs] == [refs[1], refs[1]]
    for e in g.outputs[0].logprobs:  # greedy: the chosen token is the most likely one
        assert e["top"][0][0] == e["token_id"] and abs(e["top"][0][1] - e["logprob"]) < 1e-6


def test_stop_strings_stop_ids_and_length(base, prompt_ids, refs) -> None:
    eng = make_engine(base, num_speculative_tokens=2)
    _, tok, _ = base
    full = eng.generate([prompt_ids[1]], GREEDY)[0].outputs[0]
    assert full.finish_reason == "length" and full.text == tok.decode(refs[1])
    text = full.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = text.find(stop)
    out = eng.generate([prompt_ids[1]], SamplingParams(max_tokens=GEN, temperature=0, ignore_eos=True,
                                                       stop=["@@never@@", stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.text == text[:cut]
    sid = refs[1][4]
    k = refs[1].index(sid)
    out = eng.generate([prompt_ids[1]], SamplingParams(max_tokens=GEN, temperature=0, ignore_eos=True,
                                                       stop_token_ids=[sid]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids == refs[1][: k + 1]
    assert out.text == tok.decode(refs[1][:k])  # the stop token itself is not in the text
    out = eng.generate([prompt_ids[1]], SamplingParams(max_tokens=3, temperature=0))[0].outputs[0]
    assert out.finish_reason in ("length", "stop") and len(out.token_ids) <= 3


def test_streamed_text_is_a_growing_prefix(base, prompt_ids) -> None:
    eng = make_engine(base, num_speculative_tokens=1)
    _, tok, _ = base
    sp = SamplingParams(max_tokens=20, temperature=0.8, seed=3, ignore_eos=True,
                        stop=["sixteen", "a stop string longer than the first tokens"])
    eng.add_request("s", prompt_ids[2], sp)
    texts = []
    while eng.has_unfinished():
        for o in eng.step():
            texts.append(o.outputs[0].text)
            final = o
    for a, b in zip(texts, texts[1:]):
        assert b.startswith(a)
    assert texts[-1] == final.outputs[0].text


def test_bad_requests(base, prompt_ids) -> None:
    eng = make_engine(base, num_blocks=8, block_size=4, max_waiting=2)
    with pytest.raises(EngineError, match="empty"):
        eng.add_request(None, [], GREEDY)
    with pytest.raises(EngineError) as e:  # OpenAI / vLLM: 400 context_length_exceeded (not 413)
        eng.add_request(None, list(range(40)), GREEDY)
    assert e.value.code == 400 and e.value.error_code == "context_length_exceeded" and e.value.param == "prompt"
    with pytest.raises(EngineError) as e:  # fits alone, not with max_tokens
        eng.add_request(None, list(range(30)), GREEDY)
    assert e.value.error_code == "context_length_exceeded" and e.value.param == "max_tokens"
    with pytest.raises(EngineError) as e:
        eng.add_request(None, [1, 2], SamplingParams(max_tokens=4, logit_bias={10**6: 1.0}))
    assert e.value.param == "logit_bias"
    with pytest.raises(EngineError) as e:
        eng.add_request(None, [1, 2], SamplingParams(max_tokens=0))
    assert e.value.param == "max_tokens"
    with pytest.raises(EngineError) as e:
        eng.add_request(None, [1, 2], SamplingParams(top_p=0.0))
    assert e.value.param == "top_p"
    with pytest.raises(EngineError, match=r"\[0, "):
        eng.add_request(None, [10**6], GREEDY)
    eng.add_request(None, [1, 2], SamplingParams(max_tokens=2, n=2))
    with pytest.raises(EngineFull):
        eng.add_request(None, [1, 2], SamplingParams(max_tokens=2))
    eng.abort("req-0")
    assert not eng.has_unfinished() and eng.cache.allocator.num_used == 0
