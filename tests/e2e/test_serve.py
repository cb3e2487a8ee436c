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
          "max_num_batched_tokens": 128, "prefill_chunk": 64}
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
    stream = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expect
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [r.choices[0].finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
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
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model=MODEL, prompt=[5] * 3000, max_tokens=4)
    assert e.value.status_code == 413
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "x"}])
    r = httpx.post(f"{server}/v1/completions", content=b"{not json", headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=MODEL, prompt="x", max_tokens=2)
    assert httpx.post(f"{server}/v1/completions", json={"prompt": "x"}).status_code == 401


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
