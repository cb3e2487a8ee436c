"""`python -m raymoe.jobs.bench schedule`: our pipeline schedules next to torch.distributed.pipelining's, simulated.

For PP in ``pps`` (default 4, 8, 16) and C in ``mults`` x PP (default 2, 4) micro-batches, every schedule is built,
validated and run through the same cost simulator (:func:`raymoe.schedule.simulate`): ours (``1f1b``, ``zb1p``,
``dualpipe``, ``dualpipev``) and torch's (``Schedule1F1B``, ``ScheduleInterleavedZeroBubble``,
``ScheduleZBVZeroBubble``, ``ScheduleDualPipeV``, translated by :mod:`raymoe.schedule.torch_compat`). A schedule that
fails validation is listed with the reason instead of numbers.

Two cost sets, per chunk: the paper's ``F=1, B=2, W=1, F&B=3``, and one measured here from real F / full B / Bi / W
timings of one stage chunk (the tiny DeepSeek-V3's middle stage with its Linears swapped for
:class:`~raymoe.schedule.DeferredLinear`, or a Linear-GELU-Linear MLP stage with ``model=mlp`` or when the model
package is unavailable), normalised to ``F = 1``. On CPU nothing overlaps, so the measured ``F&B`` is a forward and
a backward back to back.

Units. Schedules with ``S = 2 PP`` stages (V-shaped and interleaved) cut the model in chunks half as big as
1F1B's, so under equal per-chunk costs they do twice the work per rank. ``bubble %`` (idle fraction of the makespan)
compares them directly; ``act``, ``params`` and ``bubble/st`` are scaled by ``PP/S`` into units of one 1F1B stage.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Optional

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from raymoe.schedule import (
    TORCH_SCHEDULES,
    DeferredLinear,
    ScheduleError,
    WeightGradStore,
    build,
    simulate,
    swap_linears,
    torch_schedule,
    torch_schedule_available,
    validate,
)

OURS = ["1f1b", "zb1p", "dualpipe", "dualpipev"]
PAPER_COSTS = {"F": 1.0, "B": 2.0, "W": 1.0, "FB": 3.0}


def _chunk(source: str) -> tuple[nn.Module, Callable[[], torch.Tensor], str]:
    """A stage chunk (hidden -> hidden) and an input factory; falls back to the MLP if the model is unavailable."""
    torch.manual_seed(0)
    if source in ("auto", "tiny"):
        try:
            from raymoe.config import ModelConfig
            from raymoe.model import DeepSeekV3

            cfg = ModelConfig.preset("tiny")
            model = swap_linears(DeepSeekV3(cfg))
            chunk = model.stages(3)[1]  # a middle stage: decoder layer(s) only
            return chunk, lambda: torch.randn(4, 64, cfg.hidden_size, requires_grad=True), "tiny DeepSeek-V3 stage 1/3"
        except Exception as e:  # the model package is another issue's; measure on the MLP instead
            if source == "tiny":
                raise
            print(f"tiny model unavailable ({type(e).__name__}: {e}); measuring the MLP stage")
    h = 256
    mlp = nn.Sequential(DeferredLinear(h, 4 * h), nn.GELU(), DeferredLinear(4 * h, h))
    return mlp, lambda: torch.randn(4, 64, h, requires_grad=True), f"MLP stage Linear({h},{4 * h})-GELU-Linear"


def measure_costs(source: str = "auto", reps: int = 7) -> dict:
    """Median F, full B, Bi, W, F-then-B times (ms) of one chunk and the costs normalised to F = 1."""
    chunk, make_x, label = _chunk(source)
    store = WeightGradStore()
    ms: dict[str, list[float]] = {k: [] for k in ("F", "B", "Bi", "W", "FB")}
    for i in range(reps + 2):
        x = make_x()
        t0 = time.perf_counter()
        y = chunk(x)
        t1 = time.perf_counter()
        g = torch.randn_like(y)
        with store.defer((i, 0, 0)):
            y.backward(g)
        t2 = time.perf_counter()
        store.run((i, 0, 0))
        t3 = time.perf_counter()
        x2 = make_x()
        y2 = chunk(x2)
        t4 = time.perf_counter()
        y2.backward(g)
        t5 = time.perf_counter()
        x3, x4 = make_x(), make_x()
        y4 = chunk(x4)
        t6 = time.perf_counter()
        chunk(x3)
        y4.backward(g)
        t7 = time.perf_counter()
        if i >= 2:  # warm-up
            for k, v in (("F", t1 - t0), ("Bi", t2 - t1), ("W", t3 - t2), ("B", t5 - t4), ("FB", t7 - t6)):
                ms[k].append(v * 1e3)
        chunk.zero_grad(set_to_none=True)
    med = {k: statistics.median(v) for k, v in ms.items()}
    f = med["F"]
    costs = {"F": 1.0, "B": round(med["B"] / f, 3), "W": round(min(med["W"], med["B"]) / f, 3),
             "FB": round(med["FB"] / f, 3)}
    return {"source": label, "threads": torch.get_num_threads(), "median_ms": {k: round(v, 3) for k, v in med.items()},
            "costs": costs, "bi_plus_w_over_b": round((med["Bi"] + med["W"]) / med["B"], 3)}


def _row(impl: str, name: str, pp: int, c: int, costs: dict) -> dict:
    row: dict[str, Any] = {"impl": impl, "schedule": name, "pp": pp, "microbatches": c}
    try:
        s = build(name, pp, c) if impl == "ours" else torch_schedule(name, pp, c)
        validate(s)
        r = simulate(s, **costs)
    except ScheduleError as e:
        row["error"] = str(e)
        return row
    scale = pp / s.num_stages
    row.update(stages=s.num_stages, max_bubble=r.max_bubble, makespan=r.makespan,
               bubble_pct=100 * r.bubble_ratio, bubble_stage_units=r.max_bubble * scale,
               peak_act_stage_units=max(r.peak_activations) * scale, peak_act_chunks=max(r.peak_activations),
               params_stage_units=max(r.param_chunks) * scale, formula=r.formula)
    return row


def _table(title: str, rows: list[dict]) -> Table:
    t = Table(title=title)
    for col in ("PP", "C", "impl", "schedule", "S", "bubble", "bubble %", "makespan", "bubble/st", "act", "params",
                "formula / note"):
        t.add_column(col, justify="left" if col in ("impl", "schedule", "formula / note") else "right")
    prev = None
    for row in rows:
        key = (row["pp"], row["microbatches"])
        if prev is not None and key != prev:
            t.add_section()
        prev = key
        head = [str(row["pp"]), str(row["microbatches"]), row["impl"], row["schedule"]]
        if "error" in row:
            t.add_row(*head, *[""] * 7, f"[red]invalid[/red]: {row['error'][:90]}")
            continue
        note = "" if row["formula"] is None else f"{row['formula']:.4g}" + (
            "" if abs(row["formula"] - row["max_bubble"]) < 1e-9 else " (≠ sim)")
        t.add_row(*head, str(row["stages"]), f"{row['max_bubble']:.4g}", f"{row['bubble_pct']:.1f}",
                  f"{row['makespan']:.4g}", f"{row['bubble_stage_units']:.4g}", f"{row['peak_act_stage_units']:g}",
                  f"{row['params_stage_units']:g}", note)
    return t


def run(args: dict[str, str]) -> dict:
    """Bench entry point (see module docstring). Args: ``pps=4,8,16``, ``mults=2,4``, ``model=auto|tiny|mlp``,
    ``reps=7``, ``measure=1``."""
    pps = [int(x) for x in args.get("pps", "4,8,16").split(",")]
    mults = [int(x) for x in args.get("mults", "2,4").split(",")]
    console = Console(width=int(args.get("width", "170")))
    cost_sets: dict[str, dict] = {"paper": dict(PAPER_COSTS)}
    measured: Optional[dict] = None
    if args.get("measure", "1") not in ("0", "false", "no"):
        measured = measure_costs(args.get("model", "auto"), int(args.get("reps", "7")))
        cost_sets["measured"] = measured["costs"]
        console.print(f"measured on {measured['source']} ({measured['threads']} threads): median ms "
                      f"{measured['median_ms']} -> costs {measured['costs']} "
                      f"((Bi+W)/B = {measured['bi_plus_w_over_b']})")
    torch_names = list(TORCH_SCHEDULES) if torch_schedule_available() else []
    if not torch_names:
        console.print(f"[yellow]torch {torch.__version__}: schedule listing unavailable, ours only[/yellow]")
    out: dict[str, Any] = {"cost_sets": cost_sets, "measured": measured, "torch": torch.__version__, "tables": {}}
    for label, costs in cost_sets.items():
        rows = []
        for pp in pps:
            for m in mults:
                c = m * pp
                rows += [_row("ours", n, pp, c, costs) for n in OURS]
                rows += [_row("torch", n, pp, c, costs) for n in torch_names]
        cs = " ".join(f"{k}={v:g}" for k, v in costs.items())
        console.print(_table(f"schedules, {label} costs ({cs}); act/params/bubble/st in 1F1B-stage units", rows))
        out["tables"][label] = rows
    return out
