"""Logits processors (logit_bias, min_tokens, repetition / frequency / presence penalties, min_p): the vectorised
``process_logits`` against a per-row, per-token reference written from vLLM's / OpenAI's definitions, and the engine
end to end (greedy decoding with penalties equals a full-recompute reference loop; a strong bias forces a token;
min_tokens lengthens an output that would end early; chat's ``max_tokens=None`` is the rest of the context)."""
from __future__ import annotations

import copy

import pytest
import torch

from raymoe.engine import EngineConfig, EngineError, LLMEngine, SamplingParams
from raymoe.engine.sampling import probs_from_logits, process_logits
from raymoe.model import hf

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NINF = float("-inf")


def ref_row(x: list[float], p: SamplingParams, prompt: list[int], out: list[int], eos) -> list[float]:
    """One row, one token at a time, straight from the definitions."""
    x = list(x)
    for t, b in (p.logit_bias or {}).items():
        x[t] += b
    if len(out) < p.min_tokens:
        for t in list(p.stop_token_ids) + ([eos] if eos is not None and not p.ignore_eos else []):
            x[t] = NINF
    for v in range(len(x)):
        c = out.count(v)
        if v in prompt or c:
            x[v] = x[v] / p.repetition_penalty if x[v] > 0 else x[v] * p.repetition_penalty
        x[v] -= p.frequency_penalty * c + p.presence_penalty * (1 if c else 0)
    if p.min_p > 0 and p.temperature > 0:
        probs = torch.tensor(x).div(p.temperature).softmax(-1).tolist()
        top = max(probs)
        x = [NINF if q < p.min_p * top else v for v, q in zip(x, probs)]
    return x


def test_process_logits_equals_per_row_reference() -> None:
    g = torch.Generator().manual_seed(0)
    V, eos = 64, 3
    logits = torch.randn(6, V, generator=g) * 3
    params = [
        SamplingParams(),  # untouched row in the same batch
        SamplingParams(repetition_penalty=1.7, temperature=0.8),
        SamplingParams(presence_penalty=0.9, frequency_penalty=0.4),
        SamplingParams(presence_penalty=-0.5, frequency_penalty=-1.0, repetition_penalty=0.6, min_p=0.05,
                       temperature=1.3),
        SamplingParams(logit_bias={5: 30.0, 7: -100.0, 63: 0.5}, min_tokens=4, stop_token_ids=[9, 11]),
        SamplingParams(min_tokens=2, ignore_eos=True, stop_token_ids=[12], min_p=0.3, temperature=0.5,
                       repetition_penalty=1.2),
    ]
    prompts = [[1, 2], [4, 4, 8, 20], [30], [5, 6, 7, 7, 40], [1], [12, 13]]
    outs = [[5], [8, 9, 9, 21], [30, 30, 30, 2, 2, 50], [], [1, 2], [13, 60, 60]]
    got = process_logits(logits, params, prompts, outs, eos)
    ref = torch.tensor([ref_row(logits[i].tolist(), params[i], prompts[i], outs[i], eos) for i in range(6)])
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(got[0], logits[0]) and got[4, eos] == got[4, 9] == got[4, 11] == NINF
    assert (got[3] == NINF).any() and (got[5] == NINF).sum() > 1  # min_p dropped tokens
    # min_p in logit space equals min_p on the tempered probabilities (vLLM's definition)
    p = probs_from_logits(got[3], params[3])
    q = logits.new_tensor(ref_row(logits[3].tolist(), SamplingParams(presence_penalty=-0.5, frequency_penalty=-1.0,
                                                                     repetition_penalty=0.6), prompts[3], [], eos))
    q = (q / 1.3).softmax(-1)
    keep = q >= 0.05 * q.max()
    torch.testing.assert_close(p, torch.where(keep, q, 0.0) / q[keep].sum(), rtol=1e-5, atol=1e-7)


def test_params_validation() -> None:
    for kw, param in ((dict(presence_penalty=2.5), "presence_penalty"),
                      (dict(frequency_penalty=-3), "frequency_penalty"),
                      (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(min_p=1.5), "min_p"),
                      (dict(logit_bias={1: 101.0}), "logit_bias"), (dict(logit_bias={-1: 1.0}), "logit_bias"),
                      (dict(min_tokens=20, max_tokens=10), "min_tokens"), (dict(min_tokens=-1), "min_tokens"),
                      (dict(stop=["x"] * 17), "stop")):
        with pytest.raises(ValueError) as e:
            SamplingParams(**kw).validate()
        assert e.value.param == param, kw
    SamplingParams(stop=["x"] * 9).validate()  # the API's 8 plus chat's end marker
    assert not SamplingParams().processes_logits and SamplingParams(min_tokens=1).processes_logits


# ---------------------------------------------------------------------------------------------- engine end to end
@pytest.fixture(scope="module")
def base(tiny_base):
    return tiny_base


def make_engine(base, **kw) -> LLMEngine:
    model, tok, eos = base
    return LLMEngine(copy.deepcopy(model), tok, EngineConfig(**kw), eos_token_id=eos)


def ref_greedy(model, prompt: list[int], p: SamplingParams, n: int, eos) -> list[int]:
    """Full recompute (no cache), the per-row reference processors, argmax; stops on EOS/stop ids after min_tokens."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            x = model(torch.tensor([ids]), compute_mtp=False).logits[0, -1].float()
            t = int(torch.tensor(ref_row(x.tolist(), p, prompt, out, eos)).argmax())
            ids.append(t), out.append(t)
            if len(out) >= p.min_tokens and (t in p.stop_token_ids or (t == eos and not p.ignore_eos)):
                break
    return out


def test_engine_greedy_with_penalties_equals_reference(tiny_ckpt, base) -> None:
    _, tok, eos = base
    model = hf.load(tiny_ckpt).eval()
    prompt = tok.encode("The river runs past the old mill and the river").ids
    plist = [SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, repetition_penalty=1.5),
             SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, presence_penalty=1.5,
                            frequency_penalty=0.7),
             SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logit_bias={tok.token_to_id("Ġthe"): 3.0})]
    plain = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    eng = make_engine(base, num_speculative_tokens=2)  # processor requests are not drafted; plain ones are
    outs = eng.generate([prompt] * 4, plist + [plain])
    for o, p in zip(outs, plist + [plain]):
        assert o.outputs[0].token_ids == ref_greedy(model, prompt, p, 10, eos)
    assert outs[0].outputs[0].token_ids != outs[3].outputs[0].token_ids  # the penalty changed the output


def test_logit_bias_forces_a_token_and_min_tokens_lengthens(base) -> None:
    _, tok, eos = base
    eng = make_engine(base)
    prompt = tok.encode("She counted the stars:").ids
    plain = eng.generate([prompt], SamplingParams(max_tokens=6, temperature=0))[0].outputs[0].token_ids
    forced = tok.encode(" bread").ids[0]
    assert forced not in plain
    for temp in (0.0, 1.0):
        o = eng.generate([prompt], SamplingParams(max_tokens=6, temperature=temp, seed=1,
                                                  logit_bias={forced: 100.0}))[0].outputs[0]
        assert o.token_ids == [forced] * 6
    first = eng.generate([prompt], SamplingParams(max_tokens=8, temperature=0))[0].outputs[0].token_ids[0]
    short = eng.generate([prompt], SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[first]))[0].outputs[0]
    assert short.token_ids == [first] and short.finish_reason == "stop"
    long = eng.generate([prompt], SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[first],
                                                 min_tokens=5))[0].outputs[0]
    assert len(long.token_ids) >= 5 and first not in long.token_ids[:5]
    # eos is suppressed too: forced by a bias it still cannot come before min_tokens
    o = eng.generate([prompt], SamplingParams(max_tokens=6, temperature=0, logit_bias={eos: 100.0},
                                              min_tokens=3))[0].outputs[0]
    assert len(o.token_ids) == 4 and o.token_ids[3] == eos and eos not in o.token_ids[:3] and o.finish_reason == "stop"


def test_max_tokens_none_is_the_rest_of_the_context(base) -> None:
    eng = make_engine(base, max_model_len=24, block_size=4)
    prompt = list(range(2, 18))
    sp = SamplingParams(max_tokens=None, temperature=0, ignore_eos=True)
    o = eng.generate([prompt], sp)[0].outputs[0]
    assert len(o.token_ids) == 24 - 16 and o.finish_reason == "length" and sp.max_tokens is None
    with pytest.raises(EngineError) as e:
        eng.add_request(None, list(range(2, 26)), sp)
    assert e.value.error_code == "context_length_exceeded"
