"""Expert-parallel routed experts: :class:`ExpertParallelExperts`, :class:`ExpertShard` and :func:`shard_experts`.

See :mod:`raymoe.experts` for the layout, the exchange protocol and the shapes.
"""
from __future__ import annotations

import re
from typing import Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn

from raymoe.experts.dispatch import all_to_all_uneven, exchange_counts, permute_rows, source_to_expert_major
from raymoe.model.layers import autocast_apply
from raymoe.model.moe import RoutedExperts, _Combine, _Dispatch  # the exact dispatch/combine ops of RoutedExperts
from raymoe.model.transformer import DecoderLayer

__all__ = [
    "ExpertParallelExperts",
    "ExpertShard",
    "shard_experts",
    "expert_range",
    "moe_layers",
    "expert_param_prefix",
    "set_lane_groups",
]

_PROJS = ("gate_proj", "up_proj", "down_proj")
_KEY_RE = re.compile(r"^(?:layers\.(\d+)|mtp\.(\d+)\.block)\.mlp\.experts\.(gate_proj|up_proj|down_proj)$")


def expert_range(num_experts: int, ep_rank: int, ep_size: int) -> range:
    """Global expert ids held by ``ep_rank``: ``[r·E/ep, (r+1)·E/ep)`` (contiguous ownership)."""
    if ep_size < 1 or not 0 <= ep_rank < ep_size:
        raise ValueError(f"need 0 <= ep_rank < ep_size, got ep_rank={ep_rank} ep_size={ep_size}")
    if num_experts % ep_size:
        raise ValueError(f"n_routed_experts={num_experts} must be divisible by ep={ep_size}")
    n = num_experts // ep_size
    return range(ep_rank * n, (ep_rank + 1) * n)


def moe_layers(model: nn.Module) -> dict[int, nn.Module]:
    """``{layer_idx: MoE}`` of every MoE decoder block in ``model`` (main layers ``0..N-1``, then MTP blocks, whose
    ``layer_idx`` is ``N + k``). Works for a whole :class:`~raymoe.model.DeepSeekV3` or a stage chunk."""
    out: dict[int, nn.Module] = {}
    for m in model.modules():
        if isinstance(m, DecoderLayer) and m.is_moe:
            out[m.layer_idx] = m.mlp
    return dict(sorted(out.items()))


def expert_param_prefix(layer_idx: int, num_hidden_layers: int) -> str:
    """Name of a layer's routed experts in the :class:`~raymoe.model.DeepSeekV3` state dict:
    ``layers.{i}.mlp.experts`` for a main layer, ``mtp.{k}.block.mlp.experts`` for MTP depth ``k+1``."""
    if layer_idx < num_hidden_layers:
        return f"layers.{layer_idx}.mlp.experts"
    return f"mtp.{layer_idx - num_hidden_layers}.block.mlp.experts"


class ExpertParallelExperts(RoutedExperts):
    """A layer's routed experts under EP: holds the local experts, exchanges token rows with the other ep ranks.

    A :class:`~raymoe.model.moe.RoutedExperts` subclass with the **same parameter names** ``gate_proj``/``up_proj``
    ``[E_local, D, I]`` and ``down_proj [E_local, I, D]``: a sharded model's state-dict keys equal the full model's,
    and rank r's tensors are rows ``[r·E_local, (r+1)·E_local)`` of the full ones (:attr:`expert_slice`). Being a
    ``RoutedExperts`` also keeps :func:`~raymoe.model.moe.set_expert_impl`, :func:`raymoe.fp8.convert_to_fp8`
    (``enable_fp8``), ``reset_parameters`` and ``forward_grouped`` (the local grouped GEMMs, for an expert-shard
    actor) working unchanged. ``expert_ids`` are the global ids held; ``num_experts`` is the local count,
    ``num_global_experts`` the layer's.

    Args:
        experts: the full layer (``num_experts == experts.num_experts``; the local rows are copied, so the full
            weights can be freed) or the local slice (``expert_ids`` = this rank's range; its Parameter objects are
            adopted, not copied, so e.g. an :class:`ExpertShard` and this module share them).
        ep_rank, ep_size: this rank's index in the ep group and the group size.
        group: the ep process group (``None``: the default group).
        num_experts: the layer's global expert count; default ``experts.num_experts`` (i.e. a full layer).

    ``forward(x_TD [T, D], topk_idx [T, k] global ids, topk_weight [T, k]) → [T, D]``, exactly as
    ``RoutedExperts.forward`` on the full layer (every rank of the group must call it, and run its backward).
    """

    def __init__(
        self,
        experts: RoutedExperts,
        ep_rank: int,
        ep_size: int,
        group: Optional[dist.ProcessGroup] = None,
        num_experts: Optional[int] = None,
    ) -> None:
        E = experts.num_experts if num_experts is None else int(num_experts)
        ids = expert_range(E, ep_rank, ep_size)
        D, I = experts.gate_proj.shape[1], experts.gate_proj.shape[2]
        with torch.device("meta"):  # placeholders only: replaced below by the adopted / copied Parameters
            super().__init__(len(ids), D, I, list(ids))
        if experts.num_experts == len(ids):  # already the local slice (or ep=1): share its Parameters
            if list(experts.expert_ids) != list(ids):
                raise ValueError(f"local experts hold ids {experts.expert_ids}, ep rank {ep_rank} owns {list(ids)}")
            for name in _PROJS:
                setattr(self, name, getattr(experts, name))
        elif experts.num_experts == E:  # the full layer: copy this rank's rows
            for name in _PROJS:
                src = getattr(experts, name)
                setattr(self, name, nn.Parameter(src.detach()[ids.start:ids.stop].clone(),
                                                 requires_grad=src.requires_grad))
        else:
            raise ValueError(f"experts hold {experts.num_experts} experts: neither the layer's {E} "
                             f"nor the {len(ids)} of one of {ep_size} ep ranks")
        self.ep_rank, self.ep_size, self.group = ep_rank, ep_size, group
        self.lane_groups: Optional[tuple] = None  # per-lane ep groups (raymoe.experts.overlap), lane 0 = group
        self.num_global_experts = E
        self.impl = experts.impl
        if experts.fp8 is not None:
            self.enable_fp8(experts.fp8.fp8_config, experts.fp8.fp8_name, experts.fp8.wgrad_store)
        if ep_size > 1 and dist.is_available() and dist.is_initialized():
            if dist.get_world_size(group) != ep_size or dist.get_rank(group) != ep_rank:
                raise ValueError(f"group has size {dist.get_world_size(group)} / rank {dist.get_rank(group)}, "
                                 f"expected ep_size={ep_size} / ep_rank={ep_rank}")

    @property
    def expert_slice(self) -> slice:
        """Rows of the full layer's stacked weights held here."""
        return slice(self.expert_ids[0], self.expert_ids[-1] + 1)

    def extra_repr(self) -> str:
        sl = self.expert_slice
        return f"ep_rank={self.ep_rank}, ep_size={self.ep_size}, experts=[{sl.start}, {sl.stop})"

    def _local_grouped(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """``forward_grouped`` that also accepts zero rows (some grouped GEMM back-ends reject empty inputs): one zero
        row is given to expert 0 and dropped again, so weights still get (zero) gradients and the graph from the
        received rows to the returned ones stays connected — the backward all-to-all must run on every rank."""
        if x_ND.shape[0]:
            return self.forward_grouped(x_ND, counts_E)
        counts = counts_E.clone()
        counts[0] += 1
        return self.forward_grouped(torch.cat([x_ND, x_ND.new_zeros(1, x_ND.shape[1])]), counts)[:0]

    def forward(self, x_TD: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        """``x_TD [T, D]``, ``topk_idx [T, k]`` global expert ids, ``topk_weight [T, k]`` gates → ``[T, D]``."""
        if self.ep_size == 1:
            return super().forward(x_TD, topk_idx, topk_weight)
        T, K = topk_idx.shape
        ep, E_local = self.ep_size, self.num_experts
        flat = topk_idx.reshape(-1)
        order = flat.argsort(stable=True)  # (token, slot) pairs grouped by global expert → by destination rank
        inv_order = torch.empty_like(order)
        inv_order[order] = torch.arange(order.numel(), device=order.device)
        send_counts = torch.bincount(flat, minlength=self.num_global_experts)  # [ep·E_local]
        group = self.lane_groups if self.lane_groups is not None else self.group  # overlap.lane_group picks
        recv_counts = exchange_counts(send_counts, group).view(ep, E_local)  # [source, local expert]
        splits = torch.cat([send_counts.view(ep, E_local).sum(1), recv_counts.sum(1)]).tolist()  # one host sync
        send_splits, recv_splits = splits[:ep], splits[ep:]
        if T:
            x_send = _Dispatch.apply(x_TD, order // K, inv_order, K)  # [T·k, D] sorted by global expert
        else:  # (the fused dispatch/combine cannot view zero tokens as [0, k, D])
            x_send = x_TD[:0]
        x_recv = all_to_all_uneven(x_send, send_splits, recv_splits, group)  # source-major
        to_expert, to_source = source_to_expert_major(recv_counts)
        x_em = permute_rows(x_recv, to_expert, to_source)  # expert-major
        y_em = self._local_grouped(x_em, recv_counts.sum(0))
        y_recv = permute_rows(y_em, to_source, to_expert)
        y_send = all_to_all_uneven(y_recv, recv_splits, send_splits, group)
        if not T:  # keep [0, D] connected to the exchange (its backward is a collective) and to the gates
            return y_send + topk_weight.sum(-1, keepdim=True).to(y_send.dtype) * 0
        return autocast_apply(_Combine, y_send, topk_weight, order, inv_order)


class ExpertShard(nn.Module):
    """The local routed experts of one ep rank for a set of layers: ``{layer_idx: RoutedExperts}``.

    The unit that both training and serving hold: in training (after :func:`shard_experts`)
    :meth:`from_model` collects the model's :class:`ExpertParallelExperts` themselves (same objects, same
    Parameters); a serving actor that hosts experts in its own process builds it :meth:`from_state_dict` and runs
    ``shard(layer_idx, x_ND, counts_E)`` on rows it received already grouped by its local experts.

    Attributes: ``ep_rank``, ``ep_size``, ``num_experts`` (global, per layer), ``expert_ids`` (global ids held, the
    same for every layer), ``layer_ids``; ``experts`` is an ``nn.ModuleDict`` keyed by ``str(layer_idx)``, so the
    shard's own state-dict keys are ``experts.{layer_idx}.{gate,up,down}_proj``; :meth:`model_state_dict` gives the
    full model's names instead.
    """

    def __init__(
        self,
        experts: Mapping[int, RoutedExperts],
        ep_rank: int,
        ep_size: int,
        num_experts: int,
        num_hidden_layers: Optional[int] = None,
    ) -> None:
        super().__init__()
        ids = list(expert_range(num_experts, ep_rank, ep_size))
        for i, ex in experts.items():
            if list(ex.expert_ids) != ids:
                raise ValueError(f"layer {i}: experts hold ids {ex.expert_ids}, ep rank {ep_rank} owns {ids}")
        self.experts = nn.ModuleDict({str(i): experts[i] for i in sorted(experts)})
        self.ep_rank, self.ep_size, self.num_experts = ep_rank, ep_size, num_experts
        self.expert_ids = ids
        self.num_hidden_layers = num_hidden_layers

    @property
    def layer_ids(self) -> list[int]:
        return [int(k) for k in self.experts]

    def layer(self, layer_idx: int) -> RoutedExperts:
        return self.experts[str(layer_idx)]  # type: ignore[return-value]

    def forward(self, layer_idx: int, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Rows ``x_ND [N, D]`` grouped by local expert (``counts_E [E_local]`` rows each) → outputs ``[N, D]``."""
        return self.layer(layer_idx).forward_grouped(x_ND, counts_E)

    @classmethod
    def from_model(cls, model: nn.Module, ep_rank: int, ep_size: int) -> "ExpertShard":
        """From a model (or stage chunk): a sharded model's own :class:`ExpertParallelExperts` (shared), or copies of
        this rank's rows of a full model's experts."""
        experts: dict[int, RoutedExperts] = {}
        num_experts = None
        for i, moe in moe_layers(model).items():
            ex = moe.experts
            E = moe.router.weight.shape[0]
            num_experts = E
            if isinstance(ex, ExpertParallelExperts):
                if (ex.ep_rank, ex.ep_size) != (ep_rank, ep_size):
                    raise ValueError(f"layer {i} is sharded for ep rank {ex.ep_rank}/{ex.ep_size}, "
                                     f"not {ep_rank}/{ep_size}")
                experts[i] = ex
            else:
                experts[i] = ex.shard(list(expert_range(E, ep_rank, ep_size)))
        if num_experts is None:
            raise ValueError("model has no MoE layers")
        cfg = getattr(model, "config", None)
        return cls(experts, ep_rank, ep_size, num_experts, getattr(cfg, "num_hidden_layers", None))

    @classmethod
    @torch.no_grad()
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], cfg, ep_rank: int, ep_size: int,
                        prefix: str = "") -> "ExpertShard":
        """From a :class:`~raymoe.model.DeepSeekV3` state dict (keys ``[prefix]layers.{i}.mlp.experts.gate_proj`` …,
        ``mtp.{k}.block.mlp.experts.…``; ``cfg`` its ModelConfig). Each tensor is either the full layer ``[E, ...]``
        (this rank's rows are copied) or already this rank's ``[E/ep, ...]`` rows (an EP-sharded checkpoint)."""
        E = cfg.n_routed_experts
        ids = expert_range(E, ep_rank, ep_size)
        found: dict[int, dict[str, torch.Tensor]] = {}
        for key, t in state_dict.items():
            if not key.startswith(prefix):
                continue
            m = _KEY_RE.match(key[len(prefix):])
            if m is None:
                continue
            layer = int(m.group(1)) if m.group(1) is not None else cfg.num_hidden_layers + int(m.group(2))
            if t.shape[0] == E:
                t = t[ids.start:ids.stop]
            elif t.shape[0] != len(ids):
                raise ValueError(f"{key}: {t.shape[0]} experts, expected {E} (full) or {len(ids)} (ep shard)")
            found.setdefault(layer, {})[m.group(3)] = t
        experts: dict[int, RoutedExperts] = {}
        for layer, ts in found.items():
            missing = [p for p in _PROJS if p not in ts]
            if missing:
                raise ValueError(f"layer {layer}: missing expert weights {missing}")
            g = ts["gate_proj"]
            ex = RoutedExperts(len(ids), g.shape[1], g.shape[2], list(ids)).to(device=g.device, dtype=g.dtype)
            for p in _PROJS:
                getattr(ex, p).copy_(ts[p])
            experts[layer] = ex
        if not experts:
            raise ValueError(f"no routed-expert weights under prefix {prefix!r}")
        return cls(experts, ep_rank, ep_size, E, cfg.num_hidden_layers)

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """``{full-model name: local rows}``, e.g. ``layers.1.mlp.experts.gate_proj → [E/ep, D, I]``: the full
        tensor's rows ``expert_ids`` (``[r·E/ep, (r+1)·E/ep)``)."""
        if self.num_hidden_layers is None:
            raise ValueError("num_hidden_layers unknown: build the shard from a model with .config or a state dict")
        return {f"{expert_param_prefix(i, self.num_hidden_layers)}.{p}": getattr(self.layer(i), p).detach()
                for i in self.layer_ids for p in _PROJS}


def set_lane_groups(model: nn.Module, groups: Optional[tuple]) -> int:
    """Give every :class:`ExpertParallelExperts` of ``model`` its per-lane ep groups (``groups[0]`` must be the
    layer's own group; ``None`` clears them); returns how many layers were set. With lane groups each exchange runs
    on the group of the lane that issues it (:mod:`raymoe.experts.overlap`)."""
    n = 0
    for m in model.modules():
        if isinstance(m, ExpertParallelExperts):
            if groups is not None and groups[0] is not m.group:
                raise ValueError("lane_groups[0] must be the layer's own ep group")
            m.lane_groups = None if groups is None else tuple(groups)
            n += 1
    return n


def shard_experts(
    model: nn.Module,
    ep_rank: int,
    ep_size: int,
    group: Optional[dist.ProcessGroup] = None,
    shard: Optional[ExpertShard] = None,
) -> nn.Module:
    """Replace, in place, the ``experts`` of every MoE layer of ``model`` (main layers and MTP blocks) by an
    :class:`ExpertParallelExperts` holding only ep rank ``ep_rank``'s experts; returns ``model``.

    Without ``shard`` the local rows are copied from the full experts, which are then dropped (parameters resident
    per rank ≈ routed experts / ep + everything else). With ``shard`` (an :class:`ExpertShard` for this rank) its
    Parameters are adopted as they are. Call it before building the optimizer (it must see the new Parameters) and
    after loading full weights (a sharded model's expert tensors have ``E/ep`` rows; to load a checkpoint into
    it, build the shard with :meth:`ExpertShard.from_state_dict` and pass it here, or load the non-expert keys).
    """
    for i, moe in moe_layers(model).items():
        if isinstance(moe.experts, ExpertParallelExperts):
            raise ValueError(f"layer {i} is already expert-parallel")
        E = moe.router.weight.shape[0]
        if shard is not None:
            if (shard.ep_rank, shard.ep_size) != (ep_rank, ep_size):
                raise ValueError(f"shard is for ep rank {shard.ep_rank}/{shard.ep_size}, not {ep_rank}/{ep_size}")
            src = shard.layer(i)
        else:
            src = moe.experts
        moe.experts = ExpertParallelExperts(src, ep_rank, ep_size, group, num_experts=E)
    return model
