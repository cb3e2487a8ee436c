"""Remote expert shards over gloo pairs (raymoe.engine.remote), in one process: ShardServers on 127.0.0.1 with
their own threads, the engine's ReplicatedExperts talking to them through RemoteShard. Greedy output must equal the
local model's whatever the placement / shard count, weights must move only where the placement changed, and a shard
that goes away mid-stream must cost no request.

The exposure checks: the store and both ends of every gloo pair bind the addresses they are given; a connection that
cannot prove the app's secret is refused (and an engine refuses a listener that cannot prove it back); a bad header
closes only its own connection before anything is allocated; flooding the store's counter or request queue does not
stop a good engine from connecting."""
from __future__ import annotations

import copy
import logging
import os
import signal
import socket
import subprocess
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from raymoe.engine import EngineConfig, LLMEngine, Placement, ReplicatedExperts, SamplingParams
from raymoe.engine.remote import RemoteShard, ShardLimits, ShardServer, ShardUnavailable, spawn_shard_processes
from raymoe.engine.shard_protocol import REQUEST_QUEUE, make_header, pair_group
from raymoe.model.moe import RoutedExperts

GEN = 10
PROMPTS = ["The river runs past", "She counted the stars: one, two", "Every expert in the layer reads",
           "When the memory is full, the newest request waits, and its tokens are"]
LAYER_KEYS = ["layers.1", "layers.2", "mtp.0"]


SECRET = bytes(range(7, 39))  # a fixed 32-byte secret; the Serve app draws its own with secrets.token_bytes(32)
D, I, E = 16, 8, 6  # noqa: E741 - the wire tests' expert shapes
SLOT_BYTES = 3 * D * I * 4  # one fp32 slot: gate + up + down


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

    def make(n: int, **kw) -> list[tuple[subprocess.Popen, tuple[str, int]]]:
        addrs = spawn_shard_processes(n, procs, **kw)
        return list(zip(procs[-n:], addrs))

    yield make
    for p in procs:
        p.kill()
        p.wait()


def test_membership_change_and_shard_kill_keep_outputs(base, refs, shard_processes) -> None:
    procs = shard_processes(4, secret=SECRET)
    for p, _ in procs:  # the secret reached the processes through stdin only
        for f in ("cmdline", "environ"):
            with open(f"/proc/{p.pid}/{f}", "rb") as fh:
                blob = fh.read()
            assert SECRET.hex().encode() not in blob and SECRET not in blob
    remote = [RemoteShard(addr, f"s{i}", secret=SECRET) for i, (_, addr) in enumerate(procs[:3])]
    backend = ReplicatedExperts(Placement.trivial(LAYER_KEYS, 8, 12, 3), shard_factory=lambda i: remote[i])
    eng = make_engine(base, backend)
    assert greedy(eng) == refs
    # a fourth replica joins: 16 slots over 4 shards; the old shards keep what did not move
    new = RemoteShard(procs[3][1], "s3", secret=SECRET)
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
    snap = backend.snapshot()  # metrics / info still work when the last event is a shard_failed (no pause_s)
    assert snap["num_shards"] == 0 and snap["last_pause_s"] >= 0


def test_a_frozen_shard_is_dropped_after_the_op_timeout(base, refs, shard_processes) -> None:
    """A shard whose process stops answering without closing its connection (SIGSTOP: what a node lost to a power
    cut or a partition looks like) is dropped after the connection's ``timeout_s``, not gloo's own default, even
    though the pair formed under the longer connect timeout; the forward re-plans and the output is unchanged."""
    procs = shard_processes(2)
    remote = [RemoteShard(addr, f"s{i}", timeout_s=1.5, connect_timeout_s=30) for i, (_, addr) in enumerate(procs)]
    backend = ReplicatedExperts(Placement.trivial(LAYER_KEYS, 8, 8, 2), shard_factory=lambda i: remote[i])
    eng = make_engine(base, backend)
    assert greedy(eng) == refs
    os.kill(procs[0][0].pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        assert greedy(eng) == refs
        took = time.monotonic() - t0
    finally:
        os.kill(procs[0][0].pid, signal.SIGCONT)
    assert remote[0].dead and backend.shards == [remote[1]], backend.events
    failed = [e for e in backend.events if e["kind"] == "shard_failed"]
    assert len(failed) == 1 and "Timed out" in failed[0]["error"], failed
    assert 1.5 <= took < 15, took  # one wait of timeout_s, then the rest at full speed


def test_connect_to_nothing_is_a_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ShardUnavailable, match="cannot connect to expert shard"):
        RemoteShard(("127.0.0.1", port), "nobody", connect_timeout_s=1.0)


# ---------------------------------------------------------------------------------------------- exposure checks
def _experts(seed: int = 0) -> RoutedExperts:
    torch.manual_seed(seed)
    src = RoutedExperts(E, D, I)
    for p in src.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return src


def _wait_for(pred, timeout_s: float = 10.0, what: str = "the shard's state") -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _store_client(srv: ShardServer) -> dist.TCPStore:
    """A raw client of the shard's store: what any process that reaches the port can do without a secret."""
    return dist.TCPStore(srv.host, srv.port, is_master=False, timeout=timedelta(seconds=10))


def _assert_serves(sh: RemoteShard, src: RoutedExperts, slots: list[int], layer: str = "l") -> None:
    """``sh``'s shard returns exactly what the in-process experts compute for a fixed batch."""
    g = torch.Generator().manual_seed(1)
    counts = torch.tensor([3, 0, 5][: len(slots)] + [1] * max(0, len(slots) - 3))
    x = torch.randn(int(counts.sum()), D, generator=g)
    torch.testing.assert_close(sh.run(layer, x, counts), src.shard(slots).forward_grouped(x, counts), rtol=0, atol=0)


@pytest.fixture()
def secure_server():
    made: list[ShardServer] = []

    def make(**kw) -> ShardServer:
        made.append(ShardServer("127.0.0.1", **{"secret": SECRET, **kw}))
        return made[-1]

    yield make
    for s in made:
        s.close()


def _can_bind(host: str) -> bool:
    try:
        with socket.socket() as s:
            s.bind((host, 0))
        return True
    except OSError:
        return False


def _tcp_sockets(pid: int) -> list[tuple[str, str, str]]:
    """``(state, local, peer)`` of every TCP socket of process ``pid`` (``ss``, Linux)."""
    out = subprocess.run(["ss", "-tanpH"], capture_output=True, text=True, check=True).stdout
    rows = []
    for ln in out.splitlines():
        if f"pid={pid}," in ln:
            f = ln.split()
            rows.append((f[0], f[3], f[4]))
    return rows


@pytest.mark.skipif(not (_can_bind("127.0.0.2") and _can_bind("127.0.0.3")), reason="no 127.0.0.0/8 on loopback")
def test_gloo_pairs_bind_the_given_addresses_not_the_hostname(shard_processes) -> None:
    # this host's name resolves to 127.0.0.1; the shard is given 127.0.0.2 and the engine 127.0.0.3 (loopback
    # aliases: nothing leaves the machine), so any data-plane socket on 127.0.0.1 is the hostname default leaking in
    ((proc, addr),) = shard_processes(1, host="127.0.0.2", secret=SECRET)
    assert addr[0] == "127.0.0.2"
    src = _experts()
    sh = RemoteShard(addr, "s", secret=SECRET, local_host="127.0.0.3")
    sh.load("l", src, [0, 5, 2])
    _assert_serves(sh, src, [0, 5, 2])
    shard = _tcp_sockets(proc.pid)
    listening = {local for state, local, _ in shard if state == "LISTEN"}
    # the store and the gloo device listen on the given address and nowhere else (without create_device(hostname=)
    # the device would listen on 127.0.0.1, what the hostname resolves to)
    assert len(listening) == 2 and all(a.startswith("127.0.0.2:") for a in listening), shard
    ports = {a.rsplit(":", 1)[1] for a in listening}
    accepted = [local for state, local, _ in shard if state == "ESTAB" and local.rsplit(":", 1)[1] in ports]
    assert len({a.rsplit(":", 1)[1] for a in accepted}) == 2, shard  # the engine reached the store and the device
    # the engine's end of the pair listens on its own given address (outgoing sockets' sources are the kernel's)
    assert any(st == "LISTEN" and local.startswith("127.0.0.3:") for st, local, _ in _tcp_sockets(os.getpid()))
    sh.close()


def test_host_must_be_one_ip_address() -> None:
    for bad, msg in [("0.0.0.0", "every interface"), ("::", "every interface"), ("localhost", "IP address"),
                     ("vm.example", "IP address")]:
        with pytest.raises(ValueError, match=msg):
            ShardServer(bad)
    with pytest.raises(ValueError, match="pass local_host"):
        RemoteShard(("192.0.2.7", 1), "far")  # a non-loopback shard needs this node's address; nothing is dialled
    with pytest.raises(ValueError, match="at least 16 bytes"):
        ShardServer("127.0.0.1", secret=b"short")


def test_only_peers_that_prove_the_secret_are_served(secure_server, caplog) -> None:
    caplog.set_level(logging.INFO, logger="raymoe.engine.remote")
    srv = secure_server()
    src = _experts()
    good = RemoteShard(srv.address, "good", secret=SECRET)
    good.load("l", src, [0, 5, 2])
    with pytest.raises(ShardUnavailable, match="refused: wrong or missing secret"):
        RemoteShard(srv.address, "wrong", secret=bytes(reversed(SECRET)))
    with pytest.raises(ShardUnavailable, match="refused: wrong or missing secret"):
        RemoteShard(srv.address, "none")
    _wait_for(lambda: srv.stats()["refused"] == {"auth": 2})
    st = srv.stats()
    assert st["connections"] == 1 and st["pending"] == 0 and st["slot_bytes"] == 3 * SLOT_BYTES
    assert srv.store.num_keys() == 1  # the "next" counter only: no refused connection left keys behind
    _assert_serves(good, src, [0, 5, 2])
    # the other way round: an engine with the secret refuses a listener that cannot prove it back
    impostor = ShardServer("127.0.0.1")
    try:
        with pytest.raises(ShardUnavailable, match="did not prove the app's secret"):
            RemoteShard(impostor.address, "impostor", secret=SECRET)
    finally:
        impostor.close()
    assert "wrong or missing secret" in caplog.text
    assert SECRET.hex() not in caplog.text and repr(SECRET) not in caplog.text
    good.close()


def test_silent_and_absent_peers_time_out_without_blocking_others(secure_server) -> None:
    srv = secure_server(handshake_timeout_s=1.0, limits=ShardLimits(max_pending=1))
    cl = _store_client(srv)
    # a peer that asks for a connection, forms the pair and never answers the challenge
    cid = cl.add("next", 1)
    cl.queue_push(REQUEST_QUEUE, str(cid))
    assert cl.get(f"conn{cid}/accept") == b"ok"
    silent = pair_group(dist.PrefixStore(f"conn{cid}", cl), 0, "127.0.0.1", timedelta(seconds=30))
    assert srv.stats()["pending"] == 1
    # it holds the only handshake slot: a good engine's request waits in the queue until the silent one times out
    t0 = time.monotonic()
    good = RemoteShard(srv.address, "good", secret=SECRET)
    waited = time.monotonic() - t0
    assert 0.3 < waited < 5.0, waited
    _wait_for(lambda: srv.stats()["refused"] == {"handshake": 1})
    # a peer that asks and never forms its pair: refused after the timeout, its store keys removed
    cid = cl.add("next", 1)
    cl.queue_push(REQUEST_QUEUE, str(cid))
    _wait_for(lambda: srv.stats()["refused"] == {"handshake": 2})
    st = srv.stats()
    assert st["connections"] == 1 and st["pending"] == 0 and st["slot_bytes"] == 0
    assert srv.store.num_keys() == 1
    src = _experts()
    good.load("l", src, [4, 1])
    _assert_serves(good, src, [4, 1])
    del silent
    good.close()


def test_connection_limit_refuses_with_a_clear_error(secure_server) -> None:
    srv = secure_server(limits=ShardLimits(max_connections=2))
    a = RemoteShard(srv.address, "a", secret=SECRET)
    b = RemoteShard(srv.address, "b", secret=SECRET)
    with pytest.raises(ShardUnavailable, match="at its limit of 2 connections"):
        RemoteShard(srv.address, "c", secret=SECRET)
    assert srv.stats()["refused"] == {"capacity": 1} and srv.stats()["connections"] == 2
    assert srv.store.num_keys() == 1  # the refused engine deleted the answer it read
    a.close()
    _wait_for(lambda: srv.stats()["connections"] == 1)
    c = RemoteShard(srv.address, "c", secret=SECRET)  # room again
    src = _experts()
    c.load("l", src, [3, 3, 1])
    _assert_serves(c, src, [3, 3, 1])
    assert srv.stats()["connections"] == 2
    b.close()
    c.close()


def test_counter_and_queue_floods_do_not_stall_accepting(secure_server) -> None:
    srv = secure_server()
    cl = _store_client(srv)
    cl.add("next", 10**12)  # the old accept loop polled every id up to the counter
    first = RemoteShard(srv.address, "first", secret=SECRET)
    assert first.cid == 10**12 + 1
    junk = [b"junk", b"0", b"-3", str(10**15).encode(), str(first.cid).encode(), b"1" * 40]
    for j in junk:  # garbage, ids never issued, a replay of a live connection's id
        cl.queue_push(REQUEST_QUEUE, j)
    t0 = time.monotonic()
    good = RemoteShard(srv.address, "good", secret=SECRET)
    assert time.monotonic() - t0 < 2.0 and good.cid == 10**12 + 2
    _wait_for(lambda: srv.stats()["refused"] == {"request": len(junk)})
    src = _experts()
    for sh in (first, good):  # the replayed id did not disturb the live connection it named
        sh.load("l", src, [2, 0, 4])
        _assert_serves(sh, src, [2, 0, 4])
    assert srv.stats()["connections"] == 2
    first.close()
    good.close()


def _i64(*v: int) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.int64)


# name -> (send a valid HELLO and LOAD of layer 0 (3 slots) first?, the bad message, what the error must name)
BAD_MESSAGES = {
    "unknown op": (False, [make_header(9)], "header field op"),
    "unused field set": (False, [make_header(4, 7)], "CLOSE field header[1]"),
    "bad dtype": (False, [make_header(1, D, I, 7, E)], "HELLO field dtype"),
    "oversized D": (False, [make_header(1, 1 << 40, I, 0, E)], "HELLO field D"),
    "zero experts": (False, [make_header(1, D, I, 0, 0)], "HELLO field E"),
    "LOAD before HELLO": (False, [make_header(2, 0, 3, 3)], "LOAD field op: HELLO must come first"),
    "RUN before HELLO": (False, [make_header(3, 0, 4, 3)], "RUN field op: HELLO must come first"),
    "HELLO changes a loaded connection": (True, [make_header(1, 2 * D, I, 0, E)], "HELLO field D: 32 would change 16"),
    "HELLO changes the dtype": (True, [make_header(1, D, I, 1, E)], "HELLO field dtype"),
    "layer out of range": (True, [make_header(2, 4096, 3, 3)], "LOAD field layer"),
    "negative layer": (True, [make_header(3, -1, 4, 3)], "RUN field layer"),
    "oversized S": (True, [make_header(2, 1, 65, 65)], "LOAD field S: 65 is outside [0, 64]"),
    "m > S": (True, [make_header(2, 1, 3, 4)], "LOAD field m"),
    "part of a new layer": (True, [make_header(2, 1, 3, 1)], "LOAD field m: 1 of 3 slots"),
    "over the connection's bytes": (True, [make_header(2, 1, 10, 10)], "LOAD field S: 10 slots"),
    "expert id out of range": (True, [make_header(2, 1, 3, 3), _i64(0, 1, E), _i64(0, 1, 2)], "LOAD field ids"),
    "slot moved twice": (True, [make_header(2, 1, 3, 3), _i64(0, 1, 2), _i64(0, 0, 2)], "LOAD field moved"),
    "RUN of a layer never loaded": (True, [make_header(3, 1, 2, 3)], "RUN field layer"),
    "RUN with the wrong S": (True, [make_header(3, 0, 2, 4)], "RUN field S"),
    "oversized N": (True, [make_header(3, 0, 1025, 3)], "RUN field N"),
    "negative count": (True, [make_header(3, 0, 4, 3), _i64(5, -1, 0)], "RUN field counts: negative count -1"),
    "counts not summing to N": (True, [make_header(3, 0, 4, 3), _i64(1, 1, 1)], "counts: sum to 3, header N is 4"),
    "counts [K] and no rows": (True, [make_header(3, 0, 0, 3), _i64(10**12, 0, 0)],
                               "counts: sum to 1000000000000, header N is 0"),
}


def test_bad_headers_close_only_their_connection(secure_server, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="raymoe.engine.remote")
    srv = secure_server(limits=ShardLimits(max_slots=64, max_rows=1024, max_connection_bytes=12 * SLOT_BYTES))
    src = _experts()
    good = RemoteShard(srv.address, "good", secret=SECRET)
    good.load("l", src, [0, 5, 2])
    for i, (name, (load_first, msgs, field)) in enumerate(BAD_MESSAGES.items()):
        sh = RemoteShard(srv.address, name, secret=SECRET)
        if load_first:
            sh.load("l", src, [1, 2, 3])
        _wait_for(lambda: srv.stats()["connections"] == 2)
        # posted and kept (a gloo send whose work object dies before the peer asked for it is dropped), never
        # waited on: the shard may close before it reads them all
        works = [sh.pg.send([t], 1, 0) for t in msgs]
        with pytest.raises(RuntimeError):  # the shard closed the pair instead of answering
            sh.pg.recv([torch.empty(1, dtype=torch.int64)], 1, 1).wait(timedelta(seconds=20))
        _wait_for(lambda: srv.stats()["protocol_errors"] == i + 1 and srv.stats()["connections"] == 1, what=name)
        st = srv.stats()
        assert field in st["last_protocol_error"], (name, st["last_protocol_error"])
        # nothing of the bad connection is left, the good one's 3 slots are all the shard holds
        assert st["slot_bytes"] == 3 * SLOT_BYTES and list(st["slots"].values()) == [{0: [0, 5, 2]}], name
        assert any(field in r.getMessage() for r in caplog.records), name
        del works, sh
    st = srv.stats()
    assert st["refused"] == {} and st["rows_total"] == 0
    _assert_serves(good, src, [0, 5, 2])
    assert srv.stats()["rows_total"] == 8
    good.close()
