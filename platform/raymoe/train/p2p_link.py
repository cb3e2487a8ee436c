"""The links of :mod:`raymoe.train.p2p`: one direction between two pp ranks, its thread, one message on the wire.

*Links and threads.* Between two pp ranks there are two **links**, one per direction. Each link carries one
ordered stream of messages (all channels from that source to that destination, in the sender's ``send`` order) and
has exactly one thread at each end: a **sender thread** on the source and a **receiver thread** on the destination.
The sender thread takes the transport's detached copies off the link's queue, sends header and payload
(:func:`send_one`) and then waits for completion. The receiver thread runs while the transport expects messages on
its link (``Link.pending > 0``) and keeps a receive posted, so data is prefetched while the caller computes
(:func:`recv_one`: read the header, allocate, receive the payload, check the message, deliver it). The header
codec lives in :mod:`raymoe.train.p2p_wire`; what is expected, arrived and consumed is the transport's bookkeeping,
reached through :class:`LinkHooks`. A thread that fails reports through ``LinkHooks.fail`` and exits.

*NCCL notes.* The same code path runs on NCCL: the wire device of a link is ``cuda:<current device>`` when the
group's backend includes NCCL, else CPU (gloo); the header is an int64 tensor on the wire device. Each thread sets
the CUDA device and runs its ops on its own CUDA stream; the sender's stream waits on the event recorded after the
caller's copy, and both threads synchronise their stream before reporting completion/arrival, so a delivered
tensor is ready and ``recv`` records it on the caller's current stream for the caching allocator. (CUDA tensors
sent over gloo are staged through CPU by the sender thread after the copy's event; pass ``device=`` to the
transport to have received tensors moved back to the GPU.) Two rules for the topology object: (1) give each
**direction** of a pair its own communicator (the transport's ``link_group_for``): ProcessGroupNCCL issues all P2P
ops of one pair of a group on one internal stream, so when both sides send before they receive (DualPipe's
simultaneous exchange) a message bigger than NCCL's internal buffer waits behind the other side's send forever;
gloo does not have this problem (full-duplex sockets, ops not serialised), so one group per pair is fine there.
(2) Concurrent kernels of several NCCL communicators (links of two neighbours, the expert all-to-all) rely on the
GPU running them side by side; keep ``NCCL_LAUNCH_MODE`` at its default (``PARALLEL``) and give the communicators
enough channels/SMs. A receive that is posted but never matched cannot be cancelled (torch exposes no abort for P2P
work): the transport's ``close`` leaves such a (daemon) thread behind, and only destroying the process group or
the process ends it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
import time
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

from raymoe.train.p2p_wire import HEADER_LEN, Channel, P2PError, RecvKey, decode_header, encode_header

__all__ = ["Link", "LinkHooks", "open_link", "start_sender", "start_receiver", "send_one", "recv_one"]


@dataclasses.dataclass
class Link:
    """One direction between this rank and a peer: src -> dst (pp ranks).

    The counters (``seq`` aside, which only the link's thread touches) are guarded by the owner's ``LinkHooks.cv``.
    """

    src: int
    dst: int
    peer_global: int
    group: Optional[dist.ProcessGroup]
    wire: torch.device
    tag: int  # the one tag of this link's messages on its group
    deliver_to: Optional[torch.device] = None  # receiver links: where received tensors go (None: the wire device)
    thread: Optional[threading.Thread] = None
    queue: Optional["queue.Queue[Optional[tuple]]"] = None  # sender links only
    seq: int = 0  # next sequence number (sent or expected)
    pending: int = 0  # sender: enqueued, not yet completed; receiver: still expected to arrive
    done: int = 0  # messages completed on this link
    busy: Optional[RecvKey] = None  # what the thread is working on right now
    stream: Any = None  # the thread's CUDA stream (NCCL links), created by the thread itself


@dataclasses.dataclass(frozen=True)
class LinkHooks:
    """How a link's thread reports to the transport that owns it.

    Attributes:
        cv: the owner's condition variable; guards the link counters and the owner's state, and is notified after
            every completed message.
        closed: whether the owner is closed (the thread then exits).
        admit: ``admit(key)`` counts an arrived message as expected (``cv`` held); raises :class:`P2PError` when
            it was not announced.
        sent: ``sent(nbytes, seconds)`` after a message went out (``cv`` held).
        received: ``received(key, tensor, nbytes)`` files an arrived message (``cv`` held).
        fail: ``fail(error, where)`` when the thread fails (``cv`` not held); the thread then exits.
    """

    cv: threading.Condition
    closed: Callable[[], bool]
    admit: Callable[[RecvKey], None]
    sent: Callable[[int, float], None]
    received: Callable[[RecvKey, torch.Tensor, int], None]
    fail: Callable[[BaseException, str], None]


def open_link(src: int, dst: int, peer_global: int, group: Optional[dist.ProcessGroup], tag: int,
              deliver_to: Optional[torch.device] = None) -> Link:
    """A link ``src -> dst`` to global rank ``peer_global`` on ``group``; its wire device follows the backend.

    Call from the main thread: an NCCL link's wire device is the process's current CUDA device.
    """
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend:
        wire = torch.device("cuda", torch.cuda.current_device())  # main thread: the process's device
    else:
        wire = torch.device("cpu")
    return Link(src, dst, peer_global, group, wire, tag, deliver_to)


def start_sender(link: Link, hooks: LinkHooks) -> None:
    """Give ``link`` its queue of ``(channel, mb_id, tensor, event | None)`` items and start its sender thread.

    Put ``None`` on the queue to stop the thread.
    """
    link.queue = queue.Queue()
    link.thread = threading.Thread(target=_send_loop, args=(link, hooks), daemon=True,
                                   name=f"p2p-send-{link.src}->{link.dst}")
    link.thread.start()


def start_receiver(link: Link, hooks: LinkHooks) -> None:
    """Start the receiver thread of ``link``: it receives while ``link.pending > 0`` and the owner is open."""
    link.thread = threading.Thread(target=_recv_loop, args=(link, hooks), daemon=True,
                                   name=f"p2p-recv-{link.src}->{link.dst}")
    link.thread.start()


@contextlib.contextmanager
def _on_wire(link: Link) -> Iterator[None]:
    """Run the thread's ops on its own CUDA stream (NCCL); nothing to do for CPU links."""
    if link.wire.type != "cuda":
        yield
        return
    if link.stream is None:
        torch.cuda.set_device(link.wire)
        link.stream = torch.cuda.Stream(device=link.wire)
    with torch.cuda.stream(link.stream):
        yield


def _send_loop(link: Link, hooks: LinkHooks) -> None:
    assert link.queue is not None
    while True:
        item = link.queue.get()
        if item is None or hooks.closed():
            return
        ch, mb_id, tensor, event = item
        with hooks.cv:
            link.busy = (ch, mb_id)
        try:
            t0 = time.perf_counter()
            nbytes = send_one(link, ch, mb_id, tensor, event)
        except BaseException as e:  # noqa: BLE001 - surfaced to the caller
            hooks.fail(e, f"sending micro-batch {mb_id} on channel {ch} to peer rank {link.dst} "
                          f"(global {link.peer_global})")
            return
        with hooks.cv:
            link.pending -= 1
            link.done += 1
            link.busy = None
            hooks.sent(nbytes, time.perf_counter() - t0)
            hooks.cv.notify_all()


def send_one(link: Link, ch: Channel, mb_id: int, tensor: torch.Tensor, event: Optional[torch.cuda.Event]) -> int:
    """Send one message (header, then payload as bytes) on ``link`` and wait for it to complete; link thread only.

    Args:
        link: the sender link; its sequence number advances by one.
        ch: the message's channel.
        mb_id: global micro-batch id.
        tensor: contiguous payload (any device: staged to the wire device here).
        event: CUDA event recorded after the caller made ``tensor``, waited on before sending; ``None`` for CPU.

    Returns:
        The payload bytes sent.
    """
    with _on_wire(link):
        if event is not None:  # the caller's copy was queued on its stream: wait for it
            if link.wire.type == "cuda":
                torch.cuda.current_stream().wait_event(event)
            else:
                event.synchronize()
        if tensor.device != link.wire:
            tensor = tensor.to(link.wire)
        header = torch.tensor(encode_header(link.seq, ch, mb_id, tensor), dtype=torch.int64, device=link.wire)
        dist.send(header, dst=link.peer_global, group=link.group, tag=link.tag)
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes:
            dist.send(tensor.reshape(-1).view(torch.uint8), dst=link.peer_global, group=link.group, tag=link.tag)
        if link.wire.type == "cuda":
            torch.cuda.current_stream().synchronize()
    link.seq += 1
    return nbytes


def _recv_loop(link: Link, hooks: LinkHooks) -> None:
    while True:
        with hooks.cv:
            while link.pending <= 0 and not hooks.closed():
                hooks.cv.wait()
            if hooks.closed():
                return
        try:
            key, tensor, nbytes = recv_one(link, hooks)
        except BaseException as e:  # noqa: BLE001 - surfaced to the caller
            hooks.fail(e, f"receiving message #{link.seq} from peer rank {link.src} (global {link.peer_global})")
            return
        with hooks.cv:
            hooks.received(key, tensor, nbytes)
            link.pending -= 1
            link.done += 1
            hooks.cv.notify_all()


def recv_one(link: Link, hooks: LinkHooks) -> tuple[RecvKey, torch.Tensor, int]:
    """Receive the next message of ``link`` and check it; link thread only.

    The payload is received before the message is judged, so that the sender is never left hanging; then the
    message must belong to this link and be admitted by ``hooks.admit``.

    Returns:
        ``((channel, mb_id), tensor, payload bytes)``; the tensor has the sent shape and dtype, on
        ``link.deliver_to`` (default the wire device).

    Raises:
        P2PError: a bad or out-of-sequence header, a message of another link, or one not admitted.
    """
    with _on_wire(link):
        header = torch.empty(HEADER_LEN, dtype=torch.int64, device=link.wire)
        dist.recv(header, src=link.peer_global, group=link.group, tag=link.tag)
        key, dtype, shape, nbytes = decode_header(header.tolist(), link.seq)
        ch = key[0]
        link.busy = key
        buf = torch.empty(nbytes, dtype=torch.uint8, device=link.wire)
        if nbytes:  # receive the payload before judging the message, so that the sender is never left hanging
            dist.recv(buf, src=link.peer_global, group=link.group, tag=link.tag)
        if link.wire.type == "cuda":
            torch.cuda.current_stream().synchronize()
        if ch[0] != link.src or ch[1] != link.dst:
            raise P2PError(f"message for channel {ch} arrived on link {link.src}->{link.dst}")
        with hooks.cv:
            hooks.admit(key)
        tensor = buf.view(dtype).reshape(shape) if nbytes else torch.empty(shape, dtype=dtype, device=link.wire)
        if link.deliver_to is not None and tensor.device != link.deliver_to:
            tensor = tensor.to(link.deliver_to)
    link.seq += 1
    link.busy = None
    return key, tensor, nbytes
