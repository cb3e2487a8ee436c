"""Balance ablation: no balancing vs auxiliary loss (α=1e-3) vs auxiliary-loss-free (γ=1e-3), side by side.

Launched through the training job (``python -m raymoe.jobs.train +experiment=balance_ablation [overrides]``): the
composed run config is trained three times in sub-directories of its run dir, with only the balancing knobs changed.
Reported per variant: final validation loss, MaxVio_global (validation tokens, mean over routing layers), MaxVio_batch
averaged over the last quarter of training, and the plot ``balance_ablation.png`` (MaxVio_batch and training loss
over steps). Results are also written to ``balance_ablation.json``.
"""
from __future__ import annotations

import copy
import json
import pathlib
from typing import Any

from rich.console import Console
from rich.table import Table

from raymoe.config import BalanceConfig, RunConfig

VARIANTS: dict[str, dict[str, float]] = {
    "none": {"gamma": 0.0, "alpha": 0.0},
    "aux_loss": {"gamma": 0.0, "alpha": 1e-3},
    "aux_free": {"gamma": 1e-3, "alpha": 0.0},
}


def variant_knobs(run: RunConfig, name: str) -> dict[str, float]:
    """γ and α of a variant. The aux-loss-free variant takes ``balance.gamma`` from the composed config when it is
    positive (default 1e-3, the paper's value): short runs want a larger γ, since the bias moves at most γ per step."""
    knobs = dict(VARIANTS[name])
    if name == "aux_free" and run.balance.gamma > 0:
        knobs["gamma"] = run.balance.gamma
    return knobs


def _variant_run(run: RunConfig, name: str) -> RunConfig:
    v = copy.deepcopy(run)
    knobs = variant_knobs(run, name)
    v.balance = BalanceConfig(gamma=knobs["gamma"], alpha=knobs["alpha"], rule=run.balance.rule,
                              histogram_every=run.balance.histogram_every)
    v.model.seq_aux_loss_alpha = v.balance.alpha
    v.experiment = None
    v.run_dir = str(pathlib.Path(run.run_dir) / name)
    if v.logger.name is None:
        v.logger.name = f"{pathlib.Path(run.run_dir).name}-{name}"
    return v


def _read_metrics(run_dir: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in open(pathlib.Path(run_dir) / "metrics.jsonl")]


def run_ablation(run: RunConfig) -> dict[str, Any]:
    from raymoe.jobs.train import train

    results: dict[str, Any] = {}
    for name in VARIANTS:
        v = _variant_run(run, name)
        print(f"\n=== balance variant {name}: gamma={v.balance.gamma} alpha={v.balance.alpha} -> {v.run_dir}")
        summary = train(v)
        rows = _read_metrics(v.run_dir)
        tail = rows[-max(1, len(rows) // 4):]
        results[name] = {
            "val_loss": summary["val_loss"],
            "maxvio_global": summary["maxvio_global"],
            "maxvio_batch_last_quarter": sum(r["balance/maxvio_batch"] for r in tail) / len(tail),
            "final_train_loss": summary["final_train_loss"],
            "run_dir": v.run_dir,
            "curve": [(r["step"], r["train/loss"], r["balance/maxvio_batch"]) for r in rows],
        }
    out_dir = pathlib.Path(run.run_dir)
    plot = _plot(results, out_dir / "balance_ablation.png")
    table = Table(title=f"balance ablation: {run.model.name}, {run.train.steps} steps, seed {run.train.seed}")
    for col in ("variant", "val loss", "MaxVio_global", "MaxVio_batch (last 25%)", "train loss"):
        table.add_column(col, justify="right")
    for name, r in results.items():
        table.add_row(name, f"{r['val_loss']:.4f}", f"{r['maxvio_global']:.3f}", f"{r['maxvio_batch_last_quarter']:.3f}",
                      f"{r['final_train_loss']:.4f}")
    Console().print(table)
    payload = {k: {kk: vv for kk, vv in r.items() if kk != "curve"} for k, r in results.items()}
    (out_dir / "balance_ablation.json").write_text(json.dumps({"results": payload, "plot": str(plot)}, indent=2))
    print(f"plot: {plot}\nresults: {out_dir / 'balance_ablation.json'}")
    return {"results": payload, "plot": str(plot)}


def _plot(results: dict[str, Any], path: pathlib.Path) -> pathlib.Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        steps = [c[0] for c in r["curve"]]
        ax1.plot(steps, [c[2] for c in r["curve"]], label=name)
        ax2.plot(steps, [c[1] for c in r["curve"]], label=name)
    ax1.set(title="MaxVio_batch (mean over routing layers)", xlabel="step", yscale="log")
    ax2.set(title="training loss", xlabel="step")
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
