"""`python -m raymoe.jobs.plan model=deepseek-v3 layout=v3-train cluster=h800-2048`: does a layout fit?

Prints, per rank, what the layout puts on each device — for training (:mod:`raymoe.plan.train`): parameters,
weights, gradients, optimizer state with ZeRO-1 over DP and unsharded, activations of the schedule's in-flight
micro-batches under the recompute setting, the recompute / loss workspace; for serving (:mod:`raymoe.plan.serve`):
the replica's weights per GPU (attention side and expert slots), the KV cache of one sequence and how many fit —
and says whether it fits the GPU memory and by how much. Nothing is allocated: the model is built on the meta device.

Groups: ``model`` (conf/model: the presets), ``layout`` (conf/layout: ``kind: train`` with a ``train:`` block or
``kind: serve`` with a ``serve:`` block), ``cluster`` (conf/cluster). Any key can be overridden
(``layout.train.recompute=full``, ``cluster.gpu_memory_GiB=141``). Exit status 2 for an invalid configuration, 1
when the layout does not fit (so scripts can test it), 0 when it fits.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Optional, Union

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from raymoe.config import ConfigError, ModelConfig
from raymoe.jobs.configs import InvalidConfig, hydra_app, to_object
from raymoe.plan.serve import ServeLayout, ServePlan, plan_serving
from raymoe.plan.train import GiB, Cluster, TrainLayout, TrainPlan, plan_training

__all__ = ["LayoutConfig", "PlanJobConfig", "run", "train_table", "serve_table", "main"]


@dataclass
class LayoutConfig:
    """Schema of ``conf/layout/*.yaml``: ``kind`` picks which block is used."""

    name: str = "custom"
    kind: str = "train"  # train | serve
    train: TrainLayout = field(default_factory=TrainLayout)
    serve: ServeLayout = field(default_factory=ServeLayout)

    def __post_init__(self) -> None:
        if self.kind not in ("train", "serve"):
            raise ConfigError(f"layout.kind={self.kind!r}; allowed: train, serve")


@dataclass
class PlanJobConfig:
    """Schema of ``conf/plan.yaml``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    cluster: Cluster = field(default_factory=Cluster)


ConfigStore.instance().store(name="plan_schema", node=PlanJobConfig)


def _g(x: float) -> str:
    return f"{x / GiB:.2f}"


def train_table(plan: TrainPlan) -> Table:
    L, c = plan.layout, plan.cluster
    t = Table(title=f"{plan.model.name} training: pp={L.pp} × ep={L.ep} × dp={L.dp} = {L.pp * L.ep * L.dp} ranks "
                    f"({c.num_nodes} nodes × {c.gpus_per_node}), {L.schedule}, {L.num_microbatches} micro-batches of "
                    f"{L.micro_batch_size}×{L.seq_len} tokens, recompute={L.recompute}, precision={L.precision}; "
                    f"GiB per device (each row: the ep×dp={L.ep * L.dp} devices of one pipeline rank)")
    for col in ("pp rank", "stages", "blocks", "params (B)", "weights", "grads", "optim ZeRO-1" if L.zero1 else
                "optim", "optim unsharded", "in flight", "activations", "workspace", "total", "free"):
        t.add_column(col, justify="right")
    for r in plan.ranks:
        t.add_row(str(r.pp_rank), "+".join(map(str, r.stages)), str(r.blocks), f"{r.params / 1e9:.3f}",
                  _g(r.weights), _g(r.grads), _g(r.optimizer), _g(r.optimizer_unsharded), f"{r.in_flight:g}",
                  _g(r.activations), _g(r.workspace), _g(r.total), _g(plan.budget - r.total))
    return t


def serve_table(plan: ServePlan) -> Table:
    L, c = plan.layout, plan.cluster
    t = Table(title=f"{plan.model.name} serving ({L.phase}): one unit = {plan.gpus // c.gpus_per_node} nodes × "
                    f"{c.gpus_per_node} = {plan.gpus} GPUs, EP{plan.gpus}, attention TP{L.attention_tp} × "
                    f"DP{plan.gpus // L.attention_tp}, {L.redundant_experts} redundant experts, weights {L.weight_dtype}"
                    f", MTP {'loaded' if L.mtp else 'not loaded'}; GiB per GPU")
    for col in ("experts/GPU/layer", "attention side", "expert slots", "weights", f"KV/seq @{L.context_len}",
                "seqs/GPU", "seqs/unit", "unit weights (GB)"):
        t.add_column(col, justify="right")
    t.add_row(str(plan.experts_per_gpu), _g(plan.attention_weights), _g(plan.expert_weights), _g(plan.weights),
              f"{plan.kv_per_sequence / GiB:.3f}", str(plan.sequences_per_gpu), str(plan.sequences_per_replica),
              f"{plan.replica_weights / 1e9:.1f}")
    return t


def run(cfg: PlanJobConfig, console: Optional[Console] = None) -> Union[TrainPlan, ServePlan]:
    """Plan ``cfg.layout`` for ``cfg.model`` on ``cfg.cluster``; print the table and the verdict; return the plan."""
    console = console or Console(width=200)
    c = cfg.cluster
    budget = f"{c.gpu_memory_GiB:g} GiB GPU − {c.reserve_GiB:g} GiB reserve = {c.gpu_memory_GiB - c.reserve_GiB:g} GiB"
    if cfg.layout.kind == "train":
        plan = plan_training(cfg.model, cfg.layout.train, c)
        console.print(train_table(plan))
        w = plan.worst
        verdict = (f"FITS: the fullest device (pp rank {w.pp_rank}) needs {_g(w.total)} of {budget}; "
                   f"{_g(plan.margin)} GiB to spare" if plan.fits else
                   f"DOES NOT FIT: the fullest device (pp rank {w.pp_rank}) needs {_g(w.total)} of {budget}; "
                   f"{_g(-plan.margin)} GiB over")
        un = plan.margin_unsharded
        console.print(verdict)
        console.print(f"with the optimizer state unsharded: {'fits, ' + _g(un) + ' GiB to spare' if un >= 0 else _g(-un) + ' GiB over'}"
                      f"; one ep group spans {plan.ep_nodes} node(s) under the runtime's rank numbering")
    else:
        plan = plan_serving(cfg.model, cfg.layout.serve, c)
        console.print(serve_table(plan))
        if plan.fits:
            console.print(f"FITS: weights {_g(plan.weights)} of {budget} per GPU; {_g(plan.kv_room)} GiB left for the "
                          f"KV cache = {plan.sequences_per_gpu} sequences of {cfg.layout.serve.context_len} tokens per "
                          f"GPU ({plan.sequences_per_replica} per unit); {_g(plan.margin)} GiB to spare with one")
        else:
            console.print(f"DOES NOT FIT: weights {_g(plan.weights)} + one sequence's cache "
                          f"{plan.kv_per_sequence / GiB:.3f} of {budget} per GPU; {_g(-plan.margin)} GiB over")
    return plan


@hydra_app("plan")  # an invalid override -> one line on stderr, exit 2
def main(dcfg: DictConfig) -> None:
    cfg = to_object(dcfg, PlanJobConfig)
    try:
        plan = run(cfg)
    except ConfigError as e:
        raise InvalidConfig(str(e)) from None
    if not plan.fits:
        sys.exit(1)


if __name__ == "__main__":
    main()
