"""Paged latent KV cache: fixed-size blocks of MLA latents, a block table per sequence, packed-batch views.

Block layout. One buffer per engine::

    buf [L_total, num_blocks * block_size, C + R]      (logically [L_total, num_blocks, block_size, C + R])

``L_total = num_hidden_layers + D_mtp`` (the MTP draft blocks get their own layers, index ``N + depth - 1`` — the
``layer_idx`` of their MLA), ``C = kv_lora_rank`` (the normalised latent c_kv) and ``R = qk_rope_head_dim`` (the
post-RoPE shared key k_pe), exactly the per-token layout of :class:`raymoe.model.cache.LatentKVCache`. Token
position ``p`` of a sequence with block table ``bt`` lives in slot ``bt[p // block_size] * block_size +
p % block_size`` of every layer. Blocks are handed out by :class:`BlockAllocator` (a sequence holds
``ceil(tokens / block_size)`` blocks, all released when it finishes or is preempted).

Prefix caching (vLLM's automatic prefix caching; SGLang's RadixAttention keeps the same information in a radix tree).
A *full* block whose latents are final is content-addressed by a chained digest,
``d_k = sha256(d_{k-1} || token ids of block k [|| the first token of block k+1])`` (:func:`block_digest`): equal
digests mean equal token prefixes, hence equal latents at equal positions (a latent depends only on the tokens up to
its position). The bracketed look-ahead token is part of the key when the engine runs MTP drafts: the MTP layer's
latent at position ``i`` is computed from ``[emb(t_{i+1}); h_i]``, so the last slot of a block depends on the next
block's first token. The allocator keeps ``digest → block`` for registered blocks and a **reference count** per
block: sequences with a common prefix share its blocks (read only: a sequence writes only positions past the blocks
it registered or reused). A block whose count drops to 0 keeps its digest and latents and waits, in LRU order, until
a new allocation needs it (never-registered free blocks are handed out first). sha256, not Python's ``hash``: a
collision would hand one request another's latents, and a 64-bit non-cryptographic hash can be collided on purpose.

Packed batches. One engine step runs every scheduled token of every sequence as ONE row ``[1, N]`` (no padding, so
the MoE layers see only real tokens). :class:`PackedBatch` is the cache object the model sees for that forward: it
implements the two methods the absorbed MLA path calls (see :mod:`raymoe.model.cache`):

* ``positions(N)`` → ``[N]`` absolute position of every packed token (RoPE);
* ``gather(layer, kv [1, N, C+R])`` → writes the new latents into their slots, then returns the keys of all the
  step's sequences concatenated, ``[1, S, C+R]`` with ``S = Σ_j (start_j + n_j)``, and the mask ``[N, S]``
  (True = masked): a query sees only keys of its own sequence at positions ≤ its own (block-diagonal causal).

Attention over the concatenated keys costs ``O(N·S)`` instead of ``O(Σ n_j·(start_j+n_j))``: fine for prefill chunks
(a few long segments), wasteful for decode (N = B and S = Σ_j len_j, so ``O(B²·len)``).

Decode batches. When every segment is short (a decode token, or ``1 + k`` tokens verifying MTP drafts),
:meth:`PagedLatentCache.decode_batch` gives a :class:`DecodeBatch` instead, for the **row-per-token layout**: the
model runs on ``x [N, 1, D]`` (every packed token is its own batch row, T = 1), so the absorbed MLA's score einsum
``bthc,bsc->bths`` is a batched GEMM of each token against *its own sequence's* keys only:

* ``positions(1)`` → ``[N, 1]`` positions (the rotary embedding then yields ``cos/sin [N, 1, R/2]``, which
  broadcast per row in ``apply_rope``);
* ``gather(layer, kv [N, 1, C+R])`` → writes the latents, returns ``[N, S_max, C+R]`` (row i: the keys of token i's
  sequence at positions ``0..S_max-1``, gathered through a padded block table; ``S_max = max_j (start_j + n_j)``)
  and the mask ``[N, 1, S_max]`` (True beyond the row's own position: padding and, for draft rows, the causal
  future), or None when nothing is masked (one token per sequence, all of the same length).

Cost ``O(N·S_max)`` instead of ``O(N·Σ_j len_j)``. Outputs equal the packed path's up to float summation order
(masked keys contribute exact zeros in both).

Prefill batches. A step with prefill chunks gets a :class:`PrefillBatch` (:meth:`PagedLatentCache.prefill_batch`):
its *long* segments (more than ``short_max`` tokens: prompt chunks) run MLA's **expanded** (non-absorbed) path, as
DeepSeek prefills: the segment's keys ``[end_j, C+R]`` (cached prefix + new tokens, read back from the cache after
the write) are up-projected by ``kv_b_proj`` into per-head keys and values, and each sequence runs its own causal
SDPA (query i at position ``start_j + i`` sees keys ``0..start_j + i``), ``O(Σ n_j·end_j)`` with a fused kernel
instead of the packed ``O(N·S)`` score tensor. Segments of one shape ``(n, start, end)`` (a batch of equal prompts,
equal chunks after equal prefixes) share one SDPA call ``[B, H, n, end]`` of up to ``PREFILL_GROUP_ROWS`` query rows
(:class:`PrefillGroup`; their keys are laid out group by group), with no padding: no other sequence's key or stale
slot ever enters a product. Its *short* segments (decode tokens, draft verification) keep the absorbed path through
a :class:`DecodeBatch` over just their tokens (the expanded path would up-project their whole context for one
query). The latents written are the same in every view: ``kv_a_proj_with_mqa``'s output, at the same
slots. ``positions(N)`` is the packed one (``[N]``); the model runs on ``x [1, N, D]`` as for a packed batch.
"""
from __future__ import annotations

import array
import collections
import hashlib
import math
from typing import NamedTuple, Optional, Sequence

import torch

__all__ = ["BlockAllocator", "NoFreeBlocks", "PagedLatentCache", "PackedBatch", "DecodeBatch", "PrefillBatch",
           "PrefillGroup", "PREFILL_GROUP_ROWS", "block_digest"]


# Most query rows one grouped prefill attention call takes (PrefillGroup). Grouping saves SDPA's per-call overhead
# (and the loop's per-segment ops), which on a CPU matters for short chunks only: measured per MLA layer
# (`bench serve parts=prefill_attn`), 64 chunks of 16 tokens ran 1.45x (tiny) / 1.07x (small) faster as one call,
# while 16 chunks of 256 tokens ran 0.91-0.97x as fast as 16 calls (the batched working set leaves the L2 cache).
PREFILL_GROUP_ROWS = 256


class NoFreeBlocks(RuntimeError):
    pass


def block_digest(parent: Optional[bytes], token_ids: Sequence[int]) -> bytes:
    """Chained content digest of one full block: ``sha256(parent || int64 token ids)`` (32 bytes). ``parent`` is
    the previous block's digest (None for the first block)."""
    h = hashlib.sha256(parent or b"")
    h.update(array.array("q", token_ids).tobytes())
    return h.digest()


class BlockAllocator:
    """Reference-counted block pool with a content-addressed cache of full blocks (prefix caching).

    Every block is *in use* (``ref > 0``), *cached* (``ref == 0`` and a registered digest: reusable by
    :meth:`lookup` + :meth:`acquire` until evicted) or *free*. :meth:`allocate` hands out free blocks first, lowest
    ids first (deterministic layouts), then evicts cached blocks least recently released first. ``num_free`` counts
    both free and cached blocks: everything an allocation may take.

    Example::

        >>> a = BlockAllocator(3)
        >>> b = a.allocate(2)                       # [0, 1]
        >>> a.register(b[0], block_digest(None, [5, 6]))
        True
        >>> a.free(b); a.num_free, a.num_cached     # block 0 is cached, block 1 free
        (3, 1)
        >>> a.lookup([block_digest(None, [5, 6])])  # a later sequence with the same first block
        [0]
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))
        self._ref = [0] * num_blocks
        self._digest: list[Optional[bytes]] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}  # digest -> block (in use or evictable)
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # ref 0, LRU first
        self.num_evictions = 0

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks holding a registered digest (in use or evictable)."""
        return len(self._cached)

    def ref(self, block: int) -> int:
        return self._ref[block]

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise NoFreeBlocks(f"need {n} blocks, {self.num_free} free")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:  # evict the least recently released cached block
                b, _ = self._evictable.popitem(last=False)
                del self._cached[self._digest[b]]
                self._digest[b] = None
                self.num_evictions += 1
            self._ref[b] = 1
            out.append(b)
        return out

    def free(self, blocks: Sequence[int]) -> None:
        """Release one reference on each block. Released in reverse so that, among one sequence's cached blocks,
        the tail (useful only after its head) is evicted first."""
        for b in reversed(list(blocks)):
            if self._ref[b] <= 0:
                raise ValueError(f"block {b} released more often than acquired")
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if self._digest[b] is not None:
                    self._evictable[b] = None
                else:
                    self._free.append(b)

    def lookup(self, digests: Sequence[bytes]) -> list[int]:
        """Blocks of the longest prefix of ``digests`` that is cached (no references taken)."""
        out = []
        for d in digests:
            b = self._cached.get(d)
            if b is None:
                break
            out.append(b)
        return out

    def acquire(self, blocks: Sequence[int]) -> None:
        """Take a reference on cached blocks (from :meth:`lookup`); an evictable one is no longer evictable."""
        for b in blocks:
            if self._digest[b] is None:
                raise ValueError(f"block {b} is not a cached block")
            if self._ref[b] == 0:
                del self._evictable[b]
            self._ref[b] += 1

    def register(self, block: int, digest: bytes) -> bool:
        """Make an in-use block's final contents findable under ``digest``. False (nothing changes) if the digest is
        already cached by another block (two sequences computed the same prefix at once) or the block has one."""
        if self._ref[block] <= 0:
            raise ValueError(f"block {block} is not in use")
        if digest in self._cached or self._digest[block] is not None:
            return False
        self._digest[block] = digest
        self._cached[digest] = block
        return True

    def unregister(self, blocks: Sequence[int]) -> int:
        """Make these blocks unfindable (their contents are suspect: a request that read them produced non-finite
        logits). A block still in use stays with its sequences and is freed, not cached, when they release it; an
        evictable one becomes free at once. Returns how many blocks had a digest."""
        n = 0
        for b in blocks:
            d = self._digest[b]
            if d is None:
                continue
            del self._cached[d]
            self._digest[b] = None
            if self._ref[b] == 0:
                del self._evictable[b]
                self._free.append(b)
            n += 1
        return n


class PagedLatentCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, values_per_token: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.num_layers = num_layers
        self.values_per_token = values_per_token
        self.buf = torch.zeros(num_layers, num_blocks * block_size, values_per_token, dtype=dtype, device=device)
        self.allocator = BlockAllocator(num_blocks)
        self._pos = torch.arange(0)  # cached 0..n-1 (grown on demand) for decode batches
        # prefill views batch long segments of one shape into one attention call; False: one call per segment (the
        # reference the tests and the serve bench's prefill comparison hold the grouped calls to)
        self.group_prefill = True
        # decode views attend through raymoe.model.cpu_kernels.mla_decode, reading keys in place (the engine sets it
        # with engine.cpu_kernels); False: gather the keys, then torch's bmm/softmax
        self.cpu_kernels = False

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def ensure(self, block_table: list[int], num_tokens: int) -> bool:
        """Grow ``block_table`` (in place) to hold ``num_tokens`` tokens; False (nothing allocated) if blocks lack."""
        need = self.blocks_for(num_tokens) - len(block_table)
        if need <= 0:
            return True
        if need > self.allocator.num_free:
            return False
        block_table.extend(self.allocator.allocate(need))
        return True

    def free(self, block_table: list[int]) -> None:
        self.allocator.free(block_table)
        block_table.clear()

    def slots(self, block_table: Sequence[int], start: int, end: int) -> torch.Tensor:
        """Flat slot ids ``[end - start]`` of positions ``start..end-1``."""
        pos = torch.arange(start, end)
        bt = torch.as_tensor(list(block_table), dtype=torch.long)
        return bt[pos // self.block_size] * self.block_size + pos % self.block_size

    def _block_table_tensor(self, segments: Sequence[tuple[Sequence[int], int, int]]) -> tuple[torch.Tensor, list[int]]:
        """Checked ``[B, nb]`` block table of the segments (rows padded with block 0, ``nb`` = blocks of the longest)
        and the segments' end positions ``start + n``."""
        ends = [start + n for _, start, n in segments]
        nb = self.blocks_for(max(ends)) if ends else 0
        rows = []
        for j, ((bt, _, _), end) in enumerate(zip(segments, ends)):
            need = self.blocks_for(end)
            if need > len(bt):
                raise ValueError(f"segment {j}: positions up to {end} need {need} blocks, has {len(bt)}")
            row = list(bt[:nb])
            rows.append(row + [0] * (nb - len(row)))
        return torch.tensor(rows, dtype=torch.long).view(len(segments), nb), ends

    def batch(self, segments: Sequence[tuple[Sequence[int], int, int]]) -> "PackedBatch":
        """A view for one packed forward. ``segments[j] = (block_table, start, n)``: sequence j contributes n new
        tokens at positions ``start..start+n-1`` and attends to its positions ``0..start+n-1``.

        Built with a handful of vectorised ops: ``q_seq/k_seq`` repeat the segment index ``n_j`` / ``end_j`` times,
        positions are offsets within the segment, and slot = ``table[seq, pos // bs] · bs + pos % bs``."""
        table, ends = self._block_table_tensor(segments)
        bs = self.block_size
        B = len(segments)
        starts_B = torch.tensor([start for _, start, _ in segments], dtype=torch.long)
        n_B = torch.tensor([n for _, _, n in segments], dtype=torch.long)
        ends_B = starts_B + n_B
        seq_ids = torch.arange(B)
        q_seq = torch.repeat_interleave(seq_ids, n_B)
        k_seq = torch.repeat_interleave(seq_ids, ends_B)
        q_off = torch.arange(q_seq.numel()) - torch.repeat_interleave(n_B.cumsum(0) - n_B, n_B)
        q_pos = starts_B[q_seq] + q_off
        k_pos = torch.arange(k_seq.numel()) - torch.repeat_interleave(ends_B.cumsum(0) - ends_B, ends_B)
        q_slots = table[q_seq, q_pos // bs] * bs + q_pos % bs
        k_slots = table[k_seq, k_pos // bs] * bs + k_pos % bs
        dev = self.buf.device
        return PackedBatch(self, q_slots.to(dev), q_pos.to(dev), q_seq.to(dev), k_slots.to(dev), k_pos.to(dev),
                           k_seq.to(dev))

    def decode_batch(self, segments: Sequence[tuple[Sequence[int], int, int]]) -> "DecodeBatch":
        """A view for one forward in the row-per-token layout (see the module docstring); same ``segments`` as
        :meth:`batch`. Meant for short segments (decode, draft verification): it gathers ``S_max`` keys per token.

        With ``table [B, nb]`` the padded block table and ``p = 0..S_max-1``: key slots of sequence j are
        ``slots_BS[j, p] = table[j, p // bs] · bs + p % bs``; token i (of sequence ``seq_i`` at position ``pos_i``)
        reads row ``seq_i`` and writes slot ``bt[pos_i // bs] · bs + pos_i % bs``; its mask is ``p > pos_i``."""
        table, ends = self._block_table_tensor(segments)
        bs = self.block_size
        S = max(ends)
        if self._pos.numel() < S:
            self._pos = torch.arange(max(S, 2 * self._pos.numel()))
        p_S = self._pos[:S]
        slots_BS = table[:, p_S // bs] * bs + p_S % bs  # [B, S]
        q_pos_l = [start + i for _, start, n in segments for i in range(n)]
        q_slots_l = [bt[q // bs] * bs + q % bs for bt, start, n in segments for q in range(start, start + n)]
        if all(n == 1 for _, _, n in segments):  # one token per sequence: rows are the sequences
            slots_NS = slots_BS
            all_full = all(e == S for e in ends)
        else:
            q_seq = torch.tensor([j for j, (_, _, n) in enumerate(segments) for _ in range(n)], dtype=torch.long)
            slots_NS = slots_BS.index_select(0, q_seq)
            all_full = False
        dev = self.buf.device
        q_pos = torch.tensor(q_pos_l, dtype=torch.long, device=dev)
        masked = None if all_full else (p_S.to(dev)[None, :] > q_pos[:, None])[:, None, :]  # [N, 1, S]
        return DecodeBatch(self, torch.tensor(q_slots_l, dtype=torch.long, device=dev), q_pos, slots_NS.to(dev),
                           masked)

    def prefill_batch(self, segments: Sequence[tuple[Sequence[int], int, int]], short_max: int) -> "PrefillBatch":
        """A view for one forward with prefill chunks (see the module docstring); same ``segments`` as :meth:`batch`.
        Segments of more than ``short_max`` tokens take the expanded MLA path, the others the absorbed one. Long
        segments of the same ``(n, start, end)`` form :class:`PrefillGroup` s of up to ``PREFILL_GROUP_ROWS`` query
        rows (one attention call each); with ``self.group_prefill`` false every segment is its own group."""
        table, ends = self._block_table_tensor(segments)
        bs = self.block_size
        dev = self.buf.device
        by_shape: dict[tuple[int, ...], list[tuple[int, int]]] = {}  # (n, start, end) → [(segment j, q0)]
        short_segs, short_rows = [], []
        q_pos_l: list[int] = []
        for j, (bt, start, n) in enumerate(segments):
            q0 = len(q_pos_l)
            q_pos_l.extend(range(start, start + n))
            if n > short_max:
                by_shape.setdefault((n, start, ends[j]) if self.group_prefill else (j,), []).append((j, q0))
            else:
                short_segs.append((bt, start, n))
                short_rows.extend(range(q0, q0 + n))
        # keys laid out group by group (each group's [B, end] keys contiguous), in order of first appearance
        groups, k_slot_parts, k0 = [], [], 0
        calls = []  # at most PREFILL_GROUP_ROWS query rows per call (at least one segment)
        for members in by_shape.values():
            k = max(1, PREFILL_GROUP_ROWS // segments[members[0][0]][2])
            calls += [members[i : i + k] for i in range(0, len(members), k)]
        for members in calls:
            j0, q00 = members[0]
            n, start, end = segments[j0][2], segments[j0][1], ends[j0]
            q0s = [q0 for _, q0 in members]
            rows: slice | torch.Tensor = slice(q00, q00 + len(members) * n)
            if q0s != list(range(q00, q00 + len(members) * n, n)):  # not adjacent in the packed row
                rows = torch.tensor([q0 + i for q0 in q0s for i in range(n)], dtype=torch.long, device=dev)
            mask = None  # SDPA's is_causal aligns top-left: with a cached prefix the mask is explicit
            if start > 0:
                mask = (torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]).to(dev)  # [n, S] True=see
            groups.append(PrefillGroup(rows, len(members), n, start, k0, end, mask))
            p = torch.arange(end)
            for j, _ in members:
                k_slot_parts.append(table[j, p // bs] * bs + p % bs)
                k0 += end
        q_pos = torch.tensor(q_pos_l, dtype=torch.long)
        q_seq = torch.repeat_interleave(torch.arange(len(segments)), torch.tensor([n for _, _, n in segments]))
        q_slots = table[q_seq, q_pos // bs] * bs + q_pos % bs
        k_slots = torch.cat(k_slot_parts) if k_slot_parts else torch.zeros(0, dtype=torch.long)
        short = self.decode_batch(short_segs) if short_segs else None
        return PrefillBatch(self, q_slots.to(dev), q_pos.to(dev), k_slots.to(dev), groups, short,
                            torch.tensor(short_rows, dtype=torch.long, device=dev))


class _TokenSlots:
    """What the cache views share: one slot (``q_slots``) and position (``q_pos``) per token of the forward; the engine
    owns the sequence lengths, so ``advance`` is a no-op."""

    q_slots: torch.Tensor
    q_pos: torch.Tensor
    seq_len = 0  # unused by the paged path; kept for code that reads it

    @property
    def num_tokens(self) -> int:
        return self.q_slots.numel()

    def advance(self, n: int) -> None:
        return None


class _PackedTokens(_TokenSlots):
    """A view whose forward runs all its tokens as one packed row ``[1, N, D]``."""

    _what = "packed batch"

    def positions(self, T: int, device: torch.device | str) -> torch.Tensor:
        if T != self.num_tokens:
            raise ValueError(f"{self._what} holds {self.num_tokens} tokens, the forward has {T}")
        return self.q_pos.to(device)


class PackedBatch(_PackedTokens):
    """Cache view of one packed forward (see the module docstring). ``advance`` is a no-op: the engine owns lengths."""

    def __init__(self, cache: PagedLatentCache, q_slots: torch.Tensor, q_pos: torch.Tensor, q_seq: torch.Tensor,
                 k_slots: torch.Tensor, k_pos: torch.Tensor, k_seq: torch.Tensor) -> None:
        self.cache = cache
        self.q_slots, self.q_pos, self.k_slots = q_slots, q_pos, k_slots
        self.masked = (k_seq[None, :] != q_seq[:, None]) | (k_pos[None, :] > q_pos[:, None])  # [N, S]

    def gather(self, layer: int, kv_BTC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if kv_BTC.shape[0] != 1 or kv_BTC.shape[1] != self.num_tokens:
            raise ValueError(f"packed batch expects [1, {self.num_tokens}, C+R], got {tuple(kv_BTC.shape)}")
        buf = self.cache.buf[layer]
        buf.index_copy_(0, self.q_slots, kv_BTC[0].to(buf.dtype))
        return buf.index_select(0, self.k_slots)[None], self.masked


class DecodeBatch(_TokenSlots):
    """Cache view of one forward in the row-per-token layout ``x [N, 1, D]`` (see the module docstring).

    ``q_slots [N]`` / ``q_pos [N]``: slot and position of every token; ``k_slots_NS [N, S]``: the slots of the keys
    row i attends to (its own sequence, positions ``0..S-1``, padded); ``masked_N1S [N, 1, S]`` or None.
    ``advance`` is a no-op: the engine owns lengths."""

    def __init__(self, cache: PagedLatentCache, q_slots: torch.Tensor, q_pos: torch.Tensor, k_slots_NS: torch.Tensor,
                 masked_N1S: torch.Tensor | None) -> None:
        self.cache = cache
        self.q_slots, self.q_pos = q_slots, q_pos
        self.k_slots_NS = k_slots_NS
        self._k_flat = k_slots_NS.reshape(-1)
        self.masked = masked_N1S

    def positions(self, T: int, device: torch.device | str) -> torch.Tensor:
        """``[N, 1]``: one position per batch row (the forward's T must be 1)."""
        if T != 1:
            raise ValueError(f"a decode batch runs one token per row ([N, 1, D]), the forward has T={T}")
        return self.q_pos.to(device)[:, None]

    def gather(self, layer: int, kv_BTC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Write ``kv [N, 1, C+R]`` into the token slots; return keys ``[N, S, C+R]`` and the mask ``[N, 1, S]``."""
        N, S = self.k_slots_NS.shape
        if kv_BTC.shape[0] != N or kv_BTC.shape[1] != 1:
            raise ValueError(f"decode batch expects [{N}, 1, C+R], got {tuple(kv_BTC.shape)}")
        buf = self._write(layer, kv_BTC)
        return buf.index_select(0, self._k_flat).view(N, S, buf.shape[-1]), self.masked

    def _write(self, layer: int, kv_BTC: torch.Tensor) -> torch.Tensor:
        """Write every row's latent ``kv [N, 1, C+R]`` into its token slot; returns the layer's cache rows."""
        buf = self.cache.buf[layer]
        buf.index_copy_(0, self.q_slots, kv_BTC[:, 0].to(buf.dtype))
        return buf

    def native_view(self, layer: int) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """For a native decode layer (:func:`raymoe.model.cpu_kernels.mla_decode_layer`): ``(the layer's cache rows,
        every row's token slot [N], its key slots [N, S], its key count [N])``; None when the cache's CPU kernels are
        off or its dtype is not fp32."""
        buf = self.cache.buf[layer]
        if not self.cache.cpu_kernels or buf.dtype != torch.float32:
            return None
        return buf, self.q_slots, self.k_slots_NS, self.q_pos + 1

    def attend_absorbed(self, layer: int, kv_BTC: torch.Tensor, q_nope: torch.Tensor, q_pe: torch.Tensor,
                        w_uk_t: torch.Tensor, w_uv: torch.Tensor, scale: float) -> Optional[torch.Tensor]:
        """The absorbed attention of every row in native calls (``cache.cpu_kernels``): write ``kv [N, 1, C+R]`` into
        the token slots, then attend ``q_nope [N, 1, H, Dn]`` / ``q_pe [N, 1, H, R]`` (through ``w_uk_t [H, C, Dn]``
        and ``w_uv [H, V, C]``) to each row's own keys ``0..q_pos`` where they lie in the cache
        (:func:`raymoe.model.cpu_kernels.mla_decode_absorbed`) → ``[N, 1, H, V]``. None (nothing written) when the
        kernels are off or do not fit: the caller gathers instead."""
        nv = self.native_view(layer)
        N = self.k_slots_NS.shape[0]
        if nv is None or kv_BTC.shape[:2] != (N, 1) or q_nope.shape[:2] != (N, 1):
            return None
        from raymoe.model import cpu_kernels

        buf, _, slots, lens = nv
        self._write(layer, kv_BTC)
        out = cpu_kernels.mla_decode_absorbed(q_nope[:, 0], q_pe[:, 0], w_uk_t, w_uv, buf, slots, lens, scale)
        return None if out is None else out[:, None]


class PrefillGroup(NamedTuple):
    """Long segments of one shape, served by one attention call ``[B, H, n, end]``: their queries are the packed rows
    ``rows`` (``B·n`` of them, segment by segment: a slice when adjacent, else an index tensor), at positions
    ``start..start+n-1`` each; their keys are rows ``k0..k0+B·end-1`` of :meth:`PrefillBatch.gather_expanded`'s
    output (segment by segment, positions ``0..end-1``). ``mask [n, end]`` (True = attend) when ``start > 0``, else
    None (plain causal)."""

    rows: slice | torch.Tensor
    B: int
    n: int
    start: int
    k0: int
    end: int
    mask: Optional[torch.Tensor]


class PrefillBatch(_PackedTokens):
    """Cache view of one forward with prefill chunks, packed as ``x [1, N, D]`` (see the module docstring).

    ``groups``: the long (expanded) segments as :class:`PrefillGroup` s (one attention call each; :attr:`segments`
    lists them one by one). ``short`` (a :class:`DecodeBatch` or None) serves the packed rows ``short_rows`` through
    the absorbed path. ``advance`` is a no-op: the engine owns lengths."""

    expanded = True  # MLA takes its paged-prefill path for this view
    _what = "prefill batch"

    def __init__(self, cache: PagedLatentCache, q_slots: torch.Tensor, q_pos: torch.Tensor, k_slots: torch.Tensor,
                 groups: list[PrefillGroup], short: Optional[DecodeBatch], short_rows: torch.Tensor) -> None:
        self.cache = cache
        self.q_slots, self.q_pos, self.k_slots = q_slots, q_pos, k_slots
        self.groups, self.short, self.short_rows = groups, short, short_rows

    @property
    def segments(self) -> list[tuple[int, int, int, int, int]]:
        """``(q0, n, start, k0, end)`` per long segment, in key order: its queries are packed rows ``q0..q0+n-1`` at
        positions ``start..start+n-1``, its keys rows ``k0..k0+end-1`` of :meth:`gather_expanded`'s output
        (positions ``0..end-1``)."""
        out = []
        for g in self.groups:
            rows = range(g.rows.start, g.rows.stop) if isinstance(g.rows, slice) else g.rows.tolist()
            out += [(rows[b * g.n], g.n, g.start, g.k0 + b * g.end, g.end) for b in range(g.B)]
        return out

    def gather_expanded(self, layer: int, kv_BTC: torch.Tensor) -> torch.Tensor:
        """Write every token's latent ``kv [1, N, C+R]`` into its slot; return the long segments' keys
        ``[Σ end_j, C+R]`` (each segment's positions ``0..end_j-1``, concatenated in segment order)."""
        if kv_BTC.shape[0] != 1 or kv_BTC.shape[1] != self.num_tokens:
            raise ValueError(f"prefill batch expects [1, {self.num_tokens}, C+R], got {tuple(kv_BTC.shape)}")
        buf = self.cache.buf[layer]
        buf.index_copy_(0, self.q_slots, kv_BTC[0].to(buf.dtype))
        return buf.index_select(0, self.k_slots)
