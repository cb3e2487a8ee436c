"""`python -m raymoe.jobs.bench model`: forward+backward throughput of raymoe vs HF transformers' DeepseekV3.

For each preset (``presets=tiny,small``) and dtype (``dtypes=float32,bfloat16``) the same weights are loaded into
both implementations (through our HF export), and one training step (forward, loss, backward) of each candidate —
HF and each routed-expert back-end of ours — is timed in interleaved rounds (``iters`` rounds after ``warmup``;
each round runs every candidate twice and times the second; medians). Every step gets a batch of its own
(:class:`BatchStream`): as in training, no batch is seen twice, so per-shape kernel compilation (oneDNN, bf16 on
CPU) is paid where training pays it. Reported: tokens/s, the ratio ours/HF, and MFU against the matmul peak
measured in the same run (a 2048³ matmul of that dtype). A profiler pass attributes our forward time to attention,
router, routed experts, shared experts and the rest.

Trained weights: ``hf=<dir>`` benches any HF DeepseekV3 checkpoint instead of the presets (the training job writes
one to ``<run_dir>/hf``); ``text=shakespeare`` feeds real text instead of uniform random ids, so a trained router
sees the load it was trained on (with random ids or random weights the routing, and so the expert GEMM shapes,
differ from training).

FLOPs per token of a training step: 6 × (activated matmul parameters, excluding the embedding lookup) plus causal
attention 3 × 2 × H × (qk_head + v_head) × T/2 per layer (fwd + 2× bwd), MTP block and head included.
"""
from __future__ import annotations

import pathlib
import statistics
import tempfile
import time
import warnings
from typing import Any, Callable

import torch
from rich.console import Console
from rich.table import Table

from raymoe.config import ModelConfig
from raymoe.jobs.benches import matmul_peak
from raymoe.model import DeepSeekV3
from raymoe.model import hf as hf_io
from raymoe.model.moe import DEFAULT_EXPERT_IMPL, EXPERT_IMPLS, set_expert_impl
from raymoe.plan import train_flops_per_token

console = Console()


def _interleaved_medians(candidates: dict[str, Callable[[], None]], iters: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    ts: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in range(iters):
        for k, fn in candidates.items():
            fn()  # settle: the first step after switching models pays fresh page faults in the allocator
            t0 = time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in ts.items()}


def _with_impl(model: torch.nn.Module, impl: str, step: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        set_expert_impl(model, impl)
        step()

    return run


class BatchStream:
    """A fresh ``(input_ids, labels)`` ``[batch, seq]`` on every call, never the same one twice.

    Training never repeats a batch, and on CPU that matters: bf16 matmuls are oneDNN kernels JIT-compiled per shape,
    and the per-expert row counts (so the expert GEMM shapes) change with every batch. Timing one fixed batch over
    and over would only ever measure warm kernels. Candidates draw from one stream in turn, so no candidate runs a
    batch (and its shapes) that another one just compiled for. Uniform random ids by default; ``text=<corpus>``
    (e.g. ``shakespeare``) walks that corpus' training samples, tokenised at the model's vocabulary size.
    """

    def __init__(self, cfg: ModelConfig, batch: int, seq: int, text: str | None, seed: int = 0) -> None:
        self.cfg, self.batch, self.seq = cfg, batch, seq
        self.gen = torch.Generator().manual_seed(seed)
        self.ds = None
        self.pos = 0
        if text:
            from raymoe.data.build import build_dataset

            self.ds, _, _ = build_dataset(vocab_size=cfg.vocab_size, seq_len=seq, corpus=text, progress=False)
            if len(self.ds) < batch:
                raise SystemExit(f"text={text!r} has {len(self.ds)} samples of {seq} tokens; batch={batch} needs more")

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ds is None:
            x = torch.randint(0, self.cfg.vocab_size, (self.batch, self.seq), generator=self.gen)
            return x, torch.roll(x, -1, 1)
        if self.pos + self.batch > len(self.ds):
            self.pos = 0
        ids = list(range(self.pos, self.pos + self.batch))
        self.pos += self.batch
        return self.ds.batch(ids)


def _step_fn(model: torch.nn.Module, batches: Callable[[], tuple[torch.Tensor, torch.Tensor]],
             ours: bool) -> Callable[[], None]:
    def step() -> None:
        x, y = batches()
        model.zero_grad(set_to_none=True)
        if ours:
            loss = model(x, labels=y, compute_mtp=False).loss
        else:
            logits = model(x).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()

    return step


def _profile_breakdown(model: DeepSeekV3, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Share of forward CPU time spent in attention, router, routed experts, shared experts, other."""
    from torch.profiler import ProfilerActivity, profile

    labels = {"attention": [], "router": [], "experts": [], "shared_experts": []}
    handles = []

    def wrap(mod: torch.nn.Module, label: str) -> None:
        def pre(m, a):
            m._rf = torch.profiler.record_function(f"rm::{label}")
            m._rf.__enter__()

        def post(m, a, o):
            m._rf.__exit__(None, None, None)

        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(post))

    for layer in list(model.layers) + [m.block for m in model.mtp]:
        wrap(layer.self_attn, "attention")
        if layer.is_moe:
            wrap(layer.mlp.router, "router")
            wrap(layer.mlp.experts, "experts")
            if layer.mlp.shared_experts is not None:
                wrap(layer.mlp.shared_experts, "shared_experts")
    with torch.no_grad():
        model(x, labels=y, compute_mtp=False)
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(x, labels=y, compute_mtp=False)
        total = time.perf_counter() - t0
    for h in handles:
        h.remove()
    out: dict[str, float] = {}
    events = {e.key: e.cpu_time_total for e in prof.key_averages()}
    total_us = sum(v for k, v in events.items() if k.startswith("rm::")) or 1.0
    fwd_us = max(events.get("ProfilerStep*", 0), total * 1e6)
    for label in labels:
        out[label] = events.get(f"rm::{label}", 0.0) / fwd_us
    out["other"] = max(0.0, 1 - sum(out.values()))
    out["_profiled_fraction"] = total_us / fwd_us
    return out


def run(args: dict[str, str]) -> dict:
    warnings.filterwarnings("ignore")
    presets = args.get("presets", "tiny,small").split(",")
    dtypes = [getattr(torch, d) for d in args.get("dtypes", "float32,bfloat16").split(",")]
    batch, seq = int(args.get("batch", 4)), int(args.get("seq", 256))
    iters, warmup = int(args.get("iters", 5)), int(args.get("warmup", 1))
    try:
        import transformers
    except ImportError:  # pragma: no cover - dev extra missing
        transformers = None
    results: dict[str, Any] = {"batch": batch, "seq": seq, "torch_threads": torch.get_num_threads(), "rows": []}
    peaks = {str(d): matmul_peak(d) for d in dtypes}
    results["matmul_peak_flops"] = peaks
    table = Table(title=f"fwd+bwd step, B={batch} T={seq}, {torch.get_num_threads()} threads")
    for col in ("model", "dtype", "impl", "ours tok/s", "HF tok/s", "ours/HF", "MFU ours", "MFU HF"):
        table.add_column(col, justify="right")
    hf_dir = args.get("hf")
    if hf_dir:
        p = pathlib.Path(hf_dir).resolve()
        presets = [f"hf:{p.parent.name}/{p.name}" if p.name == "hf" else f"hf:{p.name}"]
    for name in presets:
        torch.manual_seed(0)
        if hf_dir:  # trained weights: any HF DeepseekV3 checkpoint, e.g. <run_dir>/hf written by the training job
            ours = hf_io.load(hf_dir)  # its MTP module stays idle: the timed step runs with compute_mtp=False
            src = hf_dir
        else:
            ours = DeepSeekV3(ModelConfig.preset(name).replace(num_nextn_predict_layers=0))
            src = None
        cfg = ours.config.replace(num_nextn_predict_layers=0)
        hf_model = None
        if transformers is not None:
            with tempfile.TemporaryDirectory() as d:
                if src is None:
                    hf_io.save(ours, d)
                    src = d
                hf_model = transformers.DeepseekV3ForCausalLM.from_pretrained(src)
        stream = BatchStream(cfg, batch, seq, args.get("text"))
        x, y = stream()  # for the profiler pass
        results.setdefault("inputs", {})[name] = {"weights": hf_dir or "random (seed 0)",
                                                  "tokens": args.get("text") or "uniform random"}
        flops_tok = train_flops_per_token(cfg, seq)
        for dtype in dtypes:
            ours_d = ours.to(dtype).train()
            row_base = {"model": name, "dtype": str(dtype).replace("torch.", ""), "flops_per_token": flops_tok}
            # Interleaved rounds: every round runs HF and each expert back-end twice and times the second step, so
            # slow drifts of the machine (other load, frequency) hit all candidates alike; medians are kept.
            candidates: dict[str, Callable[[], None]] = {}
            if hf_model is not None:
                candidates["hf"] = _step_fn(hf_model.to(dtype).train(), stream, ours=False)
            for impl in EXPERT_IMPLS:
                candidates[impl] = _with_impl(ours_d, impl, _step_fn(ours_d, stream, ours=True))
            times = _interleaved_medians(candidates, iters, warmup)
            hf_tps = batch * seq / times["hf"] if "hf" in times else None
            for impl in EXPERT_IMPLS:
                tps = batch * seq / times[impl]
                peak = peaks[str(dtype)]
                row = dict(row_base, impl=impl, ours_tokens_per_s=tps, hf_tokens_per_s=hf_tps,
                           ratio=(tps / hf_tps) if hf_tps else None, mfu=tps * flops_tok / peak,
                           mfu_hf=(hf_tps * flops_tok / peak) if hf_tps else None)
                results["rows"].append(row)
                table.add_row(name, row["dtype"], impl, f"{tps:,.0f}", f"{hf_tps:,.0f}" if hf_tps else "-",
                              f"{row['ratio']:.2f}x" if hf_tps else "-", f"{row['mfu']:.1%}",
                              f"{row['mfu_hf']:.1%}" if hf_tps else "-")
            set_expert_impl(ours_d, None)
        ours.float()
        results.setdefault("breakdown", {})[name] = _profile_breakdown(ours.eval(), x, y)
    console.print(table)
    bt = Table(title="where forward time goes (ours, fp32, profiler)")
    bt.add_column("model")
    for k in ("attention", "router", "experts", "shared_experts", "other"):
        bt.add_column(k, justify="right")
    for name, b in results.get("breakdown", {}).items():
        bt.add_row(name, *(f"{b[k]:.0%}" for k in ("attention", "router", "experts", "shared_experts", "other")))
    console.print(bt)
    console.print({k: f"{v / 1e9:.0f} GFLOP/s" for k, v in peaks.items()})
    if args.get("plot"):
        print(f"plot: {plot_ratios([results], args['plot'])}")
    return results


def plot_ratios(runs: list[dict], out: str, impl: str = DEFAULT_EXPERT_IMPL) -> str:
    """Bar chart of tokens/s, ours (``impl``) vs HF, per model and dtype, over the results of one or more runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for res in runs for r in res["rows"] if r["impl"] == impl and r.get("hf_tokens_per_s")]
    labels = [f"{r['model']}\n{r['dtype']}" for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(rows)), 4))
    ax.bar([x - 0.2 for x in xs], [r["hf_tokens_per_s"] for r in rows], 0.4, label="HF transformers")
    ax.bar([x + 0.2 for x in xs], [r["ours_tokens_per_s"] for r in rows], 0.4, label=f"raymoe ({impl})")
    for x, r in zip(xs, rows):
        ax.annotate(f"{r['ratio']:.2f}×", (x + 0.2, r["ours_tokens_per_s"]), ha="center", va="bottom", fontsize=9)
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("training tokens/s (fwd+bwd)")
    ax.set_yscale("log")
    ax.set_title("fwd+bwd step, fresh batch every step, 2 CPU cores")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
