"""Serving robustness over real HTTP with the real `openai` client: /health answers at once while the model loads
(503) and 200 after; the API key (from $RAYMOE_API_KEY) guards every route but /health and never appears in Serve's
status/details or any process's arguments; a chunked body over the limit is refused while it is still arriving;
the ingress queue is bounded (429 + Retry-After); a lone surrogate is a 400; one request failing inside the engine
(a real exception in its per-sequence code, through a test hook) ends that request with an OpenAI-shaped 500
(in-band for a stream) while concurrent requests complete with their reference text; and a step loop that dies
makes check_health fail, so Serve replaces the replica; so does a step that hangs past engine_step_timeout_s (these
two run last)."""
from __future__ import annotations

import asyncio
import json
import os
import pathlib
import socket
import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from serving_helpers import free_port, tiny_checkpoint  # noqa: E402

MODEL = "tiny-robust"
APP = "robust"
KEY = "rk-" + os.urandom(12).hex()
BODY_LIMIT = 4096
MAX_PENDING = 4  # the isolation test runs 4 requests at once
ENGINE = {"block_size": 8, "num_blocks": 256, "max_num_seqs": 8, "max_num_batched_tokens": 128,
          "prefill_chunk": 64}
PROMPTS = ["The river runs", "In the morning the baker", "A block of memory holds"]
BAD_PREFIX = [7, 7, 7, 7, 3, 9]  # token-id prompts starting with this fail in per-sequence code (test hook)
REPLICA_CLASS = f"ServeReplica:{APP}:EngineDeployment"
STEP_TIMEOUT_S = 10.0  # a tiny-model step takes milliseconds: 10 s is a wedged replica even on a loaded CI host


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("robust"), MODEL)


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    """The app with a key from $RAYMOE_API_KEY, test hooks on, and the engine replica held 'loading' (a hold file)
    until /health was seen answering 503 at once."""
    import ray

    from raymoe.jobs.serve import start_server, stop_server

    hold = pathlib.Path(tmp_path_factory.mktemp("hold")) / "hold"
    hold.write_text("")
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "RAYMOE_TEST_HOOKS": "1",
                                       "RAYMOE_TEST_ENGINE_HOLD_FILE": str(hold)}})
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = {"model_path": str(ckpt), "served_model_name": MODEL, "engine": ENGINE,
            "autoscaling": {"min_replicas": 1, "max_replicas": 1}, "max_body_bytes": BODY_LIMIT,
            "ingress_max_pending_requests": MAX_PENDING, "engine_health_check_period_s": 1.0,
            "engine_step_timeout_s": STEP_TIMEOUT_S}
    os.environ["RAYMOE_API_KEY"] = KEY
    started: dict = {}

    def start() -> None:
        try:
            started["url"] = start_server(args, "127.0.0.1", port, app_name=APP, timeout_s=240)
        except BaseException as e:  # noqa: BLE001 - reported below
            started["error"] = e

    t = threading.Thread(target=start, daemon=True)
    t.start()
    health: list[tuple[int, float]] = []
    deadline = time.time() + 60
    while time.time() < deadline and not health and t.is_alive():
        t0 = time.time()
        try:
            r = httpx.get(f"{url}/health", timeout=10)
            if r.status_code != 404:  # 404: the proxy is up, the app's route not yet
                health.append((r.status_code, time.time() - t0))
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    for _ in range(3):  # the first answer may include the ingress replica's start; these time /health itself
        t0 = time.time()
        r = httpx.get(f"{url}/health", timeout=30)
        health.append((r.status_code, time.time() - t0))
    hold.unlink()
    t.join(240)
    os.environ.pop("RAYMOE_API_KEY", None)
    assert "error" not in started, started.get("error")
    yield {"url": started["url"], "health_while_loading": health}
    stop_server(APP)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server['url']}/v1", api_key=KEY, max_retries=0, timeout=120)


def _handle():
    from ray import serve

    return serve.get_deployment_handle("EngineDeployment", app_name=APP)


def _is_openai_error(body: dict) -> dict:
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_health_answers_at_once_503_while_loading_then_200(server) -> None:
    health = server["health_while_loading"]
    assert len(health) == 4 and all(status == 503 for status, _ in health), health
    assert all(seconds < 2 for _, seconds in health[1:]), health  # the engine is held: no waiting on it
    r = httpx.get(f"{server['url']}/health", timeout=10)
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_every_route_but_health_needs_the_key(server) -> None:
    url = server["url"]
    for path in ("/v1/models", "/openapi.json", "/docs"):
        r = httpx.get(f"{url}{path}", timeout=30)
        assert r.status_code == 401, (path, r.status_code)
        assert _is_openai_error(r.json())["code"] == "invalid_api_key"
        r = httpx.get(f"{url}{path}", headers={"Authorization": f"Bearer {KEY}x"}, timeout=30)
        assert r.status_code == 401, path
        r = httpx.get(f"{url}{path}", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        assert r.status_code == 200, (path, r.text[:200])
    assert "/v1/completions" in httpx.get(f"{url}/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()[
        "paths"]
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=30)
    assert r.status_code == 401
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200
    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.get(f"{url}/no/such/route", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 404 and _is_openai_error(r.json())


def test_key_never_in_serve_config_status_or_process_args(server) -> None:
    from ray import serve
    from ray.serve.context import _get_global_client

    details = json.dumps(_get_global_client().get_serve_details(), default=str)
    assert APP in details and KEY not in details
    assert KEY not in str(serve.status())
    for proc in pathlib.Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                assert KEY.encode() not in (proc / "cmdline").read_bytes(), proc
            except OSError:
                pass


def test_chunked_body_over_limit_refused_while_arriving(server) -> None:
    """Chunks past the limit and then nothing (no terminating chunk): a server that read the whole body first
    would wait forever; ours answers 413 as soon as the limit is crossed."""
    host, port = server["url"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Authorization: Bearer {KEY}\r\n".encode() + b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * 1024
        for _ in range(BODY_LIMIT // 1024 + 2):
            s.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        s.settimeout(30)
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(65536)
        head, body = data.split(b"\r\n\r\n", 1)
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        while len(body) < length:
            body += s.recv(65536)
    assert head.startswith(b"HTTP/1.1 413"), head[:300]
    body = json.loads(body)
    assert _is_openai_error(body)["code"] == "request_too_large"


def test_lone_surrogate_prompt_is_400(server) -> None:
    raw = b'{"model": "%s", "prompt": "abc \\ud800 def", "max_tokens": 4}' % MODEL.encode()
    r = httpx.post(f"{server['url']}/v1/completions", content=raw, timeout=60,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    err = _is_openai_error(r.json())
    assert err["param"] == "prompt" and "Unicode" in err["message"]


def test_ingress_queue_bounded_429_with_retry_after(server) -> None:
    async def burst(n: int):
        async with httpx.AsyncClient(timeout=120) as h:
            body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 64, "temperature": 0, "ignore_eos": True}
            return await asyncio.gather(*(h.post(f"{server['url']}/v1/completions", json=body,
                                                 headers={"Authorization": f"Bearer {KEY}"}) for _ in range(n)))

    rs = asyncio.run(burst(3 * MAX_PENDING))
    codes = sorted(r.status_code for r in rs)
    assert codes.count(200) >= 1 and codes.count(429) >= 1 and set(codes) <= {200, 429}, codes
    for r in rs:
        if r.status_code == 429:
            assert r.headers["retry-after"] == "1"
            assert _is_openai_error(r.json())["type"] == "rate_limit_error"
        else:
            assert r.json()["usage"]["completion_tokens"] == 64
    # the slots are released: a sequential request is admitted
    r = httpx.post(f"{server['url']}/v1/completions", json={"prompt": PROMPTS[1], "max_tokens": 4},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200


def test_one_failing_request_ends_alone_others_complete(server, client) -> None:
    refs = [client.completions.create(model=MODEL, prompt=p, max_tokens=24, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].text for p in PROMPTS[:2]]
    _handle().test_hook.remote("fail_prompt_prefix", BAD_PREFIX).result(timeout_s=30)
    try:
        async def mixed():
            c = openai.AsyncOpenAI(base_url=f"{server['url']}/v1", api_key=KEY, max_retries=0, timeout=120)

            async def good(p: str) -> str:
                text = ""
                stream = await c.completions.create(model=MODEL, prompt=p, max_tokens=24, temperature=0,
                                                    stream=True, extra_body={"ignore_eos": True})
                async for ch in stream:
                    if ch.choices:
                        text += ch.choices[0].text
                return text

            async def bad_nonstream():
                try:
                    await c.completions.create(model=MODEL, prompt=BAD_PREFIX + [11, 12], max_tokens=24,
                                               temperature=0, extra_body={"ignore_eos": True})
                except openai.APIStatusError as e:
                    return e
                return None

            async def bad_stream() -> list[dict]:
                events = []
                async with httpx.AsyncClient(timeout=120) as h:
                    body = {"model": MODEL, "prompt": BAD_PREFIX + [13], "max_tokens": 24, "temperature": 0,
                            "stream": True, "ignore_eos": True}
                    async with h.stream("POST", f"{server['url']}/v1/completions", json=body,
                                        headers={"Authorization": f"Bearer {KEY}"}) as r:
                        async for line in r.aiter_lines():
                            if line.startswith("data: ") and line != "data: [DONE]":
                                events.append(json.loads(line[6:]))
                return events

            try:
                return await asyncio.gather(good(PROMPTS[0]), bad_nonstream(), good(PROMPTS[1]), bad_stream())
            finally:
                await c.close()

        g0, err, g1, events = asyncio.run(mixed())
    finally:
        _handle().test_hook.remote("fail_prompt_prefix", None).result(timeout_s=30)
    assert [g0, g1] == refs
    assert isinstance(err, openai.InternalServerError) and err.status_code == 500
    e = _is_openai_error(err.response.json())
    assert e["type"] == "server_error" and "injected per-sequence fault" in e["message"]
    assert events and "error" in events[-1] and "injected per-sequence fault" in events[-1]["error"]["message"]
    assert any(ev.get("choices") and ev["choices"][0]["text"] for ev in events[:-1])  # it failed mid-generation
    info = _handle().info.remote().result(timeout_s=30)["metrics"]
    assert (info["kv_blocks_used"], info["running"], info["waiting"]) == (0, 0, 0)
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=24, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == refs[0]


def _replica_pid() -> int | None:
    import ray

    alive = [a for a in ray._private.state.actors().values()
             if a["ActorClassName"] == REPLICA_CLASS and a["State"] == "ALIVE"]
    return int(alive[0]["Pid"]) if len(alive) == 1 else None


def test_dead_step_loop_fails_health_and_serve_replaces_the_replica(server, client) -> None:
    ref = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=8, temperature=0).choices[0].text
    pid = _replica_pid()
    assert pid is not None
    _handle().test_hook.remote("kill_loop").result(timeout_s=30)
    # the loop dies at its next wake-up (this request wakes it): the request gets an OpenAI-shaped error
    r = httpx.post(f"{server['url']}/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 4},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code in (500, 503) and _is_openai_error(r.json())
    _wait_replaced(server["url"], pid, "whose step loop died")
    out = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=8, temperature=0).choices[0].text
    assert out == ref


def _wait_replaced(url: str, pid: int, what: str, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    new = None
    while time.time() < deadline:
        new = _replica_pid()
        if new is not None and new != pid and httpx.get(f"{url}/health", timeout=10).status_code == 200:
            return
        time.sleep(0.5)
    raise AssertionError(f"Serve did not replace the replica {what} (pid {pid}, now {new})")


def test_wedged_step_fails_health_and_serve_replaces_the_replica(server, client) -> None:
    ref = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=8, temperature=0).choices[0].text
    pid = _replica_pid()
    assert pid is not None
    _handle().test_hook.remote("wedge_step", 600).result(timeout_s=30)
    # this request wakes the loop and its step hangs: health stays 200 until the step has run past the timeout, then
    # check_health fails, Serve stops the replica, and the request ends with an OpenAI-shaped error, not a hang
    t0 = time.time()
    seen: dict = {}

    def call() -> None:
        seen["r"] = httpx.post(f"{server['url']}/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 4},
                               headers={"Authorization": f"Bearer {KEY}"}, timeout=170)
        seen["t"] = time.time() - t0

    t = threading.Thread(target=call, daemon=True)
    t.start()
    time.sleep(STEP_TIMEOUT_S / 2)
    assert _replica_pid() == pid  # not before the timeout
    t.join(180)
    assert "r" in seen, "the request on the wedged replica never returned"
    assert seen["r"].status_code in (500, 503) and _is_openai_error(seen["r"].json())
    assert seen["t"] > STEP_TIMEOUT_S, seen["t"]
    _wait_replaced(server["url"], pid, "whose step hung")
    out = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=8, temperature=0).choices[0].text
    assert out == ref
