"""Point-to-point transport for pipeline stages on different processes: communication runs beside compute.

:class:`P2PTransport` implements the :class:`raymoe.schedule.executor.Transport` protocol (``send``, ``recv``,
``poll``) over ``torch.distributed`` point-to-point ops, so that a :class:`~raymoe.schedule.executor.StageRunner`
in each process runs its rank's op list of a :class:`~raymoe.schedule.ir.Schedule` unchanged. A channel is
``(src pp rank, dst pp rank, kind "F"|"B", consumer stage, consumer direction)``, as the runner builds it.

Usage (one process per pipeline rank, ``torch.distributed`` already initialised)::

    tp = P2PTransport(pp_rank, {r: global_rank_of(r) for r in range(pp)}, group_for=topology.p2p_group)
    runner = StageRunner(schedule, pp_rank, chunks, tp, loss_fn, chunk_kwargs=side_inputs)
    tp.expect(expected_recvs(schedule, pp_rank))       # arm the receivers: prefetch starts now
    runner.start_step(inputs, targets)
    while not runner.done:
        runner.run_next()
    losses = runner.finish_step()
    tp.finish_step()                                    # all sends delivered, nothing left over
    stats = tp.stats()                                  # bytes, messages, seconds the caller sat in recv()

Design
------

*Links and threads* (:mod:`raymoe.train.p2p_link`). Between two pp ranks there are two **links**, one per
direction, each one ordered stream of messages with exactly one thread at each end: a sender thread on the source
and a receiver thread on the destination. ``send`` never touches the network: it makes a contiguous detached copy
of the tensor (on its own device, in the caller's stream; a CUDA event marks when the copy is done) and puts it on
the link's queue, so the caller returns at once and may overwrite or free its tensor. The receiver thread is armed
by :meth:`P2PTransport.expect` with the (channel, micro-batch) list this rank will receive in the step
(:func:`expected_recvs` computes it from the schedule, exactly the sequence of ``recv`` calls
:class:`StageRunner` makes); while messages remain expected on its link it keeps a receive posted, so data is
**prefetched** while the caller computes, and ``recv`` only blocks when the data has not arrived yet. That blocked
time is pipeline idle time and is counted (``stats().recv_wait_s``). This module owns the bookkeeping of what is
expected, arrived and consumed; the link threads report to it through :class:`~raymoe.train.p2p_link.LinkHooks`.

*Wire format* (:mod:`raymoe.train.p2p_wire`). Every message is a fixed-size int64 header naming its link
sequence number, channel, micro-batch, dtype and shape, followed by the payload as raw bytes; each link is one
ordered stream on one fixed tag, so messages of different channels never mix and the receiver needs no shape
knowledge.

*Why it does not deadlock.* The caller never waits on the network except in ``recv`` (for data its next op needs)
and ``finish_step``. On each link the receiver thread keeps a receive posted whenever a message is still expected,
independently of what the receiving process's main thread is doing, and it receives in exactly the order the
sender thread sends. So every send is matched without waiting for any compute, and the only waits left are
"rank r's next op needs a tensor that rank q's op list produces" -- the schedule's own dependency graph, which the
validator proves acyclic (the sequential executor runs it in one process). A single sender thread per process
would also be deadlock-free for the same reason; one per outgoing link avoids head-of-line blocking (a late peer
does not hold up sends to the other neighbour) and lets both neighbours' transfers run in parallel. The only
unbounded buffering is the prefetch itself: at most what the schedule keeps in flight.

*Errors.* An exception in a thread (a bad header, an unexpected or out-of-sequence message, a backend error) is
stored and re-raised as :class:`P2PError` by the next ``send``/``recv``/``poll``/``expect``/``finish_step``;
waiters in ``recv``/``finish_step`` are woken, so an error never turns into a silent hang. Waits are bounded by
``timeout_s`` and raise :class:`P2PTimeout` naming this rank, the peer, the channel and the micro-batch.

*Groups.* ``group_for(peer_pp_rank)`` gives the process group for traffic with that peer (``None``: the default
group); dedicated 2-rank groups keep P2P in threads apart from collectives (all-reduce, all-to-all) that the main
thread issues on other groups. ``link_group_for(src_pp, dst_pp)``, when given, overrides it per direction (needed
on NCCL: see the NCCL notes in :mod:`raymoe.train.p2p_link`, which also say what :meth:`P2PTransport.close` cannot
cancel).
"""
from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter, defaultdict, deque
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from raymoe.schedule.ir import OpKind, Schedule
from raymoe.train.p2p_link import Link, LinkHooks, open_link, start_receiver, start_sender
from raymoe.train.p2p_wire import (DEFAULT_TAG, DTYPES, MAX_DIMS, Channel, P2PError, P2PTimeout, RecvKey, parse_channel,
                                   sendable)

# P2PError / P2PTimeout live with the wire format and are re-exported: they are what a transport user catches
__all__ = ["P2PTransport", "P2PError", "P2PTimeout", "P2PStats", "expected_recvs"]

GroupFor = Callable[[int], Optional[dist.ProcessGroup]]
LinkGroupFor = Callable[[int, int], Optional[dist.ProcessGroup]]


@dataclasses.dataclass
class P2PStats:
    """Counters since construction or the last :meth:`P2PTransport.reset_stats` (payload bytes, headers excluded).

    Attributes:
        msgs_sent / msgs_received: messages over the network (loopback hand-offs on the same rank not counted).
        bytes_sent / bytes_received: payload bytes of those messages.
        send_calls / recv_calls: calls of ``send`` / ``recv`` (loopback included).
        send_call_s: seconds the caller spent inside ``send`` (the copy and the enqueue).
        recv_wait_s: seconds the caller spent blocked in ``recv`` waiting for data: pipeline idle time.
        send_thread_s: seconds the sender threads spent sending (link busy time, all links together).
        finish_wait_s: seconds ``finish_step`` waited for outstanding sends.
    """

    msgs_sent: int = 0
    msgs_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    send_calls: int = 0
    recv_calls: int = 0
    send_call_s: float = 0.0
    recv_wait_s: float = 0.0
    send_thread_s: float = 0.0
    finish_wait_s: float = 0.0


def expected_recvs(schedule: Schedule, pp_rank: int) -> list[tuple[Channel, int]]:
    """The ``(channel, mb_id)`` receives of rank ``pp_rank`` in one step, in the order its runner makes them.

    Same rule as ``StageRunner._recvs`` (and ``Schedule.with_comms``): a forward of a stage > 0 receives the
    previous stage's activation, a backward (``B``/``Bi``) of a stage < S-1 receives the next stage's input grad;
    an ``F&B`` pair receives for its forward first. Entries whose source is ``pp_rank`` itself (the V's turn under
    DualPipeV) are included: the transport hands those over locally.

    Args:
        schedule: the step's schedule.
        pp_rank: this process's pipeline rank.

    Returns:
        ``[(channel, mb_id), ...]`` with ``channel = (src, pp_rank, "F"|"B", consumer stage, consumer direction)``.
    """
    s, out = schedule, []
    for op in s.ops(pp_rank):
        for p in op.parts:
            mb_id = s.mb_id(p)
            if p.kind is OpKind.F and (prev := s.prev_cell(p)) is not None:
                out.append(((s.rank_of(prev[2], prev[1]), pp_rank, "F", p.stage, p.direction), mb_id))
            elif p.kind in (OpKind.B, OpKind.BI) and (nxt := s.next_cell(p)) is not None:
                out.append(((s.rank_of(nxt[2], nxt[1]), pp_rank, "B", p.stage, p.direction), mb_id))
    return out


class P2PTransport:
    """Stage-to-stage tensors over ``torch.distributed`` P2P, sent and prefetched by background threads.

    Args:
        pp_rank: this process's pipeline rank.
        ranks: ``{pp rank: global torch.distributed rank}`` of the pipeline peers in this rank's ep/dp slice
            (this rank included).
        group_for: ``group_for(peer_pp_rank) -> ProcessGroup | None`` (``None``: default group); the group carrying
            traffic with that peer in both directions.
        link_group_for: optional ``(src_pp, dst_pp) -> ProcessGroup | None`` overriding ``group_for`` per
            direction (needed on NCCL, see :mod:`raymoe.train.p2p_link`).
        timeout_s: bound for every wait (``recv``, ``finish_step``); :class:`P2PTimeout` beyond it.
        device: where received tensors are delivered; default: the link's wire device (CPU for gloo, the current
            CUDA device for NCCL).
        tag: the tag every link uses on its group.
    """

    def __init__(self, pp_rank: int, ranks: Mapping[int, int], group_for: Optional[GroupFor] = None, *,
                 link_group_for: Optional[LinkGroupFor] = None, timeout_s: float = 300.0,
                 device: Optional[torch.device | str] = None, tag: int = DEFAULT_TAG) -> None:
        if pp_rank not in ranks:
            raise P2PError(f"pp rank {pp_rank} is missing from the rank map {dict(ranks)}")
        self.pp_rank, self.ranks = int(pp_rank), {int(k): int(v) for k, v in ranks.items()}
        self.global_rank = self.ranks[self.pp_rank]
        self._group_for: GroupFor = group_for if group_for is not None else (lambda peer: None)
        self._link_group_for = link_group_for
        self.timeout_s, self.tag = float(timeout_s), int(tag)
        self.device = torch.device(device) if device is not None else None
        self._cv = threading.Condition()
        self._send_links: dict[int, Link] = {}
        self._recv_links: dict[int, Link] = {}
        self._await_consume: Counter[RecvKey] = Counter()  # expected, not yet returned by recv
        self._await_arrival: Counter[RecvKey] = Counter()  # expected, not yet arrived (network links only)
        self._arrived: dict[RecvKey, deque[torch.Tensor]] = defaultdict(deque)
        self._error: Optional[BaseException] = None
        self._error_where = ""
        self._closed = False
        self._stats = P2PStats()
        self._hooks = LinkHooks(self._cv, lambda: self._closed, self._admit, self._count_sent, self._deliver,
                                self._fail)

    # -- public API ----------------------------------------------------------------------------------------------
    def expect(self, recvs: Iterable[tuple[Sequence[Any], int]]) -> None:
        """Arm the receivers with what this rank will receive (call at step start, before the first op).

        Args:
            recvs: ``(channel, mb_id)`` pairs, usually :func:`expected_recvs` ``(schedule, pp_rank)``; channels
                whose source is this rank are loopback hand-offs and need no network.
        """
        self._check()
        keys = [(parse_channel(ch), int(mb)) for ch, mb in recvs]
        for ch, _ in keys:
            if ch[1] != self.pp_rank:
                raise P2PError(f"rank {self.pp_rank}: expect() got channel {ch} whose destination is not this rank")
            if ch[0] not in self.ranks:
                raise P2PError(f"rank {self.pp_rank}: channel {ch} has source {ch[0]} outside the rank map")
        new_links = []
        with self._cv:
            for key in keys:
                self._await_consume[key] += 1
                src = key[0][0]
                if src == self.pp_rank:
                    continue
                self._await_arrival[key] += 1
                link = self._recv_links.get(src)
                if link is None:
                    link = self._recv_links[src] = self._make_link(src, self.pp_rank)
                    new_links.append(link)
                link.pending += 1
            self._cv.notify_all()
        for link in new_links:
            start_receiver(link, self._hooks)

    def send(self, channel: Sequence[Any], mb_id: int, tensor: torch.Tensor) -> None:
        """Queue ``tensor`` for the channel's destination; returns without waiting for the network.

        Args:
            channel: ``(src, dst, "F"|"B", consumer stage, consumer direction)`` with ``src`` this rank.
            mb_id: global micro-batch id.
            tensor: any dtype, at most ``MAX_DIMS`` dimensions; a contiguous detached copy is sent (loopback
                channels hand over ``tensor.detach()`` itself, as the in-process queue transport does).
        """
        t0 = time.perf_counter()
        self._check()
        ch, mb_id = parse_channel(channel), int(mb_id)
        if ch[0] != self.pp_rank:
            raise P2PError(f"rank {self.pp_rank}: send on channel {ch} whose source is not this rank")
        if ch[1] not in self.ranks:
            raise P2PError(f"rank {self.pp_rank}: channel {ch} has destination {ch[1]} outside the rank map")
        if not sendable(tensor):
            raise P2PError(f"rank {self.pp_rank}: cannot send a {tensor.dim()}-d {tensor.dtype} tensor (at most "
                           f"{MAX_DIMS} dims, dtypes {[str(d) for d in DTYPES]})")
        if ch[1] == self.pp_rank:  # loopback: the V's turn under DualPipeV
            with self._cv:
                self._arrived[(ch, mb_id)].append(tensor.detach())
                self._stats.send_calls += 1
                self._stats.send_call_s += time.perf_counter() - t0
                self._cv.notify_all()
            return
        copy = tensor.detach().clone(memory_format=torch.contiguous_format)
        event = None
        if copy.is_cuda:
            event = torch.cuda.Event()
            event.record()
        link = self._send_links.get(ch[1])
        if link is None:
            link = self._send_links[ch[1]] = self._make_link(self.pp_rank, ch[1])
            start_sender(link, self._hooks)
        with self._cv:
            link.pending += 1
            self._stats.send_calls += 1
        assert link.queue is not None
        link.queue.put((ch, mb_id, copy, event))
        with self._cv:
            self._stats.send_call_s += time.perf_counter() - t0

    def recv(self, channel: Sequence[Any], mb_id: int) -> torch.Tensor:
        """The tensor sent on ``channel`` for ``mb_id``; blocks until it has arrived (at most ``timeout_s``).

        Args:
            channel: ``(src, dst, "F"|"B", consumer stage, consumer direction)`` with ``dst`` this rank; must have
                been announced with :meth:`expect`.
            mb_id: global micro-batch id.

        Returns:
            The tensor (shape and dtype as sent) on the delivery device.

        Raises:
            P2PTimeout: nothing arrived within ``timeout_s``.
            P2PError: the receive was not expected, or a transport thread failed.
        """
        self._check()
        ch, mb_id = parse_channel(channel), int(mb_id)
        key = (ch, mb_id)
        with self._cv:
            if self._await_consume[key] <= 0:
                self._await_consume.pop(key, None)
                pending = sorted((k for k, n in self._await_consume.items() if n > 0 and k[0] == ch),
                                 key=lambda k: k[1])
                raise P2PError(f"rank {self.pp_rank}: recv of micro-batch {mb_id} on channel {ch} was not announced "
                               f"with expect(); still expected on this channel: {[k[1] for k in pending]}")
            if ch[0] == self.pp_rank and not self._arrived.get(key):
                raise P2PError(f"rank {self.pp_rank}: loopback recv of micro-batch {mb_id} on channel {ch} before "
                               f"its send (a local hand-off must be sent first)")
            t0 = time.perf_counter()
            deadline = t0 + self.timeout_s
            while not self._arrived.get(key):
                if self._error is not None:
                    break
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    self._stats.recv_wait_s += time.perf_counter() - t0
                    raise P2PTimeout(self._timeout_message(ch, mb_id))
                self._cv.wait(remaining)
            self._stats.recv_wait_s += time.perf_counter() - t0
            self._stats.recv_calls += 1
            if not self._arrived.get(key):
                self._arrived.pop(key, None)
                self._raise_error()
            q = self._arrived[key]
            t = q.popleft()
            if not q:
                del self._arrived[key]
            self._await_consume[key] -= 1
            if self._await_consume[key] <= 0:
                del self._await_consume[key]
        if t.is_cuda:  # allocated on a receiver stream: keep it alive until the caller's stream is done with it
            t.record_stream(torch.cuda.current_stream(t.device))
        return t

    def poll(self, channel: Sequence[Any], mb_id: int) -> bool:
        """Whether ``recv(channel, mb_id)`` would return without waiting."""
        self._check()
        with self._cv:
            return bool(self._arrived.get((parse_channel(channel), int(mb_id))))

    def finish_step(self, timeout_s: Optional[float] = None) -> P2PStats:
        """Wait until every queued send has completed and check that nothing expected or received is left over.

        Call once per step after the runner's last op and before the next :meth:`expect`.

        Args:
            timeout_s: bound for the wait (default: the transport's ``timeout_s``).

        Returns:
            A snapshot of :meth:`stats`.

        Raises:
            P2PTimeout: sends still outstanding after the bound (names the peers and what is in flight).
            P2PError: a thread failed, or receives were expected but not made, or messages arrived unconsumed.
        """
        self._check()
        t0 = time.perf_counter()
        deadline = t0 + (self.timeout_s if timeout_s is None else float(timeout_s))
        with self._cv:
            while self._error is None and any(link.pending for link in self._send_links.values()):
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    busy = "; ".join(
                        f"{link.pending} message(s) to peer rank {link.dst} (global {link.peer_global}), in flight: "
                        + (f"channel {link.busy[0]} micro-batch {link.busy[1]}" if link.busy else "none")
                        for link in self._send_links.values() if link.pending)
                    raise P2PTimeout(f"rank {self.pp_rank} (global {self.global_rank}): finish_step timed out after "
                                     f"{deadline - t0:.1f}s with sends outstanding: {busy}")
                self._cv.wait(remaining)
            self._stats.finish_wait_s += time.perf_counter() - t0
            if self._error is not None:
                self._raise_error()
            problems = []
            if self._await_consume:
                problems.append("expected but never received: " + ", ".join(
                    f"{ch} micro-batch {mb}" + (f" (x{n})" if n > 1 else "")
                    for (ch, mb), n in sorted(self._await_consume.items())))
            if self._arrived:
                problems.append("received but never consumed: " + ", ".join(
                    f"{ch} micro-batch {mb}" for (ch, mb) in sorted(self._arrived)))
            if problems:
                raise P2PError(f"rank {self.pp_rank}: step ended with " + "; ".join(problems))
            return dataclasses.replace(self._stats)

    def stats(self) -> P2PStats:
        """A snapshot of the counters (see :class:`P2PStats`)."""
        with self._cv:
            return dataclasses.replace(self._stats)

    def reset_stats(self) -> None:
        """Zero the counters."""
        with self._cv:
            self._stats = P2PStats()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the threads (idempotent). Queued sends are dropped; call :meth:`finish_step` first to deliver them.

        A receiver blocked in a posted receive that is never matched cannot be cancelled; it stays behind as a
        daemon thread until the process group or the process goes away.

        Args:
            timeout_s: how long to wait for each thread to exit.
        """
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.notify_all()
        for link in self._send_links.values():
            if link.queue is not None:
                link.queue.put(None)
        deadline = time.perf_counter() + timeout_s
        for link in [*self._send_links.values(), *self._recv_links.values()]:
            if link.thread is not None:
                link.thread.join(max(0.0, deadline - time.perf_counter()))

    def __enter__(self) -> "P2PTransport":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------------------------------
    def _make_link(self, src: int, dst: int) -> Link:
        peer = dst if src == self.pp_rank else src
        if peer not in self.ranks:
            raise P2PError(f"rank {self.pp_rank}: peer pp rank {peer} is not in the rank map {self.ranks}")
        group = self._link_group_for(src, dst) if self._link_group_for is not None else self._group_for(peer)
        return open_link(src, dst, self.ranks[peer], group, self.tag, self.device)

    def _check(self) -> None:
        if self._error is not None:
            with self._cv:
                self._raise_error()
        if self._closed:
            raise P2PError(f"rank {self.pp_rank}: transport is closed")

    def _raise_error(self) -> None:
        err = self._error
        raise P2PError(f"rank {self.pp_rank} (global {self.global_rank}): P2P thread failed while "
                       f"{self._error_where}: {type(err).__name__}: {err}") from err

    def _fail(self, err: BaseException, where: str) -> None:
        with self._cv:
            if self._error is None:
                self._error, self._error_where = err, where
            self._cv.notify_all()

    def _timeout_message(self, ch: Channel, mb_id: int) -> str:
        src = ch[0]
        link = self._recv_links.get(src)
        got = f"{link.done} message(s) received on link {src}->{self.pp_rank}, {link.pending} still expected" \
            if link is not None else "no receiver armed for that peer"
        return (f"rank {self.pp_rank} (global {self.global_rank}) timed out after {self.timeout_s:g}s waiting for "
                f"micro-batch {mb_id} on channel {ch} from peer rank {src} (global {self.ranks.get(src)}); {got}")

    # -- link hooks (called by the link threads with self._cv held) ---------------------------------------------
    def _admit(self, key: RecvKey) -> None:
        if self._await_arrival[key] <= 0:
            self._await_arrival.pop(key, None)
            raise P2PError(f"unexpected message: micro-batch {key[1]} on channel {key[0]} was not announced with "
                           f"expect() (or arrived twice)")
        self._await_arrival[key] -= 1
        if self._await_arrival[key] <= 0:
            del self._await_arrival[key]

    def _count_sent(self, nbytes: int, seconds: float) -> None:
        self._stats.msgs_sent += 1
        self._stats.bytes_sent += nbytes
        self._stats.send_thread_s += seconds

    def _deliver(self, key: RecvKey, tensor: torch.Tensor, nbytes: int) -> None:
        self._arrived[key].append(tensor)
        self._stats.msgs_received += 1
        self._stats.bytes_received += nbytes
