"""Hand-off of a rank's in-memory state from a surviving DP replica to new ones: recovery without recomputed steps.

When a rank dies, the DP replicas whose every rank (``pp × ep`` of them) is still alive keep their processes, their
model and optimizer state; the controller keeps the data position, step counter and balancer (it never died). The
group is re-formed around the survivors — they leave the broken process group and join a new one as the first DP
ranks of the new layout — and each new rank receives its state by ``torch.distributed`` broadcast from the survivor
that holds the same ``(pp_rank, ep_rank)`` share, over that share's ``expert_dp`` group. No checkpoint is read and no
completed step is computed again.

The step in flight. A failure inside ``step`` leaves every survivor in one of two states, which
:func:`pick_survivors` tells apart from what each rank reports (:func:`probe_of`):

* **before the update** (the usual case: the survivor failed in a collective with the dead rank, or never started
  the step): the step is *redone* on the new group from the survivors' pre-step state, with the same samples, lr and
  biases. It was never completed, so it is not a recomputed step;
* **after the update** (the dead rank died after its last collective of the step — every cross-replica reduction
  had completed, so the survivors applied the full step): the step counts; its results are the survivors' own.

Replicas in different states cannot be mixed: the ones that hold the newer state are kept and the others are
replaced from them. A replica whose ranks disagree, or that has a rank that died or hangs, is lost.

What is handed over is "whatever the rank's state dict is" (:func:`rank_state`): parameters and buffers under their
full-model names plus every tensor of the optimizer state per parameter. That holds only when the replicas of a
``(pp_rank, ep_rank)`` share hold *identical* state. When the optimizer state is sharded over DP (ZeRO-1:
``dp_impl=deepspeed`` today), a survivor does not hold the dead ranks' shards: :func:`handoff_unavailable` says so and
the controller recovers from storage instead (``recoveries[].recovery == "checkpoint"`` with the reason). A sharded
runtime would extend :func:`rank_state` with a per-DP-rank part and a gather/scatter in :func:`broadcast_state`.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["handoff_unavailable", "rank_state", "load_rank_state", "broadcast_state", "probe_of", "Survivors",
           "pick_survivors", "replica_ranks", "BUCKET_BYTES"]

# broadcast in buckets of at most this many bytes: the extra memory of a hand-off is one bucket, not the whole state
BUCKET_BYTES = 64 << 20


def handoff_unavailable(run: Any, impl: str) -> Optional[str]:
    """Why a survivor cannot hand its state to new ranks of ``run`` (``impl``: the DP runtime), or None when it can.

    ``elastic.recovery=checkpoint`` turns the hand-off off; ZeRO-1 (DeepSpeed's, or the native
    :mod:`raymoe.train.zero` with ``parallel.zero_stage=1``) shards the optimizer state over DP, so no survivor holds
    a dead rank's shard. The native one shards whenever this layout, or one DP may grow to, has more than one rank in
    a DP group (``ep × dp > 1``); a run that wants hand-offs sets ``parallel.zero_stage=0`` (replicated state)."""
    if run.elastic.recovery != "handoff":
        return f"elastic.recovery={run.elastic.recovery}"
    if impl == "deepspeed":
        return "optimizer state is sharded over DP (dp_impl=deepspeed, ZeRO-1): a survivor does not hold the lost " \
               "ranks' optimizer shards"
    P = run.parallel
    if P.zero_stage == 1 and P.ep * max(P.dp, run.elastic.max_dp or P.dp) > 1:
        return "optimizer state is sharded over DP (parallel.zero_stage=1, ZeRO-1): a survivor does not hold the " \
               "lost ranks' optimizer shards; parallel.zero_stage=0 keeps it replicated for hand-offs"
    return None


def rank_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """This rank's state as flat named tensors: ``model/<name>`` (parameters and persistent buffers) and
    ``optim/<key>/<param name>`` (every optimizer state entry; non-tensor entries become 0-d tensors). The names
    are full-model names, so a rank of any DP index with the same ``(pp_rank, ep_rank)`` has the same keys (once its
    optimizer has state). Tensors are the live ones (no copy)."""
    out = {f"model/{k}": v.detach() for k, v in model.state_dict(keep_vars=True).items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for p, st in optimizer.state.items():
        n = names.get(id(p))
        if n is None:
            raise ValueError("the optimizer holds state for a tensor that is not a parameter of the model")
        for k, v in st.items():
            out[f"optim/{k}/{n}"] = v.detach() if torch.is_tensor(v) else torch.tensor(v)
    return out


@torch.no_grad()
def load_rank_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, torch.Tensor]) -> None:
    """Put ``state`` (:func:`rank_state`'s form) into ``model`` and ``optimizer``: every model key must be there with
    its shape (strict), optimizer state is replaced per parameter."""
    sd = {k[len("model/"):]: v for k, v in state.items() if k.startswith("model/")}
    model.load_state_dict(sd, strict=True)
    params = dict(model.named_parameters())
    optimizer.state.clear()
    for k, v in state.items():
        if not k.startswith("optim/"):
            continue
        key, name = k[len("optim/"):].split("/", 1)
        p = params.get(name)
        if p is None:
            raise ValueError(f"hand-off: optimizer state for {name!r}, which this rank does not hold")
        optimizer.state[p][key] = v.to(p.device).clone()


def _bcast_bytes(payload: Optional[bytes], src: int, group: Any, device: torch.device) -> bytes:
    n = torch.tensor([len(payload) if payload is not None else 0], dtype=torch.long, device=device)
    dist.broadcast(n, src, group=group)
    buf = (torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device) if payload is not None
           else torch.empty(int(n.item()), dtype=torch.uint8, device=device))
    dist.broadcast(buf, src, group=group)
    return bytes(buf.cpu().numpy().tobytes())


def broadcast_state(state: Optional[dict[str, torch.Tensor]], src: int, group: Any, device: torch.device,
                    bucket_bytes: int = BUCKET_BYTES) -> dict[str, torch.Tensor]:
    """Broadcast named tensors from global rank ``src`` to every rank of ``group`` (collective: every member calls it;
    ``state`` is read on ``src`` only). A JSON manifest (names, shapes, dtypes; no pickles) goes first, then the
    tensors packed per dtype into flat buckets of at most ``bucket_bytes`` (the extra memory is one bucket). Returns
    the received tensors (on the source: ``state`` itself)."""
    if dist.get_rank() == src:
        assert state is not None
        manifest = [[k, list(t.shape), str(t.dtype).removeprefix("torch.")] for k, t in state.items()]
        _bcast_bytes(json.dumps(manifest).encode(), src, group, device)
    else:
        manifest = json.loads(_bcast_bytes(None, src, group, device))
        state = None
    out: dict[str, torch.Tensor] = {}
    by_dtype: dict[str, list[tuple[str, list[int]]]] = {}
    for k, shape, dt in manifest:
        by_dtype.setdefault(dt, []).append((k, shape))
    for dt, items in by_dtype.items():
        _bcast_items(items, getattr(torch, dt), state, src, group, device, bucket_bytes, out)
    return out if state is None else dict(state)


def _bcast_items(items: list[tuple[str, list[int]]], dtype: torch.dtype, state: Optional[dict[str, torch.Tensor]],
                 src: int, group: Any, device: torch.device, bucket_bytes: int,
                 out: dict[str, torch.Tensor]) -> None:
    """One dtype's tensors in flat buckets (the same bucketing on sender and receivers: it depends on the manifest)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    bucket: list[tuple[str, list[int]]] = []
    size = 0

    def flush() -> None:
        nonlocal bucket, size
        if not bucket:
            return
        if state is not None:
            flat = torch.cat([state[k].reshape(-1).to(device, dtype) for k, _ in bucket])
        else:
            flat = torch.empty(size, dtype=dtype, device=device)
        dist.broadcast(flat, src, group=group)
        if state is None:
            off = 0
            for k, shape in bucket:
                n = 1
                for s in shape:
                    n *= s
                out[k] = flat[off:off + n].view(shape).clone()
                off += n
        bucket, size = [], 0

    for k, shape in items:
        n = 1
        for s in shape:
            n *= s
        if bucket and (size + n) * itemsize > bucket_bytes:
            flush()
        bucket.append((k, shape))
        size += n
    flush()


def probe_of(completed_step: Optional[int], result: Any) -> dict[str, Any]:
    """What a rank reports after a failure: the index of the last step it completed (optimizer update applied or
    vetoed everywhere; None: none since it was built or loaded) and that step's result."""
    return {"completed_step": completed_step, "result": result}


def replica_ranks(pp: int, ep: int, dp: int, dp_rank: int) -> list[int]:
    """Global ranks of DP replica ``dp_rank`` (``rank = pp_rank·ep·dp + ep_rank·dp + dp_rank``), pp-major."""
    return [p * ep * dp + e * dp + dp_rank for p in range(pp) for e in range(ep)]


@dataclasses.dataclass
class Survivors:
    """Which DP replicas go on (old DP indices, in order: they become DP ranks ``0..k-1``), whether they completed
    the step in flight (then ``results`` are theirs for it), which were lost, and why none survived (when none)."""

    replicas: list[int]
    completed_in_flight: bool = False
    results: Optional[list[Any]] = None
    lost: list[int] = dataclasses.field(default_factory=list)
    why: str = ""


def pick_survivors(pp: int, ep: int, dp: int, probes: list[Optional[dict[str, Any]]],
                   in_flight: Optional[int]) -> Survivors:
    """The replicas that can seed the new group. ``probes[rank]``: :func:`probe_of` of that rank, or None when it
    died or did not answer; ``in_flight``: the index of the step that was executing when the failure hit (None: the
    failure was outside a step)."""
    state: dict[int, int] = {}
    lost = []
    for d in range(dp):
        ps = [probes[r] for r in replica_ranks(pp, ep, dp, d)]
        done = {(-1 if p["completed_step"] is None else p["completed_step"]) for p in ps if p is not None}
        if any(p is None for p in ps) or len(done) != 1:
            lost.append(d)
        else:
            state[d] = done.pop()
    if not state:
        return Survivors([], lost=lost, why="no DP replica survived whole (every replica lost a rank, or its ranks "
                                            "did not answer)")
    newest = max(state.values())
    keep = [d for d in range(dp) if state.get(d) == newest]
    lost = sorted(set(lost) | {d for d in state if d not in keep})
    completed = in_flight is not None and newest == in_flight
    results = None
    if completed:
        results = [probes[r]["result"] for d in keep for r in replica_ranks(pp, ep, dp, d)]
    return Survivors(keep, completed, results, lost)
