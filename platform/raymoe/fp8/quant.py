"""Block-wise E4M3 quantization (DeepSeek-V3 §3.3.2), in plain torch ops.

Recipe
    Every tensor that enters an FP8 GEMM is stored as ``q`` (``torch.float8_e4m3fn``, same shape as the original) and
    fp32 scales ``s`` such that ``x ≈ q · s`` tile by tile. Scales are computed online from the tile itself:
    ``s = max(amax, 1e-4) / 448`` (448 is the largest finite E4M3 value), so each tile uses the whole E4M3 range and
    an outlier only costs the 127 other values of its own tile their precision. The ``1e-4`` clamp keeps an all-zero
    tile from giving ``0/0``. With ``pow2=True`` the scale is rounded *up* to a power of two (DeepSeek's ``ue8m0``):
    dequantization ``q·s`` is then exact in any binary format and re-tiling loses nothing for values that were
    representable before.

Layouts (names used across the package; "tile" = the set of elements that share one scale)
    ``rows``    1×128 tiles along the last dim. Activations and activation gradients (per token). ``x [R, K]`` →
                ``s [R, ceil(K/128)]``.
    ``cols``    128×1 tiles along dim 0. The Wgrad operands: ``dW = dyᵀ·x`` contracts over tokens, so both ``dy`` and
                the cached ``x`` are re-tiled along the token axis. ``x [R, K]`` → ``s [ceil(R/128), K]``.
    ``blocks``  128×128 blocks. Weights. ``w [N, K]`` → ``s [ceil(N/128), ceil(K/128)]``. Symmetric under transpose:
                the Dgrad GEMM ``dx = dy·W`` reuses the Fprop quantization through ``q.T``/``s.T``.
    Shapes that are not multiples of 128 are zero-padded to the next multiple before the amax is taken (zeros never
    raise an amax) and the padding is cut off ``q`` again, so ``q`` always has the input's shape.

Dtypes
    ``q`` is E4M3 for every tensor, gradients included (the paper's choice; fine-grained scales make the 4-bit
    exponent enough). Scales are fp32. Dequantized values are produced directly in the compute dtype (bf16 for the
    CPU emulation: an E4M3 value times an fp32 scale rounded to bf16 adds a 2⁻⁹ relative error, far below E4M3's 2⁻⁴).

Trade-off
    On CPU the cost of emulation is memory passes, not FLOPs: a naive eager QDQ is 6–10× a bf16 GEMM on this machine
    (measured on 2 cores at 2048³: 67–90 ms against 10 ms; an E4M3→bf16 cast of 4096² alone takes ~65 ms), mostly
    the E4M3→bf16 upcast. Every kernel here therefore comes in a fused "quantize +
    dequantize" form (``qdq_*``) returning ``(q, s, deq)`` in one pass, and can run through ``torch.compile`` (Inductor
    fuses the whole tile computation into one loop: ~4.5× faster than eager, bit-identical). Eager stays the default
    because a cold compile costs ~22 s; :class:`~raymoe.fp8.config.FP8Config` ``compile=True`` switches it on.

Example::

    >>> x = torch.tensor([[1.0] * 127 + [448.0 * 2]])
    >>> q, s = quantize_act(x)
    >>> s                                    # amax 896 / 448
    tensor([[2.]])
    >>> q.float()[0, -1].item(), q.float()[0, 0].item()
    (448.0, 0.5)
"""
from __future__ import annotations

import logging
import math
import types
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "E4M3",
    "E4M3_MAX",
    "AMAX_FLOOR",
    "BLOCK",
    "quantize_act",
    "quantize_weight",
    "quantize_cols",
    "dequantize_act",
    "dequantize_weight",
    "dequantize_cols",
    "retile_rows_to_cols",
    "quantize_per_tensor",
    "calc_diff",
    "qdq_rows",
    "qdq_cols",
    "qdq_blocks",
    "dequant_rows",
    "dequant_cols",
    "dequant_blocks",
    "retile_qdq",
]

log = logging.getLogger("raymoe.fp8")

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
AMAX_FLOOR = 1e-4
BLOCK = 128


# ----------------------------------------------------------------------------------------------------- kernels
# Each `_k_*` works on a 2-D tensor whose tiled dims are already multiples of 128 and is written so that Inductor
# fuses it into one loop. They are wrapped by `_Kernel` (eager or compiled) and called through the padded public
# helpers below.


def _scale(amax: torch.Tensor, pow2: bool) -> torch.Tensor:
    s = amax.float().clamp_min(AMAX_FLOOR) / E4M3_MAX  # NaN amax stays NaN (clamp propagates NaN): the guard sees it
    if pow2:
        s = torch.exp2(torch.ceil(torch.log2(s)))
    return s


def _to_e4m3(v: torch.Tensor) -> torch.Tensor:
    # |v| <= 448 up to the rounding of x/s. torch's fp32 → e4m3fn cast saturates finite values to ±448 (checked by
    # test_cast_saturates), so no clamp pass is needed; NaN stays NaN for the guard.
    return v.to(E4M3)


def _k_quant_rows(x: torch.Tensor, pow2: bool, out_dtype: torch.dtype | None):
    R, K = x.shape
    xt = x.float().view(R, K // BLOCK, BLOCK)
    s = _scale(xt.abs().amax(dim=-1, keepdim=True), pow2)  # [R, Kb, 1]
    q = _to_e4m3(xt / s)
    deq = None if out_dtype is None else (q.float() * s).to(out_dtype).view(R, K)
    return q.view(R, K), s.view(R, K // BLOCK), deq


def _k_quant_cols(x: torch.Tensor, pow2: bool, out_dtype: torch.dtype | None):
    R, K = x.shape
    xt = x.float().view(R // BLOCK, BLOCK, K)
    s = _scale(xt.abs().amax(dim=1, keepdim=True), pow2)  # [Rb, 1, K]
    q = _to_e4m3(xt / s)
    deq = None if out_dtype is None else (q.float() * s).to(out_dtype).view(R, K)
    return q.view(R, K), s.view(R // BLOCK, K), deq


def _k_quant_blocks(w: torch.Tensor, pow2: bool, out_dtype: torch.dtype | None):
    N, K = w.shape
    wt = w.float().view(N // BLOCK, BLOCK, K // BLOCK, BLOCK)
    s = _scale(wt.abs().amax(dim=(1, 3), keepdim=True), pow2)  # [Nb, 1, Kb, 1]
    q = _to_e4m3(wt / s)
    deq = None if out_dtype is None else (q.float() * s).to(out_dtype).view(N, K)
    return q.view(N, K), s.view(N // BLOCK, K // BLOCK), deq


def _k_dequant_rows(q: torch.Tensor, s: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    R, K = q.shape
    return (q.float().view(R, K // BLOCK, BLOCK) * s.view(R, K // BLOCK, 1)).to(out_dtype).view(R, K)


def _k_dequant_cols(q: torch.Tensor, s: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    R, K = q.shape
    return (q.float().view(R // BLOCK, BLOCK, K) * s.view(R // BLOCK, 1, K)).to(out_dtype).view(R, K)


def _k_dequant_blocks(q: torch.Tensor, s: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    N, K = q.shape
    Nb, Kb = N // BLOCK, K // BLOCK
    return (q.float().view(Nb, BLOCK, Kb, BLOCK) * s.view(Nb, 1, Kb, 1)).to(out_dtype).view(N, K)


def _k_retile(q: torch.Tensor, s: torch.Tensor, pow2: bool, out_dtype: torch.dtype | None):
    """rows-quantized ``(q, s)`` → dequantize → cols-quantize, fused (Wgrad's 1×128 → 128×1 re-tiling)."""
    R, K = q.shape
    x = q.float().view(R, K // BLOCK, BLOCK) * s.view(R, K // BLOCK, 1)
    return _k_quant_cols(x.view(R, K), pow2, out_dtype)


class _Kernel:
    """A kernel callable eagerly or through ``torch.compile``; compile failures fall back to eager once, loudly.

    One compiled callable per static signature (input dtypes, ``pow2``, ``out_dtype``, device) with dynamic shapes,
    so that Dynamo never re-specializes inside one callable (it gives up after 8 recompiles and silently runs eager).
    Kernels always run with autocast off: quantization must see the real dtypes, and an autocast flip would
    otherwise be a guard failure and a recompile.
    """

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self._compiled: dict[tuple, Callable] = {}
        self._broken = False

    def _private_copy(self, i: int) -> Callable:
        # Dynamo keeps its cache (and its recompile limit) on the code object: give each signature its own.
        f = self.fn
        code = f.__code__.replace(co_name=f"{f.__name__}_sig{i}")
        return types.FunctionType(code, f.__globals__, code.co_name, f.__defaults__, f.__closure__)

    def __call__(self, *args, compile: bool = False):
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            if compile and not self._broken:
                key = tuple((a.dtype, a.device.type) if isinstance(a, torch.Tensor) else a for a in args)
                try:
                    fn = self._compiled.get(key)
                    if fn is None:
                        fn = self._compiled[key] = torch.compile(self._private_copy(len(self._compiled)),
                                                                 dynamic=True)
                    return fn(*args)
                except Exception as e:  # noqa: BLE001 — any compiler failure means "use eager"
                    self._broken = True
                    warnings.warn(f"torch.compile of {self.fn.__name__} failed ({type(e).__name__}: {e}); "
                                  "using eager")
            return self.fn(*args)


_QUANT_ROWS = _Kernel(_k_quant_rows)
_QUANT_COLS = _Kernel(_k_quant_cols)
_QUANT_BLOCKS = _Kernel(_k_quant_blocks)
_DEQUANT_ROWS = _Kernel(_k_dequant_rows)
_DEQUANT_COLS = _Kernel(_k_dequant_cols)
_DEQUANT_BLOCKS = _Kernel(_k_dequant_blocks)
_RETILE = _Kernel(_k_retile)


# ----------------------------------------------------------------------------------------------------- helpers


def _pad_to(n: int) -> int:
    return -n % BLOCK


def _check_float(x: torch.Tensor, what: str) -> None:
    if not x.is_floating_point() or x.dtype in (E4M3, torch.float8_e5m2):
        raise TypeError(f"{what} must be a bf16/fp16/fp32 tensor, got {x.dtype}")


def _check_q(q: torch.Tensor, what: str) -> None:
    if q.dtype != E4M3:
        raise TypeError(f"{what} must be torch.float8_e4m3fn, got {q.dtype}")


# ------------------------------------------------------------------------------------------ fused 2-D entries
# Used by FP8Linear / fp8_gemm. `out_dtype=None` skips the dequantized copy.


def qdq_rows(x2d: torch.Tensor, *, pow2: bool = False, out_dtype: torch.dtype | None = torch.bfloat16,
             compile: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """1×128 quantization of ``x2d [R, K]`` → ``q [R, K]`` E4M3, ``s [R, ceil(K/128)]`` fp32, ``deq [R, K]`` or None."""
    R, K = x2d.shape
    pk = _pad_to(K)
    xp = F.pad(x2d, (0, pk)) if pk else x2d.contiguous()
    q, s, deq = _QUANT_ROWS(xp, pow2, out_dtype, compile=compile)
    if pk:
        q = q[:, :K]
        deq = None if deq is None else deq[:, :K]
    return q, s, deq


def qdq_cols(x2d: torch.Tensor, *, pow2: bool = False, out_dtype: torch.dtype | None = torch.bfloat16,
             compile: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """128×1 quantization of ``x2d [R, K]`` → ``q [R, K]``, ``s [ceil(R/128), K]``, ``deq [R, K]`` or None."""
    R, K = x2d.shape
    pr = _pad_to(R)
    xp = F.pad(x2d, (0, 0, 0, pr)) if pr else x2d.contiguous()
    q, s, deq = _QUANT_COLS(xp, pow2, out_dtype, compile=compile)
    if pr:
        q = q[:R]
        deq = None if deq is None else deq[:R]
    return q, s, deq


def qdq_blocks(w: torch.Tensor, *, pow2: bool = False, out_dtype: torch.dtype | None = torch.bfloat16,
               compile: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """128×128 quantization of ``w [N, K]`` → ``q [N, K]``, ``s [ceil(N/128), ceil(K/128)]``, ``deq`` or None."""
    N, K = w.shape
    pn, pk = _pad_to(N), _pad_to(K)
    wp = F.pad(w, (0, pk, 0, pn)) if (pn or pk) else w.contiguous()
    q, s, deq = _QUANT_BLOCKS(wp, pow2, out_dtype, compile=compile)
    if pn or pk:
        q = q[:N, :K]
        deq = None if deq is None else deq[:N, :K]
    return q, s, deq


def dequant_rows(q: torch.Tensor, s: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16, *,
                 compile: bool = False) -> torch.Tensor:
    """``q [R, K]`` (rows layout) · ``s [R, ceil(K/128)]`` → ``[R, K]`` in ``out_dtype``."""
    R, K = q.shape
    pk = _pad_to(K)
    qp = F.pad(q.view(torch.uint8), (0, pk)).view(E4M3) if pk else q.contiguous()
    out = _DEQUANT_ROWS(qp, s.contiguous(), out_dtype, compile=compile)
    return out[:, :K] if pk else out


def dequant_cols(q: torch.Tensor, s: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16, *,
                 compile: bool = False) -> torch.Tensor:
    """``q [R, K]`` (cols layout) · ``s [ceil(R/128), K]`` → ``[R, K]``."""
    R, K = q.shape
    pr = _pad_to(R)
    qp = F.pad(q.view(torch.uint8), (0, 0, 0, pr)).view(E4M3) if pr else q.contiguous()
    out = _DEQUANT_COLS(qp, s.contiguous(), out_dtype, compile=compile)
    return out[:R] if pr else out


def dequant_blocks(q: torch.Tensor, s: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16, *,
                   compile: bool = False) -> torch.Tensor:
    """``q [N, K]`` · ``s [ceil(N/128), ceil(K/128)]`` (block-broadcast) → ``[N, K]``."""
    N, K = q.shape
    pn, pk = _pad_to(N), _pad_to(K)
    qp = F.pad(q.view(torch.uint8), (0, pk, 0, pn)).view(E4M3) if (pn or pk) else q.contiguous()
    out = _DEQUANT_BLOCKS(qp, s.contiguous(), out_dtype, compile=compile)
    return out[:N, :K] if (pn or pk) else out


def retile_qdq(q: torch.Tensor, s: torch.Tensor, *, pow2: bool = False,
               out_dtype: torch.dtype | None = torch.bfloat16, compile: bool = False):
    """Rows-layout ``(q [R, K], s [R, ceil(K/128)])`` → cols layout ``(q', s' [ceil(R/128), K], deq)``."""
    R, K = q.shape
    pr, pk = _pad_to(R), _pad_to(K)
    if pr or pk:
        # Rare path (token counts not multiple of 128): dequantize, pad, re-quantize.
        x = dequant_rows(q, s, torch.float32, compile=compile)
        return qdq_cols(x, pow2=pow2, out_dtype=out_dtype, compile=compile)
    return _RETILE(q.contiguous(), s.contiguous(), pow2, out_dtype, compile=compile)


# ------------------------------------------------------------------------------------------ public interface


def quantize_act(x: torch.Tensor, *, pow2: bool = False, compile: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token 1×128 E4M3 quantization of an activation (or activation gradient).

    Args:
        x: ``[..., K]`` bf16/fp16/fp32. ``K`` need not be a multiple of 128 (the last tile is zero-padded).
        pow2: round scales up to powers of two.
        compile: run the fused kernel through ``torch.compile``.

    Returns:
        ``q [..., K]`` ``float8_e4m3fn`` and ``scale [..., ceil(K/128)]`` fp32 with ``x ≈ q · scale`` per tile.
    """
    _check_float(x, "quantize_act input")
    if x.dim() == 0:
        raise ValueError("quantize_act needs at least one dimension")
    K = x.shape[-1]
    q, s, _ = qdq_rows(x.reshape(-1, K), pow2=pow2, out_dtype=None, compile=compile)
    return q.reshape(x.shape), s.reshape(*x.shape[:-1], s.shape[-1])


def quantize_weight(w: torch.Tensor, *, pow2: bool = False, compile: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """128×128 block E4M3 quantization of a weight in ``nn.Linear`` layout.

    Args:
        w: ``[N, K]`` (out × in). Non-multiples of 128 are zero-padded per block.

    Returns:
        ``q [N, K]`` ``float8_e4m3fn`` and ``scale [ceil(N/128), ceil(K/128)]`` fp32 (a multiplier, like the HF
        checkpoint's ``weight_scale_inv``).
    """
    _check_float(w, "quantize_weight input")
    if w.dim() != 2:
        raise ValueError(f"quantize_weight expects a 2-D [N, K] weight, got shape {tuple(w.shape)}")
    q, s, _ = qdq_blocks(w, pow2=pow2, out_dtype=None, compile=compile)
    return q, s


def quantize_cols(x: torch.Tensor, *, pow2: bool = False, compile: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """128×1 quantization along dim 0 of ``x [R, K]`` → ``q [R, K]``, ``scale [ceil(R/128), K]``."""
    _check_float(x, "quantize_cols input")
    if x.dim() != 2:
        raise ValueError(f"quantize_cols expects a 2-D tensor, got shape {tuple(x.shape)}")
    q, s, _ = qdq_cols(x, pow2=pow2, out_dtype=None, compile=compile)
    return q, s


def dequantize_act(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_act`: ``q [..., K]``, ``scale [..., ceil(K/128)]`` → ``[..., K]`` in ``dtype``."""
    _check_q(q, "dequantize_act q")
    K = q.shape[-1]
    if scale.shape != (*q.shape[:-1], math.ceil(K / BLOCK)):
        raise ValueError(f"scale shape {tuple(scale.shape)} does not match q {tuple(q.shape)} with 1x128 tiles")
    out = dequant_rows(q.reshape(-1, K), scale.reshape(-1, scale.shape[-1]), dtype)
    return out.reshape(q.shape)


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_weight`: ``y[i, j] = q[i, j] · scale[i // 128, j // 128]``."""
    _check_q(q, "dequantize_weight q")
    N, K = q.shape
    if scale.shape != (math.ceil(N / BLOCK), math.ceil(K / BLOCK)):
        raise ValueError(f"scale shape {tuple(scale.shape)} does not match q {tuple(q.shape)} with 128x128 blocks")
    return dequant_blocks(q, scale, dtype)


def dequantize_cols(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_cols`."""
    _check_q(q, "dequantize_cols q")
    return dequant_cols(q, scale, dtype)


def retile_rows_to_cols(q: torch.Tensor, scale: torch.Tensor, *, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-tile a 1×128-quantized ``[R, K]`` tensor as 128×1 tiles (dequantize, re-quantize along dim 0).

    Exact (``dequantize_cols(*out) == dequantize_act(q, scale)``) when both tilings use power-of-two scales and no
    value drops below E4M3's subnormal range in its new tile; otherwise adds one more rounding.
    """
    _check_q(q, "retile q")
    q2, s2, _ = retile_qdq(q, scale, pow2=pow2, out_dtype=None)
    return q2, s2


def quantize_per_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale for the whole tensor (the baseline fine-grained scaling is compared against)."""
    _check_float(x, "quantize_per_tensor input")
    s = _scale(x.abs().amax(), pow2=False)
    return _to_e4m3(x.float() / s), s


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's similarity error ``1 − 2·Σxy / Σ(x² + y²)`` in float64 (0 for identical tensors)."""
    x, y = x.detach().double(), y.detach().double()
    denom = (x * x + y * y).sum()
    return float(1 - 2 * (x * y).sum() / denom) if denom > 0 else 0.0
