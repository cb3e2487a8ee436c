"""Block-scaled FP8 GEMM: DeepGEMM shapes (calc_diff < 1e-3), per-K-block formula, back-end choice, accumulation."""
from __future__ import annotations

import pytest
import torch

from raymoe.fp8 import (
    calc_diff,
    dequantize_act,
    dequantize_weight,
    fp8_gemm,
    fp8_gemm_limited_accum,
    quantize_act,
    quantize_weight,
    resolve_backend,
)

DEEPGEMM_KN = [(7168, 2112), (1536, 24576), (512, 32768), (16384, 7168), (7168, 4096), (2048, 7168)]


@pytest.mark.parametrize("k,n", DEEPGEMM_KN)
def test_calc_diff_deepgemm_shapes(k: int, n: int) -> None:
    """DeepGEMM's test at m = 64: bf16 randn inputs, blockwise FP8 vs fp32 reference; expected ≈ 6.8e-4."""
    torch.manual_seed(0)
    x = torch.randn(64, k, dtype=torch.bfloat16)
    w = torch.randn(n, k, dtype=torch.bfloat16)
    ref = x.float() @ w.float().T
    aq, as_ = quantize_act(x)
    wq, ws = quantize_weight(w)
    del w
    out = fp8_gemm(aq, as_, wq, ws)
    assert out.dtype == torch.bfloat16 and out.shape == (64, n)
    d = calc_diff(out, ref)
    assert 4e-4 < d < 1e-3, d


def test_matches_per_k_block_formula() -> None:
    """C[m,n] = Σ_kb dot(A[m,kb], B[n,kb]) · sa[m,kb] · sb[n//128,kb], computed with an explicit loop in float64."""
    torch.manual_seed(1)
    M, K, N = 37, 300, 200
    a = torch.randn(M, K) * torch.rand(M, 1) * 4
    w = torch.randn(N, K)
    aq, sa = quantize_act(a)
    wq, sw = quantize_weight(w)
    A, B = aq.double(), wq.double()
    ref = torch.zeros(M, N, dtype=torch.float64)
    for kb in range(sa.shape[1]):
        ks = slice(kb * 128, (kb + 1) * 128)
        part = A[:, ks] @ B[:, ks].T
        ref += part * sa[:, kb, None].double() * sw[:, kb].double().repeat_interleave(128)[:N][None, :]
    exact = fp8_gemm(aq, sa, wq, sw, out_dtype=torch.float32, compute_dtype=torch.float32)
    torch.testing.assert_close(exact.double(), ref, rtol=1e-5, atol=1e-4)
    fast = fp8_gemm(aq, sa, wq, sw)  # bf16 dequant + bf16 output: within bf16 rounding of the exact result
    assert calc_diff(fast, ref) < 1e-5


def test_batched_leading_dims_and_weight_cache_tracks_updates() -> None:
    torch.manual_seed(2)
    x = torch.randn(2, 3, 256)
    w = torch.randn(128, 256)
    aq, as_ = quantize_act(x)
    wq, ws = quantize_weight(w)
    y1 = fp8_gemm(aq, as_, wq, ws, out_dtype=torch.float32)
    assert y1.shape == (2, 3, 128)
    ref = dequantize_act(aq, as_) @ dequantize_weight(wq, ws).T
    assert calc_diff(y1, ref) < 1e-5
    ws.mul_(2.0)  # in-place change → version bump → the cached dequantized weight must not be reused
    y2 = fp8_gemm(aq, as_, wq, ws, out_dtype=torch.float32)
    torch.testing.assert_close(y2, 2 * y1, rtol=1e-2, atol=1e-2)


def test_validation_errors() -> None:
    aq, as_ = quantize_act(torch.randn(4, 256))
    wq, ws = quantize_weight(torch.randn(128, 256))
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        fp8_gemm(aq.float(), as_, wq, ws)
    with pytest.raises(ValueError, match="128x128"):
        fp8_gemm(aq, as_, wq, as_)
    with pytest.raises(ValueError, match="inner dims"):
        fp8_gemm(aq, as_, wq[:, :128], ws[:, :1])
    with pytest.raises(ValueError, match="out_dtype"):
        fp8_gemm(aq, as_, wq, ws, out_dtype=torch.float16)


def test_backend_resolution_on_cpu() -> None:
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "emulate"
    with pytest.raises(RuntimeError, match="CUDA"):
        resolve_backend("scaled_mm", cpu)
    with pytest.raises(ValueError, match="unknown fp8 backend"):
        resolve_backend("cutlass", cpu)


def test_promotion_every_128_beats_limited_accumulation() -> None:
    """docs/fp8.md §3: 14-bit accumulator, K = 4096, 32×128 output — promotion is ~10× more accurate."""
    torch.manual_seed(3)
    a = torch.randn(32, 4096)
    w = torch.randn(128, 4096)
    aq, sa = quantize_act(a)
    wq, sw = quantize_weight(w)
    exact = dequantize_act(aq, sa).double() @ dequantize_weight(wq, sw).double().T
    rel = {}
    for pe in (0, 128):
        out = fp8_gemm_limited_accum(aq, sa, wq, sw, mantissa_bits=14, promote_every=pe)
        rel[pe] = ((out.double() - exact).norm() / exact.norm()).item()
    assert 5e-4 < rel[0] < 1e-2, rel
    assert rel[128] < rel[0] / 8, rel
    # with a full-precision accumulator the emulation reproduces the exact product
    full = fp8_gemm_limited_accum(aq, sa, wq, sw, mantissa_bits=53, promote_every=128)
    torch.testing.assert_close(full.double(), exact, rtol=1e-5, atol=1e-3)


def test_limited_accumulation_knob_in_fp8linear() -> None:
    """FP8Config.accum_mantissa_bits routes an FP8Linear's GEMMs through the limited accumulator (ablation knob)."""
    from torch import nn

    from raymoe.fp8 import FP8Config, FP8Linear

    torch.manual_seed(4)
    base = nn.Linear(1024, 32, bias=False)
    x = torch.randn(16, 1024)
    ref = x @ base.weight.T
    errs = {}
    for name, cfg in {"fp32": FP8Config(enabled=True),
                      "nc128": FP8Config(enabled=True, accum_mantissa_bits=10, promote_every=128),
                      "none": FP8Config(enabled=True, accum_mantissa_bits=10, promote_every=0)}.items():
        with torch.no_grad():
            errs[name] = calc_diff(FP8Linear.from_linear(base, cfg, name)(x), ref)
    # E4M3 rounding dominates calc_diff; the 10-bit accumulator adds visibly only without promotion
    assert errs["fp32"] < 1e-3 and errs["nc128"] < 1.05 * errs["fp32"] and errs["none"] > 1.15 * errs["nc128"], errs
