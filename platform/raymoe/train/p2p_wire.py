"""The wire format of :mod:`raymoe.train.p2p`: channels, message headers, the dtypes that travel, its errors.

A **channel** is ``(src pp rank, dst pp rank, kind "F"|"B", consumer stage, consumer direction)``, as
:class:`~raymoe.schedule.executor.StageRunner` builds it; a received message is filed under ``(channel, mb_id)``.

*Headers.* Every message is a fixed-size int64 header (``HEADER_LEN`` values) followed by the payload as raw bytes
(``uint8``, so any dtype travels, fp8 and bool included). The header holds a magic number, the link's sequence
number, the full channel, the micro-batch id, a dtype code, the number of dimensions and the shape (at most
``MAX_DIMS``)::

    [MAGIC, seq, src, dst, kind (F=0, B=1), stage, direction, mb_id, dtype code, ndim, *shape, 0-padding]

The receiver needs no shape knowledge: it reads the header, allocates, receives the payload, checks that the
message is the next in the link's sequence and was expected, and files it under ``(channel, micro-batch)``.

*Ordering and channels.* Messages of different channels between the same pair never mix because each message
names its channel and micro-batch, and the link stream is strictly ordered (sequence numbers are checked). Within
a channel, order is the send order (a FIFO link); on the receiving side messages are looked up by
``(channel, micro-batch)``, so the consumer may take them in any order. Per-channel *tags* are deliberately not
used: NCCL ignores tags, and labelled messages on one ordered stream per link work the same on every backend. The
link uses one fixed tag (``DEFAULT_TAG`` unless the transport is given another).

Pure functions of ints and dtypes: nothing here touches ``torch.distributed``; the link threads of
:mod:`raymoe.train.p2p_link` encode, send, receive and decode.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

__all__ = ["Channel", "RecvKey", "HEADER_LEN", "MAX_DIMS", "DEFAULT_TAG", "DTYPES", "P2PError", "P2PTimeout",
           "parse_channel", "encode_header", "decode_header", "sendable"]

Channel = tuple[int, int, str, int, int]  # (src pp rank, dst pp rank, "F"|"B", consumer stage, consumer direction)
RecvKey = tuple[Channel, int]  # (channel, global micro-batch id)

MAX_DIMS = 8
HEADER_LEN = 10 + MAX_DIMS
_MAGIC = 0x52594D4F45503250  # "RYMOEP2P"
_KIND_CODE = {"F": 0, "B": 1}
_KIND_NAME = {v: k for k, v in _KIND_CODE.items()}
DTYPES: list[torch.dtype] = [
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool, torch.complex64, torch.complex128,
] + [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
     if hasattr(torch, n)]
_DTYPE_CODE = {d: i for i, d in enumerate(DTYPES)}
DEFAULT_TAG = 0x5032  # one fixed tag per link; gloo matches by (peer, tag), NCCL ignores it


class P2PError(RuntimeError):
    """The transport is misused or broke (a thread failed, a message was unexpected); the message says which."""


class P2PTimeout(P2PError):
    """A wait exceeded ``timeout_s``; the message names this rank, the peer, the channel and the micro-batch."""


def parse_channel(ch: Sequence[Any]) -> Channel:
    """``ch`` as a :data:`Channel` of ints and a kind; :class:`P2PError` when it is not one."""
    try:
        src, dst, kind, stage, direction = ch
        c = (int(src), int(dst), str(kind), int(stage), int(direction))
    except (TypeError, ValueError):
        raise P2PError(f"a channel is (src, dst, 'F'|'B', stage, direction), got {ch!r}") from None
    if c[2] not in _KIND_CODE:
        raise P2PError(f"channel kind must be 'F' or 'B', got {ch!r}")
    return c


def sendable(tensor: torch.Tensor) -> bool:
    """Whether the header can describe ``tensor`` (at most ``MAX_DIMS`` dims, a dtype in :data:`DTYPES`)."""
    return tensor.dim() <= MAX_DIMS and tensor.dtype in _DTYPE_CODE


def encode_header(seq: int, ch: Channel, mb_id: int, tensor: torch.Tensor) -> list[int]:
    """The ``HEADER_LEN`` header values of message ``seq`` of a link carrying ``tensor`` on ``ch`` for ``mb_id``."""
    hdr = [_MAGIC, seq, ch[0], ch[1], _KIND_CODE[ch[2]], ch[3], ch[4], mb_id,
           _DTYPE_CODE[tensor.dtype], tensor.dim(), *tensor.shape]
    hdr += [0] * (HEADER_LEN - len(hdr))
    return hdr


def decode_header(h: list[int], seq: int) -> tuple[RecvKey, torch.dtype, list[int], int]:
    """Check a received header (magic, sequence number ``seq``, codes) and read it.

    Returns:
        ``((channel, mb_id), dtype, shape, payload bytes)``.

    Raises:
        P2PError: a bad magic number (another user of the group/tag), a message out of sequence, an unknown code.
    """
    if h[0] != _MAGIC:
        raise P2PError(f"bad header {h} (magic mismatch: another user of this group/tag?)")
    if h[1] != seq:
        raise P2PError(f"message out of sequence: got #{h[1]}, expected #{seq}")
    if h[4] not in _KIND_NAME or not 0 <= h[8] < len(DTYPES) or not 0 <= h[9] <= MAX_DIMS:
        raise P2PError(f"bad header {h}")
    ch: Channel = (h[2], h[3], _KIND_NAME[h[4]], h[5], h[6])
    dtype, shape = DTYPES[h[8]], h[10:10 + h[9]]
    numel = 1
    for n in shape:
        numel *= n
    return (ch, h[7]), dtype, shape, numel * torch.empty((), dtype=dtype).element_size()
