"""FP8 grouped GEMM for routed experts with stacked weights ``w [E, D, O]`` (``x @ w`` layout), Fprop/Dgrad/Wgrad.

The routed experts are most of DeepSeek-V3's FLOPs, and the paper runs them in FP8 like every other Linear
(§3.3.1; DeepGEMM's grouped "contiguous" kernels). Tokens arrive grouped by expert: ``x [Ntok, D]`` with
``counts [E]`` rows per expert. With the same tiling rules as :mod:`raymoe.fp8.linear`::

    Fprop  y_e  = Q₁ₓ₁₂₈(x_e)  · Q₁₂₈ₓ₁₂₈(w_e)         per-token tiles; each expert's weight in its own 128×128 blocks
    Dgrad  dx_e = Q₁ₓ₁₂₈(dy_e) · Q₁₂₈ₓ₁₂₈(w_e)ᵀ
    Wgrad  dw_e = Q₁₂₈ₓ₁(x_e)ᵀ · Q₁₂₈ₓ₁(dy_e)          128-token tiles that never straddle two experts (each
                                                      segment is tiled from its own first row, as DeepGEMM pads
                                                      every expert's segment to a multiple of 128)

The input is cached in FP8 (1×128) and re-tiled for Wgrad. On CPU the emulation runs Fprop/Dgrad as one
``torch._grouped_mm`` over the dequantized bf16 operands when available (a loop over experts otherwise); Wgrad is a
loop over experts (its per-expert token tiles differ anyway). On CUDA the Triton GEMM runs per expert.

Wiring into a model (a duck-typed protocol, so that :func:`~raymoe.fp8.convert_to_fp8` needs no import of the model):
an experts module that defines ``enable_fp8(config, name, wgrad_store) -> bool`` is called by ``convert_to_fp8``;
it typically does ``self.fp8 = FP8GroupedGEMM(config, name); self.fp8.wgrad_store = wgrad_store`` and then calls
``self.fp8(x_ND, w_EDO, counts_E)`` instead of its bf16 grouped matmul. ``FP8GroupedGEMM`` has no parameters or
buffers, so the state_dict is unchanged. Wgrad is deferred, like every store-aware backward's, into whichever
:class:`~raymoe.wgrad.WeightGradStore` has a ``defer`` block open.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.fp8.config import FP8Config
from raymoe.fp8.linear import FP8LayerState, _Ops, _QT
from raymoe.fp8.quant import BLOCK, qdq_blocks
from raymoe.wgrad import WeightGradStore, accumulate_grad

__all__ = ["FP8GroupedGEMM"]


def _blocks3d(w: torch.Tensor, ops: _Ops) -> _QT:
    """128×128 blocks of every expert's ``[D, O]`` slice → q ``[E, D, O]``, s ``[E, ceil(D/128), ceil(O/128)]``."""
    E, D, O = w.shape
    pd, po = -D % BLOCK, -O % BLOCK
    wp = F.pad(w, (0, po, 0, pd)) if (pd or po) else w
    Dp, Op = D + pd, O + po
    if ops.emulate:
        q, s, deq = qdq_blocks(wp.reshape(E * Dp, Op), pow2=ops.pow2, out_dtype=ops.cdt, compile=ops.compile)
        deq = deq.view(E, Dp, Op)[:, :D, :O]
    else:
        q, s = ops._kt().weight_quant(wp.reshape(E * Dp, Op), pow2=ops.pow2)
        deq = None
    return _QT(q.view(E, Dp, Op)[:, :D, :O], s.view(E, Dp // BLOCK, Op // BLOCK), deq)


def _expert(wq: _QT, e: int) -> _QT:
    return _QT(wq.q[e], wq.s[e], None if wq.deq is None else wq.deq[e])


def _rows(t: _QT, a: int, b: int) -> _QT:
    return _QT(t.q[a:b], t.s[a:b], None if t.deq is None else t.deq[a:b])


def _grouped_deq_mm(a: torch.Tensor, b_EKN: torch.Tensor, counts: list[int], offs: torch.Tensor) -> torch.Tensor:
    """``a [Ntok, K]`` bf16 grouped rows × ``b_EKN [E, K, N]`` → ``[Ntok, N]`` (one kernel when available)."""
    if hasattr(torch, "_grouped_mm") and a.shape[0] > 0:
        try:
            return torch._grouped_mm(a.contiguous(), b_EKN, offs=offs)
        except RuntimeError:
            pass
    outs, r = [], 0
    for e, c in enumerate(counts):
        outs.append(a[r:r + c] @ b_EKN[e])
        r += c
    return torch.cat(outs) if outs else a.new_zeros(0, b_EKN.shape[-1])


class _FP8GroupedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, counts_E: torch.Tensor,  # type: ignore[override]
                layer: "FP8GroupedGEMM") -> torch.Tensor:
        ops = layer._ops(x.device)
        E, D, O = w.shape
        counts = [int(c) for c in counts_E.tolist()]
        xq = ops.rows(x)
        layer._note(0, xq.s)
        wq = layer._cached_weight(w, ops, lambda t: _blocks3d(t, ops), lambda q: q.s)
        offs = counts_E.cumsum(0).to(torch.int32)
        if ops.emulate:
            y = _grouped_deq_mm(xq.deq, wq.deq, counts, offs).to(x.dtype)
        else:
            outs, r = [], 0
            for e, c in enumerate(counts):
                if c:
                    outs.append(ops.gemm(_rows(xq, r, r + c), _expert(wq, e).t(), b_rows=False, out_dtype=x.dtype))
                r += c
            y = torch.cat(outs) if outs else x.new_zeros(0, O)
        ctx.layer, ctx.counts, ctx.x_dtype = layer, counts, x.dtype
        ctx.save_for_backward(xq.q, xq.s, w, offs)
        ctx.w_param = w  # the leaf itself: saved-tensor hooks may hand back a detached alias
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # type: ignore[override]
        layer: FP8GroupedGEMM = ctx.layer
        xq_q, xq_s, w, offs = ctx.saved_tensors
        counts = ctx.counts
        ops = layer._ops(dy.device)
        E, D, O = w.shape
        wq = layer._cached_weight(w, ops, lambda t: _blocks3d(t, ops), lambda q: q.s)
        dx = None
        if ctx.needs_input_grad[0]:
            dyq = ops.rows(dy.contiguous())
            layer._note(2, dyq.s)
            if ops.emulate:
                dx = _grouped_deq_mm(dyq.deq, wq.deq.transpose(1, 2), counts, offs).to(ctx.x_dtype)
            else:
                outs, r = [], 0
                for e, c in enumerate(counts):
                    if c:
                        outs.append(ops.gemm(_rows(dyq, r, r + c), _expert(wq, e), b_rows=False,
                                             out_dtype=ctx.x_dtype))
                    r += c
                dx = torch.cat(outs) if outs else dy.new_zeros(0, D)
        if not ctx.needs_input_grad[1]:
            return dx, None, None, None

        def wgrad() -> torch.Tensor:
            dw = torch.zeros(E, D, O, dtype=w.dtype, device=w.device)
            r = 0
            for e, c in enumerate(counts):
                if c:
                    xc = ops.retile(xq_q[r:r + c], xq_s[r:r + c])  # 128-token tiles inside this expert's segment
                    gc = ops.cols(dy[r:r + c])
                    layer._note(3, xc.s)
                    layer._note(3, gc.s)
                    dw[e] = ops.gemm(xc.t(), gc.t(), b_rows=True, out_dtype=w.dtype)
                r += c
            return dw

        w_leaf = ctx.w_param
        store = WeightGradStore.active() if w_leaf.is_leaf else None
        if store is not None:  # "Bi": park the Wgrad until the cell's "W"
            def deferred() -> None:
                with torch.no_grad():
                    accumulate_grad(w_leaf, wgrad())

            store.put(deferred, (w_leaf,))
            return dx, None, None, None
        return dx, wgrad(), None, None


class FP8GroupedGEMM(FP8LayerState, nn.Module):
    """``y[rows of e] = x[rows of e] @ w[e]`` for tokens grouped by expert, all three GEMMs in block-scaled FP8.

    Args:
        config: recipe knobs; ``config.enabled=False`` falls back to a bf16/fp32 loop.
        name: qualified name for guard reports.

    Call: ``(x_ND [Ntok, D], w_EDO [E, D, O], counts_E [E] int) -> [Ntok, O]`` in ``x``'s dtype. ``counts_E`` sums
    to ``Ntok``; rows are grouped by expert in order.
    """

    def __init__(self, config: FP8Config | None = None, name: str = "") -> None:
        nn.Module.__init__(self)
        self._init_fp8(config, name)

    def forward(self, x_ND: torch.Tensor, w_EDO: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        if w_EDO.dim() != 3 or x_ND.dim() != 2 or x_ND.shape[1] != w_EDO.shape[1]:
            raise ValueError(f"{self.fp8_name or 'FP8GroupedGEMM'}: expected x [N, D] and w [E, D, O], got "
                             f"{tuple(x_ND.shape)} and {tuple(w_EDO.shape)}")
        if not self.fp8_config.enabled:
            counts = [int(c) for c in counts_E.tolist()]
            return _grouped_deq_mm(x_ND, w_EDO, counts, counts_E.cumsum(0).to(torch.int32))
        return _FP8GroupedFn.apply(x_ND, w_EDO, counts_E, self)

    def extra_repr(self) -> str:
        c = self.fp8_config
        return f"fp8=e4m3 grouped 1x128/128x128, backend={c.backend}, pow2={c.pow2_scales}"
