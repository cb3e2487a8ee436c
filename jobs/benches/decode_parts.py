"""`python -m raymoe.jobs.bench decode_parts [model=small] [batch=16] [prompt_len=32] [steps=20] [threads=1]`: where
the time of one engine decode step goes, part by part, next to each part's own floors.

A random-init checkpoint of the preset (as ``bench serve``'s ``small``) is served by three engines, ``default``
(few-row products through :mod:`raymoe.model.cpu_kernels` where they are built), ``torch`` (``engine.cpu_kernels=off``:
every product through torch's BLAS, fused routed experts and ``[in, out]`` linears as before those kernels) and
``unfused`` (``cpu_kernels=off``, ``fused_experts=false``: routed experts through the grouped GEMM), each with
``batch`` greedy requests of ``prompt_len`` random tokens. Once every prefill is done, ``steps`` decode-only steps of
each engine are timed, interleaved (drifts of a shared machine hit all alike), with each part's wall time taken by
wrappers around its modules:

* ``attention``: every MLA (projections, RoPE, cache write and gather, absorbed attention; with the CPU kernels one
  call per layer);
* ``MoE layers``: every MoE layer's forward (router, dispatch, routed experts, combine, shared expert; with the CPU
  kernels one call per layer, so its parts cannot be timed apart there);
* ``dense FFN``, ``lm_head``;
* ``rest``: the step minus the parts (norms, residuals, embedding, the engine's scheduling, cache view and sampling).

Each part's **bandwidth floor** is the bytes it reads (``bench serve``'s ``decode_part_costs``: weights, and for
attention the latent cache too; MoE: the routed experts the step touched, counted from the routing, the shared expert
and the router) over the streaming read
rate (a ``sum`` over all weights, as ``bench serve``), its **compute floor** its flops (2 per weight and row; routed:
each row's ``k`` experts) over the fp32 matmul rate (``[1024, 1024]²``), both measured in the same run with the same
intra-op threads (the streaming rate before and after the timed steps, averaged). ``x floor`` is the part's time over
the larger of the two.
"""
from __future__ import annotations

import collections
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

console = Console() if sys.stdout.isatty() else Console(width=160)

__all__ = ["run", "profile_steps"]

PARTS = ("attention", "MoE layers", "dense FFN", "lm_head")
MOE_PARTS = ("routed experts", "shared experts", "router")  # decode_part_costs' parts the "MoE layers" row sums


def _wrap(obj: Any, name: str, acc: dict[str, float], key: str) -> None:
    inner = getattr(obj, name)

    def timed(*a, **k):
        t0 = time.perf_counter()
        out = inner(*a, **k)
        acc[key] += time.perf_counter() - t0
        return out

    setattr(obj, name, timed)


def _instrument(eng) -> tuple[dict[str, float], list[int]]:
    """Wrap the engine's parts; returns the per-part seconds accumulator and the touched-expert counts (one entry
    per MoE layer call, from its routing)."""
    from raymoe.engine.experts import DispatchedMoE

    acc: dict[str, float] = collections.defaultdict(float)
    touched: list[int] = []
    m = eng.model
    for layer in m.layers:
        _wrap(layer.self_attn, "forward", acc, "attention")
        if isinstance(layer.mlp, DispatchedMoE):
            inner = layer.mlp.forward

            def moe(*a, _inner=inner, **k):
                t0 = time.perf_counter()
                out = _inner(*a, **k)
                acc["MoE layers"] += time.perf_counter() - t0
                touched.append(int((out[1].counts > 0).sum()))
                return out

            layer.mlp.forward = moe
        else:
            _wrap(layer.mlp, "forward", acc, "dense FFN")
    _wrap(m.lm_head, "forward", acc, "lm_head")
    return acc, touched


def profile_steps(engines: dict[str, Any], batch: int, prompt_len: int, steps: int,
                  vocab: int) -> dict[str, dict[str, Any]]:
    """Drive every engine to decode-only with the same prompts, then time ``steps`` steps of each, interleaved.
    Returns per engine: ``step_ms`` (median), per-part ``ms`` (mean per step), ``touched`` experts per layer."""
    from raymoe.engine import SamplingParams

    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, vocab, (batch, prompt_len), generator=g)
    sp = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True)
    state = {}
    for name, eng in engines.items():
        for p in prompts:
            eng.add_request(None, p.tolist(), sp)
        while not all(len(grp.seqs[0].output_ids) >= 2 for grp in eng.groups.values()):  # prefill done, one decode
            eng.step()
        acc, touched = _instrument(eng)
        state[name] = (acc, touched, [])
    for _ in range(steps):
        for name, eng in engines.items():
            t0 = time.perf_counter()
            eng.step()
            state[name][2].append(time.perf_counter() - t0)
    out = {}
    for name, (acc, touched, ts) in state.items():
        out[name] = {"step_ms": 1e3 * statistics.median(ts), "mean_step_ms": 1e3 * sum(ts) / len(ts),
                     "ms": {k: 1e3 * acc[k] / len(ts) for k in PARTS},
                     "touched": sum(touched) / max(1, len(touched))}
    return out


def run(args: dict[str, str]) -> dict[str, Any]:
    from raymoe.engine import EngineConfig, LLMEngine
    from raymoe.jobs.benches import matmul_peak
    from raymoe.jobs.benches.serve import _random_checkpoint, decode_part_costs, streaming_read

    model = args.get("model", "small")
    B, P, steps = int(args.get("batch", 16)), int(args.get("prompt_len", 32)), int(args.get("steps", 20))
    torch.set_num_threads(int(args.get("threads", 1)))
    with tempfile.TemporaryDirectory(prefix="raymoe-bench-parts-") as tmp:
        path = _random_checkpoint(model, pathlib.Path(tmp))
        cfg = dict(block_size=16, num_blocks=B * ((P + steps + 16) // 16 + 2) + 8, max_num_seqs=B,
                   max_num_batched_tokens=max(512, B * P), prefill_chunk=max(P, 16), enable_prefix_caching=False)
        engines = {"default": LLMEngine.from_pretrained(path, EngineConfig(**cfg)),
                   "torch": LLMEngine.from_pretrained(path, EngineConfig(**cfg, cpu_kernels="off")),
                   "unfused": LLMEngine.from_pretrained(path, EngineConfig(**cfg, cpu_kernels="off",
                                                                           fused_experts=False))}
        m = engines["default"].model
        bw, _, _ = streaming_read(m)
        peak = matmul_peak(n=1024, warmup=1)
        res = profile_steps(engines, B, P, steps, m.config.vocab_size)
        bw = statistics.median([bw, streaming_read(m)[0]])  # before and after the timed steps: the host drifts
    costs = decode_part_costs(m, B, P + steps / 2, res["default"]["touched"])
    rows = []
    for part in PARTS + ("rest",):
        row: dict[str, Any] = {"part": part}
        if part != "rest":
            nb, fl = (tuple(sum(costs[q][i] for q in MOE_PARTS) for i in (0, 1)) if part == "MoE layers"
                      else costs[part])
            row.update(mb=nb / 1e6, gflop=fl / 1e9, bw_floor_ms=1e3 * nb / bw, compute_floor_ms=1e3 * fl / peak)
        for name, r in res.items():
            ms = r["ms"].get(part) if part != "rest" else r["mean_step_ms"] - sum(r["ms"].values())
            row[f"{name}_ms"] = ms
        rows.append(row)
    total_mb = sum(r.get("mb", 0.0) for r in rows)
    total_gflop = sum(r.get("gflop", 0.0) for r in rows)
    t = Table(title=f"{model} decode step, batch {B}, prompt {P}, {torch.get_num_threads()} thread(s): stream "
                    f"{bw / 1e9:.1f} GB/s, matmul {peak / 1e9:.0f} GFLOP/s, {res['default']['touched']:.1f} experts "
                    "touched per layer")
    for c in ("part", "MB read", "GFLOP", "floor ms bw/compute", "ms", "torch ms", "unfused ms", "x floor"):
        t.add_column(c, justify="left" if c == "part" else "right")
    for r in rows:
        fl = max(r.get("bw_floor_ms", 0.0), r.get("compute_floor_ms", 0.0))
        t.add_row(r["part"], f"{r['mb']:.1f}" if "mb" in r else "-", f"{r['gflop']:.3f}" if "gflop" in r else "-",
                  f"{r['bw_floor_ms']:.2f}/{r['compute_floor_ms']:.2f}" if "mb" in r else "-",
                  f"{r['default_ms']:.2f}", f"{r['torch_ms']:.2f}", f"{r['unfused_ms']:.2f}",
                  f"{r['default_ms'] / fl:.1f}x" if fl else "-")
    bw_floor, c_floor = 1e3 * total_mb * 1e6 / bw, 1e3 * total_gflop * 1e9 / peak
    t.add_row("step (median)", f"{total_mb:.1f}", f"{total_gflop:.3f}", f"{bw_floor:.2f}/{c_floor:.2f}",
              f"{res['default']['step_ms']:.2f}", f"{res['torch']['step_ms']:.2f}", f"{res['unfused']['step_ms']:.2f}",
              f"{res['default']['step_ms'] / max(bw_floor, c_floor):.1f}x")
    console.print(t)
    return {"model": model, "batch": B, "prompt_len": P, "steps": steps, "threads": torch.get_num_threads(),
            "stream_gb_s": bw / 1e9, "matmul_gflops": peak / 1e9,
            "touched_experts_per_layer": res["default"]["touched"], "parts": rows, "step_ms": {k: r["step_ms"] for k, r in res.items()},
            "floor_ms": {"bandwidth": bw_floor, "compute": c_floor}}
