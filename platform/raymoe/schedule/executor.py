"""Run a schedule's op lists on real stage chunks: per-rank runners, a queue transport, deferred weight grads.

Contract for stage chunks (what ``model.stages(pp)`` must return; the lead plugs the real model in here):

* a list of ``S = schedule.num_stages`` ``nn.Module`` s, stage ``s`` mapping the activation of stage ``s-1`` to its
  own: ``chunk(x_BTD) -> y_BTD``, one tensor in, one tensor out, fixed shape for every micro-batch;
* stage 0 takes the micro-batch input as is (token ids are fine: an integer input simply gets no gradient);
* the last stage's output goes to ``loss_fn(output, target) -> scalar``; each micro-batch's loss is
  back-propagated **unscaled**, so gradients are summed over micro-batches (put any ``1/C`` into ``loss_fn``);
  the last output may be any object ``loss_fn`` understands (e.g. the model's ``ModelOutput``: ``lambda o, t: o.loss``);
* side inputs that are not pipeline activations (``input_ids``/``labels`` for the last chunk's MTP and loss, a
  routing-statistics collector) come from ``chunk_kwargs(stage, mb_id) -> dict``, passed as keyword arguments;
* stage outputs should be fresh tensors, not views of their inputs (the receiving side may free them later).

Roles:

* :class:`StageRunner` runs one rank's op list over that rank's chunks. Stage-to-stage tensors go through a
  :class:`Transport`: here the in-process :class:`QueueTransport`; for Ray stage actors a P2P transport with the
  same ``send``/``recv`` (``poll`` is only used by the sequential driver). Every (producer chunk, consumer chunk,
  kind) pair is one FIFO channel and receives must come in send order, as ordered P2P requires; our builders
  satisfy this and the queue transport asserts it.
* :class:`SequentialExecutor` owns the chunks of all ranks in one process and interleaves the runners in
  dependency order (a rank advances while the inputs of its next op are queued). Under DualPipe each stage exists
  twice; the executor deep-copies the second copy and :meth:`SequentialExecutor.reduce_mirrored_grads` sums the two
  copies' gradients, as the real system's all-reduce over the pair ``{r, PP-1-r}`` will.
* :func:`reference_step` is plain sequential training (full model, one micro-batch after another): the oracle.

Weight-grad split (ZeroBubble ``Bi``/``W``). Two ways, chosen per chunk (``split=``):

* ``"store"``: autograd functions that know the project's one :class:`~raymoe.wgrad.WeightGradStore` (our
  :class:`DeferredLinear`, the routed experts' grouped GEMM, the FP8 layers) return only the input grad while a
  store is active and park a closure computing ``dW = dY^T X`` (and ``db``); ``W`` runs the closures of that
  (micro-batch, direction, stage) cell, adding them to ``.grad`` through autograd
  (:func:`~raymoe.wgrad.accumulate_grads`) so gradient hooks fire. Parameters of other modules (norms, embeddings)
  get their grads during ``Bi`` as usual: a partial but exact split. :func:`swap_linears` converts a module's
  ``nn.Linear`` s in place.
* ``"autograd"``: works for any module. ``Bi`` computes only the stage input's gradient with
  ``torch.autograd.grad(..., retain_graph=True)``; ``W`` walks the retained graph again with
  ``backward(inputs=params)``. Exact, but ``W`` re-does the intra-stage activation grads (costs about a ``B``).
* ``"auto"`` (default): ``"store"`` when the chunk contains a :class:`DeferredLinear`, else ``"autograd"``.

The store lives in :mod:`raymoe.wgrad` (``WeightGradStore`` here is the same class); store-aware backwards find
it through a module-level stack that only :meth:`~raymoe.wgrad.WeightGradStore.defer` pushes and pops: autograd
runs CUDA backward functions on device threads, where thread-locals and context variables set by the caller are
not visible.

An ``F&B`` pair runs as its forward and then its backward, unless the runner overlaps expert all-to-alls
(``overlap=True``): then the pair's two halves run as two cooperative lanes (:func:`raymoe.experts.overlap.run_lanes`)
and each one computes while the other's all-to-all is in flight; :meth:`StageRunner.run_unit` also runs two adjacent
elementary ops of different micro-batches that way (``F F``, ``F B``, ``B F``, ``Bi`` in place of ``B``; never two
backwards, which would share the weight-grad store, and never ``W``), e.g. the ``F0 F0r`` and ``F1 B0r`` of
DualPipe's warm-up or 1F1B's steady ``F B`` alternation. Results do not change: each lane's autograd graph is its own
micro-batch's, gradients are summed in another order only where two lanes' backwards would (they never do).

Known limits (checked with the tiny DeepSeek-V3's ``model.stages(n)``, tests/unit/test_schedule_executor.py):
the routed experts' ``bmm`` reference back-end is plain autograd, so under ``"store"`` its weight grads arrive
during ``Bi`` (the default grouped-GEMM back-ends defer). A ``StageChunk`` refers to its parent model, so the
DualPipe deep copy here copies the whole model (fine in one process; actors build their own chunks). Sent outputs
are not freed early (DualPipe's ``.data`` trick).
"""
from __future__ import annotations

import copy
from collections import deque
from typing import Any, Callable, Literal, Mapping, Optional, Protocol, Sequence

import torch
import torch.nn.functional as Fn
from torch import nn

from raymoe.experts import overlap as _overlap
from raymoe.wgrad import WeightGradStore, WeightGradStoreError, accumulate_grads

from .ir import Op, OpKind, Schedule, ScheduleError
from .simulate import Deadlock
from .validate import validate

__all__ = [
    "WeightGradStore", "DeferredLinear", "swap_linears", "Transport", "QueueTransport", "StageRunner",
    "SequentialExecutor", "reference_step",
]

Cell = tuple[int, int, int]  # (mb, direction, stage) as in Op.key
Split = Literal["auto", "store", "autograd"]
ChunkKwargs = Callable[[int, int], dict]  # (stage, global micro-batch id) -> side inputs for the chunk's forward


class _DeferredLinearFn(torch.autograd.Function):
    """``y = x W^T + b`` whose weight grad can be deferred to a :class:`WeightGradStore`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.params = (weight, bias)  # the leaves whose .grad a deferred W accumulates into
        return Fn.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        w_param, b_param = ctx.params
        grad_x = grad_y.matmul(weight) if ctx.needs_input_grad[0] else None

        def weight_grads() -> tuple[torch.Tensor, Optional[torch.Tensor]]:
            g2 = grad_y.reshape(-1, grad_y.shape[-1])  # (N, out)
            gw = g2.t().matmul(x.reshape(-1, x.shape[-1]))  # (out, in)
            return gw, (g2.sum(0) if b_param is not None else None)

        store = WeightGradStore.active() if all(p is None or p.is_leaf for p in ctx.params) else None
        if store is None:
            return (grad_x, *weight_grads())

        def deferred() -> None:
            with torch.no_grad():  # W runs outside autograd's backward: do not record a graph into .grad
                accumulate_grads((w_param, b_param), weight_grads())

        store.put(deferred, ctx.params)
        return grad_x, None, None


class DeferredLinear(nn.Linear):
    """``nn.Linear`` whose weight gradient goes to the active :class:`WeightGradStore` during a ``Bi``.

    Shapes: ``x (..., in_features) -> (..., out_features)``. Outside a deferring backward it computes the same
    forward (``F.linear``) and the same gradients as ``nn.Linear``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return Fn.linear(x, self.weight, self.bias)
        return _DeferredLinearFn.apply(x, self.weight, self.bias)


def swap_linears(module: nn.Module) -> nn.Module:
    """Turn every exact ``nn.Linear`` inside ``module`` into a :class:`DeferredLinear` in place (same parameters)."""
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = DeferredLinear
    return module


# --------------------------------------------------------------------------------------------------------------------
class Transport(Protocol):
    """Stage-to-stage tensor transport; ``channel = (src, dst, kind, consumer stage, consumer direction)``."""

    def send(self, channel: tuple, mb_id: int, tensor: torch.Tensor) -> None: ...

    def recv(self, channel: tuple, mb_id: int) -> torch.Tensor: ...

    def poll(self, channel: tuple, mb_id: int) -> bool: ...


class QueueTransport:
    """In-process FIFO channels; a receive that does not match the channel's oldest message is an error."""

    def __init__(self) -> None:
        self._q: dict[tuple, deque[tuple[int, torch.Tensor]]] = {}

    def send(self, channel: tuple, mb_id: int, tensor: torch.Tensor) -> None:
        self._q.setdefault(channel, deque()).append((mb_id, tensor))

    def poll(self, channel: tuple, mb_id: int) -> bool:
        q = self._q.get(channel)
        if not q:
            return False
        if q[0][0] != mb_id:
            raise ScheduleError(f"channel {channel}: receiver wants micro-batch {mb_id} but the oldest message is "
                                f"{q[0][0]}; ordered P2P needs sends and receives in the same order")
        return True

    def recv(self, channel: tuple, mb_id: int) -> torch.Tensor:
        if not self.poll(channel, mb_id):
            raise ScheduleError(f"channel {channel}: nothing to receive for micro-batch {mb_id}")
        return self._q[channel].popleft()[1]

    def pending(self) -> int:
        return sum(len(q) for q in self._q.values())


def _uses_store(module: nn.Module) -> bool:
    return any(isinstance(m, DeferredLinear) for m in module.modules())


class StageRunner:
    """Runs rank ``rank``'s ops of ``schedule`` over its chunks.

    Args:
        schedule: the schedule.
        rank: this runner's rank.
        chunks: ``{(stage, direction): module}`` for every chunk the rank hosts.
        transport: stage-to-stage tensor transport shared by all ranks.
        loss_fn: ``loss_fn(last_stage_output, target) -> scalar``.
        split: ``"auto"``, ``"store"`` or ``"autograd"`` (module docstring).
        chunk_kwargs: optional ``(stage, mb_id) -> dict`` of side inputs for the chunk's forward.
        overlap: run ``F&B`` pairs and fusable neighbours (:meth:`run_unit`) as two cooperative lanes, so that one
            computes while the other's expert all-to-all is in flight (module docstring).
        lane_context: optional ``() -> context manager`` entered in each lane's thread (thread-local state of the
            caller, e.g. saved-tensor hooks).
    """

    def __init__(self, schedule: Schedule, rank: int, chunks: Mapping[tuple[int, int], nn.Module],
                 transport: Transport, loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
                 split: Split = "auto", chunk_kwargs: Optional[ChunkKwargs] = None, overlap: bool = False,
                 lane_context: Optional[Callable[[], Any]] = None) -> None:
        missing = set(schedule.chunks(rank)) - set(chunks)
        if missing:
            raise ScheduleError(f"rank {rank} needs chunks {sorted(missing)} (stage, direction)")
        if split not in ("auto", "store", "autograd"):
            raise ScheduleError(f"split must be 'auto', 'store' or 'autograd', got {split!r}")
        self.schedule, self.rank, self.chunks = schedule, rank, dict(chunks)
        self.transport, self.loss_fn, self.chunk_kwargs = transport, loss_fn, chunk_kwargs
        self.split = {k: ("store" if _uses_store(m) else "autograd") if split == "auto" else split
                      for k, m in self.chunks.items()}
        self.store = WeightGradStore()
        self.ops = schedule.ops(rank)
        self.pos = 0
        self._acts: dict[Cell, tuple[Optional[torch.Tensor], torch.Tensor]] = {}  # cell -> (input leaf, output)
        self._wgraph: dict[Cell, tuple[torch.Tensor, Optional[torch.Tensor]]] = {}  # autograd split: (out, grad)
        self.inputs: Mapping[int, torch.Tensor] = {}
        self.targets: Mapping[int, torch.Tensor] = {}
        self.losses: dict[int, torch.Tensor] = {}
        self.overlap, self.lane_context = overlap, lane_context

    # -- step control --------------------------------------------------------------------------------------------
    def start_step(self, inputs: Mapping[int, torch.Tensor], targets: Mapping[int, torch.Tensor]) -> None:
        """Arm a step: ``inputs``/``targets`` map global micro-batch ids to tensors (only those this rank needs)."""
        if self._acts or self._wgraph or len(self.store):
            raise ScheduleError(f"rank {self.rank}: previous step left state behind")
        self.pos, self.inputs, self.targets, self.losses = 0, inputs, targets, {}

    @property
    def done(self) -> bool:
        return self.pos >= len(self.ops)

    def _recvs(self, op: Op) -> list[tuple[tuple, int]]:
        """(channel, mb_id) of every tensor ``op`` receives."""
        s, out = self.schedule, []
        for p in op.parts:
            mb_id = s.mb_id(p)
            if p.kind is OpKind.F and (prev := s.prev_cell(p)) is not None:
                out.append(((s.rank_of(prev[2], prev[1]), self.rank, "F", p.stage, p.direction), mb_id))
            elif p.kind in (OpKind.B, OpKind.BI) and (nxt := s.next_cell(p)) is not None:
                out.append(((s.rank_of(nxt[2], nxt[1]), self.rank, "B", p.stage, p.direction), mb_id))
        return out

    def ready(self) -> bool:
        """Whether the next op's inputs are all queued (sequential driver only)."""
        return not self.done and all(self.transport.poll(ch, m) for ch, m in self._recvs(self.ops[self.pos]))

    def run_next(self) -> Op:
        op = self.ops[self.pos]
        if op.pair is not None:
            self._run_pair(op)
        else:
            self._run(op)
        self.pos += 1
        return op

    def _fusable(self, a: Op, b: Op) -> bool:
        """Whether two adjacent elementary ops may run as lanes: forwards or one ``B``/``Bi`` with a forward, of
        different micro-batches (so neither consumes what the other produces)."""
        if a.pair is not None or b.pair is not None:
            return False
        kinds = (a.kind, b.kind)
        if any(k not in (OpKind.F, OpKind.B, OpKind.BI) for k in kinds) or OpKind.F not in kinds:
            return False
        return self.schedule.mb_id(a) != self.schedule.mb_id(b)

    def run_unit(self) -> list[tuple[Op, float]]:
        """Run the next op, or with ``overlap`` the next two fusable ops together; returns ``[(op, share)]``: the ops
        run and each one's share of the unit's wall time (from the lanes' compute times; 1.0 for a single op or an
        ``F&B`` pair)."""
        op = self.ops[self.pos]
        nxt = self.ops[self.pos + 1] if self.pos + 1 < len(self.ops) else None
        if not self.overlap or nxt is None or not self._fusable(op, nxt):
            return [(self.run_next(), 1.0)]  # a pair overlaps inside run_next when self.overlap
        _, held = _overlap.run_lanes([lambda: self._run(op), lambda: self._run(nxt)], self.lane_context)
        self.pos += 2
        tot = sum(held)
        shares = [h / tot for h in held] if tot > 0 else [0.5, 0.5]
        return [(op, shares[0]), (nxt, shares[1])]

    def finish_step(self) -> dict[int, torch.Tensor]:
        if not self.done or self._acts or self._wgraph or len(self.store):
            raise ScheduleError(f"rank {self.rank}: step ended with {len(self.ops) - self.pos} ops left, "
                                f"{len(self._acts)} live activations, {len(self.store) + len(self._wgraph)} "
                                f"pending weight grads")
        return self.losses

    # -- ops -----------------------------------------------------------------------------------------------------
    def _run_pair(self, op: Op) -> None:
        f, b = op.pair  # type: ignore[misc]
        if self.overlap:
            _overlap.run_lanes([lambda: self._run(f), lambda: self._run(b)], self.lane_context)
            return
        self._run(f)
        self._run(b)

    def _recv(self, ch: tuple, m: int) -> torch.Tensor:
        with _overlap.blocking():  # a lane waiting for pipeline data hands its baton over
            return self.transport.recv(ch, m)

    def _run(self, p: Op) -> None:
        if p.kind is OpKind.F:
            self._forward(p)
        elif p.kind in (OpKind.B, OpKind.BI):
            self._backward(p, split=p.kind is OpKind.BI)
        elif p.kind is OpKind.W:
            self._weight(p)
        else:
            raise ScheduleError(f"rank {self.rank}: cannot execute {p!r}")

    def _forward(self, p: Op) -> None:
        s, mb_id, cell = self.schedule, self.schedule.mb_id(p), p.key
        if p.stage == 0:
            x = self.inputs[mb_id]
            leaf = None
        else:
            (ch, m), = self._recvs(p)
            leaf = self._recv(ch, m).detach().requires_grad_(True)
            x = leaf
        kwargs = self.chunk_kwargs(p.stage, mb_id) if self.chunk_kwargs is not None else {}
        y = self.chunks[(p.stage, p.direction)](x, **kwargs)
        if p.stage == s.num_stages - 1:
            y = self.loss_fn(y, self.targets[mb_id])
            self.losses[mb_id] = y.detach()
        else:
            nxt = s.next_cell(p)
            assert nxt is not None
            ch = (self.rank, s.rank_of(nxt[2], nxt[1]), "F", nxt[2], nxt[1])
            self.transport.send(ch, mb_id, y.detach())
        self._acts[cell] = (leaf, y)

    def _backward(self, p: Op, split: bool) -> None:
        s, mb_id, cell = self.schedule, self.schedule.mb_id(p), p.key
        leaf, y = self._acts.pop(cell)
        if p.stage == s.num_stages - 1:
            grad = None
        else:
            (ch, m), = self._recvs(p)
            grad = self._recv(ch, m)
        mode = self.split[(p.stage, p.direction)]
        with _overlap.backward_lane():
            if not split:
                torch.autograd.backward(y, grad)
            elif mode == "store":
                if cell in self.store:
                    raise ScheduleError(f"rank {self.rank}: weight grads of cell {cell} are already pending")
                with self.store.defer(cell):
                    torch.autograd.backward(y, grad)
            else:  # autograd: input grad now, parameter grads at W over the retained graph
                if leaf is not None:
                    (gx,) = torch.autograd.grad(y, (leaf,), grad, retain_graph=True)
                    leaf.grad = gx
                self._wgraph[cell] = (y, grad)
        if p.stage > 0:
            assert leaf is not None and leaf.grad is not None, f"no input grad for {p}"
            prev = s.prev_cell(p)
            assert prev is not None
            ch = (self.rank, s.rank_of(prev[2], prev[1]), "B", prev[2], prev[1])
            self.transport.send(ch, mb_id, leaf.grad)

    def _weight(self, p: Op) -> None:
        cell = p.key
        if cell in self._wgraph:
            y, grad = self._wgraph.pop(cell)
            params = [q for q in self.chunks[(p.stage, p.direction)].parameters() if q.requires_grad]
            if params:
                with _overlap.backward_lane():
                    torch.autograd.backward(y, grad, inputs=params)
        else:
            try:
                self.store.run(cell)
            except WeightGradStoreError as e:
                raise ScheduleError(f"rank {self.rank}: {e}") from e


class SequentialExecutor:
    """All ranks of ``schedule`` in one process, over the model's stage chunks.

    Args:
        schedule: a schedule (validated here unless ``check=False``).
        stages: ``schedule.num_stages`` modules, stage ``s`` at index ``s`` (see the module docstring contract).
        loss_fn: ``loss_fn(last_stage_output, target) -> scalar``.
        split: weight-grad split mode for ``Bi``/``W`` (``"auto"``, ``"store"``, ``"autograd"``).
        chunk_kwargs: optional ``(stage, mb_id) -> dict`` of side inputs for the chunks' forward.
        check: validate the schedule first.

    Attributes:
        chunks: ``{(stage, direction): module}``; under DualPipe the direction-1 copies are deep copies.
        runners: one :class:`StageRunner` per rank.
    """

    def __init__(self, schedule: Schedule, stages: Sequence[nn.Module],
                 loss_fn: Callable[[Any, torch.Tensor], torch.Tensor], split: Split = "auto",
                 chunk_kwargs: Optional[ChunkKwargs] = None, check: bool = True) -> None:
        if len(stages) != schedule.num_stages:
            raise ScheduleError(f"{schedule.name} with {schedule.num_ranks} ranks needs {schedule.num_stages} stage "
                                f"modules, got {len(stages)}")
        if check:
            validate(schedule)
        self.schedule, self.stages = schedule, list(stages)
        self.chunks: dict[tuple[int, int], nn.Module] = {}
        for (stage, d) in sorted(schedule.placement, key=lambda k: (k[1], k[0])):
            first = not any(k[0] == stage for k in self.chunks)
            self.chunks[(stage, d)] = self.stages[stage] if first else copy.deepcopy(self.stages[stage])
        self.transport = QueueTransport()
        self.runners = [
            StageRunner(schedule, r, {k: self.chunks[k] for k in schedule.chunks(r)}, self.transport, loss_fn, split,
                        chunk_kwargs)
            for r in range(schedule.num_ranks)]

    def step(self, inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """One optimizer step's forward/backward over ``C`` micro-batches.

        Args:
            inputs: ``C`` micro-batch inputs, global micro-batch order (DualPipe: first half enters at rank 0).
            targets: ``C`` targets for ``loss_fn``.

        Returns:
            ``C`` detached per-micro-batch losses. Parameter ``.grad`` s hold the summed gradients; call
            :meth:`reduce_mirrored_grads` under DualPipe.
        """
        C = self.schedule.num_microbatches
        if len(inputs) != C or len(targets) != C:
            raise ScheduleError(f"step needs {C} inputs and targets, got {len(inputs)} and {len(targets)}")
        ins, tgts = dict(enumerate(inputs)), dict(enumerate(targets))
        for r in self.runners:
            r.start_step(ins, tgts)
        while not all(r.done for r in self.runners):
            progressed = False
            for r in self.runners:
                while r.ready():
                    r.run_next()
                    progressed = True
            if not progressed:
                heads = ", ".join(f"rank {r.rank}: {r.ops[r.pos]}" for r in self.runners if not r.done)
                raise Deadlock(f"{self.schedule.name}: executor stuck, waiting at {heads}")
        losses: dict[int, torch.Tensor] = {}
        for r in self.runners:
            losses.update(r.finish_step())
        if self.transport.pending():
            raise ScheduleError(f"{self.transport.pending()} tensors were sent but never received")
        return [losses[m] for m in range(C)]

    def reduce_mirrored_grads(self) -> None:
        """Sum the gradients of every stage's copies into all copies (the DualPipe pair all-reduce)."""
        for stage, base in enumerate(self.stages):
            copies = [m for (s, _), m in self.chunks.items() if s == stage and m is not base]
            for copy_m in copies:
                for p, q in zip(base.parameters(), copy_m.parameters()):
                    if q.grad is None:
                        continue
                    p.grad = q.grad.clone() if p.grad is None else p.grad + q.grad
            for copy_m in copies:
                for p, q in zip(base.parameters(), copy_m.parameters()):
                    q.grad = None if p.grad is None else p.grad.clone()


def reference_step(stages: Sequence[nn.Module], loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
                   inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                   chunk_kwargs: Optional[ChunkKwargs] = None) -> list[torch.Tensor]:
    """Plain sequential training: each micro-batch through all stages, ``loss.backward()``; returns the losses."""
    losses = []
    for mb_id, (x, t) in enumerate(zip(inputs, targets)):
        for s, m in enumerate(stages):
            x = m(x, **(chunk_kwargs(s, mb_id) if chunk_kwargs is not None else {}))
        loss = loss_fn(x, t)
        loss.backward()
        losses.append(loss.detach())
    return losses
