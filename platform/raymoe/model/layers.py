"""Small building blocks shared by attention, MoE and MTP: RMSNorm (fp32 math) and the SwiGLU FFN."""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RMSNorm", "SwiGLU", "cross_entropy", "autocast_apply", "fused_linear", "enable_fused_weight_cache",
           "kn_layout", "use_kn_layout", "use_native_linears", "derived_weight"]


def autocast_apply(fn: type, *args):
    """``fn.apply(*args)`` that is safe under ``torch.autocast``.

    A hand-written backward runs outside the autocast region (as ``loss.backward()`` normally does), so it must see the
    dtypes its forward saw. Under autocast the floating tensor arguments are cast to autocast's dtype first (the casts
    are differentiable, so fp32 parameters still receive fp32 gradients) and the function runs with autocast off.
    """
    dev = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
    if not torch.is_autocast_enabled(dev):
        return fn.apply(*args)
    dt = torch.get_autocast_dtype(dev)
    args = tuple(a.to(dt) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    with torch.autocast(dev, enabled=False):
        return fn.apply(*args)


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    x32 = x.to(torch.float32)
    r = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # [..., 1] fp32
    return w * (x32 * r).to(x.dtype), r


class _RMSNormFn(torch.autograd.Function):
    """RMSNorm with a hand-written backward (same forward ops as the reference, so the forward is bitwise equal).

    With x̂ = x·r, r = (mean(x²) + eps)^-1/2 and y = w·x̂: dw = Σ_rows dy·x̂, dx = r·(g − x̂·mean(g·x̂)) with g = dy·w
    (fp32). About half the elementwise passes of autograd's pow/mean/rsqrt/mul chain.
    """

    @staticmethod
    def forward(ctx, x, w, eps):  # type: ignore[override]
        y, r = _rms_norm(x, w, eps)
        ctx.save_for_backward(x, w, r)
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, w, r = ctx.saved_tensors
        xhat32 = x.to(torch.float32) * r
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (dy * xhat32.to(x.dtype)).reshape(-1, dy.shape[-1]).sum(0)
        dx = None
        if ctx.needs_input_grad[0]:
            g = (dy * w).to(torch.float32)
            dx = (g - xhat32 * (g * xhat32).mean(-1, keepdim=True)).mul_(r).to(x.dtype)
        return dx, dw, None


class _CrossEntropyFn(torch.autograd.Function):
    """Mean token cross-entropy of ``logits [N, V]`` (any float dtype) against ``labels [N]`` (``-100`` ignored).

    Rows are processed in blocks of about 1 MiB of fp32 so the fp32 upcast never leaves the cache: forward is
    ``log_softmax(block, dtype=fp32)`` and a gather (the same ops as ``F.cross_entropy(logits.float(), …)``, so the
    fp32 loss is bitwise equal); backward recomputes ``softmax(block)`` and writes ``(p − onehot)·scale`` straight
    into the gradient in the logits' dtype. No ``[N, V]`` fp32 tensor is ever materialised.
    """

    @staticmethod
    def forward(ctx, logits, labels):  # type: ignore[override]
        N, V = logits.shape
        block = max(1, _CE_BLOCK_BYTES // (4 * V))
        valid = labels != -100
        safe = labels.clamp_min(0)
        logp_t = logits.new_empty(N, 1, dtype=torch.float32)
        for r0 in range(0, N, block):
            lp = torch.log_softmax(logits[r0 : r0 + block], dim=-1, dtype=torch.float32)
            torch.gather(lp, 1, safe[r0 : r0 + block, None], out=logp_t[r0 : r0 + block])
        n = valid.sum().clamp_min(1)  # a micro-batch with every label ignored (chat data: a long prompt) -> 0
        loss = -(logp_t.squeeze(1) * valid).sum() / n
        ctx.save_for_backward(logits, safe, valid, n)
        ctx.block = block
        return loss

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        logits, safe, valid, n = ctx.saved_tensors
        N, block = logits.shape[0], ctx.block
        scale = ((g / n) * valid)[:, None].to(torch.float32)
        grad = torch.empty_like(logits)
        rows = torch.arange(min(block, N), device=logits.device)
        for r0 in range(0, N, block):
            r1 = min(r0 + block, N)
            p = torch.softmax(logits[r0:r1], dim=-1, dtype=torch.float32)
            p[rows[: r1 - r0], safe[r0:r1]] -= 1.0
            torch.mul(p, scale[r0:r1], out=grad[r0:r1])
        return grad, None


_CE_BLOCK_BYTES = 1 << 20


def cross_entropy(logits_NV: torch.Tensor, labels_N: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the non-ignored (``!= -100``) labels, computed in fp32 whatever the logits' dtype."""
    return _CrossEntropyFn.apply(logits_NV, labels_N)


class RMSNorm(nn.Module):
    """y = w · (x / sqrt(mean(x²) + eps)), normalised in fp32 and cast back before the weight (as the V3 reference)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.native = False  # serving on CPU: one raymoe.model.cpu_kernels.rms_norm call (use_native_linears)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _RMSNormFn.apply(x, self.weight, self.eps)
        if self.native:
            from raymoe.model import cpu_kernels

            y = cpu_kernels.rms_norm(x, self.weight, self.eps)
            if y is not None:
                return y
        return _rms_norm(x, self.weight, self.eps)[0]

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def fused_linear(x: torch.Tensor, *linears: nn.Module) -> tuple[torch.Tensor, ...]:
    """``tuple(l(x) for l in linears)`` as one GEMM over the concatenated weights when every module is a plain
    bias-free ``nn.Linear`` (the forward, the input gradient and the weight gradient each become one larger GEMM
    instead of ``len(linears)``; copying the small weights costs far less on CPU than the per-call overhead it
    saves). Any other module (e.g. :class:`raymoe.fp8.FP8Linear`, which is a subclass) keeps its own forward."""
    if len(linears) < 2 or any(type(m) is not nn.Linear or m.bias is not None for m in linears):
        return tuple(m(x) for m in linears)
    cache = getattr(linears[0], "_fused_weight_cache", None)
    if cache is not None and not torch.is_grad_enabled():
        # inference (opted in by enable_fused_weight_cache): keep the concatenated weight while no weight changed
        # (an in-place update bumps _version, a moved tensor changes data_ptr)
        key = _group_key(linears)
        if cache.get("native"):  # few rows: one packed product of the group (cpu_kernels); else each module's own
            y = _native_group(x, linears)
            return y.split([m.out_features for m in linears], dim=-1) if y is not None else tuple(m(x) for m in linears)
        if cache.get("key") != key:
            out, inp = sum(m.out_features for m in linears), linears[0].in_features
            if cache.get("kn") and kn_layout(out, inp):  # [in, Σout] contiguous, used through its transpose
                w = torch.cat([m.weight.t() for m in linears], dim=1).t()
            else:
                w = torch.cat([m.weight for m in linears])
            cache["key"], cache["w"] = key, w
        y = F.linear(x, cache["w"])
    else:
        y = F.linear(x, torch.cat([m.weight for m in linears]))
    return y.split([m.out_features for m in linears], dim=-1)


def derived_weight(holder: dict, name: str, key: tuple, make: Callable[[], Any]) -> Any:
    """``make()``, kept in ``holder[name]`` while ``key`` (the source weights' data pointers and versions: an in-place
    update bumps ``_version``, a moved tensor changes ``data_ptr``) holds: a serving copy of a weight in another
    layout, remade after the weight changes."""
    cached = holder.get(name)
    if cached is None or cached[0] != key:
        cached = holder[name] = (key, make())
    return cached[1]


def _packed(holder: dict, key: tuple, weight: Callable[[], torch.Tensor]):
    """The packed copy of ``weight()`` (:func:`raymoe.model.cpu_kernels.pack`), kept while ``key`` holds."""
    from raymoe.model import cpu_kernels  # lazy: builds the kernels on first use

    return derived_weight(holder, "packed", key, lambda: cpu_kernels.pack(weight()))


def _few_rows(x: torch.Tensor) -> bool:
    """Whether ``x [..., K]`` has few enough rows for the CPU kernels (packing is deferred until a product has)."""
    from raymoe.model import cpu_kernels

    rows = x.numel() // max(x.shape[-1], 1)
    return 0 < rows <= cpu_kernels.row_limit()


def native_packed(lin: nn.Module):
    """The packed serving copy of one linear's weight (:func:`raymoe.model.cpu_kernels.pack`; kept in the module,
    remade when the weight changes): the copy :func:`use_native_linears`' forward uses. None when it cannot be made
    or ``lin`` is not a plain bias-free ``nn.Linear`` (e.g. an FP8 linear, which keeps its own forward)."""
    if type(lin) is not nn.Linear or lin.bias is not None:
        return None
    return _packed(lin.__dict__.setdefault("_native_pack", {}), (lin.weight.data_ptr(), lin.weight._version),
                   lambda: lin.weight)


def native_group_packed(*linears: nn.Module):
    """The packed serving copy of a :func:`fused_linear` group's concatenated weight (kept in the first linear's
    ``_fused_weight_cache`` by :func:`enable_fused_weight_cache` with ``native``): None when the group has no such
    cache or the copy cannot be made."""
    cache = getattr(linears[0], "_fused_weight_cache", None)
    if cache is None or not cache.get("native") or any(type(m) is not nn.Linear or m.bias is not None
                                                      for m in linears):
        return None
    return _packed(cache, _group_key(linears), lambda: torch.cat([m.weight for m in linears]))


def _group_key(linears) -> tuple:
    return tuple((id(m), m.weight.data_ptr(), m.weight._version) for m in linears)


def _native_group(x: torch.Tensor, linears: tuple[nn.Module, ...]) -> Optional[torch.Tensor]:
    from raymoe.model import cpu_kernels

    if not _few_rows(x):
        return None
    pw = native_group_packed(*linears)
    return None if pw is None else cpu_kernels.linear_packed(x, pw)


def _native_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``nn.Linear.forward`` of a serving linear marked by :func:`use_native_linears`: few rows through its packed
    copy (made on the first few-row product, so a linear only prefill uses never gets one), everything else (and
    autograd) through ``F.linear``."""
    if not torch.is_grad_enabled() and _few_rows(x):
        from raymoe.model import cpu_kernels

        pw = native_packed(self)
        y = None if pw is None else cpu_kernels.linear_packed(x, pw)
        if y is not None:
            return y
    return F.linear(x, self.weight)


def enable_fused_weight_cache(model: nn.Module, kn: bool = False, native: bool = False) -> int:
    """Serving: let :func:`fused_linear` keep each fused group's concatenated weight between calls made without
    autograd (one extra copy of those weights — the MLA down-projections, dense and shared-expert gate/up — in
    exchange for a concatenation per call: ~10% of a small model's batch-1 decode step on CPU). Training never turns
    it on. ``kn``: a group whose :func:`kn_layout` holds keeps its weight as ``[in, Σout]`` (see there). Returns the
    number of linears marked. ``native``: a group keeps no concatenated weight but a packed one, for few-row products
    through :func:`raymoe.model.cpu_kernels.linear_packed`; more rows run each linear alone (``kn`` is then ignored;
    see :func:`use_native_linears`)."""
    n = 0
    for m in model.modules():
        if type(m) is nn.Linear and not hasattr(m, "_fused_weight_cache"):
            m._fused_weight_cache = {"kn": kn, "native": native}
            n += 1
    return n


def kn_layout(out_features: int, in_features: int) -> bool:
    """Whether a serving linear of this shape holds its weight as ``[in, out]`` (used as ``x @ W``) rather than
    ``nn.Linear``'s ``[out, in]`` (``x @ Wᵀ``): when ``out ≥ in``. On the CPU measured (MKL, weights streamed from
    memory) ``x @ W`` read the lm_head about 2× faster at one row (``bench gemm_read``'s ``mm_kn`` vs ``mm``), and a
    small model's batch-1 decode step took 10% less (``bench decode_parts``, its ``nk`` column; docs/serving.md
    §1.1). Weights with ``in > out`` (the FFN down-projection) keep ``[out, in]``, where each output is one
    contiguous dot product over the long input."""
    return out_features >= in_features


def use_kn_layout(model: nn.Module, skip: tuple[str, ...] = ()) -> int:
    """Serving: every bias-free :class:`nn.Linear` whose shape passes :func:`kn_layout` (names ending in one of
    ``skip`` excepted) gets its weight re-stored as a contiguous ``[in, out]`` tensor, kept as the parameter through
    its transpose: the parameter still reads ``[out, in]`` (values, state dict keys and :func:`F.linear` unchanged),
    and ``F.linear`` multiplies ``x`` by the contiguous ``[in, out]`` tensor. A weight shared with another module
    (tied embeddings) is left alone. Returns the number of linears changed."""
    shared: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            shared[id(p)] = shared.get(id(p), 0) + 1
    n = 0
    for name, m in model.named_modules():
        if (type(m) is not nn.Linear or m.bias is not None or name.endswith(skip) or shared[id(m.weight)] > 1
                or not kn_layout(m.out_features, m.in_features) or m.weight.stride(0) == 1):
            continue
        with torch.no_grad():
            w_kn = m.weight.t().contiguous()
        m.weight = nn.Parameter(w_kn.t(), requires_grad=m.weight.requires_grad)
        n += 1
    return n


def use_native_linears(model: nn.Module) -> int:
    """Serving on CPU: every bias-free :class:`nn.Linear` runs its few-row products (decode: one row per sequence)
    through :func:`raymoe.model.cpu_kernels.linear_packed` on a copy of its weight packed in column panels (made on
    first use, remade when the weight changes), which streams the weight in order with no horizontal sums; more rows
    (prefill), autograd, or kernels unavailable: ``F.linear`` on the weight as before. Costs one extra copy of each such
    weight. A weight stored ``[in, out]`` (:func:`use_kn_layout`) is re-stored contiguous ``[out, in]`` first. Every
    :class:`RMSNorm` without autograd runs as one :func:`raymoe.model.cpu_kernels.rms_norm` call too, and every few-row
    :class:`SwiGLU` as one :func:`raymoe.model.cpu_kernels.swiglu_packed` call. Values unchanged
    up to rounding. Returns the number of linears changed."""
    n = 0
    for m in model.modules():
        if isinstance(m, (RMSNorm, SwiGLU)):
            m.native = True  # and its norms and dense FFNs: one kernel call each instead of several ops
            continue
        if type(m) is not nn.Linear or m.bias is not None or "forward" in m.__dict__:
            continue
        if not m.weight.is_contiguous():
            with torch.no_grad():
                m.weight = nn.Parameter(m.weight.contiguous(), requires_grad=m.weight.requires_grad)
        m.forward = _native_forward.__get__(m)
        n += 1
    return n


class SwiGLU(nn.Module):
    """FFN(x) = down(silu(gate(x)) ⊙ up(x)); used for dense layers and shared experts (HF names)."""

    def __init__(self, dim: int, inter_dim: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=False)
        self.up_proj = nn.Linear(dim, inter_dim, bias=False)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)
        self.native = False  # serving on CPU: the whole FFN in one raymoe.model.cpu_kernels call (use_native_linears)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native and not torch.is_grad_enabled() and _few_rows(x):
            y = self._native(x)
            if y is not None:
                return y
        g, u = fused_linear(x, self.gate_proj, self.up_proj)
        return self.down_proj(F.silu(g) * u)

    def native_weights(self):
        """``(packed [gate; up], packed down)`` for :func:`raymoe.model.cpu_kernels.swiglu_packed`: the copies
        :func:`fused_linear` (gate/up group) and :func:`_native_forward` (down) keep, not new ones; None when serving on
        the CPU kernels is off for this FFN or a copy cannot be made."""
        if not self.native:
            return None
        gu, dn = native_group_packed(self.gate_proj, self.up_proj), native_packed(self.down_proj)
        return None if gu is None or dn is None else (gu, dn)

    def _native(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The whole FFN in one :func:`raymoe.model.cpu_kernels.swiglu_packed` call (:meth:`native_weights`)."""
        from raymoe.model import cpu_kernels

        w = self.native_weights()
        return None if w is None else cpu_kernels.swiglu_packed(x, *w)
