"""`python -m raymoe.jobs.schedule name=dualpipe ranks=8 microbatches=20 plot=out.png`: inspect a pipeline schedule.

Builds the schedule (ours, or torch's with ``name=torch:<Class>``), validates it, simulates it under the given
per-chunk costs and prints every rank's op list, a per-rank table (op counts, busy time, bubble, peak activations,
parameter chunks) and the paper's bubble formula next to the simulated bubble. ``plot=`` writes the PNG time line,
``html=`` an HTML one. The config schema is :class:`ScheduleJobConfig` (``conf/schedule.yaml`` only overrides it);
an invalid combination (e.g. ``name=dualpipe ranks=4 microbatches=6``) exits with status 2 and the rule on one line.
Hydra writes no output directories (``hydra.run.dir: .``, ``hydra.output_subdir: null``).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from raymoe.jobs.configs import InvalidConfig, hydra_app, to_object
from raymoe.schedule import (
    BUILDERS,
    TORCH_SCHEDULES,
    OpKind,
    Schedule,
    ScheduleError,
    SimResult,
    build,
    plot_timeline,
    simulate,
    timeline_html,
    torch_schedule,
    validate,
)

__all__ = ["ScheduleJobConfig", "CostConfig", "make_schedule", "rank_table", "run", "main"]


@dataclass
class CostConfig:
    """Per-chunk op costs: forward, full backward, weight-grad, overlapped F&B pair, P2P latency."""

    F: float = 1.0
    B: float = 2.0
    W: float = 1.0
    FB: float = 3.0
    p2p: float = 0.0


@dataclass
class ScheduleJobConfig:
    """Schema of ``conf/schedule.yaml``."""

    name: str = "dualpipe"
    ranks: int = 8
    microbatches: int = 20
    costs: CostConfig = field(default_factory=CostConfig)
    ops: bool = True
    comms: bool = False
    plot: Optional[str] = None
    html: Optional[str] = None

    def __post_init__(self) -> None:
        names = list(BUILDERS) + [f"torch:{k}" for k in TORCH_SCHEDULES]
        key = self.name.lower()
        if key not in BUILDERS and not (key.startswith("torch:") and
                                        any(key == f"torch:{k}".lower() for k in TORCH_SCHEDULES)):
            raise ScheduleError(f"name={self.name!r} is unknown; choose one of {', '.join(names)}")
        if self.ranks < 1 or self.microbatches < 1:
            raise ScheduleError(f"ranks and microbatches must be >= 1 (got ranks={self.ranks}, "
                                f"microbatches={self.microbatches})")


ConfigStore.instance().store(name="schedule_schema", node=ScheduleJobConfig)


def make_schedule(name: str, ranks: int, microbatches: int) -> Schedule:
    """Our builder for ``name``, or torch's schedule for ``torch:<Class>``; validated."""
    if name.lower().startswith("torch:"):
        cls = next(k for k in TORCH_SCHEDULES if k.lower() == name.split(":", 1)[1].lower())
        return validate(torch_schedule(cls, ranks, microbatches))
    return validate(build(name, ranks, microbatches))


def rank_table(result: SimResult) -> Table:
    """Per-rank table: chunks, op counts, busy, bubble, peak activations, parameter chunks."""
    s = result.schedule
    t = Table(title=f"{s.name}: {s.num_ranks} ranks, {s.num_stages} stages, {s.num_microbatches} micro-batches, "
                    f"makespan {result.makespan:g}")
    for col in ("rank", "chunks (stage[r])", "F", "B", "Bi", "W", "F&B", "busy", "bubble", "peak act", "param chunks"):
        t.add_column(col, justify="right")
    for r in range(s.num_ranks):
        n: Counter = Counter()
        for op in s.ops(r):
            n[op.kind] += 1
            for p in op.parts if op.pair else ():
                n[p.kind] += 1
        chunks = " ".join(f"{st}{'r' if d else ''}" for st, d in s.chunks(r))
        t.add_row(str(r), chunks, *(str(n[k]) for k in (OpKind.F, OpKind.B, OpKind.BI, OpKind.W, OpKind.FB)),
                  f"{result.busy[r]:g}", f"{result.bubble[r]:g}", str(result.peak_activations[r]),
                  str(result.param_chunks[r]))
    return t


def run(cfg: ScheduleJobConfig, console: Optional[Console] = None) -> SimResult:
    """Build, validate, simulate, print and (optionally) plot; returns the simulation result."""
    console = console or Console()
    sched = make_schedule(cfg.name, cfg.ranks, cfg.microbatches)
    c = cfg.costs
    res = simulate(sched, F=c.F, B=c.B, W=c.W, FB=c.FB, p2p=c.p2p)
    if cfg.ops:
        for r in range(sched.num_ranks):
            ops = sched.with_comms(r) if cfg.comms else sched.ops(r)
            console.print(f"[bold]rank {r}[/bold]: " + " ".join(str(o) for o in ops), soft_wrap=True)
    console.print(rank_table(res))
    formula = res.formula
    line = f"max bubble {res.max_bubble:g} (simulated)"
    if formula is not None:
        exact = abs(formula - res.max_bubble) < 1e-9
        line += f", paper formula {formula:g} ({'equal' if exact else 'differs: the formula is exact only when B-W = F and W <= F'})"
    console.print(line + f"; model copies {sched.model_copies}; costs F={c.F:g} B={c.B:g} W={c.W:g} "
                         f"F&B={c.FB:g} p2p={c.p2p:g}")
    if cfg.plot:
        console.print(f"wrote {plot_timeline(res, cfg.plot)}")
    if cfg.html:
        with open(cfg.html, "w") as fh:
            fh.write(timeline_html(res))
        console.print(f"wrote {cfg.html}")
    return res


@hydra_app("schedule")  # @hydra.main over conf/schedule.yaml; an invalid override -> one line on stderr, exit 2
def main(dcfg: DictConfig) -> None:
    cfg = to_object(dcfg, ScheduleJobConfig)  # runs __post_init__ (unknown schedule name, counts < 1)
    try:
        run(cfg)
    except ScheduleError as e:  # a (name, ranks, micro-batches) combination the builder rejects, with its rule
        raise InvalidConfig(str(e)) from None


if __name__ == "__main__":
    main()
