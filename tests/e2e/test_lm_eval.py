"""lm-evaluation-harness (``local-completions``) against our Serve app over HTTP, on small local tasks written here:
its loglikelihoods are the model's own on the same tokens, the perplexity it reports on held-out text is what the
model computes, and its generations with stop sequences are the engine's greedy ones. Nothing is downloaded."""
from __future__ import annotations

import json
import math
import os
import re
import warnings

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")
httpx = pytest.importorskip("httpx")

from raymoe.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from serving_helpers import free_port, tiny_checkpoint  # noqa: E402

warnings.filterwarnings("ignore")
MODEL = "tiny-eval"
ENGINE = {"block_size": 8, "num_blocks": 128, "num_speculative_tokens": 0, "max_num_batched_tokens": 128,
          "prefill_chunk": 64}
MC = [  # question, choices, label (the harness scores " " + choice after the question)
    ("The river runs past the old", ["mill", "dog", "server"], 0),
    ("The quick brown fox jumps over the", ["lazy dog", "stone bridge", "memory"], 0),
    ("She counted the", ["stars", "boats", "tokens"], 0),
]
HELD_OUT = ["The children counted the boats under the bridge.", "A large expert reads the stream of tokens."]
GEN = ["The river runs past", "In the morning the baker"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    ckpt = tiny_checkpoint(root, "ckpt")
    # the HF tokenizer the harness loads: our tokenizer.json wrapped by transformers (end-of-text as eos)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(ckpt / "tokenizer.json"), eos_token="<|endoftext|>",
                                               pad_token="<|pad|>")
    tok.save_pretrained(root / "tok")
    tasks = root / "tasks"
    tasks.mkdir()
    (root / "mc.jsonl").write_text("".join(json.dumps({"question": q, "choices": c, "label": y}) + "\n"
                                           for q, c, y in MC))
    (root / "ppl.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in HELD_OUT))
    (root / "gen.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in GEN))
    common = "output_type: {kind}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {file}\ntest_split: test\n"
    (tasks / "mc.yaml").write_text("task: raymoe_mc\n" + common.format(kind="multiple_choice", file=root / "mc.jsonl")
                                   + 'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
                                   'doc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n')
    (tasks / "ppl.yaml").write_text("task: raymoe_ppl\n" + common.format(kind="loglikelihood_rolling",
                                                                          file=root / "ppl.jsonl")
                                    + 'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n'
                                    "  - metric: word_perplexity\n  - metric: byte_perplexity\n"
                                    "  - metric: bits_per_byte\n")
    (tasks / "gen.yaml").write_text("task: raymoe_gen\n" + common.format(kind="generate_until", file=root / "gen.jsonl")
                                    + 'doc_to_text: "{{prompt}}"\ndoc_to_target: ""\n'
                                    'generation_kwargs:\n  until: ["."]\n  max_gen_toks: 24\n  do_sample: false\n'
                                    "metric_list:\n  - metric: exact_match\n")
    return ckpt, root / "tok", tasks, tok


@pytest.fixture(scope="module")
def server(setup):
    from raymoe.jobs.serve import start_server, stop_server

    ckpt = setup[0]
    url = start_server({"model_path": str(ckpt), "served_model_name": MODEL, "engine": ENGINE}, "127.0.0.1",
                       free_port(), num_cpus=4, timeout_s=180)
    yield url
    stop_server()


@pytest.fixture(scope="module")
def model(setup):
    torch.set_num_threads(1)
    return LLMEngine.from_pretrained(setup[0], EngineConfig(**ENGINE))


def _loglik(m, ids: list[int], start: int) -> float:
    """Sum of log p(ids[t] | ids[:t]) for t >= start, from one forward of our model."""
    with torch.no_grad():
        lp = torch.log_softmax(m.model(torch.tensor([ids])).logits[0].float(), -1)
    return float(sum(lp[t - 1, ids[t]] for t in range(start, len(ids))))


def _pair(args) -> tuple[str, str]:
    if isinstance(args, dict):  # newer harness versions serialise request args as {"gen_args_0": {"arg_0": ...}}
        args = [v["arg_0"] if isinstance(v, dict) else v for v in args.values()]
    return args[0], args[1]


def test_echo_logprobs_over_http(server, setup, model) -> None:
    tok = setup[3]
    ids = tok.encode("The river runs past the old mill", add_special_tokens=False)
    r = httpx.post(f"{server}/v1/completions", json={"model": MODEL, "prompt": ids, "max_tokens": 0, "echo": True,
                                                       "logprobs": 1, "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None and len(lp["tokens"]) == len(ids)
    assert sum(lp["token_logprobs"][1:]) == pytest.approx(_loglik(model, ids, 1), abs=1e-4)
    assert r.json()["choices"][0]["text"] == tok.decode(ids)
    bad = httpx.post(f"{server}/v1/completions", json={"prompt": "x", "echo": True, "stream": True}, timeout=60)
    assert bad.status_code == 400 and "stream" in bad.json()["error"]["message"]


def test_lm_eval_against_the_server(server, setup, model) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    _, tokdir, tasks, tok = setup
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", OPENAI_API_KEY="unused")
    out = simple_evaluate(
        model="local-completions",
        model_args={"base_url": f"{server}/v1/completions", "model": MODEL, "tokenizer_backend": "huggingface",
                    "tokenizer": str(tokdir), "max_length": 256, "num_concurrent": 1, "max_retries": 1,
                    "tokenized_requests": True},
        tasks=["raymoe_mc", "raymoe_ppl", "raymoe_gen"], task_manager=TaskManager(include_path=str(tasks)),
        log_samples=True, apply_chat_template=False)
    # loglikelihoods: each (context, continuation) the harness sent, scored by our model on the same tokens
    n = 0
    for s in out["samples"]["raymoe_mc"]:
        for args, resp in zip(s["arguments"], s["resps"]):
            ctx, cont = _pair(args)
            whole = tok.encode(ctx + cont, add_special_tokens=False)
            start = len(tok.encode(ctx, add_special_tokens=False))
            assert resp[0][0] == pytest.approx(_loglik(model, whole, start), abs=1e-4), (ctx, cont)
            n += 1
    assert n == sum(len(c) for _, c, _ in MC)
    # perplexity on held-out text: the harness' word perplexity = exp(-sum loglik / words), the log-likelihood of
    # each document after the end-of-text token, from our model
    ll = sum(_loglik(model, [tok.eos_token_id] + tok.encode(t, add_special_tokens=False), 1) for t in HELD_OUT)
    words = sum(len(re.split(r"\s+", t)) for t in HELD_OUT)
    got = out["results"]["raymoe_ppl"]["word_perplexity,none"]
    assert got == pytest.approx(math.exp(-ll / words), rel=1e-5)
    # generation with stop sequences: the engine's greedy text up to the first "."
    assert len(out["samples"]["raymoe_gen"]) == len(GEN)
    for s in out["samples"]["raymoe_gen"]:
        prompt = s["doc"]["prompt"]
        ref = model.generate([tok.encode(prompt, add_special_tokens=False)],
                             SamplingParams(max_tokens=24, temperature=0, stop=[".", "<|endoftext|>"]))
        assert s["resps"][0][0] == ref[0].outputs[0].text, prompt


def test_echo_options() -> None:
    from raymoe.actors.serve import protocol as P

    body, echo, score_only = P.echo_options({"prompt": "x", "echo": True, "max_tokens": 0, "logprobs": 1})
    assert echo and score_only and body == {"prompt": "x", "max_tokens": 1, "logprobs": 1}
    assert P.echo_options({"prompt": "x"}) == ({"prompt": "x"}, False, False)
    for bad, what in (({"echo": 1}, "boolean"), ({"echo": True, "stream": True}, "stream"),
                      ({"echo": True, "n": 2}, "n=1")):
        with pytest.raises(P.APIError, match=what):
            P.echo_options({"prompt": "x", **bad})
