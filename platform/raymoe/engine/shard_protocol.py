"""The expert-shard wire protocol: its format, and what a :class:`raymoe.engine.shard_server.ShardServer` checks
before it serves a connection or allocates anything for a message (torch only; the one helper that touches the network
builds a gloo pair, :func:`pair_group`).

Three gates, in order (the transport itself is in :mod:`raymoe.engine.remote`):

1. **Admission.** An engine asks for a connection by pushing its id (taken from the store counter ``"next"``) onto
   the store queue ``"req"``. The shard pops at most ``max_pending`` requests that are still handshaking and admits at
   most ``max_connections`` in all; an id that is not a decimal integer in ``[1, next]`` or was seen before is dropped.
   Nothing scans ids, so ``store.add("next", 10**12)`` costs the shard nothing.
2. **Handshake** (over the connection's own gloo pair, so the proof is bound to the channel that will carry the
   data — a proof written to store keys would not be: anyone who can reach the store can overwrite a pair's
   rendezvous address). With the app's secret ``k`` and the connection id ``c`` (8 bytes, big-endian)::

       shard  → engine   nonce_s (32 random bytes)
       engine → shard    nonce_e (32 random bytes) ‖ HMAC-SHA256(k, "raymoe-expert-engine" ‖ c ‖ nonce_s)
       shard  → engine   status (1 accepted, 0 refused) ‖ HMAC-SHA256(k, "raymoe-expert-shard" ‖ c ‖ nonce_s ‖ nonce_e)

   The shard compares with :func:`hmac.compare_digest` and refuses a wrong or missing proof, or none within its
   handshake timeout; the engine checks the shard's proof the same way (a listener without the secret, e.g. one that
   hijacked the rendezvous, is not a shard). Without a secret on either side the proofs are 32 zero bytes: a shard
   without a secret accepts anyone (loopback tests), an engine with one refuses such a shard.
3. **Headers.** Every message starts with an ``int64[8]`` header; :func:`check_header` and the ``check_*`` functions
   below validate every field against :class:`ShardLimits` and the connection's state *before* the shard receives
   or allocates the payload the header announces. A bad field raises :class:`ProtocolError` naming it; the shard
   closes that connection only.

Header layouts (unused trailing fields must be 0)::

    HELLO  [1, D, I, dtype, E]   row width D, expert inner width I, dtype index (DTYPES), logical experts E
    LOAD   [2, layer, S, m]      ids int64[S] in [0, E), moved int64[m] distinct in [0, S), then 3 weight tensors
    RUN    [3, layer, N, S]      counts int64[S] >= 0 summing to N, then x [N, D]
    CLOSE  [4]
    FETCH  [5, layer, S, m, kind, index]   ids int64[S], moved int64[m] as LOAD, no weights: the shard reads the
                                 moved slots' expert rows from its checkpoint (checkpoint layer ``index`` for kind 0,
                                 MTP depth ``index`` for kind 1); refused by a shard without a checkpoint
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import Any, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["OP_HELLO", "OP_LOAD", "OP_RUN", "OP_CLOSE", "OP_FETCH", "OP_NAMES", "DTYPES", "HEADER_LEN", "REQUEST_QUEUE",
           "TAG_TO_SHARD", "TAG_TO_ENGINE", "NONCE_BYTES", "MAC_BYTES", "ShardLimits", "ProtocolError", "Hello",
           "make_header", "bytes_tensor", "pair_group", "rendezvous_keys", "default_local_host", "check_header",
           "check_hello", "check_load", "check_fetch", "fetch_layer_key", "check_load_ids", "check_run",
           "check_counts", "check_host", "check_secret",
           "engine_proof", "shard_proof", "parse_request"]

OP_HELLO, OP_LOAD, OP_RUN, OP_CLOSE, OP_FETCH = 1, 2, 3, 4, 5
OP_NAMES = {OP_HELLO: "HELLO", OP_LOAD: "LOAD", OP_RUN: "RUN", OP_CLOSE: "CLOSE", OP_FETCH: "FETCH"}
_FIELDS = {OP_HELLO: ("D", "I", "dtype", "E"), OP_LOAD: ("layer", "S", "m"), OP_RUN: ("layer", "N", "S"),
           OP_CLOSE: (), OP_FETCH: ("layer", "S", "m", "kind", "index")}
FETCH_KINDS = ("layers", "mtp")  # FETCH's kind field: index into this, the layer key's prefix
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
HEADER_LEN = 8
REQUEST_QUEUE = "req"
TAG_TO_SHARD, TAG_TO_ENGINE = 0, 1  # gloo tags: engine → shard messages, shard → engine replies
NONCE_BYTES = MAC_BYTES = 32
_ENGINE_TAG, _SHARD_TAG = b"raymoe-expert-engine", b"raymoe-expert-shard"


@dataclass(frozen=True)
class ShardLimits:
    """What one shard accepts. Sizes bound what a single header can make the shard allocate; the defaults hold
    DeepSeek-V3 (D 7168, I 2048, 256 experts, 61 layers) with room to spare.

    Args:
        max_layers: layer indices per connection are in ``[0, max_layers)``.
        max_dim / max_inter / max_experts: bounds of HELLO's D, I and E.
        max_slots: slots per layer (S) of a LOAD or RUN.
        max_rows: rows (N) of one RUN.
        max_message_bytes: the payload one LOAD (3 weight tensors of m slots) or RUN (x of N rows) may announce.
        max_connection_bytes: slot weights one connection may hold over all its layers.
        max_connections: live plus handshaking connections; more are refused with a clear error.
        max_pending: connections handshaking at once; further requests wait in the store queue.
    """

    max_layers: int = 4096
    max_dim: int = 1 << 16
    max_inter: int = 1 << 16
    max_experts: int = 1 << 16
    max_slots: int = 4096
    max_rows: int = 1 << 20
    max_message_bytes: int = 16 << 30
    max_connection_bytes: int = 1 << 40
    max_connections: int = 64
    max_pending: int = 8

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"ShardLimits.{f.name} must be a positive int, got {v!r}")


class ProtocolError(ValueError):
    """A message broke the protocol; ``field`` names the header field (or payload) that was wrong."""

    def __init__(self, op: str, field: str, message: str) -> None:
        super().__init__(f"{op} field {field}: {message}")
        self.op, self.field = op, field


class Hello(NamedTuple):
    D: int
    I: int  # noqa: E741 - the paper's name for the expert inner width
    dtype: torch.dtype
    E: int


def make_header(*vals: int) -> torch.Tensor:
    """``int64[8]`` with ``vals`` first and zeros after."""
    if len(vals) > HEADER_LEN:
        raise ValueError(f"a header holds {HEADER_LEN} fields, got {len(vals)}")
    h = torch.zeros(HEADER_LEN, dtype=torch.int64)
    h[: len(vals)] = torch.tensor(vals, dtype=torch.int64)
    return h


def bytes_tensor(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8)


def pair_group(store: Any, rank: int, host: str, timeout: timedelta) -> Any:
    """A gloo group of two (engine rank 0, shard rank 1) whose device is bound to ``host``: the default device would
    pick the interface the machine's hostname resolves to. ``timeout`` bounds forming the pair and is every op's
    default."""
    o = dist.ProcessGroupGloo._Options()
    o._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    o._timeout = timeout
    return dist.ProcessGroupGloo(store, rank, 2, o)


def rendezvous_keys(cid: int) -> list[str]:
    """What forming connection ``cid`` leaves in the shard's store: the shard's accept answer and gloo's address key
    per rank (``<prefix>/<device index>/<rank>``; a unit test holds the store's key count to this list)."""
    return [f"conn{cid}/accept", f"conn{cid}/0/0", f"conn{cid}/0/1"]


def default_local_host(shard_host: str) -> str:
    """The engine's end of a pair to a loopback shard binds loopback; any other shard needs it given."""
    ip = ipaddress.ip_address(shard_host)
    if ip.is_loopback:
        return "::1" if ip.version == 6 else "127.0.0.1"
    raise ValueError(f"RemoteShard to {shard_host}: pass local_host, this node's IP address toward the shard (the "
                     "engine's end of the gloo pair binds to it)")


def _in(op: str, field: str, v: int, lo: int, hi: int) -> int:
    if not lo <= v <= hi:
        raise ProtocolError(op, field, f"{v} is outside [{lo}, {hi}]")
    return v


def check_header(h: Sequence[int], hello: Optional[Hello]) -> int:
    """The header's op, after checking it is known, that HELLO came first and that unused fields are 0."""
    if len(h) != HEADER_LEN:
        raise ProtocolError("header", "length", f"{len(h)} fields, expected {HEADER_LEN}")
    op = int(h[0])
    if op not in OP_NAMES:
        raise ProtocolError("header", "op", f"unknown op {op} (known: {sorted(OP_NAMES)})")
    name = OP_NAMES[op]
    used = 1 + len(_FIELDS[op])
    for i in range(used, HEADER_LEN):
        if h[i] != 0:
            raise ProtocolError(name, f"header[{i}]", f"unused field is {h[i]}, must be 0")
    if op in (OP_LOAD, OP_RUN, OP_FETCH) and hello is None:
        raise ProtocolError(name, "op", "HELLO must come first on a connection")
    return op


def check_hello(h: Sequence[int], lim: ShardLimits, current: Optional[Hello], has_layers: bool) -> Hello:
    """HELLO's fields; a connection that holds layers may repeat its HELLO but not change the shape or dtype of its
    slots (E, which only bounds the expert ids of later LOADs, may change)."""
    D = _in("HELLO", "D", h[1], 1, lim.max_dim)
    I = _in("HELLO", "I", h[2], 1, lim.max_inter)  # noqa: E741
    dt = _in("HELLO", "dtype", h[3], 0, len(DTYPES) - 1)
    E = _in("HELLO", "E", h[4], 1, lim.max_experts)
    new = Hello(D, I, DTYPES[dt], E)
    if has_layers and current is not None:
        for field in ("D", "I", "dtype"):
            if getattr(new, field) != getattr(current, field):
                raise ProtocolError("HELLO", field, f"{getattr(new, field)} would change {getattr(current, field)} "
                                                    "of a connection that holds layers")
    return new


def check_load(h: Sequence[int], lim: ShardLimits, hello: Hello, layer_slots: dict[int, int],
               held_bytes: int, op: str = "LOAD") -> tuple[int, int, int]:
    """LOAD ``(layer, S, m)``: ``layer_slots`` maps the connection's loaded layers to their slot counts and
    ``held_bytes`` is the slot weight bytes it holds; a new or resized layer must send every slot (m = S)."""
    layer = _in(op, "layer", h[1], 0, lim.max_layers - 1)
    S = _in(op, "S", h[2], 0, lim.max_slots)
    m = _in(op, "m", h[3], 0, S)
    if layer_slots.get(layer) != S and m != S:
        raise ProtocolError(op, "m", f"{m} of {S} slots sent for a layer that is new or resized")
    slot_bytes = 3 * hello.D * hello.I * hello.dtype.itemsize
    if m * slot_bytes > lim.max_message_bytes:
        raise ProtocolError(op, "m", f"{m} slots of {slot_bytes} bytes exceed max_message_bytes "
                                     f"{lim.max_message_bytes}")
    old = layer_slots.get(layer, 0) * slot_bytes
    if held_bytes - old + S * slot_bytes > lim.max_connection_bytes:
        raise ProtocolError(op, "S", f"{S} slots would make this connection hold more than "
                                     f"max_connection_bytes {lim.max_connection_bytes}")
    return layer, S, m


def check_fetch(h: Sequence[int], lim: ShardLimits, hello: Hello, layer_slots: dict[int, int],
                held_bytes: int) -> tuple[int, int, int, str]:
    """FETCH ``(layer, S, m, layer key)``: LOAD's checks (the rows are allocated as if sent) plus the checkpoint
    layer the slots come from."""
    layer, S, m = check_load(h, lim, hello, layer_slots, held_bytes, op="FETCH")
    kind = _in("FETCH", "kind", h[4], 0, len(FETCH_KINDS) - 1)
    index = _in("FETCH", "index", h[5], 0, lim.max_layers - 1)
    return layer, S, m, f"{FETCH_KINDS[kind]}.{index}"


def fetch_layer_key(layer_key: str) -> tuple[int, int]:
    """FETCH's ``(kind, index)`` of a serving layer key (``"layers.3"`` → (0, 3), ``"mtp.0"`` → (1, 0))."""
    prefix, _, idx = layer_key.partition(".")
    if prefix not in FETCH_KINDS or not idx.isdigit():
        raise ValueError(f"layer key {layer_key!r} is neither 'layers.<i>' nor 'mtp.<k>'")
    return FETCH_KINDS.index(prefix), int(idx)


def check_load_ids(ids: torch.Tensor, moved: torch.Tensor, S: int, E: int) -> None:
    """LOAD's payload ids: expert ids in ``[0, E)``, moved slots distinct and in ``[0, S)``."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= E):
        raise ProtocolError("LOAD", "ids", f"expert ids span [{int(ids.min())}, {int(ids.max())}], outside [0, {E})")
    if moved.numel():
        if int(moved.min()) < 0 or int(moved.max()) >= S:
            raise ProtocolError("LOAD", "moved", f"slots span [{int(moved.min())}, {int(moved.max())}], "
                                                 f"outside [0, {S})")
        if torch.unique(moved).numel() != moved.numel():
            raise ProtocolError("LOAD", "moved", "a slot is listed twice")


def check_run(h: Sequence[int], lim: ShardLimits, hello: Hello, layer_slots: dict[int, int]) -> tuple[int, int, int]:
    """RUN ``(layer, N, S)``: the layer must be loaded with S slots."""
    layer = _in("RUN", "layer", h[1], 0, lim.max_layers - 1)
    N = _in("RUN", "N", h[2], 0, lim.max_rows)
    S = _in("RUN", "S", h[3], 0, lim.max_slots)
    if layer not in layer_slots:
        raise ProtocolError("RUN", "layer", f"layer {layer} was never loaded on this connection")
    if layer_slots[layer] != S:
        raise ProtocolError("RUN", "S", f"{S} counts for a layer of {layer_slots[layer]} slots")
    if N * hello.D * hello.dtype.itemsize > lim.max_message_bytes:
        raise ProtocolError("RUN", "N", f"{N} rows of width {hello.D} exceed max_message_bytes "
                                        f"{lim.max_message_bytes}")
    return layer, N, S


def check_counts(counts: torch.Tensor, N: int) -> None:
    """RUN's counts: every one >= 0 and their sum exactly N (the rows that follow)."""
    if counts.numel() and int(counts.min()) < 0:
        raise ProtocolError("RUN", "counts", f"negative count {int(counts.min())}")
    total = int(counts.sum()) if counts.numel() else 0
    if total != N:
        raise ProtocolError("RUN", "counts", f"sum to {total}, header N is {N}")


def parse_request(raw: bytes, issued: int) -> Optional[int]:
    """A connection request popped from the queue → its id, or None when it is not a decimal id in
    ``[1, issued]``."""
    if not raw or len(raw) > 19 or not raw.isdigit():
        return None
    cid = int(raw)
    return cid if 1 <= cid <= issued else None


def check_host(host: str, what: str) -> str:
    """``host`` must be the IP address of one interface (never a wildcard, never a name to resolve)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{what} must be an IP address (the node's, e.g. ray.util.get_node_ip_address()), "
                         f"got {host!r}") from None
    if ip.is_unspecified:
        raise ValueError(f"{what} {host!r} would listen on every interface; give the node's IP address")
    return str(ip)


def check_secret(secret: Optional[bytes]) -> Optional[bytes]:
    if secret is None:
        return None
    if not isinstance(secret, (bytes, bytearray)) or len(secret) < 16:
        raise ValueError("the expert-shard secret must be at least 16 bytes (the Serve app uses 32 random bytes)")
    return bytes(secret)


def _cid(cid: int) -> bytes:
    return int(cid).to_bytes(8, "big")


def engine_proof(secret: Optional[bytes], cid: int, nonce_s: bytes) -> bytes:
    if secret is None:
        return bytes(MAC_BYTES)
    return hmac.new(secret, _ENGINE_TAG + _cid(cid) + nonce_s, hashlib.sha256).digest()


def shard_proof(secret: Optional[bytes], cid: int, nonce_s: bytes, nonce_e: bytes) -> bytes:
    if secret is None:
        return bytes(MAC_BYTES)
    return hmac.new(secret, _SHARD_TAG + _cid(cid) + nonce_s + nonce_e, hashlib.sha256).digest()
