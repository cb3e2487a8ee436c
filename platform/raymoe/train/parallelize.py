"""Parallelize a single-device model for one rank, in the torchtitan manner: build, then apply each dimension.

Order (each step a separate, individually tested function)::

    model  = build_model(model_cfg, seed, device="meta")  # the full DeepSeekV3's shapes, no storage
    chunks = apply_pp(model, topo, rank)                  # cut into stage chunks, keep this rank's, prune the rest
    apply_ep(model, topo, rank, groups)                   # routed experts → this ep rank's shard + all-to-all
    materialize(model, seed)                              # storage + initial values for what is left, by name
    apply_recompute(model, mode)                          # none | selective | full activation recompute
    apply_fp8(model, fp8_cfg)                             # Linear / expert GEMMs → block-scaled FP8 (optional)
    split  = apply_wgrad_split(model, topo, rank)         # Bi/W schedules: weight-grad GEMMs deferred to W
    dp     = NativeDataParallel(model, topo, rank, groups, ...)   # gradient reduction, clipping, AdamW

Rank-local weights: nothing is allocated before ``materialize``, and it allocates only this rank's parameters
(its stages, its experts' rows), so a rank's peak during set-up is its own share, never the whole model. Each tensor
(each expert row) draws from its own generator seeded by ``(seed, full-model name)`` (:mod:`raymoe.model.init`), so
the values equal, bit for bit, those of ``build_model(cfg, seed)`` on CPU in one process: the reference of every
equivalence test.

After ``apply_pp`` the model object keeps only the modules this rank's chunks use: every other decoder layer is
replaced by an empty placeholder, and the embedding / head / MTP modules are dropped where no chunk needs them. So
``model.state_dict()`` holds exactly this rank's parameters, **under their full-model names** — which is what makes
checkpoints re-shardable (:mod:`raymoe.train.sharded`): a name means the same tensor in every layout, and routed
experts differ only by which rows (experts) of ``[E, ...]`` a rank holds.

Gradient semantics (``NativeDataParallel``). The loss of a step is the mean over the global batch's micro-batches:
each micro-batch's loss is back-propagated scaled by ``1/C`` on its rank, and after the op lists ran:

1. parameters held by several pipeline ranks of one data slice (the two DualPipe copies of a stage; the embedding
   that the last stage's MTP reuses under 1F1B) get their gradients **summed** over those ranks;
2. dense parameters (everything but routed experts) are summed over the ``ep × dp`` ranks of their pipeline rank
   and divided by ``ep × dp``; routed-expert gradients — which the all-to-all already summed over the ep group's
   tokens — are summed over the ``dp`` replicas of the shard and divided by ``ep × dp`` as well;
3. the global gradient norm counts every parameter once (shared copies once, dense parameters on ep rank 0 only,
   each expert shard once) and is all-reduced over the ``pp × ep`` model group; clipping as in
   ``torch.nn.utils.clip_grad_norm_`` (``coef = max_norm / (norm + 1e-6)`` when below 1);
4. a non-finite loss or FP8 amax anywhere vetoes the step everywhere (MAX all-reduce of a flag).

This equals, to fp32 reduction order, one process training the whole model on the whole global batch with gradient
accumulation — the property the equivalence tests check.

``parallel.zero_stage=1`` (the default) uses :class:`raymoe.train.zero.ZeroDataParallel` instead when a group has
more than one rank: the same reductions as a reduce-scatter over the same groups, each rank holding and updating
only its share of the AdamW state, the updated weights all-gathered (ZeRO-1).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from raymoe.config import ModelConfig
from raymoe.model import DeepSeekV3, RoutedExperts, StageChunk

__all__ = ["build_model", "stage_param_names", "apply_pp", "apply_ep", "materialize", "apply_recompute", "apply_fp8",
           "apply_wgrad_split",
           "NativeDataParallel",
           "router_rows", "is_expert_param"]


class _Pruned(nn.Module):
    """Placeholder for a decoder layer another pipeline rank holds (no parameters)."""

    is_moe = False

    def forward(self, *a: Any, **k: Any) -> Any:  # pragma: no cover - never called by a correct schedule
        raise RuntimeError("this decoder layer lives on another pipeline rank")


def build_model(cfg: ModelConfig, seed: int, device: Optional[str] = None) -> DeepSeekV3:
    """The full model with the run's initial weights for ``seed`` (per-name streams, :mod:`raymoe.model.init`), or
    with ``device="meta"`` its shapes only, to prune and then :func:`materialize`. Also seeds torch's global
    generator with ``seed`` (the same stream on every rank for anything drawn later)."""
    torch.manual_seed(seed)
    return DeepSeekV3(cfg, device=device, seed=seed)


def materialize(model: nn.Module, seed: int, device: Optional[str] = None) -> nn.Module:
    """Storage on ``device`` (default: the default device) and the initial values of ``seed`` for every parameter
    still on the meta device — after :func:`apply_pp` / :func:`apply_ep`, exactly this rank's. Values equal the
    corresponding tensors (expert rows) of ``build_model(cfg, seed)``."""
    from raymoe.model.init import init_weights

    return init_weights(model, seed, device)


def stage_param_names(cfg: ModelConfig, num_stages: int) -> list[frozenset[str]]:
    """Full-model parameter names used by each of ``num_stages`` stage chunks (built on the meta device)."""
    model = DeepSeekV3(cfg, device="meta")
    names = {id(p): n for n, p in model.named_parameters()}
    return [frozenset(names[id(p)] for p in chunk.parameters()) for chunk in model.stages(num_stages)]


def router_rows(model: DeepSeekV3) -> dict[str, int]:
    """``{router module name: row}``: each router's row in ``expert_counts`` / the bias matrix, by full-model name
    (call before pruning; names survive pruning, object ids do not: a pruned module's id may be reused)."""
    rows = {id(r): i for i, r in enumerate(model.routers())}
    return {n: rows[id(m)] for n, m in model.named_modules() if id(m) in rows}


def apply_pp(model: DeepSeekV3, topo: Any, rank: int) -> dict[tuple[int, int], StageChunk]:
    """Cut ``model`` into ``topo.num_stages`` chunks; return this rank's ``{(stage, direction): chunk}`` and prune
    every module no chunk of this rank uses (in place)."""
    all_chunks = model.stages(topo.num_stages)
    mine = {(s, d): all_chunks[s] for s, d in topo.chunks(rank)}
    keep = {id(m) for c in mine.values() for m in c.modules()}
    for i, layer in enumerate(model.layers):
        if id(layer) not in keep:
            model.layers[i] = _Pruned()
    for name in ("embed_tokens", "norm", "lm_head"):
        if id(getattr(model, name)) not in keep:
            setattr(model, name, None)
    if len(model.mtp) and id(model.mtp) not in keep:
        model.mtp = nn.ModuleList()
    return mine


def apply_ep(model: DeepSeekV3, topo: Any, rank: int, ep_group: Any) -> None:
    """Replace every MoE layer's routed experts by this ep rank's shard with an all-to-all dispatcher."""
    if topo.ep == 1:
        return
    from raymoe.experts import shard_experts

    shard_experts(model, topo.coords(rank).ep_rank, topo.ep, ep_group)


def apply_recompute(model: nn.Module, mode: str) -> None:
    """``train.recompute``: what every decoder block recomputes in backward (:mod:`raymoe.model.recompute`)."""
    from raymoe.model.recompute import set_recompute

    set_recompute(model, mode)


def apply_fp8(model: nn.Module, fp8_cfg: Any) -> Any:
    """Swap Linear layers and expert GEMMs for block-scaled FP8 ones; returns the non-finite guard (or None)."""
    if not fp8_cfg.enabled:
        return None
    from raymoe.fp8 import FP8Guard, convert_to_fp8

    convert_to_fp8(model, config=fp8_cfg)
    return FP8Guard(model, check_grads=False)


def apply_wgrad_split(model: nn.Module, topo: Any, rank: int) -> str:
    """Prepare the ZeroBubble ``Bi``/``W`` split when this rank's op list has ``W`` ops: plain Linears become
    :class:`~raymoe.schedule.executor.DeferredLinear` (the routed experts' grouped GEMMs and FP8 layers already
    defer), so ``Bi`` parks every weight-gradient GEMM in the one store (:mod:`raymoe.wgrad`) and ``W`` runs it.
    Returns the runner's split mode: ``"store"`` then, else ``"auto"`` (no split needed)."""
    from raymoe.schedule.ir import OpKind

    has_w = any(p.kind is OpKind.W for op in topo.schedule.ops(topo.coords(rank).pp_rank) for p in op.parts)
    if not has_w:
        return "auto"
    from raymoe.schedule.executor import swap_linears

    swap_linears(model)
    return "store"


def is_expert_param(model: nn.Module) -> set[int]:
    """ids of routed-expert parameters (split over ep, replicated over dp)."""
    out: set[int] = set()
    for m in model.modules():
        if isinstance(m, RoutedExperts):  # ExpertParallelExperts is one too
            out |= {id(p) for p in m.parameters()}
    return out


def _flat_allreduce(tensors: list[torch.Tensor], group: Any) -> None:
    """Sum ``tensors`` in place over ``group`` with one all-reduce of a flat buffer (None group: nothing to do)."""
    if group is None or not tensors:
        return
    import torch.distributed as dist

    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    off = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[off:off + n].view_as(t))
        off += n


class NativeDataParallel:
    """Gradient reduction + clipping + optimizer step for one rank of any (pp, ep, dp) layout (module docstring).

    Args:
        model: the rank's pruned (and expert-sharded) model.
        topo: the :class:`~raymoe.train.topology.Topology`.
        rank: global rank.
        groups: this rank's :class:`~raymoe.train.topology.ProcessGroups` (None in a world of one).
        optimizer: a torch optimizer over ``model``'s parameters (``GuardedAdamW``).
        grad_clip: max global norm (0 disables clipping).
    """

    def __init__(self, model: nn.Module, topo: Any, rank: int, groups: Any, optimizer: torch.optim.Optimizer,
                 grad_clip: float) -> None:
        self.model, self.topo, self.rank, self.groups = model, topo, rank, groups
        self.optimizer, self.grad_clip = optimizer, grad_clip
        c = topo.coords(rank)
        self.coords = c
        experts = is_expert_param(model)
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.expert = [(n, p) for n, p in self.named if id(p) in experts]
        self.dense = [(n, p) for n, p in self.named if id(p) not in experts]
        self.shared: list[tuple[Any, list[torch.nn.Parameter]]] = []
        for ranks, names in topo.shared_param_sets.items():
            if c.pp_rank in ranks:
                ns = set(names)
                ps = [p for n, p in self.named if n in ns]
                self.shared.append((groups.shared[ranks] if groups is not None else None, ps))
        # each parameter counted once in the global norm
        self.norm_params = [p for n, p in self.dense if c.ep_rank == 0 and topo.grad_norm_owner(n, c.pp_rank)]
        self.norm_params += [p for n, p in self.expert if topo.grad_norm_owner(n, c.pp_rank)]

    def _grads(self, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
        out = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            out.append(p.grad)
        return out

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        for group, ps in self.shared:
            _flat_allreduce(self._grads(ps), group)
        scale = 1.0 / self.topo.data_parallel_size
        if self.groups is not None:
            _flat_allreduce(self._grads([p for _, p in self.dense]), self.groups.dense_dp)
            _flat_allreduce(self._grads([p for _, p in self.expert]), self.groups.expert_dp)
        if scale != 1.0:
            for _, p in self.named:
                if p.grad is not None:
                    p.grad.mul_(scale)

    @torch.no_grad()
    def global_grad_norm(self) -> float:
        dev = next((p.device for _, p in self.named), torch.device("cpu"))
        sq = torch.zeros(1, dtype=torch.float64, device=dev)  # on the device: NCCL reduces device tensors
        for p in self.norm_params:
            if p.grad is not None:
                sq += p.grad.detach().double().pow(2).sum()
        if self.groups is not None and self.groups.model is not None:
            import torch.distributed as dist

            dist.all_reduce(sq, group=self.groups.model)
        return math.sqrt(float(sq))

    @torch.no_grad()
    def clip(self, norm: float) -> None:
        if self.grad_clip > 0 and math.isfinite(norm):
            coef = self.grad_clip / (norm + 1e-6)
            if coef < 1.0:
                self.scale_grads(coef)

    def scale_grads(self, coef: float) -> None:
        """Multiply the gradients the optimizer will apply by ``coef`` (clipping)."""
        for _, p in self.named:
            if p.grad is not None:
                p.grad.mul_(coef)

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def step(self, skip: bool) -> float:
        """Reduce, measure the norm, clip and step (``skip``: leave weights and optimizer state untouched)."""
        self.reduce_gradients()
        norm = self.global_grad_norm()
        if not skip:
            self.clip(norm)
            self.optimizer.step()
            self.after_update()
        self.clear_grads()
        return norm

    def after_update(self) -> None:
        """After an applied optimizer step (replicated state: every rank already holds the new weights)."""

    def clear_grads(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
