"""FP8 ``nn.Linear``: Fprop, Dgrad and Wgrad all through the block-scaled FP8 GEMM (DeepSeek-V3 §3.3.1, Fig. 6).

For ``y = x·Wᵀ + b`` with ``x [M, K]`` (tokens × in), ``W [N, K]``::

    Fprop  y  = Q₁ₓ₁₂₈(x)  · Q₁₂₈ₓ₁₂₈(W)ᵀ                 contraction over K
    Dgrad  dx = Q₁ₓ₁₂₈(dy) · Q₁₂₈ₓ₁₂₈(W)                  contraction over N (the Fprop weight blocks, transposed)
    Wgrad  dW = Q₁₂₈ₓ₁(dy)ᵀ · R(Q₁ₓ₁₂₈(x))                 contraction over M (tokens)

``Q₁ₓ₁₂₈`` is per-token tiling, ``Q₁₂₈ₓ₁`` tiles along tokens, ``R`` the 1×128 → 128×1 re-tiling of the input that
was cached **in FP8** by the forward (half the activation memory of bf16; the paper's reason for FP8 Wgrad). Outputs
are in the input's dtype; the weight's FP8 form (and, when emulating, its dequantized bf16 copy) is cached per
weight version, i.e. once per optimizer step, and shared by every micro-batch's Fprop and Dgrad. Bias, if any, is
added and reduced in high precision.

Weight cache validity. The cache key is the weight's identity, storage pointer and in-place version **and** a
process-wide count of optimizer steps. The version alone is not enough: DeepSpeed's ZeRO writes updated bf16
weights through a flat buffer (or ``param.data``), which bumps no version counter of the parameter, so a
version-keyed cache silently kept the initial weights for the whole run (caught by the checkpoint-resume test).
Every ``torch.optim.Optimizer.step`` — including the inner optimizer DeepSpeed wraps — fires a global post-step hook
(:mod:`raymoe.fp8.step_counter`, registered once, on import) that advances the count. Code that changes weights
without an optimizer step and without an in-place op on the parameter itself calls :func:`invalidate_weight_caches`.

Deferred weight gradients (zero-bubble pipeline schedules: ``Bi`` now, ``W`` later) use the project's one
:class:`~raymoe.wgrad.WeightGradStore`: inside ``with store.defer(cell):`` (any store, found through
``WeightGradStore.active()``) the backward returns ``dx`` and parks the Wgrad (its FP8 inputs, not its result) under
``cell``; ``store.run(cell)`` (the schedule's ``W`` op) computes it. Queue-style, ``store.defer()`` without a cell,
``store.pop()`` for the oldest block and ``store.flush()`` for all work too. Parked grads are applied with
:func:`raymoe.wgrad.accumulate_grads`, i.e. through the parameter's ``AccumulateGrad`` node, so every gradient hook
fires as usual. A layer's ``wgrad_store`` attribute (set by :func:`convert_to_fp8`) is kept for compatibility only;
deferral does not depend on it. Under DeepSpeed the flush must land before the gradient reduction: with the default
managed accumulation ZeRO reduces at the end of each ``engine.backward`` and misses later grads, so
:func:`raymoe.fp8.deepspeed_hooks.ds_config` sets ``managed_gradient_accumulation: false`` (reduction in
``engine.step()``; deferred == immediate bit for bit).

What stays in high precision is decided by :func:`convert_to_fp8`'s filter (embedding, head, router/gate by name;
norms and the attention core are not ``nn.Linear`` and are never touched).
"""
from __future__ import annotations

import fnmatch
import logging
from typing import Callable, NamedTuple

import torch
from torch import nn

from raymoe.fp8.config import FP8Config
from raymoe.fp8.gemm import gemm_nt, resolve_backend
from raymoe.fp8.quant import dequant_rows, qdq_blocks, qdq_cols, qdq_rows, retile_qdq
from raymoe.fp8.step_counter import optimizer_step_count
from raymoe.wgrad import WeightGradStore, accumulate_grads

__all__ = [
    "FP8Linear",
    "FP8LayerState",
    "WeightGradStore",
    "convert_to_fp8",
    "default_fp8_filter",
    "fp8_layers",
    "invalidate_weight_caches",
    "optimizer_step_count",
    "PHASES",
]

log = logging.getLogger("raymoe.fp8")

#: Order of the per-layer non-finite flags (see :mod:`raymoe.fp8.guard`).
PHASES: tuple[str, ...] = ("fprop.input", "weight", "dgrad.grad_output", "wgrad.operands")


class _QT(NamedTuple):
    """A quantized operand: E4M3 data, fp32 scales and (emulation only) its dequantized compute-dtype copy."""

    q: torch.Tensor
    s: torch.Tensor
    deq: torch.Tensor | None

    def t(self) -> "_QT":
        return _QT(self.q.T, self.s.T, None if self.deq is None else self.deq.T)


class _Ops:
    """Quantize / GEMM primitives of one back-end, as the autograd function needs them."""

    def __init__(self, cfg: FP8Config, device: torch.device) -> None:
        self.backend = resolve_backend(cfg.backend, device)
        self.pow2 = cfg.pow2_scales
        self.compile = cfg.compile
        self.emulate = self.backend == "emulate"
        self.cdt = torch.bfloat16
        self.accum_bits = cfg.accum_mantissa_bits
        self.promote_every = cfg.promote_every

    def _kt(self):
        from raymoe.fp8 import kernels_triton

        return kernels_triton

    def rows(self, x2d: torch.Tensor) -> _QT:
        if self.emulate:
            return _QT(*qdq_rows(x2d, pow2=self.pow2, out_dtype=self.cdt, compile=self.compile))
        return _QT(*self._kt().act_quant(x2d, pow2=self.pow2), None)

    def cols(self, x2d: torch.Tensor) -> _QT:
        if self.emulate:
            return _QT(*qdq_cols(x2d, pow2=self.pow2, out_dtype=self.cdt, compile=self.compile))
        return _QT(*self._kt().cols_quant(x2d, pow2=self.pow2), None)

    def blocks(self, w: torch.Tensor) -> _QT:
        if self.emulate:
            return _QT(*qdq_blocks(w, pow2=self.pow2, out_dtype=self.cdt, compile=self.compile))
        return _QT(*self._kt().weight_quant(w, pow2=self.pow2), None)

    def retile(self, q: torch.Tensor, s: torch.Tensor) -> _QT:
        if self.emulate:
            return _QT(*retile_qdq(q, s, pow2=self.pow2, out_dtype=self.cdt, compile=self.compile))
        return self.cols(dequant_rows(q, s, torch.float32))

    def gemm(self, a: _QT, b: _QT, *, b_rows: bool, out_dtype: torch.dtype) -> torch.Tensor:
        return gemm_nt(a.q, a.s, b.q, b.s, b_rows=b_rows, out_dtype=out_dtype, backend=self.backend,
                       compute_dtype=self.cdt, a_deq=a.deq, b_deq=b.deq, cache_b=False, compile=self.compile,
                       accum_bits=self.accum_bits, promote_every=self.promote_every)


# ------------------------------------------------------------------------------------------ autograd


class _FP8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,  # type: ignore[override]
                layer: "FP8Linear") -> torch.Tensor:
        ops = layer._ops(x.device)
        K = x.shape[-1]
        x2d = x.reshape(-1, K)
        xq = ops.rows(x2d)
        wq = layer._weight_fp8(weight, ops)
        layer._note(0, xq.s)
        y = ops.gemm(xq, wq, b_rows=False, out_dtype=x.dtype)
        if bias is not None:
            y = y + bias.to(y.dtype)
        ctx.layer = layer
        ctx.has_bias = bias is not None
        ctx.x_shape = x.shape
        ctx.x_dtype = x.dtype
        if layer.fp8_config.fp8_wgrad:
            ctx.save_for_backward(xq.q, xq.s, weight)  # the input is cached in FP8
        else:
            ctx.save_for_backward(x2d, weight)
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # type: ignore[override]
        layer: FP8Linear = ctx.layer
        cfg = layer.fp8_config
        if cfg.fp8_wgrad:
            xq_q, xq_s, weight = ctx.saved_tensors
            x_hp = None
        else:
            x_hp, weight = ctx.saved_tensors
            xq_q = xq_s = None
        ops = layer._ops(dy.device)
        N = weight.shape[0]
        dy2d = dy.reshape(-1, N)
        dx = None
        if ctx.needs_input_grad[0]:
            dyq = ops.rows(dy2d)
            layer._note(2, dyq.s)
            wq = layer._weight_fp8(weight, ops)
            dx = ops.gemm(dyq, wq.t(), b_rows=False, out_dtype=ctx.x_dtype).reshape(ctx.x_shape)

        need_w = ctx.needs_input_grad[1]
        need_b = ctx.has_bias and ctx.needs_input_grad[2]
        if not (need_w or need_b):
            return dx, None, None, None

        def wgrad() -> tuple[torch.Tensor | None, torch.Tensor | None]:
            dw = db = None
            if need_w:
                if cfg.fp8_wgrad:
                    dyc = ops.cols(dy2d)  # 128×1 tiles along tokens
                    xc = ops.retile(xq_q, xq_s)  # cached 1×128 FP8 input → 128×1
                    layer._note(3, dyc.s)
                    layer._note(3, xc.s)
                    dw = ops.gemm(dyc.t(), xc.t(), b_rows=True, out_dtype=weight.dtype)
                else:
                    dw = (dy2d.to(torch.bfloat16).T @ x_hp.to(torch.bfloat16)).to(weight.dtype)
            if need_b:
                db = dy2d.float().sum(0).to(weight.dtype)
            return dw, db

        store = WeightGradStore.active()
        if store is not None:  # "Bi" of a zero-bubble schedule: park the Wgrad until the cell's "W"
            params = [layer.weight if need_w else None, layer.bias if need_b else None]

            def deferred() -> None:
                with torch.no_grad():  # as inside autograd's backward: record no graph
                    accumulate_grads(params, wgrad())

            store.put(deferred, params)
            return dx, None, None, None
        dw, db = wgrad()
        return dx, dw, db, None


# ------------------------------------------------------------------------------------------ module


class FP8LayerState:
    """Mixin with what every FP8 layer keeps: config, name, back-end ops, the per-step weight cache and the
    non-finite flags read by :class:`~raymoe.fp8.FP8Guard`. Used by :class:`FP8Linear` and by
    :class:`~raymoe.fp8.grouped.FP8GroupedGEMM`.

    ``wgrad_store`` only records the store given to :func:`convert_to_fp8` / ``enable_fp8`` (kept so that code
    passing it along keeps working); the backward defers into whichever store is active
    (:meth:`raymoe.wgrad.WeightGradStore.active`), attached or not."""

    fp8_config: FP8Config
    fp8_name: str

    def _init_fp8(self, config: FP8Config | None, name: str) -> None:
        self.fp8_config = config if config is not None else FP8Config(enabled=True)
        self.fp8_name = name
        self.wgrad_store: WeightGradStore | None = None
        self._w_cache: dict[int, tuple[tuple, object]] = {}  # one entry per weight tensor (keyed by id)
        self._ops_cache: dict[torch.device, _Ops] = {}
        self._nonfinite: torch.Tensor | None = None

    # -- internals used by the autograd functions -------------------------------------------------------------
    def _ops(self, device: torch.device) -> _Ops:
        ops = self._ops_cache.get(device)
        if ops is None:
            ops = self._ops_cache[device] = _Ops(self.fp8_config, device)
        return ops

    def _cached_weight(self, weight: torch.Tensor, ops: _Ops, quantize: Callable[[torch.Tensor], object],
                       scale_of: Callable[[object], torch.Tensor]):
        key = (id(weight), weight.data_ptr(), weight._version, optimizer_step_count(), weight.dtype, weight.device,
               ops.backend)
        hit = self._w_cache.get(id(weight))
        if hit is None or hit[0] != key:
            with torch.no_grad():
                wq = quantize(weight.detach())
            self._note(1, scale_of(wq))
            self._w_cache[id(weight)] = hit = (key, wq)
        return hit[1]

    def _weight_fp8(self, weight: torch.Tensor, ops: _Ops) -> _QT:
        return self._cached_weight(weight, ops, ops.blocks, lambda q: q.s)

    def _note(self, phase: int, scale: torch.Tensor) -> None:
        """Record a non-finite scale (= non-finite amax) for ``PHASES[phase]`` without a host sync."""
        if not self.fp8_config.guard:
            return
        if self._nonfinite is None or self._nonfinite.device != scale.device:
            self._nonfinite = torch.zeros(len(PHASES), dtype=torch.bool, device=scale.device)
        self._nonfinite[phase] |= ~torch.isfinite(scale).all()

    def pop_nonfinite(self) -> list[str]:
        """Phases that saw a non-finite amax since the last call (one host sync); resets the flags."""
        if self._nonfinite is None:
            return []
        flags = self._nonfinite.tolist()
        self._nonfinite.zero_()
        return [p for p, bad in zip(PHASES, flags) if bad]

    def invalidate_weight_cache(self) -> None:
        self._w_cache.clear()


class FP8Linear(FP8LayerState, nn.Linear):
    """Drop-in ``nn.Linear`` whose three GEMMs run in block-scaled FP8 (same parameters, same state_dict keys).

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        config: recipe knobs (:class:`FP8Config`); ``config.enabled=False`` makes it a plain ``nn.Linear``.
        name: qualified module name, used in guard reports.

    Shapes: ``x [..., in_features]`` → ``[..., out_features]`` in ``x.dtype``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 config: FP8Config | None = None, name: str = "") -> None:
        nn.Linear.__init__(self, in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_fp8(config, name)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: FP8Config | None = None, name: str = "") -> "FP8Linear":
        """Wrap an existing ``nn.Linear``, sharing its parameter objects (optimizers holding them keep working)."""
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.in_features, m.out_features = linear.in_features, linear.out_features
        m.weight = linear.weight
        if linear.bias is not None:
            m.bias = linear.bias
        else:
            m.register_parameter("bias", None)
        m.train(linear.training)
        m._init_fp8(config, name)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fp8_config.enabled:
            return nn.Linear.forward(self, x)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self.fp8_name or 'FP8Linear'}: expected last dim {self.in_features}, got {x.shape}")
        return _FP8LinearFn.apply(x, self.weight, self.bias, self)

    def extra_repr(self) -> str:
        c = self.fp8_config
        return f"{nn.Linear.extra_repr(self)}, fp8=e4m3 1x128/128x128, backend={c.backend}, pow2={c.pow2_scales}"


# ------------------------------------------------------------------------------------------ conversion


def default_fp8_filter(config: FP8Config | None = None) -> Callable[[str, nn.Linear], bool]:
    """The default "convert this Linear?" predicate.

    A Linear stays in high precision when any dot-separated component of its qualified name matches (``fnmatch``,
    case-insensitive) one of ``config.skip_patterns`` — by default ``*embed*``, ``*head``, ``router*``, ``gate``,
    ``*_gate`` (so ``lm_head``, ``embed_tokens``, ``mtp.0.head``, ``mlp.gate`` and anything under ``router`` stay,
    while ``gate_proj``/``up_proj`` convert) — or when a dimension is below ``config.min_features``.
    """
    cfg = config if config is not None else FP8Config(enabled=True)
    patterns = tuple(cfg.skip_patterns)

    def keep_high_precision(name: str) -> bool:
        return any(fnmatch.fnmatchcase(part.lower(), p) for part in name.split(".") for p in patterns)

    def convert(name: str, module: nn.Module) -> bool:
        if keep_high_precision(name):
            return False
        dims = [getattr(module, a) for a in ("in_features", "out_features") if hasattr(module, a)]
        return min(dims, default=cfg.min_features) >= cfg.min_features

    return convert


def convert_to_fp8(model: nn.Module, filter: Callable[[str, nn.Linear], bool] | None = None, *,
                   config: FP8Config | None = None, wgrad_store: WeightGradStore | None = None) -> nn.Module:
    """Swap selected ``nn.Linear`` modules of ``model`` (in place) for :class:`FP8Linear`; returns ``model``.

    Args:
        model: any module tree. Parameters are shared, not copied: call this before building the optimizer /
            ``deepspeed.initialize`` or afterwards — either way the optimizer still holds the right tensors.
        filter: ``(qualified_name, linear) -> bool`` (True = convert). Default: :func:`default_fp8_filter`.
        config: recipe; default ``FP8Config(enabled=True)``.
        wgrad_store: recorded on every converted layer as ``wgrad_store`` (compatibility; deferral needs no
            attachment: the layers park their Wgrad in whichever :class:`WeightGradStore` has a ``defer`` open).

    A Linear referenced from several places (e.g. a head shared by two stage chunks) is converted once and the
    replacement is shared the same way. Already-converted layers are left alone (idempotent).

    Modules that are not ``nn.Linear`` but carry FP8-able weights (routed experts with stacked ``[E, D, O]``
    weights) opt in by defining ``enable_fp8(config, name, wgrad_store) -> bool``; it is called for every such
    module the filter accepts (see :mod:`raymoe.fp8.grouped`).
    """
    cfg = config if config is not None else FP8Config(enabled=True)
    pred = filter if filter is not None else default_fp8_filter(cfg)
    replaced: dict[int, nn.Module] = {}
    targets: list[tuple[nn.Module, str, nn.Linear, str]] = []
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for child_name, child in parent.named_children():
            if type(child) is not nn.Linear:  # exact type: leave FP8Linear and Linear subclasses alone
                continue
            qual = f"{parent_name}.{child_name}" if parent_name else child_name
            targets.append((parent, child_name, child, qual))
    for parent, child_name, child, qual in targets:
        if id(child) not in replaced:
            if not pred(qual, child):
                replaced[id(child)] = child
                continue
            new = FP8Linear.from_linear(child, cfg, qual)
            new.wgrad_store = wgrad_store
            replaced[id(child)] = new
        setattr(parent, child_name, replaced[id(child)])
    seen: set[int] = set()
    for qual, mod in list(model.named_modules()):
        hook = getattr(mod, "enable_fp8", None)
        if callable(hook) and not isinstance(mod, FP8LayerState) and id(mod) not in seen and pred(qual, mod):
            seen.add(id(mod))
            hook(cfg, qual, wgrad_store)
    return model


def invalidate_weight_caches(model: nn.Module) -> None:
    """Drop every FP8 layer's cached weight quantization (after loading weights by hand, e.g. via ``param.data``)."""
    for m in model.modules():
        if isinstance(m, FP8LayerState):
            m.invalidate_weight_cache()


def fp8_layers(model: nn.Module) -> dict[str, FP8LayerState]:
    """``{qualified_name: layer}`` of every FP8 layer (:class:`FP8Linear`, grouped expert GEMMs) in ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FP8LayerState)}
