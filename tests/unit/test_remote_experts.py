"""Remote expert shards over gloo pairs (raymoe.engine.remote), in one process: ShardServers on 127.0.0.1 with
their own threads, the engine's ReplicatedExperts talking to them through RemoteShard. Greedy output must equal the
local model's whatever the placement / shard count, weights must move only where the placement changed, and a shard
that goes away mid-stream must cost no request."""
from __future__ import annotations

import copy
import signal
import socket
import subprocess

import pytest
import torch

from raymoe.engine import EngineConfig, LLMEngine, Placement, ReplicatedExperts, SamplingParams
from raymoe.engine.remote import RemoteShard, ShardServer, ShardUnavailable, spawn_shard_processes
from raymoe.model.moe import RoutedExperts

GEN = 10
PROMPTS = ["The river runs past", "She counted the stars: one, two", "Every expert in the layer reads",
           "When the memory is full, the newest request waits, and its tokens are"]
LAYER_KEYS = ["layers.1", "layers.2", "mtp.0"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def base(tiny_base):
    return tiny_base


def make_engine(base, backend=None) -> LLMEngine:
    model, tok, eos = base
    return LLMEngine(copy.deepcopy(model), tok, EngineConfig(num_speculative_tokens=1, block_size=8), eos,
                     expert_backend=backend)


def greedy(engine: LLMEngine) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in engine.generate(PROMPTS, SamplingParams(max_tokens=GEN, temperature=0))]


@pytest.fixture(scope="module")
def refs(base):
    return greedy(make_engine(base))


@pytest.fixture()
def servers():
    made: list[ShardServer] = []

    def make(n: int) -> list[ShardServer]:
        new = [ShardServer("127.0.0.1") for _ in range(n)]
        made.extend(new)
        return new

    yield make
    for s in made:
        s.close()


def test_server_listens_on_the_given_interface_only(servers) -> None:
    (srv,) = servers(1)
    with socket.socket() as s:  # the store's listening socket is bound to 127.0.0.1, not the wildcard address
        s.connect(("127.0.0.1", srv.port))
    import subprocess

    out = subprocess.run(["ss", "-ltn"], capture_output=True, text=True).stdout
    lines = [ln for ln in out.splitlines() if f":{srv.port} " in ln]
    assert lines and all("127.0.0.1:" in ln for ln in lines), lines


def test_wire_protocol_matches_grouped_gemm(servers) -> None:
    (srv,) = servers(1)
    torch.manual_seed(0)
    src = RoutedExperts(6, 16, 8)
    for p in src.parameters():
        torch.nn.init.normal_(p, std=0.2)
    sh = RemoteShard(srv.address, "s0")
    assert sh.load("layers.1", src, [4, 1, 4]) == 3
    counts = torch.tensor([3, 0, 5])
    x = torch.randn(8, 16)
    ref = src.shard([4, 1, 4]).forward_grouped(x, counts)
    torch.testing.assert_close(sh.run("layers.1", x, counts), ref, rtol=0, atol=0)
    # only the changed slot moves; the output follows the new expert
    assert sh.load("layers.1", src, [4, 2, 4]) == 1
    counts = torch.tensor([1, 6, 1])
    torch.testing.assert_close(sh.run("layers.1", x, counts), src.shard([4, 2, 4]).forward_grouped(x, counts),
                               rtol=0, atol=0)
    assert srv.stats()["rows_total"] == 16 and srv.stats()["connections"] == 1
    assert srv.stats()["slots"][1] == {0: [4, 2, 4]}
    sh.close()
    assert srv.wait_idle(5.0)


@pytest.mark.parametrize("shards,slots,seed", [(4, 12, None), (3, 9, 2)])
def test_remote_greedy_matches_local(base, refs, servers, shards, slots, seed) -> None:
    srv = servers(shards)
    if seed is None:
        pl = Placement.trivial(LAYER_KEYS, 8, slots, shards)
    else:
        g = torch.Generator().manual_seed(seed)
        pl = Placement.from_load(LAYER_KEYS, torch.empty(3, 8).log_normal_(0, 1.5, generator=g) * 100, slots,
                                 shards, 2, 1)
        assert int(pl.logcnt.max()) > 1
    backend = ReplicatedExperts(pl, shard_factory=lambda i: RemoteShard(srv[i].address, f"s{i}"))
    eng = make_engine(base, backend)
    assert greedy(eng) == refs
    rows = [s.stats()["rows_total"] for s in srv]
    assert sum(rows) == int(backend.recorder.slot.sum())  # every routed row ran remotely, exactly once
    assert all(isinstance(x, RemoteShard) for x in backend.shards)


@pytest.fixture()
def shard_processes():
    procs: list[subprocess.Popen] = []

    def make(n: int) -> list[tuple[subprocess.Popen, tuple[str, int]]]:
        addrs = spawn_shard_processes(n, procs)
        return list(zip(procs[-n:], addrs))

    yield make
    for p in procs:
        p.kill()
        p.wait()


def test_membership_change_and_shard_kill_keep_outputs(base, refs, shard_processes) -> None:
    procs = shard_processes(4)
    remote = [RemoteShard(addr, f"s{i}") for i, (_, addr) in enumerate(procs[:3])]
    backend = ReplicatedExperts(Placement.trivial(LAYER_KEYS, 8, 12, 3), shard_factory=lambda i: remote[i])
    eng = make_engine(base, backend)
    assert greedy(eng) == refs
    # a fourth replica joins: 16 slots over 4 shards; the old shards keep what did not move
    new = RemoteShard(procs[3][1], "s3")
    ev = backend.replace_shards(remote + [new], kind="scale_up")
    # 3 LAYERS x 4 slots for the new shard; the old shards move only the slots whose expert changed
    assert ev["num_shards"] == 4 and ev["num_slots"] == 16 and 12 <= ev["moved_slots"] < 3 * 16
    calls = backend.calls
    assert greedy(eng) == refs
    assert backend.calls - calls > 0
    # shard 1's process is SIGKILLed between requests: the next forward re-plans over 3 and no request fails
    procs[1][0].send_signal(signal.SIGKILL)
    procs[1][0].wait()
    assert greedy(eng) == refs
    assert any(e["kind"] == "shard_failed" for e in backend.events)
    assert len(backend.shards) == 3 and backend.placement.num_shards == 3
    # every shard killed: layers run on the engine's own experts
    for p, _ in procs:
        p.kill()
        p.wait()
    assert greedy(eng) == refs and backend.shards == []


def test_connect_to_nothing_is_a_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ShardUnavailable, match="cannot connect to expert shard"):
        RemoteShard(("127.0.0.1", port), "nobody", connect_timeout_s=1.0)
