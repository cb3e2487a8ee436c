"""`python -m raymoe.jobs.bench fp8 [key=value ...]`: numerics and cost of the block-wise FP8 recipe on this machine.

Sections (each can be skipped with ``skip=name1,name2``):

``gemm``      calc_diff (1 − 2Σxy/Σ(x²+y²)) of the blockwise FP8 GEMM vs an fp32 reference on DeepGEMM's six (k, n)
              shapes at m = 64 (bf16 randn inputs); bf16-dequant fast path and fp32-exact path. Target < 1e-3.
``outlier``   activations with outlier channels (256 × 4096, four channels × 200, weights N(0, 0.02²)): GEMM error
              with per-tensor E4M3 scaling vs 1×128 tiles.
``accum``     limited-precision accumulation (14 bits kept, K = 4096): no promotion vs promotion every 128.
``speed``     time per GEMM, emulated FP8 vs a bf16 GEMM of the same shape, measured side by side: Fprop of an
              FP8Linear (activation QDQ + GEMM, weight cached per step), the full uncached path (weight QDQ too),
              and FP8Linear forward+backward vs nn.Linear forward+backward; eager and ``torch.compile``d quantizers
              (compiled output checked against eager: the bench fails unless the scales agree to 1e-6 and every
              dequantized value to one E4M3 step; ``compiled_bit_identical`` says whether they were also bit-equal).
``train``     the same model trained ``steps`` steps in BF16 (autocast, fp32 master) and in FP8 (FP8Linear on top
              of the same autocast run) on the same data and seed; relative gap of the next-token loss (DeepSeekV3's
              ``main_loss``; the optimized loss also has the MTP and balance terms) — paper: < 0.25 % — and a PNG of
              both curves (``plot=``). Model: ``model=tiny|small`` (raymoe.model.DeepSeekV3) or ``mlp`` (a small
              transformer-free LM used when raymoe.model is unavailable). Data: a fixed random sparse bigram chain
              (learnable, entropy well below log V), identical for both runs.

Args (all optional): ``skip``, ``steps`` (default 150), ``model`` (tiny), ``batch`` (8), ``seq`` (64), ``lr`` (3e-3),
``compile`` (1: also measure compiled quantizers and train with them), ``reps`` (7), ``plot``
(bench_results/fp8_loss_curves.png), ``quick`` (1: three GEMM shapes, 40 steps — for smoke runs).
"""
from __future__ import annotations

import math
import pathlib
import statistics
import time
from typing import Any, Callable

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from raymoe.fp8 import (
    FP8Config,
    FP8Guard,
    FP8Linear,
    calc_diff,
    convert_to_fp8,
    dequantize_act,
    dequantize_weight,
    fp8_gemm,
    fp8_gemm_limited_accum,
    fp8_layers,
    quantize_act,
    quantize_per_tensor,
    quantize_weight,
)
from raymoe.fp8 import quant as _quant

console = Console()

DEEPGEMM_KN = [(7168, 2112), (1536, 24576), (512, 32768), (16384, 7168), (7168, 4096), (2048, 7168)]


# ------------------------------------------------------------------------------------------------------ numerics


def bench_gemm(shapes: list[tuple[int, int]], m: int = 64) -> list[dict]:
    rows = []
    for k, n in shapes:
        torch.manual_seed(0)
        x = torch.randn(m, k, dtype=torch.bfloat16)
        w = torch.randn(n, k, dtype=torch.bfloat16)
        ref = x.float() @ w.float().T
        aq, sa = quantize_act(x)
        wq, sw = quantize_weight(w)
        del w
        fast = calc_diff(fp8_gemm(aq, sa, wq, sw), ref)
        exact = calc_diff(fp8_gemm(aq, sa, wq, sw, out_dtype=torch.float32, compute_dtype=torch.float32), ref)
        rows.append({"m": m, "k": k, "n": n, "calc_diff_bf16_path": fast, "calc_diff_fp32_path": exact,
                     "ok": max(fast, exact) < 1e-3})
    t = Table(title="Blockwise FP8 GEMM vs fp32 reference (DeepGEMM shapes, m=64); target calc_diff < 1e-3")
    for c in ("m", "k", "n", "calc_diff (bf16 dequant)", "calc_diff (fp32 exact)", "ok"):
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(str(r["m"]), str(r["k"]), str(r["n"]), f"{r['calc_diff_bf16_path']:.2e}",
                  f"{r['calc_diff_fp32_path']:.2e}", "yes" if r["ok"] else "NO")
    console.print(t)
    return rows


def outlier_errors() -> dict:
    """docs/fp8.md §3: 256×4096 activations with four channels ×200, weights N(0, 0.02²): GEMM and activation
    errors of per-tensor vs 1×128-tile E4M3 scaling against a float64 reference."""
    torch.manual_seed(6)
    x = torch.randn(256, 4096)
    x[:, [7, 1000, 2049, 4000]] *= 200
    w = torch.randn(512, 4096) * 0.02
    ref = x.double() @ w.double().T
    wd = dequantize_weight(*quantize_weight(w)).double()
    qt, st = quantize_per_tensor(x)
    xt_deq = (qt.float() * st).double()
    x1_deq = dequantize_act(*quantize_act(x)).double()
    res = {
        "per_tensor_calc_diff": calc_diff(xt_deq @ wd.T, ref),
        "tile_1x128_calc_diff": calc_diff(x1_deq @ wd.T, ref),
        "per_tensor_calc_diff_fp32_weights": calc_diff(xt_deq @ w.double().T, ref),
        "tile_1x128_calc_diff_fp32_weights": calc_diff(x1_deq @ w.double().T, ref),
        "per_tensor_act_rel_err": ((qt.float() * st - x).norm() / x.norm()).item(),
        "tile_1x128_act_rel_err": ((dequantize_act(*quantize_act(x)) - x).norm() / x.norm()).item(),
    }
    res["tile_advantage"] = res["per_tensor_calc_diff"] / res["tile_1x128_calc_diff"]
    return res


def bench_outlier() -> dict:
    res = outlier_errors()
    t = Table(title="Outlier channels (256×4096, 4 channels ×200): per-tensor vs 1×128 tiles")
    for c in ("activation scaling", "GEMM calc_diff (W 128×128 FP8)", "(W fp32)", "activation rel. error"):
        t.add_column(c, justify="right")
    for name, key in (("per-tensor E4M3", "per_tensor"), ("1×128 tiles E4M3", "tile_1x128")):
        t.add_row(name, f"{res[key + '_calc_diff']:.2e}", f"{res[key + '_calc_diff_fp32_weights']:.2e}",
                  f"{res[key + '_act_rel_err']:.2e}")
    console.print(t)
    return res


def bench_accum() -> dict:
    torch.manual_seed(3)
    aq, sa = quantize_act(torch.randn(32, 4096))
    wq, sw = quantize_weight(torch.randn(128, 4096))
    exact = dequantize_act(aq, sa).double() @ dequantize_weight(wq, sw).double().T
    res = {}
    t = Table(title="Limited-precision accumulation (14 bits kept), K = 4096, 32×128 output")
    for c in ("promotion", "rel. Frobenius", "median elem. rel.", "p99 elem. rel.", "max elem. rel."):
        t.add_column(c, justify="right")
    for pe in (0, 128):
        out = fp8_gemm_limited_accum(aq, sa, wq, sw, mantissa_bits=14, promote_every=pe).double()
        rel = (out - exact).abs() / exact.abs().clamp_min(1e-12)
        r = {"rel_frobenius": ((out - exact).norm() / exact.norm()).item(), "median": rel.median().item(),
             "p99": rel.quantile(0.99).item(), "max": rel.max().item()}
        res["none" if pe == 0 else f"nc{pe}"] = r
        t.add_row("none" if pe == 0 else f"N_C = {pe}", *(f"{r[k]:.2e}" for k in ("rel_frobenius", "median", "p99",
                                                                                     "max")))
    console.print(t)
    return res


# ------------------------------------------------------------------------------------------------------ speed


def _paired(fa: Callable[[], Any], fb: Callable[[], Any], reps: int, warmup: int = 2) -> tuple[float, float, float]:
    """Time ``fa`` and ``fb`` alternately (so machine-load drift hits both); medians (ms) and median of ratios b/a."""
    for _ in range(warmup):
        fa()
        fb()
    ta, tb, ratios = [], [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        fa()
        t1 = time.perf_counter()
        fb()
        t2 = time.perf_counter()
        ta.append(t1 - t0)
        tb.append(t2 - t1)
        ratios.append((t2 - t1) / (t1 - t0))
    return statistics.median(ta) * 1e3, statistics.median(tb) * 1e3, statistics.median(ratios)


def _check_compiled_quant(compiled: tuple, eager: tuple, where: str) -> bool:
    """Raise unless the compiled 1×128 quantizer agrees with eager (inductor's kernels are not eager's: scales to
    1e-6 relative, dequantized values to one E4M3 step, 2^-3 of their magnitude); return whether bit-equal."""
    (qc, sc, dc), (qe, se, de) = compiled, eager
    if not torch.allclose(sc, se, rtol=1e-6, atol=0.0):
        raise AssertionError(f"fp8 bench {where}: compiled scales differ from eager (max abs diff "
                             f"{(sc - se).abs().max().item():.3g})")
    dc, de = dc.float(), de.float()
    step = 2.0**-3 * torch.maximum(dc.abs(), de.abs())
    if ((dc - de).abs() > step).any():
        raise AssertionError(f"fp8 bench {where}: compiled dequantized values differ from eager by more than one "
                             f"E4M3 step (max abs diff {(dc - de).abs().max().item():.3g})")
    return all(torch.equal(a.float(), b.float()) for a, b in zip(compiled, eager))


def bench_speed(compile_too: bool, reps: int, shapes: list[tuple[int, int, int]]) -> list[dict]:
    rows = []
    modes = [False, True] if compile_too else [False]
    for comp in modes:
        for M, K, N in shapes:
            torch.manual_seed(0)
            x = torch.randn(M, K, dtype=torch.bfloat16)
            base = nn.Linear(K, N, bias=False).to(torch.bfloat16)
            f8 = FP8Linear.from_linear(nn.Linear(K, N, bias=False).to(torch.bfloat16),
                                       FP8Config(enabled=True, compile=comp))
            w = base.weight.detach()
            compile_s, identical = 0.0, True
            if comp:  # warm the compiled kernels (cold compile reported separately) and check them against eager
                t0 = time.perf_counter()
                qc = _quant.qdq_rows(x, compile=True)
                _quant.qdq_blocks(w, compile=True)
                compile_s = time.perf_counter() - t0
                qe = _quant.qdq_rows(x, compile=False)
                identical = _check_compiled_quant(qc, qe, f"{M}×{K}×{N}")

            def bf16_gemm() -> None:
                with torch.no_grad():
                    x @ w.T

            def fprop() -> None:
                with torch.no_grad():
                    f8(x)

            def fprop_uncached() -> None:
                f8.invalidate_weight_cache()
                fprop()

            xr = x.clone().requires_grad_(True)

            def fwd_bwd(mod: nn.Module) -> Callable[[], None]:
                def run() -> None:
                    y = mod(xr)
                    y.backward(torch.ones_like(y))
                return run

            t_bf16, t_fprop, r_fprop = _paired(bf16_gemm, fprop, reps)
            _, t_unc, r_unc = _paired(bf16_gemm, fprop_uncached, reps)
            t_lfb, t_ffb, r_fb = _paired(fwd_bwd(base), fwd_bwd(f8), reps)
            rows.append({
                "compile": comp, "M": M, "K": K, "N": N, "bf16_gemm_ms": t_bf16, "fp8_fprop_ms": t_fprop,
                "fprop_ratio": r_fprop, "fp8_uncached_ms": t_unc, "uncached_ratio": r_unc,
                "linear_fwd_bwd_ms": t_lfb, "fp8_fwd_bwd_ms": t_ffb, "fwd_bwd_ratio": r_fb,
                "compile_s": compile_s, "compiled_bit_identical": identical,
            })
    t = Table(title="Emulated FP8 / bf16, same shape, timed alternately (median ratio; aim <= 2x)")
    for c in ("quant", "M×K×N", "bf16 ms", "Fprop", "+W QDQ", "fwd+bwd"):
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row("compile" if r["compile"] else "eager", f"{r['M']}×{r['K']}×{r['N']}", f"{r['bf16_gemm_ms']:.1f}",
                  f"{r['fprop_ratio']:.2f}x", f"{r['uncached_ratio']:.2f}x", f"{r['fwd_bwd_ratio']:.2f}x")
    console.print(t)
    console.print("Fprop: activation 1×128 QDQ + GEMM with the weight's FP8 form cached for the step (how FP8Linear "
                  "runs); +W QDQ: also re-quantizing the weight every call; fwd+bwd: FP8Linear vs nn.Linear "
                  "(Fprop+Dgrad+Wgrad, re-tiling included).")
    return rows


# ------------------------------------------------------------------------------------------------------ training


class _MLPLM(nn.Module):
    """Fallback LM when raymoe.model is unavailable: embed → 2 residual SwiGLU blocks → norm → lm_head."""

    def __init__(self, vocab: int = 2048, dim: int = 256) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"norm": nn.RMSNorm(dim), "gate_proj": nn.Linear(dim, 4 * dim, bias=False),
                           "up_proj": nn.Linear(dim, 4 * dim, bias=False),
                           "down_proj": nn.Linear(4 * dim, dim, bias=False)}) for _ in range(2))
        self.norm = nn.RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.vocab_size = vocab

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> Any:
        h = self.embed_tokens(input_ids)
        for b in self.blocks:
            u = b["norm"](h)
            h = h + b["down_proj"](nn.functional.silu(b["gate_proj"](u)) * b["up_proj"](u))
        logits = self.lm_head(self.norm(h))
        loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())

        class _Out:
            pass

        out = _Out()
        out.loss = loss
        return out


def _build_model(name: str) -> tuple[nn.Module, int, str]:
    if name != "mlp":
        try:
            from raymoe.config import ModelConfig
            from raymoe.model import DeepSeekV3

            cfg = ModelConfig.preset(name)
            return DeepSeekV3(cfg), cfg.vocab_size, f"DeepSeekV3[{name}]"
        except Exception as e:  # noqa: BLE001 — the bench must still run while the model is being written
            console.print(f"[yellow]raymoe.model unavailable ({type(e).__name__}: {e}); using the MLP LM[/yellow]")
    m = _MLPLM()
    return m, m.vocab_size, "MLP-LM (fallback)"


class _BigramData:
    """Sparse random bigram chain: every token has 4 successors (probabilities 0.55/0.25/0.15/0.05)."""

    def __init__(self, vocab: int, seed: int = 1234) -> None:
        g = torch.Generator().manual_seed(seed)
        self.succ = torch.randint(0, vocab, (vocab, 4), generator=g)
        self.probs = torch.tensor([0.55, 0.25, 0.15, 0.05])
        self.vocab = vocab
        self.entropy = float(-(self.probs * self.probs.log()).sum())

    def batch(self, step: int, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(10_000 + step)
        tok = torch.randint(0, self.vocab, (batch,), generator=g)
        out = [tok]
        for _ in range(seq):
            pick = torch.multinomial(self.probs.expand(batch, 4), 1, generator=g).squeeze(1)
            tok = self.succ[tok, pick]
            out.append(tok)
        ids = torch.stack(out, 1)
        return ids[:, :-1], ids[:, 1:]


def _autocast_works(model_name: str, batch: int, seq: int) -> str | None:
    """None if a bf16-autocast training step runs on this model, else the error (the baseline then runs in fp32)."""
    torch.manual_seed(0)
    model, vocab, _ = _build_model(model_name)
    ids, labels = _BigramData(vocab).batch(0, batch, seq)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=labels).loss
        loss.backward()
        return None
    except RuntimeError as e:
        return f"{type(e).__name__}: {str(e)[:200]}"


def _train(model_name: str, fp8: bool, steps: int, batch: int, seq: int, lr: float, compile_q: bool,
           autocast: bool = True) -> dict:
    torch.manual_seed(0)
    model, vocab, label = _build_model(model_name)
    if fp8:
        convert_to_fp8(model, config=FP8Config(enabled=True, compile=compile_q))
    guard = FP8Guard(model) if fp8 else None
    data = _BigramData(vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    losses, step_s, skipped = [], [], 0
    t0 = time.perf_counter()
    for step in range(steps):
        ts = time.perf_counter()
        ids, labels = data.batch(step, batch, seq)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(ids, labels=labels)
        loss = out.loss  # what is optimized (DeepSeekV3: LM + λ·MTP + aux); the curves compare the LM loss
        lm_loss = getattr(out, "main_loss", None)
        lm_loss = loss if lm_loss is None else lm_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if guard is not None:
            skipped += 0 if guard.step(opt, loss, step=step) else 1
        else:
            opt.step()
        sched.step()
        losses.append(float(lm_loss.detach()))
        step_s.append(time.perf_counter() - ts)
    return {"label": label, "losses": losses, "seconds": time.perf_counter() - t0, "skipped_steps": skipped,
            "median_step_s": statistics.median(step_s[3:] or step_s),
            "fp8_layers": len(fp8_layers(model)), "entropy_floor": data.entropy}


def _ema(xs: list[float], beta: float = 0.9) -> list[float]:
    out, m = [], xs[0]
    for x in xs:
        m = beta * m + (1 - beta) * x
        out.append(m)
    return out


def bench_train(model_name: str, steps: int, batch: int, seq: int, lr: float, compile_q: bool,
                plot: pathlib.Path) -> dict:
    autocast_error = _autocast_works(model_name, batch, seq)
    autocast = autocast_error is None
    if not autocast:
        console.print(f"[yellow]bf16 autocast fails on this model ({autocast_error}); the baseline runs in fp32 "
                      "and FP8 replaces fp32 GEMMs instead of bf16 ones[/yellow]")
    bf16 = _train(model_name, False, steps, batch, seq, lr, compile_q, autocast)
    fp8 = _train(model_name, True, steps, batch, seq, lr, compile_q, autocast)
    sb, sf = _ema(bf16["losses"]), _ema(fp8["losses"])
    rel = [abs(a - b) / b for a, b in zip(sf, sb)]
    half = len(rel) // 2
    tail = max(1, len(rel) // 5)
    res = {
        "model": bf16["label"], "steps": steps, "batch": batch, "seq": seq, "lr": lr,
        "baseline": "bf16 autocast, fp32 master" if autocast else f"fp32 (autocast failed: {autocast_error})",
        "fp8_layers": fp8["fp8_layers"], "bf16_final_loss": statistics.mean(bf16["losses"][-tail:]),
        "fp8_final_loss": statistics.mean(fp8["losses"][-tail:]),
        "rel_gap_final": abs(statistics.mean(fp8["losses"][-tail:]) / statistics.mean(bf16["losses"][-tail:]) - 1),
        "rel_gap_mean_2nd_half_ema": statistics.mean(rel[half:]),
        "rel_gap_max_2nd_half_ema": max(rel[half:]),
        "rel_gap_mean_all_ema": statistics.mean(rel),
        "bf16_seconds": bf16["seconds"], "fp8_seconds": fp8["seconds"], "fp8_skipped_steps": fp8["skipped_steps"],
        "bf16_median_step_s": bf16["median_step_s"], "fp8_median_step_s": fp8["median_step_s"],
        "entropy_floor": bf16["entropy_floor"], "bf16_losses": bf16["losses"], "fp8_losses": fp8["losses"],
    }
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
        ax.plot(bf16["losses"], alpha=0.25, color="C0")
        ax.plot(fp8["losses"], alpha=0.25, color="C3")
        ax.plot(sb, label=("BF16" if autocast else "FP32") + " (EMA 0.9)", color="C0")
        ax.plot(sf, label="FP8 1×128/128×128 E4M3 (EMA 0.9)", color="C3", linestyle="--")
        ax.axhline(bf16["entropy_floor"], color="grey", linestyle=":", label="data entropy")
        ax.set_ylabel("training LM loss (next token)")
        ax.set_title(f"{res['model']}: FP8 vs BF16, same data and seed")
        ax.legend()
        ax2.plot([100 * r for r in rel], color="k")
        ax2.axhline(0.25, color="grey", linestyle=":", label="paper bound 0.25 %")
        ax2.set_ylabel("|rel. gap| %")
        ax2.set_xlabel("step")
        ax2.legend()
        fig.tight_layout()
        plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(plot, dpi=110)
        plt.close(fig)
        res["plot"] = str(plot)
    except Exception as e:  # noqa: BLE001
        res["plot_error"] = f"{type(e).__name__}: {e}"
    t = Table(title=f"Training: {res['model']}, {steps} steps, batch {batch}×{seq} (paper: rel. gap < 0.25 %)")
    for c in ("run", "final loss (last 20 %)", "wall s (incl. compile)", "median step s", "skipped"):
        t.add_column(c, justify="right")
    t.add_row("BF16" if autocast else "FP32", f"{res['bf16_final_loss']:.4f}", f"{res['bf16_seconds']:.1f}",
              f"{res['bf16_median_step_s']:.3f}", "-")
    t.add_row(f"FP8 ({res['fp8_layers']} layers)", f"{res['fp8_final_loss']:.4f}", f"{res['fp8_seconds']:.1f}",
              f"{res['fp8_median_step_s']:.3f}", str(res["fp8_skipped_steps"]))
    console.print(t)
    console.print(f"relative loss gap: final {100 * res['rel_gap_final']:.3f} %, EMA mean over 2nd half "
                  f"{100 * res['rel_gap_mean_2nd_half_ema']:.3f} %, EMA max over 2nd half "
                  f"{100 * res['rel_gap_max_2nd_half_ema']:.3f} %  plot: {res.get('plot', res.get('plot_error'))}")
    return res


# ------------------------------------------------------------------------------------------------------ entry


def run(args: dict[str, str]) -> dict:
    quick = args.get("quick", "0") == "1"
    skip = {s for s in args.get("skip", "").split(",") if s}
    compile_q = args.get("compile", "1") == "1"
    reps = int(args.get("reps", "7"))
    steps = int(args.get("steps", "40" if quick else "150"))
    plot = pathlib.Path(args.get("plot", "bench_results/fp8_loss_curves.png"))
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    if "gemm" not in skip:
        out["gemm"] = bench_gemm(DEEPGEMM_KN[:3] if quick else DEEPGEMM_KN)
    if "outlier" not in skip:
        out["outlier"] = bench_outlier()
    if "accum" not in skip:
        out["accum"] = bench_accum()
    if "speed" not in skip:
        shapes = [(64, 7168, 2112), (2048, 2048, 2048)] if quick else \
            [(64, 7168, 2112), (64, 2048, 7168), (1024, 1024, 1024), (2048, 2048, 2048), (4096, 1024, 2048)]
        out["speed"] = bench_speed(compile_q, reps, shapes)
    if "train" not in skip:
        out["train"] = bench_train(args.get("model", "tiny"), steps, int(args.get("batch", "8")),
                                   int(args.get("seq", "64")), float(args.get("lr", "3e-3")), compile_q, plot)
    return out
