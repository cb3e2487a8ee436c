"""DeepSeekMoE: shared + fine-grained routed experts, sigmoid router with group-limited top-k (docs/model.md §4).

Routing for T tokens and E routed experts (``route``):
  1. ``scores_TE = sigmoid(x·Wᵀ)`` in fp32;
  2. biased scores ``s + b`` (b: fp32 buffer ``expert_bias`` — HF ``e_score_correction_bias`` — no gradient, used for
     the *choice* only);
  3. group score = sum of the top-2 biased scores of each of the ``n_group`` contiguous groups; keep ``topk_group``
     groups, mask the rest with −inf (a masked expert can never win, even when biased scores go negative);
  4. top-``num_experts_per_tok`` experts by biased score among the unmasked ones;
  5. gates from the **unbiased** scores of the chosen experts, normalised over the chosen ones (+1e-20), × route_scale.
  The router also returns per-expert token counts ``[E]`` (each token counts once per chosen expert, so
  ``counts.sum() == T·k``) for the bias balancer, which lives outside the model (:mod:`raymoe.balance`).

Routed experts are computed by grouping: the ``T·k`` (token, expert) pairs are sorted by expert (stable), the
tokens gathered into one contiguous ``[T·k, D]`` block whose rows are grouped by expert, the SwiGLU experts run as
grouped matmuls over that block, and the results are gathered back per token and weighted (no scatter). No token
is dropped (no capacity factor). In bf16/fp16 on CPU each expert's rows are zero-padded to a multiple of
``CPU_LOWP_ROW_BUCKET`` first (:func:`row_bucket`). Several grouped-matmul back-ends are kept, selectable per
layer; ``python -m raymoe.jobs.bench model`` measures them and ``grouped_mm`` (``torch._grouped_mm``) is the default:

* ``grouped_mm`` – ``torch._grouped_mm`` with expert offsets (one kernel per projection);
* ``padded``     – every expert's rows copied into an ``[E, max count]`` slab and one ``bmm`` per projection
  (CPU bmm runs 128-row bf16 expert GEMMs ~1.8× faster than grouped_mm, but pays for the padding);
* ``auto``       – ``padded`` while ``E·max(count) ≤ PADDED_MAX_WASTE·rows`` (balanced routing), else ``grouped_mm``;
* ``loop``       – one dense matmul per expert over its contiguous slice (a loop over experts, never tokens);
* ``bmm``        – the plain-autograd reference: pad to the largest count, one ``bmm``, autograd backward.

All but ``bmm`` share one hand-written backward (:class:`_SwiGLUExpertsFn`) that can defer the weight gradients.

Serving (no autograd) can hold each layer's gate and up weights in one ``[E, 2I, D]`` tensor
(:func:`fuse_gate_up`; ``gate_proj``/``up_proj`` become transposed views of it, no extra memory): every expert with
rows then runs ``W_gu[e]·xᵀ → silu(g)·u → @ W_down[e]``, two GEMMs instead of three, over touched experts only. At
decode a batch gives each expert a handful of rows; one CPU GEMM streaming the expert's 2·I rows of D values beats two
``x @ W`` products over ``[D, I]`` (``python -m raymoe.jobs.bench gemm_read`` times these ways next to a ``sum``).

Experts are separable from their layer: :class:`RoutedExperts` holds stacked weights ``[E, ...]`` and
``RoutedExperts.shard(ids)`` builds a shard with a subset of them; ``forward_grouped`` takes tokens already grouped
by expert plus the per-expert counts — exactly what an expert-shard actor receives after the all-to-all dispatch.

The sequence-wise balance loss (V3 eq. 17–20): per sequence, f_i = E/(k·T)·Σ_t 1[i chosen for t] (actual selected
experts), P_i = mean_t s'_{i,t} with s' the sigmoid scores normalised over **all** experts, L = α·Σ_i f_i·P_i,
averaged over sequences (equals α under perfect balance and uniform scores).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.config import ModelConfig
from raymoe.model.layers import SwiGLU, autocast_apply, derived_weight
from raymoe.wgrad import WeightGradStore, accumulate_grads

__all__ = ["RouteResult", "route", "Router", "RoutedExperts", "AbsentExperts", "MoE", "seq_aux_loss", "EXPERT_IMPLS",
           "set_expert_impl", "fuse_gate_up"]

EXPERT_IMPLS = ("auto", "grouped_mm", "padded", "loop", "bmm")
PADDED_MAX_WASTE = 1.3  # "auto": pad to one bmm while E·max(count) ≤ this × rows, else grouped_mm
DEFAULT_EXPERT_IMPL = "grouped_mm"
CPU_LOWP_ROW_BUCKET = 32  # see row_bucket()


@dataclass
class RouteResult:
    topk_idx: torch.Tensor  # [T, k] int64 expert ids
    topk_weight: torch.Tensor  # [T, k] fp32 gates (unbiased, normalised, × route_scale)
    scores: torch.Tensor  # [T, E] fp32 sigmoid scores (unbiased)
    counts: torch.Tensor  # [E] int64 tokens routed to each expert (no grad)


def route(
    logits_TE: torch.Tensor,
    bias_E: torch.Tensor,
    n_group: int,
    topk_group: int,
    top_k: int,
    routed_scaling_factor: float,
    norm_topk_prob: bool = True,
) -> RouteResult:
    """Group-limited, bias-steered top-k routing. ``logits_TE`` are the fp32 router logits x·Wᵀ."""
    T, E = logits_TE.shape
    scores = logits_TE.float().sigmoid()
    with torch.no_grad():
        biased = scores + bias_E.float()
        if n_group > 1 and topk_group < n_group:
            group_scores = biased.view(T, n_group, E // n_group).topk(2, dim=-1).values.sum(-1)  # [T, G]
            keep = group_scores.topk(topk_group, dim=-1, sorted=False).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            expert_mask = group_mask[:, :, None].expand(T, n_group, E // n_group).reshape(T, E)
            biased = biased.masked_fill(~expert_mask, float("-inf"))
        topk_idx = biased.topk(top_k, dim=-1, sorted=False).indices
        counts = torch.bincount(topk_idx.flatten(), minlength=E)
    w = scores.gather(1, topk_idx)
    if norm_topk_prob:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return RouteResult(topk_idx=topk_idx, topk_weight=w * routed_scaling_factor, scores=scores, counts=counts)


def seq_aux_loss(scores_BTE: torch.Tensor, topk_idx_BTK: torch.Tensor, alpha: float) -> torch.Tensor:
    """Sequence-wise balance loss α·Σ_i f_i·P_i averaged over the B sequences (gradient flows through P only)."""
    B, T, E = scores_BTE.shape
    K = topk_idx_BTK.shape[-1]
    with torch.no_grad():
        f = torch.zeros(B, E, device=scores_BTE.device, dtype=torch.float32)
        f.scatter_add_(1, topk_idx_BTK.reshape(B, T * K), torch.ones(B, T * K, device=f.device))
        f = f * (E / (K * T))
    s_norm = scores_BTE / scores_BTE.sum(dim=-1, keepdim=True)
    P = s_norm.mean(dim=1)  # [B, E]
    return alpha * (f * P).sum(dim=-1).mean()


class Router(nn.Module):
    """Gate weight ``[E, D]`` and the load-balancing bias buffer ``expert_bias [E]`` (fp32, no grad, checkpointed)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32), persistent=True)
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.top_k, self.route_scale, self.norm_topk_prob = (
            cfg.num_experts_per_tok,
            cfg.routed_scaling_factor,
            cfg.norm_topk_prob,
        )
        self.native = False  # serving: choose experts with raymoe.model.cpu_kernels.route (the engine sets it)

    def _apply(self, fn, recurse: bool = True):  # keep the bias fp32 through .to(bfloat16) / .half()
        super()._apply(fn, recurse)
        if self.expert_bias.dtype != torch.float32:
            self.expert_bias = self.expert_bias.float()
        return self

    def native_gate(self):
        """The gate weight packed for the CPU kernels (:func:`raymoe.model.cpu_kernels.pack`, fp32), kept while the
        weight is unchanged; None when it cannot be made."""
        from raymoe.model import cpu_kernels

        w = self.weight
        return derived_weight(self.__dict__, "_packed_gate", (w.data_ptr(), w._version),
                              lambda: cpu_kernels.pack(w.detach().float()))

    def forward(self, x_TD: torch.Tensor) -> RouteResult:
        native = self.native and not torch.is_grad_enabled()  # serving on CPU: gate product and selection natively
        logits = None
        if native:
            from raymoe.model import cpu_kernels

            pw = self.native_gate()
            logits = None if pw is None else cpu_kernels.linear_packed(x_TD.float(), pw)
        if logits is None:
            logits = F.linear(x_TD.float(), self.weight.float())
        if native:
            scores = logits.sigmoid()
            res = cpu_kernels.route(scores, self.expert_bias, self.n_group, self.topk_group, self.top_k,
                                    self.route_scale, self.norm_topk_prob)
            if res is not None:
                return RouteResult(topk_idx=res[0], topk_weight=res[1], scores=scores, counts=res[2])
        return route(logits, self.expert_bias, self.n_group, self.topk_group, self.top_k, self.route_scale,
                     self.norm_topk_prob)


def _mm_nn(x_NK: torch.Tensor, w_EKO: torch.Tensor, counts: list[int], offs: torch.Tensor, kernel: str,
           out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per expert ``x[rows of e] @ w[e]`` → ``[N, O]`` (rows grouped by expert)."""
    if kernel == "grouped_mm":
        return torch._grouped_mm(x_NK, w_EKO, offs=offs)
    if kernel == "padded":  # rows padded to the same count per expert: one bmm
        E = w_EKO.shape[0]
        return torch.bmm(x_NK.view(E, -1, x_NK.shape[1]), w_EKO).view(x_NK.shape[0], w_EKO.shape[-1])
    out = x_NK.new_empty(x_NK.shape[0], w_EKO.shape[-1]) if out is None else out
    for e, (xe, oe) in enumerate(zip(x_NK.split(counts), out.split(counts))):
        if xe.shape[0]:
            torch.mm(xe, w_EKO[e], out=oe)
    return out


def _mm_tn(a_NK: torch.Tensor, b_NO: torch.Tensor, counts: list[int], offs: torch.Tensor, kernel: str) -> torch.Tensor:
    """Per expert ``a[rows of e]ᵀ @ b[rows of e]`` → ``[E, K, O]`` (weight gradients; zero for idle experts)."""
    if kernel == "grouped_mm":
        return torch._grouped_mm(a_NK.t(), b_NO, offs=offs)
    if kernel == "padded":
        E = len(counts)
        return torch.bmm(a_NK.view(E, -1, a_NK.shape[1]).transpose(1, 2), b_NO.view(E, -1, b_NO.shape[1]))
    out = a_NK.new_empty(len(counts), a_NK.shape[1], b_NO.shape[1])
    for e, (ae, be) in enumerate(zip(a_NK.split(counts), b_NO.split(counts))):
        if ae.shape[0]:
            torch.mm(ae.t(), be, out=out[e])
        else:
            out[e].zero_()
    return out


def _padded_rows(counts_E: torch.Tensor, padded_E: torch.Tensor) -> torch.Tensor:
    """Destination of each expert-grouped row when expert ``e``'s group is padded from ``counts[e]`` to
    ``padded[e]`` rows: expert ``e``'s ``i``-th row → ``Σ_{j<e} padded[j] + i``."""
    E = counts_E.numel()
    starts = counts_E.cumsum(0) - counts_E
    pstarts = padded_E.cumsum(0) - padded_E
    row_expert = torch.repeat_interleave(torch.arange(E, device=counts_E.device), counts_E)
    return pstarts[row_expert] + torch.arange(row_expert.numel(), device=counts_E.device) - starts[row_expert]


def _slab_rows(counts_E: torch.Tensor, cmax: int) -> torch.Tensor:
    """Row of each expert-grouped token in an ``[E, cmax]`` slab (flattened): expert ``e``'s ``i``-th row → ``e·cmax+i``."""
    return _padded_rows(counts_E, torch.full_like(counts_E, cmax))


def row_bucket(x: torch.Tensor) -> int:
    """Rows per expert are rounded up to a multiple of this before the expert GEMMs (zero rows, results dropped).

    On CPU, bf16/fp16 matmuls go through oneDNN, which JIT-compiles a kernel ("primitive") per distinct shape and
    keeps a bounded cache of them. Per-expert row counts change every batch, so unbucketed expert GEMMs keep
    compiling: with real text (skewed, changing loads) this made the small model's bf16 step ~3× slower. Rounding
    to a multiple of ``CPU_LOWP_ROW_BUCKET`` bounds the distinct shapes at the price of < bucket zero rows per expert.
    fp32 CPU matmuls (MKL) and GPU kernels have no per-shape compilation, so they are not padded.
    """
    if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
        return CPU_LOWP_ROW_BUCKET
    return 1


class _SwiGLUExpertsFn(torch.autograd.Function):
    """Grouped SwiGLU experts ``down(silu(x·Wg) ⊙ x·Wu)`` with a hand-written backward.

    Saves ``x`` and the two pre-activations ``g, u`` (``silu`` is recomputed in backward). Input gradients are
    returned at once; the three weight gradients ``dW = xᵀ·dY`` per expert are computed either inline or, when a
    :class:`~raymoe.wgrad.WeightGradStore` is deferring weight grads (ZeroBubble ``Bi``/``W``), parked in it as one
    closure that adds them through autograd (:func:`~raymoe.wgrad.accumulate_grads`, so gradient hooks fire).
    """

    @staticmethod
    def forward(ctx, x_ND, w_gate, w_up, w_down, counts_E, kernel):  # type: ignore[override]
        ctx.rows = None
        bucket = row_bucket(x_ND)
        padded = None
        if kernel == "padded":  # move every expert's rows into a [E, max count] slab; padding rows stay zero
            cmax = int(counts_E.max()) if counts_E.numel() else 0
            padded = torch.full_like(counts_E, -(-cmax // bucket) * bucket)
        elif bucket > 1:  # every expert's group rounded up to a multiple of the bucket (see row_bucket)
            padded = (counts_E + (bucket - 1)) // bucket * bucket
        if padded is not None:
            rows = _padded_rows(counts_E, padded)
            x_ND = x_ND.new_zeros(int(padded.sum()), x_ND.shape[1]).index_copy_(0, rows, x_ND)
            counts_E, ctx.rows = padded, rows
        counts = counts_E.tolist()
        offs = counts_E.cumsum(0).to(torch.int32)
        g = _mm_nn(x_ND, w_gate, counts, offs, kernel)
        u = _mm_nn(x_ND, w_up, counts, offs, kernel)
        h = F.silu(g).mul_(u)
        y = _mm_nn(h, w_down, counts, offs, kernel)
        ctx.save_for_backward(x_ND, w_gate, w_up, w_down, g, u)
        # the parameter objects themselves: under saved-tensor hooks ctx.saved_tensors may hand back detached
        # aliases, and a deferred W must accumulate into the real leaves
        ctx.params = (w_gate, w_up, w_down)
        ctx.counts, ctx.offs, ctx.kernel = counts, offs, kernel
        return y if ctx.rows is None else y.index_select(0, ctx.rows)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, w_gate, w_up, w_down, g, u = ctx.saved_tensors
        counts, offs, kernel, rows = ctx.counts, ctx.offs, ctx.kernel, ctx.rows
        dy = dy.contiguous()
        if rows is not None:
            dy = dy.new_zeros(x.shape[0], dy.shape[1]).index_copy_(0, rows, dy)
        dh = _mm_nn(dy, w_down.transpose(-2, -1), counts, offs, kernel)
        silu_g = F.silu(g)
        dg = torch.ops.aten.silu_backward(dh * u, g)
        du = dh.mul_(silu_g)
        dx = _mm_nn(dg, w_gate.transpose(-2, -1), counts, offs, kernel)
        dx += _mm_nn(du, w_up.transpose(-2, -1), counts, offs, kernel)
        if rows is not None:
            dx = dx.index_select(0, rows)
        params = ctx.params

        def weight_grads() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            h = silu_g.mul_(u)
            return (_mm_tn(x, dg, counts, offs, kernel), _mm_tn(x, du, counts, offs, kernel),
                    _mm_tn(h, dy, counts, offs, kernel))

        need_w = ctx.needs_input_grad[1:4]
        store = WeightGradStore.active() if all(p.is_leaf for p in params) else None
        if store is None or not any(need_w):
            gw = weight_grads()
            return (dx, *(gi if n else None for gi, n in zip(gw, need_w)), None, None)

        wanted = [p if n else None for p, n in zip(params, need_w)]

        def deferred() -> None:
            with torch.no_grad():
                accumulate_grads(wanted, weight_grads())

        store.put(deferred, wanted)
        return dx, None, None, None, None, None


class _Dispatch(torch.autograd.Function):
    """``x_TD`` → rows ``x[token_of]`` grouped by expert (each token K times). Backward: un-permute and sum the K
    copies (two gathers and a reduction, no scatter)."""

    @staticmethod
    def forward(ctx, x_TD, token_of, inv_order, K):  # type: ignore[override]
        ctx.save_for_backward(inv_order)
        ctx.K = K
        return x_TD.index_select(0, token_of)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        (inv_order,) = ctx.saved_tensors
        T = inv_order.shape[0] // ctx.K
        return g.index_select(0, inv_order).view(T, ctx.K, -1).sum(1), None, None, None


class _Combine(torch.autograd.Function):
    """Expert outputs ``y [T·K, D]`` (grouped by expert) and gates ``w [T, K]`` → ``Σ_k w[t,k]·y[slot (t,k)]``."""

    @staticmethod
    def forward(ctx, y_ND, w_TK, order, inv_order):  # type: ignore[override]
        T, K = w_TK.shape
        y_TKD = y_ND.index_select(0, inv_order).view(T, K, -1)
        w = w_TK.to(y_ND.dtype)
        ctx.save_for_backward(y_TKD, w, order)
        ctx.w_dtype = w_TK.dtype
        return torch.bmm(w.unsqueeze(1), y_TKD).squeeze(1)

    @staticmethod
    def backward(ctx, g_TD):  # type: ignore[override]
        y_TKD, w, order = ctx.saved_tensors
        T, K, D = y_TKD.shape
        g_TD = g_TD.contiguous()
        dy = None
        if ctx.needs_input_grad[0]:
            dy = (w.unsqueeze(-1) * g_TD.unsqueeze(1)).view(T * K, D).index_select(0, order)
        dw = None
        if ctx.needs_input_grad[1]:
            dw = torch.bmm(y_TKD, g_TD.unsqueeze(-1)).squeeze(-1).to(ctx.w_dtype)
        return dy, dw, None, None


def _grouped_matmul_bmm(x_ND: torch.Tensor, w_EDO: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Reference back-end (plain autograd): pad every expert's rows to the largest count and run one ``bmm``."""
    E = w_EDO.shape[0]
    cmax = int(counts_E.max()) if counts_E.numel() else 0
    rows = _slab_rows(counts_E, cmax)
    padded = x_ND.new_zeros(E * cmax, x_ND.shape[1]).index_copy(0, rows, x_ND)
    return torch.bmm(padded.view(E, cmax, -1), w_EDO).view(E * cmax, -1).index_select(0, rows)


def set_expert_impl(module: nn.Module, impl: Optional[str]) -> None:
    """Select the grouped-GEMM back-end (one of ``EXPERT_IMPLS``, or ``None`` for the default) of every
    :class:`RoutedExperts` inside ``module``."""
    if impl is not None and impl not in EXPERT_IMPLS:
        raise ValueError(f"unknown expert impl {impl!r}; choose one of {EXPERT_IMPLS}")
    for m in module.modules():
        if isinstance(m, RoutedExperts):
            m.impl = impl


class RoutedExperts(nn.Module):
    """``E`` SwiGLU experts with stacked weights: gate/up ``[E, D, I]``, down ``[E, I, D]`` (x @ w layout).

    ``expert_ids`` are the global ids of the held experts (all of them for a full layer, a subset for a shard).
    ``impl`` picks the grouped-GEMM back-end (``EXPERT_IMPLS``); ``None`` (default) means ``DEFAULT_EXPERT_IMPL``
    (see :func:`set_expert_impl`).
    :func:`raymoe.fp8.convert_to_fp8` calls :meth:`enable_fp8`, after which the three grouped GEMMs run in
    block-scaled FP8 (Fprop, Dgrad and Wgrad); parameters and state_dict keys do not change.
    """

    def __init__(self, num_experts: int, dim: int, inter_dim: int, expert_ids: Optional[list[int]] = None) -> None:
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(num_experts, dim, inter_dim))
        self.up_proj = nn.Parameter(torch.empty(num_experts, dim, inter_dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, inter_dim, dim))
        self.expert_ids = list(range(num_experts)) if expert_ids is None else list(expert_ids)
        self.impl: Optional[str] = None
        self.fp8: Optional[nn.Module] = None
        self._gate_up: Optional[torch.Tensor] = None  # [E, 2I, D] behind gate_proj/up_proj (fuse_gate_up)
        self._down_nk: Optional[torch.Tensor] = None  # [E, D, I] behind down_proj (fuse_gate_up(native=True))
        self.native = False  # serving: the fused path runs cpu_kernels.experts (fuse_gate_up(native=True))

    @property
    def num_experts(self) -> int:
        return self.gate_proj.shape[0]

    def fuse_gate_up(self, native: bool = False) -> None:
        """Hold gate and up in one ``[E, 2I, D]`` tensor (transformers 5's ``gate_up_proj`` layout): ``gate_proj`` and
        ``up_proj`` become transposed views of its halves, so nothing is copied twice; forwards without autograd
        then run the fused per-expert path (module docstring). For serving: the parameters are no longer
        contiguous, which the training back-ends copy around.

        ``native``: also hold ``down_proj`` as a transposed view of a contiguous ``[E, D, I]`` tensor (each output's
        ``I`` weights contiguous, the layout :func:`raymoe.model.cpu_kernels.experts` streams) and run the fused path
        through that kernel when it is available (fp32 CPU; else the torch loop, same values to rounding)."""
        if not self.fused:
            I = self.gate_proj.shape[-1]  # noqa: E741
            with torch.no_grad():
                w = torch.cat([self.gate_proj.transpose(1, 2), self.up_proj.transpose(1, 2)], dim=1).contiguous()
            self.gate_proj = nn.Parameter(w[:, :I].transpose(1, 2), requires_grad=self.gate_proj.requires_grad)
            self.up_proj = nn.Parameter(w[:, I:].transpose(1, 2), requires_grad=self.up_proj.requires_grad)
            self._gate_up = w
        if native and not self._down_is_nk():
            with torch.no_grad():
                d = self.down_proj.transpose(1, 2).contiguous()  # [E, D, I]
            self.down_proj = nn.Parameter(d.transpose(1, 2), requires_grad=self.down_proj.requires_grad)
            self._down_nk = d
        self.native = native

    def _down_is_nk(self) -> bool:
        d = self._down_nk
        return d is not None and self.down_proj.data_ptr() == d.data_ptr() and self.down_proj.stride() == (
            d.stride(0), 1, d.stride(1))

    @property
    def fused(self) -> bool:
        """Whether gate/up still live in the fused tensor (a later ``.to()`` or parameter swap undoes it)."""
        w = self._gate_up
        if w is None:
            return False
        I = self.gate_proj.shape[-1]  # noqa: E741
        return (self.gate_proj.data_ptr() == w.data_ptr()
                and self.up_proj.data_ptr() == w.data_ptr() + I * w.shape[-1] * w.element_size()
                and self.gate_proj.stride() == self.up_proj.stride() == (w.stride(0), 1, w.stride(1)))

    def _forward_fused(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Per touched expert ``e`` with rows ``r``: ``[g; u]ᵀ = W_gu[e] · x_rᵀ`` (``[2I, c]``), then
        ``(silu(g)·u) @ W_down[e]`` (``[c, D]``). This orientation reads fastest at a few rows on the CPU measured
        (weights as the GEMM's row-major left operand, streamed in rows; docs/serving.md §1.1). With ``native``
        (:meth:`fuse_gate_up`) the whole layer is one :func:`raymoe.model.cpu_kernels.experts` call."""
        w_gu, w_down = self._gate_up, self.down_proj
        counts = counts_E.tolist()
        todo = range(len(counts))
        y = None
        if self.native and self._down_is_nk():
            from raymoe.model import cpu_kernels

            res = cpu_kernels.experts(x_ND, counts_E, w_gu, self._down_nk)
            if res is not None:
                y, todo = res  # the kernel leaves experts with many rows (compute-bound) to the BLAS below
        if y is None:
            y = x_ND.new_empty(x_ND.shape[0], w_down.shape[-1])
        I = w_down.shape[1]  # noqa: E741
        starts = [0]
        for c in counts:
            starts.append(starts[-1] + c)
        for e in todo:
            r, c = starts[e], counts[e]
            if c:
                gu = torch.mm(w_gu[e], x_ND[r : r + c].t())  # [2I, c]
                torch.mm(F.silu(gu[:I]).mul_(gu[I:]).t(), w_down[e], out=y[r : r + c])
        return y

    def native_weights(self) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """``(W_gate_up [E, 2I, D], W_down [E, D, I])`` as the CPU kernels read them, when serving (``native``, fused,
        no autograd); None otherwise."""
        if not (self.native and self.fused and self._down_is_nk()) or torch.is_grad_enabled():
            return None
        return self._gate_up, self._down_nk

    def forward_routed_native(self, x_TD: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor,
                              counts_E: torch.Tensor) -> Optional[torch.Tensor]:
        """Serving: dispatch, experts and weighted combine in one :func:`raymoe.model.cpu_kernels.moe_routed` call
        (``native`` and fused, no autograd, every expert within the kernel's row limit); None otherwise."""
        w = self.native_weights()
        if w is None:
            return None
        from raymoe.model import cpu_kernels

        return cpu_kernels.moe_routed(x_TD, topk_idx, topk_weight, counts_E, *w)

    def enable_fp8(self, config, name: str, wgrad_store=None) -> bool:
        """Hook for :func:`raymoe.fp8.convert_to_fp8`: run the expert GEMMs through an FP8 grouped GEMM."""
        from raymoe.fp8.grouped import FP8GroupedGEMM  # lazy: the model does not depend on the fp8 package

        self.fp8 = FP8GroupedGEMM(config, name)
        self.fp8.wgrad_store = wgrad_store
        return True

    def forward_grouped(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Tokens grouped by (local) expert, ``counts_E`` rows per expert → expert outputs ``[N, D]`` (unweighted)."""
        if self.fp8 is not None:
            h = F.silu(self.fp8(x_ND, self.gate_proj, counts_E)) * self.fp8(x_ND, self.up_proj, counts_E)
            return self.fp8(h, self.down_proj, counts_E)
        if not torch.is_grad_enabled() and row_bucket(x_ND) == 1 and self.fused:
            return self._forward_fused(x_ND, counts_E)
        impl = self.impl or DEFAULT_EXPERT_IMPL
        if impl == "auto":
            n, cmax = x_ND.shape[0], int(counts_E.max()) if counts_E.numel() else 0
            impl = "padded" if counts_E.numel() * cmax <= PADDED_MAX_WASTE * max(n, 1) else "grouped_mm"
        if impl == "bmm":
            h = F.silu(_grouped_matmul_bmm(x_ND, self.gate_proj, counts_E)) * _grouped_matmul_bmm(
                x_ND, self.up_proj, counts_E)
            return _grouped_matmul_bmm(h, self.down_proj, counts_E)
        if impl not in EXPERT_IMPLS:
            raise ValueError(f"unknown expert impl {impl!r}; choose one of {EXPERT_IMPLS}")
        return autocast_apply(_SwiGLUExpertsFn, x_ND, self.gate_proj, self.up_proj, self.down_proj, counts_E, impl)

    def forward(self, x_TD: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        """Dispatch → grouped experts → weighted combine. ``topk_idx [T,k]`` holds local expert ids."""
        T, K = topk_idx.shape
        flat = topk_idx.reshape(-1)
        order = flat.argsort(stable=True)  # (token, slot) pairs grouped by expert
        inv_order = torch.empty_like(order)
        inv_order[order] = torch.arange(order.numel(), device=order.device)
        counts = torch.bincount(flat, minlength=self.num_experts)
        x_ND = _Dispatch.apply(x_TD, order // K, inv_order, K)
        y = self.forward_grouped(x_ND, counts)
        return autocast_apply(_Combine, y, topk_weight, order, inv_order)

    @torch.no_grad()
    def shard(self, expert_ids: list[int]) -> "RoutedExperts":
        """A new module holding copies of the given (local) experts, e.g. for an expert-shard actor."""
        ids = torch.as_tensor(expert_ids, dtype=torch.long)
        out = RoutedExperts(len(expert_ids), self.gate_proj.shape[1], self.gate_proj.shape[2],
                            [self.expert_ids[i] for i in expert_ids])
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(out, name).copy_(getattr(self, name)[ids])
        if self.fused:
            out.fuse_gate_up(native=self.native)
        out.impl = self.impl
        if self.fp8 is not None:
            out.enable_fp8(self.fp8.fp8_config, self.fp8.fp8_name, self.fp8.wgrad_store)
        return out


def fuse_gate_up(module: nn.Module, native: bool = False) -> int:
    """:meth:`RoutedExperts.fuse_gate_up` on every :class:`RoutedExperts` inside ``module`` (serving only; ``native``:
    through the CPU kernels, see there, and every :class:`Router` choosing experts with
    :func:`raymoe.model.cpu_kernels.route`); returns how many experts modules were changed."""
    n = 0
    for m in module.modules():
        if isinstance(m, Router):
            m.native = native
        if isinstance(m, RoutedExperts) and not (m.fused and m.native == native and (m._down_is_nk() or not native)):
            m.fuse_gate_up(native=native)
            n += 1
    return n


class AbsentExperts(nn.Module):
    """A layer's routed experts whose weights this process does not hold: shape and dtype only, no parameter.

    A serving engine whose routed experts live in remote expert shards that read them from the checkpoint
    (:mod:`raymoe.engine.checkpoint_experts`) holds one of these per MoE layer in place of :class:`RoutedExperts`,
    so its parameters (and memory) are attention, dense and shared-expert weights only. Running it is an error."""

    def __init__(self, num_experts: int, dim: int, inter_dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_experts, self.dim, self.inter_dim, self.dtype = int(num_experts), int(dim), int(inter_dim), dtype
        self.expert_ids = list(range(self.num_experts))

    def extra_repr(self) -> str:
        return f"{self.num_experts} experts [{self.dim}x{self.inter_dim}] {self.dtype}, weights held elsewhere"

    def forward_grouped(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this process holds no routed-expert weights (they live in remote expert shards)")

    def forward(self, *args: object) -> torch.Tensor:
        return self.forward_grouped(*args[:2])  # type: ignore[arg-type]


class MoE(nn.Module):
    """h' = Σ shared(x) + Σ_i g_i·expert_i(x). Returns the output and the routing decision of this layer."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.router = Router(cfg)
        self.experts = RoutedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (
            SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) if cfg.n_shared_experts else None
        )
        self.aux_alpha = cfg.seq_aux_loss_alpha

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, RouteResult, Optional[torch.Tensor]]:
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)
        r = self.router(x_TD)
        y = self.experts(x_TD, r.topk_idx, r.topk_weight).view(B, T, D)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x_BTD)
        aux = None
        if self.aux_alpha > 0:
            aux = seq_aux_loss(r.scores.view(B, T, -1), r.topk_idx.view(B, T, -1), self.aux_alpha)
        return y, r, aux
