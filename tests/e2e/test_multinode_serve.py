"""Serving across nodes, and the loss of a node that holds an expert shard.

A real multi-node Ray cluster on this machine (:class:`raymoe.jobs.local_cluster.LocalCluster`: every node its own
``ray start`` on its own loopback address): the head on 127.0.0.20 (no CPUs: Serve's controller and HTTP proxy, the
ingress, the experts registry), an **engine node** 127.0.0.21 offering the custom resource ``engine``, and two
**shard nodes** 127.0.0.22 / 127.0.0.23 offering ``shard``. A separate driver process
(``RAY_ADDRESS=<cluster> python -c ... start_server(...)``, its code shipped as ``py_modules``) deploys the app
with ``experts.backend=remote``, 2 shards pinned by ``experts.remote.resources={"shard": 1}``, the engine by
``engine_resources={"engine": 1}``, the ingress on the head, Serve's one proxy on the head (``HeadOnly``), HTTP on
127.0.0.1. The tiny checkpoint sits in a temporary directory on this machine, which every node reads: on one
machine that is a shared disk by construction (a real cluster needs the checkpoint on each node or on shared
storage).

Checked: each replica runs on the node its resources name (Ray's state API, independently of what the replicas
report), shards listen on their node's IP (never 127.0.0.1); then a load of greedy completions through the real
``openai`` client, during which the whole shard node holding one replica is SIGKILLed (raylet, agents, workers:
a machine lost). Every request succeeds with exactly the local engine's greedy text, the engine replica survives
(same pid) and serves on the remaining shard. Then (the tests share the module's cluster and run in order) the last
shard's node goes silent (SIGSTOP: nothing closes its connections) and the engine drops it after
``experts.remote.op_timeout_s``, serving on its own experts with no failed request; and a new shard node joins and
the engine re-plans onto the replica Serve starts there.

``RAYMOE_KEEP_CLUSTER_LOGS=<dir>`` copies Ray's logs of every node there before the cluster stops."""
from __future__ import annotations

import asyncio
import json
import os
import pathlib
import queue
import subprocess
import sys
import threading
import time
import urllib.request
import warnings

import pytest

openai = pytest.importorskip("openai")

from raymoe.jobs.local_cluster import LocalCluster  # noqa: E402
from serving_helpers import free_port, tiny_checkpoint  # noqa: E402

warnings.filterwarnings("ignore")
pytestmark = pytest.mark.timeout(420)

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = "tiny-multinode"
FIRST_IP = 20  # this module's cluster: 127.0.0.20 and up (test_multinode.py uses 40 and up)
HEAD, ENGINE_NODE, SHARD_NODES = "127.0.0.20", "127.0.0.21", ("127.0.0.22", "127.0.0.23")
ENGINE = {"block_size": 8, "num_blocks": 256, "num_speculative_tokens": 1, "max_num_batched_tokens": 128,
          "prefill_chunk": 64}
PROMPTS = ["The river runs", "The draft model guesses", "In the morning the baker", "Every expert in the layer",
           "She counted the stars:", "Rain fell on the hills", "The quick brown fox", "A block of memory holds",
           "The server answers with", "When the memory is full,"]
MAX_TOKENS = 8
N_REQUESTS, CONCURRENCY, KILL_AFTER = 90, 6, 30  # the node dies once 30 of the 90 requests have completed
OP_TIMEOUT_S = 5.0  # experts.remote.op_timeout_s: how long the engine waits on a shard that went silent

# The driver: deploys the app, answers "engine" / "shards" queries on stdin with one JSON line each, and on "stop"
# (or EOF) shuts the app down.
DRIVER = r"""
import json, sys
from raymoe.jobs.serve import start_server, stop_server
args, port = json.loads(sys.argv[1]), int(sys.argv[2])
url = start_server(args, "127.0.0.1", port, timeout_s=240, proxy_location="HeadOnly")
from ray import serve
print("@@READY " + url, flush=True)
KEEP = ("backend", "num_shards", "shard_names", "shard_addresses", "events")

def engine():
    i = serve.get_deployment_handle("EngineDeployment", app_name="raymoe").info.remote().result(timeout_s=60)
    return {"pid": i["pid"], "node_ip": i["node_ip"], "experts": {k: i["experts"].get(k) for k in KEEP}}

def shards(names):
    h, seen = serve.get_deployment_handle("ExpertShards", app_name="raymoe"), {}
    for _ in range(60):  # the handle routes to any replica: ask until every named member answered
        st = h.stats.remote().result(timeout_s=60)
        seen[st["member_id"]] = {k: st[k] for k in ("member_id", "pid", "node_ip", "address", "connections")}
        if set(names) <= set(seen):
            break
    return seen

try:
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "stop":
            break
        try:
            out = engine() if cmd[0] == "engine" else shards(cmd[1:])
        except Exception as e:
            out = {"error": repr(e)}
        print("@@ " + json.dumps(out), flush=True)
finally:
    stop_server()
"""


class Driver:
    """The driver process; ``ask`` sends one query line and returns its JSON answer."""

    def __init__(self, cluster: LocalCluster, args: dict, port: int, log_path: pathlib.Path) -> None:
        env = dict(cluster.env, RAY_ADDRESS=cluster.address, TOKENIZERS_PARALLELISM="false")
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(args), str(port)], cwd=str(ROOT),
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("@@"):
                self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _next(self, timeout_s: float) -> str:
        try:
            line = self.lines.get(timeout=timeout_s)
        except queue.Empty:
            line = None
        if line is None:
            raise AssertionError(f"driver gave no answer (rc={self.proc.poll()}); its log:\n"
                                 f"{self.log_path.read_text()[-6000:]}")
        return line

    def wait_ready(self, timeout_s: float) -> str:
        line = self._next(timeout_s)
        assert line.startswith("@@READY "), line
        return line.split()[1]

    def ask(self, *cmd: str, timeout_s: float = 90) -> dict:
        self.proc.stdin.write(" ".join(cmd) + "\n")
        self.proc.stdin.flush()
        out = json.loads(self._next(timeout_s)[3:])
        assert "error" not in out, out
        return out

    def stop(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.stdin.write("stop\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
        except Exception:  # noqa: BLE001 - stuck or gone: kill it (the cluster's stop() cleans up the rest)
            self.proc.kill()
            self.proc.wait(timeout=10)
        finally:
            self.log.close()


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster(pathlib.Path("/tmp") / f"rms{os.getpid()}", first_ip=FIRST_IP)
    try:
        c.start(workers=3, cpus_per_worker=2, head_cpus=0,
                worker_resources=[{"engine": 1}, {"shard": 1}, {"shard": 1}])
        yield c
    finally:
        keep = os.environ.get("RAYMOE_KEEP_CLUSTER_LOGS")  # a folder: Ray's logs of every node are copied there
        if keep:
            import shutil

            shutil.copytree(c.state_dir / "ray" / "session_latest" / "logs", keep, dirs_exist_ok=True)
        c.stop()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("multinode_serve"), MODEL)


@pytest.fixture(scope="module")
def served(cluster, ckpt, tmp_path_factory):
    experts = {"backend": "remote", "num_shards": 2, "redundant_slots": 0, "min_shards": 2, "max_shards": 2,
               "remote": {"num_cpus": 1, "interval_s": 1.0, "drain_timeout_s": 5, "op_timeout_s": OP_TIMEOUT_S,
                          "resources": {"shard": 1},
                          # the engine holds the routed experts (the last shard lost: it serves them itself)
                          "expert_weights": "engine"}}
    args = {"model_path": str(ckpt), "served_model_name": MODEL, "engine": ENGINE, "experts": experts,
            "engine_resources": {"engine": 1}, "ingress_resources": {"node:__internal_head__": 0.001},
            "autoscaling": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 16}}
    d = Driver(cluster, args, free_port(), tmp_path_factory.mktemp("driver") / "driver.log")
    try:
        url = d.wait_ready(300)
        yield d, url
    finally:
        d.stop()


@pytest.fixture(scope="module")
def reference(ckpt):
    """Greedy text of every prompt from the engine run in this process (model's own experts)."""
    import torch

    from raymoe.engine import EngineConfig, LLMEngine, SamplingParams

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = LLMEngine.from_pretrained(ckpt, EngineConfig(**ENGINE))
        outs = local.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
        return {p: o.outputs[0].text for p, o in zip(PROMPTS, outs)}
    finally:
        torch.set_num_threads(n)


def _state(cluster: LocalCluster, what: str) -> list[dict]:
    with urllib.request.urlopen(f"{cluster.dashboard}/api/v0/{what}?limit=10000", timeout=30) as r:
        return json.loads(r.read())["data"]["result"]["result"]


def _actor_nodes(cluster: LocalCluster) -> dict[str, list[tuple[str, int]]]:
    """Alive actors by class name → [(node IP, pid)], from Ray's state API (the dashboard on the head)."""
    ips = {n["node_id"]: n["node_ip"] for n in _state(cluster, "nodes")}
    out: dict[str, list[tuple[str, int]]] = {}
    for a in _state(cluster, "actors"):
        if a["state"] == "ALIVE":
            out.setdefault(a["class_name"], []).append((ips.get(a["node_id"], "?"), a.get("pid")))
    return out


async def _load(url: str, n: int, act_after: int, action) -> tuple[list[dict], float]:
    """``n`` greedy completions, at most CONCURRENCY in flight; ``action()`` (a node's loss) runs in a thread once
    ``act_after`` have completed. Returns per-request records and the time the action started."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
    sem = asyncio.Semaphore(CONCURRENCY)
    records: list[dict] = []
    go = asyncio.Event()
    state = {"t": None}

    async def one(i: int) -> None:
        prompt = PROMPTS[i % len(PROMPTS)]
        async with sem:
            t0 = time.time()
            try:
                r = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS,
                                                    temperature=0)
                text, err = r.choices[0].text, None
            except Exception as e:  # noqa: BLE001 - counted and reported
                text, err = None, repr(e)
            records.append({"i": i, "prompt": prompt, "t0": t0, "t1": time.time(), "text": text, "err": err})
            if len(records) == act_after:
                go.set()

    async def actor() -> None:
        await go.wait()
        state["t"] = time.time()
        await asyncio.to_thread(action)

    try:
        await asyncio.wait_for(asyncio.gather(actor(), *(one(i) for i in range(n))), timeout=180)
    finally:
        await client.close()
    return records, state["t"]


def _check_records(records: list[dict], t_act: float, reference: dict, n: int, what: str) -> dict:
    """< 1% failed, every success exactly the reference text, every request sent after ``t_act`` succeeded."""
    failed = [r for r in records if r["err"] is not None]
    wrong = [r for r in records if r["err"] is None and r["text"] != reference[r["prompt"]]]
    after = [r for r in records if r["t0"] > t_act]
    in_flight = [r for r in records if r["t0"] <= t_act < r["t1"]]
    lat = sorted(r["t1"] - r["t0"] for r in records)
    print(f"\n{what}: {len(records)} requests in {max(r['t1'] for r in records) - min(r['t0'] for r in records):.1f}"
          f" s ({len(in_flight)} in flight at the loss, {len(after)} sent after it); failed {len(failed)} "
          f"({100 * len(failed) / len(records):.1f}%), wrong text {len(wrong)}; latency median "
          f"{lat[len(lat) // 2]:.2f} s, max {lat[-1]:.2f} s")
    assert len(records) == n
    assert len(failed) / len(records) < 0.01, failed
    assert not wrong, wrong[:5]
    assert after and all(r["err"] is None for r in after)
    assert in_flight, "the loss should land while requests run"
    return {"in_flight": in_flight, "max_latency": lat[-1]}


def test_engine_and_shards_on_their_nodes_and_a_shard_node_loss_costs_no_request(cluster, served, reference):
    driver, url = served
    # -- placement: Ray's view (state API) ---------------------------------------------------------------------
    eng = driver.ask("engine")
    names = eng["experts"]["shard_names"]
    assert eng["experts"]["backend"] == "remote" and eng["experts"]["num_shards"] == 2 and len(set(names)) == 2
    actors = _actor_nodes(cluster)
    engines = actors.get("ServeReplica:raymoe:EngineDeployment", [])
    shards = actors.get("ServeReplica:raymoe:ExpertShards", [])
    assert engines == [(ENGINE_NODE, eng["pid"])], actors
    assert sorted(ip for ip, _ in shards) == sorted(SHARD_NODES), actors  # one shard on each shard node
    assert [ip for ip, _ in actors.get("ServeReplica:raymoe:APIIngress", [])] == [HEAD], actors
    assert [ip for ip, _ in actors.get("ExpertRegistry", [])] == [HEAD], actors  # not on a node that may die
    # -- what the replicas report: the engine's node, each shard's data-plane address on its own node IP --------
    assert eng["node_ip"] == ENGINE_NODE
    st = driver.ask("shards", *names)
    assert sorted(st) == sorted(names), st
    by_ip = {}
    for mid in names:
        s = st[mid]
        assert s["address"][0] == s["node_ip"] and s["node_ip"] in SHARD_NODES, s  # never 127.0.0.1
        assert s["connections"] >= 1, s  # the engine node connected to it
        by_ip[s["node_ip"]] = s
    assert sorted(by_ip) == sorted(SHARD_NODES)
    assert sorted(tuple(a) for a in eng["experts"]["shard_addresses"]) == sorted(
        tuple(st[m]["address"]) for m in names)
    assert sorted((ip, pid) for ip, pid in shards) == sorted((s["node_ip"], s["pid"]) for s in st.values())

    # -- before the kill: every prompt once, equal to the local engine ------------------------------------------
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
    for p in PROMPTS:
        got = client.completions.create(model=MODEL, prompt=p, max_tokens=MAX_TOKENS, temperature=0).choices[0].text
        assert got == reference[p], (p, got, reference[p])

    # -- load; the node of the first shard dies once KILL_AFTER requests completed --------------------------------
    victim_ip = st[names[0]]["node_ip"]
    victim = next(n for n in cluster.nodes if n.ip == victim_ip)
    survivor = next(m for m in names if st[m]["node_ip"] != victim_ip)
    records, kill_t = asyncio.run(_load(url, N_REQUESTS, KILL_AFTER, lambda: cluster.kill_node(victim.index)))
    assert kill_t is not None and not victim.alive
    _check_records(records, kill_t, reference, N_REQUESTS, "shard node SIGKILLed")

    # -- the engine replica lived through it and serves on the surviving shard ----------------------------------
    eng2 = driver.ask("engine")
    assert eng2["pid"] == eng["pid"] and eng2["node_ip"] == ENGINE_NODE
    ex = eng2["experts"]
    assert ex["num_shards"] == 1 and ex["shard_names"] == [survivor], ex
    assert [tuple(a) for a in ex["shard_addresses"]] == [tuple(st[survivor]["address"])]
    failures = [e for e in ex["events"] if e["kind"] == "shard_failed"]
    assert len(failures) == 1, ex["events"]
    detect_s = failures[0]["time"] - kill_t
    print(f"engine dropped the dead shard {detect_s * 1e3:.0f} ms after the SIGKILL; events: "
          f"{[(e['kind'], e.get('num_shards')) for e in ex['events']]}")
    assert detect_s < 10, detect_s
    for p in PROMPTS[:3]:  # still exact, now on one shard
        got = client.completions.create(model=MODEL, prompt=p, max_tokens=MAX_TOKENS, temperature=0).choices[0].text
        assert got == reference[p], (p, got)


def test_a_shard_node_that_goes_silent_stalls_requests_for_op_timeout_only(cluster, served, reference):
    """The last shard's node stops answering without closing a connection (every process SIGSTOPped: what a
    power loss or a partition looks like from the engine; a SIGKILLed process's kernel closes its sockets, so the
    first test never waits). The engine's RUN waits ``experts.remote.op_timeout_s``, drops the shard and runs the
    layers on its own experts: requests stall once for about that long and none fails. Runs after the first test
    (the module's one cluster): one shard is left."""
    driver, url = served
    eng = driver.ask("engine")
    ex = eng["experts"]
    if ex["num_shards"] != 1:
        pytest.skip(f"needs the state the first test leaves (one shard left), got {ex['num_shards']}")
    host = ex["shard_addresses"][0][0]
    node = next(n for n in cluster.nodes if n.ip == host)
    assert node.alive and host in SHARD_NODES
    try:
        records, t_freeze = asyncio.run(_load(url, 36, 12, lambda: cluster.freeze_node(node.index)))
        rec = _check_records(records, t_freeze, reference, 36, "last shard node frozen (SIGSTOP)")
        eng2 = driver.ask("engine")
    finally:
        cluster.kill_node(node.index)
    assert eng2["pid"] == eng["pid"]
    ex2 = eng2["experts"]
    assert ex2["shard_names"] == [] and ex2["shard_addresses"] == [], ex2  # layers now run in the engine
    failures = [e for e in ex2["events"] if e["kind"] == "shard_failed"]
    assert len(failures) == 2, ex2["events"]
    waited = failures[-1]["time"] - t_freeze
    print(f"engine dropped the silent shard {waited:.2f} s after the freeze (op_timeout_s={OP_TIMEOUT_S}); "
          f"error: {failures[-1]['error'][:160]}")
    assert OP_TIMEOUT_S - 0.5 <= waited <= OP_TIMEOUT_S + 5, waited
    assert rec["max_latency"] < OP_TIMEOUT_S + 15, rec  # one stall of about op_timeout_s, not gloo's own 60 s


def test_a_new_shard_node_brings_the_shards_back(cluster, served, reference):
    """A fresh node offering ``shard`` joins (127.0.0.24): Serve schedules the ExpertShards replica it has been
    trying to replace there, the replica registers, and the engine connects it at a step boundary (it follows the
    registry only between steps, so requests keep flowing while we wait). Runs after the second test."""
    driver, url = served
    if driver.ask("engine")["experts"]["shard_names"]:
        pytest.skip("needs the state the second test leaves (no shard left)")
    node = cluster.add_worker(2, resources={"shard": 1})
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
    end, i, ex = time.monotonic() + 120, 0, {}
    while time.monotonic() < end:
        p = PROMPTS[i % len(PROMPTS)]
        got = client.completions.create(model=MODEL, prompt=p, max_tokens=MAX_TOKENS, temperature=0).choices[0].text
        assert got == reference[p], (p, got)
        i += 1
        ex = driver.ask("engine")["experts"]
        if ex["shard_names"]:
            break
        time.sleep(0.5)
    assert [a[0] for a in ex["shard_addresses"]] == [node.ip], ex
    joined = [e for e in ex["events"] if e["kind"] == "scale_up"]
    assert joined and joined[-1]["num_shards"] == 1, ex["events"]
    print(f"\nshard back on {node.ip} after {i} requests; re-plan pause {1e3 * joined[-1]['pause_s']:.0f} ms")
    actors = _actor_nodes(cluster)
    assert [ip for ip, _ in actors.get("ServeReplica:raymoe:ExpertShards", [])] == [node.ip], actors
    for p in PROMPTS:  # exact again, now through the new node's shard
        got = client.completions.create(model=MODEL, prompt=p, max_tokens=MAX_TOKENS, temperature=0).choices[0].text
        assert got == reference[p], (p, got)
