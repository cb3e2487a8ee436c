"""The latent KV cache of absorbed MLA: ``kv_lora_rank + qk_rope_head_dim`` values per token per layer.

One contiguous buffer ``[layers, B, max_len, C + R]`` holding the normalised latent c_kv and the post-RoPE shared
key k_pe of every cached token. ``seq_len`` counts the tokens already cached; the model advances it once per forward
after all layers have written (each layer writes positions ``[seq_len, seq_len + T)``). The serving engine builds
paged variants on top of the same per-token layout.

The absorbed MLA path and the model only use two methods, so any object providing them can stand in for this class
(the engine's paged cache does, with a packed batch of many sequences at different positions):

* ``positions(T, device) -> [T]`` (or ``[B, T]``) absolute positions of the T new tokens (RoPE);
* ``gather(layer, kv_BTC) -> (kv_BSC, masked)``: store the new tokens' latents and return every key they may see
  ``[B, S, C+R]`` plus a boolean mask ``[T, S]`` or ``[B, T, S]`` (True = masked out) or None (nothing masked).
"""
from __future__ import annotations

import torch

__all__ = ["LatentKVCache"]


class LatentKVCache:
    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        max_len: int,
        kv_lora_rank: int,
        rope_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if min(num_layers, batch_size, max_len) <= 0:
            raise ValueError(f"LatentKVCache needs positive sizes, got layers={num_layers} B={batch_size} len={max_len}")
        self.values_per_token = kv_lora_rank + rope_dim
        self.buf = torch.zeros(num_layers, batch_size, max_len, self.values_per_token, dtype=dtype, device=device)
        self.seq_len = 0

    @property
    def max_len(self) -> int:
        return self.buf.shape[2]

    @property
    def batch_size(self) -> int:
        return self.buf.shape[1]

    def write(self, layer: int, start: int, kv_BTC: torch.Tensor) -> torch.Tensor:
        """Store ``kv_BTC [B, T, C+R]`` at positions ``start..start+T`` of ``layer``; return ``[B, start+T, C+R]``."""
        B, T, C = kv_BTC.shape
        if B != self.batch_size or C != self.values_per_token:
            raise ValueError(f"cache expects [B={self.batch_size}, T, {self.values_per_token}], got {tuple(kv_BTC.shape)}")
        if start + T > self.max_len:
            raise ValueError(f"cache overflow: {start}+{T} tokens > max_len={self.max_len}")
        self.buf[layer, :, start : start + T] = kv_BTC.to(self.buf.dtype)
        return self.buf[layer, :, : start + T]

    def positions(self, T: int, device: torch.device | str) -> torch.Tensor:
        """Absolute positions ``[T]`` of the next T tokens (the whole batch shares them)."""
        return torch.arange(self.seq_len, self.seq_len + T, device=device)

    def gather(self, layer: int, kv_BTC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Write ``kv_BTC`` at ``seq_len`` and return ``([B, seq_len+T, C+R], causal mask [T, S] or None)``."""
        start, T = self.seq_len, kv_BTC.shape[1]
        kv_all = self.write(layer, start, kv_BTC)
        if T == 1:
            return kv_all, None
        S = start + T
        q_pos = torch.arange(start, S, device=kv_BTC.device)
        return kv_all, torch.arange(S, device=kv_BTC.device)[None, :] > q_pos[:, None]

    def advance(self, n: int) -> None:
        self.seq_len += n

    def nbytes_per_token(self) -> int:
        return self.buf.shape[0] * self.values_per_token * self.buf.element_size()
