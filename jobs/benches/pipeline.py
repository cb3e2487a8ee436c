"""`python -m raymoe.jobs.bench pipeline`: pipeline schedules measured on Ray actors, next to the cost simulator.

For every layout ``pp`` in ``pp=`` (default ``2,4``) and schedule in ``schedules=`` (default
``1f1b,zb1p,dualpipe,dualpipev``) the real training runtime trains the model ``model=`` (default ``small``) in
``dtype=`` (default ``float32``): a :class:`~raymoe.actors.RayWorkerGroup` of ``pp`` rank actors
(``parallel.dp_impl=native``) driven by a :class:`~raymoe.train.controller.TrainController` on the bundled corpus,
``warmup=`` (default 1) untimed steps and then ``steps=`` (default 3) timed ones, ``mb=`` (1) sequences of ``seq_len=``
(128) tokens per micro-batch and ``C=`` (default ``2*pp``) micro-batches per step. A combination the model or the
schedule cannot take (``raymoe.config.check_layout``: DualPipe needs an even ``pp`` and ``C >= 2 pp``;
DualPipeV cuts ``2 pp`` stages, at most the model's layers + MTP blocks) is listed with the reason instead of numbers.
The actors are shut down between layouts.

What is measured, per layout (medians over the timed steps unless said otherwise):

* ``step``: the controller's wall time of one step (``perf/step_s``: plan, every rank's op list, gradient reduction
  and optimizer step, Ray round trip) and tokens/s;
* ``pipe``: the pipeline phase of the step, from the first op's start to the last op's end over all ranks (the
  ranks' ``StepResult.timings``; each rank's clock starts when it receives its plan, so the ranks are aligned to
  within the Ray dispatch skew of a few ms);
* per rank: ``busy`` = the worker's ``busy_s`` (sum of its op spans minus the time blocked in receives), ``wait`` =
  ``idle_s`` (blocked waiting for activations / gradients; the op spans include it because an op receives its
  input itself), ``gaps`` = sum of the gaps between consecutive ops (the runner issues ops back to back, so this is
  normally ~0), and the idle time inside the pipeline phase ``pipe - busy``, the quantity the simulator calls
  bubble; ``bubble %`` is its mean over ranks divided by ``pipe``;
* the simulator's prediction (:func:`raymoe.schedule.simulate`) for the measured costs: the mean span of the ``F``,
  ``B``, ``Bi``, ``W`` and ``F&B`` ops (op kind from the op text: ``F3``, ``B1r``, ``Bi0``, ``W2``, ``F4&B0r``) of all
  ranks and timed steps (``stat=median`` for the median, robust to a host that other work slows down now and
  then). Two cost sets: ``raw`` (the spans as measured, receive waits included: an upper bound) and
  ``net`` (each rank's spans scaled by ``busy / sum of spans``, i.e. the waits taken out); the table shows ``net``.
  The simulator takes one cost per op kind: stages are not equal (the first holds the embedding, the last the head,
  the MTP block and the loss), so a heavier last stage shows up as measured bubble the uniform simulation lacks.
  Its ``B`` is the full-backward mean (or ``Bi + W`` when the schedule has no full backward), ``W`` the weight-grad
  mean (0 when there is none), ``F&B`` the pair mean (or ``F + B``), p2p latency 0;
* ``StepResult.peak_activation_bytes`` per rank (max over the timed steps);
* ``StepResult.param_bytes`` per rank next to :func:`raymoe.plan.stage_memory`'s parameters per rank × 4 bytes
  (the runtime keeps fp32 master weights under both dtypes; DualPipe: ``stage_memory(..., dualpipe=True)``, rank
  ``r`` holds stages ``r`` and ``pp-1-r``; DualPipeV: ``stage_memory(cfg, 2 pp, dualpipe=True)``, rank ``r`` holds
  stages ``r`` and ``2pp-1-r``; the last stage's MTP blocks hold a copy of the embedding, counted once per rank);
* the control-plane share (``perf/control_plane_share``: step wall time minus the slowest rank's own step time,
  over the step wall time); the target is below 5 % at PP = 4 on the small model.

Expert parallelism and the overlapped all-to-all: with ``ep=`` (default 1) every pipeline rank is ``ep`` actors
(world ``pp·ep``) whose MoE layers exchange tokens by all-to-all; ``overlap=`` (default ``off``; ``off,on`` runs
both side by side) sets ``parallel.overlap_a2a`` (:mod:`raymoe.experts.overlap`: F&B pairs and adjacent
forward/backward ops of different micro-batches run as two cooperative lanes, one computing while the other's
all-to-all is in flight). Per layout the table then shows ``a2a ms`` (all-to-all time per rank and step, issue to
completion, summed over the rank's exchanges: counts, dispatch, combine and their backward), ``exposed ms`` (the
part of it during which the rank computed nothing: blocked in a synchronous exchange, or every lane waiting) and
``exposed %`` (their ratio over all ranks); means over ranks, medians over timed steps. Where both settings ran,
the bench raises unless their per-step losses agree to 1e-5 (overlap changes when work runs, not what it computes).
Per-rank lists then have ``pp·ep`` entries in global rank order, the parameter prediction is not made (experts are
sharded) and ``plot=`` is ignored.

With ``plot=<dir>`` one PNG per ``pp`` (``<dir>/pipeline_pp<pp>.png``): one panel per schedule, one row per rank with
the measured ops of the median timed step (colour by op kind; the reverse direction lighter, as in
:func:`raymoe.schedule.plot_timeline`) and, below them, the simulated rows for the measured ``net`` costs; the x
axis is milliseconds and shared by all panels.

What 2 CPU cores do to these numbers. Every rank of every layout shares the host's cores (here 2), so the ranks do
not really run in parallel: while one rank computes, the others compete with it for the same cores. Consequences:
an op takes longer when more ranks compute at the same time, so the measured costs depend on the schedule's overlap;
a rank's wait is not lost time for the machine (the other ranks get its core), so the bubble is *hidden* in the step
time (the step is about the total work of all ranks divided by the cores, whatever the schedule) while the per-rank
idle is *inflated* (a rank waits for a peer that is itself starved of CPU); tokens/s cannot grow with PP (more ranks
only add communication and Python overhead); and DualPipe's F&B pairs, which on a GPU hide one micro-batch's
communication behind another's compute, run as a forward then a backward (as two lanes with ``overlap=on``,
which can only hide an all-to-all behind the other lane, not make the cores do more). On GPUs (one rank per device)
each op has a fixed cost, the step time follows the simulator's makespan plus the p2p latency, the bubble is real idle device
time (the ordering 1F1B > ZB1P > DualPipe(V) of the simulated bubble is what a GPU run shows), and throughput
scales with PP until the bubble dominates. The step time also depends on what the split backward costs: on a rank
whose op list has ``W`` ops the runtime takes the "store" weight-grad split (``apply_wgrad_split``:
:mod:`raymoe.wgrad`, :mod:`raymoe.schedule.executor`): ``Bi`` computes the input gradients and parks every
weight-gradient GEMM (Linears, the routed experts' grouped GEMM, the FP8 layers), ``W`` runs only those GEMMs, so
``Bi + W`` is one ``B``'s work plus the store's bookkeeping (norm and embedding gradients stay in ``Bi``): 1.1× a
``B`` in the README's run (pp=2: Bi 183 + W 159 ms vs B 305 ms); the ``op ms`` lines show each run's costs. Read the CPU numbers for the runtime's correctness and overheads
(control plane, activation and parameter memory, the simulator against measured op costs), not for schedule
speed-ups.
"""
from __future__ import annotations

import os

from raymoe.jobs.cluster import configure_process_env

configure_process_env()  # before `import ray`: embedded (loopback only) or cluster mode, see raymoe.jobs.cluster

import pathlib  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any, Optional  # noqa: E402

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

SCHEDULES = ["1f1b", "zb1p", "dualpipe", "dualpipev"]
KINDS = ["F", "B", "Bi", "W", "FB"]
KNOWN_ARGS = {"pp", "schedules", "steps", "warmup", "model", "seq_len", "mb", "C", "dtype", "plot", "cpus_per_rank",
              "width", "timeout", "stat", "ep", "overlap"}
MiB = 1024**2

CPU_NOTE = (
    "{cores} CPU core(s) here, shared by every rank: pipeline ranks do not really run in parallel. A rank's wait "
    "hands its core to the others, so the bubble is hidden in the step time (step ≈ all ranks' work / cores, "
    "whatever the schedule) while per-rank idle is inflated (a rank waits for a peer starved of CPU); op costs grow "
    "when several ranks compute at once; tokens/s cannot grow with PP; F&B pairs run as F then B (overlap=on: as two "
    "lanes). On GPUs (one rank "
    "per device) op costs are fixed, the step follows the simulated makespan (+ p2p latency), the bubble is real "
    "idle device time and the simulated bubble ordering 1F1B > ZB1P > DualPipe(V) is what you would see (Bi/W split "
    "through the deferred weight-grad store: W runs only the parked weight GEMMs; the op ms lines show Bi, W and B). "
    "Read these numbers for overheads, "
    "memory and the simulator against measured costs, not for schedule speed-ups."
)


# ---------------------------------------------------------------------- small helpers
def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _microbatches(spec: str, pp: int) -> int:
    """``C=`` as an integer or as a multiple of pp (``2*pp``, ``4pp``, ``pp``)."""
    s = spec.replace(" ", "").lower()
    if "pp" in s:
        mult = s.replace("*pp", "").replace("pp", "")
        return (int(mult) if mult else 1) * pp
    return int(s)


def op_kind(text: str) -> str:
    """``F``, ``B``, ``Bi``, ``W`` or ``FB`` (an overlapped pair) of an op's text form."""
    from raymoe.schedule import OpKind, parse_op

    if "&" in text:
        return "FB"
    return {OpKind.F: "F", OpKind.B: "B", OpKind.BI: "Bi", OpKind.W: "W"}[parse_op(text).kind]


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else 0.0


def _mean(xs: list[float]) -> float:
    return float(statistics.fmean(xs)) if xs else 0.0


def _ensure_ray(num_cpus: int = 8) -> bool:
    """Start a local Ray unless one is running (tests, ``ray job submit``); True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    env = {k: os.environ[k] for k in ("DS_ACCELERATOR", "WANDB_MODE", "TOKENIZERS_PARALLELISM", "RAYMOE_CACHE_DIR")
           if k in os.environ}
    from raymoe.jobs.cluster import connect

    connect(num_cpus=num_cpus, object_store_mb=512, env_vars=env, log_to_driver=False)
    return True


# ---------------------------------------------------------------------- analysis of the measured steps
def rank_stats(res: Any) -> dict[str, Any]:
    """Per-rank view of one :class:`~raymoe.train.plans.StepResult`: op span, gaps, wait, busy."""
    t = sorted(res.timings, key=lambda x: x.start)
    spans = sum(x.end - x.start for x in t)
    gaps = sum(max(0.0, b.start - a.end) for a, b in zip(t, t[1:]))
    return {"first": t[0].start if t else 0.0, "last": t[-1].end if t else 0.0, "span_sum": spans, "gaps": gaps,
            "wait": res.idle_s, "busy": res.busy_s, "lead": t[0].start if t else 0.0,
            "tail": res.step_s - (t[-1].end if t else 0.0)}


def step_stats(results: list[Any]) -> dict[str, Any]:
    """Pipeline-phase makespan and per-rank idle (``pipe - busy``, the simulator's bubble) of one step."""
    per = [rank_stats(r) for r in results]
    pipe = max(p["last"] for p in per) - min(p["first"] for p in per)
    idle = [pipe - p["busy"] for p in per]
    return {"pipe": pipe, "ranks": per, "idle": idle,
            "bubble_ratio": sum(idle) / (pipe * len(idle)) if pipe > 0 else 0.0}


def op_costs(steps: list[list[Any]], stat: str = "mean") -> dict[str, dict[str, float]]:
    """Mean (or median: ``stat``) op span per kind over every rank and step: ``raw`` (as measured) and ``net`` (each
    rank's spans scaled by ``busy / sum of spans``: receive waits taken out), plus the count per kind."""
    raw: dict[str, list[float]] = {k: [] for k in KINDS}
    net: dict[str, list[float]] = {k: [] for k in KINDS}
    for results in steps:
        for res in results:
            spans = sum(x.end - x.start for x in res.timings)
            scale = (res.busy_s / spans) if spans > 0 else 1.0
            scale = min(1.0, max(0.0, scale))
            for x in res.timings:
                k = op_kind(x.op)
                raw[k].append(x.end - x.start)
                net[k].append((x.end - x.start) * scale)
    f = _median if stat == "median" else _mean
    return {"raw": {k: f(v) for k, v in raw.items() if v}, "net": {k: f(v) for k, v in net.items() if v},
            "count": {k: len(v) for k, v in raw.items() if v}}


def a2a_stats(steps: list[list[Any]]) -> dict[str, Any]:
    """All-to-all time and its exposed part (``StepResult.a2a_s`` / ``a2a_exposed_s``): per rank the median over
    steps, plus the mean over ranks and the exposed share of the total over all ranks and steps."""
    R = len(steps[0])
    total = [_median([s[r].a2a_s for s in steps]) for r in range(R)]
    exposed = [_median([s[r].a2a_exposed_s for s in steps]) for r in range(R)]
    tot_all = sum(res.a2a_s for s in steps for res in s)
    exp_all = sum(res.a2a_exposed_s for s in steps for res in s)
    return {"count": [_median([s[r].a2a_count for s in steps]) for r in range(R)],
            "total_s": total, "exposed_s": exposed, "mean_total_s": _mean(total), "mean_exposed_s": _mean(exposed),
            "exposed_share": exp_all / tot_all if tot_all > 0 else None}


def sim_costs(mean: dict[str, float]) -> dict[str, float]:
    """The simulator's ``F, B, W, FB`` from measured mean spans (see the module docstring)."""
    F = mean.get("F", 0.0)
    W = mean.get("W", 0.0)
    if "B" in mean:
        B = mean["B"]
    else:
        B = mean.get("Bi", 0.0) + W
    W = min(W, B)
    FB = mean.get("FB", F + B)
    return {"F": F, "B": B, "W": W, "FB": FB}


def predicted_params(cfg: ModelConfig, topo: Any) -> dict[str, Any]:
    """``stage_memory``'s parameter bytes per pipeline rank (fp32)."""
    from raymoe.plan import stage_memory

    pp = topo.pp
    if topo.schedule_name == "dualpipev" and pp > 1:
        rows = stage_memory(cfg, 2 * pp, dualpipe=True)[:pp]
    else:
        rows = stage_memory(cfg, pp, dualpipe=topo.schedule_name == "dualpipe" and pp > 1)
    sm = [int(round(r["params_per_device_B"] * 1e9)) * 4 for r in rows]
    return {"stage_memory": sm, "pred": sm}


# ---------------------------------------------------------------------- one layout
def _run_config(model: str, pp: int, schedule: str, C: int, mb: int, seq_len: int, dtype: str, cpus: float,
                total_steps: int, run_dir: str, ep: int = 1, overlap: bool = False) -> RunConfig:
    return RunConfig(
        model=ModelConfig.preset(model),
        parallel=ParallelConfig(pp=pp, ep=ep, schedule=schedule, num_cpus_per_rank=cpus, dp_impl="native",
                                overlap_a2a=overlap),
        train=TrainConfig(steps=total_steps, micro_batch_size=mb, num_microbatches=C, dtype=dtype,
                          checkpoint_every=10**6, eval_every=10**6, export_hf=False, resume="never",
                          warmup_tokens=0, seed=0),
        data=DataConfig(seq_len=seq_len),
        logger=LoggerConfig(kind="none"),
        run_dir=run_dir,
    )


def measure_layout(run: RunConfig, warmup: int, steps: int, timeout_s: float) -> dict[str, Any]:
    """Train ``warmup + steps`` steps of ``run`` on Ray actors; the timed steps' results and metrics."""
    from raymoe.actors import RayWorkerGroup
    from raymoe.data import prepare_data
    from raymoe.train.controller import TrainController

    info = prepare_data(run, progress=False)
    t0 = time.perf_counter()
    group = RayWorkerGroup(run, timeout_s=timeout_s)
    controller = None
    try:
        controller = TrainController(run, group, info["train_samples"], info["val_samples"])
        setup_s = time.perf_counter() - t0
        timed: list[tuple[list[Any], dict[str, Any]]] = []
        for i in range(warmup + steps):
            results, m = controller.train_step()
            if i >= warmup:
                timed.append((results, m))
        return {"timed": timed, "setup_s": setup_s, "topo": controller.topo}
    finally:
        if controller is not None:
            controller.close()
        group.close()
        group.shutdown()


def analyse(run: RunConfig, measured: dict[str, Any], stat: str = "mean") -> dict[str, Any]:
    """Everything the table and the JSON report for one layout (see the module docstring)."""
    from raymoe.schedule import simulate

    topo = measured["topo"]
    timed = measured["timed"]
    steps = [r for r, _ in timed]
    metrics = [m for _, m in timed]
    stats = [step_stats(r) for r in steps]
    step_s = [m["perf/step_s"] for m in metrics]
    med = sorted(range(len(step_s)), key=lambda i: step_s[i])[len(step_s) // 2]  # the median step (plotted)
    R = len(steps[0])
    costs = op_costs(steps, stat)
    sims = {}
    for label in ("raw", "net"):
        c = sim_costs(costs[label])
        r = simulate(topo.schedule, **c)
        sims[label] = {"costs_ms": {k: 1e3 * v for k, v in c.items()}, "makespan_s": r.makespan,
                       "idle_s": list(r.bubble), "bubble_ratio": r.bubble_ratio,
                       "peak_activation_chunks": list(r.peak_activations),
                       "timeline": [[(str(op), s, e) for op, s, e in row] for row in r.timeline]}
    param_meas = [int(res.param_bytes) for res in steps[0]]
    if run.parallel.ep > 1:  # experts sharded: stage_memory's per-stage prediction does not apply
        params = {"pred": [None] * R, "stage_memory": [None] * R}
    else:
        params = predicted_params(run.model, topo)
    ctrl_share = [m["perf/control_plane_share"] for m in metrics]
    ctrl_s = [m["perf/control_plane_s"] for m in metrics]
    pipe = [s["pipe"] for s in stats]
    row: dict[str, Any] = {
        "steps_timed": len(steps),
        "setup_s": measured["setup_s"],
        "tokens_per_step": run.tokens_per_step,
        "step_s": _median(step_s),
        "step_s_all": step_s,
        "tokens_per_s": run.tokens_per_step / _median(step_s),
        "pipe_s": _median(pipe),
        "bubble_ratio": _median([s["bubble_ratio"] for s in stats]),
        "idle_s": [_median([s["idle"][r] for s in stats]) for r in range(R)],
        "wait_s": [_median([s["ranks"][r]["wait"] for s in stats]) for r in range(R)],
        "gaps_s": [_median([s["ranks"][r]["gaps"] for s in stats]) for r in range(R)],
        "busy_s": [_median([s["ranks"][r]["busy"] for s in stats]) for r in range(R)],
        "lead_s": [_median([s["ranks"][r]["lead"] for s in stats]) for r in range(R)],
        "tail_s": [_median([s["ranks"][r]["tail"] for s in stats]) for r in range(R)],
        "op_ms": {k: {kk: 1e3 * vv for kk, vv in costs[k].items()} for k in ("raw", "net")},
        "op_count": costs["count"],
        "sim": sims,
        "sim_over_measured_pipe": sims["net"]["makespan_s"] / _median(pipe) if pipe else None,
        "peak_activation_bytes": [max(int(s[r].peak_activation_bytes) for s in steps) for r in range(R)],
        "param_bytes": param_meas,
        "param_bytes_pred": params["pred"],
        "param_bytes_stage_memory": params["stage_memory"],
        "param_rel_err": [abs(m - p) / p if p else None for m, p in zip(param_meas, params["pred"])],
        "a2a": a2a_stats(steps),
        "control_plane_share": _median(ctrl_share),
        "control_plane_s": _median(ctrl_s),
        "losses": [m["train/loss"] for m in metrics],
        "timeline": [[(t.op, t.start, t.end) for t in res.timings] for res in steps[med]],
        "timeline_step_s": step_s[med],
    }
    return row


def _overlap_mismatches(rows: list[dict[str, Any]], rel: float = 1e-5) -> list[str]:
    """Layouts run with overlap off and on whose per-step losses differ by more than ``rel``."""
    out = []
    by = {(r["pp"], r["schedule"], r["overlap"]): r for r in rows if "error" not in r}
    for (pp, name, ov), on in by.items():
        off = by.get((pp, name, False))
        if not ov or off is None:
            continue
        for a, b in zip(on["losses"], off["losses"]):
            if abs(a - b) > rel * abs(b):
                out.append(f"pp={pp} {name}: overlap on {on['losses']} vs off {off['losses']}")
                break
    return out


# ---------------------------------------------------------------------- plot
def plot_layout(pp: int, rows: list[dict[str, Any]], path: pathlib.Path, title: str) -> pathlib.Path:
    """One panel per schedule: measured op spans per rank (median step) and the simulated rows below them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from raymoe.schedule import OpKind, parse_op
    from raymoe.schedule.plot import COLORS

    kinds = {"F": OpKind.F, "B": OpKind.B, "Bi": OpKind.BI, "W": OpKind.W, "FB": OpKind.FB}

    def color(text: str) -> str:
        op = parse_op(text)
        head = op.pair[0] if op.pair is not None else op
        return COLORS[kinds[op_kind(text)]][head.direction]

    ok = [r for r in rows if "error" not in r]
    if not ok:
        raise ValueError(f"pp={pp}: no measured schedule to plot")
    xmax = 1e3 * max(max(max(e for _, _, e in rank) for rank in r["timeline"] if rank) for r in ok)
    xmax = max(xmax, 1e3 * max(r["sim"]["net"]["makespan_s"] for r in ok))
    height = sum(0.32 * (2 * pp) + 0.9 for _ in ok) + 1.0
    fig, axes = plt.subplots(len(ok), 1, figsize=(15, height), sharex=True, squeeze=False)
    for ax, r in zip(axes[:, 0], ok):
        labels = []
        y = 0
        for rank, ops in enumerate(r["timeline"]):
            for text, s, e in ops:
                ax.barh(y, 1e3 * (e - s), left=1e3 * s, height=0.8, color=color(text), edgecolor="white",
                        linewidth=0.4)
            labels.append(f"rank {rank}  idle {1e3 * r['idle_s'][rank]:.0f} ms")
            y += 1
        for rank, ops in enumerate(r["sim"]["net"]["timeline"]):
            for text, s, e in ops:
                ax.barh(y + 0.3, 1e3 * (e - s), left=1e3 * s, height=0.8, color=color(text), edgecolor="white",
                        linewidth=0.4, alpha=0.55, hatch="//")
            labels.append(f"sim {rank}  idle {1e3 * r['sim']['net']['idle_s'][rank]:.0f} ms")
            y += 1
        ax.set_yticks([i + (0.3 if i >= pp else 0.0) for i in range(2 * pp)])
        ax.set_yticklabels(labels, fontsize=7)
        ax.invert_yaxis()
        ax.axhline(pp - 0.35, color="#888888", linewidth=0.6)
        ax.set_xlim(0, xmax * 1.01)
        ax.set_title(f"{r['schedule']} (C={r['microbatches']}): step {1e3 * r['timeline_step_s']:.0f} ms, pipeline "
                     f"phase {1e3 * r['pipe_s']:.0f} ms (sim {1e3 * r['sim']['net']['makespan_s']:.0f} ms), bubble "
                     f"{100 * r['bubble_ratio']:.0f}% (sim {100 * r['sim']['net']['bubble_ratio']:.0f}%)", fontsize=8)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        ax.tick_params(axis="x", labelsize=7)
    axes[-1, 0].set_xlabel("ms since the rank received its step plan (measured); simulated rows hatched", fontsize=8)
    names = {"F": "F", "B": "B", "Bi": "Bi", "W": "W", "FB": "F&B"}
    handles = [Patch(color=COLORS[kinds[k]][d], label=names[k] + (" (r)" if d else "")) for k in KINDS
               for d in (0, 1)]
    fig.suptitle(title, fontsize=9)
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.35 / height, 1, 1 - 0.3 / height))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------- table
def _per_rank(xs: list[float], scale: float = 1e3, fmt: str = "{:.0f}") -> str:
    return "/".join(fmt.format(scale * x) for x in xs)


def _table(rows: list[dict[str, Any]], title: str) -> Table:
    cols = ["PP", "EP", "sched", "overlap", "C", "a2a ms", "exposed ms", "exposed %", "step ms", "tok/s", "pipe ms",
            "sim ms", "sim/meas", "bubble %", "sim bub %",
            "busy ms/rank", "idle ms/rank", "sim idle ms/rank", "wait ms/rank", "gaps ms max", "peak act MiB/rank",
            "params MiB/rank", "vs pred", "ctrl %"]
    cells: list[Optional[list[str]]] = []
    for r in rows:
        head = [str(r["pp"]), str(r.get("ep", 1)), r["schedule"], "on" if r.get("overlap") else "off",
                str(r["microbatches"])]
        if "error" in r:
            cells.append(head + ["[yellow]skipped[/yellow]"] + [""] * (len(cols) - len(head) - 1))
            continue
        sim = r["sim"]["net"]
        errs = [e for e in r["param_rel_err"] if e is not None]
        a2a = r["a2a"]
        share = a2a["exposed_share"]
        cells.append(head + [
            f"{1e3 * a2a['mean_total_s']:.0f}", f"{1e3 * a2a['mean_exposed_s']:.0f}",
            "-" if share is None else f"{100 * share:.0f}",
            f"{1e3 * r['step_s']:.0f}", f"{r['tokens_per_s']:.0f}", f"{1e3 * r['pipe_s']:.0f}",
            f"{1e3 * sim['makespan_s']:.0f}", f"{r['sim_over_measured_pipe']:.2f}",
            f"{100 * r['bubble_ratio']:.1f}", f"{100 * sim['bubble_ratio']:.1f}", _per_rank(r["busy_s"]),
            _per_rank(r["idle_s"]), _per_rank(sim["idle_s"]), _per_rank(r["wait_s"]),
            f"{1e3 * max(r['gaps_s']):.1f}", _per_rank(r["peak_activation_bytes"], 1 / MiB, "{:.0f}"),
            _per_rank(r["param_bytes"], 1 / MiB, "{:.0f}"), f"{100 * max(errs):.1f}%" if errs else "n/a",
            f"{100 * r['control_plane_share']:.1f}"])
    t = Table(title=title)
    for i, c in enumerate(cols):
        longest = max([len(row[i]) for row, r in zip(cells, rows) if "error" not in r] or [0])
        t.add_column(c, justify="left" if c == "sched" else "right", min_width=min(longest, 24))
    prev = None
    for r, row in zip(rows, cells):
        if prev is not None and r["pp"] != prev:
            t.add_section()
        prev = r["pp"]
        t.add_row(*row)
    return t


# ---------------------------------------------------------------------- entry point
def run(args: dict[str, str]) -> dict:
    """Bench entry point (see module docstring). Args: ``pp=2,4``, ``schedules=1f1b,zb1p,dualpipe,dualpipev``,
    ``steps=3`` (timed), ``warmup=1``, ``model=small``, ``seq_len=128``, ``mb=1``, ``C=2*pp``, ``dtype=float32``,
    ``plot=<dir>``, ``cpus_per_rank=1``, ``timeout=600`` (s per Ray call), ``stat=mean`` (or ``median``: the
    per-kind op cost fed to the simulator), ``width=260`` (console)."""
    unknown = set(args) - KNOWN_ARGS
    if unknown:
        raise SystemExit(f"pipeline bench: unknown argument(s) {sorted(unknown)}; known: {sorted(KNOWN_ARGS)}")
    pps = _ints(args.get("pp", "2,4"))
    schedules = [s.strip() for s in args.get("schedules", ",".join(SCHEDULES)).split(",") if s.strip()]
    bad = [s for s in schedules if s not in SCHEDULES]
    if bad:
        raise SystemExit(f"pipeline bench: unknown schedule(s) {bad}; allowed: {', '.join(SCHEDULES)}")
    steps, warmup = int(args.get("steps", "3")), int(args.get("warmup", "1"))
    if steps < 1 or warmup < 0:
        raise SystemExit("pipeline bench: steps must be >= 1 and warmup >= 0")
    model = args.get("model", "small")
    seq_len, mb = int(args.get("seq_len", "128")), int(args.get("mb", "1"))
    c_spec, dtype = args.get("C", "2*pp"), args.get("dtype", "float32")
    cpus = float(args.get("cpus_per_rank", "1"))
    timeout_s = float(args.get("timeout", "600"))
    stat = args.get("stat", "mean")
    ep = int(args.get("ep", "1"))
    overlaps = [v.strip() for v in args.get("overlap", "off").split(",") if v.strip()]
    if ep < 1 or not overlaps or any(v not in ("off", "on") for v in overlaps):
        raise SystemExit(f"pipeline bench: ep={args.get('ep')!r} overlap={args.get('overlap')!r}; need ep >= 1 and "
                         "overlap a list of off / on")
    if stat not in ("mean", "median"):
        raise SystemExit(f"pipeline bench: stat={stat!r}; allowed: mean, median")
    plot_dir = pathlib.Path(args["plot"]) if args.get("plot") and ep == 1 else None
    console = Console(width=int(args.get("width", "260")))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    note = CPU_NOTE.format(cores=cores)

    import torch

    started = _ensure_ray()
    rows: list[dict[str, Any]] = []
    plots: dict[str, str] = {}
    try:
        from raymoe.config import check_layout

        cfg = ModelConfig.preset(model)
        with tempfile.TemporaryDirectory(prefix="raymoe-bench-pipeline-") as tmp:
            for pp in pps:
                C = _microbatches(c_spec, pp)
                layout_rows = []
                for name, ov in [(n, o) for n in schedules for o in overlaps]:
                    row: dict[str, Any] = {"pp": pp, "ep": ep, "overlap": ov == "on", "schedule": name,
                                           "microbatches": C, "model": model, "dtype": dtype, "seq_len": seq_len,
                                           "micro_batch_size": mb}
                    try:
                        check_layout(pp, ep, 1, name, C, cfg)
                        run_cfg = _run_config(model, pp, name, C, mb, seq_len, dtype, cpus, warmup + steps,
                                              str(pathlib.Path(tmp) / f"pp{pp}-{name}-{ov}"), ep, ov == "on")
                    except ConfigError as e:
                        row["error"] = str(e)
                        console.print(f"[yellow]pp={pp} {name}: skipped[/yellow] ({e})")
                        rows.append(row)
                        layout_rows.append(row)
                        continue
                    console.print(f"pp={pp} ep={ep} {name} overlap={ov} C={C}: {warmup} warm-up + {steps} timed "
                                  "steps ...")
                    t0 = time.perf_counter()
                    measured = measure_layout(run_cfg, warmup, steps, timeout_s)
                    row.update(analyse(run_cfg, measured, stat))
                    row["wall_s"] = time.perf_counter() - t0
                    console.print(f"  step {1e3 * row['step_s']:.0f} ms, pipeline {1e3 * row['pipe_s']:.0f} ms "
                                  f"(sim {1e3 * row['sim']['net']['makespan_s']:.0f} ms), control plane "
                                  f"{100 * row['control_plane_share']:.1f}%, set-up {row['setup_s']:.1f} s")
                    rows.append(row)
                    layout_rows.append(row)
                if plot_dir is not None and any("error" not in r for r in layout_rows):
                    title = (f"raymoe pipeline on Ray actors: model={model}, pp={pp}, C={C}, mb={mb}, "
                             f"seq_len={seq_len}, {dtype}, {cores} CPU core(s) shared by all ranks")
                    p = plot_layout(pp, layout_rows, plot_dir / f"pipeline_pp{pp}.png", title)
                    plots[f"pp{pp}"] = str(p)
    finally:
        if started:
            import ray

            ray.shutdown()
    title = (f"pipeline schedules on Ray actors: model={model}, {dtype}, mb={mb}, seq_len={seq_len}, {steps} timed "
             f"steps after {warmup} warm-up; sim = raymoe.schedule.simulate with the measured net op costs; "
             "per-rank lists are rank 0/1/...")
    console.print(_table(rows, title))
    for r in rows:
        if "error" in r:
            console.print(f"pp={r['pp']} {r['schedule']}: skipped, {r['error']}")
            continue
        ops = " ".join(f"{k}={v:.1f}" for k, v in r["op_ms"]["net"].items())
        sm = ""
        pred = ("n/a (experts sharded)" if None in r["param_bytes_pred"]
                else f"{_per_rank(r['param_bytes_pred'], 1 / MiB, '{:.1f}')} MiB")
        if "param_note" in r:
            sm = (f"; stage_memory alone: {_per_rank(r['param_bytes_stage_memory'], 1 / MiB, '{:.1f}')} MiB "
                  f"({r['param_note']})")
        a2a = r["a2a"]
        if a2a["exposed_share"] is not None:
            console.print(f"pp={r['pp']} ep={r['ep']} {r['schedule']} overlap={'on' if r['overlap'] else 'off'}: "
                          f"all-to-all per rank and step {_per_rank(a2a['total_s'])} ms, exposed "
                          f"{_per_rank(a2a['exposed_s'])} ms ({a2a['count'][0]:.0f} exchanges on rank 0)")
        console.print(f"pp={r['pp']} {r['schedule']}: {stat} op ms (net) {ops}; params measured "
                      f"{_per_rank(r['param_bytes'], 1 / MiB, '{:.1f}')} MiB, predicted "
                      f"{pred}{sm}")
    mismatch = _overlap_mismatches(rows)
    for m in mismatch:
        console.print(f"[red]{m}[/red]")
    ctrl4 = [r["control_plane_share"] for r in rows if r["pp"] == 4 and "error" not in r]
    if ctrl4:
        verdict = "meets" if max(ctrl4) < 0.05 else "misses"
        console.print(f"control-plane share at pp=4: max {100 * max(ctrl4):.1f}% ({verdict} the < 5% target)")
    console.print(f"[bold]Caveat[/bold]: {note}")
    for k, p in plots.items():
        console.print(f"time line {k}: {p}")
    if mismatch:
        raise RuntimeError("pipeline bench: overlap on/off losses differ: " + "; ".join(mismatch))
    return {"model": model, "dtype": dtype, "seq_len": seq_len, "micro_batch_size": mb, "steps": steps, "ep": ep,
            "warmup": warmup, "cost_stat": stat, "cpu_cores": cores, "torch_threads_driver": torch.get_num_threads(),
            "cpu_note": note, "rows": rows, "plots": plots}
