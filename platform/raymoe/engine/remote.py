"""Remote expert shards: the data plane between an engine and the processes that hold its routed experts.

An expert shard (:class:`ShardServer`, in :mod:`raymoe.engine.shard_server`; the wire format and every check in
:mod:`raymoe.engine.shard_protocol`) is a process (in raymoe: a replica of the Serve deployment
``ExpertShardDeployment``) that holds physical expert slots and runs them as grouped GEMMs. An engine talks to it
through a :class:`RemoteShard`, a drop-in for the in-process :class:`raymoe.engine.experts.SlotShard`: the
:class:`~raymoe.engine.experts.ReplicatedExperts` backend decides placement, splits each layer's rows by slot, and
sends each shard its rows; the shard never sees the router or the placement, only "these rows for these slots".

Transport: one torch.distributed **gloo process group of two** (engine = rank 0, shard = rank 1) per engine ↔ shard
connection, built directly as ``ProcessGroupGloo`` on a ``PrefixStore`` of the shard's ``TCPStore``, so a process
can hold any number of connections, connections come and go without a world-wide rendezvous, and nothing touches the
default process group.

Where things listen: the shard's store listens on the one address it is given (``host``: an IP literal, never a
wildcard, never a hostname to resolve; in Serve the node IP Ray reports), and both ends build their gloo device
explicitly on an address (``create_device(hostname=ip)``: the shard on ``host``, the engine on its ``local_host``),
so no socket of the data plane depends on what the machine's hostname resolves to.

Connecting: the engine takes an id ``c`` from the store counter ``"next"`` and pushes it onto the store queue
``"req"``; the shard's accept thread pops requests (a bounded number handshaking at once, a bounded number live) and
answers ``"conn<c>/accept"`` with ``ok`` or the reason for a refusal; both then build the pair on prefix
``"conn<c>"`` and run the HMAC challenge–response over it (both sides prove the app's secret when they have one).
Only then does the shard create any state for the connection; it deletes the connection's store keys once the
handshake ended either way. Every message starts with an ``int64[8]`` header (engine → shard, tag 0); replies
use tag 1::

    HELLO  [1, D, I, dtype, E]                      set the row width / dtype / logical expert count → ack int64[1]
    LOAD   [2, layer, S, m]  ids int64[S]  moved int64[m]  gate [m, D, I]  up [m, D, I]  down [m, I, D]
           (slots ``moved`` of the layer now hold experts ``ids[moved]``; a layer seen for the first time or
           resized gets all S slots)                                                     → ack int64[1] (slots moved)
    RUN    [3, layer, N, S]  counts int64[S]  x [N, D]          (rows grouped by local slot) → y [N, D]
    CLOSE  [4]                                                                           → ack, connection ends
    FETCH  [5, layer, S, m, kind, index]  ids int64[S]  moved int64[m]   (LOAD without weights: the shard reads
           experts ids[moved] of checkpoint layer kind/index from its own checkpoint)   → ack int64[1] (slots moved)

An engine whose model holds no routed experts (:class:`raymoe.model.moe.AbsentExperts` in every MoE layer: the
checkpoint is read by the shards themselves, :mod:`raymoe.engine.checkpoint_experts`) places slots with FETCH;
one that holds them sends them with LOAD.

Each header is validated field by field before its payload is received or anything is allocated; a bad one closes
that connection only (``stats()["protocol_errors"]``, a log line naming the field).

Per step the engine sends, per MoE layer, one RUN to each shard that got rows, posts all sends and receives before
waiting on any, so shards compute in parallel; no control-plane call sits on the data path. Slot state is **per
connection**: two engines using one shard each own their slots (they may disagree on placement).

A shard counts the rows it ran (``stats()``: total rows, rows/s over a sliding window, live connections); the Serve
autoscaling policy turns the per-replica rates into the balance it scales on.

Failure semantics: a dead shard makes :meth:`RemoteShard.submit`'s wait raise :class:`ShardUnavailable`; the
backend then drops the shard, re-plans over the remaining ones (the engine keeps the source weights) and re-runs
the layer, so no request fails (see ``ReplicatedExperts.run``).
"""
from __future__ import annotations

import hmac
import secrets
import time
from datetime import timedelta
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from raymoe.engine import shard_protocol as P
from raymoe.engine.shard_protocol import DTYPES, OP_CLOSE, OP_FETCH, OP_HELLO, OP_LOAD, OP_RUN, ShardLimits
from raymoe.engine.shard_server import ShardServer
from raymoe.model.moe import AbsentExperts, RoutedExperts

__all__ = ["ShardServer", "RemoteShard", "ShardUnavailable", "ShardLimits", "spawn_shard_processes", "OP_HELLO",
           "OP_LOAD", "OP_RUN", "OP_CLOSE"]

_TO_SHARD, _TO_ENGINE = P.TAG_TO_SHARD, P.TAG_TO_ENGINE


class ShardUnavailable(RuntimeError):
    """The shard's process or connection is gone (killed, drained, network) or refused us: re-plan without it."""


def spawn_shard_processes(n: int, procs: list, threads: int = 1, host: str = "127.0.0.1",
                          secret: Optional[bytes] = None, checkpoint: Optional[str] = None) -> list[tuple[str, int]]:
    """Start ``n`` shard server processes (``python -m raymoe.engine.remote``), all before waiting on any; each
    ``Popen`` is appended to ``procs`` (the caller kills them) as soon as it exists. A ``secret`` goes to each
    process through its stdin (never its command line or environment); with ``checkpoint`` (a path or storage URI)
    the shards read expert rows from it (FETCH). Returns their addresses."""
    import subprocess
    import sys

    secret = P.check_secret(secret)
    cmd = [sys.executable, "-m", "raymoe.engine.remote", "--host", P.check_host(host, "host"), "--threads",
           str(threads)] + (["--secret-stdin"] if secret else []) + (["--checkpoint", str(checkpoint)]
                                                                       if checkpoint else [])
    new = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.PIPE if secret else None, text=True)
           for _ in range(n)]
    procs.extend(new)
    for p in new:
        if secret:
            p.stdin.write(secret.hex() + "\n")
            p.stdin.close()
    addrs = []
    for p in new:
        _, h, port = p.stdout.readline().split()
        addrs.append((h, int(port)))
    return addrs


def main(argv: Optional[list[str]] = None) -> None:
    """``python -m raymoe.engine.remote [--host 127.0.0.1] [--secret-stdin]``: run a shard server until killed;
    prints ``SHARD <host> <port>`` once it listens. ``--secret-stdin`` reads the secret as one hex line."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--secret-stdin", action="store_true", help="read the shared secret (hex) from stdin")
    ap.add_argument("--checkpoint", default=None, help="model checkpoint (path or storage URI) to read experts from")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    secret = None
    if a.secret_stdin:
        try:
            secret = bytes.fromhex(sys.stdin.readline().strip())
        except ValueError:
            ap.error("--secret-stdin: stdin must hold the secret as one line of hex")
    source = None
    if a.checkpoint:
        from raymoe.engine.checkpoint_experts import CheckpointExperts

        source = CheckpointExperts(a.checkpoint)
    srv = ShardServer(a.host, secret=secret, expert_source=source)
    print(f"SHARD {srv.host} {srv.port}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        srv.close()


class _Pending:
    """An in-flight RUN: the posted sends and the receive of its output."""

    def __init__(self, shard: "RemoteShard", works: list, y: torch.Tensor) -> None:
        self.shard, self.works, self.y = shard, works, y

    def __call__(self) -> torch.Tensor:
        try:
            for w in self.works:
                w.wait(self.shard.op_timeout)
        except Exception as e:  # noqa: BLE001
            self.shard.dead = True
            raise ShardUnavailable(f"expert shard {self.shard.name} failed during a forward: {e}") from e
        return self.y


class RemoteShard:
    """Engine-side handle of one connection to a :class:`ShardServer` (the ``SlotShard`` contract: ``load``,
    ``run`` and the non-blocking ``submit``).

    Args:
        address: ``(host, port)`` of the shard's store (``host`` an IP address).
        name: a label for logs and errors (e.g. the Serve replica id).
        timeout_s: how long one operation (a RUN's reply, a LOAD's ack) may take before the shard counts as lost.
            A killed shard process is detected at once (its kernel closes the connection); this bounds the stall
            when the shard's machine disappears without closing anything (power loss, network partition, a frozen
            node): the engine waits this long, then drops the shard and re-plans.
        connect_timeout_s: how long to wait for the shard to admit the connection and finish the handshake.
        secret: the app's shared secret: proven to the shard, and the shard must prove it back. None: no proof
            (a shard with a secret refuses the connection).
        local_host: this node's IP address, which the engine's end of the gloo pair binds to; optional only
            when the shard is on loopback (then 127.0.0.1).

    Raises:
        ShardUnavailable: the shard is unreachable or refused the connection (the message says why).
        ValueError: a malformed address / local_host / secret.
    """

    def __init__(self, address: tuple[str, int], name: str = "", timeout_s: float = 60.0,
                 connect_timeout_s: float = 30.0, *, secret: Optional[bytes] = None,
                 local_host: Optional[str] = None) -> None:
        host, port = address
        self.address = (host, int(port))
        self.name = name or f"{host}:{port}"
        self.dead = False
        self.op_timeout = timedelta(seconds=timeout_s)
        self.slot_experts: dict[str, list[int]] = {}
        self.fetched_slots = 0  # slots this connection had the shard read from the checkpoint (FETCH)
        self._layer_ids: dict[str, int] = {}
        self._hello: Optional[tuple[int, int, torch.dtype, int]] = None
        host = P.check_host(host, "expert shard address")
        self.local_host = (P.check_host(local_host, "local_host") if local_host is not None
                           else P.default_local_host(host))
        secret = P.check_secret(secret)
        self.pg: Any = None
        try:
            self.store = dist.TCPStore(host, int(port), is_master=False,
                                       timeout=timedelta(seconds=connect_timeout_s))
            self.cid = self.store.add("next", 1)
            self.store.queue_push(P.REQUEST_QUEUE, str(self.cid))
            status = self.store.get(f"conn{self.cid}/accept")
            if status != b"ok":
                self.store.delete_key(f"conn{self.cid}/accept")
                raise ShardUnavailable(f"cannot connect to expert shard {self.name}: "
                                       f"{status.decode('utf-8', 'replace')[:200]}")
            # the pair forms within the connect timeout; every later op waits at most ``timeout_s`` (explicitly:
            # a short op timeout must not cut a slow pair formation on a loaded machine)
            self.pg = P.pair_group(dist.PrefixStore(f"conn{self.cid}", self.store), 0, self.local_host,
                                   timedelta(seconds=max(timeout_s, connect_timeout_s)))
            self._handshake(secret, timedelta(seconds=connect_timeout_s))
        except Exception as e:  # noqa: BLE001
            self.dead = True
            self.pg = None  # drop our end of the pair now
            if isinstance(e, ShardUnavailable):
                raise
            raise ShardUnavailable(f"cannot connect to expert shard {self.name}: {e}") from e

    def _handshake(self, secret: Optional[bytes], t: timedelta) -> None:
        nonce_s = torch.empty(P.NONCE_BYTES, dtype=torch.uint8)
        self.pg.recv([nonce_s], 1, _TO_ENGINE).wait(t)
        ns = nonce_s.numpy().tobytes()
        nonce_e = secrets.token_bytes(P.NONCE_BYTES)
        self.pg.send([P.bytes_tensor(nonce_e + P.engine_proof(secret, self.cid, ns))], 1, _TO_SHARD).wait(t)
        reply = torch.empty(1 + P.MAC_BYTES, dtype=torch.uint8)
        self.pg.recv([reply], 1, _TO_ENGINE).wait(t)
        r = reply.numpy().tobytes()
        if r[0] != 1:
            raise ShardUnavailable(f"cannot connect to expert shard {self.name}: refused: wrong or missing secret "
                                   "(the shard requires the app's secret)")
        if secret is not None and not hmac.compare_digest(r[1:], P.shard_proof(secret, self.cid, ns, nonce_e)):
            raise ShardUnavailable(f"cannot connect to expert shard {self.name}: it did not prove the app's secret "
                                   "(not a shard of this app)")

    # ------------------------------------------------------------------ wire helpers
    def _send(self, t: torch.Tensor) -> Any:
        return self.pg.send([t.contiguous()], 1, _TO_SHARD) if t.numel() else None

    def _call(self, *tensors: torch.Tensor, reply: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        if self.dead:
            raise ShardUnavailable(f"expert shard {self.name} is gone")
        try:
            works = [w for w in (self._send(t) for t in tensors) if w is not None]
            if reply is not None and reply.numel():
                works.append(self.pg.recv([reply], 1, _TO_ENGINE))
            for w in works:
                w.wait(self.op_timeout)
        except Exception as e:  # noqa: BLE001
            self.dead = True
            raise ShardUnavailable(f"expert shard {self.name}: {e}") from e
        return reply

    def _ensure_hello(self, source: RoutedExperts | AbsentExperts) -> None:
        if isinstance(source, AbsentExperts):
            E, D, I, dt = source.num_experts, source.dim, source.inter_dim, source.dtype  # noqa: E741
        else:
            E, D, I = source.gate_proj.shape  # noqa: E741
            dt = source.gate_proj.dtype
        if dt not in DTYPES:
            raise ValueError(f"remote expert shards carry {[str(d) for d in DTYPES]}, not {dt}")
        if self._hello == (D, I, dt, E):
            return
        self._call(P.make_header(OP_HELLO, D, I, DTYPES.index(dt), E), reply=torch.empty(1, dtype=torch.int64))
        self._hello = (D, I, dt, E)

    # ------------------------------------------------------------------ SlotShard contract
    def load(self, layer_key: str, source: RoutedExperts, experts: list[int]) -> int:
        """Make the shard's slots of ``layer_key`` hold ``source``'s ``experts``, sending only the slots whose
        expert changed (all of them the first time); returns the number of slots whose weights moved."""
        self._ensure_hello(source)
        li = self._layer_ids.setdefault(layer_key, len(self._layer_ids))
        cur = self.slot_experts.get(layer_key)
        if cur is None or len(cur) != len(experts):
            moved = list(range(len(experts)))
        else:
            moved = [j for j, e in enumerate(experts) if cur[j] != e]
        if cur is not None and not moved:
            return 0
        if isinstance(source, AbsentExperts):  # the shard reads the rows from the checkpoint itself
            kind, index = P.fetch_layer_key(layer_key)
            self._call(P.make_header(OP_FETCH, li, len(experts), len(moved), kind, index),
                       torch.tensor(experts, dtype=torch.int64), torch.tensor(moved, dtype=torch.int64),
                       reply=torch.empty(1, dtype=torch.int64))
            self.slot_experts[layer_key] = list(experts)
            self.fetched_slots += len(moved)
            return len(moved)
        src = torch.tensor([experts[j] for j in moved], dtype=torch.int64)
        with torch.no_grad():
            tensors = [P.make_header(OP_LOAD, li, len(experts), len(moved)), torch.tensor(experts, dtype=torch.int64),
                       torch.tensor(moved, dtype=torch.int64), source.gate_proj.index_select(0, src),
                       source.up_proj.index_select(0, src), source.down_proj.index_select(0, src)]
        self._call(*tensors, reply=torch.empty(1, dtype=torch.int64))
        self.slot_experts[layer_key] = list(experts)
        return len(moved)

    def submit(self, layer_key: str, x_ND: torch.Tensor, counts_S: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Post the RUN (sends and the receive of the output) and return a callable that waits for the output."""
        if self.dead:
            raise ShardUnavailable(f"expert shard {self.name} is gone")
        li = self._layer_ids[layer_key]
        counts = counts_S.to("cpu", torch.int64)
        y = torch.empty_like(x_ND)
        try:
            works = [self._send(P.make_header(OP_RUN, li, x_ND.shape[0], counts.numel())), self._send(counts),
                     self._send(x_ND)]
            works = [w for w in works if w is not None]
            works.append(self.pg.recv([y], 1, _TO_ENGINE))
        except Exception as e:  # noqa: BLE001
            self.dead = True
            raise ShardUnavailable(f"expert shard {self.name}: {e}") from e
        return _Pending(self, works, y)

    def run(self, layer_key: str, x_ND: torch.Tensor, counts_S: torch.Tensor) -> torch.Tensor:
        return self.submit(layer_key, x_ND, counts_S)()

    def close(self) -> None:
        """Tell the shard this connection is done (its slots are freed); quiet if the shard is already gone."""
        if self.dead:
            return
        try:
            self._call(P.make_header(OP_CLOSE), reply=torch.empty(1, dtype=torch.int64))
        except ShardUnavailable:
            pass
        self.dead = True


if __name__ == "__main__":
    main()
