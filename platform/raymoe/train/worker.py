"""``PipelineWorker``: one rank of a (pp, ep, dp) layout — its stage chunk(s), its expert shard, its op list.

What a :class:`raymoe.actors.StageActor` wraps (the actor only adds Ray placement, the rendezvous address and error
translation), so it runs and is tested without Ray. Set-up follows :mod:`raymoe.train.parallelize` (build on meta →
apply_pp → apply_ep → materialize → apply_recompute → apply_fp8 → NativeDataParallel); the process groups come from
:mod:`raymoe.train.topology`.

One :meth:`step` per optimizer step takes a :class:`~raymoe.train.plans.StepPlan` and returns a
:class:`~raymoe.train.plans.StepResult`:

1. route with the plan's biases, set the lr, load this data rank's ``C`` micro-batches (every rank has the dataset;
   the first chunk takes the token ids, the last chunk the ids and labels for MTP and the loss);
2. run the rank's op list (:class:`raymoe.schedule.executor.StageRunner`) with activations and gradients moving by
   torch.distributed point-to-point in background threads (:class:`raymoe.train.p2p.P2PTransport`), so a rank's
   sends and prefetched receives overlap its compute; MoE layers exchange tokens with their ep group by all-to-all
   inside F/B (with ``parallel.overlap_a2a`` F&B pairs and adjacent F/B ops of different micro-batches run as two
   lanes that hide each other's all-to-all, :mod:`raymoe.experts.overlap`; ``StepResult.a2a_s`` / ``a2a_exposed_s``
   say how much was hidden); ``Bi``/``W`` split the weight gradients through the project's one deferred-gradient store;
3. one all-reduce over the world sums expert token counts (every router, MTP included), loss statistics and the
   non-finite flag; then gradients are reduced, clipped and applied (or the step is skipped everywhere).

Evaluation sends validation batches through the direction-0 chain of chunks, forward only (every data rank
evaluates the same batches: the ep group's all-to-alls need all of them).
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import time
import weakref
from typing import Any, Optional

import torch
import torch.distributed as dist

from raymoe.config import RunConfig
from raymoe.experts.overlap import METER as A2A_METER
from raymoe.malloc import keep_freed_memory
from raymoe.model.recompute import recomputing
from raymoe.model.transformer import mtp_greedy_acceptance
from raymoe.optim import GuardedAdamW, param_groups
from raymoe.schedule.executor import QueueTransport, StageRunner
from raymoe.train import parallelize as par
from raymoe.train.plans import EvalPlan, EvalResult, LossSums, OpTiming, StepPlan, StepResult
from raymoe.train.topology import Topology, build_process_groups

__all__ = ["PipelineWorker", "topology_of", "measure_matmul_peak"]

log = logging.getLogger(__name__)


def topology_of(run: RunConfig) -> Topology:
    p = run.parallel
    return Topology(p.pp, p.ep, p.dp, p.schedule, run.train.num_microbatches, run.model)


def measure_matmul_peak(dtype: torch.dtype, n: int = 1024, iters: int = 3) -> float:
    """Matmul FLOP/s of this process for ``dtype`` (the MFU denominator)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


class _ActivationMeter:
    """Bytes of tensors autograd keeps for backward (parameters excluded), live and peak, via saved-tensor hooks.

    The hooks hand autograd the very tensor they were given (no wrapper: custom autograd functions that defer
    weight gradients keep using their saved tensors after backward) and watch its lifetime with a finalizer on the
    tensor's storage, counted once per storage."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.live = self.peak = 0
        self._param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self._tracked: set[int] = set()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr in self._param_ptrs or ptr in self._tracked or st.nbytes() == 0:
            return t
        n = st.nbytes()
        self._tracked.add(ptr)
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(t, self._free, ptr, n)
        return t

    def _free(self, ptr: int, n: int) -> None:
        self._tracked.discard(ptr)
        self.live -= n

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def hooks(self) -> Any:
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)


def _tensor_bytes(tensors: Any) -> int:
    """Bytes of the distinct storages behind ``tensors`` (None and non-tensors skipped)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
    return sum(seen.values())


def _test_delay(var: str) -> None:
    """Fault tests only: sleep ``$var`` seconds (unset in real runs) to open a window for a real SIGKILL."""
    delay = float(os.environ.get(var, "0") or 0)
    if delay > 0:
        time.sleep(delay)


def _test_pause(var: str) -> None:
    """Fault tests only: hold while the file named by ``$var`` exists (unset in real runs), so a test can let a
    new node join before the run goes on, whatever the machine's load."""
    path = os.environ.get(var)
    while path and os.path.exists(path):
        time.sleep(0.1)


class _AutocastChunk(torch.nn.Module):
    """Runs a chunk's forward under bf16 autocast (fp32 master weights and grads); backward stays outside it."""

    def __init__(self, chunk: torch.nn.Module, device_type: str) -> None:
        super().__init__()
        self.chunk, self.device_type = chunk, device_type

    def forward(self, x: Any, **kw: Any) -> Any:
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.chunk(x, **kw)


class _Loopback:
    """Routes same-rank transfers (the V's turn under DualPipeV) through an in-process queue and the rest through
    the P2P transport (``None`` at pp=1, where nothing crosses ranks)."""

    def __init__(self, p2p: Any) -> None:
        self.p2p, self.local = p2p, QueueTransport()

    @property
    def blocked_s(self) -> float:
        return float(self.p2p.stats().recv_wait_s) if self.p2p is not None else 0.0

    def expect(self, recvs: list) -> None:
        if self.p2p is not None:
            self.p2p.expect([(ch, m) for ch, m in recvs if ch[0] != ch[1]])

    def expect_schedule(self, schedule: Any, pp_rank: int) -> None:
        if self.p2p is not None:
            from raymoe.train.p2p import expected_recvs

            self.expect(expected_recvs(schedule, pp_rank))

    def send(self, channel: tuple, mb_id: int, tensor: torch.Tensor) -> None:
        if channel[0] == channel[1] or self.p2p is None:
            self.local.send(channel, mb_id, tensor)
        else:
            self.p2p.send(channel, mb_id, tensor)

    def recv(self, channel: tuple, mb_id: int) -> torch.Tensor:
        if channel[0] == channel[1] or self.p2p is None:
            return self.local.recv(channel, mb_id)
        return self.p2p.recv(channel, mb_id)

    def poll(self, channel: tuple, mb_id: int) -> bool:  # pragma: no cover - sequential driver only
        return self.local.poll(channel, mb_id)

    def finish_step(self) -> None:
        if self.local.pending():
            raise RuntimeError(f"{self.local.pending()} same-rank tensors were sent but never received")
        if self.p2p is not None:
            self.p2p.finish_step()

    def close(self) -> None:
        if self.p2p is not None:
            self.p2p.close()


def _shards_to_fetch(ref: Any, model: torch.nn.Module) -> list[str]:
    """The shard files of a checkpoint in storage that ``model`` (a rank's share) reads. A file whose header cannot be
    read is fetched anyway: the download's hash check then says what is wrong with it."""
    from raymoe.storage import Storage
    from raymoe.train import sharded

    st = Storage(ref.location)
    shard_files = [f for f in ref.files if f.startswith(sharded.SHARD_PREFIX) and f.endswith(".safetensors")]
    headers, unreadable = {}, []
    for f in shard_files:
        try:
            headers[f] = sharded.read_header(lambda off, n, f=f: st.read_range(f, off, n), f"{ref.location}/{f}")
        except (sharded.IncompatibleCheckpoint, OSError) as e:
            log.warning("cannot read the header of %s/%s (%s); fetching the whole file", ref.location, f, e)
            unreadable.append(f)
    return sorted(set(sharded.needed_shards(model, headers)) | set(unreadable))


class PipelineWorker:
    """One rank of the training job (see module docstring).

    Args:
        run: the run config.
        rank: global rank (``Topology`` numbering).
        master_addr, master_port: torch.distributed rendezvous (rank 0's address).
        threads: intra-op threads for this process.
        timeout_s: bound on any collective / receive: a dead or hung peer surfaces as an error within it.
    """

    def __init__(self, run: RunConfig, rank: int, master_addr: str, master_port: int,
                 threads: Optional[int] = None, timeout_s: float = 300.0) -> None:
        keep_freed_memory()
        if threads:
            torch.set_num_threads(threads)
        self.run, self.rank, self.timeout_s = run, rank, timeout_s
        self.topo = topo = topology_of(run)
        self.coords = c = topo.coords(rank)
        backend = run.parallel.backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self._backend = backend
        self.overlap = bool(run.parallel.overlap_a2a) and topo.ep > 1
        self._connect(master_addr, master_port)

        from raymoe.data import open_datasets

        self.train_ds, self.val_ds = open_datasets(run)
        tc = run.train
        model = par.build_model(run.model, tc.seed, device="meta")  # shapes only: this rank allocates its share
        self._rows = par.router_rows(model)
        self.chunks = par.apply_pp(model, topo, rank)
        par.apply_ep(model, topo, rank, self.groups.ep if self.groups else None)
        if self.overlap:
            from raymoe.experts.parallel import set_lane_groups

            set_lane_groups(model, (self.groups.ep, self._lane_ep))
        par.materialize(model, tc.seed)
        if tc.init_from:  # pretrained weights: this rank's layers and expert rows only
            from raymoe.train.pretrained import load_pretrained

            load_pretrained(model, tc.init_from)
        par.apply_recompute(model, tc.recompute)
        self.fp8_guard = par.apply_fp8(model, run.fp8)
        split = par.apply_wgrad_split(model, topo, rank)
        self.model = model.to(self.device)
        self.routers = [(m, self._rows[n]) for n, m in model.named_modules() if n in self._rows]
        self._counts = torch.zeros(run.model.num_router_layers, run.model.n_routed_experts, dtype=torch.long)
        for r, row in self.routers:
            r.register_forward_hook(self._count_hook(row))
        adamw = dict(lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps)
        if run.parallel.zero_stage not in (0, 1):  # dp_impl=auto can land here (pp/ep > 1, or elastic dp)
            from raymoe.config import ConfigError

            raise ConfigError(f"parallel.zero_stage={run.parallel.zero_stage} with the native runtime (pp={topo.pp}, "
                              f"ep={topo.ep}, or elastic dp); allowed: 0, 1 (stage 2 is DeepSpeed's, pp = ep = 1)")
        self.dp: Any = None
        if run.parallel.zero_stage == 1 and topo.data_parallel_size > 1:  # ZeRO-1: AdamW state sharded over DP
            from raymoe.train.zero import ZeroDataParallel

            self.dp = ZeroDataParallel(model, topo, rank, self.groups, tc.grad_clip, tc.weight_decay, adamw)
            self.optimizer = self.dp.optimizer
        else:
            self.optimizer = GuardedAdamW(param_groups(model, tc.weight_decay), **adamw)
        self._grad_bytes = 0  # the gradients of the last step, before their reduction (memory_stats)
        self._mb: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._mb_out: list[tuple[float, float, float, float]] = []  # per micro-batch: loss, main, mtp, aux
        self._mtp_lambda = tc.mtp_lambda
        self._fault: Optional[str] = None
        self.autocast = run.train.dtype == "bfloat16"
        self._run_chunks = {k: _AutocastChunk(v, self.device.type) for k, v in self.chunks.items()} \
            if self.autocast else self.chunks
        self._split = split
        self.meter = _ActivationMeter(model)
        self._wire()
        # the last step this rank completed and its result: what it reports after a peer's failure (hand-off)
        self.completed_step: Optional[int] = None
        self.last_result: Optional[StepResult] = None
        self._peak = measure_matmul_peak(torch.bfloat16 if self.autocast else torch.float32)
        self.param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    def _connect(self, master_addr: str, master_port: int) -> None:
        """Join the world of ``self.topo`` as ``self.rank`` and create every process group of the layout."""
        self.world = self.topo.world_size
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group(self._backend, init_method=f"tcp://{master_addr}:{master_port}", rank=self.rank,
                                    world_size=self.world, timeout=datetime.timedelta(seconds=self.timeout_s))
        self.groups = build_process_groups(self.topo, self.rank, self.timeout_s) if self.world > 1 else None
        self._lane_ep = self._lane_ep_group(self.timeout_s) if self.overlap else None

    def _wire(self) -> None:
        """What depends on the layout around the model: gradient reduction, the P2P transport, the op-list runner."""
        topo, c, tc = self.topo, self.coords, self.run.train
        if self._zero() is None:  # ZeRO-1's data parallelism owns the optimizer; it is built once, in __init__
            self.dp = par.NativeDataParallel(self.model, topo, self.rank, self.groups, self.optimizer, tc.grad_clip)
        if topo.pp > 1:
            from raymoe.train.p2p import P2PTransport

            peers = topo.pipeline_peers(self.rank)
            self.transport: Any = _Loopback(P2PTransport(c.pp_rank, peers, self.groups.p2p,
                                                         link_group_for=self.groups.p2p_link,
                                                         timeout_s=self.timeout_s))
        else:
            self.transport = _Loopback(None)
        self.runner = StageRunner(topo.schedule, c.pp_rank, self._run_chunks, self.transport, self._loss_fn,
                                  split=self._split, chunk_kwargs=self._chunk_kwargs, overlap=self.overlap,
                                  lane_context=self.meter.hooks)

    # ------------------------------------------------------------------ hand-off (raymoe.train.handoff)
    def probe(self) -> dict[str, Any]:
        """The last step this rank completed and its result (asked after a peer failed)."""
        from raymoe.train.handoff import probe_of

        return probe_of(self.completed_step, self.last_result)

    def reform(self, run: RunConfig, rank: int, master_addr: str, master_port: int) -> None:
        """Leave the broken process group and join the new layout ``run`` as ``rank``, keeping the model and optimizer
        state (same ``pp_rank`` and ``ep_rank``; the DP index and degree may change). What a step that failed midway
        left behind (gradients, parked weight gradients, activations, transfers) is dropped: the step is redone."""
        topo = topology_of(run)
        c = topo.coords(rank)
        if (c.pp_rank, c.ep_rank) != (self.coords.pp_rank, self.coords.ep_rank) or \
                (topo.pp, topo.ep) != (self.topo.pp, self.topo.ep):
            raise ValueError(f"rank {self.rank} holds share pp{self.coords.pp_rank}/ep{self.coords.ep_rank} of "
                             f"pp={self.topo.pp} x ep={self.topo.ep}; cannot become rank {rank} of {topo}")
        self.transport.close()
        if dist.is_initialized():
            dist.destroy_process_group()
        self.optimizer.zero_grad(set_to_none=True)
        self._mb, self._mb_out = {}, []
        if self.fp8_guard is not None and hasattr(self.fp8_guard, "reset"):
            self.fp8_guard.reset()
        self.run, self.rank, self.topo, self.coords = run, rank, topo, c
        self._connect(master_addr, master_port)
        from raymoe.experts.parallel import ExpertParallelExperts

        for m in self.model.modules():  # the all-to-all's group is the new one
            if isinstance(m, ExpertParallelExperts):
                m.group = self.groups.ep if self.groups is not None else None
        if self.overlap:
            from raymoe.experts.parallel import set_lane_groups

            set_lane_groups(self.model, (self.groups.ep, self._lane_ep))
        self._wire()

    def handoff(self) -> int:
        """Collective over every rank after :meth:`reform` / set-up: the rank at DP index 0 of each
        ``(pp_rank, ep_rank)`` share (a survivor) broadcasts its state (:func:`raymoe.train.handoff.rank_state`) over
        the share's ``expert_dp`` group; the others load it. Returns the bytes this rank sent or received."""
        from raymoe.train.handoff import broadcast_state, load_rank_state, rank_state

        if self.groups is None or self.groups.expert_dp is None:
            return 0
        c = self.coords
        src = self.topo.rank_of(c.pp_rank, c.ep_rank, 0)
        mine = None
        if self.rank == src:  # the step counter travels with the state: the receivers now hold the same step
            done = -1 if self.completed_step is None else self.completed_step
            mine = {**rank_state(self.model, self.optimizer), "meta/completed_step": torch.tensor(done)}
        got = broadcast_state(mine, src, self.groups.expert_dp, self.device)
        nbytes = sum(t.numel() * t.element_size() for t in got.values())
        if self.rank != src:
            done = int(got.pop("meta/completed_step"))
            load_rank_state(self.model, self.optimizer, got)
            self.completed_step, self.last_result = (None if done < 0 else done), None
            if self.fp8_guard is not None:
                from raymoe.fp8 import invalidate_weight_caches

                invalidate_weight_caches(self.model)
        return nbytes

    # ------------------------------------------------------------------ hooks and helpers
    def _lane_ep_group(self, timeout_s: float) -> Any:
        """A second ep group (same members as this rank's) for the second overlap lane; every rank creates every
        ep group's twin in the same order (``new_group`` is collective over the world)."""
        kw = {"timeout": datetime.timedelta(seconds=timeout_s)}
        mine = None
        for spec in self.topo.group_specs():
            if spec.kind == "ep" and len(spec.ranks) > 1:
                g = dist.new_group(list(spec.ranks), **kw)
                if self.rank in spec.ranks:
                    mine = g
        return mine

    def _count_hook(self, row: int) -> Any:
        def hook(_mod: Any, _inp: Any, out: Any) -> None:
            if not recomputing():  # a full-recompute block re-routes in backward: count the forward only
                self._counts[row] += out.counts.to("cpu")

        return hook

    def _chunk_kwargs(self, stage: int, mb_id: int) -> dict:
        if stage != self.topo.num_stages - 1:
            return {}
        x, y = self._mb[mb_id]
        return {"input_ids": x, "labels": y, "mtp_weight": self._mtp_lambda}

    def _loss_fn(self, out: Any, _target: Any) -> torch.Tensor:
        loss = out.loss
        if self._fault == "nan_loss":
            loss = loss * float("nan")
        self._mb_out.append((
            float(loss.detach()), float(out.main_loss.detach()),
            float(out.mtp_mean_loss.detach()) if out.mtp_losses else 0.0,  # unweighted, comparable to val
            float(out.aux_loss.detach()) if out.aux_loss is not None else 0.0))
        return loss / self.topo.num_microbatches

    def set_biases(self, biases: torch.Tensor) -> None:
        with torch.no_grad():
            for r, row in self.routers:
                r.expert_bias.copy_(biases[row].to(r.expert_bias.device, torch.float32))

    def get_biases(self) -> dict[int, torch.Tensor]:
        """``{row: bias}`` of the routers this rank holds."""
        return {row: r.expert_bias.detach().cpu().clone() for r, row in self.routers}

    def peak_flops(self) -> float:
        return self._peak

    def _autocast(self) -> Any:
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _load(self, ids: list[int], ds: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = ds.batch(ids)
        return x.to(self.device), y.to(self.device)

    def _world_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a small CPU tensor over the world (through the device under NCCL); returns a CPU tensor."""
        if self.world > 1:
            d = t.to(self.device)
            dist.all_reduce(d)
            t = d.cpu()
        return t

    # ------------------------------------------------------------------ step
    def step(self, plan: StepPlan) -> StepResult:
        _test_pause("RAYMOE_TEST_PAUSE_FILE")
        t_start = time.perf_counter()
        topo, c = self.topo, self.coords
        expected = tuple(str(o) for o in topo.schedule.ops(c.pp_rank))
        if plan.ops and tuple(plan.ops) != expected:
            raise ValueError(f"rank {self.rank}: plan ops {' '.join(plan.ops)} differ from this rank's schedule "
                             f"{' '.join(expected)}")
        if len(plan.microbatches) != topo.num_microbatches:
            raise ValueError(f"rank {self.rank}: plan has {len(plan.microbatches)} micro-batches, the schedule "
                             f"needs {topo.num_microbatches}")
        self.set_biases(plan.biases)
        self.dp.set_lr(plan.lr)
        self._mtp_lambda, self._fault = plan.mtp_lambda, plan.fault
        self.model.train()
        self._counts.zero_()
        self._mb = {i: self._load(list(ids), self.train_ds) for i, ids in enumerate(plan.microbatches)}
        self._mb_out = []
        inputs = {i: x for i, (x, _) in self._mb.items()}
        targets = {i: y for i, (_, y) in self._mb.items()}
        self.transport.expect_schedule(topo.schedule, c.pp_rank)
        blocked0 = self.transport.blocked_s
        self.runner.start_step(inputs, targets)
        timings: list[OpTiming] = []
        self.meter.live = self.meter.peak = 0
        a2a0 = A2A_METER.snapshot()
        with self.meter.hooks():
            while not self.runner.done:
                t0 = time.perf_counter() - t_start
                unit = self.runner.run_unit()
                t1 = time.perf_counter() - t_start
                for op, share in unit:  # two fused ops: the unit's span split by their compute times
                    end = t1 if op is unit[-1][0] else t0 + share * (t1 - t0)
                    timings.append(OpTiming(str(op), t0, end))
                    t0 = end
        a2a = A2A_METER.snapshot().minus(a2a0)
        self.runner.finish_step()
        self.transport.finish_step()
        idle = self.transport.blocked_s - blocked0
        busy = sum(t.end - t.start for t in timings) - idle

        # one world all-reduce: counts, loss sums, non-finite flag
        sums = torch.zeros(5, dtype=torch.float64)
        for loss, main, mtp, aux in self._mb_out:
            sums += torch.tensor([loss, main, mtp, aux, 1.0], dtype=torch.float64)
        bad_layers = self.fp8_guard.problems() if self.fp8_guard is not None else []
        bad = float(bool(bad_layers) or not math.isfinite(float(sums[0])))
        packed = torch.cat([self._counts.double().flatten(), sums, torch.tensor([bad], dtype=torch.float64)])
        packed = self._world_sum(packed)
        L, E = self._counts.shape
        counts = packed[:L * E].round().long().view(L, E)
        s = packed[L * E:L * E + 5]
        skipped = bool(packed[-1] > 0)
        # every gradient is complete here and still whole (ZeRO-1 reduce-scatters it into pieces inside step)
        self._grad_bytes = _tensor_bytes(p.grad for p in self.model.parameters() if p.grad is not None)
        norm = self.dp.step(skip=skipped)
        if self.fp8_guard is not None and hasattr(self.fp8_guard, "reset"):
            self.fp8_guard.reset()
        result = StepResult(
            step=plan.step, rank=self.rank,
            losses=LossSums(float(s[0]), float(s[1]), float(s[2]), float(s[3]), int(s[4])),
            counts=counts, grad_norm=norm, skipped=skipped, nonfinite=bad_layers,
            busy_s=busy, idle_s=idle, step_s=time.perf_counter() - t_start, timings=timings,
            peak_activation_bytes=self.meter.peak, param_bytes=self.param_bytes,
            a2a_count=a2a.count, a2a_s=a2a.total_s, a2a_exposed_s=a2a.exposed_s)
        self.completed_step, self.last_result = plan.step, result
        return result

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, plan: EvalPlan) -> EvalResult:
        """Forward-only validation through the chain of chunks (direction of micro-batch 0 at every stage)."""
        topo, c, s = self.topo, self.coords, self.topo.schedule
        self.set_biases(plan.biases)
        self.model.eval()
        self._counts.zero_()
        chain = [(st, s.direction_of(0, st)) for st in range(s.num_stages)]
        mine = [(st, d) for st, d in chain if s.rank_of(st, d) == c.pp_rank]
        exp = []
        for b in range(len(plan.batches)):
            for st, d in mine:
                if st > 0 and (src := s.rank_of(st - 1, chain[st - 1][1])) != c.pp_rank:
                    exp.append(((src, c.pp_rank, "F", st, d), b))
        self.transport.expect(exp)
        main = mtp = 0.0
        n = acc = drafted = 0
        for b, ids in enumerate(plan.batches):
            x_ids, y = self._load(list(ids), self.val_ds)
            h: Any = x_ids
            for st, d in mine:
                if st > 0:
                    src = s.rank_of(st - 1, chain[st - 1][1])
                    if src != c.pp_rank:
                        h = self.transport.recv((src, c.pp_rank, "F", st, d), b)
                kw = {"input_ids": x_ids, "labels": y} if st == s.num_stages - 1 else {}
                with self._autocast():
                    h = self.chunks[(st, d)](h, **kw)
                if st < s.num_stages - 1:
                    dst = s.rank_of(st + 1, chain[st + 1][1])
                    if dst != c.pp_rank:
                        self.transport.send((c.pp_rank, dst, "F", st + 1, chain[st + 1][1]), b, h)
                else:
                    main += float(h.main_loss)
                    mtp += float(h.mtp_mean_loss) if h.mtp_losses else 0.0
                    n += 1
                    a, t = mtp_greedy_acceptance(h)
                    acc, drafted = acc + a, drafted + t
        self.transport.finish_step()
        packed = torch.cat([self._counts.double().flatten(),
                            torch.tensor([main, mtp, n, acc, drafted], dtype=torch.float64)])
        packed = self._world_sum(packed)
        D = topo.data_parallel_size  # every data rank evaluated the same batches
        L, E = self._counts.shape
        counts = (packed[:L * E] / D).round().long().view(L, E)
        main_s, mtp_s, n_s, acc_s, drafted_s = (float(v) for v in packed[L * E:])
        self.model.train()
        return EvalResult(val_loss=main_s / max(n_s, 1), val_mtp_loss=mtp_s / max(n_s, 1), counts=counts,
                          mtp_acceptance=acc_s / drafted_s if drafted_s else None)

    # ------------------------------------------------------------------ checkpoint
    def save(self, dest: str) -> dict[str, dict[str, Any]]:
        """Write this rank's shard (dp rank 0 of each (pp, ep) pair; under ZeRO-1 also every other rank, its pieces
        of the optimizer state) into a staging directory and put it under ``dest`` (a local checkpoint directory or a
        storage URI); returns ``{relpath: {sha256, bytes}}`` of what it put, for the coordinator's manifest."""
        from raymoe.storage import stage_and_put
        from raymoe.train import sharded

        _test_delay("RAYMOE_TEST_SAVE_DELAY_S")
        return stage_and_put(dest, lambda d: sharded.save_rank(self.model, self.optimizer, self.topo, self.rank, d,
                                                               zero=self._zero()))

    def load(self, ref: Any) -> None:
        """Load this rank's share of checkpoint ``ref`` (:class:`raymoe.checkpoint.CheckpointRef`): from the directory
        itself on local storage; from an object store, only the shard files this rank reads (found from their
        headers, two ranged reads per file) are downloaded into node-local scratch, each hash-checked against the
        manifest (:class:`raymoe.checkpoint.ChecksumMismatch` otherwise) before anything is loaded."""
        from raymoe import checkpoint as ckpt
        from raymoe.train import sharded

        needed = None if ref.local else _shards_to_fetch(ref, self.model)
        with ckpt.local_copy(ref, needed) as d:
            sharded.load_rank(self.model, self.optimizer, self.topo, self.rank, d, zero=self._zero())
        self.completed_step, self.last_result = None, None
        if self.fp8_guard is not None:
            from raymoe.fp8 import invalidate_weight_caches

            invalidate_weight_caches(self.model)

    def memory_stats(self) -> dict[str, int]:
        """Bytes of the tensors this rank holds (each storage counted once): ``params``, ``buffers`` (router biases,
        RoPE tables), ``grads`` (the last step's, whole, before their reduction), ``optimizer`` (every tensor of the
        AdamW state: the two moments and the per-tensor step counters; under ZeRO-1 this rank's pieces) — ``bench memory`` sets them beside the plan."""
        return {"params": _tensor_bytes(self.model.parameters()), "buffers": _tensor_bytes(self.model.buffers()),
                "grads": self._grad_bytes,
                "optimizer": _tensor_bytes(t for st in self.optimizer.state.values() for t in st.values())}

    def _zero(self) -> Any:
        """The ZeRO-1 data parallelism (its optimizer state is in pieces), or None when the state is replicated."""
        return self.dp if hasattr(self.dp, "state_ranges") else None

    def param_state(self) -> dict[str, torch.Tensor]:
        """This rank's parameters by full-model name (tests: replicas must hold identical tensors)."""
        return {n: p.detach().cpu().clone() for n, p in self.model.named_parameters()}

    def close(self) -> None:
        self.transport.close()
        if dist.is_initialized():
            dist.destroy_process_group()



