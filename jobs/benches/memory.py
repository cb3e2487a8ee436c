"""`python -m raymoe.jobs.bench memory`: what a rank really holds, beside the memory plan (:mod:`raymoe.plan.train`).

For every layout in ``layouts=`` (default ``pp1,pp2,ep2,pp2xep2,pp2xdp2,pp2xep2xdp2``; a layout is ``pp<a>xep<b>x
dp<c>`` with any factor left out meaning 1, and an optional ``:<schedule>`` suffix, e.g. ``pp2xep2:dualpipe``) the
real training runtime trains the model ``model=`` (default ``tiny``) on CPU: a :class:`~raymoe.actors.RayWorkerGroup`
of ``pp × ep × dp`` stage actors (``parallel.dp_impl=native``) driven by a
:class:`~raymoe.train.controller.TrainController` for ``steps=`` (default 2) steps of ``C=`` (default ``2*pp``)
micro-batches of ``mb=`` (2) sequences of ``seq_len=`` (128) tokens, ``recompute=`` (none), ``dtype=`` (float32).
Then every rank reports (``StageActor.memory_stats``):

* tensor bytes, each storage counted once, walked on the actor: ``params`` (``model.parameters()``), ``buffers``
  (router biases, RoPE tables; the plan does not count them), ``grads`` (the ``.grad`` of every parameter the
  optimizer steps, taken by an optimizer step pre-hook: reduced and clipped, just before they are applied and set
  to None), ``optimizer`` (every tensor of the AdamW state: two fp32 moments + a 4-byte step counter per tensor);
* resident memory of the actor process (``/proc/self/status``): ``rss_start`` when the actor starts (the
  interpreter, torch and Ray imported, no model), ``rss_after_init`` after the worker was built (model, process
  groups, data set opened), and the peak (``VmHWM``) after the steps.

Beside them, :func:`raymoe.plan.train.plan_training` for the same layout (``precision`` fp32, or bf16 for
``dtype=bfloat16``; ``zero1`` as the runtime does it, see :data:`RUNTIME_ZERO1`): weights, gradients, optimizer
state per pipeline rank (the same for all ``ep × dp`` ranks of a pipeline rank), and the activations of the
schedule's in-flight micro-batches plus the recompute / loss workspace. **Tensor bytes must be within 5 % of the
plan** (``tol=``), else the bench raises after printing the table. The activations are compared with what autograd
saved (``StepResult.peak_activation_bytes``, the worker's saved-tensor meter, max over steps) but not checked: the
plan's table describes V3's kernels, the CPU runtime keeps what its kernels keep. With ``dtype=float32`` a third
table (:func:`saved_per_block`, one process) splits the difference per block kind into the terms where the kernels
differ (docs/plan.md).

The peak RSS is decomposed as ``start`` (torch + Ray before the model) + ``set-up`` (``rss_after_init − start −
params − buffers``: the modules building the model imports, the data set, gloo, the matmul-peak probe) + the tensors
(params + buffers + grads + optimizer) + the measured activations + ``slack`` (the rest: what the allocator keeps of
transient tensors — the flat all-reduce copy of the gradients, the logits and their fp32 copy for the loss, the
backward's temporaries — and the glibc arenas of the P2P threads; :func:`raymoe.malloc.keep_freed_memory` keeps
freed memory in the process on purpose, so the peak of every transient stays resident).

With ``plot=<dir>``: ``<dir>/memory.png``, per layout and rank the plan's bar (weights, gradients, optimizer,
activations + workspace) beside the measured one (params + buffers, gradients, optimizer, saved activations), and
below, the measured peak RSS decomposed (start, set-up, tensors, activations, slack).
"""
from __future__ import annotations

import os

from raymoe.jobs.cluster import configure_process_env

configure_process_env()  # before `import ray`: embedded (loopback only) or cluster mode, see raymoe.jobs.cluster

import pathlib  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from raymoe.config import (  # noqa: E402
    ConfigError,
    DataConfig,
    LoggerConfig,
    ModelConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
)

KNOWN_ARGS = {"layouts", "model", "steps", "seq_len", "mb", "C", "recompute", "dtype", "schedule", "zero1", "tol",
              "plot", "cpus_per_rank", "timeout", "width"}
DEFAULT_LAYOUTS = "pp1,pp2,ep2,pp2xep2,pp2xdp2,pp2xep2xdp2"
MiB = 1024**2
# What the runtime does by default: native data parallelism shards the AdamW state over the DP replicas (ZeRO-1,
# parallel.zero_stage=1). ``zero1=`` picks the run's zero_stage (1 or 0) and the plan's zero1 together.
RUNTIME_ZERO1 = True
TENSORS = ("params", "grads", "optimizer")


def parse_layout(spec: str, default_schedule: str) -> tuple[int, int, int, str]:
    """``pp2xep2xdp2[:schedule]`` → ``(pp, ep, dp, schedule)``; a factor left out is 1."""
    text, _, sched = spec.strip().partition(":")
    dims = {"pp": 1, "ep": 1, "dp": 1}
    for part in text.lower().split("x"):
        m = re.fullmatch(r"(pp|ep|dp)(\d+)", part.strip())
        if not m:
            raise SystemExit(f"memory bench: layout {spec!r}: expected parts like pp2, ep2, dp2 joined by 'x' "
                             "(e.g. pp2xep2xdp2, optionally :dualpipe)")
        dims[m.group(1)] = int(m.group(2))
    return dims["pp"], dims["ep"], dims["dp"], (sched.strip() or default_schedule)


def layout_name(pp: int, ep: int, dp: int, schedule: str) -> str:
    parts = [f"{k}{v}" for k, v in (("pp", pp), ("ep", ep), ("dp", dp)) if v > 1] or ["pp1"]
    return "×".join(parts) + (f" {schedule}" if pp > 1 else "")


def _run_config(model: str, pp: int, ep: int, dp: int, schedule: str, C: int, mb: int, seq_len: int,
                recompute: str, dtype: str, cpus: float, steps: int, run_dir: str, zero1: bool = RUNTIME_ZERO1
                ) -> RunConfig:
    return RunConfig(
        model=ModelConfig.preset(model),
        parallel=ParallelConfig(pp=pp, ep=ep, dp=dp, schedule=schedule, num_cpus_per_rank=cpus, dp_impl="native",
                                zero_stage=1 if zero1 else 0),
        train=TrainConfig(steps=steps, micro_batch_size=mb, num_microbatches=C, dtype=dtype, recompute=recompute,
                          checkpoint_every=10**6, eval_every=10**6, export_hf=False, resume="never",
                          warmup_tokens=0, seed=0),
        data=DataConfig(seq_len=seq_len),
        logger=LoggerConfig(kind="none"),
        run_dir=run_dir,
    )


def plan_of(run: RunConfig, zero1: bool) -> Any:
    """:func:`raymoe.plan.train.plan_training` for the layout ``run`` trains (one node, one device per rank)."""
    from raymoe.plan.train import TrainLayout, plan_training

    p, t = run.parallel, run.train
    layout = TrainLayout(pp=p.pp, ep=p.ep, dp=p.dp, schedule=p.schedule, num_microbatches=t.num_microbatches,
                         micro_batch_size=t.micro_batch_size, seq_len=run.data.seq_len, recompute=t.recompute,
                         zero1=zero1, precision="bf16" if t.dtype == "bfloat16" else "fp32")
    return plan_training(run.model, layout)


def measure(run: RunConfig, steps: int, timeout_s: float) -> dict[str, Any]:
    """Train ``steps`` steps of ``run`` on Ray actors; per rank the memory stats and the peak saved activations."""
    from raymoe.actors import RayWorkerGroup
    from raymoe.data import prepare_data
    from raymoe.train.controller import TrainController

    info = prepare_data(run, progress=False)
    group = RayWorkerGroup(run, timeout_s=timeout_s)
    controller = None
    try:
        controller = TrainController(run, group, info["train_samples"], info["val_samples"])
        act = [0] * group.size
        losses = []
        for _ in range(steps):
            results, m = controller.train_step()
            losses.append(m["train/loss"])
            for res in results:
                act[res.rank] = max(act[res.rank], int(res.peak_activation_bytes))
        stats = group.inspect("memory_stats")
        return {"stats": stats, "activations": act, "topo": controller.topo, "losses": losses}
    finally:
        if controller is not None:
            controller.close()
        group.close()
        group.shutdown()


def compare(run: RunConfig, measured: dict[str, Any], plan: Any) -> list[dict[str, Any]]:
    """One row per global rank: measured tensor bytes and RSS terms beside the plan's numbers for its pp rank."""
    topo = measured["topo"]
    rows = []
    for rank, (st, act) in enumerate(zip(measured["stats"], measured["activations"])):
        c = topo.coords(rank)
        pr = plan.ranks[c.pp_rank]
        pred = {"params": pr.weights, "grads": pr.grads, "optimizer": pr.optimizer}
        err = {k: abs(st[k] - pred[k]) / pred[k] if pred[k] else float(st[k] != 0) for k in TENSORS}
        tensors = st["params"] + st["buffers"] + st["grads"] + st["optimizer"]
        setup = st["rss_after_init"] - st["rss_start"] - st["params"] - st["buffers"]
        slack = st["rss_peak"] - st["rss_after_init"] - st["grads"] - st["optimizer"] - act
        rows.append({
            "rank": rank, "pp_rank": c.pp_rank, "ep_rank": c.ep_rank, "dp_rank": c.dp_rank, "stages": pr.stages,
            "measured": {k: int(st[k]) for k in (*TENSORS, "buffers")},
            "plan": {**{k: float(v) for k, v in pred.items()}, "activations": float(pr.activations),
                     "workspace": float(pr.workspace), "in_flight": float(pr.in_flight),
                     "optimizer_unsharded": float(pr.optimizer_unsharded)},
            "rel_err": err,
            "activations_measured": int(act),
            "rss": {"start": st["rss_start"], "after_init": st["rss_after_init"], "now": st["rss_now"],
                    "peak": st["rss_peak"]},
            "decomposition": {"start": st["rss_start"], "setup": setup, "params_buffers": st["params"] + st["buffers"],
                              "grads": st["grads"], "optimizer": st["optimizer"], "activations": act,
                              "slack": slack},
            "tensors": tensors,
        })
    return rows


def check(layouts: list[dict[str, Any]], tol: float) -> None:
    """Raise when any rank's parameter, gradient or optimizer bytes differ from the plan by more than ``tol``."""
    bad = [(L["name"], r["rank"], k, r["measured"][k], r["plan"][k]) for L in layouts for r in L.get("ranks", [])
           for k in TENSORS if r["rel_err"][k] > tol]
    if bad:
        lines = "; ".join(f"{n} rank {rk} {k}: measured {m} B, plan {p:.0f} B" for n, rk, k, m, p in bad)
        raise RuntimeError(f"memory bench: tensor bytes differ from the plan by more than {100 * tol:g}%: {lines}")


# ---------------------------------------------------------------------- activations, block by block
def saved_per_block(model_name: str, mb: int, seq_len: int, recompute: str) -> list[dict[str, Any]]:
    """One process, the whole model, one fp32 forward of ``mb × seq_len`` tokens: the bytes per token autograd saves
    for each block kind (first block of the kind; storages counted once, parameters excluded), beside the plan's
    table (:func:`raymoe.plan.train.layer_activation_values`) and three terms where this runtime's kernels differ
    from the V3 kernels the table describes: the chunked CPU attention keeps its softmax probabilities (``H`` ×
    keys per query, not a log-sum-exp), the expert combine keeps the ``K`` expert outputs (the gate weight is
    applied there, not inside the expert), the grouped routed-expert kernel recomputes its SwiGLU output, and
    :func:`raymoe.model.layers.fused_linear` keeps the concatenated weights of its fused GEMMs (a copy per
    micro-batch, shown per token of this micro-batch)."""
    import torch

    from raymoe.model.mla import ATTN_CHUNK
    from raymoe.plan.train import PRECISIONS, layer_activation_values
    from raymoe.train import parallelize as par

    cfg = ModelConfig.preset(model_name)
    model = par.build_model(cfg, 0)
    par.apply_recompute(model, recompute)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    current, saved = ["other"], {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved.setdefault(st.data_ptr(), (current[0], st.nbytes()))
        return t

    kinds: dict[str, str] = {}
    blocks = [(f"layer {i}", "moe" if layer.is_moe else "dense", layer) for i, layer in enumerate(model.layers)]
    blocks += [(f"mtp {i}", "mtp", m) for i, m in enumerate(model.mtp)]
    for name, kind, mod in blocks:
        kinds.setdefault(kind, name)
        mod.register_forward_pre_hook(lambda *_, n=name: current.__setitem__(0, n))
        mod.register_forward_hook(lambda *_: current.__setitem__(0, "other"))
    ids = torch.randint(0, cfg.vocab_size, (mb, seq_len), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, labels=ids)
    per_name: dict[str, int] = {}
    for name, n in saved.values():
        per_name[name] = per_name.get(name, 0) + n
    H, D, K, I = cfg.num_attention_heads, cfg.hidden_size, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    rows = []
    for kind, name in kinds.items():
        T = mb * (seq_len - 1 if kind == "mtp" else seq_len)  # an MTP depth predicts one token fewer
        S = T // mb
        keys = sum((min(r0 + ATTN_CHUNK, S) - r0) * min(r0 + ATTN_CHUNK, S) for r0 in range(0, S, ATTN_CHUNK)) / S
        probs = (4 * H * keys - 4 * H) if recompute != "full" else 0.0  # minus the plan's log-sum-exp
        moe = kind in ("moe", "mtp")
        combine = 4 * K * D if moe and recompute != "full" else 0.0
        routed_act = -4 * K * I if moe and recompute == "none" else 0.0
        # fused_linear concatenates the weights of the GEMMs that read one input (q_a + kv_a; gate + up of a dense
        # FFN or shared expert) in every forward, and the GEMM keeps that copy for its input gradient: per
        # micro-batch in flight, not per token
        ffn = cfg.moe_intermediate_size * cfg.n_shared_experts if moe else cfg.intermediate_size
        cat = D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim + (cfg.q_lora_rank or 0)) if cfg.q_lora_rank else 0
        cat = 4 * (cat + (2 * D * ffn if ffn else 0)) / T if recompute != "full" else 0.0
        plan = layer_activation_values(cfg, kind, recompute, PRECISIONS["fp32"])
        meas = per_name.get(name, 0) / T
        rows.append({"block": name, "kind": kind, "measured": meas, "plan": plan, "attn_probs": probs,
                     "combine": combine, "routed_act": routed_act, "weight_copies": cat,
                     "rest": meas - plan - probs - combine - routed_act - cat})
    return rows


def block_table(rows: list[dict[str, Any]], title: str) -> Table:
    t = Table(title=title)
    for c in ("block", "measured B/token", "plan", "measured/plan", "attn probs", "combine K·D", "routed act",
              "weight copies", "rest"):
        t.add_column(c, justify="left" if c == "block" else "right")
    for r in rows:
        t.add_row(f"{r['block']} ({r['kind']})", f"{r['measured']:.0f}", f"{r['plan']:.0f}",
                  f"{r['measured'] / r['plan']:.2f}", f"{r['attn_probs']:+.0f}", f"{r['combine']:+.0f}",
                  f"{r['routed_act']:+.0f}", f"{r['weight_copies']:+.0f}", f"{r['rest']:+.0f}")
    return t


# ---------------------------------------------------------------------- output
def _m(x: float) -> str:
    return f"{x / MiB:.1f}"


def tensor_table(layouts: list[dict[str, Any]], title: str) -> Table:
    t = Table(title=title)
    for c in ("layout", "rank", "pp/ep/dp", "stages", "params MiB", "plan", "grads MiB", "plan", "optim MiB",
              "plan", "max err", "act MiB", "plan act+ws"):
        t.add_column(c, justify="left" if c in ("layout",) else "right")
    for i, L in enumerate(layouts):
        if i:
            t.add_section()
        if "error" in L:
            t.add_row(L["name"], "[yellow]skipped[/yellow]", *[""] * 11)
            continue
        for r in L["ranks"]:
            m, p = r["measured"], r["plan"]
            err = max(r["rel_err"].values())
            t.add_row(L["name"], str(r["rank"]), f"{r['pp_rank']}/{r['ep_rank']}/{r['dp_rank']}",
                      "+".join(map(str, r["stages"])), _m(m["params"]), _m(p["params"]), _m(m["grads"]),
                      _m(p["grads"]), _m(m["optimizer"]), _m(p["optimizer"]),
                      ("[red]" if err > L["tol"] else "") + f"{100 * err:.2f}%",
                      _m(r["activations_measured"]), _m(p["activations"] + p["workspace"]))
    return t


def rss_table(layouts: list[dict[str, Any]], title: str) -> Table:
    t = Table(title=title)
    for c in ("layout", "rank", "start", "set-up", "params+buf", "grads", "optim", "act", "slack", "= peak RSS"):
        t.add_column(c, justify="left" if c == "layout" else "right")
    for i, L in enumerate(layouts):
        if i:
            t.add_section()
        for r in L.get("ranks", []):
            d = r["decomposition"]
            t.add_row(L["name"], str(r["rank"]), *(_m(d[k]) for k in ("start", "setup", "params_buffers", "grads",
                                                                        "optimizer", "activations", "slack")),
                      _m(r["rss"]["peak"]))
    return t


def markdown_summary(layouts: list[dict[str, Any]]) -> str:
    """The run as a markdown table (README, docs/plan.md): one row per layout and pipeline rank — tensor bytes
    (equal on the ``ep × dp`` ranks of a pipeline rank), the largest error against the plan, activations measured /
    planned, and the peak RSS with its decomposition (means over those ranks; the peak as min–max)."""
    lines = ["| layout | pp rank (ranks) | params / grads / optimizer MiB | vs plan | activations MiB (plan) | "
             "peak RSS MiB | = start + set-up + tensors + activations + slack |", "|---|---|---|---|---|---|---|"]
    for L in layouts:
        if "ranks" not in L:
            continue
        for p in sorted({r["pp_rank"] for r in L["ranks"]}):
            rs = [r for r in L["ranks"] if r["pp_rank"] == p]
            m, pl = rs[0]["measured"], rs[0]["plan"]
            err = max(max(r["rel_err"].values()) for r in rs)
            mean = {k: sum(r["decomposition"][k] for r in rs) / len(rs) for k in rs[0]["decomposition"]}
            tensors = mean["params_buffers"] + mean["grads"] + mean["optimizer"]
            peaks = [r["rss"]["peak"] / MiB for r in rs]
            peak = f"{min(peaks):.0f}" if round(min(peaks)) == round(max(peaks)) else \
                f"{min(peaks):.0f}–{max(peaks):.0f}"
            act = sum(r["activations_measured"] for r in rs) / len(rs)
            lines.append(
                f"| {L['name']} | {p} ({', '.join(str(r['rank']) for r in rs)}) | {m['params'] / MiB:.1f} / "
                f"{m['grads'] / MiB:.1f} / {m['optimizer'] / MiB:.1f} | {100 * err:.2f}% | {act / MiB:.0f} "
                f"({(pl['activations'] + pl['workspace']) / MiB:.0f}) | {peak} | {mean['start'] / MiB:.0f} + "
                f"{mean['setup'] / MiB:.0f} + {tensors / MiB:.0f} + {mean['activations'] / MiB:.0f} + "
                f"{mean['slack'] / MiB:.0f} |")
    return "\n".join(lines)


def plot(layouts: list[dict[str, Any]], path: pathlib.Path, title: str) -> pathlib.Path:
    """Top: per layout and rank the plan's stacked bar (hatched) beside the measured tensors and activations.
    Bottom: the measured peak RSS, decomposed (see the module docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    ok = [L for L in layouts if "ranks" in L]
    colors = {"params": "#4c72b0", "grads": "#55a868", "optimizer": "#c44e52", "activations": "#8172b2",
              "start": "#bbbbbb", "setup": "#dddddd", "slack": "#f0e0a0"}
    n = sum(len(L["ranks"]) for L in ok)
    fig, (top, bot) = plt.subplots(2, 1, figsize=(max(7.0, 0.75 * n + 1.2 * len(ok)), 8), sharex=True)
    x, ticks, labels = 0.0, [], []
    for L in ok:
        x0 = x
        for r in L["ranks"]:
            p, d = r["plan"], r["decomposition"]
            for ax, off, parts, hatch in (
                    (top, 0.0, (("params", p["params"]), ("grads", p["grads"]), ("optimizer", p["optimizer"]),
                                ("activations", p["activations"] + p["workspace"])), "//"),
                    (top, 0.4, (("params", d["params_buffers"]), ("grads", d["grads"]), ("optimizer", d["optimizer"]),
                                ("activations", d["activations"])), None),
                    (bot, 0.2, (("start", d["start"]), ("setup", d["setup"]), ("params", d["params_buffers"]),
                                ("grads", d["grads"]), ("optimizer", d["optimizer"]),
                                ("activations", d["activations"]), ("slack", d["slack"])), None)):
                bottom = 0.0
                for key, val in parts:
                    ax.bar(x + off, val / MiB, 0.38 if ax is top else 0.6, bottom=bottom, color=colors[key],
                           hatch=hatch, edgecolor="white", linewidth=0.5)
                    bottom += val / MiB
            ticks.append(x + 0.2)
            labels.append(f"r{r['rank']}")
            x += 1.0
        bot.text((x0 + x - 1) / 2 + 0.2, -0.1, L["name"], transform=bot.get_xaxis_transform(), ha="center",
                 fontsize=8)
        x += 0.6
    bot.set_xticks(ticks)
    bot.set_xticklabels(labels, fontsize=7)
    top.set_ylabel("MiB per rank")
    top.set_title("tensors + activations: plan (hatched, left) vs measured on the actor (right)", fontsize=9)
    bot.set_ylabel("MiB per rank")
    bot.set_title("measured peak RSS = start (torch + Ray) + set-up + tensors + activations + slack", fontsize=9)
    top.legend(handles=[Patch(color=colors[k], label=k) for k in ("params", "grads", "optimizer", "activations")]
               + [Patch(facecolor="white", edgecolor="#555555", hatch="//", label="plan")], fontsize=7, ncol=5,
               loc="upper left")
    bot.legend(handles=[Patch(color=c, label=k) for k, c in colors.items()], fontsize=7, ncol=7, loc="lower left")
    for ax in (top, bot):
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    fig.suptitle(title, fontsize=9, wrap=True)
    fig.tight_layout(rect=(0, 0.03, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------- entry point
def run(args: dict[str, str]) -> dict:
    """Bench entry point (see module docstring). Args: ``layouts=pp1,pp2,ep2,pp2xep2,pp2xdp2,pp2xep2xdp2``,
    ``model=tiny``, ``steps=2``, ``seq_len=128``, ``mb=2``, ``C=2*pp``, ``recompute=none``, ``dtype=float32``,
    ``schedule=1f1b`` (for layouts without a ``:schedule`` suffix), ``zero1=runtime`` (or true / false: what the
    plan is told), ``tol=0.05``, ``plot=<dir>``, ``cpus_per_rank=1``, ``timeout=600`` (s per Ray call),
    ``width=200``."""
    from raymoe.jobs.benches.pipeline import _ensure_ray, _microbatches

    unknown = set(args) - KNOWN_ARGS
    if unknown:
        raise SystemExit(f"memory bench: unknown argument(s) {sorted(unknown)}; known: {sorted(KNOWN_ARGS)}")
    schedule = args.get("schedule", "1f1b")
    specs = [parse_layout(s, schedule) for s in args.get("layouts", DEFAULT_LAYOUTS).split(",") if s.strip()]
    model, steps = args.get("model", "tiny"), int(args.get("steps", "2"))
    if steps < 1:
        raise SystemExit("memory bench: steps must be >= 1 (the gradients are measured when the optimizer steps)")
    seq_len, mb = int(args.get("seq_len", "128")), int(args.get("mb", "2"))
    c_spec, recompute, dtype = args.get("C", "2*pp"), args.get("recompute", "none"), args.get("dtype", "float32")
    z = args.get("zero1", "runtime").lower()
    if z not in ("runtime", "true", "false"):
        raise SystemExit(f"memory bench: zero1={z!r}; allowed: runtime, true, false")
    zero1 = RUNTIME_ZERO1 if z == "runtime" else z == "true"
    tol = float(args.get("tol", "0.05"))
    cpus, timeout_s = float(args.get("cpus_per_rank", "1")), float(args.get("timeout", "600"))
    plot_dir = pathlib.Path(args["plot"]) if args.get("plot") else None
    console = Console(width=int(args.get("width", "200")))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

    from raymoe.config import check_layout

    cfg = ModelConfig.preset(model)
    started = _ensure_ray(num_cpus=max(8, int(max(pp * ep * dp for pp, ep, dp, _ in specs) * cpus)))
    layouts: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="raymoe-bench-memory-") as tmp:
            for pp, ep, dp, sched in specs:
                C = _microbatches(c_spec, pp)
                L: dict[str, Any] = {"name": layout_name(pp, ep, dp, sched), "pp": pp, "ep": ep, "dp": dp,
                                     "schedule": sched, "microbatches": C, "tol": tol}
                try:
                    check_layout(pp, ep, dp, sched, C, cfg)
                    run_cfg = _run_config(model, pp, ep, dp, sched, C, mb, seq_len, recompute, dtype, cpus, steps,
                                          str(pathlib.Path(tmp) / f"pp{pp}ep{ep}dp{dp}-{sched}"), zero1)
                    plan = plan_of(run_cfg, zero1)
                except ConfigError as e:
                    L["error"] = str(e)
                    console.print(f"[yellow]{L['name']}: skipped[/yellow] ({e})")
                    layouts.append(L)
                    continue
                console.print(f"{L['name']} (C={C}): {pp * ep * dp} rank actor(s), {steps} step(s) ...")
                t0 = time.perf_counter()
                measured = measure(run_cfg, steps, timeout_s)
                L["ranks"] = compare(run_cfg, measured, plan)
                L["losses"] = measured["losses"]
                L["wall_s"] = time.perf_counter() - t0
                layouts.append(L)
    finally:
        if started:
            import ray

            ray.shutdown()
    optim = "sharded over DP (ZeRO-1)" if zero1 else "unsharded: a full AdamW state per DP rank"
    what = (f"model={model}, {dtype}, {steps} step(s) of C micro-batches × {mb}×{seq_len} tokens, "
            f"recompute={recompute}, native DP (optimizer {optim}), {cores} CPU core(s)")
    console.print(tensor_table(layouts, f"bench memory: tensor bytes per rank, measured on the actor vs "
                                        f"raymoe.plan (zero1={zero1}); {what}"))
    console.print(rss_table(layouts, "peak RSS per rank (MiB) = start (torch + Ray, no model) + set-up + tensors + "
                                     "activations (saved for backward, measured) + slack (allocator-kept transients)"))
    blocks = None
    if dtype == "float32":
        blocks = saved_per_block(model, mb, seq_len, recompute)
        console.print(block_table(blocks, f"saved for backward per token and block, {model}, one fp32 forward of "
                                          f"{mb}×{seq_len} tokens in one process, recompute={recompute}: this "
                                          "runtime's CPU kernels vs the plan's table (V3's kernels)"))
    out: dict[str, Any] = {"model": model, "dtype": dtype, "steps": steps, "seq_len": seq_len, "micro_batch_size": mb,
                           "recompute": recompute, "zero1": zero1, "runtime_zero1": RUNTIME_ZERO1, "tol": tol,
                           "cpu_cores": cores, "layouts": layouts, "saved_per_block": blocks}
    if plot_dir is not None and any("ranks" in L for L in layouts):
        out["plot"] = str(plot(layouts, plot_dir / "memory.png",
                               f"raymoe bench memory: plan (hatched, left) vs measured (right) per rank; {what}"))
        console.print(f"plot: {out['plot']}")
    console.print(markdown_summary(layouts), markup=False, highlight=False, soft_wrap=True)
    check(layouts, tol)
    console.print(f"tensor bytes within {100 * tol:g}% of the plan on every rank "
                  f"({sum(len(L.get('ranks', [])) for L in layouts)} ranks, {len(layouts)} layouts)")
    return out
