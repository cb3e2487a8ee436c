#!/usr/bin/env python
"""Check raymoe's FP8 kernels on a real CUDA GPU against the torch emulation and time them vs a bf16 GEMM.

One short run (< 5 min on an H100/H200; most of it Triton compilation), results written as JSON::

    python scripts/gpu_check_fp8.py --out gpu_fp8.json            # on a GPU machine
    python scripts/gpu_check_fp8.py --out /tmp/x.json             # no GPU: writes {"skipped": ...}, exit 0
    python scripts/gpu_check_fp8.py --cpu-dry-run --out /tmp/x.json   # CPU: same code paths, TRITON_INTERPRET=1,
                                                                      # tiny shapes, numerics not asserted

Checks (per shape m×k×n; DeepGEMM's (k, n) list at m ∈ {64, 4096} by default):
  * Triton 1×128 activation quant and 128×128 weight quant vs torch (`quantize_act` / `quantize_weight`):
    scales within 1e-6 relative, fraction of identical E4M3 codes (expect 1.0 on a GPU);
  * Triton blockwise GEMM vs the emulation on the same FP8 operands (calc_diff, expect ~1e-6 — fp32 accumulation
    order only) and vs the fp32 reference of the unquantized inputs (expect ≈ 7e-4 < 1e-3);
  * blockwise ``torch.nn.functional.scaled_mm`` (cuBLASLt, 1×128 × 128×128) the same way, when supported;
  * Wgrad form (1×128 × 1×128 row scales, ``b_rows=True``) vs the emulation;
  * FP8Linear forward+backward with backend=triton vs backend=emulate (y, dx, dW calc_diff);
  * timing (CUDA events, median of ``--reps``): bf16 ``x @ wᵀ``, Triton GEMM, scaled_mm, act-quant kernel;
    TFLOP/s and ratios to bf16.
Exit status 1 if any GPU check fails its bound.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

DEEPGEMM_KN = [(7168, 2112), (1536, 24576), (512, 32768), (16384, 7168), (7168, 4096), (2048, 7168)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_check_fp8.json", help="JSON result path")
    p.add_argument("--ms", default="64,4096", help="comma-separated m values")
    p.add_argument("--reps", type=int, default=20, help="timed repetitions per kernel (median)")
    p.add_argument("--max-shapes", type=int, default=len(DEEPGEMM_KN), help="use the first N (k, n) shapes")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="run every code path on CPU under TRITON_INTERPRET=1 with tiny shapes (no numerics asserted)")
    return p.parse_args(argv)


def _write(path: str, obj: dict) -> None:
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(path).write_text(json.dumps(obj, indent=2, default=str))
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cpu_dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere
    import torch

    if not args.cpu_dry_run and not torch.cuda.is_available():
        _write(args.out, {"skipped": "no CUDA device visible", "torch": torch.__version__})
        return 0
    try:
        import triton  # noqa: F401
    except Exception as e:  # noqa: BLE001
        _write(args.out, {"skipped": f"triton not importable: {e}", "torch": torch.__version__})
        return 0

    from raymoe.fp8 import FP8Config, FP8Linear, calc_diff, fp8_gemm, quantize_act, quantize_weight
    from raymoe.fp8 import kernels_triton as kt
    from raymoe.fp8.gemm import _gemm_scaled_mm, _scaled_mm_supported, gemm_nt
    from raymoe.fp8.quant import quantize_cols

    dev = torch.device("cpu" if args.cpu_dry_run else "cuda")
    strict = not args.cpu_dry_run
    if args.cpu_dry_run:
        shapes = [(16, 256, 256), (8, 384, 200)]
        reps = 1
    else:
        ms = [int(m) for m in args.ms.split(",")]
        shapes = [(m, k, n) for m in ms for k, n in DEEPGEMM_KN[: args.max_shapes]]
        reps = args.reps
    scaled_ok = (not args.cpu_dry_run) and _scaled_mm_supported(dev)

    def timed(fn) -> float:
        if args.cpu_dry_run:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b))
        return statistics.median(ts)

    record: dict = {
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (TRITON_INTERPRET=1 dry run)",
        "capability": list(torch.cuda.get_device_capability()) if dev.type == "cuda" else None,
        "torch": torch.__version__, "triton": triton.__version__, "scaled_mm_blockwise": scaled_ok,
        "shapes": [], "failures": [],
    }

    def check(name: str, ok: bool, value) -> None:
        if not ok:
            record["failures"].append(f"{name}: {value}")

    t_start = time.time()
    for m, k, n in shapes:
        torch.manual_seed(0)
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
        ref = x.float() @ w.float().T
        aq, sa = quantize_act(x)
        wq, sw = quantize_weight(w)
        row: dict = {"m": m, "k": k, "n": n}
        # quantization kernels
        taq, tsa = kt.act_quant(x)
        twq, tsw = kt.weight_quant(w)
        row["act_scale_max_rel"] = ((tsa - sa).abs() / sa).max().item()
        row["act_codes_equal"] = (taq.float() == aq.float()).float().mean().item()
        row["w_scale_max_rel"] = ((tsw - sw).abs() / sw).max().item()
        row["w_codes_equal"] = (twq.float() == wq.float()).float().mean().item()
        check(f"{m}x{k}x{n} act scales", row["act_scale_max_rel"] < 1e-6, row["act_scale_max_rel"])
        check(f"{m}x{k}x{n} act codes", row["act_codes_equal"] > 0.999 or not strict, row["act_codes_equal"])
        check(f"{m}x{k}x{n} w codes", row["w_codes_equal"] > 0.999 or not strict, row["w_codes_equal"])
        # GEMMs on identical FP8 operands
        emu = fp8_gemm(aq, sa, wq, sw, out_dtype=torch.float32, compute_dtype=torch.float32, backend="emulate")
        tri = kt.fp8_gemm(aq, sa, wq, sw, out_dtype=torch.float32)
        row["triton_vs_emulation"] = calc_diff(tri, emu)
        row["triton_vs_fp32_ref"] = calc_diff(tri, ref)
        check(f"{m}x{k}x{n} triton vs emulation", row["triton_vs_emulation"] < 1e-5 or not strict,
              row["triton_vs_emulation"])
        check(f"{m}x{k}x{n} triton vs ref", row["triton_vs_fp32_ref"] < 1e-3, row["triton_vs_fp32_ref"])
        if scaled_ok:
            try:
                smm = _gemm_scaled_mm(aq, sa, wq, sw, torch.float32)
                row["scaled_mm_vs_emulation"] = calc_diff(smm, emu)
                check(f"{m}x{k}x{n} scaled_mm vs emulation", row["scaled_mm_vs_emulation"] < 1e-5,
                      row["scaled_mm_vs_emulation"])
            except Exception as e:  # noqa: BLE001
                row["scaled_mm_error"] = f"{type(e).__name__}: {e}"
        # Wgrad form: 128×1 tiles along tokens on both operands (b_rows)
        if m >= 128 or args.cpu_dry_run:
            dy = torch.randn(m, min(n, 1024), device=dev, dtype=torch.bfloat16)
            xs = x[:, : min(k, 1024)]
            gq, gs = quantize_cols(dy)
            xq, xs_s = quantize_cols(xs)
            emu_w = gemm_nt(gq.T, gs.T, xq.T, xs_s.T, b_rows=True, out_dtype=torch.float32, backend="emulate",
                            compute_dtype=torch.float32, cache_b=False)
            tri_w = kt.fp8_gemm(gq.T, gs.T, xq.T, xs_s.T, b_rows=True, out_dtype=torch.float32)
            row["wgrad_triton_vs_emulation"] = calc_diff(tri_w, emu_w)
            check(f"{m}x{k}x{n} wgrad", row["wgrad_triton_vs_emulation"] < 1e-5 or not strict,
                  row["wgrad_triton_vs_emulation"])
        # timing
        flops = 2 * m * k * n
        t_bf16 = timed(lambda: x @ w.T)
        t_tri = timed(lambda: kt.fp8_gemm(aq, sa, wq, sw))
        t_q = timed(lambda: kt.act_quant(x))
        row.update(bf16_ms=t_bf16, triton_ms=t_tri, act_quant_ms=t_q, triton_over_bf16=t_tri / t_bf16,
                   bf16_tflops=flops / t_bf16 / 1e9, triton_tflops=flops / t_tri / 1e9)
        if scaled_ok and "scaled_mm_error" not in row:
            t_s = timed(lambda: _gemm_scaled_mm(aq, sa, wq, sw, torch.bfloat16))
            row.update(scaled_mm_ms=t_s, scaled_mm_over_bf16=t_s / t_bf16, scaled_mm_tflops=flops / t_s / 1e9)
        record["shapes"].append(row)
        print(json.dumps(row))
        del x, w, ref, aq, wq, twq, taq, emu, tri

    # FP8Linear end to end: triton back-end vs emulation back-end
    torch.manual_seed(1)
    K, N, M = (256, 256, 64) if args.cpu_dry_run else (2048, 2048, 4096)
    base = torch.nn.Linear(K, N, bias=False, device=dev, dtype=torch.bfloat16)
    lin = {be: FP8Linear.from_linear(base, FP8Config(enabled=True, backend=be), f"lin_{be}")
           for be in ("emulate", "triton")}
    xin = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    outs = {}
    for be, mod in lin.items():
        xi = xin.clone().requires_grad_(True)
        base.weight.grad = None
        y = mod(xi)
        y.float().pow(2).mean().backward()
        outs[be] = (y.detach(), xi.grad, base.weight.grad.clone())
    record["fp8linear"] = {name: calc_diff(a, b) for name, a, b in
                           zip(("y", "dx", "dW"), outs["triton"], outs["emulate"])}
    for name, v in record["fp8linear"].items():
        check(f"FP8Linear {name} triton vs emulate", v < 1e-4 or not strict, v)
    record["wall_s"] = time.time() - t_start
    record["ok"] = not record["failures"]
    _write(args.out, record)
    if record["failures"]:
        print("FAILURES:\n  " + "\n  ".join(record["failures"]))
    return 0 if (record["ok"] or not strict) else 1


if __name__ == "__main__":
    sys.exit(main())
