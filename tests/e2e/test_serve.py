"""The Ray Serve app over real HTTP on 127.0.0.1 with the real `openai` client: completions, chat, streaming, n > 1,
seeds, stop strings, concurrency, errors, API key. One Ray + one Serve app for the whole module."""
from __future__ import annotations

import concurrent.futures as cf
import warnings

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from raymoe.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from serving_helpers import free_port, tiny_checkpoint  # noqa: E402

warnings.filterwarnings("ignore")
KEY = "sk-test-key"
MODEL = "tiny"
ENGINE = {"block_size": 8, "num_blocks": 256, "num_speculative_tokens": 1, "max_waiting": 32,
          "max_num_batched_tokens": 128, "prefill_chunk": 64, "max_model_len": 256}
PROMPTS = ["The river runs", "In the morning the baker", "A block of memory holds", "She counted the stars:",
           "When the memory is full,", "The draft model guesses"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("serve"), MODEL)


@pytest.fixture(scope="module")
def server(ckpt):
    from raymoe.jobs.serve import start_server, stop_server

    args = {"model_path": str(ckpt), "served_model_name": MODEL, "api_key": KEY, "engine": ENGINE,
            # up to 2 engine replicas, scaled by Serve on ongoing requests (exercised by the last test)
            "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8,
                            "upscale_delay_s": 0, "downscale_delay_s": 600, "metrics_interval_s": 0.5,
                            "look_back_period_s": 1.0},
            "engine_max_queued_requests": 64}
    url = start_server(args, "127.0.0.1", free_port(), num_cpus=4, timeout_s=180)
    yield url
    stop_server()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local(ckpt):
    """The same engine in-process: the reference for greedy outputs."""
    import torch

    torch.set_num_threads(1)
    return LLMEngine.from_pretrained(ckpt, EngineConfig(**ENGINE))


def local_greedy(local, prompt, max_tokens=12, stop=()) -> str:
    sp = SamplingParams(max_tokens=max_tokens, temperature=0, stop=list(stop))
    return local.generate([prompt], sp)[0].outputs[0].text


def test_health_and_models(server, client) -> None:
    assert httpx.get(f"{server}/health").status_code == 200
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL]


def test_completion_greedy_text_and_token_prompt(client, local) -> None:
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert r.choices[0].text == local_greedy(local, PROMPTS[0])
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    ids = local.encode(PROMPTS[0])
    r2 = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0)
    assert r2.choices[0].text == r.choices[0].text and r2.usage.prompt_tokens == len(ids)


def test_chat_and_streaming_equal_non_streamed(client, local) -> None:
    from raymoe.actors.serve.protocol import CHAT_STOP, render_chat

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about the river."}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0)
    expect = local_greedy(local, render_chat(msgs), stop=[CHAT_STOP])
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == expect
    assert r.usage.completion_tokens > 0
    stream = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expect
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [r.choices[0].finish_reason]
    # include_usage: exactly one usage chunk, the last, with choices: []
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert all(c.choices and c.usage is None for c in chunks[:-1])
    # not asked: no usage chunk, every chunk has a choice (naive clients index choices[0])
    plain = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0,
                                                stream=True))
    assert all(c.choices and c.usage is None for c in plain)
    assert "".join(c.choices[0].delta.content or "" for c in plain) == expect
    # completions stream, sampled with a seed: concatenation equals the non-streamed text
    kw = dict(model=MODEL, prompt=PROMPTS[1], max_tokens=16, temperature=0.8, seed=11, stop=[" the "])
    full = client.completions.create(**kw).choices[0].text
    parts = [c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices]
    assert "".join(parts) == full


def test_n_seed_stop_and_logprobs(client, local) -> None:
    kw = dict(model=MODEL, prompt=PROMPTS[2], max_tokens=10, temperature=1.0, n=3, seed=1234)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1
    assert a.usage.completion_tokens == 30  # ignore_eos is off, but 3 x 10 tokens of this prompt never hit EOS
    greedy = local_greedy(local, PROMPTS[3], max_tokens=16)
    stop = greedy[len(greedy) // 2 : len(greedy) // 2 + 2]
    r = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].text == greedy[: greedy.find(stop)] and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == r.usage.completion_tokens and all(len(t) <= 2 for t in lp.top_logprobs)


def test_concurrent_greedy_equals_single(client, local) -> None:
    singles = [local_greedy(local, p) for p in PROMPTS]

    def one(p: str) -> str:
        return client.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0).choices[0].text

    with cf.ThreadPoolExecutor(len(PROMPTS)) as ex:
        got = list(ex.map(one, PROMPTS))
    assert got == singles


def test_errors_and_api_key(server, client) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=4, top_p=0.0)
    assert e.value.status_code == 400 and e.value.body["param"] == "top_p"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="", max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=4)
    with pytest.raises(openai.BadRequestError) as e:  # OpenAI and vLLM: 400 context_length_exceeded
        client.completions.create(model=MODEL, prompt=[5] * 3000, max_tokens=4)
    assert e.value.status_code == 400 and e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[5] * 200, max_tokens=100)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "x"}])
    r = httpx.post(f"{server}/v1/completions", content=b"{not json", headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=MODEL, prompt="x", max_tokens=2)
    assert httpx.post(f"{server}/v1/completions", json={"prompt": "x"}).status_code == 401


def _post(server: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server}{path}", json=body, headers={"authorization": f"Bearer {KEY}"}, timeout=120)


def test_validation_is_strict_and_openai_shaped(server, client) -> None:
    # a string boolean is refused, never truthy (it used to turn ignore_eos on)
    r = _post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2, "ignore_eos": "false"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "ignore_eos"
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = _post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": "3"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    # unknown fields are accepted (and logged once by the server)
    out = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=3, temperature=0,
                                    extra_body={"frobnicate": 1, "guided_choice": ["a"]})
    assert out.usage.completion_tokens > 0
    # chat: 8 stop strings of the user's, plus the end marker the server adds
    msgs = [{"role": "user", "content": "Tell me about the river."}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, temperature=0,
                                       stop=[f"@{i}@" for i in range(8)])
    assert r.choices[0].finish_reason in ("length", "stop")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, stop=[f"@{i}@" for i in range(9)])
    assert e.value.body["param"] == "stop"
    for kw, param in ((dict(response_format={"type": "json_object"}), "response_format"),
                      (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "tools")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, **kw)
        assert e.value.body["param"] == param and "not supported" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=4, stream_options={"include_usage": True})
    assert e.value.body["param"] == "stream_options"


def test_sampling_parameters_over_http(client, local) -> None:
    p = PROMPTS[3]
    greedy = local.generate([p], SamplingParams(max_tokens=8, temperature=0))[0].outputs[0].token_ids
    forced = next(t for t in local.encode(" bread mill") if t not in greedy)
    for temp in (0.0, 1.0):  # a strong logit_bias forces its token, greedy or sampled
        r = client.completions.create(model=MODEL, prompt=p, max_tokens=5, temperature=temp, seed=3,
                                      logit_bias={str(forced): 100})
        assert r.choices[0].text == local.decode([forced] * 5) and r.usage.completion_tokens == 5
    # min_tokens lengthens an output that would end at its first token
    short = client.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0,
                                      extra_body={"stop_token_ids": [greedy[0]]})
    assert short.usage.completion_tokens == 1 and short.choices[0].finish_reason == "stop"
    long = client.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0,
                                     extra_body={"stop_token_ids": [greedy[0]], "min_tokens": 5})
    assert long.usage.completion_tokens >= 5
    # penalties and min_p: the server's greedy / seeded output equals the in-process engine's with the same params
    kw = dict(presence_penalty=1.0, frequency_penalty=0.5)
    extra = {"repetition_penalty": 1.3, "min_p": 0.05}
    for temp in (0.0, 0.9):
        r = client.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=temp, seed=5, **kw,
                                      extra_body=extra)
        sp = SamplingParams(max_tokens=12, temperature=temp, seed=5, **kw, **extra)
        assert r.choices[0].text == local.generate([p], sp)[0].outputs[0].text
    plain = client.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0).choices[0].text
    assert plain != client.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0,
                                              extra_body={"repetition_penalty": 3.0}).choices[0].text


def test_chat_max_tokens_defaults_to_the_rest_of_the_context(server, client, local) -> None:
    from raymoe.actors.serve.protocol import CHAT_STOP, render_chat

    msgs = [{"role": "user", "content": "She counted the stars:"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0)
    ref = local.generate([render_chat(msgs)], SamplingParams(max_tokens=None, temperature=0,
                                                             stop=[CHAT_STOP]))[0].outputs[0]
    assert r.choices[0].message.content == ref.text and r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.completion_tokens == len(ref.token_ids) > 16  # the old default of 16 would have cut it
    if ref.finish_reason == "length":  # ran to the end of the context
        assert r.usage.total_tokens == min(local.max_model_len, local.cache.num_blocks * local.cache.block_size)


def test_tokenize_detokenize_and_the_exports_chat_template(server, ckpt, local) -> None:
    import transformers

    r = _post(server, "/tokenize", {"model": MODEL, "prompt": PROMPTS[1], "return_token_strs": True})
    assert r.status_code == 200, r.text
    j = r.json()
    ids = local.encode(PROMPTS[1])
    assert j["tokens"] == ids and j["count"] == len(ids) and len(j["token_strs"]) == len(ids)
    assert j["max_model_len"] == min(local.max_model_len, local.cache.num_blocks * local.cache.block_size)
    assert _post(server, "/detokenize", {"model": MODEL, "tokens": ids}).json() == {"prompt": PROMPTS[1]}
    # chat form: the server renders the export's chat_template exactly as transformers does
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(ckpt))
    for msgs in ([{"role": "user", "content": "Hello"}],
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
                  {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]):
        j = _post(server, "/tokenize", {"model": MODEL, "messages": msgs}).json()
        want = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert j["tokens"] == local.encode(want)
    bad = _post(server, "/tokenize", {"model": MODEL, "prompt": "x", "messages": [{"role": "user", "content": "x"}]})
    assert bad.status_code == 400
    bad = _post(server, "/detokenize", {"model": MODEL, "tokens": [10**6]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert httpx.post(f"{server}/tokenize", json={"prompt": "x"}).status_code == 401


def _running_engine_replicas() -> int:
    from ray import serve

    dep = serve.status().applications["raymoe"].deployments["EngineDeployment"]
    return int(dep.replica_states.get("RUNNING", 0))


def test_engine_replicas_autoscale_on_ongoing_requests(client, local) -> None:
    """24 concurrent streams against target_ongoing_requests=8: Serve adds the second engine replica while they run;
    every request completes with the single-request greedy text (runs last: the module's other tests see one
    replica unless their own load scales it)."""
    import time

    ref = local_greedy(local, PROMPTS[0], max_tokens=48)

    def one(_: int) -> str:
        return client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=48,
                                         temperature=0).choices[0].text

    deadline = time.monotonic() + 120
    scaled = _running_engine_replicas() >= 2
    while not scaled:
        assert time.monotonic() < deadline, "Serve did not start a second engine replica within 120 s"
        with cf.ThreadPoolExecutor(24) as ex:
            futs = [ex.submit(one, i) for i in range(24)]
            while not all(f.done() for f in futs):
                scaled = scaled or _running_engine_replicas() >= 2
                time.sleep(0.25)
            assert [f.result() for f in futs] == [ref] * 24
    with cf.ThreadPoolExecutor(8) as ex:  # both replicas serve identical greedy text
        assert list(ex.map(one, range(16))) == [ref] * 16
