"""MoE dispatch behind an interface: routed experts run locally, in in-process shards, or (later) in remote actors.

The engine swaps each :class:`raymoe.model.moe.MoE` of its model for a :class:`DispatchedMoE` that keeps the router
and the shared expert local and sends the routed part through an :class:`ExpertBackend`::

    x [T, D] → router → topk_idx, gates [T, K]
             → (token, slot) pairs sorted by expert: x_grouped [T·K, D], counts [E]
             → backend.run(layer_key, x_grouped, counts) → y_grouped [T·K, D]      ← local / shard / remote
             → combine Σ_k gate·y → [T, D]  (+ shared expert)

``layer_key`` names the layer (``"layers.3"``, ``"mtp.0"``). The grouping and combine are the same ops as
``RoutedExperts.forward``, so the local backend gives the model's own results. A remote backend (expert-shard actors)
implements ``run`` by splitting ``x_grouped`` by ``counts`` per shard and calling each shard's ``forward_grouped``
(exactly what :class:`ShardedExperts` does in process).

:class:`ReplicatedExperts` serves with redundant experts: every MoE layer's routed experts live in physical slots
per a :class:`raymoe.engine.placement.Placement` (EPLB plan), grouped into shards (:class:`SlotShard`, the unit an
expert actor / GPU would hold); each logical expert's rows are split evenly over its replicas, each shard runs its
slots as one grouped GEMM, outputs go back to the rows' original order. A :class:`LoadRecorder` counts rows per
logical expert and per slot over a sliding window, and the backend re-plans (and copies weights into the new slots)
every ``replan_every_tokens`` tokens, always at the start of a forward, so no step sees a half-moved layer.
"""
from __future__ import annotations

import collections
import time
from typing import Any, Callable, Optional, Protocol

import torch
from torch import nn

from raymoe.engine.remote import ShardUnavailable
from raymoe.model.moe import AbsentExperts, MoE, RouteResult, RoutedExperts

__all__ = ["ExpertBackend", "LocalExperts", "ShardedExperts", "ReplicatedExperts", "SlotShard", "LoadRecorder",
           "DispatchedMoE", "install_expert_backend", "param_summary"]


class ExpertBackend(Protocol):
    def run(self, layer_key: str, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Tokens grouped by expert (``counts_E[e]`` rows for expert e, in expert order) → unweighted outputs."""
        ...


class LocalExperts:
    """The layer's own :class:`RoutedExperts` (default)."""

    def __init__(self) -> None:
        self.experts: dict[str, RoutedExperts] = {}

    def register(self, layer_key: str, experts: RoutedExperts) -> None:
        self.experts[layer_key] = experts

    def run(self, layer_key: str, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        return self.experts[layer_key].forward_grouped(x_ND, counts_E)

    def run_routed(self, layer_key: str, x_TD: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor,
                   counts_E: torch.Tensor) -> Optional[torch.Tensor]:
        """Optional fast path of a backend: the weighted sum of every token's experts ``[T, D]`` in one call
        (:meth:`RoutedExperts.forward_routed_native`), or None: the caller dispatches and calls :meth:`run`."""
        return self.experts[layer_key].forward_routed_native(x_TD, topk_idx, topk_weight, counts_E)

    def native_weights(self, layer_key: str) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """Optional for a backend: the layer's routed expert weights as the CPU kernels read them
        (:meth:`RoutedExperts.native_weights`), for :class:`DispatchedMoE`'s one-call layer; None: not available."""
        return self.experts[layer_key].native_weights()


class ShardedExperts:
    """Experts split into ``num_shards`` contiguous shards (``RoutedExperts.shard``), each run on its own rows: the
    in-process model of expert-parallel actors (a remote backend does the same with actor calls)."""

    def __init__(self, num_shards: int) -> None:
        self.num_shards = num_shards
        self.shards: dict[str, list[tuple[list[int], RoutedExperts]]] = {}
        self.calls = 0

    def register(self, layer_key: str, experts: RoutedExperts) -> None:
        E = experts.num_experts
        bounds = [round(i * E / self.num_shards) for i in range(self.num_shards + 1)]
        self.shards[layer_key] = [
            (list(range(a, b)), experts.shard(list(range(a, b)))) for a, b in zip(bounds, bounds[1:]) if b > a
        ]

    def run(self, layer_key: str, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        outs, row = [], 0
        for ids, shard in self.shards[layer_key]:
            c = counts_E[ids[0] : ids[-1] + 1]
            n = int(c.sum())
            outs.append(shard.forward_grouped(x_ND[row : row + n], c) if n else x_ND[row:row])
            row += n
            self.calls += 1
        return torch.cat(outs)


class SlotShard:
    """One shard's physical slots for every MoE layer: ``{layer_key: RoutedExperts [S]}`` (slot j holds a copy of
    logical expert ``slot_experts[layer_key][j]``; a logical expert may sit in several slots). ``run`` is
    ``ExpertShard.shard``'s contract: rows grouped by local slot, ``counts [S]`` → outputs."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.layers: dict[str, RoutedExperts] = {}
        self.slot_experts: dict[str, list[int]] = {}

    def load(self, layer_key: str, source: RoutedExperts, experts: list[int]) -> int:
        """(Re)fill the layer's slots with copies of ``source``'s ``experts``; returns the number of slots whose
        weights changed (copied in place when the slot count is unchanged)."""
        if isinstance(source, AbsentExperts):
            raise RuntimeError(f"{layer_key}: in-process expert shards need the routed-expert weights, and this "
                               "engine holds none (its experts live in remote shards that read the checkpoint)")
        cur = self.layers.get(layer_key)
        if cur is None or cur.num_experts != len(experts):
            self.layers[layer_key] = source.shard(experts)
            self.slot_experts[layer_key] = list(experts)
            return len(experts)
        moved = 0
        with torch.no_grad():
            for j, e in enumerate(experts):
                if self.slot_experts[layer_key][j] != e:
                    for name in ("gate_proj", "up_proj", "down_proj"):
                        getattr(cur, name)[j].copy_(getattr(source, name)[e])
                    moved += 1
        cur.expert_ids = [source.expert_ids[e] for e in experts]
        self.slot_experts[layer_key] = list(experts)
        return moved

    def run(self, layer_key: str, x_ND: torch.Tensor, counts_S: torch.Tensor) -> torch.Tensor:
        return self.layers[layer_key].forward_grouped(x_ND, counts_S)

    def submit(self, layer_key: str, x_ND: torch.Tensor, counts_S: torch.Tensor):
        """Run now; return a callable yielding the output (the contract remote shards implement asynchronously)."""
        y = self.run(layer_key, x_ND, counts_S)
        return lambda: y


class LoadRecorder:
    """Rows per logical expert ``[L, E]`` and per physical slot ``[L, R]``, over a sliding window of recent
    forwards (at most ``window_tokens`` tokens, counted at the first MoE layer). Slot counts restart when the
    placement changes (slot meanings change); logical counts do not depend on the placement and are kept."""

    def __init__(self, num_layers: int, num_experts: int, num_slots: int, window_tokens: int = 4096) -> None:
        self.L, self.E = num_layers, num_experts
        self.window_tokens = window_tokens
        self.chunks: collections.deque = collections.deque()  # (tokens, logical [L, E])
        self.cur = torch.zeros(num_layers, num_experts, dtype=torch.int64)
        self.cur_tokens = 0
        self.total_tokens = 0
        self.tokens_since_reset = 0
        self.reset_slots(num_slots)

    def reset_slots(self, num_slots: int) -> None:
        self.slot = torch.zeros(self.L, num_slots, dtype=torch.int64)
        self.slot_tokens = 0

    def start_forward(self, tokens: int) -> None:
        """A new forward begins with ``tokens`` tokens: close the previous forward's chunk."""
        if self.cur_tokens:
            self.chunks.append((self.cur_tokens, self.cur))
            self.cur = torch.zeros_like(self.cur)
            while len(self.chunks) > 1 and sum(t for t, _ in self.chunks) - self.chunks[0][0] >= self.window_tokens:
                self.chunks.popleft()
        self.cur_tokens = tokens
        self.total_tokens += tokens
        self.tokens_since_reset += tokens
        self.slot_tokens += tokens

    def record(self, li: int, counts_E: torch.Tensor, slot_counts_R: torch.Tensor) -> None:
        self.cur[li] += counts_E.to("cpu", torch.int64)
        self.slot[li] += slot_counts_R.to("cpu", torch.int64)

    def window_load(self) -> torch.Tensor:
        """``[L, E]`` int64 rows per logical expert over the window (the current forward included)."""
        out = self.cur.clone()
        for _, c in self.chunks:
            out += c
        return out

    def window_tokens_seen(self) -> int:
        return self.cur_tokens + sum(t for t, _ in self.chunks)


class ReplicatedExperts:
    """Expert backend with redundant experts (module docstring). Build it, hand it to the engine
    (``LLMEngine(..., expert_backend=...)``): :func:`install_expert_backend` registers each layer's experts and
    calls :meth:`configure_model`, which builds the shards from ``placement`` (default: trivial).

    Args:
        placement: the initial :class:`~raymoe.engine.placement.Placement` (its ``layer_keys`` must be the
            model's MoE layers in :func:`install_expert_backend` order), or None for trivial with ``num_slots``
            slots over ``num_shards`` shards.
        replan_every_tokens: re-plan from the recorder's window every so many tokens (0: never automatically).
        num_groups / num_nodes: EPLB topology for re-plans (``None`` groups: the router's ``n_group``).
        shard_factory: ``index -> shard`` for shards the backend creates itself (default in-process
            :class:`SlotShard`); shards that come and go from outside (remote expert-shard replicas) are handed in
            with :meth:`replace_shards`.

    Shards are anything with ``load(layer_key, source, experts) -> moved`` and ``submit(layer_key, x, counts) ->
    (() -> y)`` (``SlotShard``, :class:`raymoe.engine.remote.RemoteShard`). ``run`` submits to every shard with
    rows before waiting on any, so remote shards compute in parallel. A shard that fails
    (:class:`raymoe.engine.remote.ShardUnavailable`) is dropped: the backend re-plans over the remaining shards
    (the engine keeps the source weights, so any shard's slots can be rebuilt elsewhere) and re-runs the layer;
    with no shard left it runs the layer on the source experts in process. No request fails either way.

    Without source weights (``needs_expert_weights = False``: the engine's MoE layers hold
    :class:`~raymoe.model.moe.AbsentExperts`, and remote shards read their rows from the checkpoint on ``load``),
    a re-plan after a lost shard makes the survivors read the lost slots' experts from the checkpoint; with no shard
    left the backend calls ``refill()`` (blocks until shards are available, returns them) instead of running in
    process, and fails the layer only when that returns none.
    """

    def __init__(self, placement: Any = None, *, num_shards: int = 4, num_slots: Optional[int] = None,
                 replan_every_tokens: int = 0, window_tokens: int = 4096, num_groups: Optional[int] = None,
                 num_nodes: int = 1, shard_factory: Optional[Callable[[int], Any]] = None) -> None:
        self.placement = placement
        self.shard_factory = shard_factory or SlotShard
        self._num_shards = placement.num_shards if placement is not None else num_shards
        self._num_slots = placement.num_slots if placement is not None else num_slots
        self.replan_every_tokens = replan_every_tokens
        self.window_tokens = window_tokens
        self.num_groups, self.num_nodes = num_groups, num_nodes
        self.sources: dict[str, RoutedExperts] = {}
        self.shards: list[SlotShard] = []
        self.recorder: Optional[LoadRecorder] = None
        self.top_k = 1
        self.calls = 0
        self.events: list[dict[str, Any]] = []  # re-plans / resizes: kind, time, pause_s, moved slots, balance
        self._maps: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._pending_replan = False
        self._base_slots_per_shard: Optional[int] = None
        self.prior_load: Optional[torch.Tensor] = None  # training's load: what re-plans use before any traffic
        self._config: Any = None
        self._model_dir: Any = None
        # False: the engine loads its model without routed experts (LLMEngine.from_pretrained reads this)
        self.needs_expert_weights = True
        self.refill: Optional[Callable[[], list]] = None  # no shard left and no source weights: wait for shards

    @classmethod
    def from_config(cls, cfg: Any, model_dir: Any = None) -> "ReplicatedExperts":
        """From an :class:`~raymoe.engine.placement.ExpertsConfig`: the initial placement is planned when the model
        is installed (:func:`~raymoe.engine.placement.initial_placement`: ``cfg.load_file``, else
        ``<model_dir>/expert_load.safetensors``, else trivial)."""
        self = cls(None, num_shards=cfg.num_shards, replan_every_tokens=cfg.replan_every_tokens,
                   window_tokens=cfg.window_tokens, num_groups=cfg.num_groups, num_nodes=cfg.num_nodes)
        self._config, self._model_dir = cfg, model_dir
        return self

    # ------------------------------------------------------------------ setup
    def register(self, layer_key: str, experts: RoutedExperts) -> None:
        self.sources[layer_key] = experts

    def configure_model(self, model: nn.Module) -> None:
        cfg = model.config
        self.top_k = int(cfg.num_experts_per_tok)
        if self.num_groups is None:
            self.num_groups = int(getattr(cfg, "n_group", 1) or 1)
        keys = list(self.sources)
        E = next(iter(self.sources.values())).num_experts
        if self.placement is None and self._config is not None:
            from raymoe.engine.placement import initial_placement

            self.placement, self.prior_load = initial_placement(keys, E, self._config, self._model_dir,
                                                                self.num_groups)
        if self.placement is None:
            from raymoe.engine.placement import Placement

            self.placement = Placement.trivial(keys, E, self._num_slots or E, self._num_shards)
        if list(self.placement.layer_keys) != keys or self.placement.num_experts != E:
            raise ValueError(f"placement covers layers {self.placement.layer_keys} with "
                             f"{self.placement.num_experts} experts; the model has {keys} with {E}")
        self.recorder = LoadRecorder(len(keys), E, self.placement.num_slots, self.window_tokens)
        self._apply(self.placement)

    @property
    def layer_keys(self) -> list[str]:
        return list(self.placement.layer_keys) if self.placement is not None else list(self.sources)

    @property
    def num_shards(self) -> int:
        return self.placement.num_shards

    def _apply(self, placement: Any) -> int:
        """Load the placement's slots into the shards (in place where possible); returns slots moved."""
        S = placement.slots_per_shard
        while len(self.shards) < placement.num_shards:
            self.shards.append(self.shard_factory(len(self.shards)))
        for gone in self.shards[placement.num_shards:]:
            _close(gone)
        del self.shards[placement.num_shards:]
        moved = 0
        for li, key in enumerate(placement.layer_keys):
            p2l = placement.phy2log[li]
            for s, shard in enumerate(self.shards):
                moved += shard.load(key, self.sources[key], p2l[s * S : (s + 1) * S].tolist())
            rank = torch.zeros_like(p2l)
            seen: dict[int, int] = {}
            for p, e in enumerate(p2l.tolist()):
                rank[p] = seen.get(e, 0)
                seen[e] = seen.get(e, 0) + 1
            self._maps[key] = (p2l.clone(), rank, placement.logcnt[li].clone())
        self.placement = placement
        if self.recorder is not None:
            self.recorder.reset_slots(placement.num_slots)
        return moved

    # ------------------------------------------------------------------ placement changes
    def _plan(self, num_shards: int, num_slots: int, load: Optional[torch.Tensor]) -> Any:
        from raymoe.engine.placement import Placement

        keys, E = self.layer_keys, self.placement.num_experts
        if load is None or float(load.sum()) <= 0:
            return Placement.trivial(keys, E, num_slots, num_shards)
        return Placement.from_load(keys, load, num_slots, num_shards, self.num_groups or 1, self.num_nodes,
                                   source="replan")

    def set_placement(self, placement: Any, kind: str = "set") -> dict[str, Any]:
        """Switch to ``placement`` now (call between forwards); returns the event record (pause, moved slots)."""
        t0 = time.perf_counter()
        moved = self._apply(placement)
        ev = {"kind": kind, "time": time.time(), "pause_s": time.perf_counter() - t0, "moved_slots": moved,
              "num_shards": placement.num_shards, "num_slots": placement.num_slots,
              "redundant_slots": placement.redundant_slots}
        self.events.append(ev)
        return ev

    def replan(self, num_shards: Optional[int] = None, kind: str = "replan") -> dict[str, Any]:
        """Plan from the recorder's window (``num_shards`` shards of the configured slot capacity; default: the
        current count) and move the weights. The returned event's ``pause_s`` covers planning + moving.

        A shard keeps the slot count it was configured with, except that ``num_shards`` shards must hold every
        logical expert at least once: after losing shards, each remaining one grows to ``ceil(E / n)`` slots."""
        t0 = time.perf_counter()
        n = num_shards or self.num_shards
        if self._base_slots_per_shard is None:
            self._base_slots_per_shard = self.placement.slots_per_shard
        E = self.placement.num_experts
        slots = n * max(self._base_slots_per_shard, -(-E // n))
        load = self.recorder.window_load() if self.recorder is not None else None
        if (load is None or int(load.sum()) == 0) and self.prior_load is not None:
            load = self.prior_load
        before = float(self.placement.balance(load).mean()) if load is not None and load.sum() > 0 else None
        pl = self._plan(n, slots, load)
        ev = self.set_placement(pl, kind)
        ev["pause_s"] = time.perf_counter() - t0
        ev["planned_balance_before"] = before
        ev["planned_balance_after"] = float(pl.balance(load).mean()) if before is not None else None
        if self.recorder is not None:
            self.recorder.tokens_since_reset = 0
        return ev

    def replace_shards(self, shards: list, kind: str = "membership") -> dict[str, Any]:
        """Serve from exactly ``shards`` from now on (remote replicas that joined / left): re-plan for
        ``len(shards)`` shards of the current slot capacity and load every shard's slots (new shards get all of
        theirs, kept ones only what moved). Shards no longer listed are closed. Returns the event record."""
        if not shards:
            raise ValueError("replace_shards needs at least one shard")
        keep = {id(x) for x in shards}
        for old in self.shards:
            if id(old) not in keep:
                _close(old)
        self.shards = list(shards)
        ev = self._replan_live(kind)
        return ev if ev is not None else {"kind": kind, "time": time.time(), "pause_s": 0.0, "moved_slots": 0,
                                          "num_shards": 0, "error": self.events[-1].get("error", "")}

    def _replan_live(self, kind: str, error: str = "") -> Optional[dict[str, Any]]:
        """Re-plan over the live shards: drop the ones marked dead (a ``shard_failed`` event), re-plan, and when a
        shard fails while loading its slots drop it too and plan again (kind ``shard_lost``). None when no shard is
        left (layers then run on the source experts in process)."""
        while True:
            lost = [x for x in self.shards if getattr(x, "dead", False)]
            self.shards = [x for x in self.shards if not getattr(x, "dead", False)]
            if lost:
                self.events.append({"kind": "shard_failed", "time": time.time(), "lost": len(lost),
                                    "error": error})
            if not self.shards:
                return None
            try:
                return self.replan(num_shards=len(self.shards), kind=kind)
            except ShardUnavailable as e:
                error, kind = str(e), "shard_lost"

    def request_replan(self) -> None:
        """Re-plan at the start of the next forward."""
        self._pending_replan = True

    # ------------------------------------------------------------------ data path
    def _split(self, key: str, counts_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per slot: rows it gets (``[R]``) and the row index (into the expert-grouped input) of each of its rows,
        slot-major (``[N]``). Expert e's rows are cut into ``logcnt[e]`` consecutive near-equal chunks (token
        order), chunk j to e's j-th replica."""
        p2l, rank, cnt = self._maps[key]
        counts = counts_E.to("cpu", torch.int64)
        base, extra = counts // cnt, counts % cnt
        off = torch.cumsum(counts, 0) - counts
        b, x = base[p2l], extra[p2l]
        slot_len = b + (rank < x).to(torch.int64)
        slot_start = off[p2l] + rank * b + torch.minimum(rank, x)
        n = int(slot_len.sum())
        shift = slot_start - (torch.cumsum(slot_len, 0) - slot_len)
        idx = torch.repeat_interleave(shift, slot_len) + torch.arange(n)
        return slot_len, idx

    def run(self, layer_key: str, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        li = self.placement.layer_keys.index(layer_key)
        if li == 0:  # a new forward: the only point where the placement may change
            if self._pending_replan or (self.replan_every_tokens and self.recorder.tokens_since_reset
                                        >= self.replan_every_tokens):
                self._pending_replan = False
                self._replan_live("replan")
            self.recorder.start_forward(x_ND.shape[0] // max(self.top_k, 1))
        for _ in range(len(self.shards) + 8):
            if not self.shards and not self._refill():  # every shard lost: the source experts, in process
                return self.sources[layer_key].forward_grouped(x_ND, counts_E)
            try:
                return self._run_placed(layer_key, li, x_ND, counts_E)
            except ShardUnavailable as e:  # a failed submit/wait marked its shard dead: re-plan without it
                self._replan_live("shard_lost", str(e))
        return self.sources[layer_key].forward_grouped(x_ND, counts_E)

    def _refill(self) -> bool:
        """No shard left: without source weights, take the shards ``refill()`` returns and place the slots on them
        (they read the experts from the checkpoint). Whether there are shards now."""
        if self.refill is None or not isinstance(next(iter(self.sources.values())), AbsentExperts):
            return False
        shards = list(self.refill() or [])
        if not shards:
            return False
        self.shards = shards
        self._replan_live("refill")
        return bool(self.shards)

    def _run_placed(self, layer_key: str, li: int, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        slot_len, idx = self._split(layer_key, counts_E)
        idx = idx.to(x_ND.device)
        x_P = x_ND.index_select(0, idx)
        S = self.placement.slots_per_shard
        pending, row = [], 0
        lens = slot_len.tolist()
        error: Optional[ShardUnavailable] = None
        for s, shard in enumerate(self.shards):
            n = sum(lens[s * S : (s + 1) * S])
            if n:
                try:
                    pending.append(shard.submit(layer_key, x_P[row : row + n],
                                                slot_len[s * S : (s + 1) * S].to(x_ND.device)))
                except ShardUnavailable as e:
                    error = e
                    break
                self.calls += 1
            row += n
        outs = []
        for p in pending:  # wait on every submitted shard even after a failure: each reply must be consumed
            try:           # before the connection carries the next message (the re-plan's LOAD)
                outs.append(p())
            except ShardUnavailable as e:
                error = error or e
        if error is not None:
            raise error
        self.recorder.record(li, counts_E, slot_len)
        y = torch.empty_like(x_ND)
        if outs:
            y.index_copy_(0, idx, torch.cat(outs))
        return y

    # ------------------------------------------------------------------ statistics
    def shard_rows(self) -> torch.Tensor:
        """``[L, num_shards]`` rows each shard ran since the last placement change (measured)."""
        r = self.recorder.slot
        return r.view(r.shape[0], self.num_shards, -1).sum(-1)

    def measured_balance(self) -> torch.Tensor:
        """``[L]`` max / mean of measured per-shard rows since the last placement change (1.0 if idle)."""
        rows = self.shard_rows().to(torch.float64)
        mean = rows.mean(-1)
        return torch.where(mean > 0, rows.amax(-1) / mean.clamp_min(1e-300), torch.ones_like(mean))

    def snapshot(self) -> dict[str, Any]:
        """Metrics for the serving dashboard (JSON-friendly)."""
        pl = self.placement
        bal = self.measured_balance()
        # a "shard_failed" event has no pause of its own: the last event that moved slots says how long that took
        pauses = [e["pause_s"] for e in self.events if "pause_s" in e]
        # shards serving now: after every remote shard was lost the layers run on the source experts in process
        # and the last placement (its num_shards) is kept for a shard that joins later
        return {"num_shards": len(self.shards), "num_slots": pl.num_slots, "redundant_slots": pl.redundant_slots,
                "balance": float(bal.mean()), "balance_per_layer": bal.tolist(),
                "slot_load": self.recorder.slot.tolist(), "shard_rows": self.shard_rows().sum(0).tolist(),
                "window_load": self.recorder.window_load().tolist(), "phy2log": pl.phy2log.tolist(),
                "replans": sum(1 for e in self.events if e["kind"] == "replan"),
                "last_pause_s": pauses[-1] if pauses else 0.0,
                "placement_source": pl.source, "tokens": self.recorder.total_tokens}


def _close(shard: Any) -> None:
    close = getattr(shard, "close", None)
    if close is not None:
        close()


class DispatchedMoE(nn.Module):
    """Drop-in for :class:`MoE` inside a decoder layer (same call signature and outputs, inference only)."""

    def __init__(self, moe: MoE, layer_key: str, backend: ExpertBackend) -> None:
        super().__init__()
        self.moe = moe
        self.layer_key = layer_key
        self.backend = backend

    def forward(self, x_BTD: torch.Tensor):
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)
        native = self._forward_native(x_TD)
        if native is not None and native[0] is not None:  # the whole layer in one kernel call
            y_TD, r = native
            return y_TD.view(B, T, D), r, None
        r = self.moe.router(x_TD) if native is None else native[1]
        fast = getattr(self.backend, "run_routed", None)
        y_TD = None if fast is None else fast(self.layer_key, x_TD, r.topk_idx, r.topk_weight, r.counts)
        if y_TD is None:  # else dispatch, experts and combine ran in one call (LocalExperts on the CPU kernels)
            K = r.topk_idx.shape[1]
            flat = r.topk_idx.reshape(-1)
            order = flat.argsort(stable=True)
            inv_order = torch.empty_like(order)
            inv_order[order] = torch.arange(order.numel(), device=order.device)
            counts = r.counts  # the router's bincount of topk_idx (minlength E): rows per expert in `order`
            x_ND = x_TD.index_select(0, order // K)
            y_ND = self.backend.run(self.layer_key, x_ND, counts)
            y_TKD = y_ND.index_select(0, inv_order).view(B * T, K, D)
            y_TD = torch.bmm(r.topk_weight.to(y_ND.dtype).unsqueeze(1), y_TKD).squeeze(1)
        y = y_TD.view(B, T, D)
        if self.moe.shared_experts is not None:
            y = y + self.moe.shared_experts(x_BTD)
        return y, r, None


    def _forward_native(self, x_TD: torch.Tensor) -> Optional[tuple[Optional[torch.Tensor], RouteResult]]:
        """Router, routed experts and shared expert in one :func:`raymoe.model.cpu_kernels.moe_layer` call (serving
        on the CPU kernels: a native router, a backend whose experts the kernels can read, at most ``row_limit``
        rows): ``(y, routing)``; ``(None, routing)`` when an expert got too many rows (the routing is done, the rest
        runs the grouped way); None when the call does not apply."""
        from raymoe.model import cpu_kernels
        from raymoe.model.layers import SwiGLU

        router, weights = self.moe.router, getattr(self.backend, "native_weights", None)
        if (weights is None or not router.native or torch.is_grad_enabled()
                or x_TD.shape[0] > cpu_kernels.row_limit()):
            return None
        w = weights(self.layer_key)
        gate = router.native_gate() if w is not None else None
        if gate is None:
            return None
        sh, shared = self.moe.shared_experts, None
        if sh is not None:
            shared = sh.native_weights() if type(sh) is SwiGLU else None
            if shared is None:
                return None
        out = cpu_kernels.moe_layer(x_TD, gate, router.expert_bias, router.n_group, router.topk_group, router.top_k,
                                    router.route_scale, router.norm_topk_prob, *w, shared)
        if out is None:
            return None
        y, idx, tw, scores, counts = out
        return y, RouteResult(topk_idx=idx, topk_weight=tw, scores=scores, counts=counts)


def install_expert_backend(model: nn.Module, backend: Optional[ExpertBackend] = None) -> ExpertBackend:
    """Wrap every MoE of ``model`` (main layers and MTP blocks) so its routed experts go through ``backend``
    (default :class:`LocalExperts`). Modifies ``model`` in place; returns the backend."""
    backend = backend if backend is not None else LocalExperts()
    targets = [(f"layers.{i}", layer) for i, layer in enumerate(model.layers)]
    targets += [(f"mtp.{k}", m.block) for k, m in enumerate(model.mtp)]
    for key, layer in targets:
        mlp = layer.mlp
        if isinstance(mlp, DispatchedMoE):
            mlp = mlp.moe
        if isinstance(mlp, MoE):
            register = getattr(backend, "register", None)
            if register is not None:
                register(key, mlp.experts)
            layer.mlp = DispatchedMoE(mlp, key, backend)
    configure = getattr(backend, "configure_model", None)
    if configure is not None:  # every layer is registered: backends that need the whole model set up now
        configure(model)
    return backend


def param_summary(model: nn.Module) -> dict[str, Any]:
    """What a served model's parameters weigh: ``bytes`` in all, ``routed_expert_bytes`` (parameters of
    :class:`RoutedExperts` modules: 0 when the routed experts live in remote shards that read the checkpoint),
    ``routed_expert_params`` (how many such parameters) and ``names_with_routed_experts`` (parameter names under an
    ``mlp.experts.`` module, shared experts excluded: empty then too)."""
    routed = {id(p) for m in model.modules() if isinstance(m, RoutedExperts) for p in m.parameters(recurse=False)}
    params = list(model.named_parameters())
    return {"bytes": sum(p.numel() * p.element_size() for _, p in params),
            "routed_expert_bytes": sum(p.numel() * p.element_size() for _, p in params if id(p) in routed),
            "routed_expert_params": sum(1 for _, p in params if id(p) in routed),
            "names_with_routed_experts": [n for n, _ in params if ".mlp.experts." in n or ".moe.experts." in n]}
