"""The Serve app under faults, over real HTTP on 127.0.0.1 with the real `openai` client: Prometheus metrics from Ray's
metrics agent, a client that disconnects mid-stream, a waiting queue over its bound, and an engine replica SIGKILLed
under load. One Ray (metrics export on) + one Serve app for the whole module; the kill runs last."""
from __future__ import annotations

import asyncio
import os
import re
import signal
import time
import urllib.request
import warnings

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from serving_helpers import free_port, tiny_checkpoint  # noqa: E402

warnings.filterwarnings("ignore")
MODEL = "tiny"
APP = "raymoe"
# a small batch and a short waiting queue: 16 simultaneous requests overflow it (503), 6 do not
ENGINE = {"block_size": 8, "num_blocks": 256, "num_speculative_tokens": 1, "max_num_seqs": 4, "max_waiting": 4,
          "max_num_batched_tokens": 128, "prefill_chunk": 64}
PROMPTS = ["The river runs", "In the morning the baker", "A block of memory holds", "She counted the stars:",
           "When the memory is full,", "The draft model guesses"]
REPLICA_CLASS = f"ServeReplica:{APP}:EngineDeployment"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("faults"), MODEL)


@pytest.fixture(scope="module")
def server(ckpt):
    """Ray with its metrics agent exporting on a free loopback port (every 2 s), then the app on another one."""
    import ray

    from raymoe.jobs.serve import start_server, stop_server

    metrics_port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port,
             _system_config={"metrics_report_interval_ms": 2000},
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    args = {"model_path": str(ckpt), "served_model_name": MODEL, "engine": ENGINE,
            "autoscaling": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 8},
            "engine_max_queued_requests": 64}
    url = start_server(args, "127.0.0.1", free_port(), app_name=APP, timeout_s=180)
    yield {"url": url, "metrics": f"http://127.0.0.1:{metrics_port}/metrics"}
    stop_server()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server['url']}/v1", api_key="x", max_retries=0, timeout=60)


_HANDLE: list = []


def engine_info() -> dict:
    """The engine replica's own view (``EngineDeployment.info``): KV blocks, running/waiting, counters. One handle
    for the module: a new handle first waits for Serve to tell it the replicas (up to ~1 s), long enough for a
    short generation to finish before the call even reaches the engine."""
    from ray import serve

    if not _HANDLE:
        _HANDLE.append(serve.get_deployment_handle("EngineDeployment", app_name=APP))
    return _HANDLE[0].info.remote().result(timeout_s=30)


def replica_pid() -> int:
    """Pid of the live engine replica's worker process, from the GCS actor table."""
    import ray

    alive = [a for a in ray._private.state.actors().values()
             if a["ActorClassName"] == REPLICA_CLASS and a["State"] == "ALIVE"]
    assert len(alive) == 1, alive
    return int(alive[0]["Pid"])


# ---------------------------------------------------------------------------------------------- metrics
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")
SERVING_METRICS = ["ttft_s", "tpot_s", "prompt_tokens", "generation_tokens", "tokens_per_s", "queue_depth",
                   "running_seqs", "kv_blocks_used", "kv_blocks_total", "spec_acceptance_rate",
                   "spec_tokens_per_forward", "prefix_cache_hit_rate", "prefix_cached_blocks"]


def scrape(url: str) -> dict[str, float]:
    """``raymoe_serve_*`` samples → {name without ``ray_`` prefix (with _bucket/_count/_sum/_total suffix): sum}."""
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or "raymoe_serve_" not in m.group(1) or 'le="' in (m.group(2) or ""):
            continue
        name = m.group(1).split("raymoe_serve_", 1)[1]
        out[name] = out.get(name, 0.0) + float(m.group(3))
    return out


def _get(samples: dict[str, float], name: str):
    for cand in (name, f"{name}_total"):
        if cand in samples:
            return samples[cand]
    return None


def test_prometheus_serving_metrics(server, client) -> None:
    n_tok = 0
    for p in PROMPTS[:4] + [" ".join(PROMPTS)] * 2:  # the long one twice: its second run reuses cached blocks
        r = client.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True})
        n_tok += r.usage.completion_tokens
    deadline, samples, missing = time.time() + 40, {}, SERVING_METRICS
    while time.time() < deadline:
        samples = scrape(server["metrics"])
        missing = [k for k in SERVING_METRICS
                   if _get(samples, k) is None and f"{k}_count" not in samples]
        if not missing and samples.get("ttft_s_count", 0) >= 4 and (_get(samples, "generation_tokens") or 0) >= n_tok:
            break
        time.sleep(1)
    assert not missing, f"metrics missing from {server['metrics']}: {missing}; got {sorted(samples)}"
    assert samples["ttft_s_count"] >= 4 and samples["ttft_s_sum"] > 0
    assert samples["tpot_s_count"] >= 4 and 0 < samples["tpot_s_sum"] / samples["tpot_s_count"] < 5
    assert _get(samples, "generation_tokens") >= n_tok and _get(samples, "prompt_tokens") > 0
    assert _get(samples, "kv_blocks_total") == ENGINE["num_blocks"]
    assert 0 <= _get(samples, "kv_blocks_used") <= ENGINE["num_blocks"]
    assert _get(samples, "queue_depth") >= 0 and 0 <= _get(samples, "running_seqs") <= ENGINE["max_num_seqs"]
    assert _get(samples, "tokens_per_s") >= 0
    assert 0 < _get(samples, "spec_acceptance_rate") <= 1  # the trained tiny MTP head gets some drafts right
    assert 0 < _get(samples, "prefix_cache_hit_rate") < 1 and _get(samples, "prefix_cached_blocks") > 0
    assert 1 <= _get(samples, "spec_tokens_per_forward") <= 1 + ENGINE["num_speculative_tokens"]


# ---------------------------------------------------------------------------------------------- disconnect
def test_disconnect_mid_stream_frees_kv_blocks(server) -> None:
    assert engine_info()["metrics"]["kv_blocks_used"] == 0
    # as long as the tiny model's 1024-token context allows: several seconds of generation on a busy 2-core box
    # (400 tokens took ~1.5 s and sometimes ended before the metrics were read)
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 1000, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.Client(timeout=60) as h:
        with h.stream("POST", f"{server['url']}/v1/completions", json=body) as r:
            assert r.status_code == 200
            got = 0
            # the iterator stays referenced: dropped after `break`, its finalizer would close the response, i.e.
            # disconnect before the check below (the request was then sometimes aborted before engine_info ran)
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: ") and '"text"' in line:
                    got += 1
                    if got == 3:
                        break
            during = engine_info()["metrics"]
            assert during["running"] == 1 and during["kv_blocks_used"] > 0, during
            del lines
        # leaving the block closes the connection mid-stream (1000 tokens take far longer than this)
    deadline = time.time() + 20
    m = engine_info()["metrics"]
    while time.time() < deadline and (m["kv_blocks_used"] or m["running"] or m["waiting"]):
        time.sleep(0.2)
        m = engine_info()["metrics"]
    assert (m["kv_blocks_used"], m["running"], m["waiting"]) == (0, 0, 0), m
    assert m["generation_tokens"] - during["generation_tokens"] < 990  # aborted, not run to the end


# ---------------------------------------------------------------------------------------------- overload
def test_queue_over_bound_is_503_and_server_stays_healthy(server, client) -> None:
    async def burst(n: int):
        c = openai.AsyncOpenAI(base_url=f"{server['url']}/v1", api_key="x", max_retries=0, timeout=120)

        async def one(i: int):
            try:
                return await c.completions.create(model=MODEL, prompt=PROMPTS[i % len(PROMPTS)], max_tokens=48,
                                                  temperature=0, extra_body={"ignore_eos": True})
            except openai.APIStatusError as e:
                return e

        try:
            return await asyncio.gather(*(one(i) for i in range(n)))
        finally:
            await c.close()

    results = asyncio.run(burst(16))
    rejected = [r for r in results if isinstance(r, openai.APIStatusError)]
    ok = [r for r in results if not isinstance(r, Exception)]
    assert rejected and ok, f"{len(ok)} ok, {len(rejected)} rejected"
    for e in rejected:
        assert e.status_code in (429, 503)
        err = e.response.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and "overloaded" in err["message"]
    assert all(r.usage.completion_tokens == 48 for r in ok)
    assert httpx.get(f"{server['url']}/health", timeout=30).status_code == 200
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0)
    assert r.usage.completion_tokens > 0
    m = engine_info()["metrics"]
    assert (m["kv_blocks_used"], m["running"], m["waiting"]) == (0, 0, 0)


# ---------------------------------------------------------------------------------------------- replica kill
def test_engine_replica_sigkill_under_load_is_replaced(server, client) -> None:
    """SIGKILL the only engine replica under a closed-loop streaming load (10 s before the kill, until 10 s after the
    replacement is alive). Only the requests it was running may fail (< 5% of all: 4 streams in flight against
    ~100+ requests); requests sent while no replica exists wait; Serve starts a replacement, and every request sent
    after the replacement is alive succeeds."""
    pid = replica_pid()
    results: list[tuple[float, bool]] = []  # (start time, succeeded) of every request
    errors: list[str] = []
    marks: dict[str, float] = {}

    async def load(workers: int = 4) -> None:
        c = openai.AsyncOpenAI(base_url=f"{server['url']}/v1", api_key="x", max_retries=0, timeout=60)
        stop = {"t": time.time() + 120}  # cap; set to replacement + 10 s once the new replica is alive

        async def worker(w: int) -> None:
            i = w
            while time.time() < stop["t"]:
                t0 = time.time()
                try:
                    text = ""
                    stream = await c.completions.create(model=MODEL, prompt=PROMPTS[i % len(PROMPTS)],
                                                        max_tokens=24, temperature=0, stream=True,
                                                        extra_body={"ignore_eos": True})
                    async for ch in stream:
                        if ch.choices:
                            text += ch.choices[0].text
                    if not text:
                        raise RuntimeError("empty stream")
                    results.append((t0, True))
                except Exception as e:  # noqa: BLE001 - counted
                    results.append((t0, False))
                    errors.append(f"{type(e).__name__}: {str(e)[:120]}")
                    await asyncio.sleep(0.2)
                i += workers

        async def killer() -> None:
            await asyncio.sleep(10)
            marks["kill"] = time.time()
            os.kill(pid, signal.SIGKILL)
            loop = asyncio.get_running_loop()
            while time.time() < stop["t"]:  # the GCS actor table: a new live replica process
                try:
                    new = await loop.run_in_executor(None, replica_pid)
                except AssertionError:  # none (or two) alive right now
                    new = pid
                if new != pid:
                    marks["replaced"] = time.time()
                    stop["t"] = marks["replaced"] + 10
                    return
                await asyncio.sleep(0.2)

        try:
            await asyncio.gather(killer(), *(worker(w) for w in range(workers)))
        finally:
            await c.close()

    asyncio.run(load())
    failed = [t for t, ok in results if not ok]
    frac = len(failed) / max(1, len(results))
    after = [ok for t, ok in results if t > marks.get("replaced", float("inf"))]
    print(f"\nreplica SIGKILL under load: {len(failed)}/{len(results)} requests failed ({frac:.1%}), replacement "
          f"alive {marks.get('replaced', float('nan')) - marks['kill']:.1f} s after the kill, {len(after)} requests "
          f"after it; errors: {errors[:3]}")
    assert "replaced" in marks, "no replacement replica came up within the load window"
    assert len(results) > 0 and frac < 0.05, (len(failed), len(results), errors[:5])
    assert len(after) >= 4 and all(after), f"{after.count(False)} of {len(after)} requests after the replacement failed"
    # Serve replaced the replica: a new process, healthy, serving
    deadline = time.time() + 60
    new_pid = None
    while time.time() < deadline:
        try:
            new_pid = replica_pid()
            if new_pid != pid and httpx.get(f"{server['url']}/health", timeout=10).status_code == 200:
                break
        except (AssertionError, httpx.HTTPError):
            pass
        time.sleep(0.5)
    assert new_pid is not None and new_pid != pid
    for p in PROMPTS[:4]:
        r = client.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0)
        assert r.usage.completion_tokens > 0 and r.choices[0].finish_reason in ("length", "stop")
    assert engine_info()["metrics"]["kv_blocks_used"] == 0
