"""Decoupled RoPE with YaRN for MLA (DeepSeek-V3 report §2.1.1, docs/model.md §3).

Only the ``qk_rope_head_dim`` slice of queries and the single shared RoPE key are rotated. The checkpoint layout
rotates **interleaved pairs** ``(x[2i], x[2i+1])`` by angle ``pos·θ_i``. We compute that rotation on the even/odd
slices and write the result *de-interleaved* (``[rotated evens ; rotated odds]``): the same permutation is applied to
queries and keys, so every dot product — and therefore attention — is unchanged, and no interleaving copy is needed.
The latent KV cache stores post-RoPE keys in this de-interleaved layout.

YaRN (``rope_scaling.type == "yarn"``) changes two things:
  * frequencies: θ_i' = θ_i·(1 − ramp_i) + (θ_i / s)·ramp_i with ramp_i = clamp((i − low)/(high − low), 0, 1),
    low = floor(corr(beta_fast)), high = ceil(corr(beta_slow)), corr(r) = d·ln(L_orig/(2πr)) / (2 ln base);
    for V3 pairs 0–10 keep θ, 23–31 use θ/40, 11–22 interpolate (ratios 0.925 … 0.025);
  * the softmax scale gains mscale² (``ModelConfig.softmax_scale``); cos/sin are multiplied by
    ``attention_factor = mscale(s, mscale)/mscale(s, mscale_all_dim)`` (1.0 for V3).
Like HF, we apply YaRN whenever it is configured (the post-extension model always uses YaRN frequencies).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from raymoe.config import ModelConfig

__all__ = ["yarn_inv_freq", "RotaryEmbedding", "apply_rope"]


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[qk_rope_head_dim/2]`` (fp32) and the cos/sin attention factor."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq = 1.0 / pos_freqs
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq, 1.0

    def corr_dim(num_rotations: float) -> float:
        return dim * math.log(rs.original_max_position_embeddings / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(corr_dim(rs.beta_fast)), 0)
    high = min(math.ceil(corr_dim(rs.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    inv_freq = inv_freq * (1 - ramp) + (inv_freq / rs.factor) * ramp
    if rs.mscale and rs.mscale_all_dim:
        attn_factor = _yarn_mscale(rs.factor, rs.mscale) / _yarn_mscale(rs.factor, rs.mscale_all_dim)
    else:
        attn_factor = _yarn_mscale(rs.factor)
    return inv_freq, attn_factor


class RotaryEmbedding(nn.Module):
    """Produces ``(cos, sin)`` of shape ``[T, rope_dim/2]`` for integer positions ``[T]`` (fp32)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        inv_freq, self.attention_factor = yarn_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset_buffers(self, device: torch.device | str) -> None:
        """Recompute ``inv_freq`` on ``device`` (after a build on the meta device)."""
        self.inv_freq = yarn_inv_freq(self.cfg)[0].to(device)

    def forward(self, positions_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions_T.to(torch.float32)[:, None] * self.inv_freq.to(positions_T.device)[None, :]
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor


def apply_rope(x: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x [B, T, H, 2R]`` (any leading dims with T at dim -3); output de-interleaved."""
    cos = cos_TR[:, None, :].to(x.dtype)
    sin = sin_TR[:, None, :].to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
