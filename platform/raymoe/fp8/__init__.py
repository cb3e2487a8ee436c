"""DeepSeek-V3 block-wise FP8 training (paper §3.3): quantization, FP8 GEMM, FP8 Linear, conversion, guards.

Public interface (callers outside the package rely on exactly these)::

    q, s = quantize_act(x)              # x [..., K]  → q e4m3 [..., K], s fp32 [..., ceil(K/128)]   (1×128 tiles)
    q, s = quantize_weight(w)           # w [N, K]    → q e4m3 [N, K],   s fp32 [ceil(N/128), ceil(K/128)]
    y = fp8_gemm(a_q, a_s, w_q, w_s)    # a @ wᵀ, bf16 (or fp32) [..., N]
    FP8Linear                           # nn.Linear whose Fprop/Dgrad/Wgrad run in FP8
    convert_to_fp8(model, filter=None)  # swap selected nn.Linear layers (embed/head/router/gate stay)

Modules: :mod:`~raymoe.fp8.quant` (tiles, scales, re-tiling), :mod:`~raymoe.fp8.gemm` (back-ends, accumulation
study), :mod:`~raymoe.fp8.step_counter` (optimizer-step epoch of the weight caches), :mod:`~raymoe.fp8.linear`
(autograd, deferred Wgrad into :class:`raymoe.wgrad.WeightGradStore`, conversion), :mod:`~raymoe.fp8.grouped` (routed
experts with stacked weights, opt-in through ``enable_fp8``), :mod:`~raymoe.fp8.guard` (non-finite
handling), :mod:`~raymoe.fp8.deepspeed_hooks` (bf16 + ZeRO-1 engine with FP8 swapped in),
:mod:`~raymoe.fp8.kernels_triton` (CUDA kernels; imported lazily, needs triton). No Ray, no Hydra.
"""
from raymoe.fp8.config import BACKENDS, DEFAULT_SKIP_PATTERNS, FP8Config
from raymoe.fp8.gemm import fp8_gemm, fp8_gemm_limited_accum, resolve_backend
from raymoe.fp8.grouped import FP8GroupedGEMM
from raymoe.fp8.guard import FP8Guard, NonFiniteStep
from raymoe.fp8.linear import (
    FP8LayerState,
    FP8Linear,
    convert_to_fp8,
    default_fp8_filter,
    fp8_layers,
    invalidate_weight_caches,
)
from raymoe.fp8.quant import (
    AMAX_FLOOR,
    BLOCK,
    E4M3,
    E4M3_MAX,
    calc_diff,
    dequantize_act,
    dequantize_cols,
    dequantize_weight,
    quantize_act,
    quantize_cols,
    quantize_per_tensor,
    quantize_weight,
    retile_rows_to_cols,
)
from raymoe.fp8.step_counter import optimizer_step_count
from raymoe.wgrad import WeightGradStore  # the project's one deferred weight-gradient store (raymoe.wgrad)

__all__ = [
    "FP8Config",
    "BACKENDS",
    "DEFAULT_SKIP_PATTERNS",
    "quantize_act",
    "quantize_weight",
    "quantize_cols",
    "quantize_per_tensor",
    "dequantize_act",
    "dequantize_weight",
    "dequantize_cols",
    "retile_rows_to_cols",
    "calc_diff",
    "fp8_gemm",
    "fp8_gemm_limited_accum",
    "resolve_backend",
    "FP8Linear",
    "FP8LayerState",
    "FP8GroupedGEMM",
    "WeightGradStore",
    "convert_to_fp8",
    "default_fp8_filter",
    "fp8_layers",
    "invalidate_weight_caches",
    "optimizer_step_count",
    "FP8Guard",
    "NonFiniteStep",
    "E4M3",
    "E4M3_MAX",
    "AMAX_FLOOR",
    "BLOCK",
]
