"""Multi-head Latent Attention (DeepSeek-V2/V3 §2.1.1; docs/model.md §2).

Shapes: B batch, T query tokens, S key tokens, H heads, C = kv_lora_rank (latent), R = qk_rope_head_dim,
N = qk_nope_head_dim, V = v_head_dim.

* KV path: ``kv_a_proj_with_mqa(h) → [c_kv (C) ; k_pe (R)]``; ``kv_a_layernorm`` applies to c_kv only; k_pe is rotated
  and shared by all heads; ``kv_b_proj(c_kv) → per head [k_nope (N) ; v (V)]``.
* Q path: ``q_b_proj(q_a_layernorm(q_a_proj(h)))`` (or ``q_proj(h)`` when ``q_lora_rank`` is None, V2-Lite style) →
  per head ``[q_nope (N) ; q_pe (R)]``; q_pe is rotated.
* scores = (q_nope·k_nope + q_pe·k_pe) · softmax_scale, softmax_scale = (N+R)^-1/2 · mscale² (YaRN).

Two mathematically identical paths:

1. **naive** (training): materialise per-head K ``[B,H,S,N+R]`` and V ``[B,H,S,V]`` and run fused SDPA (causal).
2. **absorbed** (inference, used whenever a :class:`LatentKVCache` is passed): fold W^UK into the query
   (q̃ = q_nope·W^UK_h, C dims) and W^UV after the attention-weighted sum, so attention runs as MQA over one
   (C+R)-dim head: the cache holds exactly ``C + R`` values per token per layer (576 for V3; 71× less than full K/V).
   The cache decides which keys each query sees (``cache.gather`` → keys + mask), so the same code serves a dense
   :class:`LatentKVCache` and the serving engine's paged cache over a packed multi-sequence batch.

The serving engine's prefill steps (a cache view with ``expanded = True``, :class:`raymoe.engine.paged.PrefillBatch`)
mix the two, as DeepSeek's inference does: prompt chunks attend through the **expanded** keys and values of their
sequence's cached latents (``kv_b_proj`` over ``[end, C]`` keys, then a causal SDPA per sequence, one call for all
the sequences of one chunk shape: for a chunk of n queries over S keys that is ``n·S·H·(N+R+V)`` multiply-adds in a
fused kernel, against ``n·S·H·(2C+R)`` through fp32 score tensors absorbed, plus the up-projection
``S·C·H·(N+V)``, which a long chunk amortises), while the step's decode tokens stay absorbed (one query would pay
the whole up-projection). The cache holds the same latents either way.

Failure isolation. In the absorbed path a row's masked keys can be other sequences' latents (packed view) or padding
and stale slots (row view); a non-finite one must not reach that row (:func:`_isolate_non_finite`). The expanded
path reads only the sequence's own keys.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.config import ModelConfig
from raymoe.model.cache import LatentKVCache
from raymoe.model.layers import (RMSNorm, autocast_apply, derived_weight, fused_linear, native_group_packed,
                                 native_packed)
from raymoe.model.rope import apply_rope

__all__ = ["MLA", "causal_attention", "ATTN_IMPLS"]

ATTN_IMPLS = ("chunked", "sdpa", "sdpa_pad_v")
ATTN_CHUNK = 128  # query rows per block of the chunked causal attention


class _CausalAttentionFn(torch.autograd.Function):
    """Causal softmax attention over ``[BH, T, d]`` in query blocks of ``ATTN_CHUNK`` rows.

    Block ``[r0, r1)`` only multiplies against keys ``[0, r1)`` (the fully masked upper-right blocks are skipped) and
    masks its own diagonal block with an additive −inf bias fused into the score GEMM (``baddbmm``). The softmax
    probabilities of each block are saved (as the math SDPA path does); backward uses the standard formulas
    dV = Pᵀ·dO, dS = P ⊙ (dO·Vᵀ − rowsum), dQ = s·dS·K, dK = s·dSᵀ·Q, accumulating dK/dV of earlier keys in place.
    """

    @staticmethod
    def forward(ctx, q, k, v, scale, chunk):  # type: ignore[override]
        BH, T, _ = q.shape
        bounds = [(r0, min(r0 + chunk, T)) for r0 in range(0, T, chunk)]
        o = q.new_empty(BH, T, v.shape[-1])
        probs = []
        for r0, r1 in bounds:
            bias = torch.full((r1 - r0, r1), float("-inf"), dtype=q.dtype, device=q.device).triu_(r0 + 1)
            s = torch.baddbmm(bias.expand(BH, -1, -1), q[:, r0:r1], k[:, :r1].transpose(1, 2), alpha=scale)
            # softmax statistics in fp32 whatever the input dtype (as SDPA's CPU/flash kernels do), stored in q's dtype
            p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) if q.dtype != torch.float32 else \
                torch.softmax(s, dim=-1)
            torch.bmm(p, v[:, :r1], out=o[:, r0:r1])
            probs.append(p)
        ctx.save_for_backward(q, k, v, *probs)
        ctx.scale, ctx.bounds = scale, bounds
        return o

    @staticmethod
    def backward(ctx, do):  # type: ignore[override]
        q, k, v, *probs = ctx.saved_tensors
        do = do.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for j, ((r0, r1), p) in enumerate(reversed(list(zip(ctx.bounds, probs)))):
            do_i = do[:, r0:r1]
            if j == 0:  # the last block spans every key: it initialises dK and dV
                torch.bmm(p.transpose(1, 2), do_i, out=dv)
            else:
                dv[:, :r1].baddbmm_(p.transpose(1, 2), do_i)
            ds = torch._softmax_backward_data(torch.bmm(do_i, v[:, :r1].transpose(1, 2)), p, -1, p.dtype)
            torch.bmm(ds, k[:, :r1], out=dq[:, r0:r1])
            if j == 0:
                torch.bmm(ds.transpose(1, 2), q[:, r0:r1], out=dk)
            else:
                dk[:, :r1].baddbmm_(ds.transpose(1, 2), q[:, r0:r1])
        return dq.mul_(ctx.scale), dk.mul_(ctx.scale), dv, None, None


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     chunk: int = ATTN_CHUNK) -> torch.Tensor:
    """Causal attention of contiguous ``q, k [BH, T, d_qk]`` and ``v [BH, T, d_v]`` → ``[BH, T, d_v]``."""
    return autocast_apply(_CausalAttentionFn, q, k, v, scale, chunk)


def _isolate_non_finite(scores: torch.Tensor, kv_all: torch.Tensor,
                        c_all: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep a non-finite key out of every row that does not see it (the absorbed path with a mask).

    The masked keys of a row are other sequences' latents (packed view), padding or stale slots (row view). The
    mask *replaces* their scores (``masked_fill``, so a NaN score becomes −inf and gets probability 0), but the value
    product ``p · c`` still computes ``0 · NaN = NaN`` for every row: one sequence's NaN latent would end all the
    requests of the step. So the values of non-finite keys become 0 (masked rows: ``0 · 0``, exactly what a finite
    latent contributes there, so their outputs do not change at all), and their scores become NaN before the mask is
    applied: a row that does see such a key gets a NaN probability row, hence a non-finite output, as without this
    function (its request then fails through the engine's per-row ``isfinite`` check). Called only when the caller's
    one-pass check fires: ``isfinite(x.sum())`` of the latents or of the raw scores, whichever is smaller (any NaN/inf
    latent makes the sum of both non-finite; a NaN query only sends a step here for nothing: the result is the same).

    Args: ``scores [B,T,H,S]`` fp32 (before the mask), ``kv_all [B,S,C+R]``, ``c_all [B,S,C]`` (a view of it).
    Returns: the scores and the value latents to use."""
    bad_BS = ~torch.isfinite(kv_all).all(dim=-1)
    return scores.masked_fill(bad_BS[:, None, None, :], float("nan")), c_all.masked_fill(bad_BS[..., None], 0.0)


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.num_attention_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.nope_dim = cfg.qk_nope_head_dim
        self.rope_dim = cfg.qk_rope_head_dim
        self.qk_head_dim = cfg.qk_head_dim
        self.v_head_dim = cfg.v_head_dim
        self.softmax_scale = cfg.softmax_scale
        D, H = cfg.hidden_size, cfg.num_attention_heads
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (self.nope_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_head_dim, D, bias=False)
        self.attn_impl: Optional[str] = None  # one of ATTN_IMPLS (naive path only); None: chunked on CPU, sdpa else
        self.recompute_up_proj = False  # train.recompute=selective (raymoe.model.recompute)
        self.native = False  # serving on CPU: decode rows' RoPE through raymoe.model.cpu_kernels.rope (the engine)

    # ------------------------------------------------------------------ parts
    def _queries(self, q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``q`` is the output of ``q_proj`` or ``q_a_proj`` (which take the same input as ``kv_a_proj_with_mqa``)."""
        B, T, _ = q.shape
        if self.q_lora_rank is not None:
            q = self.q_b_proj(self.q_a_layernorm(q))
        q = q.view(B, T, self.n_heads, self.qk_head_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, self._rope(q_pe, cos, sin)  # [B,T,H,N], [B,T,H,R]

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.native and not torch.is_grad_enabled():  # one kernel call for a decode batch's rows
            from raymoe.model import cpu_kernels

            y = cpu_kernels.rope(x, cos, sin)
            if y is not None:
                return y
        return apply_rope(x, cos, sin)

    def _latent(self, kv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``kv`` is the output of ``kv_a_proj_with_mqa``: the latent ``c_kv`` and the shared RoPE key."""
        c_kv, k_pe = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)  # [B,T,C]
        k_pe = self._rope(k_pe.unsqueeze(2), cos, sin).squeeze(2)  # [B,T,R]
        return c_kv, k_pe

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x_BTD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: Optional[LatentKVCache] = None,
    ) -> torch.Tensor:
        """``x_BTD → [B, T, hidden]``. ``cos``/``sin`` ``[T, R/2]`` are for the absolute positions of the T tokens."""
        if self.native and cache is not None and not torch.is_grad_enabled():
            y = self._decode_native(x_BTD, cos, sin, cache)
            if y is not None:
                return y
        q_in = self.q_proj if self.q_lora_rank is None else self.q_a_proj
        q, kv = fused_linear(x_BTD, q_in, self.kv_a_proj_with_mqa)  # both read x: one GEMM
        if cache is None and self.recompute_up_proj and torch.is_grad_enabled():
            return self.o_proj(self._naive_recomputed(q, kv, cos, sin).flatten(2))
        q_nope, q_pe = self._queries(q, cos, sin)
        c_kv, k_pe = self._latent(kv, cos, sin)
        if cache is None:
            out = self._naive(q_nope, q_pe, c_kv, k_pe)
        elif getattr(cache, "expanded", False):
            out = self._paged_prefill(q_nope, q_pe, c_kv, k_pe, cache)
        else:
            out = self._absorbed(q_nope, q_pe, c_kv, k_pe, cache)
        return self.o_proj(out.flatten(2))

    def _decode_native(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache) -> Optional[torch.Tensor]:
        """The whole layer in one :func:`raymoe.model.cpu_kernels.mla_decode_layer` call when ``cache`` is a decode
        view with the CPU kernels on (``cache.native_view``), one token per row, at most ``row_limit`` rows, and the
        projections are plain linears with packed serving copies (:func:`raymoe.model.layers.native_packed`): the ops of :meth:`forward` and
        :meth:`_absorbed` (the ``attend_absorbed`` path) without a torch op between them. None otherwise."""
        from raymoe.model import cpu_kernels

        view = getattr(cache, "native_view", None)
        B, T, D = x_BTD.shape
        if view is None or self.q_lora_rank is None or T != 1 or B > cpu_kernels.row_limit():
            return None
        nv = view(self.layer_idx)
        if nv is None:
            return None
        qkv, q_b, o = native_group_packed(self.q_a_proj, self.kv_a_proj_with_mqa), native_packed(self.q_b_proj), \
            native_packed(self.o_proj)
        if qkv is None or q_b is None or o is None:
            return None
        H, C = self.n_heads, self.kv_lora_rank
        w = self.kv_b_proj.weight.view(H, self.nope_dim + self.v_head_dim, C)
        buf, write_slots, slots, lens = nv
        y = cpu_kernels.mla_decode_layer(
            x_BTD.reshape(B, D), qkv, (self.q_a_layernorm.weight, self.q_a_layernorm.eps),
            (self.kv_a_layernorm.weight, self.kv_a_layernorm.eps), q_b, H, self.rope_dim, cos, sin, buf, write_slots,
            slots, lens, self.softmax_scale, self._w_uk_t(w[:, : self.nope_dim]), w[:, self.nope_dim :], o)
        return None if y is None else y.view(B, 1, -1)

    def _naive(self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
        impl = self._impl(q_nope)
        q, k, v = self._heads(impl, q_nope, q_pe, self.kv_b_proj(c_kv), k_pe)
        return self._attend(impl, q, k, v)

    def _naive_recomputed(self, q: torch.Tensor, kv: torch.Tensor, cos: torch.Tensor,
                          sin: torch.Tensor) -> torch.Tensor:
        """The naive path with the up-projections recomputed in backward (``train.recompute=selective``): the
        attention's per-head q/k/v and the normalized latents are rebuilt from ``q`` / ``kv`` (the down-projection
        outputs, which the latent norms keep anyway) by the very ops of :meth:`_queries`, :meth:`_latent` and
        :meth:`_naive`, so values and gradients are unchanged."""
        from raymoe.model.recompute import SavedAsRecipe, norm_then

        impl = self._impl(q)

        def heads() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            B, T, _ = q.shape
            qh = q if self.q_lora_rank is None else norm_then(self.q_a_layernorm, q, self.q_b_proj)
            q_nope, q_pe = qh.view(B, T, self.n_heads, self.qk_head_dim).split([self.nope_dim, self.rope_dim], dim=-1)
            c_kv, k_pe = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
            k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin).squeeze(2)
            kv_up = norm_then(self.kv_a_layernorm, c_kv, self.kv_b_proj)
            return self._heads(impl, q_nope, apply_rope(q_pe, cos, sin), kv_up, k_pe)

        qkv = heads()
        with SavedAsRecipe(qkv, heads):
            return self._attend(impl, *qkv)

    def _impl(self, x: torch.Tensor) -> str:
        return self.attn_impl or ("chunked" if x.device.type == "cpu" else "sdpa")

    def _heads(self, impl: str, q_nope: torch.Tensor, q_pe: torch.Tensor, kv_up: torch.Tensor,
               k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head attention inputs from queries ``[B,T,H,N]``/``[B,T,H,R]``, the up-projected latent
        ``kv_up [B,T,H·(N+V)]`` and the shared RoPE key ``[B,T,R]``, in ``impl``'s layout: ``[BH,T,·]`` (chunked)
        or ``[B,H,T,·]`` (SDPA, V padded to N+R for ``sdpa_pad_v``)."""
        B, T, H, _ = q_nope.shape
        kv = kv_up.view(B, T, H, self.nope_dim + self.v_head_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_head_dim], dim=-1)
        k_pe = k_pe[:, :, None, :].expand(B, T, H, self.rope_dim)
        if impl == "chunked":
            q = torch.cat([q_nope.transpose(1, 2), q_pe.transpose(1, 2)], dim=-1).reshape(B * H, T, self.qk_head_dim)
            k = torch.cat([k_nope.transpose(1, 2), k_pe.transpose(1, 2)], dim=-1).reshape(B * H, T, self.qk_head_dim)
            return q, k, v.transpose(1, 2).reshape(B * H, T, self.v_head_dim)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # [B,H,T,N+R]
        k = torch.cat([k_nope, k_pe], dim=-1).transpose(1, 2)
        v = v.transpose(1, 2)  # [B,H,T,V]
        pad = self.qk_head_dim - self.v_head_dim
        if impl == "sdpa_pad_v" and pad > 0:  # equal head dims let SDPA pick its flash CPU kernel
            v = F.pad(v, (0, pad))
        return q, k, v

    def _attend(self, impl: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of :meth:`_heads`' tensors → ``[B,T,H,V]``."""
        if impl == "chunked":
            BH, T, _ = q.shape
            o = causal_attention(q, k, v, self.softmax_scale)
            return o.view(BH // self.n_heads, self.n_heads, T, self.v_head_dim).transpose(1, 2)  # [B,T,H,V]
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        return o[..., : self.v_head_dim].transpose(1, 2)  # [B,T,H,V]

    def _absorbed(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        c_kv: torch.Tensor,
        k_pe: torch.Tensor,
        cache: LatentKVCache,
    ) -> torch.Tensor:
        B, T, H, _ = q_nope.shape
        C = self.kv_lora_rank
        w = self.kv_b_proj.weight.view(H, self.nope_dim + self.v_head_dim, C)
        w_uk, w_uv = w[:, : self.nope_dim], w[:, self.nope_dim :]  # [H,N,C], [H,V,C]
        kv_new = torch.cat([c_kv, k_pe], dim=-1)
        attend = getattr(cache, "attend_absorbed", None)  # a view that attends in place (native CPU kernels)
        if attend is not None and not torch.is_grad_enabled():
            out = attend(self.layer_idx, kv_new, q_nope, q_pe, self._w_uk_t(w_uk), w_uv, self.softmax_scale)
            if out is not None:
                return out  # [B,T,H,V]
        # q̃ = [q_nope·W^UK ; q_pe] against the cached [c ; k_pe]: one score GEMM over C+R per batch row
        q_abs = torch.cat([torch.einsum("bthn,hnc->bthc", q_nope, w_uk), q_pe], dim=-1)  # [B,T,H,C+R]
        kv_all, masked = cache.gather(self.layer_idx, kv_new)  # [B, S, C+R], [(B,) T, S]
        c_all = kv_all[..., :C]  # [B, S, C] (a view)
        scores = torch.bmm(q_abs.view(B, T * H, -1), kv_all.transpose(1, 2)).view(B, T, H, -1)  # [B,T,H,S]
        scores = scores.float() * self.softmax_scale
        if masked is not None:  # future keys (and, in a packed batch, other sequences' keys)
            masked = masked if masked.dim() == 3 else masked[None]
            # a non-finite latent makes every score against it non-finite too: probe the smaller tensor (one pass)
            if not math.isfinite((scores if scores.numel() < kv_all.numel() else kv_all).sum().item()):
                scores, c_all = _isolate_non_finite(scores, kv_all, c_all)
            scores = scores.masked_fill(masked[:, :, None, :], float("-inf"))
        p = scores.softmax(dim=-1).to(c_all.dtype)
        o_lat = torch.bmm(p.view(B, T * H, -1), c_all).view(B, T, H, C)
        return torch.einsum("bthc,hvc->bthv", o_lat, w_uv)  # [B,T,H,V]

    def _w_uk_t(self, w_uk: torch.Tensor) -> torch.Tensor:
        """``W^UK`` as a contiguous ``[H, C, N]`` (the layout the native decode attention reads), kept while
        ``kv_b_proj``'s weight is unchanged (serving)."""
        wt = self.kv_b_proj.weight
        return derived_weight(self.__dict__, "_w_uk_t_cache", (wt.data_ptr(), wt._version),
                              lambda: w_uk.transpose(1, 2).contiguous())

    def _paged_prefill(self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
                       cache) -> torch.Tensor:
        """Packed ``[1, N, ...]`` inputs of a prefill step → ``[1, N, H, V]``: the view's long segments through the
        expanded keys/values (causal SDPA per sequence over its cached prefix + new tokens; one call per
        ``cache.groups`` entry, i.e. per set of segments of one shape ``(n, start, end)`` as ``[B, H, n, end]``), its
        short ones (``cache.short``, rows ``cache.short_rows``) absorbed.

        Grouping vs a call per segment: the outputs are the same (each batch entry is its own sequence's attention;
        no padding, so no key of another sequence or a stale slot enters a product). It saves per-call overhead, which
        pays for many short chunks only; long chunks keep a call each (``PREFILL_GROUP_ROWS`` in
        :mod:`raymoe.engine.paged`, measured in docs/serving.md §1.1)."""
        _, N, H, _ = q_nope.shape
        out = q_nope.new_empty(N, H, self.v_head_dim)
        keys = cache.gather_expanded(self.layer_idx, torch.cat([c_kv, k_pe], dim=-1))  # [ΣS, C+R]
        if cache.groups:
            c_all, pe_all = keys.split([self.kv_lora_rank, self.rope_dim], dim=-1)
            kv_up = self.kv_b_proj(c_all).view(-1, H, self.nope_dim + self.v_head_dim)  # [ΣS, H, N+V]
            k_nope, v = kv_up.split([self.nope_dim, self.v_head_dim], dim=-1)
            pad = self.qk_head_dim - self.v_head_dim
            if pad > 0 and v.device.type == "cpu":  # equal head dims let SDPA take its fused (flash) CPU kernel
                v = F.pad(v, (0, pad))
            k = torch.cat([k_nope, pe_all[:, None].expand(-1, H, self.rope_dim)], dim=-1)  # [ΣS, H, N+R]
            q = torch.cat([q_nope[0], q_pe[0]], dim=-1)  # [N, H, N+R]
            for g in cache.groups:
                kr = slice(g.k0, g.k0 + g.B * g.end)
                o = F.scaled_dot_product_attention(
                    q[g.rows].view(g.B, g.n, H, -1).transpose(1, 2),  # [B, H, n, N+R]
                    k[kr].view(g.B, g.end, H, -1).transpose(1, 2), v[kr].view(g.B, g.end, H, -1).transpose(1, 2),
                    attn_mask=g.mask, is_causal=g.mask is None, scale=self.softmax_scale)  # [B, H, n, ·]
                out[g.rows] = o[..., : self.v_head_dim].transpose(1, 2).reshape(g.B * g.n, H, self.v_head_dim)
        if cache.short is not None:
            r = cache.short_rows
            out[r] = self._absorbed(q_nope[0, r, None], q_pe[0, r, None], c_kv[0, r, None], k_pe[0, r, None],
                                    cache.short)[:, 0]
        return out[None]
