"""Prefix-affinity routing: which engine replica should take a request so that its prompt prefix is already cached.

Prefix caching pays only if requests with a common prefix reach the replica that holds it; with N replicas and
load-only routing a shared prefix is prefilled up to N times and kept N times. The router keeps an approximate,
bounded index of what it sent where (SGLang's router keeps a radix tree of the same information): the prompt is cut
into chunks — ``chunk_tokens`` token ids, or ``chunk_chars`` characters of a text prompt (the router does not
tokenize) — each keyed by a chained digest (as in :mod:`raymoe.engine.paged`, so a key stands for the whole prefix up
to its chunk), and every key remembers the replicas it was routed to, least recently used keys dropped past
``capacity``.

Policy (:meth:`PrefixAffinity.rank`), for one request over the live replicas:

1. **Longest match**: walk the prompt's keys while some replica has seen all of them; the replicas at the deepest
   level are preferred.
2. **No match** (a new prefix, or a prompt shorter than a chunk): the replica with the highest
   ``sha256(first key || replica id)`` (rendezvous hashing), so independent routers (one per ingress replica) agree,
   new prefixes spread evenly, and removing a replica moves only its own prefixes.
3. **Load guard**: a preferred replica whose known queue length exceeds the least loaded one's by more than
   ``imbalance`` is dropped from the first rank; the rest follow as a second rank, least loaded first (the Serve
   router then takes the first rank's least loaded replica that accepts the request, else tries the next rank).
4. **Patience**: the other replicas are offered only once the preferred rank has failed to take the request
   ``spill_after`` times (``rank(..., attempt=k)``). Serve asks a replica for its queue length with a 0.1 s deadline
   that doubles on every failed try; on a busy host one missed answer would otherwise send the request, and then its
   whole prefix group (which follows it), to a replica without the cache. A full replica answers at once, so a
   real spill costs ``spill_after`` quick round trips.

Pure Python (no torch, no Ray): the Serve adapter is :class:`raymoe.actors.serve.router.PrefixAffinityRouter`.

Example::

    >>> p = PrefixAffinity(chunk_chars=4)
    >>> p.rank("abcdefgh-1", ["r1", "r2"], {})[0]      # new prefix: rendezvous hash picks one
    ['r2']
    >>> p.record("abcdefgh-1", "r1")                     # say it went to r1 (r2 was full)
    >>> p.rank("abcdefgh-2", ["r1", "r2"], {})[0]       # shares two chunks with what r1 holds
    ['r1']
"""
from __future__ import annotations

import array
import collections
import hashlib
from typing import Any, Mapping, Optional, Sequence

__all__ = ["PrefixAffinity"]


class PrefixAffinity:
    def __init__(self, chunk_tokens: int = 16, chunk_chars: int = 64, max_chunks: int = 64, imbalance: int = 8,
                 capacity: int = 100_000, spill_after: int = 2) -> None:
        for k, v in (("chunk_tokens", chunk_tokens), ("chunk_chars", chunk_chars), ("max_chunks", max_chunks),
                     ("capacity", capacity)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"prefix routing: {k} must be an integer >= 1, got {v!r}")
        for k, v in (("imbalance", imbalance), ("spill_after", spill_after)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"prefix routing: {k} must be an integer >= 0, got {v!r}")
        self.chunk_tokens, self.chunk_chars, self.max_chunks = chunk_tokens, chunk_chars, max_chunks
        self.imbalance, self.capacity, self.spill_after = imbalance, capacity, spill_after
        self._owners: collections.OrderedDict[bytes, dict[str, None]] = collections.OrderedDict()  # LRU first

    def keys(self, prompt: str | Sequence[int]) -> list[bytes]:
        """Chained digests of the prompt's full chunks (at most ``max_chunks``)."""
        if isinstance(prompt, str):
            n = self.chunk_chars
            pieces = [prompt[i : i + n].encode("utf-8", "surrogatepass") for i in range(0, len(prompt) - n + 1, n)]
        else:
            n = self.chunk_tokens
            pieces = [array.array("q", prompt[i : i + n]).tobytes() for i in range(0, len(prompt) - n + 1, n)]
        out: list[bytes] = []
        for piece in pieces[: self.max_chunks]:
            out.append(hashlib.sha256((out[-1] if out else b"") + piece).digest())
        return out

    @staticmethod
    def _whole(prompt: str | Sequence[int]) -> bytes:
        raw = prompt.encode("utf-8", "surrogatepass") if isinstance(prompt, str) else array.array("q", prompt).tobytes()
        return hashlib.sha256(raw).digest()

    def rank(self, prompt: str | Sequence[int], replicas: Sequence[str],
             load: Mapping[str, Optional[int]], attempt: Optional[int] = None) -> list[list[str]]:
        """Replicas to try, best rank first (see the module docstring). ``load``: known queue lengths (None or
        missing: unknown, never treated as overloaded). ``attempt``: how many times the router already offered this
        request (None: all ranks at once); below ``spill_after`` only the preferred rank is offered."""
        if not replicas:
            return []
        keys = self.keys(prompt)
        best, depth = set(replicas), 0
        for k in keys:
            owners = self._owners.get(k)
            hit = best.intersection(owners) if owners else set()
            if not hit:
                break
            best, depth = hit, depth + 1
        if depth == 0:
            seed = keys[0] if keys else self._whole(prompt)
            best = {max(replicas, key=lambda r: hashlib.sha256(seed + r.encode()).digest())}
        known = [v for r in replicas if (v := load.get(r)) is not None]
        lo = min(known) if known else 0

        def q(r: str) -> int:
            v = load.get(r)
            return lo if v is None else v

        first = sorted((r for r in best if q(r) - lo <= self.imbalance), key=lambda r: (q(r), r))
        rest = sorted((r for r in replicas if r not in first), key=lambda r: (q(r), r))
        if first and attempt is not None and attempt < self.spill_after:
            return [first]
        return [x for x in (first, rest) if x]

    def record(self, prompt: str | Sequence[int], replica: str) -> None:
        """The request went to ``replica``: it will hold the prompt's prefix."""
        for k in self.keys(prompt):
            owners = self._owners.get(k)
            if owners is None:
                owners = self._owners[k] = {}
            else:
                self._owners.move_to_end(k)
            owners[replica] = None
        while len(self._owners) > self.capacity:
            self._owners.popitem(last=False)

    def forget(self, replica: str) -> None:
        """A replica is gone: its cache with it."""
        for k in list(self._owners):
            owners = self._owners[k]
            owners.pop(replica, None)
            if not owners:
                del self._owners[k]

    def stats(self) -> dict[str, Any]:
        return {"keys": len(self._owners)}
