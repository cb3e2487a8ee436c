"""The shard side of the remote-expert data plane: :class:`ShardServer` admits engine connections, proves and
checks the app's secret, validates every header and runs the grouped GEMMs (the protocol and the threat model are in
:mod:`raymoe.engine.remote` and :mod:`raymoe.engine.shard_protocol`).

Threads: one accept thread that never blocks (it pops connection requests from the store queue and answers them),
and one thread per connection: it forms the gloo pair on its own store client (a pair that never forms blocks only
that client), runs the handshake within ``handshake_timeout_s``, then serves messages until CLOSE, a bad message or
the engine going away. When that thread returns, the last reference to its pair goes and the engine sees the
connection close at once.
"""
from __future__ import annotations

import collections
import hmac
import ipaddress
import logging
import secrets
import socket
import threading
import time
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist

from raymoe.engine import shard_protocol as P
from raymoe.engine.shard_protocol import OP_FETCH, OP_HELLO, OP_LOAD, OP_RUN, ProtocolError, ShardLimits
from raymoe.model.moe import RoutedExperts

__all__ = ["ShardServer", "ShardLimits"]

log = logging.getLogger("raymoe.engine.remote")  # one logger for the data plane, both sides

_POPS_PER_TICK = 64  # requests one accept tick takes from the queue before it looks at its timers again
_REFUSAL_TTL_S = 120.0  # a refusal answer stays in the store this long for its engine to read


def _bind(host: str) -> socket.socket:
    """A listening socket on ``host`` only (never every interface), handed to the TCPStore."""
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, 0))
    s.listen(64)
    return s


class _Conn:
    """Shard-side state of one authenticated engine connection: its gloo pair and its slots. Every op waits up to
    ``timeout`` (the pair's own default is the short handshake timeout)."""

    def __init__(self, cid: int, pg: Any, timeout: timedelta) -> None:
        self.cid, self.pg, self.timeout = cid, pg, timeout
        self.hello: Optional[P.Hello] = None
        self.layers: dict[int, RoutedExperts] = {}
        self.ids: dict[int, list[int]] = {}
        self.nbytes = 0  # slot weights held

    def layer_slots(self) -> dict[int, int]:
        return {k: v.num_experts for k, v in self.layers.items()}

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype)
        if t.numel():
            self.pg.recv([t], 0, P.TAG_TO_SHARD).wait(self.timeout)
        return t

    def send(self, t: torch.Tensor) -> None:
        if t.numel():
            self.pg.send([t.contiguous()], 0, P.TAG_TO_ENGINE).wait(self.timeout)


class ShardServer:
    """Shard side (module docstring). ``ShardServer(host).address`` is what engines connect to; ``close()`` stops
    accepting and ends the serving threads.

    Args:
        host: the IP address to listen on and bind the gloo pairs to (``127.0.0.1`` for one machine; the node's IP
            on a cluster). Never a wildcard or a hostname.
        timeout_s: gloo operation timeout of a live connection. A serving thread waits for the next message in one
            ``recv``, so this is also how long an engine may stay idle before its connection is dropped: keep it
            long (default a week). A hung engine is not the shard's problem; the engine side has a short timeout.
        rate_window_s: the window of :meth:`stats`' ``rows_per_s``.
        secret: the app's shared secret (>= 16 bytes); with it every connection must prove it (HMAC) before it is
            served. None: anyone who reaches ``host`` is served (loopback tests).
        limits: :class:`ShardLimits` (header bounds, connection counts).
        handshake_timeout_s: how long a requested connection may take to form its pair and prove the secret.
        expert_source: where FETCH reads expert rows (a :class:`raymoe.engine.checkpoint_experts.CheckpointExperts`
            of the served model's checkpoint: ``rows(layer_key, experts, dtype)``, ``num_experts``, ``dim``,
            ``inter_dim``). None: FETCH is refused (engines must send the weights with LOAD).
    """

    def __init__(self, host: str = "127.0.0.1", timeout_s: float = 7 * 24 * 3600.0, rate_window_s: float = 5.0,
                 *, secret: Optional[bytes] = None, limits: Optional[ShardLimits] = None,
                 handshake_timeout_s: float = 10.0, expert_source: Any = None) -> None:
        self.host = P.check_host(host, "expert shard host")
        self.expert_source = expert_source
        self.fetched_rows = 0  # expert rows read from the checkpoint (FETCH)
        self.fetch_s = 0.0  # time spent reading them
        self._secret = P.check_secret(secret)
        self.limits = limits or ShardLimits()
        if handshake_timeout_s <= 0:
            raise ValueError(f"handshake_timeout_s must be > 0, got {handshake_timeout_s}")
        self.handshake_timeout = timedelta(seconds=handshake_timeout_s)
        sock = _bind(self.host)
        self.port = sock.getsockname()[1]
        # the store owns the listening fd from here on (never close it ourselves: a later socket could get the
        # same number while the store's server still polls it)
        self.store = dist.TCPStore(self.host, self.port, is_master=True, wait_for_workers=False,
                                   timeout=timedelta(seconds=60), master_listen_fd=sock.detach())
        self.timeout = timedelta(seconds=timeout_s)
        self.rate_window_s = rate_window_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.conns: dict[int, _Conn] = {}
        self._pending = 0
        self._seen: set[int] = set()
        self._expiring: collections.deque = collections.deque()  # (deadline, store key)
        self.refused: collections.Counter = collections.Counter()  # reason -> connections refused
        self.protocol_errors = 0
        self.last_protocol_error: Optional[str] = None
        self.rows_total = 0
        self.runs = 0
        self._events: collections.deque = collections.deque()  # (time, rows)
        self._accept_thread = threading.Thread(target=self._accept, name="shard-accept", daemon=True)
        self._accept_thread.start()

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    # ------------------------------------------------------------------ admission
    def _accept(self) -> None:
        """Admit requested connections from the store queue. Nothing here blocks: a request that never forms its
        pair costs a handshake slot for at most the handshake timeout, in its own thread."""
        while not self._stop.is_set():
            try:
                n = self._admit()
                self._expire()
            except Exception:  # noqa: BLE001 - keep accepting; the store may be closing
                if self._stop.is_set():
                    return
                log.warning("expert shard: accept loop error", exc_info=True)
                n = 0
            if not n:
                time.sleep(0.02)

    def _admit(self) -> int:
        popped = 0
        while popped < _POPS_PER_TICK and not self._stop.is_set():
            with self._lock:
                pending, busy = self._pending, self._pending + len(self.conns)
            if pending >= self.limits.max_pending:
                break  # the rest wait in the queue until a handshake ends
            try:
                raw = self.store.queue_pop(P.REQUEST_QUEUE, False)
            except dist.QueueEmptyError:
                break
            popped += 1
            cid = P.parse_request(raw, self.store.add("next", 0))
            if cid is None or cid in self._seen:  # garbage or a replay: never touch another connection's keys
                self._note_refused("request")
                continue
            self._seen.add(cid)
            if busy >= self.limits.max_connections:
                self._note_refused("capacity")
                log.warning("expert shard: connection %d refused: %d connections is the limit", cid,
                            self.limits.max_connections)
                key = f"conn{cid}/accept"
                self.store.set(key, f"refused: the shard is at its limit of {self.limits.max_connections} "
                                    "connections".encode())
                self._expiring.append((time.monotonic() + _REFUSAL_TTL_S, key))
                continue
            with self._lock:
                self._pending += 1
            self.store.set(f"conn{cid}/accept", b"ok")
            threading.Thread(target=self._serve, args=(cid,), name=f"shard-conn{cid}", daemon=True).start()
        return popped

    def _expire(self) -> None:
        now = time.monotonic()
        while self._expiring and self._expiring[0][0] <= now:
            self.store.delete_key(self._expiring.popleft()[1])

    def _note_refused(self, reason: str) -> None:
        with self._lock:
            self.refused[reason] += 1

    def _handshake(self, cid: int, pg: Any) -> bool:
        """Challenge–response over the new pair (:mod:`raymoe.engine.shard_protocol`); True when the engine proved
        the secret (or the shard has none). A refused engine is told so before the pair closes."""
        t = self.handshake_timeout
        nonce_s = secrets.token_bytes(P.NONCE_BYTES)
        pg.send([P.bytes_tensor(nonce_s)], 0, P.TAG_TO_ENGINE).wait(t)
        msg = torch.empty(P.NONCE_BYTES + P.MAC_BYTES, dtype=torch.uint8)
        pg.recv([msg], 0, P.TAG_TO_SHARD).wait(t)
        b = msg.numpy().tobytes()
        nonce_e, proof = b[: P.NONCE_BYTES], b[P.NONCE_BYTES:]
        ok = self._secret is None or hmac.compare_digest(proof, P.engine_proof(self._secret, cid, nonce_s))
        mine = P.shard_proof(self._secret, cid, nonce_s, nonce_e) if ok else bytes(P.MAC_BYTES)
        pg.send([P.bytes_tensor(bytes([int(ok)]) + mine)], 0, P.TAG_TO_ENGINE).wait(t)
        return ok

    # ------------------------------------------------------------------ serve
    def _serve(self, cid: int) -> None:
        conn = self._open(cid)
        if conn is None:
            return
        try:
            while not self._stop.is_set():
                hdr = conn.recv((P.HEADER_LEN,), torch.int64)
                if not self._handle(conn, hdr.tolist()):
                    break
        except ProtocolError as e:
            msg = str(e)
            with self._lock:
                self.protocol_errors += 1
                self.last_protocol_error = f"connection {cid}: {msg}"
            log.warning("expert shard: connection %d closed: bad %s", cid, msg)
        except Exception as e:  # noqa: BLE001 - engine gone (connection reset) or timeout: drop the connection
            if not self._stop.is_set():
                log.info("expert shard: connection %d ended: %s", cid, str(e))
        finally:
            with self._lock:
                self.conns.pop(cid, None)
            # drop the last reference to the pair now (not whenever a traceback that saw this frame dies): the
            # engine sees the connection close at once. Logs get strings only, never the exception (its frames).
            conn.pg = None
            conn.layers.clear()

    def _open(self, cid: int) -> Optional[_Conn]:
        """Form connection ``cid``'s pair and run the handshake; the connection, registered as live, or None when
        it was refused (nothing but the pair existed for it, and that is gone when this returns)."""
        conn: Optional[_Conn] = None
        pg = store = None
        reason = "handshake"
        try:
            # its own store client: a pair that never forms blocks this client's wait, not the accept loop's store
            store = dist.TCPStore(self.host, self.port, is_master=False, timeout=self.handshake_timeout)
            pg = P.pair_group(dist.PrefixStore(f"conn{cid}", store), 1, self.host, self.handshake_timeout)
            if self._handshake(cid, pg):
                conn = _Conn(cid, pg, self.timeout)
            else:
                reason = "auth"
                log.warning("expert shard: connection %d refused: wrong or missing secret", cid)
        except Exception as e:  # noqa: BLE001 - no pair or no answer within the handshake timeout
            log.info("expert shard: connection %d refused: no handshake within %.0f s: %s", cid,
                     self.handshake_timeout.total_seconds(), str(e))
        finally:
            pg = store = None
            for key in P.rendezvous_keys(cid):
                try:
                    self.store.delete_key(key)
                except Exception:  # noqa: BLE001 - store closing
                    pass
            with self._lock:
                self._pending -= 1
                if conn is None:
                    self.refused[reason] += 1
                elif self._stop.is_set():
                    conn = None
                else:
                    self.conns[cid] = conn
        return conn

    def _handle(self, c: _Conn, h: list[int]) -> bool:
        op = P.check_header(h, c.hello)
        if op == OP_RUN:
            layer, n, s = P.check_run(h, self.limits, c.hello, c.layer_slots())
            counts = c.recv((s,), torch.int64)
            P.check_counts(counts, n)
            x = c.recv((n, c.hello.D), c.hello.dtype)
            with torch.inference_mode():
                y = c.layers[layer].forward_grouped(x, counts)
            self._count(n)  # before the reply: once the engine has y, the stats include it
            c.send(y)
            return True
        if op == OP_LOAD:
            layer, s, m = P.check_load(h, self.limits, c.hello, c.layer_slots(), c.nbytes)
            ids = c.recv((s,), torch.int64)
            moved = c.recv((m,), torch.int64)
            P.check_load_ids(ids, moved, s, c.hello.E)
            D, I, dt = c.hello.D, c.hello.I, c.hello.dtype  # noqa: E741
            gate = c.recv((m, D, I), dt)
            up = c.recv((m, D, I), dt)
            down = c.recv((m, I, D), dt)
            self._install(c, layer, s, ids, moved, gate, up, down)
            c.send(torch.tensor([m], dtype=torch.int64))
            return True
        if op == OP_FETCH:
            return self._fetch(c, h)
        if op == OP_HELLO:
            c.hello = P.check_hello(h, self.limits, c.hello, bool(c.layers))
            c.send(torch.tensor([1], dtype=torch.int64))
            return True
        c.send(torch.tensor([1], dtype=torch.int64))  # OP_CLOSE (check_header knows no other op)
        return False

    def _fetch(self, c: _Conn, h: list[int]) -> bool:
        """FETCH: LOAD whose weights this shard reads from its checkpoint (only the moved slots' experts)."""
        src = self.expert_source
        if src is None:
            raise ProtocolError("FETCH", "op", "this shard has no checkpoint to read experts from (send LOAD)")
        layer, s, m, key = P.check_fetch(h, self.limits, c.hello, c.layer_slots(), c.nbytes)
        D, I, dt = c.hello.D, c.hello.I, c.hello.dtype  # noqa: E741
        if (c.hello.E, D, I) != (src.num_experts, src.dim, src.inter_dim):
            raise ProtocolError("FETCH", "HELLO", f"E, D, I = {(c.hello.E, D, I)} do not match the checkpoint's "
                                                  f"{(src.num_experts, src.dim, src.inter_dim)} (another model?)")
        ids = c.recv((s,), torch.int64)
        moved = c.recv((m,), torch.int64)
        P.check_load_ids(ids, moved, s, c.hello.E)
        t0 = time.perf_counter()
        try:
            gate, up, down = src.rows(key, ids[moved].tolist(), dt)
        except (KeyError, ValueError) as e:  # a layer the checkpoint lacks (CheckpointError is a ValueError)
            raise ProtocolError("FETCH", "index", f"{key}: {e}") from None
        self._install(c, layer, s, ids, moved, gate, up, down)
        with self._lock:
            self.fetched_rows += m
            self.fetch_s += time.perf_counter() - t0
        c.send(torch.tensor([m], dtype=torch.int64))
        return True

    def _install(self, c: _Conn, layer: int, s: int, ids: torch.Tensor, moved: torch.Tensor, gate: torch.Tensor,
                 up: torch.Tensor, down: torch.Tensor) -> None:
        """Put the moved slots' weights into the connection's layer (allocated on first use or resize)."""
        D, I, dt = c.hello.D, c.hello.I, c.hello.dtype  # noqa: E741
        cur = c.layers.get(layer)
        if cur is None or cur.num_experts != s:
            cur = RoutedExperts(s, D, I).to(dt)
            cur.requires_grad_(False)
        with torch.no_grad():
            cur.gate_proj[moved] = gate
            cur.up_proj[moved] = up
            cur.down_proj[moved] = down
        cur.expert_ids = ids.tolist()
        with self._lock:
            c.layers[layer] = cur
            c.ids[layer] = list(cur.expert_ids)
            c.nbytes = sum(3 * e.num_experts * D * I * dt.itemsize for e in c.layers.values())

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
        ``connections`` and ``pending`` handshakes, the slots each connection holds (``{conn: {layer: [expert
        ids]}}``) and their ``slot_bytes``, connections ``refused`` before being served (by reason: ``auth``,
        ``handshake``, ``capacity``, ``request``), and connections closed for a bad message (``protocol_errors``,
        ``last_protocol_error`` naming the field)."""
        now = time.monotonic()
        with self._lock:
            while self._events and now - self._events[0][0] > self.rate_window_s:
                self._events.popleft()
            rows = sum(n for _, n in self._events)
            return {"rows_total": self.rows_total, "runs": self.runs, "rows_per_s": rows / self.rate_window_s,
                    "connections": len(self.conns), "pending": self._pending,
                    "slots": {cid: {k: list(v) for k, v in c.ids.items()} for cid, c in self.conns.items()},
                    "slot_bytes": sum(c.nbytes for c in self.conns.values()), "refused": dict(self.refused),
                    "protocol_errors": self.protocol_errors, "last_protocol_error": self.last_protocol_error,
                    "fetched_rows": self.fetched_rows, "fetch_s": self.fetch_s}

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
        for c in conns:
            try:
                c.pg.abort()
            except Exception:  # noqa: BLE001
                pass
        self._accept_thread.join(timeout=2.0)
