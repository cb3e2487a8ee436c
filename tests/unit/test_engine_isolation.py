"""One request's failure ends that request only: an exception in its per-sequence step work, NaN logits from its own
tokens (greedy and sampled, with and without MTP drafts) — the others in the same batch finish with exactly the
tokens they produce alone, and every KV block comes back. Also: non-finite probabilities never reach
``multinomial``, bounded ``stop_token_ids`` checked against the vocabulary, lone surrogates refused, and the
incremental detokenizer equal to a full decode on multi-byte text while decoding a bounded window per token."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from raymoe.engine import EngineConfig, EngineError, LLMEngine, SamplingParams
from raymoe.engine.detokenize import MAX_PENDING, IncrementalDetokenizer
from raymoe.engine.sampling import SamplingError, probs_from_logits, sample_token

warnings.filterwarnings("ignore")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["The river runs past the old mill", "When the memory is full, the newest request waits",
           "A block of memory holds sixteen tokens"]
GEN = 10


def make_engine(base, model=None, **kw) -> LLMEngine:
    m, tok, eos = base
    return LLMEngine(model if model is not None else copy.deepcopy(m), tok, EngineConfig(**kw), eos_token_id=eos)


def run_all(eng: LLMEngine, prompts, params) -> dict[str, object]:
    ids = [eng.add_request(f"r{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params))]
    final = {}
    for _ in range(500):
        for o in eng.step():
            if o.finished:
                final[o.request_id] = o
        if len(final) == len(ids):
            break
    return final


@pytest.mark.parametrize("spec", [0, 1])
def test_exception_in_one_sequence_ends_only_its_request(tiny_base, spec) -> None:
    _, tok, _ = tiny_base
    prompts = [tok.encode(p).ids for p in PROMPTS]
    params = [SamplingParams(max_tokens=GEN, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=GEN, temperature=0.8, seed=7, ignore_eos=True, n=2),
              SamplingParams(max_tokens=GEN, temperature=0.0, ignore_eos=True)]
    alone = [make_engine(tiny_base, num_speculative_tokens=spec).generate([p], [sp])[0]
             for p, sp in zip(prompts, params)]
    eng = make_engine(tiny_base, num_speculative_tokens=spec)
    calls = {"n": 0}

    def hook(seq) -> None:  # the middle request breaks on its 4th step (mid-generation, n=2: both choices end)
        if seq.group.request_id == "r1":
            calls["n"] += 1
            if calls["n"] == 4:
                raise RuntimeError("boom in per-sequence code")

    eng.fault_hook = hook
    final = run_all(eng, prompts, params)
    assert final["r1"].error == "RuntimeError: boom in per-sequence code"
    assert [c.finish_reason for c in final["r1"].outputs] == ["error", "error"]
    for rid, ref in (("r0", alone[0]), ("r2", alone[2])):
        assert final[rid].error is None
        assert final[rid].outputs[0].token_ids == ref.outputs[0].token_ids
        assert final[rid].outputs[0].text == ref.outputs[0].text
    assert eng.cache.allocator.num_used == 0 and not eng.groups and not eng.failed
    # the engine goes on serving: the failed prompt alone, hook gone, gives its reference output
    eng.fault_hook = None
    again = eng.generate([prompts[1]], [params[1]])[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in alone[1].outputs]


@pytest.mark.parametrize("spec,temperature", [(0, 0.0), (0, 1.0), (1, 1.0)])
def test_nan_logits_end_the_request_not_the_engine(tiny_base, spec, temperature) -> None:
    """A NaN embedding row for one token: the request whose prompt holds it gets NaN logits and ends with an error
    (``multinomial`` never sees them; greedy never emits an arbitrary argmax of NaN); the engine frees its blocks and
    goes on serving. (Alone here; with other requests in the same step: ``test_engine_nan_isolation.py``.)"""
    model, tok, eos = tiny_base
    prompts = [tok.encode(p).ids for p in PROMPTS]
    poison = next(t for t in range(model.config.vocab_size) if t not in set(prompts[0]))
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.embed_tokens.weight[poison] = float("nan")
    sp = SamplingParams(max_tokens=GEN, temperature=temperature, seed=3, ignore_eos=True)
    ref = make_engine(tiny_base, num_speculative_tokens=spec).generate([prompts[0]], sp)[0]
    eng = make_engine(tiny_base, model=m, num_speculative_tokens=spec)
    final = run_all(eng, [prompts[1] + [poison]], [sp])
    assert final["r0"].error == "FloatingPointError: the model produced non-finite logits for this request"
    assert eng.cache.allocator.num_used == 0 and not eng.groups
    assert eng.generate([prompts[0]], sp)[0].outputs[0].token_ids == ref.outputs[0].token_ids


def test_non_finite_probabilities_never_reach_multinomial() -> None:
    g = torch.Generator().manual_seed(0)
    for bad in (float("nan"), float("inf")):
        logits = torch.randn(64, generator=g)
        logits[5] = bad
        with pytest.raises(SamplingError, match="non-finite"):
            sample_token(logits, SamplingParams(temperature=0.7), g)
        with pytest.raises(SamplingError):
            probs_from_logits(logits, SamplingParams(temperature=1.0, top_p=0.5))


def test_stop_token_ids_bounded_and_in_vocab(tiny_base) -> None:
    eng = make_engine(tiny_base)
    V = eng.model_config.vocab_size
    with pytest.raises(EngineError, match="at most 64") as e:
        eng.add_request(None, "The river", SamplingParams(stop_token_ids=list(range(65))))
    assert e.value.param == "stop_token_ids" and e.value.code == 400
    with pytest.raises(EngineError, match=rf"stop_token_ids must be in \[0, {V}\)"):
        eng.add_request(None, "The river", SamplingParams(stop_token_ids=[V + 5]))
    # a stop id is honoured through the set: greedy output cut at its first occurrence
    full = eng.generate(["The river"], SamplingParams(max_tokens=GEN, temperature=0, ignore_eos=True))[0]
    ids = full.outputs[0].token_ids
    stop = ids[3]
    cut = eng.generate(["The river"], SamplingParams(max_tokens=GEN, temperature=0, ignore_eos=True,
                                                     stop_token_ids=[stop]))[0].outputs[0]
    assert cut.token_ids == ids[: ids.index(stop) + 1] and cut.finish_reason == "stop"
    assert eng.cache.allocator.num_used == 0


def test_lone_surrogate_prompt_is_a_400(tiny_base) -> None:
    eng = make_engine(tiny_base)
    with pytest.raises(EngineError, match="not valid Unicode") as e:
        eng.add_request(None, "abc \ud800 def", SamplingParams())
    assert e.value.code == 400 and e.value.param == "prompt"


class CountingTokenizer:
    """The real tokenizer, recording how many ids each decode call got."""

    def __init__(self, tok) -> None:
        self.tok, self.sizes = tok, []

    def decode(self, ids, skip_special_tokens=True):
        self.sizes.append(len(ids))
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def test_incremental_detokenizer_equals_full_decode_on_unicode(tiny_base) -> None:
    _, tok, _ = tiny_base
    text = ("Ça coûte 3 € — naïve façade, Grüße aus Köln; 日本語のテキスト, 한국어, "
            "emoji 🙂🚀👍🏽 and Ελληνικά / русский текст. ") * 6
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text and len(ids) > 200
    counting = CountingTokenizer(tok)
    d = IncrementalDetokenizer(counting)
    mid_char = 0
    for k in range(len(ids)):
        d.add([ids[k]])
        full = tok.decode(ids[: k + 1])
        assert d.text == full, k
        mid_char += full.endswith("\ufffd")
    assert mid_char > 10  # the text really splits characters across tokens
    # each add decodes a short window, never the whole output (two decodes per add)
    assert max(counting.sizes) <= MAX_PENDING + 2, max(counting.sizes)
    assert sum(counting.sizes) <= 2 * (MAX_PENDING + 2) * len(ids)


def test_engine_text_is_the_full_decode_of_its_tokens(tiny_base) -> None:
    """Sampled output (arbitrary byte tokens, so partial characters): the engine's incremental text equals a
    full decode of the output ids, for streamed snapshots' final state and with stop strings."""
    eng = make_engine(tiny_base, num_speculative_tokens=1)
    _, tok, _ = tiny_base
    outs = eng.generate(PROMPTS, SamplingParams(max_tokens=40, temperature=1.5, seed=11, ignore_eos=True, n=2))
    for o in outs:
        for c in o.outputs:
            assert c.text == tok.decode(c.token_ids), c.token_ids
    full = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0].outputs[0]
    stop = full.text[10:13]
    cut = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True,
                                                    stop=[stop]))[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index(stop)]
