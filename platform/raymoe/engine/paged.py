"""Paged latent KV cache: fixed-size blocks of MLA latents, a block table per sequence, packed-batch views.

Block layout. One buffer per engine::

    buf [L_total, num_blocks * block_size, C + R]      (logically [L_total, num_blocks, block_size, C + R])

``L_total = num_hidden_layers + D_mtp`` (the MTP draft blocks get their own layers, index ``N + depth - 1`` — the
``layer_idx`` of their MLA), ``C = kv_lora_rank`` (the normalised latent c_kv) and ``R = qk_rope_head_dim`` (the
post-RoPE shared key k_pe), exactly the per-token layout of :class:`raymoe.model.cache.LatentKVCache`. Token
position ``p`` of a sequence with block table ``bt`` lives in slot ``bt[p // block_size] * block_size +
p % block_size`` of every layer. Blocks are handed out by :class:`BlockAllocator` (a free list; a sequence owns
``ceil(tokens / block_size)`` blocks, all freed when it finishes or is preempted).

Packed batches. One engine step runs every scheduled token of every sequence as ONE row ``[1, N]`` (no padding, so
the MoE layers see only real tokens). :class:`PackedBatch` is the cache object the model sees for that forward: it
implements the two methods the absorbed MLA path calls (see :mod:`raymoe.model.cache`):

* ``positions(N)`` → ``[N]`` absolute position of every packed token (RoPE);
* ``gather(layer, kv [1, N, C+R])`` → writes the new latents into their slots, then returns the keys of all the
  step's sequences concatenated, ``[1, S, C+R]`` with ``S = Σ_j (start_j + n_j)``, and the mask ``[N, S]``
  (True = masked): a query sees only keys of its own sequence at positions ≤ its own (block-diagonal causal).

Attention over the concatenated keys costs ``O(N·S)`` instead of ``O(Σ n_j·(start_j+n_j))``; a fused paged-attention
kernel would remove that, the math (and the cache layout) would not change.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["BlockAllocator", "NoFreeBlocks", "PagedLatentCache", "PackedBatch"]


class NoFreeBlocks(RuntimeError):
    pass


class BlockAllocator:
    """Free list of block ids; the lowest free ids are handed out first (deterministic layouts)."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise NoFreeBlocks(f"need {n} blocks, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: Sequence[int]) -> None:
        self._free.extend(reversed(list(blocks)))


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

    def batch(self, segments: Sequence[tuple[Sequence[int], int, int]]) -> "PackedBatch":
        """A view for one packed forward. ``segments[j] = (block_table, start, n)``: sequence j contributes n new
        tokens at positions ``start..start+n-1`` and attends to its positions ``0..start+n-1``."""
        q_slots, q_pos, q_seq, k_slots, k_pos, k_seq = [], [], [], [], [], []
        for j, (bt, start, n) in enumerate(segments):
            end = start + n
            if self.blocks_for(end) > len(bt):
                raise ValueError(f"segment {j}: positions up to {end} need {self.blocks_for(end)} blocks, has {len(bt)}")
            all_slots = self.slots(bt, 0, end)
            q_slots.append(all_slots[start:])
            q_pos.append(torch.arange(start, end))
            q_seq.append(torch.full((n,), j))
            k_slots.append(all_slots)
            k_pos.append(torch.arange(end))
            k_seq.append(torch.full((end,), j))
        dev = self.buf.device
        cat = lambda xs: torch.cat(xs).to(dev)  # noqa: E731
        return PackedBatch(self, cat(q_slots), cat(q_pos), cat(q_seq), cat(k_slots), cat(k_pos), cat(k_seq))


class PackedBatch:
    """Cache view of one packed forward (see the module docstring). ``advance`` is a no-op: the engine owns lengths."""

    def __init__(self, cache: PagedLatentCache, q_slots: torch.Tensor, q_pos: torch.Tensor, q_seq: torch.Tensor,
                 k_slots: torch.Tensor, k_pos: torch.Tensor, k_seq: torch.Tensor) -> None:
        self.cache = cache
        self.q_slots, self.q_pos, self.k_slots = q_slots, q_pos, k_slots
        self.masked = (k_seq[None, :] != q_seq[:, None]) | (k_pos[None, :] > q_pos[:, None])  # [N, S]
        self.seq_len = 0  # unused by the paged path; kept for code that reads it

    @property
    def num_tokens(self) -> int:
        return self.q_slots.numel()

    def positions(self, T: int, device: torch.device | str) -> torch.Tensor:
        if T != self.num_tokens:
            raise ValueError(f"packed batch holds {self.num_tokens} tokens, the forward has {T}")
        return self.q_pos.to(device)

    def gather(self, layer: int, kv_BTC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if kv_BTC.shape[0] != 1 or kv_BTC.shape[1] != self.num_tokens:
            raise ValueError(f"packed batch expects [1, {self.num_tokens}, C+R], got {tuple(kv_BTC.shape)}")
        buf = self.cache.buf[layer]
        buf.index_copy_(0, self.q_slots, kv_BTC[0].to(buf.dtype))
        return buf.index_select(0, self.k_slots)[None], self.masked

    def advance(self, n: int) -> None:
        return None
