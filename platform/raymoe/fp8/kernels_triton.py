"""Triton kernels for the block-wise FP8 recipe (CUDA; also runnable on CPU under ``TRITON_INTERPRET=1``).

Kernels (written from the formulas in docs/fp8.md §1–2, layouts as in :mod:`raymoe.fp8.quant`):

``_rows_quant_kernel``   1×128 tiles: a program owns ``BLOCK_R`` rows × one 128-column block; amax per row of the
                         tile, ``s = max(amax, 1e-4)/448`` (optionally rounded up to 2^k), ``q = x/s``.
``_cols_quant_kernel``   128×1 tiles: a program owns one 128-row block × ``BLOCK_C`` columns; amax per column.
``_block_quant_kernel``  128×128 blocks: a program owns one block; one amax.
``_gemm_kernel``         ``C[M, N] = Σ_kb dot(A[:, kb], B[:, kb]ᵀ) · sa[:, kb] · sb[·, kb]`` with BLOCK_K = 128: each
                         128-K partial product comes out of ``tl.dot`` in FP32, is scaled there and added to an FP32
                         accumulator — the paper's promotion every N_C = 128. ``B_ROWS`` selects B's scale layout
                         (1×128 per row for the Wgrad GEMM, 128×128 blocks for a weight).

Every kernel takes explicit strides, so transposed views (``Wᵀ`` for Dgrad, ``dyᵀ``/``xᵀ`` for Wgrad) need no copies.
Tails (dims not multiple of 128 or of the tile) are handled with masks; masked loads read 0, which never raises an
amax and adds nothing to a dot product.

Testing on CPU: the interpreter's fp32→e4m3 cast is wrong for ~2 % of elements and ``tl.dot`` on bf16 returns garbage
(docs/fp8.md §4), so CPU tests run these kernels with **fp32** output/input buffers — which checks grids, masks,
strides and scale indexing — while numerics are checked against the torch reference on a GPU
(``scripts/gpu_check_fp8.py``). Importing this module needs ``triton``; set ``TRITON_INTERPRET`` before importing.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["act_quant", "cols_quant", "weight_quant", "fp8_gemm", "INTERPRET"]

BLOCK = 128
# jit code may only read globals that are constexpr
E4M3_MAX = tl.constexpr(448.0)
AMAX_FLOOR = tl.constexpr(1e-4)

try:  # triton >= 3.2 keeps runtime switches in `knobs`
    from triton import knobs as _knobs

    INTERPRET = bool(_knobs.runtime.interpret)
except Exception:  # noqa: BLE001
    import os

    INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _scale_of(amax, POW2: tl.constexpr):
    s = tl.maximum(amax, AMAX_FLOOR) / E4M3_MAX
    if POW2:
        s = tl.exp2(tl.ceil(tl.log2(s)))
    return s


@triton.jit
def _rows_quant_kernel(x_ptr, q_ptr, s_ptr, R, K, sxr, sxk, sqr, sqk, ssr, ssk,
                       POW2: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < R) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * sxr + cols[None, :] * sxk, mask=mask, other=0.0).to(tl.float32)
    s = _scale_of(tl.max(tl.abs(x), axis=1), POW2)  # [BLOCK_R]
    y = tl.clamp(x / s[:, None], -E4M3_MAX, E4M3_MAX)
    tl.store(q_ptr + rows[:, None] * sqr + cols[None, :] * sqk, y.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + rows * ssr + pid_k * ssk, s, mask=rows < R)


@triton.jit
def _cols_quant_kernel(x_ptr, q_ptr, s_ptr, R, K, sxr, sxk, sqr, sqk, ssr, ssk,
                       POW2: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < R) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * sxr + cols[None, :] * sxk, mask=mask, other=0.0).to(tl.float32)
    s = _scale_of(tl.max(tl.abs(x), axis=0), POW2)  # [BLOCK_C]
    y = tl.clamp(x / s[None, :], -E4M3_MAX, E4M3_MAX)
    tl.store(q_ptr + rows[:, None] * sqr + cols[None, :] * sqk, y.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + pid_r * ssr + cols * ssk, s, mask=cols < K)


@triton.jit
def _block_quant_kernel(x_ptr, q_ptr, s_ptr, N, K, sxn, sxk, sqn, sqk, ssn, ssk,
                        POW2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * sxn + cols[None, :] * sxk, mask=mask, other=0.0).to(tl.float32)
    s = _scale_of(tl.max(tl.max(tl.abs(x), axis=1), axis=0), POW2)
    y = tl.clamp(x / s, -E4M3_MAX, E4M3_MAX)
    tl.store(q_ptr + rows[:, None] * sqn + cols[None, :] * sqk, y.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + pid_n * ssn + pid_k * ssk, s)


@triton.jit
def _gemm_kernel(a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, M, N, K,
                 sam, sak, sbn, sbk, scm, scn, ssam, ssak, ssbn, ssbk,
                 B_ROWS: tl.constexpr, IEEE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    if B_ROWS:
        sb_row = offs_n  # one scale per row of B (1×128 tiles)
    else:
        sb_row = offs_n // 128  # one scale per 128×128 block of B
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k = kb * BLOCK_K + offs_k
        k_ok = k < K
        a = tl.load(a_ptr + offs_m[:, None] * sam + k[None, :] * sak, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + offs_n[None, :] * sbn + k[:, None] * sbk, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        if IEEE:
            part = tl.dot(a, b, input_precision="ieee")
        else:
            part = tl.dot(a, b)
        sa = tl.load(sa_ptr + offs_m * ssam + kb * ssak, mask=m_ok, other=0.0)
        sb = tl.load(sb_ptr + sb_row * ssbn + kb * ssbk, mask=n_ok, other=0.0)
        acc += part * sa[:, None] * sb[None, :]  # promotion: scale the 128-K partial sum in FP32
    c = acc.to(c_ptr.dtype.element_ty)
    tl.store(c_ptr + offs_m[:, None] * scm + offs_n[None, :] * scn, c, mask=m_ok[:, None] & n_ok[None, :])


# ------------------------------------------------------------------------------------------ wrappers


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def act_quant(x: torch.Tensor, *, pow2: bool = False, out_dtype: torch.dtype = torch.float8_e4m3fn,
              block_r: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """1×128 quantization of ``x [R, K]`` → ``q [R, K]`` (``out_dtype``), ``s [R, ceil(K/128)]`` fp32."""
    R, K = x.shape
    q = torch.empty(R, K, dtype=out_dtype, device=x.device)
    s = torch.empty(R, _cdiv(K, BLOCK), dtype=torch.float32, device=x.device)
    grid = (_cdiv(R, block_r), _cdiv(K, BLOCK))
    _rows_quant_kernel[grid](x, q, s, R, K, x.stride(0), x.stride(1), q.stride(0), q.stride(1),
                             s.stride(0), s.stride(1), POW2=pow2, BLOCK_R=block_r, BLOCK_K=BLOCK)
    return q, s


def cols_quant(x: torch.Tensor, *, pow2: bool = False, out_dtype: torch.dtype = torch.float8_e4m3fn,
               block_c: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """128×1 quantization of ``x [R, K]`` → ``q [R, K]``, ``s [ceil(R/128), K]`` fp32."""
    R, K = x.shape
    q = torch.empty(R, K, dtype=out_dtype, device=x.device)
    s = torch.empty(_cdiv(R, BLOCK), K, dtype=torch.float32, device=x.device)
    grid = (_cdiv(R, BLOCK), _cdiv(K, block_c))
    _cols_quant_kernel[grid](x, q, s, R, K, x.stride(0), x.stride(1), q.stride(0), q.stride(1),
                             s.stride(0), s.stride(1), POW2=pow2, BLOCK_R=BLOCK, BLOCK_C=block_c)
    return q, s


def weight_quant(w: torch.Tensor, *, pow2: bool = False,
                 out_dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """128×128 quantization of ``w [N, K]`` → ``q [N, K]``, ``s [ceil(N/128), ceil(K/128)]`` fp32."""
    N, K = w.shape
    q = torch.empty(N, K, dtype=out_dtype, device=w.device)
    s = torch.empty(_cdiv(N, BLOCK), _cdiv(K, BLOCK), dtype=torch.float32, device=w.device)
    grid = (_cdiv(N, BLOCK), _cdiv(K, BLOCK))
    _block_quant_kernel[grid](w, q, s, N, K, w.stride(0), w.stride(1), q.stride(0), q.stride(1),
                              s.stride(0), s.stride(1), POW2=pow2, BLOCK_N=BLOCK, BLOCK_K=BLOCK)
    return q, s


def fp8_gemm(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor, *, b_rows: bool = False,
             out_dtype: torch.dtype = torch.bfloat16, block_m: int = 64, block_n: int = 128,
             num_warps: int = 4, num_stages: int = 3) -> torch.Tensor:
    """``a [M, K]`` (1×128 scales ``sa [M, Kb]``) × ``b [N, K]`` (``sb [Nb, Kb]`` or ``[N, Kb]`` if ``b_rows``) → ``[M, N]``.

    Operands may be strided views. ``block_n`` must divide 128 or be a multiple of it (scale indexing is per column
    anyway, so any value works; 128 keeps one B scale per tile on the GPU).
    """
    M, K = a.shape
    N = b.shape[0]
    if b.shape[1] != K:
        raise ValueError(f"inner dims differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    c = torch.empty(M, N, dtype=out_dtype, device=a.device)
    grid = (_cdiv(M, block_m), _cdiv(N, block_n))
    kwargs = {} if INTERPRET else {"num_warps": num_warps, "num_stages": num_stages}
    _gemm_kernel[grid](a, b, c, sa, sb, M, N, K,
                       a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
                       sa.stride(0), sa.stride(1), sb.stride(0), sb.stride(1),
                       B_ROWS=b_rows, IEEE=a.dtype == torch.float32,
                       BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=BLOCK, **kwargs)
    return c
