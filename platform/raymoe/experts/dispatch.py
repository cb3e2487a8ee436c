"""The collectives and permutations of the expert-parallel exchange (see :mod:`raymoe.experts` for the protocol).

* :func:`all_to_all_uneven` — differentiable ``all_to_all_single`` with uneven splits; backward is the reverse
  exchange (splits swapped).
* :func:`exchange_counts` — the per-expert row counts, sent before the rows themselves (no gradient).
* :func:`source_to_expert_major` / :func:`permute_rows` — received rows arrive source-major (all rows of source
  rank 0, then rank 1, …; each block sorted by expert); the local experts want them expert-major.

``group`` may also be a tuple of per-lane groups with the same members (:mod:`raymoe.experts.overlap`): each
exchange, forward or backward, then runs on the group of the lane that issues it, asynchronously and with the lane's
baton handed over while it is in flight.

Everything here is device-agnostic: the same code runs on CPU tensors over gloo and CUDA tensors over NCCL.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from raymoe.experts import overlap

__all__ = ["all_to_all_uneven", "exchange_counts", "source_to_expert_major", "permute_rows"]


class _AllToAllUneven(torch.autograd.Function):
    """Rows ``[sum(send_splits), ...]`` → rows ``[sum(recv_splits), ...]``; backward: the same exchange reversed."""

    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):  # type: ignore[override]
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        return _exchange(x, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return _exchange(g, ctx.recv_splits, ctx.send_splits, ctx.group), None, None, None


def _exchange(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    return overlap.all_to_all_single(out, x, recv_splits, send_splits, overlap.lane_group(group))


def all_to_all_uneven(
    x_ND: torch.Tensor, send_splits: Sequence[int], recv_splits: Sequence[int], group: Any
) -> torch.Tensor:
    """Differentiable uneven all-to-all over ``group`` (``None``: the default group).

    ``x_ND [sum(send_splits), ...]``: the first ``send_splits[0]`` rows go to group rank 0, the next ``send_splits[1]``
    to rank 1, and so on. Returns ``[sum(recv_splits), ...]``: ``recv_splits[s]`` rows from rank ``s``, source-major.
    Every rank of the group must call it (with consistent splits: my ``send_splits[r]`` is rank r's
    ``recv_splits[me]``), and — since backward is a collective too — every rank must also run its backward.
    Gradient: ``dx = all_to_all(dy, send=recv_splits, recv=send_splits)``.
    """
    send = [int(s) for s in send_splits]
    recv = [int(s) for s in recv_splits]
    if x_ND.shape[0] != sum(send):
        raise ValueError(f"x has {x_ND.shape[0]} rows but send_splits sum to {sum(send)}")
    return _AllToAllUneven.apply(x_ND, send, recv, group)


@torch.no_grad()
def exchange_counts(send_counts: torch.Tensor, group: Any) -> torch.Tensor:
    """``send_counts [ep·E_local]`` int64 (rows I send to each global expert, experts contiguous per rank) →
    ``recv_counts [ep·E_local]`` int64 viewed as ``[ep (source), E_local]``: rows each source sends to each of my
    local experts. Equal splits of ``E_local`` per rank; stays on the counts' device (CUDA for NCCL)."""
    send_counts = send_counts.to(torch.int64).contiguous()
    out = torch.empty_like(send_counts)
    return overlap.all_to_all_single(out, send_counts, None, None, overlap.lane_group(group), host_read=True)


@torch.no_grad()
def source_to_expert_major(counts_SE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Permutations between the source-major and expert-major orders of received rows.

    ``counts_SE [S, E]``: rows source ``s`` sent for local expert ``e``; received rows are ordered by (s, e), the
    experts want (e, s). Returns ``(to_expert [N], to_source [N])`` int64 with ``x_em = x_src[to_expert]`` and
    ``x_src = x_em[to_source]`` (inverse permutations; the order within each (s, e) block is kept).
    """
    S, E = counts_SE.shape
    flat_se = counts_SE.reshape(-1)
    src_start = flat_se.cumsum(0) - flat_se  # start of block (s, e) in source-major order
    flat_es = counts_SE.t().reshape(-1)
    dst_start = (flat_es.cumsum(0) - flat_es).view(E, S).t().reshape(-1)  # start of block (s, e) in expert-major
    seg = torch.repeat_interleave(torch.arange(S * E, device=counts_SE.device), flat_se)
    to_source = dst_start[seg] + torch.arange(seg.numel(), device=counts_SE.device) - src_start[seg]
    to_expert = torch.empty_like(to_source)
    to_expert[to_source] = torch.arange(to_source.numel(), device=counts_SE.device)
    return to_expert, to_source


class _Permute(torch.autograd.Function):
    """``x[idx]`` for a permutation ``idx`` with inverse ``inv``; backward is the inverse gather (no scatter)."""

    @staticmethod
    def forward(ctx, x, idx, inv):  # type: ignore[override]
        ctx.save_for_backward(inv)
        return x.index_select(0, idx)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        (inv,) = ctx.saved_tensors
        return g.index_select(0, inv), None, None


def permute_rows(x_ND: torch.Tensor, idx: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """``x_ND[idx]`` (``[N, ...]``) for a permutation ``idx`` of ``range(N)`` whose inverse is ``inv``."""
    return _Permute.apply(x_ND, idx, inv)
