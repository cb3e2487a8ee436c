"""Triton kernels under ``TRITON_INTERPRET=1`` on CPU: grids, masks, strides and scale indexing.

Run by ``test_fp8_triton.py`` in a fresh interpreter: ``TRITON_INTERPRET`` must be set before ``import triton``
(triton's own jit'd helpers, e.g. the combine functions behind ``tl.max``, are decorated at import time).

The interpreter's fp32→e4m3 cast and bf16 ``tl.dot`` are unreliable (docs/fp8.md §4), so quantization kernels are run
with **fp32** output buffers (q = x/s unrounded) and compared with loose tolerances; the GEMM kernel runs on fp32
data and, since the interpreter's e4m3 ``tl.dot`` is exact, also on real E4M3 operands quantized by torch. GPU
numerics are checked by ``scripts/gpu_check_fp8.py``.
"""
from __future__ import annotations

import importlib
import os

import pytest
import torch



@pytest.fixture(scope="module")
def kt():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("run through test_fp8_triton.py (needs TRITON_INTERPRET=1 before triton is imported)")
    mod = importlib.import_module("raymoe.fp8.kernels_triton")
    assert mod.INTERPRET
    return mod


def _tile_ref(x: torch.Tensor, tile: tuple[int, int], pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference (x/s, s) for tiles of ``tile`` shape with ragged edges, via zero padding."""
    R, C = x.shape
    tr, tc = tile
    Rp, Cp = -(-R // tr) * tr, -(-C // tc) * tc
    xp = torch.zeros(Rp, Cp)
    xp[:R, :C] = x
    amax = xp.view(Rp // tr, tr, Cp // tc, tc).abs().amax(dim=(1, 3))
    s = amax.clamp_min(1e-4) / 448.0
    if pow2:
        s = torch.exp2(torch.ceil(torch.log2(s)))
    s_full = s.repeat_interleave(tr, 0).repeat_interleave(tc, 1)[:R, :C]
    return x / s_full, s


@pytest.mark.parametrize("shape", [(100, 300), (16, 128), (33, 7)])
@pytest.mark.parametrize("pow2", [False, True])
def test_rows_quant_kernel(kt, shape, pow2) -> None:
    torch.manual_seed(0)
    x = torch.randn(*shape) * torch.logspace(-2, 2, shape[1])
    x[0, :] = 0.0  # all-zero tiles take the 1e-4 floor
    q, s = kt.act_quant(x, pow2=pow2, out_dtype=torch.float32)
    q_ref, s_ref = _tile_ref(x, (1, 128), pow2)
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(q, q_ref, rtol=1e-5, atol=1e-5)


def test_rows_quant_kernel_strided_input(kt) -> None:
    x = torch.randn(300, 64).T  # [64, 300] view with strides (1, 64)
    q, s = kt.act_quant(x, out_dtype=torch.float32)
    q_ref, s_ref = _tile_ref(x.contiguous(), (1, 128))
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(q, q_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(300, 70), (128, 32)])
def test_cols_quant_kernel(kt, shape) -> None:
    torch.manual_seed(1)
    x = torch.randn(*shape)
    q, s = kt.cols_quant(x, out_dtype=torch.float32)
    q_ref, s_ref = _tile_ref(x, (128, 1))
    assert s.shape == s_ref.shape
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(q, q_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(200, 300), (128, 128)])
def test_block_quant_kernel(kt, shape) -> None:
    torch.manual_seed(2)
    w = torch.randn(*shape) * 0.02
    w[130 % shape[0], 5] = 1.0
    q, s = kt.weight_quant(w, pow2=True, out_dtype=torch.float32)
    q_ref, s_ref = _tile_ref(w, (128, 128), pow2=True)
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(q, q_ref, rtol=1e-5, atol=1e-5)


def test_e4m3_store_path_close_to_torch(kt) -> None:
    """The fp8 store path runs; the interpreter's cast differs from torch's on a few % of elements (known bug)."""
    from raymoe.fp8 import quantize_act

    torch.manual_seed(3)
    x = torch.randn(16, 256)
    q, s = kt.act_quant(x)
    q_t, s_t = quantize_act(x)
    assert q.dtype == torch.float8_e4m3fn
    torch.testing.assert_close(s, s_t, rtol=1e-6, atol=0)
    differ = (q.float() != q_t.float()).float().mean().item()
    assert differ < 0.1, differ
    rel = ((q.float() - q_t.float()).abs() / q_t.float().abs().clamp_min(2.0**-6)).max().item()
    assert rel <= 0.5, rel  # at most a wrong rounding step / exponent carry, never garbage


def _ref_gemm(a, sa, b, sb, b_rows: bool) -> torch.Tensor:
    M, K = a.shape
    N = b.shape[0]
    sa_full = sa.double().repeat_interleave(128, 1)[:, :K]
    sb_rows = sb.double() if b_rows else sb.double().repeat_interleave(128, 0)[:N]
    sb_full = sb_rows.repeat_interleave(128, 1)[:, :K]
    return (a.double() * sa_full) @ (b.double() * sb_full).T


@pytest.mark.parametrize("b_rows", [False, True])
@pytest.mark.parametrize("mkn,bm,bn", [((70, 300, 200), 32, 64), ((16, 256, 128), 16, 128), ((5, 130, 3), 16, 32)])
def test_gemm_kernel_fp32_index_logic(kt, b_rows, mkn, bm, bn) -> None:
    torch.manual_seed(4)
    M, K, N = mkn
    a = torch.randn(M, K)
    b = torch.randn(N, K)
    kb = -(-K // 128)
    sa = torch.rand(M, kb) + 0.5
    sb = torch.rand(N if b_rows else -(-N // 128), kb) + 0.5
    c = kt.fp8_gemm(a, sa, b, sb, b_rows=b_rows, out_dtype=torch.float32, block_m=bm, block_n=bn)
    torch.testing.assert_close(c.double(), _ref_gemm(a, sa, b, sb, b_rows), rtol=1e-4, atol=1e-3)


def test_gemm_kernel_transposed_views(kt) -> None:
    """Dgrad uses Wᵀ and its block scales transposed; Wgrad uses dyᵀ/xᵀ with row scales — all as strided views."""
    torch.manual_seed(5)
    w = torch.randn(256, 384)  # [N, K]
    sw = torch.rand(2, 3) + 0.5
    dy = torch.randn(40, 256)  # [M, N]
    sdy = torch.rand(40, 2) + 0.5
    c = kt.fp8_gemm(dy, sdy, w.T, sw.T, out_dtype=torch.float32, block_m=16, block_n=64)
    torch.testing.assert_close(c.double(), _ref_gemm(dy, sdy, w.T.contiguous(), sw.T.contiguous(), False),
                               rtol=1e-4, atol=1e-3)
    x = torch.randn(200, 96)  # [M, K] tokens × in
    sx = torch.rand(2, 96) + 0.5  # 128×1 tiles along tokens
    g = torch.randn(200, 64)
    sg = torch.rand(2, 64) + 0.5
    dw = kt.fp8_gemm(g.T, sg.T, x.T, sx.T, b_rows=True, out_dtype=torch.float32, block_m=16, block_n=32)
    ref = _ref_gemm(g.T.contiguous(), sg.T.contiguous(), x.T.contiguous(), sx.T.contiguous(), True)
    torch.testing.assert_close(dw.double(), ref, rtol=1e-4, atol=1e-3)


def test_gemm_kernel_e4m3_operands_match_emulation(kt) -> None:
    """Real E4M3 operands (quantized by torch): the interpreter's fp8 tl.dot is exact, so this checks the fp8 path."""
    from raymoe.fp8 import fp8_gemm, quantize_act, quantize_weight

    torch.manual_seed(6)
    aq, sa = quantize_act(torch.randn(48, 384))
    wq, sw = quantize_weight(torch.randn(192, 384))
    c = kt.fp8_gemm(aq, sa, wq, sw, out_dtype=torch.float32, block_m=16, block_n=64)
    ref = fp8_gemm(aq, sa, wq, sw, out_dtype=torch.float32, compute_dtype=torch.float32, backend="emulate")
    torch.testing.assert_close(c, ref, rtol=1e-5, atol=1e-4)


def test_grouped_gemm_triton_backend_runs(kt) -> None:
    """FP8GroupedGEMM through the Triton back-end (per-expert kernels) vs the emulation; loose: interpreter casts."""
    from raymoe.fp8 import FP8Config, FP8GroupedGEMM, calc_diff

    torch.manual_seed(7)
    counts = torch.tensor([20, 0, 45])
    x = torch.randn(65, 128)
    w = torch.randn(3, 128, 96) * 0.05
    g = torch.randn(65, 96)
    outs = {}
    for be in ("emulate", "triton"):
        xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = FP8GroupedGEMM(FP8Config(enabled=True, backend=be), be)(xi, wi, counts)
        y.backward(g)
        outs[be] = (y, xi.grad, wi.grad)
    for a, b in zip(outs["triton"], outs["emulate"]):
        assert a.shape == b.shape and calc_diff(a, b) < 1e-2
