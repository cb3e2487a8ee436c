"""Native ZeRO-1: AdamW state sharded over the data-parallel group, for any pp × ep × dp layout.

``parallel.zero_stage=1`` with ``parallel.dp_impl=native`` (:class:`ZeroDataParallel`). The replicated
:class:`~raymoe.train.parallelize.NativeDataParallel` keeps the full AdamW moments of its model shard on every DP
replica; here each replica keeps ``1/n`` of them, where ``n`` is the size of the group the tensor's gradient is
reduced over — the same two groups the replicated runtime all-reduces over:

* dense parameters (everything but routed experts): the ``ep × dp`` ranks of the pipeline rank (``dense_dp``);
* routed-expert parameters: the ``dp`` ranks that hold the same expert shard (``expert_dp``).

Partition math (:func:`plan_buckets`, :func:`owned_pieces`; pure functions, unit-tested without processes). The
set's parameters, in ``named_parameters`` order (identical on every member of the group), are laid end to end and
cut into buckets of at most ``bucket_numel`` elements (a larger tensor gets a bucket of its own; a dtype change starts
a new one). Each bucket is zero-padded to a multiple of ``n`` and split into ``n`` equal contiguous shards; group
member ``i`` owns shard ``i``. What a member owns of a parameter is therefore at most one contiguous range of its
flattened elements per bucket — a *piece* — and since a parameter lies in exactly one bucket, at most one piece per
parameter.

One optimizer step:

1. gradients of parameters held by several pipeline ranks are summed over them (as in the replicated runtime);
2. per bucket: flatten the full gradients into one padded buffer, ``reduce_scatter`` it over the group (sum), scale
   by ``1 / (ep × dp)`` — the member keeps only its shard of the reduced gradient, and the full gradients are freed;
3. global norm: each rank sums the squares of its owned gradient pieces (of the parameters it counts: one copy of a
   parameter held by two pipeline ranks), one all-reduce over the world adds them — each element of the model is
   owned by exactly one rank of the world, so this is the unsharded norm up to fp32/fp64 reduction order; clipping
   scales the owned pieces with the same coefficient the replicated runtime would use;
4. :class:`~raymoe.optim.GuardedAdamW` steps the pieces only. A piece is an ``nn.Parameter`` that is a *view* of
   its slice of the real parameter, so the update lands in the model's weights in place; the pieces inherit the
   weight-decay group of their parameter (:func:`raymoe.optim.param_groups` of the model, mapped piece by piece);
5. per bucket: ``all_gather`` the updated shards and copy every member's part back into the parameters, so every
   replica holds the same weights again (bit-identical: each element is computed on one rank and copied).

A skipped step (non-finite loss or FP8 amax anywhere) vetoes steps 4–5 on every rank, exactly as before.

Weights stay fp32 on every replica: under ``train.dtype=bfloat16`` the runtime autocasts the forward and the fp32
parameters *are* the master weights, so sharding the AdamW moments is all ZeRO-1 has to shard (no separate master
copy exists to partition).

Checkpoints (:mod:`raymoe.train.sharded`): every rank writes its pieces' moments as flat ranges of the full-model
tensor (dp-, ep- and bucket-independent coordinates); a loader in any layout and either ``zero_stage`` reads the
ranges it needs from whichever files hold them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from raymoe.train.parallelize import NativeDataParallel, _flat_allreduce

__all__ = ["Bucket", "Piece", "plan_buckets", "owned_pieces", "ShardedSet", "ZeroDataParallel",
           "DEFAULT_BUCKET_NUMEL", "optimizer_state_bytes"]

# 2^25 fp32 elements = 128 MiB of gradient per bucket: few collectives, bounded temporary buffer
DEFAULT_BUCKET_NUMEL = 1 << 25


@dataclass(frozen=True)
class Bucket:
    """Parameters ``start..stop-1`` of a set, ``numel`` elements end to end, padded to ``padded`` (a multiple of the
    group size); each member owns ``shard = padded / n`` of them."""

    start: int
    stop: int
    numel: int
    padded: int
    shard: int


@dataclass(frozen=True)
class Piece:
    """What one member owns of parameter ``index``: its flattened elements ``lo..hi-1``, stored at ``offset`` in the
    member's shard of bucket ``bucket``."""

    index: int
    lo: int
    hi: int
    bucket: int
    offset: int

    @property
    def numel(self) -> int:
        return self.hi - self.lo


def plan_buckets(numels: list[int], n: int, bucket_numel: int = DEFAULT_BUCKET_NUMEL,
                 dtypes: Optional[list[Any]] = None) -> list[Bucket]:
    """Cut parameters of ``numels`` elements (in order) into buckets of at most ``bucket_numel`` elements (a larger
    tensor alone in its own; a change of ``dtypes[i]`` starts a new bucket), each padded to a multiple of ``n``."""
    if n < 1 or bucket_numel < 1:
        raise ValueError(f"group size {n} and bucket_numel {bucket_numel} must be >= 1")
    out: list[Bucket] = []
    start, total = 0, 0

    def close(stop: int) -> None:
        padded = -(-total // n) * n
        out.append(Bucket(start, stop, total, padded, padded // n))

    for i, k in enumerate(numels):
        if i > start and (total + k > bucket_numel or (dtypes is not None and dtypes[i] != dtypes[start])):
            close(i)
            start, total = i, 0
        total += k
    if start < len(numels):
        close(len(numels))
    return out


def owned_pieces(numels: list[int], buckets: list[Bucket], member: int) -> list[Piece]:
    """The pieces group member ``member`` owns: per bucket, the intersection of its shard
    ``[member · shard, (member + 1) · shard)`` with each parameter's range in the bucket (padding owns nothing)."""
    out: list[Piece] = []
    for b, bk in enumerate(buckets):
        lo_m, hi_m = member * bk.shard, (member + 1) * bk.shard
        off = 0
        for i in range(bk.start, bk.stop):
            a, z = off, off + numels[i]
            lo, hi = max(a, lo_m), min(z, hi_m)
            if lo < hi:
                out.append(Piece(i, lo - a, hi - a, b, lo - lo_m))
            off = z
    return out


def _collectives() -> tuple[Any, Any]:
    """``(reduce_scatter, all_gather)`` of one flat tensor (recent torch names them ``*_single``, deprecating
    ``reduce_scatter_tensor`` / ``all_gather_into_tensor``; same arguments)."""
    import torch.distributed as dist

    return (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor,
            getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)


def _group_size_rank(group: Any) -> tuple[int, int]:
    if group is None:
        return 1, 0
    import torch.distributed as dist

    return dist.get_world_size(group), dist.get_rank(group)


class ShardedSet:
    """One set of parameters sharded over one process group (``None``: a group of one, nothing to communicate).

    Args:
        named: ``[(full-model name, parameter)]`` in the same order on every member.
        group: the process group the set's gradients are reduced over.
        bucket_numel: bucket size (elements).
        full_offsets: ``{name: offset}`` of this rank's tensor inside the full-model tensor, flattened (routed
            experts: ``first expert row × row size``; 0 for everything else) — the checkpoint's coordinates.
    """

    def __init__(self, named: list[tuple[str, nn.Parameter]], group: Any, bucket_numel: int,
                 full_offsets: dict[str, int]) -> None:
        self.named, self.group = named, group
        self.n, self.member = _group_size_rank(group)
        params = [p for _, p in named]
        for name, p in named:
            if not p.is_contiguous():
                raise ValueError(f"ZeRO-1 needs contiguous parameters; {name} is not")
        numels = [p.numel() for p in params]
        self.buckets = plan_buckets(numels, self.n, bucket_numel, [p.dtype for p in params])
        self.pieces = owned_pieces(numels, self.buckets, self.member)
        # the optimizer's parameters: views of the owned slices of the real parameters (updates land in place)
        self.views = [nn.Parameter(params[pc.index].detach().view(-1)[pc.lo:pc.hi]) for pc in self.pieces]
        self.full_offsets = full_offsets
        self._shards: list[Optional[torch.Tensor]] = [None] * len(self.buckets)

    # ------------------------------------------------------------------ per step
    def _grad(self, p: nn.Parameter) -> torch.Tensor:
        return p.grad if p.grad is not None else torch.zeros_like(p)

    @torch.no_grad()
    def reduce_scatter(self, scale: float) -> None:
        """Reduce-scatter every bucket's gradients over the group, keep this member's shard (times ``scale``) as the
        pieces' gradients and free the parameters' full gradients."""
        params = [p for _, p in self.named]
        for b, bk in enumerate(self.buckets):
            ps = params[bk.start:bk.stop]
            dev, dt = ps[0].device, ps[0].dtype
            if self.n == 1:
                flat = torch.cat([self._grad(p).reshape(-1) for p in ps]) if len(ps) > 1 else \
                    self._grad(ps[0]).reshape(-1).clone()
                shard = flat
            else:
                flat = torch.zeros(bk.padded, dtype=dt, device=dev)
                off = 0
                for p in ps:
                    k = p.numel()
                    if p.grad is not None:
                        flat[off:off + k].copy_(p.grad.reshape(-1))
                    off += k
                shard = torch.empty(bk.shard, dtype=dt, device=dev)
                _collectives()[0](shard, flat, group=self.group)
                del flat
            if scale != 1.0:
                shard.mul_(scale)
            self._shards[b] = shard
            for p in ps:
                p.grad = None
        for v, pc in zip(self.views, self.pieces):
            v.grad = self._shards[pc.bucket][pc.offset:pc.offset + pc.numel]

    def norm_sq(self, counted: set[int]) -> torch.Tensor:
        """fp64 sum of squares of the owned gradient pieces of parameters whose index is in ``counted``."""
        dev = self.views[0].device if self.views else torch.device("cpu")
        sq = torch.zeros((), dtype=torch.float64, device=dev)
        for v, pc in zip(self.views, self.pieces):
            if pc.index in counted and v.grad is not None:
                sq += v.grad.double().pow(2).sum()
        return sq

    @torch.no_grad()
    def scale_grads(self, coef: float) -> None:
        for s in self._shards:
            if s is not None:
                s.mul_(coef)

    @torch.no_grad()
    def all_gather(self) -> None:
        """Every member's updated shard into every member's parameters."""
        if self.n == 1:
            return  # the views are the parameters' own storage: already updated in place
        params = [p for _, p in self.named]
        by_bucket: dict[int, list[tuple[nn.Parameter, Piece]]] = {}
        for v, pc in zip(self.views, self.pieces):
            by_bucket.setdefault(pc.bucket, []).append((v, pc))
        for b, bk in enumerate(self.buckets):
            ps = params[bk.start:bk.stop]
            shard = torch.zeros(bk.shard, dtype=ps[0].dtype, device=ps[0].device)
            for v, pc in by_bucket.get(b, []):
                shard[pc.offset:pc.offset + pc.numel].copy_(v.detach())
            full = torch.empty(bk.padded, dtype=shard.dtype, device=shard.device)
            _collectives()[1](full, shard, group=self.group)
            off = 0
            for p in ps:
                k = p.numel()
                p.detach().view(-1).copy_(full[off:off + k])
                off += k

    def clear(self) -> None:
        for v in self.views:
            v.grad = None
        self._shards = [None] * len(self.buckets)

    # ------------------------------------------------------------------ checkpoint coordinates
    def ranges(self) -> list[tuple[str, nn.Parameter, nn.Parameter, int, int]]:
        """``[(name, parameter, piece, lo, hi)]``: each owned piece and its flat range in the full-model tensor."""
        out = []
        for v, pc in zip(self.views, self.pieces):
            name, p = self.named[pc.index]
            base = self.full_offsets.get(name, 0)
            out.append((name, p, v, base + pc.lo, base + pc.hi))
        return out


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the AdamW moments (``exp_avg``, ``exp_avg_sq``) an optimizer holds (step counters excluded)."""
    return sum(t.numel() * t.element_size() for st in optimizer.state.values()
               for k, t in st.items() if k in ("exp_avg", "exp_avg_sq") and torch.is_tensor(t))


class ZeroDataParallel(NativeDataParallel):
    """:class:`~raymoe.train.parallelize.NativeDataParallel` with the AdamW state sharded over each parameter's DP
    group (module docstring). Builds its own :class:`~raymoe.optim.GuardedAdamW` over the owned pieces
    (:attr:`optimizer`).

    Args:
        model, topo, rank, groups, grad_clip: as for ``NativeDataParallel``.
        weight_decay: decay of matrices (:func:`raymoe.optim.param_groups`).
        adamw: keyword arguments of the optimizer (``lr``, ``betas``, ``eps``).
        bucket_numel: elements per reduce-scatter / all-gather bucket.
    """

    def __init__(self, model: nn.Module, topo: Any, rank: int, groups: Any, grad_clip: float,
                 weight_decay: float, adamw: dict[str, Any], bucket_numel: int = DEFAULT_BUCKET_NUMEL) -> None:
        from raymoe.optim import GuardedAdamW, param_groups
        from raymoe.train.sharded import expert_rows

        # the base class wants an optimizer; ours is built below, over the pieces
        super().__init__(model, topo, rank, groups, optimizer=None, grad_clip=grad_clip)  # type: ignore[arg-type]
        offsets: dict[str, int] = {}
        by_name = dict(self.named)
        for name, (start, stop, _E) in expert_rows(model).items():
            if name in by_name:
                offsets[name] = start * (by_name[name].numel() // max(stop - start, 1))
        self.sets = [
            ShardedSet(self.dense, groups.dense_dp if groups is not None else None, bucket_numel, offsets),
            ShardedSet(self.expert, groups.expert_dp if groups is not None else None, bucket_numel, offsets),
        ]
        c = self.coords
        # per set, the indices of the parameters this rank counts in the global norm (one copy of shared ones)
        self._counted = [{i for i, (n, _) in enumerate(s.named) if topo.grad_norm_owner(n, c.pp_rank)}
                         for s in self.sets]
        views_of: dict[int, list[nn.Parameter]] = {}
        for s in self.sets:
            for v, pc in zip(s.views, s.pieces):
                views_of.setdefault(id(s.named[pc.index][1]), []).append(v)
        groups_ = []
        for g in param_groups(model, weight_decay):
            ps = [v for p in g["params"] for v in views_of.get(id(p), [])]
            if ps:
                groups_.append({**g, "params": ps})
        if not groups_:
            raise ValueError(f"rank {rank}: ZeRO-1 left this rank no optimizer state (a model smaller than its "
                             "DP group); use parallel.zero_stage=0")
        self.optimizer = GuardedAdamW(groups_, **adamw)

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        for group, ps in self.shared:  # copies on several pipeline ranks: summed first, as in the base class
            _flat_allreduce(self._grads(ps), group)
        scale = 1.0 / self.topo.data_parallel_size
        for s in self.sets:
            s.reduce_scatter(scale)

    @torch.no_grad()
    def global_grad_norm(self) -> float:
        sq = sum((s.norm_sq(k) for s, k in zip(self.sets, self._counted)),
                 torch.zeros((), dtype=torch.float64, device=self._device())).reshape(1)
        if self.groups is not None:
            import torch.distributed as dist

            dist.all_reduce(sq)  # each element of the model is owned by exactly one rank of the world
        return math.sqrt(float(sq))

    def _device(self) -> torch.device:
        return next((p.device for _, p in self.named), torch.device("cpu"))

    @torch.no_grad()
    def scale_grads(self, coef: float) -> None:
        for s in self.sets:
            s.scale_grads(coef)

    def after_update(self) -> None:
        for s in self.sets:  # each rank updated its pieces: gather the others'
            s.all_gather()

    def clear_grads(self) -> None:
        for s in self.sets:
            s.clear()

    def state_ranges(self) -> list[tuple[str, nn.Parameter, nn.Parameter, int, int]]:
        """Every owned piece with its flat range in the full-model tensor (for checkpoints)."""
        return [r for s in self.sets for r in s.ranges()]
