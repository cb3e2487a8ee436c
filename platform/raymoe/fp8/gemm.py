"""Block-scaled FP8 GEMM ``C = A·Bᵀ`` (DeepSeek-V3 §3.3.2; DeepGEMM's "NT" layout), three back-ends.

Semantics (identical for every back-end)
    ``A [M, K]`` E4M3 with 1×128 scales ``sa [M, ceil(K/128)]``; ``B [N, K]`` E4M3 (``nn.Linear`` layout) with either
    128×128 block scales ``sb [ceil(N/128), ceil(K/128)]`` (a weight) or 1×128 row scales ``sb [N, ceil(K/128)]``
    (the Wgrad operand, see :mod:`raymoe.fp8.quant`)::

        C[m, n] = Σ_kb ( Σ_{k ∈ kb} A[m, k] · B[n, k] ) · sa[m, kb] · sb[n // 128 | n, kb]

    i.e. the per-128-K partial sums are promoted to FP32 and scaled there (N_C = 128), accumulated in FP32, and the
    result is written in bf16 or fp32. Because the scales are constant within a K-block this equals
    ``dequant(A) @ dequant(B)ᵀ`` in exact arithmetic, which is what the emulation computes.

Back-ends (``backend="auto"`` picks per device)
    ``emulate``   CPU and anywhere: dequantize (fused kernels of :mod:`raymoe.fp8.quant`) to bf16 and run one bf16
                  GEMM (AMX on this CPU, FP32 accumulation inside). On CPU ``torch._scaled_mm`` runs at ~0.1 GFLOP/s,
                  so real FP8 math is never used there. Dequantized weights are cached by tensor identity + version
                  (a weight is reused by many GEMMs per optimizer step).
    ``triton``    CUDA: :mod:`raymoe.fp8.kernels_triton` (fp8 ``tl.dot`` per 128-K block, scales applied in FP32).
    ``scaled_mm`` CUDA sm90+: ``torch.nn.functional.scaled_mm`` with ``BlockWise1x128`` × ``BlockWise128x128``
                  (cuBLASLt, CUDA ≥ 12.9). Probed once; failure falls back to ``triton``.

Limited-precision accumulation
    :func:`fp8_gemm_limited_accum` emulates the H800 tensor core accumulator (about 14 kept bits: each group of 32
    products is aligned to the largest exponent and truncated, and so is the running sum) with and without FP32
    promotion every ``promote_every`` K-elements. It exists to show why N_C = 128 matters (paper: ~2 % max error at
    K = 4096 without promotion); it is slow and only meant for small M×N.
"""
from __future__ import annotations

import logging
import math
import weakref
from collections import OrderedDict
from typing import Literal

import torch

from raymoe.fp8.quant import BLOCK, E4M3, dequant_blocks, dequant_rows
from raymoe.fp8.step_counter import optimizer_step_count

__all__ = ["fp8_gemm", "gemm_nt", "resolve_backend", "fp8_gemm_limited_accum", "WeightDequantCache"]

log = logging.getLogger("raymoe.fp8")

Backend = Literal["auto", "emulate", "triton", "scaled_mm"]


# ------------------------------------------------------------------------------------------ back-end selection

_SCALED_MM_OK: dict[int, bool] = {}


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def _scaled_mm_supported(device: torch.device) -> bool:
    """Probe blockwise ``scaled_mm`` once per CUDA device (needs sm90+, CUDA 12.9+, torch with the v2 API)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SCALED_MM_OK:
        ok = False
        try:
            if hasattr(torch.nn.functional, "scaled_mm") and torch.cuda.get_device_capability(idx) >= (9, 0):
                a = torch.randn(128, 256, device=device).to(E4M3)
                b = torch.randn(128, 256, device=device).to(E4M3)
                sa = torch.ones(128, 2, device=device)
                sb = torch.ones(1, 2, device=device)
                ref = a.float() @ b.float().T
                out = _gemm_scaled_mm(a, sa, b, sb, torch.float32)
                ok = bool(torch.allclose(out, ref, rtol=1e-2, atol=1e-2))
        except Exception as e:  # noqa: BLE001
            log.info("blockwise scaled_mm unavailable on %s: %s", device, e)
        _SCALED_MM_OK[idx] = ok
    return _SCALED_MM_OK[idx]


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` → a concrete back-end for ``device``; validates explicit choices."""
    if backend == "auto":
        if device.type != "cuda":
            return "emulate"
        if _scaled_mm_supported(device):
            return "scaled_mm"
        return "triton" if _triton_available() else "emulate"
    if backend == "emulate":
        return backend
    if backend == "triton":
        if not _triton_available():
            raise RuntimeError("fp8 backend 'triton' requested but triton is not importable; pip install triton")
        return backend
    if backend == "scaled_mm":
        if device.type != "cuda":
            raise RuntimeError("fp8 backend 'scaled_mm' needs a CUDA device (on CPU it runs at ~0.1 GFLOP/s); "
                               "use backend='emulate'")
        return backend
    raise ValueError(f"unknown fp8 backend {backend!r}; choose auto, emulate, triton or scaled_mm")


# ------------------------------------------------------------------------------------------ weight cache


class WeightDequantCache:
    """Small LRU of dequantized ``B`` operands keyed by tensor identity and in-place version.

    A weight's FP8 form is used by every micro-batch's Fprop and Dgrad until the optimizer changes it; on CPU the
    E4M3 → bf16 upcast of a 2112×7168 weight costs more than an m=64 GEMM, so it is done once per version.
    Entries die with their tensors (weak references); ``_version`` and the process-wide optimizer-step count
    (:mod:`raymoe.fp8.step_counter`) catch updates (see :mod:`raymoe.fp8.linear`, "Weight cache validity").
    """

    def __init__(self, max_entries: int = 32) -> None:
        self.max_entries = max_entries
        self._d: OrderedDict[tuple, tuple] = OrderedDict()

    @staticmethod
    def _key(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype, rows: bool) -> tuple:
        return (id(q), q._version, id(s), s._version, optimizer_step_count(), dtype, rows, tuple(q.shape),
                tuple(q.stride()))

    def get(self, q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype, rows: bool) -> torch.Tensor:
        key = self._key(q, s, dtype, rows)
        hit = self._d.get(key)
        if hit is not None and hit[0]() is q and hit[1]() is s:
            self._d.move_to_end(key)
            return hit[2]
        deq = _dequant_b(q, s, dtype, rows)
        self._d[key] = (weakref.ref(q), weakref.ref(s), deq)
        while len(self._d) > self.max_entries:
            self._d.popitem(last=False)
        return deq

    def clear(self) -> None:
        self._d.clear()


_WEIGHT_CACHE = WeightDequantCache()


def _dequant_b(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype, rows: bool, compile: bool = False) -> torch.Tensor:
    return dequant_rows(q, s, dtype, compile=compile) if rows else dequant_blocks(q, s, dtype, compile=compile)


# ------------------------------------------------------------------------------------------ back-ends


def _gemm_emulate(a_deq: torch.Tensor, b_deq: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    out = a_deq @ b_deq.T  # bf16 × bf16 → fp32 accumulate (AMX) → bf16; fp32 × fp32 when asked for exactness
    return out if out.dtype == out_dtype else out.to(out_dtype)


def _gemm_scaled_mm(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor,
                    out_dtype: torch.dtype) -> torch.Tensor:
    """cuBLASLt blockwise path. Layout rules: scales of A token-major with M padded to 4, B's K-blocks padded to 4."""
    import torch.nn.functional as F

    M, K = a.shape
    if K % BLOCK:
        raise ValueError("scaled_mm blockwise needs K % 128 == 0")
    pm = -M % 4
    if pm:
        a = F.pad(a.view(torch.uint8), (0, 0, 0, pm)).view(E4M3)
        sa = F.pad(sa, (0, 0, 0, pm), value=1.0)
    kb = sb.shape[1]
    sb_p = F.pad(sb, (0, -kb % 4), value=1.0) if kb % 4 else sb
    out = F.scaled_mm(a.contiguous(), b.contiguous().T, sa.T.contiguous().T, F.ScalingType.BlockWise1x128,
                      sb_p.T, F.ScalingType.BlockWise128x128, output_dtype=out_dtype)
    return out[:M] if pm else out


def gemm_nt(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor, *,
            b_rows: bool = False, out_dtype: torch.dtype = torch.bfloat16, backend: str = "auto",
            compute_dtype: torch.dtype = torch.bfloat16, a_deq: torch.Tensor | None = None,
            b_deq: torch.Tensor | None = None, cache_b: bool = True, compile: bool = False,
            accum_bits: int | None = None, promote_every: int = 128) -> torch.Tensor:
    """2-D core of :func:`fp8_gemm`: ``a_q [M, K]`` (rows) × ``b_q [N, K]`` (blocks, or rows when ``b_rows``).

    ``a_deq``/``b_deq`` (emulation only) are already-dequantized operands from a fused quantize-dequantize kernel;
    passing them skips the upcast. Arbitrary strides are accepted (transposed views are how Dgrad/Wgrad reuse data).
    ``accum_bits`` switches to the (slow) limited-precision accumulator of :func:`fp8_gemm_limited_accum`.
    """
    if accum_bits is not None:
        return fp8_gemm_limited_accum(a_q, a_s, b_q, b_s, mantissa_bits=accum_bits, promote_every=promote_every,
                                      b_rows=b_rows).to(out_dtype)
    be = resolve_backend(backend, a_q.device)
    if be == "emulate":
        if a_deq is None:
            a_deq = dequant_rows(a_q, a_s, compute_dtype, compile=compile)
        if b_deq is None:
            b_deq = (_WEIGHT_CACHE.get(b_q, b_s, compute_dtype, b_rows) if cache_b
                     else _dequant_b(b_q, b_s, compute_dtype, b_rows, compile=compile))
        return _gemm_emulate(a_deq.to(compute_dtype), b_deq.to(compute_dtype), out_dtype)
    if be == "triton":
        from raymoe.fp8 import kernels_triton

        return kernels_triton.fp8_gemm(a_q, a_s, b_q, b_s, b_rows=b_rows, out_dtype=out_dtype)
    if be == "scaled_mm" and not b_rows:
        return _gemm_scaled_mm(a_q, a_s, b_q, b_s, out_dtype)
    # scaled_mm has no 1x128 × 1x128 (Wgrad) mode in this form: use triton for it.
    from raymoe.fp8 import kernels_triton

    return kernels_triton.fp8_gemm(a_q, a_s, b_q, b_s, b_rows=b_rows, out_dtype=out_dtype)


def fp8_gemm(a_q: torch.Tensor, a_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, *,
             out_dtype: torch.dtype = torch.bfloat16, backend: Backend = "auto",
             compute_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Block-scaled FP8 GEMM ``a @ wᵀ`` with FP32 promotion per 128-K block.

    Args:
        a_q: ``[..., K]`` ``float8_e4m3fn`` activations.
        a_scale: ``[..., ceil(K/128)]`` fp32 1×128 scales (from :func:`~raymoe.fp8.quantize_act`).
        w_q: ``[N, K]`` ``float8_e4m3fn`` weight (``nn.Linear`` layout).
        w_scale: ``[ceil(N/128), ceil(K/128)]`` fp32 block scales (from :func:`~raymoe.fp8.quantize_weight`).
        out_dtype: ``torch.bfloat16`` or ``torch.float32``.
        backend: ``auto`` | ``emulate`` | ``triton`` | ``scaled_mm``.
        compute_dtype: emulation only: dtype of the dequantized operands (bf16 = fast AMX path; fp32 = exact).

    Returns:
        ``[..., N]`` in ``out_dtype``.
    """
    if a_q.dtype != E4M3 or w_q.dtype != E4M3:
        raise TypeError(f"fp8_gemm expects float8_e4m3fn operands, got {a_q.dtype} and {w_q.dtype}")
    if out_dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"fp8_gemm out_dtype must be bf16 or fp32, got {out_dtype}")
    if w_q.dim() != 2:
        raise ValueError(f"w_q must be [N, K], got shape {tuple(w_q.shape)}")
    K = a_q.shape[-1]
    N = w_q.shape[0]
    kb = math.ceil(K / BLOCK)
    if w_q.shape[1] != K:
        raise ValueError(f"inner dims differ: a_q [..., {K}] vs w_q {tuple(w_q.shape)}")
    if a_scale.shape != (*a_q.shape[:-1], kb):
        raise ValueError(f"a_scale must be {(*a_q.shape[:-1], kb)} (1x128 tiles), got {tuple(a_scale.shape)}")
    if w_scale.shape != (math.ceil(N / BLOCK), kb):
        raise ValueError(f"w_scale must be {(math.ceil(N / BLOCK), kb)} (128x128 blocks), got {tuple(w_scale.shape)}")
    lead = a_q.shape[:-1]
    out = gemm_nt(a_q.reshape(-1, K), a_scale.reshape(-1, kb).float(), w_q, w_scale.float(),
                  out_dtype=out_dtype, backend=backend, compute_dtype=compute_dtype)
    return out.reshape(*lead, N)


# ------------------------------------------------------------------------------------------ accumulation study


def _truncate(v: torch.Tensor, quantum: torch.Tensor) -> torch.Tensor:
    return torch.trunc(v / quantum) * quantum


def fp8_gemm_limited_accum(a_q: torch.Tensor, a_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, *,
                           mantissa_bits: int = 14, promote_every: int = 128, group: int = 32,
                           b_rows: bool = False) -> torch.Tensor:
    """Emulate a tensor-core accumulator that keeps ``mantissa_bits`` bits, with FP32 promotion every
    ``promote_every`` K-elements (``0`` = never: the whole K stays in the limited accumulator).

    Model: products are formed exactly (E4M3 × E4M3 fits in 8 bits). For each group of ``group`` products the
    largest exponent among the products and the running sum sets the alignment; every addend and the running sum
    are truncated toward zero to ``mantissa_bits`` bits below it, then added. At each promotion the running sum is
    multiplied by the two block scales and added into an FP32 (here fp64) accumulator. Without promotion the block
    scales are folded into the products (equivalent to per-tensor scaling up to a power of two).

    Args:
        a_q, a_scale, w_q, w_scale: as :func:`fp8_gemm`, 2-D (``w_scale`` per row when ``b_rows``). K is zero-padded
            to a multiple of 128 internally.

    Returns:
        ``[M, N]`` float32. Memory is ``M·N·group`` doubles per step: keep ``M·N`` small (e.g. 32×128).
    """
    M, K = a_q.shape
    N = w_q.shape[0]
    if BLOCK % group:
        raise ValueError("group must divide 128")
    if promote_every and (promote_every % group or BLOCK % promote_every):
        raise ValueError("promote_every must be 0 or a multiple of group that divides 128 (scales change every 128)")
    Kp = math.ceil(K / BLOCK) * BLOCK
    a = torch.zeros(M, Kp, dtype=torch.float64, device=a_q.device)
    w = torch.zeros(N, Kp, dtype=torch.float64, device=w_q.device)
    a[:, :K] = a_q.double()
    w[:, :K] = w_q.double()
    sa = a_scale.double()  # [M, Kb]
    sw = w_scale.double() if b_rows else w_scale.double().repeat_interleave(BLOCK, 0)[:N]  # [N, Kb]
    if not promote_every:
        a = a * sa.repeat_interleave(BLOCK, 1)
        w = w * sw.repeat_interleave(BLOCK, 1)
    tiny = torch.finfo(torch.float64).tiny
    out = torch.zeros(M, N, dtype=torch.float64, device=a.device)
    acc = torch.zeros(M, N, dtype=torch.float64, device=a.device)
    span = promote_every or Kp
    for k0 in range(0, Kp, group):
        p = a[:, None, k0:k0 + group] * w[None, :, k0:k0 + group]  # [M, N, group] exact products
        mx = torch.maximum(p.abs().amax(-1), acc.abs()).clamp_min(tiny)
        quantum = torch.exp2(torch.floor(torch.log2(mx)) - (mantissa_bits - 1))
        acc = _truncate(acc, quantum) + _truncate(p, quantum[..., None]).sum(-1)
        if (k0 + group) % span == 0:
            if promote_every:
                kb = k0 // BLOCK
                acc = acc * sa[:, kb, None] * sw[None, :, kb]
            out += acc
            acc.zero_()
    return out.float()
