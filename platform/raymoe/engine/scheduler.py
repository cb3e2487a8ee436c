"""Sequences and the continuous-batching scheduler.

State of a sequence: ``tokens`` (prompt + generated), ``num_computed`` (positions whose latents are in the paged
cache), its ``block_table``. ``len(tokens) - num_computed`` tokens still need a forward: many during prefill, exactly
one (the last sampled token) while decoding, plus ``drafts`` (MTP proposals) when speculating.

Policy of one step (``Scheduler.schedule``), under a budget of ``max_num_batched_tokens`` packed tokens:

1. **Running sequences first, oldest first.** A decoding sequence takes ``1 + len(drafts)`` tokens (drafts are
   dropped if the budget cannot hold them); a sequence still in prefill takes the next chunk
   ``min(remaining, budget, prefill_chunk)``. Decodes therefore run every step, and a long prompt is spread over
   several steps (chunked prefill) instead of stalling them; one step mixes prefill chunks and decode tokens.
2. **Preemption by recompute.** If the blocks for a running sequence's new tokens are not free, the most recently
   admitted running sequence is preempted: its blocks are freed, ``num_computed`` is reset to 0 and it goes back to
   the *front* of the waiting queue with all its tokens (prompt + generated so far) as the new prompt. Its RNG state
   and outputs are kept, so greedy output is unchanged by preemption. If the sequence itself is the most recent, it
   is the one preempted.
3. **Admission (FCFS)**, only if nothing was preempted this step: the head of the waiting queue is admitted while
   the budget lasts, fewer than ``max_num_seqs`` run, and the free blocks hold its whole (re)prompt plus one token;
   it is allocated blocks for its first chunk only.

**Prefix caching** (``prefix_caching=True``; mechanism in :mod:`raymoe.engine.paged`). At admission a sequence
with nothing computed looks up the chained digests of its full blocks and starts with the longest cached run of them
(references taken, ``num_computed`` = their tokens): it prefills only the rest. At most ``(len(tokens) - 1) //
block_size`` blocks are reused, so the last prompt token is always computed and yields the first logits. After each
step :meth:`Scheduler.commit` registers the blocks whose latents became final (every layer, the MTP layer included:
see ``lookahead``), so later requests, and this one after a preemption, find them. A preempted sequence releases its
blocks like a finished one; its registered blocks stay cached until evicted, and on re-admission it reuses whatever
is left of them. ``num_cached_tokens`` (the first admission's hit, what the API reports) and the hit-rate counters
ignore re-admissions.
"""
from __future__ import annotations

import collections
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from raymoe.engine.paged import PagedLatentCache, block_digest
from raymoe.engine.sampling import SamplingParams

__all__ = ["Sequence", "SequenceGroup", "Scheduler", "ScheduledSeq"]

_seq_ids = itertools.count()


@dataclass(eq=False)  # identity semantics: held in lists/deques
class Sequence:
    group: "SequenceGroup"
    index: int  # choice index within the request (n > 1)
    tokens: list[int]
    prompt_len: int
    generator: Optional[torch.Generator]
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    # MTP drafting state: positions [mtp_computed, num_computed) have main hidden states in `pending_hidden`
    mtp_computed: int = 0
    pending_hidden: Optional[torch.Tensor] = None  # [num_computed - mtp_computed, D]
    drafts: list[int] = field(default_factory=list)
    draft_probs: Optional[torch.Tensor] = None  # [len(drafts), V] (sampling only)
    # outputs
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: Optional[str] = None
    stop_text_end: Optional[int] = None  # text truncated here (stop string)
    exclude_last_from_text: bool = False  # the last token is a stop token
    detok: Any = None  # raymoe.engine.detokenize.IncrementalDetokenizer of the output (None: no tokenizer)
    num_preemptions: int = 0
    first_token_time: Optional[float] = None
    # prefix caching: chained digests of the full blocks known so far (tokens only grow: they stay valid), how many
    # leading blocks of block_table are registered or were reused, and the first admission's reused tokens
    block_digests: list[bytes] = field(default_factory=list)
    num_registered: int = 0
    num_cached_tokens: Optional[int] = None

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.prompt_len :]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def remaining(self) -> int:
        return len(self.tokens) - self.num_computed

    def reset_for_recompute(self) -> None:
        self.num_computed = 0
        self.mtp_computed = 0
        self.num_registered = 0
        self.pending_hidden = None
        self.drafts, self.draft_probs = [], None


@dataclass(eq=False)
class SequenceGroup:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    seqs: list[Sequence] = field(default_factory=list)
    first_token_time: Optional[float] = None
    stop_ids: frozenset = frozenset()  # params.stop_token_ids as a set (tested against every generated token)

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # new tokens from seq.tokens (excluding drafts)
    drafts: list[int]


class Scheduler:
    def __init__(self, cache: PagedLatentCache, max_num_seqs: int, max_num_batched_tokens: int,
                 prefill_chunk: int, prefix_caching: bool = False, lookahead: int = 0) -> None:
        """``lookahead``: tokens past a block that its latents depend on (1 with MTP drafting, whose layer reads the
        next token; else 0); they join the block's digest."""
        self.cache = cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefill_chunk = prefill_chunk
        self.prefix_caching = prefix_caching
        self.lookahead = lookahead
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefix_queries = 0  # prompt tokens of first admissions
        self.prefix_hits = 0  # ...of which reused from the cache

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.cache.free(seq.block_table)

    def _digests(self, seq: Sequence, n_blocks: int) -> list[bytes]:
        """The chained digests of ``seq``'s first ``n_blocks`` blocks (computed once, kept on the sequence)."""
        bs, d = self.cache.block_size, seq.block_digests
        while len(d) < n_blocks:
            k = len(d)
            d.append(block_digest(d[-1] if d else None, seq.tokens[k * bs : (k + 1) * bs + self.lookahead]))
        return d[:n_blocks]

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks of the longest cached prefix a fresh (nothing computed) sequence can reuse; no references taken."""
        if not self.prefix_caching or seq.num_computed or seq.block_table:
            return []
        n = (len(seq.tokens) - 1) // self.cache.block_size  # keep the last token: its logits start decoding
        return self.cache.allocator.lookup(self._digests(seq, n)) if n > 0 else []

    def commit(self, seq: Sequence, num_final: int) -> None:
        """Register ``seq``'s full blocks among its first ``num_final`` positions (latents final in every layer)."""
        if not self.prefix_caching:
            return
        n = min(num_final // self.cache.block_size, len(seq.block_table))
        if n <= seq.num_registered:
            return
        digests = self._digests(seq, n)
        for k in range(seq.num_registered, n):
            self.cache.allocator.register(seq.block_table[k], digests[k])
        seq.num_registered = n

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.cache.free(seq.block_table)
        seq.reset_for_recompute()
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.max_num_batched_tokens
        out: list[ScheduledSeq] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.remaining == 1:
                drafts = seq.drafts if 1 + len(seq.drafts) <= budget else []
                n_new = 1
            else:
                drafts = []
                n_new = min(seq.remaining, budget, self.prefill_chunk)
            if not drafts:
                seq.drafts, seq.draft_probs = [], None
            total = seq.num_computed + n_new + len(drafts)
            scheduled_self = True
            while not self.cache.ensure(seq.block_table, total):
                victim = self.running[-1]
                preempted = True
                self._preempt(victim)
                if victim is seq:
                    scheduled_self = False
                    break
            if not scheduled_self:
                continue  # seq left the running list; index i now points at the next one (or the end)
            out.append(ScheduledSeq(seq, n_new, list(drafts)))
            budget -= n_new + len(drafts)
            i += 1
        if preempted:
            return out
        alloc = self.cache.allocator
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hit = self._cached_prefix(seq)
            idle_hits = sum(1 for b in hit if alloc.ref(b) == 0)  # cached blocks num_free counts as allocatable
            if self.cache.blocks_for(len(seq.tokens) + 1) - len(hit) > alloc.num_free - idle_hits:
                break
            alloc.acquire(hit)
            seq.block_table.extend(hit)
            seq.num_computed = seq.mtp_computed = len(hit) * self.cache.block_size
            seq.num_registered = len(hit)
            if seq.num_cached_tokens is None:
                seq.num_cached_tokens = seq.num_computed
                if self.prefix_caching:
                    self.prefix_queries += len(seq.tokens)
                    self.prefix_hits += seq.num_computed
            n_new = min(seq.remaining, budget, self.prefill_chunk)
            if not self.cache.ensure(seq.block_table, seq.num_computed + n_new):  # cannot fail after the check
                self.cache.free(seq.block_table)
                seq.reset_for_recompute()
                break
            self.waiting.popleft()
            self.running.append(seq)
            out.append(ScheduledSeq(seq, n_new, []))
            budget -= n_new
        return out
