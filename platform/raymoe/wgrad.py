"""Deferred weight gradients (ZeroBubble ``Bi``/``W`` split) and the one way to add a gradient to a parameter.

One store serves every store-aware backward in the project: :class:`~raymoe.schedule.executor.DeferredLinear`,
the routed experts' grouped GEMM (:mod:`raymoe.model.moe`), :class:`~raymoe.fp8.FP8Linear` and
:class:`~raymoe.fp8.grouped.FP8GroupedGEMM`. This module imports only torch, so ``model``, ``fp8`` and ``schedule``
all import it without cycles.

Usage::

    store = WeightGradStore()
    with store.defer(cell):                   # "Bi": input grads now; weight grads parked under ``cell``
        torch.autograd.backward(out, grad_out)
    ...
    store.run(cell)                           # "W" of that cell: the parked weight grads land in ``.grad``

A cell is any hashable; the schedule executor uses its ``(micro-batch, direction, stage)``. ``defer()`` without a
cell makes a queue entry instead: :meth:`WeightGradStore.pop` runs the oldest pending cell,
:meth:`~WeightGradStore.flush` all of them in ``defer`` order.

A store-aware autograd function asks :meth:`WeightGradStore.active` during its backward. If a ``defer`` block is
open it parks a closure with :meth:`~WeightGradStore.put` (naming the parameters the closure will add to) and returns
``None`` for the weights; otherwise it returns the weight grads as usual. The active store is the top of a
module-level stack that only ``defer`` pushes and pops, not a thread-local or a context variable: autograd may run
backward functions on its own worker threads (one per CUDA device), where the caller's thread-locals and context
variables are not visible. ``defer`` is entered and left by the thread that calls ``backward``, which blocks until
the backward is done, so the stack is correct for the whole backward. Stores may nest (the innermost wins); one
store's ``defer`` blocks may not.

Parked closures add their results with :func:`accumulate_grad` / :func:`accumulate_grads`, which go **through
autograd**: ``torch.autograd.backward([param], [grad])`` on the leaf runs the parameter's ``AccumulateGrad`` node,
so tensor hooks (``param.register_hook``), hooks on the ``AccumulateGrad`` node and post-accumulate-grad hooks
(``param.register_post_accumulate_grad_hook``, what DeepSpeed's ZeRO uses to bucket and reduce gradients) all fire,
exactly as for a gradient produced by a normal backward. Writing ``p.grad = p.grad + g`` by hand skips them all.

The ``None`` a deferring backward returns for a weight still reaches the weight's ``AccumulateGrad`` node, and
autograd fires the parameter's hooks with ``param.grad is None`` (post-accumulate hooks too). DeepSpeed ZeRO-2's
hook would then try to reduce a ``None`` gradient and fail. DeepSpeed's marker for "this parameter's gradient is not
final yet, do not reduce it" is the attribute ``param.ds_grad_is_ready = False``: :meth:`WeightGradStore.put` sets it
on the parameters a closure names and :meth:`WeightGradStore.run` sets it back to ``True`` just before the closure
adds the gradient, so ZeRO reduces each deferred gradient exactly once, at its ``W`` (a cell that never runs leaves
its parameters marked: run or flush every cell before the optimizer step). Without DeepSpeed the attribute is inert.
A ``W`` runs outside any ``engine.backward``, so whatever DeepSpeed does at the end of a backward (ZeRO-2's reduction
epilogue) has to follow each cell: :meth:`WeightGradStore.register_run_hook`, used by
:func:`raymoe.fp8.deepspeed_hooks.attach_wgrad_store`.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from contextlib import contextmanager
from typing import Callable, Hashable, Iterator, Optional, Sequence

import torch
from torch.utils.hooks import RemovableHandle

__all__ = ["WeightGradStore", "WeightGradStoreError", "accumulate_grad", "accumulate_grads", "GRAD_READY_ATTR"]

# Stores with an open defer() block, innermost last. Module-level on purpose (see the module docstring).
_ACTIVE_STORES: list["WeightGradStore"] = []

# DeepSpeed's per-parameter "gradient is final, reduce it" flag (absent = True); see the module docstring.
GRAD_READY_ATTR = "ds_grad_is_ready"

_Parked = tuple[Callable[[], None], tuple[torch.Tensor, ...]]


class WeightGradStoreError(RuntimeError):
    """A store used out of order: ``W`` without its ``Bi``, a cell deferred twice, ``put`` outside ``defer``."""


class _QueueCell:
    """The cell of a ``defer()`` block opened without one (queue-style use)."""

    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n

    def __repr__(self) -> str:
        return f"<queued #{self.n}>"


class WeightGradStore:
    """Deferred weight-grad closures, grouped by the cell whose ``Bi`` made them.

    Attributes:
        deferring: whether a ``defer`` block of this store is open.
    """

    def __init__(self) -> None:
        self._pending: dict[Hashable, list[_Parked]] = {}  # insertion order = defer order
        self._open: Optional[list[_Parked]] = None
        self._seq = itertools.count()
        self._run_hooks: OrderedDict[int, Callable[[Hashable], None]] = OrderedDict()  # RemovableHandle: weakref-able

    @staticmethod
    def active() -> Optional["WeightGradStore"]:
        """The store whose ``defer`` block is open right now (innermost), if any."""
        return _ACTIVE_STORES[-1] if _ACTIVE_STORES else None

    @property
    def deferring(self) -> bool:
        return self._open is not None

    @contextmanager
    def defer(self, cell: Optional[Hashable] = None) -> Iterator[Hashable]:
        """Within this block, store-aware backwards park their weight grads under ``cell`` (yielded).

        ``cell=None`` makes a fresh queue entry (for :meth:`pop` / :meth:`flush`). The cell is recorded even when
        nothing was parked, so that its ``W`` finds it. If the block raises, what was parked so far is kept.
        """
        if self._open is not None:
            raise WeightGradStoreError("WeightGradStore.defer() blocks of one store cannot nest")
        if cell is None:
            cell = _QueueCell(next(self._seq))
        elif cell in self._pending:
            raise WeightGradStoreError(f"weight grads of cell {cell} are already pending")
        self._open = []
        _ACTIVE_STORES.append(self)
        try:
            yield cell
        finally:
            _ACTIVE_STORES.remove(self)  # normally the top; remove() also copes with blocks left out of order
            self._pending[cell], self._open = self._open, None

    def put(self, fn: Callable[[], None], params: Sequence[Optional[torch.Tensor]] = ()) -> None:
        """Park ``fn`` (computes the weight grads of ``params`` and adds them with :func:`accumulate_grads`) under the
        open block's cell. ``params`` are marked not ready for DeepSpeed until the cell's ``W`` (module docstring)."""
        if self._open is None:
            raise WeightGradStoreError("WeightGradStore.put() outside a defer() block")
        ps = tuple(p for p in params if p is not None)
        for p in ps:
            setattr(p, GRAD_READY_ATTR, False)
        self._open.append((fn, ps))

    def run(self, cell: Hashable) -> int:
        """Run and drop the closures of ``cell`` (the ``W`` op); returns how many ran."""
        if cell not in self._pending:
            raise WeightGradStoreError(f"W for cell {cell} but no deferred weight grads are pending for it")
        parked = self._pending.pop(cell)
        for fn, ps in parked:
            for p in ps:
                setattr(p, GRAD_READY_ATTR, True)
            fn()
        for hook in tuple(self._run_hooks.values()):
            hook(cell)
        return len(parked)

    def register_run_hook(self, hook: Callable[[Hashable], None]) -> RemovableHandle:
        """Call ``hook(cell)`` after the closures of each cell have run (:meth:`run`, :meth:`pop`, :meth:`flush`).

        For integrations that must finish what the end of a backward would have done once the deferred grads are in,
        e.g. DeepSpeed ZeRO-2's gradient-reduction epilogue (:func:`raymoe.fp8.deepspeed_hooks.attach_wgrad_store`).
        """
        handle = RemovableHandle(self._run_hooks)
        self._run_hooks[handle.id] = hook
        return handle

    def pop(self) -> int:
        """Run the weight grads of the oldest pending cell; returns how many closures ran."""
        if not self._pending:
            raise WeightGradStoreError("WeightGradStore.pop() on an empty store: a W op without its Bi op")
        return self.run(next(iter(self._pending)))

    def flush(self) -> int:
        """Run every pending cell, oldest first (e.g. before the optimizer step); returns how many closures ran."""
        n = 0
        while self._pending:
            n += self.pop()
        return n

    def cells(self) -> list[Hashable]:
        """Pending cells, oldest first."""
        return list(self._pending)

    def __contains__(self, cell: Hashable) -> bool:
        return cell in self._pending

    def __len__(self) -> int:
        """Number of pending cells (not closures)."""
        return len(self._pending)


def accumulate_grads(params: Sequence[Optional[torch.Tensor]], grads: Sequence[Optional[torch.Tensor]]) -> None:
    """``param.grad += grad`` for every pair, through each parameter's ``AccumulateGrad`` node (all hooks fire).

    Pairs where either side is ``None`` or the parameter does not require grad are skipped. Parameters must be
    leaves of the same shape as their grad; a grad of another dtype or device is converted to the parameter's (as
    autograd does for a gradient returned by a backward). Runs one ``torch.autograd.backward`` over all pairs, which
    does not record a graph (``create_graph=False``) and works the same inside ``torch.no_grad()``; the resulting
    ``.grad`` equals ``old + grad`` (``grad`` itself, or a copy, when there was none).
    """
    ps: list[torch.Tensor] = []
    gs: list[torch.Tensor] = []
    for p, g in zip(params, grads, strict=True):
        if p is None or g is None or not p.requires_grad:
            continue
        if not p.is_leaf:
            raise ValueError("accumulate_grad needs a leaf tensor (a parameter); backward through a non-leaf would "
                             "propagate into its graph")
        if g.shape != p.shape:
            raise ValueError(f"gradient of shape {tuple(g.shape)} for a parameter of shape {tuple(p.shape)}")
        ps.append(p)
        gs.append(g.detach().to(dtype=p.dtype, device=p.device))
    if ps:
        torch.autograd.backward(ps, gs)


def accumulate_grad(param: torch.Tensor, grad: Optional[torch.Tensor]) -> None:
    """``param.grad += grad`` through autograd, so that every gradient hook of ``param`` fires (see
    :func:`accumulate_grads`)."""
    accumulate_grads([param], [grad])
