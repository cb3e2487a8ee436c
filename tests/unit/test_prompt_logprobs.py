"""``LLMEngine.prompt_logprobs`` (OpenAI ``echo`` scoring) against the engine's own generation:
a prompt's scores are the logprobs the engine reports when it generates those very tokens."""
from __future__ import annotations

import copy

import pytest

from raymoe.engine import EngineConfig, EngineError, LLMEngine, SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_prompt_scores_equal_generation_logprobs(tiny_base) -> None:
    model, tok, eos = tiny_base
    eng = LLMEngine(copy.deepcopy(model), tok, EngineConfig(block_size=8, num_blocks=64, num_speculative_tokens=0),
                    eos_token_id=eos)
    prompt = eng.encode("The river runs past the old")
    out = eng.generate([prompt], SamplingParams(max_tokens=6, temperature=0, logprobs=3, ignore_eos=True))[0]
    gen = out.outputs[0]
    ids, entries = eng.prompt_logprobs(prompt + list(gen.token_ids), k=3)
    assert ids == prompt + list(gen.token_ids) and entries[0] is None and len(entries) == len(ids)
    for e, g in zip(entries[len(prompt):], gen.logprobs):
        assert e["token_id"] == g["token_id"]
        assert e["logprob"] == pytest.approx(g["logprob"], abs=1e-4)
        assert [i for i, _ in e["top"]] == [i for i, _ in g["top"]]
    with pytest.raises(EngineError, match="maximum context length"):
        eng.prompt_logprobs([1] * (eng.max_model_len + 1))
