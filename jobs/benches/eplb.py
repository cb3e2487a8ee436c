"""`python -m raymoe.jobs.bench eplb`: redundant-expert placement quality (trivial / greedy / refined), re-plan time.

For each case, three plans of the same loads (:mod:`raymoe.balance.eplb`):

* ``trivial`` — slot ``p`` holds expert ``p % E`` (no planning);
* ``greedy`` — ``rebalance_experts(..., refine=False)``: group → node packing, replication, greedy GPU packing;
* ``refined`` — the same plus the swap refinement (the default).

Quality is max / mean of the per-GPU loads (1.0 is perfect), averaged over layers (``mean``) and for the worst layer
(``worst``). ``bound`` is a lower bound on ``mean`` for any plan with the refined plan's node assignment and replica
counts: per layer ``max(heaviest node / GPUs per node, heaviest single replica) / mean GPU load``; in hierarchical
mode the node packing of whole groups usually sets it, so refined sitting on ``bound`` means nothing is left to gain
inside the nodes. ``re-plan ms`` is the median wall time of ``reps`` calls (greedy and refined, on this host's CPU)
with ``threads`` torch intra-op threads (default 1: the planner's tensors are small, and on a busy host extra
threads only contend; the previous setting is restored afterwards).

Cases (``cases=`` comma list, default ``v3,v3-global,small``), loads drawn per seed from a lognormal (heavy-tailed,
``sigma=1.0``) and rounded to token counts (mean 1000 per expert):

* ``v3`` — 58 MoE layers × 256 experts, 288 slots, 32 GPUs, 4 nodes, 8 groups (hierarchical; V3 prefill-like);
* ``v3-global`` — the same with 1 group (``1 % 4 != 0``: global policy over all 32 GPUs; V3 decode-like);
* ``small`` — 8 layers × 64 experts, 80 slots, 8 GPUs, 2 nodes, 4 groups;
* ``tiny`` — 2 layers × 16 experts, 20 slots, 4 GPUs, 2 nodes, 4 groups (for tests).

Recorded loads: ``loads=<path>`` plans a recorded ``[layers, experts]`` load tensor instead of the synthetic cases
(add ``cases=`` to get both). The file is either

* safetensors with a tensor named ``expert_load`` (any real dtype, typically int64 token counts), or
* JSON (``.json``): ``{"expert_load": [[c_00, c_01, ...], [c_10, ...], ...]}`` — one list of per-expert counts per
  MoE layer.

Its topology comes from ``gpus=`` (32), ``nodes=`` (4), ``groups=`` (8) and ``replicas=`` (experts + gpus, one
redundant slot per GPU).

Serving (``serving=1``): redundant experts in the engine (:class:`raymoe.engine.ReplicatedExperts`, in-process
shards) on the tiny trained checkpoint (:mod:`raymoe.engine.tiny`, built in a temp dir) under a skewed prompt mix (one
prompt kind repeated, ``requests=`` 8, ``max_tokens=`` 24). Phase *before*: ``shards=`` 2 shards, no redundant slot,
placement planned from the load recorded on the training text; then the :class:`raymoe.engine.redundancy`
controller is asked for a decision (thresholds set so the skew triggers it) and scales up by one shard (re-plan over
the recorded window + weight copies; ``apply ms``); phase *after*: the same mix again. Reported per phase: measured
balance (max / mean rows per shard, layer mean), wall tokens/s (in-process shards run one after another on this
CPU, so the wall rate cannot show the parallel gain), the modelled EP critical path (Σ over layers of the busiest
shard's rows per generated token: with one GPU per shard the MoE time follows it), TTFT/TPOT; plus the live re-plan
pause (median of ``reps`` re-plans at a fixed shard count). Greedy tokens are checked to be identical in both phases
and to the local-experts engine. Serving metrics are written through :class:`raymoe.metrics.MetricsLogger` to
``<out_dir>/serving_metrics`` (``metrics_dir=`` to override) for ``dashboards/render_local.py``.

With ``remote=1`` the shards are separate processes (``python -m raymoe.engine.remote``, one per shard, plus one
for the scale-up) reached over gloo pairs (:class:`raymoe.engine.remote.RemoteShard`), exactly the data plane of
the ``ExpertShards`` Serve deployment; a third phase runs the *before* placement with in-process shards in the same
run, so the table shows the data-plane cost (tok/s remote vs in-process) side by side.

Other args: ``seed=0``, ``sigma=1.0``, ``reps=5``, ``threads=1``, ``plot=<png>`` (bar chart of the layer-mean
imbalance per plan and case, with the worst layer and the bound), ``width=150`` (console).
"""
from __future__ import annotations

import json
import pathlib
import statistics
import time
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from raymoe.balance.eplb import balancedness, rebalance_experts, trivial_placement
from raymoe.jobs.benches import median_seconds

# name: (layers, experts, replicas, gpus, nodes, groups)
CASES: dict[str, tuple[int, int, int, int, int, int]] = {
    "v3": (58, 256, 288, 32, 4, 8),
    "v3-global": (58, 256, 288, 32, 4, 1),
    "small": (8, 64, 80, 8, 2, 4),
    "tiny": (2, 16, 20, 4, 2, 4),
}
PLANS = ("trivial", "greedy", "refined")


def synthetic_loads(layers: int, experts: int, seed: int, sigma: float) -> torch.Tensor:
    """``[layers, experts]`` int64 token counts, lognormal(0, sigma) scaled to a mean near 1000 per expert."""
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(layers, experts, dtype=torch.float64).log_normal_(0.0, sigma, generator=g)
    return torch.round(x * (1000.0 / torch.exp(torch.tensor(sigma * sigma / 2)))).to(torch.int64)


def read_loads(path: str) -> torch.Tensor:
    """The ``expert_load`` ``[layers, experts]`` tensor of a safetensors or JSON file (format: module docstring)."""
    p = pathlib.Path(path)
    if p.suffix.lower() == ".json":
        data = json.loads(p.read_text())
        if not isinstance(data, dict) or "expert_load" not in data:
            raise ValueError(f"{path}: expected a JSON object with key 'expert_load'")
        t = torch.tensor(data["expert_load"])
    else:
        from safetensors.torch import load_file

        tensors = load_file(str(p))
        if "expert_load" not in tensors:
            raise ValueError(f"{path}: no tensor named 'expert_load' (found {sorted(tensors)})")
        t = tensors["expert_load"]
    if t.dim() != 2:
        raise ValueError(f"{path}: expert_load must be [layers, experts], got shape {tuple(t.shape)}")
    return t


def _bound(w: torch.Tensor, phy2log: torch.Tensor, logcnt: torch.Tensor, gpus: int, nodes: int) -> torch.Tensor:
    """Per-layer lower bound of max/mean for any packing keeping this plan's node assignment and replica counts."""
    w = w.to(torch.float64)
    slot = w.gather(1, phy2log) / logcnt.gather(1, phy2log).to(torch.float64)
    node = slot.view(w.shape[0], nodes, -1).sum(-1) / (gpus // nodes)
    mean = slot.sum(-1) / gpus
    lb = torch.maximum(node.amax(-1), slot.amax(-1)) / mean.clamp_min(1e-300)
    return torch.where(mean > 0, lb, torch.ones_like(lb))


def bench_case(name: str, w: torch.Tensor, replicas: int, gpus: int, nodes: int, groups: int, reps: int) -> dict:
    layers, experts = w.shape
    mode = "hierarchical" if groups % nodes == 0 and nodes > 1 else "global"  # one node: the same as global
    plans = {
        "trivial": trivial_placement(w, replicas, gpus),
        "greedy": rebalance_experts(w, replicas, groups, nodes, gpus, refine=False),
        "refined": rebalance_experts(w, replicas, groups, nodes, gpus),
    }
    quality = {}
    for plan, (phy2log, _, logcnt) in plans.items():
        b = balancedness(w, phy2log, logcnt, gpus)
        quality[plan] = {"mean": b.mean().item(), "worst": b.max().item()}
    eff_nodes = nodes if mode == "hierarchical" else 1
    bound = _bound(w, plans["refined"][0], plans["refined"][2], gpus, eff_nodes)
    times = {
        "greedy": 1e3 * median_seconds(lambda: rebalance_experts(w, replicas, groups, nodes, gpus, refine=False),
                                        reps),
        "refined": 1e3 * median_seconds(lambda: rebalance_experts(w, replicas, groups, nodes, gpus), reps),
    }
    return {"case": name, "mode": mode, "layers": layers, "experts": experts, "replicas": replicas, "gpus": gpus,
            "nodes": nodes, "groups": groups, "quality": quality,
            "bound": {"mean": bound.mean().item(), "worst": bound.max().item()}, "replan_ms": times}


def _table(rows: list[dict], reps: int, threads: int) -> Table:
    t = Table(title=f"EPLB placement: per-GPU load max/mean (1 = perfect); re-plan ms = median of {reps}, "
                    f"{threads} thread(s)")
    for col in ("case", "mode", "L×E", "slots/GPUs/nodes/groups", "plan", "mean", "worst layer", "bound mean",
                "bound worst", "re-plan ms"):
        t.add_column(col, justify="left" if col in ("case", "mode", "plan") else "right")
    for r in rows:
        t.add_section()
        for plan in PLANS:
            q = r["quality"][plan]
            head = [r["case"], r["mode"], f"{r['layers']}×{r['experts']}",
                    f"{r['replicas']}/{r['gpus']}/{r['nodes']}/{r['groups']}"] if plan == "trivial" else [""] * 4
            t.add_row(*head, plan, f"{q['mean']:.4f}", f"{q['worst']:.4f}",
                      f"{r['bound']['mean']:.4f}" if plan == "refined" else "",
                      f"{r['bound']['worst']:.4f}" if plan == "refined" else "",
                      f"{r['replan_ms'][plan]:.1f}" if plan in r["replan_ms"] else "")
    return t


def plot_balancedness(rows: list[dict], out: str) -> str:
    """Grouped bars: layer-mean (max/mean − 1) per plan and case, log scale, the worst layer as a tick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = 1e-5
    fig, ax = plt.subplots(figsize=(max(6.0, 2.2 * len(rows)), 4.2))
    width = 0.8 / len(PLANS)
    for k, plan in enumerate(PLANS):
        xs = [i + (k - (len(PLANS) - 1) / 2) * width for i in range(len(rows))]
        mean = [max(r["quality"][plan]["mean"] - 1, floor) for r in rows]
        worst = [max(r["quality"][plan]["worst"] - 1, floor) for r in rows]
        bars = ax.bar(xs, mean, width, label=plan)
        ax.scatter(xs, worst, marker="_", s=200, color=bars.patches[0].get_facecolor(), zorder=3)
        for x, m in zip(xs, mean):
            ax.annotate(f"{m + 1:.4f}", (x, m), ha="center", va="bottom", fontsize=7, rotation=90,
                        xytext=(0, 2), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)))
    labels = [f"{r['case']}\n{r['layers']}×{r['experts']}, {r['replicas']} slots\n"
              f"{r['gpus']} GPUs, {r['nodes']} nodes, {r['groups']} groups\n{r['mode']}" for r in rows]
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("max/mean − 1 of per-GPU load (log)")
    ax.scatter(range(len(rows)), [max(r["bound"]["mean"] - 1, floor) for r in rows], marker="x", color="black",
               zorder=4, label="bound (mean)")
    ax.set_title("EPLB imbalance: bars = layer mean, dashes = worst layer", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def run(args: dict[str, str]) -> dict:
    """Bench entry point (see the module docstring for the args)."""
    seed = int(args.get("seed", "0"))
    sigma = float(args.get("sigma", "1.0"))
    reps = int(args.get("reps", "5"))
    console = Console(width=int(args.get("width", "150")))
    if args.get("serving") in ("1", "true", "yes"):
        return run_serving(args, console)
    default_cases = "" if "loads" in args else "v3,v3-global,small"
    names = [c for c in args.get("cases", default_cases).split(",") if c]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        raise SystemExit(f"unknown eplb case(s) {unknown}; available: {', '.join(CASES)}")
    threads = int(args.get("threads", "1"))
    rows = []
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for name in names:
            layers, experts, replicas, gpus, nodes, groups = CASES[name]
            w = synthetic_loads(layers, experts, seed, sigma)
            rows.append(bench_case(name, w, replicas, gpus, nodes, groups, reps))
        if "loads" in args:
            w = read_loads(args["loads"])
            gpus = int(args.get("gpus", "32"))
            rows.append(bench_case(f"loads:{pathlib.Path(args['loads']).name}", w,
                                   int(args.get("replicas", str(w.shape[1] + gpus))), gpus,
                                   int(args.get("nodes", "4")), int(args.get("groups", "8")), reps))
    finally:
        torch.set_num_threads(prev_threads)
    console.print(_table(rows, reps, threads))
    out: dict[str, Any] = {"seed": seed, "sigma": sigma, "reps": reps, "threads": threads, "cases": rows}
    if args.get("plot"):
        out["plot"] = plot_balancedness(rows, args["plot"])
        console.print(f"plot: {out['plot']}")
    return out


def _phase(engine, backend, ctl, prompts: list[str], max_tokens: int) -> dict:
    from raymoe.engine import SamplingParams

    backend.recorder.reset_slots(backend.placement.num_slots)
    sp = SamplingParams(max_tokens=max_tokens, temperature=0)
    ids = [engine.add_request(None, p, sp) for p in prompts]
    gen0 = engine.stats["generation_tokens"]
    final: dict = {}
    ttft, tpot = [], []
    t0 = time.perf_counter()
    while engine.has_unfinished():
        outs = engine.step()
        if ctl is not None:
            ctl.after_step(outs, engine.stats["generation_tokens"])
        for o in outs:
            if o.finished:
                final[o.request_id] = o.outputs[0].token_ids
                m = o.metrics
                ttft.append(m["first_token_time"] - m["arrival_time"])
                n = len(o.outputs[0].token_ids)
                if n > 1:
                    tpot.append((m["finish_time"] - m["first_token_time"]) / (n - 1))
    wall = time.perf_counter() - t0
    gen = engine.stats["generation_tokens"] - gen0
    rows = backend.shard_rows()
    return {"tokens": [final[i] for i in ids], "balance": float(backend.measured_balance().mean()),
            "tokens_per_s": gen / wall, "critical_rows_per_token": float(rows.amax(-1).sum()) / max(gen, 1),
            "ttft_ms": 1e3 * statistics.mean(ttft), "tpot_ms": 1e3 * statistics.mean(tpot) if tpot else 0.0,
            "num_shards": backend.num_shards, "redundant_slots": backend.placement.redundant_slots}


def run_serving(args: dict[str, str], console: Console) -> dict:
    """Redundant experts while serving (module docstring, ``serving=1``)."""
    import copy
    import tempfile

    from raymoe.config import LoggerConfig
    from raymoe.engine import EngineConfig, LLMEngine, Placement, ReplicatedExperts, SamplingParams
    from raymoe.engine.redundancy import PolicyConfig, RedundancyController, RedundancyPolicy
    from raymoe.engine.tiny import build_tiny_checkpoint, tiny_corpus
    from raymoe.metrics import MetricsLogger

    requests, max_tokens = int(args.get("requests", "8")), int(args.get("max_tokens", "24"))
    shards, reps = int(args.get("shards", "4")), int(args.get("reps", "5"))
    remote = args.get("remote") in ("1", "true", "yes")
    prev = torch.get_num_threads()
    torch.set_num_threads(int(args.get("threads", "1")))
    procs: list = []
    try:
        with tempfile.TemporaryDirectory(prefix="raymoe-eplb-serving-") as tmp:
            ck = build_tiny_checkpoint(pathlib.Path(tmp) / "ckpt", seed=int(args.get("seed", "0")))
            base = LLMEngine.from_pretrained(ck, EngineConfig(num_speculative_tokens=1))
            # no prefix cache: every phase must route the same tokens through the experts (a cached prompt would skip
            # its prefill, and the phases would compare placements on different loads)
            cfg = EngineConfig(num_speculative_tokens=1, block_size=8, enable_prefix_caching=False)

            def engine(backend):
                return LLMEngine(copy.deepcopy(base.model), base.tokenizer, cfg, base.eos_token_id,
                                 expert_backend=backend)

            # the load "training" recorded: router counts over the training text
            rec = ReplicatedExperts(num_shards=1, num_slots=8)
            e0 = engine(rec)
            e0.generate(tiny_corpus(1), SamplingParams(max_tokens=2, temperature=0))
            train_load = rec.recorder.window_load().float()
            keys = rec.layer_keys
            E = rec.placement.num_experts
            mix = ["She counted the stars: one, two, three, four, five, six"] * requests
            ref = [o.outputs[0].token_ids for o in
                   engine(None).generate(mix, SamplingParams(max_tokens=max_tokens, temperature=0))]
            initial = Placement.from_load(keys, train_load, shards * (E // shards), shards, 1, 1, source="load-file")
            factory = None
            if remote:
                from raymoe.engine.remote import RemoteShard, spawn_shard_processes

                addrs = spawn_shard_processes(shards + 1, procs)

                def factory(i: int):
                    return RemoteShard(addrs[i], f"shard{i}")
            backend = ReplicatedExperts(initial, shard_factory=factory)
            backend.prior_load = train_load
            eng = engine(backend)
            mdir = pathlib.Path(args.get("metrics_dir", str(pathlib.Path(args.get("out_dir", "bench_results"))
                                                          / "serving_metrics")))
            logger = MetricsLogger(mdir, LoggerConfig(kind="none"), {"bench": "eplb serving"})
            ctl = RedundancyController(backend, RedundancyPolicy(PolicyConfig(
                min_shards=shards, max_shards=shards + 1, up_balance=1.05, down_balance=1.01, patience=1,
                cooldown_s=0, min_tokens=16)), logger=logger, decide_every_steps=0, metrics_every_steps=5)
            before = _phase(eng, backend, ctl, mix, max_tokens)
            t0 = time.perf_counter()
            ev = ctl.decide()
            apply_ms = 1e3 * (time.perf_counter() - t0)
            ctl.log_metrics(ev)
            after = _phase(eng, backend, ctl, mix, max_tokens)
            pauses = [1e3 * backend.replan()["pause_s"] for _ in range(reps)]
            ctl.log_metrics()
            logger.finish()
            local = None
            if remote:  # the same initial placement with in-process shards: the data-plane cost side by side
                lb = ReplicatedExperts(initial)
                lb.prior_load = train_load
                local = _phase(engine(lb), lb, None, mix, max_tokens)
    finally:
        torch.set_num_threads(prev)
        for p in procs:
            p.kill()
            p.wait()
    same = before["tokens"] == ref and after["tokens"] == ref and (local is None or local["tokens"] == ref)
    if not same:
        bad = [n for n, r in (("before", before), ("after scale-up", after), ("in-process", local))
               if r is not None and r["tokens"] != ref]
        raise AssertionError(f"eplb serving bench: greedy tokens differ from local experts in phase(s) {bad}")
    where = "remote shard processes over gloo" if remote else "in-process shards"
    t = Table(title=f"Redundant experts while serving (tiny, {where}, {requests} skewed requests x {max_tokens} "
                    f"tokens; greedy tokens identical to local experts: {same})")
    for col in ("phase", "shards", "redundant", "balance", "tok/s (wall)", "EP critical rows/token", "TTFT ms",
                "TPOT ms"):
        t.add_column(col, justify="left" if col == "phase" else "right")
    phases = [("before", before), ("after scale-up", after)]
    if local is not None:
        phases.append(("before, in-process shards", local))
    for name, r in phases:
        t.add_row(name, str(r["num_shards"]), str(r["redundant_slots"]), f"{r['balance']:.3f}",
                  f"{r['tokens_per_s']:.1f}", f"{r['critical_rows_per_token']:.2f}", f"{r['ttft_ms']:.1f}",
                  f"{r['tpot_ms']:.2f}")
    console.print(t)
    decision = {k: v for k, v in (ev or {}).items() if isinstance(v, (int, float, str)) or v is None}
    console.print(f"decision: {decision.get('action')} ({decision.get('reason')}); apply {apply_ms:.1f} ms; "
                  f"re-plan pause median {statistics.median(pauses):.2f} ms over {reps}; metrics: {mdir}")
    for _, r in phases:
        r.pop("tokens")
    if local is not None:
        console.print(f"data plane: remote / in-process tok/s = {before['tokens_per_s'] / local['tokens_per_s']:.2f}")
    return {"serving": {"before": before, "after": after, "in_process": local, "remote": remote,
                        "decision": decision, "apply_ms": apply_ms,
                        "replan_pause_ms": {"median": statistics.median(pauses), "max": max(pauses)},
                        "tokens_identical": same, "metrics_dir": str(mdir), "requests": requests,
                        "max_tokens": max_tokens}}
