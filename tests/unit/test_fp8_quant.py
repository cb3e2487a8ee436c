"""Block quantization: scales, round-trip error bounds, padding, power-of-two scales, re-tiling, outliers.

References are written independently of the implementation (explicit loops over tiles, float64).
"""
from __future__ import annotations

import math

import pytest
import torch

from raymoe.fp8 import (
    AMAX_FLOOR,
    E4M3,
    E4M3_MAX,
    calc_diff,
    dequantize_act,
    dequantize_cols,
    dequantize_weight,
    quantize_act,
    quantize_cols,
    quantize_weight,
    retile_rows_to_cols,
)


def _ref_tile_scales(x: torch.Tensor, tile_r: int, tile_c: int) -> torch.Tensor:
    """Loop reference: scale of every (tile_r × tile_c) tile of a 2-D tensor, ragged edges included."""
    R, C = x.shape
    out = torch.empty(math.ceil(R / tile_r), math.ceil(C / tile_c), dtype=torch.float64)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            t = x[i * tile_r:(i + 1) * tile_r, j * tile_c:(j + 1) * tile_c].double()
            out[i, j] = max(t.abs().max().item(), AMAX_FLOOR) / E4M3_MAX
    return out


def _e4m3_bound(x: torch.Tensor, scale_full: torch.Tensor) -> torch.Tensor:
    """Per-element round-to-nearest bound: half an ulp of E4M3 — 2⁻⁴ relative for normals, 2⁻¹⁰·s for subnormals."""
    return torch.maximum(x.abs() * 2.0**-4, scale_full * 2.0**-10) * (1 + 1e-6)


@pytest.mark.parametrize("shape", [(4, 256), (3, 5, 300), (1, 100)])
def test_quantize_act_scales_shapes_and_error(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    x = torch.randn(*shape) * torch.logspace(-3, 3, shape[-1])  # tiles with very different ranges
    q, s = quantize_act(x)
    K = shape[-1]
    assert q.dtype == E4M3 and q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == (*shape[:-1], math.ceil(K / 128))
    ref = _ref_tile_scales(x.reshape(-1, K), 1, 128).reshape(s.shape)
    torch.testing.assert_close(s.double(), ref, rtol=1e-6, atol=0)
    deq = dequantize_act(q, s)
    s_full = s.repeat_interleave(128, -1)[..., :K]
    assert ((deq - x).abs() <= _e4m3_bound(x, s_full)).all()
    assert q.float().abs().max() <= E4M3_MAX


def test_each_tile_uses_full_range_and_zero_tile_is_safe() -> None:
    x = torch.randn(2, 384)
    x[1, 128:256] = 0.0
    q, s = quantize_act(x)
    amax_q = q.float().abs().view(2, 3, 128).amax(-1)
    assert torch.all(amax_q[0] == E4M3_MAX) and amax_q[1, 0] == E4M3_MAX
    assert s[1, 1].item() == pytest.approx(AMAX_FLOOR / E4M3_MAX)
    assert torch.isfinite(q.float()).all() and (q.float()[1, 128:256] == 0).all()


def test_docstring_example() -> None:
    x = torch.tensor([[1.0] * 127 + [448.0 * 2]])
    q, s = quantize_act(x)
    assert s.tolist() == [[2.0]] and q.float()[0, -1].item() == 448.0 and q.float()[0, 0].item() == 0.5


@pytest.mark.parametrize("shape", [(256, 512), (200, 300), (130, 7)])
def test_quantize_weight_blocks_and_padding(shape: tuple[int, int]) -> None:
    torch.manual_seed(1)
    w = torch.randn(*shape) * 0.02
    w[0, 0] = 3.0  # one outlier only affects its own block
    q, s = quantize_weight(w)
    assert q.shape == w.shape and s.shape == (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
    torch.testing.assert_close(s.double(), _ref_tile_scales(w, 128, 128), rtol=1e-6, atol=0)
    deq = dequantize_weight(q, s)
    s_full = s.repeat_interleave(128, 0)[: shape[0]].repeat_interleave(128, 1)[:, : shape[1]]
    assert ((deq - w).abs() <= _e4m3_bound(w, s_full)).all()
    # padding is zeros: the same block quantized from an explicitly zero-padded tensor gives the same result
    wp = torch.zeros(math.ceil(shape[0] / 128) * 128, math.ceil(shape[1] / 128) * 128)
    wp[: shape[0], : shape[1]] = w
    qp, sp = quantize_weight(wp)
    assert torch.equal(sp, s) and torch.equal(qp[: shape[0], : shape[1]].float(), q.float())


def test_quantize_cols_is_transpose_of_rows() -> None:
    torch.manual_seed(2)
    x = torch.randn(300, 64)
    qc, sc = quantize_cols(x)
    qr, sr = quantize_act(x.T.contiguous())
    assert sc.shape == (3, 64)
    assert torch.equal(sc, sr.T) and torch.equal(qc.float(), qr.T.float())
    torch.testing.assert_close(dequantize_cols(qc, sc), dequantize_act(qr, sr).T)


def test_pow2_scales() -> None:
    torch.manual_seed(3)
    x = torch.randn(8, 512) * 10
    q, s = quantize_act(x, pow2=True)
    log2 = torch.log2(s)
    assert torch.equal(log2, log2.round())
    amax = x.abs().view(8, 4, 128).amax(-1)
    assert (s >= amax / E4M3_MAX).all() and (s < 2 * amax / E4M3_MAX).all()
    # dequantization with power-of-two scales is exact in bf16
    assert torch.equal(dequantize_act(q, s, torch.bfloat16).float(), dequantize_act(q, s, torch.float32))


def test_retile_pow2_exact_when_representable() -> None:
    """Values that are E4M3 numbers times a common power of two survive 1×128 → 128×1 unchanged."""
    torch.manual_seed(4)
    grid = torch.arange(256, dtype=torch.uint8).view(E4M3).float()
    grid = grid[torch.isfinite(grid) & (grid.abs() >= 2.0**-6)]  # normals only (no re-tiling underflow)
    v = grid[torch.randint(len(grid), (256, 256))] * 2.0**-5
    v[:, 0] = 448 * 2.0**-5  # every row and every column reaches the same amax → same power-of-two scale
    v[0, :] = 448 * 2.0**-5
    q, s = quantize_act(v, pow2=True)
    torch.testing.assert_close(dequantize_act(q, s), v, rtol=0, atol=0)
    qc, sc = retile_rows_to_cols(q, s, pow2=True)
    assert sc.shape == (2, 256)
    torch.testing.assert_close(dequantize_cols(qc, sc), v, rtol=0, atol=0)


def test_retile_general_matches_direct_cols_quantization() -> None:
    torch.manual_seed(5)
    x = torch.randn(200, 384)
    q, s = quantize_act(x)
    qc, sc = retile_rows_to_cols(q, s)
    qd, sd = quantize_cols(dequantize_act(q, s))
    assert torch.equal(sc, sd) and torch.equal(qc.float(), qd.float())
    assert calc_diff(dequantize_cols(qc, sc), x) < 1e-3


def test_outlier_channels_tiles_beat_per_tensor() -> None:
    """docs/fp8.md §3: 256×4096 activations, four channels ×200, weights N(0, 0.02²)."""
    from raymoe.jobs.benches.fp8 import outlier_errors  # the bench's experiment, asserted here

    res = outlier_errors()
    err_tensor, err_tile = res["per_tensor_calc_diff"], res["tile_1x128_calc_diff"]
    assert err_tile < err_tensor / 1.5, (err_tile, err_tensor)
    assert err_tile < 1e-3


def test_nonfinite_input_gives_nonfinite_scale_not_silent_garbage() -> None:
    x = torch.randn(2, 256)
    x[0, 3] = float("inf")
    x[1, 200] = float("nan")
    _, s = quantize_act(x)
    assert not torch.isfinite(s[0, 0]) and torch.isfinite(s[0, 1])
    assert not torch.isfinite(s[1, 1]) and torch.isfinite(s[1, 0])


def test_cast_saturates() -> None:
    """quant.py relies on torch's fp32 → e4m3fn cast saturating (x/s may exceed 448 by an ulp); no clamp pass."""
    v = torch.tensor([448.0, 448.0 * (1 + 1e-6), 470.0, -479.0, float("nan")])
    assert v.to(E4M3).float()[:4].tolist() == [448.0, 448.0, 448.0, -448.0]
    assert torch.isnan(v.to(E4M3).float()[4])


def test_errors_are_clear() -> None:
    with pytest.raises(TypeError, match="bf16/fp16/fp32"):
        quantize_act(torch.zeros(2, 128, dtype=torch.int32))
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight(torch.zeros(2, 2, 128))
    q, s = quantize_act(torch.randn(2, 256))
    with pytest.raises(ValueError, match="1x128"):
        dequantize_act(q, s[:, :1])
