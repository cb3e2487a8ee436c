"""Time-line plots of a simulated schedule: one row per rank, one box per op, colored by kind and direction.

``plot_timeline(result, "out.png")`` draws a :class:`~raymoe.schedule.simulate.SimResult` with matplotlib (Agg,
no display needed); ``timeline_html(result)`` returns a dependency-free HTML page with the same boxes (hover for op,
start and end). Colors follow the DualPipe paper's figure: forwards blue, full backwards orange, input-grad
backwards teal, weight-grads green, overlapped F&B pairs purple; the reverse direction (text ``r``) is the lighter
shade. Idle time is white, so the bubble is what you see.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Union

from .ir import Op, OpKind
from .simulate import SimResult

__all__ = ["plot_timeline", "timeline_html", "COLORS"]

#: (direction 0, direction 1) face colors per op kind
COLORS: dict[OpKind, tuple[str, str]] = {
    OpKind.F: ("#1f5fbf", "#7fb2ff"),
    OpKind.B: ("#d9781f", "#f5b978"),
    OpKind.BI: ("#138a8a", "#74d0cf"),
    OpKind.W: ("#2e8b3a", "#8fd498"),
    OpKind.FB: ("#6a3d9a", "#b79ad6"),
}


def _color(op: Op) -> str:
    if op.pair is not None:
        return COLORS[OpKind.FB][op.pair[0].direction]
    return COLORS[op.kind][op.direction]


def _title(result: SimResult) -> str:
    s, c = result.schedule, result.costs
    return (f"{s.name}: {s.num_ranks} ranks, {s.num_stages} stages, {s.num_microbatches} micro-batches | "
            f"F={c.F:g} B={c.B:g} W={c.W:g} F&B={c.FB:g} p2p={c.p2p:g} | makespan {result.makespan:g}, "
            f"max bubble {result.max_bubble:g}")


def plot_timeline(result: SimResult, path: Union[str, Path], dpi: int = 100) -> Path:
    """Write the time line of ``result`` as a PNG to ``path`` and return the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    s = result.schedule
    R = s.num_ranks
    span = max(result.makespan, 1e-9)
    width = min(max(10.0, 0.3 * sum(len(t) for t in result.timeline) / R + 2.0), 24.0)
    fig, ax = plt.subplots(figsize=(width, 0.55 * R + 1.6))
    px_per_unit = width * dpi * 0.85 / span
    for r, row in enumerate(result.timeline):
        for op, t0, t1 in row:
            ax.barh(r, t1 - t0, left=t0, height=0.82, color=_color(op), edgecolor="white", linewidth=0.6)
            label = str(op)
            if (t1 - t0) * px_per_unit >= 5.2 * len(label):  # only where the text fits
                light = (op.pair[0] if op.pair else op).direction == 1
                ax.text((t0 + t1) / 2, r, label, ha="center", va="center", fontsize=6,
                        color="#222222" if light else "white")
    ax.set_yticks(range(R))
    ax.set_yticklabels([f"rank {r}  (bubble {b:g})" for r, b in enumerate(result.bubble)], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, span)
    ax.set_xlabel("time (cost units)", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(_title(result), fontsize=9)
    kinds = sorted({(o.pair[0].direction if o.pair else o.direction, OpKind.FB if o.pair else o.kind)
                    for row in result.timeline for o, _, _ in row}, key=lambda x: (list(COLORS).index(x[1]), x[0]))
    names = {OpKind.F: "F", OpKind.B: "B", OpKind.BI: "Bi", OpKind.W: "W", OpKind.FB: "F&B"}
    handles = [Patch(color=COLORS[k][d], label=names[k] + (" (r)" if d else "")) for d, k in kinds]
    height = 0.55 * R + 1.6
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.tight_layout(rect=(0, 0.3 / height, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def timeline_html(result: SimResult, px_per_unit: float = 14.0) -> str:
    """A standalone HTML page of the time line (absolutely positioned boxes with hover titles)."""
    rows = []
    for r, row in enumerate(result.timeline):
        boxes = "".join(
            f'<div class="op" title="{html.escape(str(op))} [{t0:g}, {t1:g}]" style="left:{t0 * px_per_unit:.1f}px;'
            f'width:{max((t1 - t0) * px_per_unit - 1, 1):.1f}px;background:{_color(op)}">{html.escape(str(op))}</div>'
            for op, t0, t1 in row)
        rows.append(f'<div class="row"><span class="lab">rank {r} ({result.bubble[r]:g})</span>'
                    f'<div class="track" style="width:{result.makespan * px_per_unit:.0f}px">{boxes}</div></div>')
    return ("<!doctype html><meta charset=utf-8><title>schedule</title><style>"
            "body{font:12px sans-serif}.row{display:flex;align-items:center;margin:2px 0}"
            ".lab{width:120px;flex:none}.track{position:relative;height:22px;background:#f4f4f4}"
            ".op{position:absolute;top:1px;height:20px;color:#fff;font-size:10px;overflow:hidden;"
            "text-align:center;line-height:20px;white-space:nowrap}</style>"
            f"<h3>{html.escape(_title(result))}</h3>" + "".join(rows))
