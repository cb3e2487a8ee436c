"""Metrics sink of the coordinator: a local JSONL file (always) and wandb (offline by default, or none).

The metric namespace is fixed and read by ``dashboards/``: ``train/loss`` (the objective: main + λ·MTP + aux),
``train/main_loss`` and ``train/mtp_loss`` (main-model and unweighted MTP cross-entropy, mean over MTP depths: the
quantities ``val/loss`` and ``val/mtp_loss`` measure on held-out data), ``train/lr``,
``perf/tokens_per_s``, ``perf/mfu``, ``balance/maxvio_batch``, ``balance/bias_std``, per-layer
``balance/maxvio_batch/layer_i``, ``val/loss``, ``balance/maxvio_global``; list-valued entries ``balance/counts``
(``[L, E]`` tokens per expert) and ``balance/bias`` go to the JSONL file as-is and to wandb as per-layer histograms
(``balance/load/layer_i``). wandb files (and its cache/data dirs, so nothing lands in $HOME) live under
``<run_dir>/wandb``; ``logger.kind=none`` or ``logger.mode=disabled`` keeps only the JSONL file.
"""
from __future__ import annotations

import json
import os
import pathlib
import uuid
from typing import Any, Optional

from raymoe.config import LoggerConfig

__all__ = ["MetricsLogger"]


class MetricsLogger:
    def __init__(self, run_dir: str | pathlib.Path, cfg: LoggerConfig, config: dict[str, Any]) -> None:
        self.run_dir = pathlib.Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.run_dir / "metrics.jsonl"
        self._f = open(self.jsonl_path, "a")
        self.wandb_run = None
        self.wandb_dir: Optional[str] = None
        if cfg.kind == "wandb" and cfg.mode != "disabled":
            self._init_wandb(cfg, config)

    def _init_wandb(self, cfg: LoggerConfig, config: dict[str, Any]) -> None:
        import wandb

        wdir = self.run_dir / "wandb"
        for sub in ("", "cache", "data"):
            (wdir / sub).mkdir(parents=True, exist_ok=True)
        os.environ.update(WANDB_DIR=str(wdir), WANDB_CACHE_DIR=str(wdir / "cache"), WANDB_DATA_DIR=str(wdir / "data"),
                          WANDB_SILENT="true")
        id_file = self.run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        self.wandb_run = wandb.init(project=cfg.project, name=cfg.name or self.run_dir.name, id=run_id, resume="allow",
                                    dir=str(wdir), mode=cfg.mode, config=config, tags=list(cfg.tags))
        self.wandb_dir = str(wdir)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._f.write(json.dumps({"step": step, **metrics}) + "\n")
        self._f.flush()
        if self.wandb_run is None:
            return
        import wandb

        out: dict[str, Any] = {}
        for k, v in metrics.items():
            if k == "balance/counts":
                for layer, row in enumerate(v):
                    out[f"balance/load/layer_{layer}"] = wandb.Histogram(
                        np_histogram=_expert_histogram(row))
            elif k == "balance/bias":
                for layer, row in enumerate(v):
                    out[f"balance/bias_hist/layer_{layer}"] = wandb.Histogram(row)
            elif isinstance(v, (int, float)):
                out[k] = v
        self.wandb_run.log(out, step=step)

    def summary(self, summary: dict[str, Any]) -> None:
        if self.wandb_run is not None:
            for k, v in summary.items():
                if isinstance(v, (int, float, str)) or v is None:
                    self.wandb_run.summary[k] = v

    def finish(self) -> None:
        self._f.close()
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.finish()
            self.wandb_run = None
            wandb.teardown()  # close the wandb-core service now, not in an atexit hook of a killed actor


def _expert_histogram(counts: list[int]) -> tuple[list[float], list[float]]:
    """Bar-per-expert histogram: bin i spans [i, i+1) with height = tokens routed to expert i."""
    return [float(c) for c in counts], [float(i) for i in range(len(counts) + 1)]
