"""Remote expert shards: the data plane between an engine and the processes that hold its routed experts.

An expert shard (:class:`ShardServer`) is a process (in raymoe: a replica of the Serve deployment
``ExpertShardDeployment``) that holds physical expert slots and runs them as grouped GEMMs. An engine talks to it
through a :class:`RemoteShard`, a drop-in for the in-process :class:`raymoe.engine.experts.SlotShard`: the
:class:`~raymoe.engine.experts.ReplicatedExperts` backend decides placement, splits each layer's rows by slot, and
sends each shard its rows; the shard never sees the router or the placement, only "these rows for these slots".

Transport: one torch.distributed **gloo process group of two** (engine = rank 0, shard = rank 1) per engine ↔ shard
connection, built directly as ``ProcessGroupGloo`` on a ``PrefixStore`` of the shard's ``TCPStore``, so a process
can hold any number of connections, connections come and go without a world-wide rendezvous, and nothing touches the
default process group. Connecting: the engine increments the store counter ``"next"`` to get a connection id ``c``,
writes ``"req/<c>"``; the shard's accept thread polls for requested ids and starts a serving thread per id; both
build the pair group on prefix ``"conn<c>/"``. Every message starts with an ``int64[8]`` header (engine → shard, tag 0);
replies use tag 1::

    HELLO  [1, D, I, dtype]                         set the row width / dtype of this connection
    LOAD   [2, layer, S, m]  ids int64[S]  moved int64[m]  gate [m, D, I]  up [m, D, I]  down [m, I, D]
           (slots ``moved`` of the layer now hold experts ``ids[moved]``; a layer seen for the first time or
           resized gets all S slots)                                                     → ack int64[1] (slots moved)
    RUN    [3, layer, N, S]  counts int64[S]  x [N, D]          (rows grouped by local slot) → y [N, D]
    CLOSE  [4]                                                                           → ack, connection ends

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

import collections
import logging
import socket
import threading
import time
from datetime import timedelta
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from raymoe.model.moe import RoutedExperts

__all__ = ["ShardServer", "RemoteShard", "ShardUnavailable", "spawn_shard_processes", "OP_HELLO", "OP_LOAD", "OP_RUN", "OP_CLOSE"]

log = logging.getLogger(__name__)

OP_HELLO, OP_LOAD, OP_RUN, OP_CLOSE = 1, 2, 3, 4
_TO_SHARD, _TO_ENGINE = 0, 1
_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


class ShardUnavailable(RuntimeError):
    """The shard's process or connection is gone (killed, drained, network): re-plan without it."""


def _bind(host: str) -> socket.socket:
    """A listening socket on ``host`` only (never every interface), handed to the TCPStore."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, 0))
    s.listen(64)
    return s


def _header(*vals: int) -> torch.Tensor:
    h = torch.zeros(8, dtype=torch.int64)
    h[: len(vals)] = torch.tensor(vals, dtype=torch.int64)
    return h


class _Conn:
    """Shard-side state of one engine connection: its gloo pair and its slots."""

    def __init__(self, cid: int, pg: Any) -> None:
        self.cid, self.pg = cid, pg
        self.D = self.I = 0
        self.dtype = torch.float32
        self.layers: dict[int, RoutedExperts] = {}
        self.ids: dict[int, list[int]] = {}

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype)
        if t.numel():
            self.pg.recv([t], 0, _TO_SHARD).wait()
        return t

    def send(self, t: torch.Tensor) -> None:
        if t.numel():
            self.pg.send([t.contiguous()], 0, _TO_ENGINE).wait()


class ShardServer:
    """Shard side (module docstring). ``ShardServer(host).address`` is what engines connect to; ``close()`` stops
    accepting and ends the serving threads (engines see :class:`ShardUnavailable`).

    Args:
        host: the interface to listen on (``127.0.0.1`` for one machine; the node's IP on a cluster).
        timeout_s: gloo operation timeout on the shard side. A serving thread waits for the next message in one
            ``recv``, so this is also how long an engine may stay idle before its connection is dropped: keep it
            long (default a week). A hung engine is not the shard's problem; the engine side has a short timeout.
        rate_window_s: the window of :meth:`stats`' ``rows_per_s``.
    """

    def __init__(self, host: str = "127.0.0.1", timeout_s: float = 7 * 24 * 3600.0, rate_window_s: float = 5.0) -> None:
        self.host = host
        sock = _bind(host)
        self.port = sock.getsockname()[1]
        # the store owns the listening fd from here on (never close it ourselves: a later socket could get the
        # same number while the store's server still polls it)
        self.store = dist.TCPStore(host, self.port, is_master=True, wait_for_workers=False,
                                   timeout=timedelta(seconds=60), master_listen_fd=sock.detach())
        self.timeout = timedelta(seconds=timeout_s)
        self.rate_window_s = rate_window_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.conns: dict[int, _Conn] = {}
        self.rows_total = 0
        self.runs = 0
        self._events: collections.deque = collections.deque()  # (time, rows)
        self._threads: list[threading.Thread] = []
        t = threading.Thread(target=self._accept, name="shard-accept", daemon=True)
        t.start()
        self._threads.append(t)

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    # ------------------------------------------------------------------ accept / serve
    def _accept(self) -> None:
        """Start a serving thread for every requested connection id. Ids are polled, not awaited in order: an engine
        that died between taking an id and requesting it must not block the ones after it."""
        started: set[int] = set()
        while not self._stop.is_set():
            try:
                issued = self.store.add("next", 0)
                ready = [c for c in range(1, issued + 1) if c not in started and self.store.check([f"req/{c}"])]
            except Exception:  # noqa: BLE001 - the store is closing
                ready = []
            for cid in ready:
                started.add(cid)
                t = threading.Thread(target=self._serve, args=(cid,), name=f"shard-conn{cid}", daemon=True)
                t.start()
                self._threads.append(t)
            if not ready:
                time.sleep(0.02)

    def _serve(self, cid: int) -> None:
        try:
            pg = dist.ProcessGroupGloo(dist.PrefixStore(f"conn{cid}/", self.store), 1, 2, self.timeout)
        except Exception:  # noqa: BLE001 - the engine went away before the pair formed
            log.warning("expert shard: connection %d failed to form", cid, exc_info=True)
            return
        conn = _Conn(cid, pg)
        with self._lock:
            self.conns[cid] = conn
        try:
            while not self._stop.is_set():
                hdr = conn.recv((8,), torch.int64)
                if not self._handle(conn, hdr.tolist()):
                    break
        except Exception as e:  # noqa: BLE001 - engine gone (connection reset) or timeout: drop the connection
            if not self._stop.is_set():
                log.info("expert shard: connection %d ended: %s", cid, e)
        finally:
            with self._lock:
                self.conns.pop(cid, None)

    def _handle(self, c: _Conn, h: list[int]) -> bool:
        op = h[0]
        if op == OP_RUN:
            layer, n, s = h[1], h[2], h[3]
            counts = c.recv((s,), torch.int64)
            x = c.recv((n, c.D), c.dtype)
            with torch.inference_mode():
                y = c.layers[layer].forward_grouped(x, counts)
            self._count(n)  # before the reply: once the engine has y, the stats include it
            c.send(y)
            return True
        if op == OP_LOAD:
            layer, s, m = h[1], h[2], h[3]
            ids = c.recv((s,), torch.int64).tolist()
            moved = c.recv((m,), torch.int64)
            gate = c.recv((m, c.D, c.I), c.dtype)
            up = c.recv((m, c.D, c.I), c.dtype)
            down = c.recv((m, c.I, c.D), c.dtype)
            cur = c.layers.get(layer)
            if cur is None or cur.num_experts != s:
                if m != s:
                    raise RuntimeError(f"LOAD of layer {layer}: {m} of {s} slots sent for a new layer")
                cur = RoutedExperts(s, c.D, c.I).to(c.dtype)
                cur.requires_grad_(False)
                c.layers[layer] = cur
            with torch.no_grad():
                cur.gate_proj[moved] = gate
                cur.up_proj[moved] = up
                cur.down_proj[moved] = down
            cur.expert_ids = ids
            c.ids[layer] = ids
            c.send(torch.tensor([m], dtype=torch.int64))
            return True
        if op == OP_HELLO:
            c.D, c.I, c.dtype = h[1], h[2], _DTYPES[h[3]]
            c.send(torch.tensor([1], dtype=torch.int64))
            return True
        if op == OP_CLOSE:
            c.send(torch.tensor([1], dtype=torch.int64))
            return False
        raise RuntimeError(f"expert shard: unknown op {op} on connection {c.cid}")

    def _count(self, n: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.rows_total += n
            self.runs += 1
            self._events.append((now, n))
            while self._events and now - self._events[0][0] > self.rate_window_s:
                self._events.popleft()

    # ------------------------------------------------------------------ introspection
    def stats(self) -> dict[str, Any]:
        """``rows_total`` / ``runs`` since start, ``rows_per_s`` over the last ``rate_window_s``, live
        ``connections``, and the slots each connection holds (``{conn: {layer: [expert ids]}}``)."""
        now = time.monotonic()
        with self._lock:
            while self._events and now - self._events[0][0] > self.rate_window_s:
                self._events.popleft()
            rows = sum(n for _, n in self._events)
            return {"rows_total": self.rows_total, "runs": self.runs, "rows_per_s": rows / self.rate_window_s,
                    "connections": len(self.conns),
                    "slots": {cid: {k: list(v) for k, v in c.ids.items()} for cid, c in self.conns.items()}}

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until no engine is connected (every engine moved its slots elsewhere and closed) or the timeout;
        returns whether it became idle."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            with self._lock:
                if not self.conns:
                    return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            conns = list(self.conns.values())
            self.conns.clear()
        for c in conns:  # break the pairs: engines waiting on this shard fail now instead of at their timeout
            try:
                c.pg.abort()
            except Exception:  # noqa: BLE001
                pass
        self._threads[0].join(timeout=2.0)


def spawn_shard_processes(n: int, procs: list, threads: int = 1,
                          host: str = "127.0.0.1") -> list[tuple[str, int]]:
    """Start ``n`` shard server processes (``python -m raymoe.engine.remote``), all before waiting on any; each
    ``Popen`` is appended to ``procs`` (the caller kills them) as soon as it exists. Returns their addresses."""
    import subprocess
    import sys

    new = [subprocess.Popen([sys.executable, "-m", "raymoe.engine.remote", "--host", host, "--threads", str(threads)],
                            stdout=subprocess.PIPE, text=True) for _ in range(n)]
    procs.extend(new)
    addrs = []
    for p in new:
        _, h, port = p.stdout.readline().split()
        addrs.append((h, int(port)))
    return addrs


def main(argv: Optional[list[str]] = None) -> None:
    """``python -m raymoe.engine.remote [--host 127.0.0.1]``: run a shard server until killed; prints
    ``SHARD <host> <port>`` once it listens."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    srv = ShardServer(a.host)
    print(f"SHARD {srv.host} {srv.port}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        srv.close()


if __name__ == "__main__":
    main()


class _Pending:
    """An in-flight RUN: the posted sends and the receive of its output."""

    def __init__(self, shard: "RemoteShard", works: list, y: torch.Tensor) -> None:
        self.shard, self.works, self.y = shard, works, y

    def __call__(self) -> torch.Tensor:
        try:
            for w in self.works:
                w.wait()
        except Exception as e:  # noqa: BLE001
            self.shard.dead = True
            raise ShardUnavailable(f"expert shard {self.shard.name} failed during a forward: {e}") from e
        return self.y


class RemoteShard:
    """Engine-side handle of one connection to a :class:`ShardServer` (the ``SlotShard`` contract: ``load``,
    ``run`` and the non-blocking ``submit``).

    Args:
        address: ``(host, port)`` of the shard's store.
        name: a label for logs and errors (e.g. the Serve replica id).
        timeout_s: gloo timeout of this connection (a dead shard is detected by the broken connection at once;
            this bounds a hung one).
    """

    def __init__(self, address: tuple[str, int], name: str = "", timeout_s: float = 60.0,
                 connect_timeout_s: float = 30.0) -> None:
        host, port = address
        self.address = (host, int(port))
        self.name = name or f"{host}:{port}"
        self.dead = False
        self.slot_experts: dict[str, list[int]] = {}
        self._layer_ids: dict[str, int] = {}
        self._hello: Optional[tuple[int, int, torch.dtype]] = None
        try:
            self.store = dist.TCPStore(host, int(port), is_master=False,
                                       timeout=timedelta(seconds=connect_timeout_s))
            cid = self.store.add("next", 1)
            self.store.set(f"req/{cid}", b"1")
            self.pg = dist.ProcessGroupGloo(dist.PrefixStore(f"conn{cid}/", self.store), 0, 2,
                                            timedelta(seconds=timeout_s))
        except Exception as e:  # noqa: BLE001
            self.dead = True
            raise ShardUnavailable(f"cannot connect to expert shard {self.name}: {e}") from e

    # ------------------------------------------------------------------ wire helpers
    def _send(self, t: torch.Tensor) -> Any:
        return self.pg.send([t.contiguous()], 1, _TO_SHARD) if t.numel() else None

    def _call(self, *tensors: torch.Tensor, reply: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        try:
            works = [w for w in (self._send(t) for t in tensors) if w is not None]
            if reply is not None and reply.numel():
                works.append(self.pg.recv([reply], 1, _TO_ENGINE))
            for w in works:
                w.wait()
        except Exception as e:  # noqa: BLE001
            self.dead = True
            raise ShardUnavailable(f"expert shard {self.name}: {e}") from e
        return reply

    def _ensure_hello(self, source: RoutedExperts) -> None:
        D, I = source.gate_proj.shape[1], source.gate_proj.shape[2]
        dt = source.gate_proj.dtype
        if self._hello == (D, I, dt):
            return
        self._call(_header(OP_HELLO, D, I, _DTYPES.index(dt)), reply=torch.empty(1, dtype=torch.int64))
        self._hello = (D, I, dt)

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
        src = torch.tensor([experts[j] for j in moved], dtype=torch.int64)
        with torch.no_grad():
            tensors = [_header(OP_LOAD, li, len(experts), len(moved)), torch.tensor(experts, dtype=torch.int64),
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
            works = [self._send(_header(OP_RUN, li, x_ND.shape[0], counts.numel())), self._send(counts),
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
            self._call(_header(OP_CLOSE), reply=torch.empty(1, dtype=torch.int64))
        except ShardUnavailable:
            pass
        self.dead = True
