"""Hiding the expert all-to-all behind another chunk's compute: cooperative lanes, asynchronous exchanges, a meter.

Why lanes. An EP MoE layer waits three times per forward (counts, dispatch, combine) and twice per backward (the
reversed exchanges), and its autograd graph cannot be cut at those points from outside. DualPipe's F&B pair (a
forward of one micro-batch and a backward of another on one rank) has two independent computations, so one can
compute while the other's exchange is in flight. :func:`run_lanes` runs the two as **lanes**: each in its own
Python thread, but only the holder of a **baton** computes. A lane that reaches an all-to-all issues it
asynchronously (gloo ``async_op=True``: gloo's own worker thread moves the bytes), hands the baton over, waits for
the exchange (the wait releases the GIL), and takes the baton back when the other lane gives it up (at its own
exchange or at its end). Forward and backward keep their plain autograd code: the backward's exchanges are the
custom ``_AllToAllUneven.backward`` calling :func:`all_to_all_single` like the forward does.

Why a baton and not free-running threads: on CPU two computing threads would split the same cores (every op gets
slower, nothing is hidden); one computing lane at a time gives real overlap (compute of one lane against the
*communication* of the other) and a deterministic interleaving at exchange points. It also makes "exposed" exact:
the time during which some lane waits for an all-to-all and **no** lane holds the baton.

Collective order. Every rank of an ep group runs the same op list, so each lane issues the same sequence of
exchanges on every ep rank; but the two lanes interleave differently per rank. So each lane has its **own ep
process group** (same members): lane ``i`` uses ``groups[i]`` of :class:`ExpertParallelExperts.lane_groups`.
A forward picks its lane from the calling thread; an exchange inside a backward picks the lane that runs the
backward (set by :func:`backward_lane` around the ``backward`` call: on CUDA autograd runs backward nodes on a
device thread where the caller's thread-locals are invisible).

Blocking on pipeline data. A lane waiting for a P2P receive must not hold the baton (the other lane's result may be
what a neighbour needs before it can send): the executor wraps receives in :func:`blocking`.

NCCL (written for CUDA, not exercised on this CPU-only host): ``all_to_all_single(async_op=True)`` runs on NCCL's
own stream after the current stream's work; ``wait()`` only makes the current stream wait. Each lane computes on
its own CUDA stream (:func:`run_lanes` creates them and joins them into the caller's stream), so the other lane's
kernels run while the exchange is on the wire; a host-side read of the counts synchronises the lane's stream
inside the hand-over window. Timings on CUDA are host-side only.

Meter. :data:`METER` counts, per process, every exchange issued through :func:`all_to_all_single`: number, bytes
(sent + received), ``total_s`` (issue to completion: the work's future callback, else the end of the wait) and
``exposed_s`` (outside lanes the whole synchronous call; inside lanes the baton-free waiting time).
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["A2AStats", "METER", "Lanes", "run_lanes", "blocking", "backward_lane", "current_lane",
           "all_to_all_single", "lane_group"]


@dataclasses.dataclass
class A2AStats:
    """Totals over the exchanges issued through :func:`all_to_all_single` (see the module docstring)."""

    count: int = 0
    bytes: int = 0
    total_s: float = 0.0
    exposed_s: float = 0.0

    def minus(self, other: "A2AStats") -> "A2AStats":
        return A2AStats(self.count - other.count, self.bytes - other.bytes, self.total_s - other.total_s,
                        self.exposed_s - other.exposed_s)


class _Meter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._s = A2AStats()

    def add(self, count: int = 0, nbytes: int = 0, total_s: float = 0.0, exposed_s: float = 0.0) -> None:
        with self._lock:
            self._s.count += count
            self._s.bytes += nbytes
            self._s.total_s += total_s
            self._s.exposed_s += exposed_s

    def snapshot(self) -> A2AStats:
        with self._lock:
            return dataclasses.replace(self._s)


METER = _Meter()

_tls = threading.local()  # .lanes: the Lanes this thread runs in (None outside), .lane: its index
_backward: list[tuple[Optional["Lanes"], int]] = []  # (lanes, lane) of the backward running now (innermost last)


class Lanes:
    """The baton of a set of lanes plus the exposure clock (see the module docstring)."""

    def __init__(self, n: int) -> None:
        self._cv = threading.Condition()
        self._holder: Optional[int] = None
        self._comm_waiting = 0
        self._last = time.perf_counter()
        self._since = [0.0] * n
        self.held_s = [0.0] * n  # per lane: time it held the baton (its compute)

    def _tick(self) -> None:  # under self._cv
        now = time.perf_counter()
        if self._holder is None and self._comm_waiting:
            METER.add(exposed_s=now - self._last)
        self._last = now

    def acquire(self, lane: int) -> None:
        with self._cv:
            while self._holder is not None:
                self._cv.wait()
            self._tick()
            self._holder = lane
            self._since[lane] = self._last

    def release(self, lane: int, comm: bool = False) -> None:
        with self._cv:
            if self._holder != lane:
                raise RuntimeError(f"lane {lane} releases a baton held by {self._holder}")
            self._tick()
            self.held_s[lane] += self._last - self._since[lane]
            self._holder = None
            if comm:
                self._comm_waiting += 1
            self._cv.notify_all()

    def comm_done(self, lane: int) -> None:
        with self._cv:
            self._tick()
            self._comm_waiting -= 1
        self.acquire(lane)


def _here() -> tuple[Optional[Lanes], int]:
    """(lanes, lane) that an exchange issued now belongs to."""
    if _backward and torch._C._current_graph_task_id() != -1:
        return _backward[-1]
    return getattr(_tls, "lanes", None), getattr(_tls, "lane", 0)


def current_lane() -> int:
    """Index of the lane whose work runs now (0 outside lanes): which of ``lane_groups`` an exchange uses."""
    return _here()[1]


def lane_group(group: Any) -> Any:
    """The process group an exchange uses now: ``group`` itself, or, for a tuple of per-lane groups (same members),
    the current lane's (lane 0's outside lanes)."""
    if isinstance(group, (tuple, list)):
        return group[current_lane() % len(group)]
    return group


@contextlib.contextmanager
def blocking() -> Iterator[None]:
    """Around a wait that is not an all-to-all (a P2P receive): give the baton up meanwhile (no-op outside lanes)."""
    lanes, lane = getattr(_tls, "lanes", None), getattr(_tls, "lane", 0)
    if lanes is None:
        yield
        return
    lanes.release(lane)
    try:
        yield
    finally:
        lanes.acquire(lane)


@contextlib.contextmanager
def backward_lane() -> Iterator[None]:
    """Around ``backward`` of a lane: its exchanges use this lane's group and baton even on autograd's threads."""
    _backward.append((getattr(_tls, "lanes", None), getattr(_tls, "lane", 0)))
    try:
        yield
    finally:
        _backward.pop()


def all_to_all_single(out: torch.Tensor, inp: torch.Tensor, out_splits: Optional[list[int]],
                      in_splits: Optional[list[int]], group: Any, host_read: bool = False) -> torch.Tensor:
    """``dist.all_to_all_single(out, inp, out_splits, in_splits, group)``, measured; inside lanes issued
    asynchronously with the baton handed over until it completes. ``host_read``: the caller reads ``out`` on the
    host next (CUDA: the stream is synchronised inside the hand-over window)."""
    nbytes = inp.numel() * inp.element_size() + out.numel() * out.element_size()
    lanes, lane = _here()
    t0 = time.perf_counter()
    if lanes is None:
        dist.all_to_all_single(out, inp, output_split_sizes=out_splits, input_split_sizes=in_splits, group=group)
        if host_read and out.is_cuda:
            torch.cuda.current_stream(out.device).synchronize()
        dt = time.perf_counter() - t0
        METER.add(1, nbytes, dt, dt)
        return out
    work = dist.all_to_all_single(out, inp, output_split_sizes=out_splits, input_split_sizes=in_splits,
                                  group=group, async_op=True)
    done: list[float] = []
    try:
        work.get_future().add_done_callback(lambda _f: done.append(time.perf_counter()))
    except (RuntimeError, AttributeError):  # a backend without futures: the end of the wait bounds it
        pass
    lanes.release(lane, comm=True)
    try:
        work.wait()  # gloo: blocks this thread (GIL released); NCCL: makes the current (lane) stream wait
        if host_read and out.is_cuda:
            torch.cuda.current_stream(out.device).synchronize()
    finally:
        t_end = time.perf_counter()
        lanes.comm_done(lane)
    METER.add(1, nbytes, (done[0] if done else t_end) - t0)
    return out


def run_lanes(fns: Sequence[Callable[[], Any]],
              context: Optional[Callable[[], Any]] = None) -> tuple[list[Any], list[float]]:
    """Run ``fns`` as cooperative lanes (lane 0 in the calling thread, first to hold the baton); return their
    results and each lane's compute time (baton held). ``context()`` (optional) is entered in every lane's thread
    (thread-local state such as saved-tensor hooks). An exception of a lane is re-raised after all lanes ended."""
    n = len(fns)
    lanes = Lanes(n)
    results: list[Any] = [None] * n
    errors: list[Optional[BaseException]] = [None] * n
    width = torch.get_num_threads()  # a new thread starts with the default intra-op width: keep the caller's
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    caller_stream = torch.cuda.current_stream() if cuda else None
    streams = [torch.cuda.Stream() for _ in range(n)] if cuda else [None] * n
    if cuda:
        for s in streams:
            s.wait_stream(caller_stream)  # type: ignore[union-attr]

    def body(i: int, held: bool) -> None:
        prev = getattr(_tls, "lanes", None), getattr(_tls, "lane", 0)
        _tls.lanes, _tls.lane = lanes, i
        try:
            if torch.get_num_threads() != width:
                torch.set_num_threads(width)
            if not held:
                lanes.acquire(i)
            try:
                with contextlib.ExitStack() as stack:
                    if context is not None:
                        stack.enter_context(context())
                    if streams[i] is not None:
                        stack.enter_context(torch.cuda.stream(streams[i]))
                    results[i] = fns[i]()
            finally:
                lanes.release(i)
        except BaseException as e:  # noqa: BLE001 - re-raised by the caller below
            errors[i] = e
        finally:
            _tls.lanes, _tls.lane = prev

    lanes.acquire(0)
    threads = [threading.Thread(target=body, args=(i, False), name=f"a2a-lane-{i}", daemon=True)
               for i in range(1, n)]
    for t in threads:
        t.start()
    body(0, True)
    for t in threads:
        t.join()
    if cuda:
        for s in streams:
            caller_stream.wait_stream(s)  # type: ignore[union-attr]
    for e in errors:
        if e is not None:
            raise e
    return results, list(lanes.held_s)
