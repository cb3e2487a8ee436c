"""Static report of one training run from its own files: ``<run_dir>/metrics.jsonl`` (+ ``summary.json``).

wandb's offline ``.wandb`` log cannot be read back locally (wandb 0.31 has no local reader for it: ``wandb sync
--view`` is gone), so this report reads the JSONL
file the coordinator always writes (``platform/raymoe/metrics.py``) and draws, with matplotlib's Agg canvas (no
pyplot, no global backend switch):

* one PNG per section of ``panels.yaml`` (Loss, Throughput, Balance with per-layer MaxVio, Optimizer);
* one PNG per expert matrix: the expert-load heatmap (panel per routing layer, x = step, y = expert,
  colour = share of that layer's routed tokens, so a balanced layer is flat at 1/E) and the router-bias
  trajectories (panel per layer, one line per expert);
* the serving section (a serving run's ``serving/*`` keys, see ``panels.yaml``): ``serving_slot_load`` (heatmap of
  each physical slot's share of its layer's rows over steps) and ``serving_placement`` (training's expert load per
  layer beside the initial slot → expert placement, shards outlined);
* ``report.html``: a single self-contained page with every PNG inlined as base64, the summary table and the last
  logged value of every panel metric.

Data rules: a step logged twice (a run resumed from a checkpoint appends to the same file) keeps its last record;
a line that is not JSON (a write cut short by a crash) is skipped with a warning; keys absent from the file (no
eval, ``histogram_every`` never hit, ``logger`` of an older version) give an empty panel that says "not logged"
or, when a whole figure has no data, a note in the HTML instead of the PNG.

Usage::

    python dashboards/render_local.py RUN_DIR [--out DIR] [--panels panels.yaml]

    >>> paths = render("runs/tiny")            # doctest: +SKIP
    >>> sorted(paths)                          # doctest: +SKIP
    ['balance', 'expert_load', 'loss', 'optimizer', 'report', 'router_bias', 'throughput']
"""
from __future__ import annotations

import argparse
import base64
import datetime as _dt
import html
import json
import math
import pathlib
import re
import sys
import warnings
from typing import Any, Optional, Sequence

import numpy as np

if __package__ in (None, ""):  # run as `python dashboards/render_local.py`: import the package by file location
    sys.path.append(str(pathlib.Path(__file__).resolve().parent.parent))

from dashboards.panels import ExpertMatrix, PanelsError, PanelsSpec, Section, load_panels  # noqa: E402

__all__ = ["MetricsFileError", "load_records", "main", "render"]

_DPI = 110
_MAX_LEGEND = 12  # more lines than this: no per-line legend (colour encodes the layer / expert index)


class MetricsFileError(ValueError):
    """metrics.jsonl is empty or holds no usable record."""


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------

def load_records(path: str | pathlib.Path) -> list[dict[str, Any]]:
    """Parse a metrics.jsonl file into records sorted by step, one per step (the last one logged wins).

    Raises:
        FileNotFoundError: the file does not exist.
        MetricsFileError: no line holds a JSON object with an integer ``step``.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}: the coordinator writes <run_dir>/metrics.jsonl; "
                                "check the run directory")
    by_step: dict[int, dict[str, Any]] = {}
    bad: list[int] = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                bad.append(lineno)
                continue
            step = rec.get("step") if isinstance(rec, dict) else None
            if not isinstance(step, int) or isinstance(step, bool):
                bad.append(lineno)
                continue
            by_step[step] = rec
    if bad:
        warnings.warn(f"{path}: skipped {len(bad)} unreadable line(s) (first: line {bad[0]}); "
                      "a crash mid-write leaves a partial last line", stacklevel=2)
    if not by_step:
        raise MetricsFileError(f"{path} holds no metrics record (a JSON object with an integer 'step' per line); "
                               "did the run log any step?")
    return [by_step[s] for s in sorted(by_step)]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _series(records: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values of a scalar key, skipping records without it (or with a non-numeric value)."""
    pts = [(r["step"], float(r[key])) for r in records if _is_number(r.get(key))]
    if not pts:
        return np.zeros(0), np.zeros(0)
    s, v = zip(*pts)
    return np.asarray(s, dtype=float), np.asarray(v, dtype=float)


def _matrix(records: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps ``[T]`` and values ``[T, L, E]`` of a list-valued ``[layer][expert]`` key.

    Records whose shape differs from the first one are skipped with a warning (the layout cannot change mid-run).
    """
    steps, mats = [], []
    shape: Optional[tuple[int, ...]] = None
    skipped = 0
    for r in records:
        v = r.get(key)
        if v is None:
            continue
        try:
            a = np.asarray(v, dtype=float)
        except (TypeError, ValueError):
            skipped += 1
            continue
        if a.ndim == 1:  # a single routing layer logged as a flat list
            a = a[None, :]
        if a.ndim != 2 or a.size == 0 or (shape is not None and a.shape != shape):
            skipped += 1
            continue
        shape = a.shape
        steps.append(r["step"])
        mats.append(a)
    if skipped:
        warnings.warn(f"{key}: skipped {skipped} record(s) that are not a [layer][expert] matrix of shape {shape}",
                      stacklevel=2)
    if not mats:
        return np.zeros(0), np.zeros((0, 0, 0))
    return np.asarray(steps, dtype=float), np.stack(mats)


def _read_summary(run_dir: pathlib.Path) -> tuple[Optional[dict[str, Any]], str]:
    """``(summary, note)``: the parsed summary.json (None if absent or unreadable) and why it is missing."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return None, "no summary.json (the run has not finished, or crashed before writing it)"
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError) as e:
        warnings.warn(f"{path}: unreadable ({e}); the report omits the summary", stacklevel=2)
        return None, f"summary.json is unreadable: {e}"
    if not isinstance(data, dict):
        return None, f"summary.json holds a {type(data).__name__}, not an object"
    return data, ""


# ----------------------------------------------------------------------------------------------------------------
# Drawing (matplotlib Figure + Agg canvas: no pyplot state, safe to call from any thread or test)
# ----------------------------------------------------------------------------------------------------------------

def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: pathlib.Path) -> pathlib.Path:
    fig.savefig(path, format="png", dpi=_DPI)
    return path


def _layer_label(key: str) -> str:
    m = re.search(r"layer_(\d+)$", key)
    return f"layer {m.group(1)}" if m else key


def _natural_key(key: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _render_section(section: Section, records: list[dict[str, Any]], all_keys: list[str],
                    path: pathlib.Path) -> Optional[pathlib.Path]:
    """One PNG with a subplot per panel; None when no panel of the section has any data."""
    from matplotlib import colormaps

    n = len(section.panels)
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig = _new_figure(4.6 * ncols, 3.4 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    any_data = False
    n_records = len(records)
    for ax, panel in zip(axes, section.panels):
        family = sorted((k for k in all_keys if panel.matches_regex(k)), key=_natural_key)
        lines = 0
        positive = True
        cmap = colormaps["viridis"]
        for i, key in enumerate(family):  # thin per-layer lines first, so the aggregate stays on top
            s, v = _series(records, key)
            if s.size:
                label = _layer_label(key) if len(family) <= _MAX_LEGEND else None
                ax.plot(s, v, lw=0.9, alpha=0.75, color=cmap(i / max(1, len(family) - 1) * 0.9), label=label)
                lines += 1
                positive &= bool(np.all(v > 0))
        absent = []
        for key in panel.y:
            s, v = _series(records, key)
            if not s.size:
                absent.append(key)
                continue
            sparse = s.size < 0.5 * n_records or s.size == 1
            ax.plot(s, v, lw=2.2 if family else 1.5, color="black" if family else None,
                    marker="o" if sparse else None, ms=4, label=key)
            lines += 1
            positive &= bool(np.all(v > 0))
        title = panel.title
        if family and len(family) > _MAX_LEGEND:
            title += f"\n(thin: {len(family)} layers, colour = layer index)"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        if panel.y_label:
            ax.set_ylabel(panel.y_label, fontsize=9)
        if lines == 0:
            missing = ", ".join(list(panel.y) + ([panel.y_regex] if panel.y_regex else []))
            ax.text(0.5, 0.5, f"not logged:\n{missing}", transform=ax.transAxes, ha="center", va="center",
                    fontsize=8, color="0.45", wrap=True)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        any_data = True
        if absent:  # some keys of the panel were logged, these were not (e.g. no eval ran yet)
            ax.text(0.01, 0.01, "not logged: " + ", ".join(absent), transform=ax.transAxes, ha="left", va="bottom",
                    fontsize=7, color="0.45")
        if panel.log_y and positive:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(section.name, fontsize=13, fontweight="bold")
    return _save(fig, path) if any_data else None


def _layer_grid(fig: Any, num_layers: int, max_cols: int) -> list[Any]:
    ncols = min(max_cols, num_layers)
    axes = fig.subplots(math.ceil(num_layers / ncols), ncols, squeeze=False).ravel()
    for ax in axes[num_layers:]:
        ax.set_visible(False)
    return list(axes[:num_layers])


def _step_edges(steps: np.ndarray) -> np.ndarray:
    """Cell edges halfway between logged steps (``[T+1]``), so irregular logging intervals keep their widths."""
    if steps.size == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    mid = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[steps[0] - (mid[0] - steps[0])], mid, [steps[-1] + (steps[-1] - mid[-1])]])


def _render_heatmap(m: ExpertMatrix, steps: np.ndarray, counts_TLE: np.ndarray, path: pathlib.Path) -> pathlib.Path:
    """Per-layer heatmaps of each expert's share of the layer's routed tokens over steps.

    The colour scale diverges at the balanced share 1/E (white): red experts are overloaded, blue ones starved, so
    imbalance reads at a glance whatever E is. The colorbar is labelled in shares, not in deviations.
    """
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.ticker import MaxNLocator

    T, L, E = counts_TLE.shape
    totals_TL1 = counts_TLE.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        share_TLE = np.where(totals_TL1 > 0, counts_TLE / totals_TL1, np.nan)
    balanced = 1.0 / E
    peak = float(np.nanmax(share_TLE)) if np.isfinite(share_TLE).any() else 2 * balanced
    norm = TwoSlopeNorm(vmin=0.0, vcenter=balanced, vmax=max(peak, 1.5 * balanced))
    ncols = 1 if L <= 2 else min(4, L)
    nrows = math.ceil(L / ncols)
    fig = _new_figure(9.0 if ncols == 1 else 4.4 * ncols + 1.2, 1.0 + nrows * max(2.4, min(6.0, 0.16 * E + 1.2)))
    axes = _layer_grid(fig, L, ncols)
    x_edges = _step_edges(steps)
    y_edges = np.arange(E + 1) - 0.5
    mesh = None
    for layer, ax in enumerate(axes):
        mesh = ax.pcolormesh(x_edges, y_edges, share_TLE[:, layer, :].T, cmap="RdBu_r", norm=norm, shading="flat")
        ax.set_title(f"layer {layer}", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("expert")
        ax.yaxis.set_major_locator(MaxNLocator(nbins=min(E, 16), integer=True))
    cbar = fig.colorbar(mesh, ax=axes, shrink=0.9)
    cbar.set_label(m.value_label or "share of tokens")
    cbar.ax.axhline(balanced, color="black", lw=1.0)
    fig.suptitle(f"{m.title}\n[{m.jsonl_key}: {T} snapshots, {L} layers x {E} experts; white = balanced 1/E]",
                 fontsize=11, fontweight="bold")
    return _save(fig, path)


def _render_trajectories(m: ExpertMatrix, steps: np.ndarray, values_TLE: np.ndarray,
                         path: pathlib.Path) -> pathlib.Path:
    """Per-layer line plots, one line per expert (e.g. the aux-loss-free router bias)."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    T, L, E = values_TLE.shape
    ncols = min(3, L)
    nrows = math.ceil(L / ncols)
    fig = _new_figure(4.6 * ncols + 1.4, 3.3 * nrows + 0.5)
    axes = _layer_grid(fig, L, ncols)
    if E <= 10:
        colors = [colormaps["tab10"](i) for i in range(E)]
    elif E <= 20:
        colors = [colormaps["tab20"](i) for i in range(E)]
    else:
        colors = [colormaps["viridis"](i / (E - 1)) for i in range(E)]
    marker = "o" if T <= 12 else None
    for layer, ax in enumerate(axes):
        for e in range(E):
            ax.plot(steps, values_TLE[:, layer, e], color=colors[e], lw=1.0, marker=marker, ms=3, label=f"expert {e}")
        ax.set_title(f"layer {layer}", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(m.value_label or m.jsonl_key, fontsize=9)
        ax.grid(True, alpha=0.3)
    if E <= 16:
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right upper", fontsize=8, title="expert")
    else:
        sm = ScalarMappable(norm=Normalize(0, E - 1), cmap="viridis")
        fig.colorbar(sm, ax=axes, shrink=0.9).set_label("expert index")
    fig.suptitle(f"{m.title}  [{m.jsonl_key}, {T} snapshots]", fontsize=12, fontweight="bold")
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------------------------
# HTML
# ----------------------------------------------------------------------------------------------------------------

# list-valued serving entries (not wandb histograms, so not in panels.yaml's expert_matrices)
SERVING_SLOT_LOAD = ExpertMatrix(name="serving_slot_load", title="Serving: rows per physical expert slot",
                                 jsonl_key="serving/slot_load", wandb_key="serving/slot_load/layer_{layer}",
                                 kind="heatmap", value_label="share of the layer's rows (uniform = 1/slots)")


def _render_placement(records: list[dict[str, Any]], path: pathlib.Path) -> Optional[pathlib.Path]:
    """Training's expert load (bars, per layer) beside the initial placement (slot -> logical expert, shards)."""
    first = next((r for r in records if "serving/initial_placement" in r), None)
    if first is None:
        return None
    place = np.asarray(first["serving/initial_placement"], dtype=int)
    load = np.asarray(first["serving/train_expert_load"], dtype=float) if "serving/train_expert_load" in first \
        else None
    shards = int(first.get("serving/num_shards", 1)) or 1
    L, R = place.shape
    E = int(place.max()) + 1
    fig = _new_figure(10.0, 1.2 + 2.2 * L)
    axes = fig.subplots(L, 2, squeeze=False)
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    for li in range(L):
        ax_l, ax_p = axes[li]
        if load is not None and li < load.shape[0]:
            row = load[li]
            share = row / row.sum() if row.sum() > 0 else row
            ax_l.bar(np.arange(E), share, color=[cmap(e % 20) for e in range(E)])
            ax_l.axhline(1.0 / E, color="black", lw=0.8, ls="--")
            ax_l.set_ylabel("share", fontsize=8)
        else:
            ax_l.text(0.5, 0.5, "no expert_load from training:\ntrivial placement", ha="center", va="center",
                      transform=ax_l.transAxes, fontsize=8, color="0.45")
        ax_l.set_title(f"layer {li}: training expert load", fontsize=9)
        ax_l.set_xlabel("logical expert", fontsize=8)
        ax_p.imshow(place[li][None, :] % 20, cmap=cmap, vmin=0, vmax=19, aspect="auto")
        for p, e in enumerate(place[li]):
            ax_p.text(p, 0, str(e), ha="center", va="center", fontsize=7)
        for s in range(1, shards):
            ax_p.axvline(s * R / shards - 0.5, color="black", lw=2)
        ax_p.set_yticks([])
        ax_p.set_xlabel("physical slot (thick lines: shard boundaries)", fontsize=8)
        ax_p.set_title(f"layer {li}: initial placement ({R} slots, {shards} shards)", fontsize=9)
    fig.suptitle("Placement handed from training (expert_load.safetensors -> EPLB)", fontsize=11, fontweight="bold")
    return _save(fig, path)


def _fmt(v: Any) -> str:
    """Table formatting: ints as-is, floats to 6 significant digits, containers as compact JSON (truncated)."""
    if isinstance(v, bool) or v is None or isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple, dict)):
        s = json.dumps(v, separators=(",", ":"), default=str)
        return s if len(s) <= 160 else s[:157] + "..."
    return str(v)


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out += _flatten(v, key + ".")
        else:
            out.append((key, v))
    return out


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1500px}
h1{font-size:22px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px;margin:8px 0} th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f3f3f3} td:nth-child(2){font-family:ui-monospace,Menlo,monospace}
img{max-width:100%;border:1px solid #eee} .note{color:#777;font-style:italic} .meta{color:#555;font-size:13px}
"""


def _write_html(path: pathlib.Path, run_dir: pathlib.Path, records: list[dict[str, Any]], spec: PanelsSpec,
                summary: Optional[dict[str, Any]], summary_note: str,
                figures: list[tuple[str, Optional[pathlib.Path], str]]) -> pathlib.Path:
    steps = [r["step"] for r in records]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>raymoe report: {html.escape(run_dir.name)}"
             f"</title><style>{_CSS}</style></head><body>",
             f"<h1>raymoe run report: {html.escape(run_dir.name)}</h1>",
             f"<p class='meta'>run dir: <code>{html.escape(str(run_dir))}</code> &middot; {len(records)} logged "
             f"steps ({steps[0]}&ndash;{steps[-1]}) &middot; generated "
             f"{html.escape(_dt.datetime.now().isoformat(timespec='seconds'))}</p>",
             "<h2>Summary</h2>"]
    if summary is not None:
        parts.append(_table([(k, _fmt(v)) for k, v in _flatten(summary)], ("key", "value")))
    else:
        parts.append(f"<p class='note'>{html.escape(summary_note)}</p>")
    last_rows = []
    for key in spec.scalar_metrics():
        s, v = _series(records, key)
        if s.size:
            last_rows.append((key, _fmt(float(v[-1])), str(int(s[-1]))))
    parts.append("<h2>Last logged values</h2>")
    parts.append(_table(last_rows, ("metric", "value", "step")) if last_rows
                 else "<p class='note'>none of the panel metrics were logged</p>")
    for title, png, note in figures:
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if png is None:
            parts.append(f"<p class='note'>{html.escape(note)}</p>")
        else:
            b64 = base64.b64encode(png.read_bytes()).decode("ascii")
            parts.append(f"<img alt='{html.escape(title, quote=True)}' src='data:image/png;base64,{b64}'>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts))
    return path


# ----------------------------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------------------------

def render(run_dir: str | pathlib.Path, out_dir: str | pathlib.Path | None = None,
           panels: str | pathlib.Path | PanelsSpec | None = None) -> dict[str, pathlib.Path]:
    """Render the PNGs and ``report.html`` of one run.

    Args:
        run_dir: the run directory holding ``metrics.jsonl`` (and optionally ``summary.json``).
        out_dir: where to write; default ``<run_dir>/report``.
        panels: a parsed layout or a panels.yaml path; default ``dashboards/panels.yaml``.

    Returns:
        Written files by name: each section slug (``loss``, ``throughput``, ``balance``, ``optimizer``) and expert
        matrix name (``expert_load``, ``router_bias``) that had data, plus ``report`` (the HTML).

    Raises:
        FileNotFoundError: ``<run_dir>/metrics.jsonl`` does not exist.
        MetricsFileError: the file holds no usable record.
    """
    run_dir = pathlib.Path(run_dir)
    spec = panels if isinstance(panels, PanelsSpec) else load_panels(panels)
    records = load_records(run_dir / "metrics.jsonl")
    out = pathlib.Path(out_dir) if out_dir is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    all_keys = sorted({k for r in records for k in r})
    written: dict[str, pathlib.Path] = {}
    figures: list[tuple[str, Optional[pathlib.Path], str]] = []
    for section in spec.sections:
        png = _render_section(section, records, all_keys, out / f"{section.slug}.png")
        if png is not None:
            written[section.slug] = png
        figures.append((section.name, png, f"no metric of section {section.name!r} was logged"))
    for m in spec.expert_matrices:
        steps, mat = _matrix(records, m.jsonl_key)
        png = None
        if steps.size:
            draw = _render_heatmap if m.kind == "heatmap" else _render_trajectories
            png = draw(m, steps, mat, out / f"{m.name}.png")
            written[m.name] = png
        figures.append((m.title, png, f"{m.jsonl_key} was not logged (it is written every "
                                      "logger histogram_every steps)"))
    if any("serving/slot_load" in r or "serving/initial_placement" in r for r in records):  # a serving run
        # the slot count changes when the policy adds/removes a shard: draw the latest layout's records
        with_load = [r for r in records if isinstance(r.get(SERVING_SLOT_LOAD.jsonl_key), list)]
        last_shape = np.shape(with_load[-1][SERVING_SLOT_LOAD.jsonl_key]) if with_load else None
        steps, mat = _matrix([r for r in with_load if np.shape(r[SERVING_SLOT_LOAD.jsonl_key]) == last_shape],
                             SERVING_SLOT_LOAD.jsonl_key)
        png = _render_heatmap(SERVING_SLOT_LOAD, steps, mat, out / "serving_slot_load.png") if steps.size else None
        if png is not None:
            written["serving_slot_load"] = png
        figures.append((SERVING_SLOT_LOAD.title, png, "serving/slot_load was not logged"))
        png = _render_placement(records, out / "serving_placement.png")
        if png is not None:
            written["serving_placement"] = png
        figures.append(("Serving: placement from training", png, "serving/initial_placement was not logged"))
    summary, note = _read_summary(run_dir)
    written["report"] = _write_html(out / "report.html", run_dir, records, spec, summary, note, figures)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point: 0 on success, 1 when the run directory or panels file is unusable."""
    ap = argparse.ArgumentParser(description="Render PNGs and a self-contained report.html from a run's metrics.jsonl.")
    ap.add_argument("run_dir", help="run directory holding metrics.jsonl (and summary.json)")
    ap.add_argument("--out", default=None, help="output directory (default: <run_dir>/report)")
    ap.add_argument("--panels", default=None, help="panels file (default: dashboards/panels.yaml)")
    args = ap.parse_args(argv)
    try:
        paths = render(args.run_dir, args.out, args.panels)
    except (FileNotFoundError, MetricsFileError, PanelsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, p in paths.items():
        print(f"{name:12s} {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
