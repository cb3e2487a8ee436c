"""Redundant-expert placement at serving time: which logical expert each physical slot holds, per MoE layer.

A :class:`Placement` is the serving form of an EPLB plan (:func:`raymoe.balance.eplb.rebalance_experts`):
``phy2log [L, R]`` (slot → logical expert) and ``logcnt [L, E]`` (replicas per expert) for the ``L`` MoE layers of
the served model (``layer_keys``: ``"layers.i"`` for the main MoE layers in order, then ``"mtp.k"``), with the ``R``
slots grouped into ``num_shards`` shards of ``R / num_shards`` consecutive slots (a shard = one would-be GPU /
expert actor). ``R = E + redundant_slots``.

The initial placement comes from the expert load that training recorded next to the checkpoint
(``expert_load.safetensors``, tensor ``"expert_load"`` ``[num_router_layers, E]``: main MoE layers in order, then
MTP blocks; metadata ``window_steps``, ``step``), planned with ``rebalance_experts``; without that file it is
:func:`raymoe.balance.eplb.trivial_placement` (uniform load assumed). :func:`initial_placement` does the choice.

Balance of a placement under a load (:meth:`Placement.shard_load`, :meth:`Placement.balance`) is max / mean of the
per-shard loads, each slot carrying ``load[l, e] / logcnt[l, e]`` (the dispatcher splits an expert's tokens evenly
over its replicas), exactly :func:`raymoe.balance.eplb.balancedness`.
"""
from __future__ import annotations

import logging
import pathlib
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from raymoe.balance.eplb import balancedness, rebalance_experts, trivial_placement

__all__ = ["EXPERT_LOAD_FILE", "ExpertsConfig", "Placement", "read_expert_load", "write_expert_load",
           "initial_placement", "align_load", "slots_for"]

log = logging.getLogger(__name__)

EXPERT_LOAD_FILE = "expert_load.safetensors"


@dataclass
class ExpertsConfig:
    """Serving-side expert placement (``experts:`` in ``conf/serve.yaml``).

    ``backend``: ``local`` (the model's own experts, no redundancy), ``replicated``
    (:class:`raymoe.engine.experts.ReplicatedExperts` with in-process shards) or ``remote`` (the same backend with
    shards in other processes, :mod:`raymoe.engine.remote`; on Serve the ``ExpertShards`` deployment).
    ``num_shards`` shards of equal slot count hold
    ``E + redundant_slots`` slots (must divide evenly). ``num_groups`` / ``num_nodes`` map onto EPLB's topology
    (``num_groups=None``: the router's ``n_group``; hierarchical placement when ``num_groups % num_nodes == 0``).
    ``load_file``: an explicit expert-load file (default: ``<checkpoint>/expert_load.safetensors`` if present).
    ``replan_every_tokens``: re-plan from the live recorder every so many tokens (0 = never); ``window_tokens``:
    how many recent tokens the recorder keeps. ``min_shards`` / ``max_shards`` bound the redundancy policy.
    """

    backend: str = "local"
    num_shards: int = 4
    redundant_slots: int = 4
    num_groups: Optional[int] = None
    num_nodes: int = 1
    load_file: Optional[str] = None
    replan_every_tokens: int = 0
    window_tokens: int = 4096
    min_shards: Optional[int] = None
    max_shards: Optional[int] = None
    policy: dict[str, Any] = field(default_factory=dict)
    metrics_dir: Optional[str] = None
    metrics_every_steps: int = 10

    def __post_init__(self) -> None:
        if self.backend not in ("local", "replicated", "remote"):
            raise ValueError(f"experts.backend={self.backend!r}; allowed: local, replicated, remote")
        if self.num_shards < 1 or self.redundant_slots < 0 or self.num_nodes < 1:
            raise ValueError("experts.num_shards >= 1, experts.redundant_slots >= 0, experts.num_nodes >= 1")

    @classmethod
    def from_dict(cls, d: Optional[dict[str, Any]]) -> "ExpertsConfig":
        from raymoe.engine.redundancy import options_from_dict

        return options_from_dict(cls, d, "experts")


@dataclass
class Placement:
    """``phy2log [L, R]`` / ``logcnt [L, E]`` (int64, CPU) over ``num_shards`` shards; ``source`` says where it
    came from (``trivial``, ``load-file``, ``replan``...)."""

    layer_keys: list[str]
    phy2log: torch.Tensor
    logcnt: torch.Tensor
    num_shards: int
    source: str = "trivial"

    def __post_init__(self) -> None:
        L, R = self.phy2log.shape
        if len(self.layer_keys) != L or self.logcnt.shape[0] != L:
            raise ValueError(f"{len(self.layer_keys)} layer keys for phy2log {tuple(self.phy2log.shape)}")
        if R % self.num_shards:
            raise ValueError(f"{R} slots do not split evenly over {self.num_shards} shards")

    @property
    def num_slots(self) -> int:
        return self.phy2log.shape[1]

    @property
    def num_experts(self) -> int:
        return self.logcnt.shape[1]

    @property
    def slots_per_shard(self) -> int:
        return self.num_slots // self.num_shards

    @property
    def redundant_slots(self) -> int:
        return self.num_slots - self.num_experts

    def index(self, layer_key: str) -> int:
        return self.layer_keys.index(layer_key)

    def replica_slots(self, li: int) -> list[list[int]]:
        """Per logical expert of layer ``li``: its slots, ascending."""
        out: list[list[int]] = [[] for _ in range(self.num_experts)]
        for p, e in enumerate(self.phy2log[li].tolist()):
            out[e].append(p)
        return out

    # ------------------------------------------------------------------ construction
    @classmethod
    def trivial(cls, layer_keys: Sequence[str], num_experts: int, num_slots: int, num_shards: int) -> "Placement":
        w = torch.ones(len(layer_keys), num_experts)
        phy2log, _, logcnt = trivial_placement(w, num_slots, num_shards)
        return cls(list(layer_keys), phy2log.cpu(), logcnt.cpu(), num_shards, "trivial")

    @classmethod
    def from_load(cls, layer_keys: Sequence[str], load_LE: torch.Tensor, num_slots: int, num_shards: int,
                  num_groups: int = 1, num_nodes: int = 1, source: str = "load") -> "Placement":
        """EPLB plan (:func:`rebalance_experts`, refined) of ``load_LE [L, E]``. An expert group count that does
        not divide E, or a node count that does not divide the shards, falls back to one group / one node."""
        w = load_LE.detach().to(torch.float64).cpu()
        E = w.shape[1]
        if num_groups < 1 or E % num_groups:
            num_groups = 1
        if num_nodes < 1 or num_shards % num_nodes:
            num_nodes = 1
        phy2log, _, logcnt = rebalance_experts(w, num_slots, num_groups, num_nodes, num_shards)
        return cls(list(layer_keys), phy2log.cpu(), logcnt.cpu(), num_shards, source)

    # ------------------------------------------------------------------ quality
    def slot_load(self, load_LE: torch.Tensor) -> torch.Tensor:
        """``[L, R]`` float64: the expected load of each slot (its expert's load / the expert's replica count)."""
        w = load_LE.detach().to(torch.float64).cpu()
        return w.gather(1, self.phy2log) / self.logcnt.gather(1, self.phy2log).to(torch.float64)

    def shard_load(self, load_LE: torch.Tensor) -> torch.Tensor:
        """``[L, num_shards]`` float64 expected rows per shard."""
        return self.slot_load(load_LE).view(len(self.layer_keys), self.num_shards, -1).sum(-1)

    def balance(self, load_LE: torch.Tensor) -> torch.Tensor:
        """``[L]`` max / mean of per-shard loads (1.0 = perfect), as :func:`raymoe.balance.eplb.balancedness`."""
        return balancedness(load_LE.detach().to(torch.float64).cpu(), self.phy2log, self.logcnt, self.num_shards)

    def to_dict(self) -> dict[str, Any]:
        return {"layer_keys": list(self.layer_keys), "phy2log": self.phy2log.tolist(),
                "logcnt": self.logcnt.tolist(), "num_shards": self.num_shards, "source": self.source}


# ---------------------------------------------------------------------------------------------------------------
# The load file written by training
# ---------------------------------------------------------------------------------------------------------------

def write_expert_load(path: str | pathlib.Path, load_LE: torch.Tensor, window_steps: int = 0, step: int = 0
                      ) -> pathlib.Path:
    """Write ``expert_load.safetensors`` (``path`` is the file or its directory) in training's format."""
    from safetensors.torch import save_file

    p = pathlib.Path(path)
    if p.is_dir() or p.suffix != ".safetensors":
        p = p / EXPERT_LOAD_FILE
    p.parent.mkdir(parents=True, exist_ok=True)
    save_file({"expert_load": load_LE.detach().to(torch.float32).contiguous().cpu()}, str(p),
              metadata={"window_steps": str(int(window_steps)), "step": str(int(step))})
    return p


def read_expert_load(path: str | pathlib.Path) -> tuple[torch.Tensor, dict[str, str]]:
    """``(expert_load [rows, E] float32, metadata)`` of a load file (or of ``<dir>/expert_load.safetensors``)."""
    from safetensors import safe_open

    p = pathlib.Path(path)
    if p.is_dir():
        p = p / EXPERT_LOAD_FILE
    with safe_open(str(p), framework="pt") as f:
        if "expert_load" not in f.keys():
            raise ValueError(f"{p}: no tensor named 'expert_load' (found {sorted(f.keys())})")
        t = f.get_tensor("expert_load").to(torch.float32)
        meta = dict(f.metadata() or {})
    if t.dim() != 2:
        raise ValueError(f"{p}: expert_load must be [layers, experts], got {tuple(t.shape)}")
    return t, meta


def align_load(load: torch.Tensor, layer_keys: Sequence[str], num_experts: int) -> torch.Tensor:
    """Fit the file's rows (main MoE layers, then MTP blocks) to the served layers (``layers.*`` then ``mtp.*``):
    the first rows are the main layers; an MTP layer without a row (the file was written without MTP) gets a
    uniform row of the mean load. Fewer rows than main MoE layers or another expert count: ``ValueError``."""
    if load.shape[1] != num_experts:
        raise ValueError(f"expert_load has {load.shape[1]} experts per row; the model has {num_experts}")
    n_main = sum(1 for k in layer_keys if k.startswith("layers."))
    n_mtp = len(layer_keys) - n_main
    if load.shape[0] < n_main:
        raise ValueError(f"expert_load has {load.shape[0]} rows; the model has {n_main} main MoE layers")
    uniform = torch.full((1, num_experts), float(load[:n_main].mean()) if n_main else 1.0)
    mtp = load[n_main:n_main + n_mtp]
    rows = [load[:n_main], mtp] + [uniform] * (n_mtp - mtp.shape[0])
    return torch.cat(rows).to(torch.float32)


def slots_for(num_experts: int, cfg: ExpertsConfig, num_shards: Optional[int] = None) -> int:
    """Physical slots per layer: a shard holds ``S = ceil((E + redundant_slots) / cfg.num_shards)`` slots (its
    capacity, fixed), so ``num_shards`` shards hold ``num_shards · S`` (at least ``E``: too few shards raise)."""
    per = -(-(num_experts + cfg.redundant_slots) // cfg.num_shards)
    n = (num_shards or cfg.num_shards) * per
    if n < num_experts:
        raise ValueError(f"{num_shards} shards of {per} slots cannot hold {num_experts} experts")
    return n


def initial_placement(layer_keys: Sequence[str], num_experts: int, cfg: ExpertsConfig,
                      model_dir: Optional[str | pathlib.Path] = None, n_group: int = 1,
                      num_shards: Optional[int] = None) -> tuple[Placement, Optional[torch.Tensor]]:
    """The serving start placement: ``cfg.load_file`` or ``<model_dir>/expert_load.safetensors`` planned with EPLB,
    else trivial. Returns ``(placement, aligned load or None)``."""
    shards = num_shards or cfg.num_shards
    num_slots = slots_for(num_experts, cfg, shards)
    src = pathlib.Path(cfg.load_file) if cfg.load_file else (
        pathlib.Path(model_dir) / EXPERT_LOAD_FILE if model_dir is not None else None)
    if src is not None and src.exists():
        try:
            load, meta = read_expert_load(src)
            load = align_load(load, layer_keys, num_experts)
            groups = cfg.num_groups if cfg.num_groups is not None else n_group
            pl = Placement.from_load(layer_keys, load, num_slots, shards, groups, cfg.num_nodes,
                                     source=f"load-file(step={meta.get('step', '?')})")
            return pl, load
        except Exception as e:  # noqa: BLE001 - a bad file must not stop serving: warn and use the trivial layout
            if cfg.load_file:
                raise
            log.warning("ignoring %s: %s; using the trivial expert placement", src, e)
    return Placement.trivial(layer_keys, num_experts, num_slots, shards), None
