"""How many expert shards to serve with: a hysteresis policy over measured balance and throughput, and the
controller that feeds it from a running engine and applies its decisions.

:class:`RedundancyPolicy` reads one observation at a time — ``balance`` (max / mean of the rows the expert shards ran
since the last placement change, averaged over MoE layers; 1.0 = perfect), ``tokens_per_s`` (generated tokens per
second over a recent window), the tokens that balance is based on, the current shard count and the time — and
returns a :class:`Decision`:

* ``add`` (one more shard, i.e. ``slots_per_shard`` more redundant slots) when balance has been ``>= up_balance``
  for ``patience`` consecutive observations;
* ``remove`` when balance has been ``<= down_balance`` for ``patience`` observations (the shard is not needed), or
  as a **rollback** when, after an ``add``, throughput fell by more than ``rollback_drop`` of what it was before
  (the extra shard cost more than the balance gained); adds are then held off for ``rollback_hold_s``;
* ``keep`` otherwise, and always within ``cooldown_s`` of the last change, below ``min_tokens`` of evidence, or at the
  ``[min_shards, max_shards]`` bounds.

``down_balance < up_balance`` is the hysteresis band: a balance in between never changes anything, so a placement
does not flap around one threshold. The policy is pure (no clocks of its own: ``now`` is an argument), so it is
unit-testable and the same object can run in the engine replica or in a Serve autoscaling policy.

:class:`RedundancyController` wires it to a :class:`~raymoe.engine.experts.ReplicatedExperts` inside one engine
process: ``after_step(outputs)`` after each ``engine.step()`` updates throughput and TTFT/TPOT, logs serving metrics
every ``metrics_every_steps`` steps through a :class:`raymoe.metrics.MetricsLogger` (``serving/*`` keys, see
``dashboards/panels.yaml``), consults the policy every ``decide_every_steps`` steps and applies a decision with
``backend.replan(num_shards=...)`` (re-plan over the new slot count from the recorder's window + weight copies; the
event records how long the engine was paused).
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["PolicyConfig", "Decision", "RedundancyPolicy", "RedundancyController"]


@dataclass
class PolicyConfig:
    min_shards: int = 1
    max_shards: int = 8
    up_balance: float = 1.25
    down_balance: float = 1.05
    patience: int = 2
    cooldown_s: float = 30.0
    min_tokens: int = 128
    rollback_drop: float = 0.25
    rollback_hold_s: float = 300.0

    def __post_init__(self) -> None:
        if not 1 <= self.min_shards <= self.max_shards:
            raise ValueError(f"need 1 <= min_shards ({self.min_shards}) <= max_shards ({self.max_shards})")
        if not 1.0 <= self.down_balance < self.up_balance:
            raise ValueError(f"need 1 <= down_balance ({self.down_balance}) < up_balance ({self.up_balance})")
        if self.patience < 1 or self.cooldown_s < 0:
            raise ValueError("patience >= 1 and cooldown_s >= 0")

    @classmethod
    def from_dict(cls, d: Optional[dict[str, Any]]) -> "PolicyConfig":
        return options_from_dict(cls, d, "experts.policy")


def options_from_dict(cls: Any, d: Optional[dict[str, Any]], where: str) -> Any:
    """``cls(**d)`` for an options dataclass, rejecting keys it does not declare (named with ``where``)."""
    d = dict(d or {})
    unknown = set(d) - set(cls.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown {where} options {sorted(unknown)}; allowed: {sorted(cls.__dataclass_fields__)}")
    return cls(**d)


@dataclass
class Decision:
    action: str  # add | remove | keep
    target: int  # shard count after the decision
    reason: str

    @property
    def changes(self) -> bool:
        return self.action != "keep"


@dataclass
class RedundancyPolicy:
    config: PolicyConfig = field(default_factory=PolicyConfig)
    last_change: float = float("-inf")
    hold_adds_until: float = float("-inf")
    tps_before_add: Optional[float] = None
    _high: int = 0
    _low: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def decide(self, balance: float, tokens_per_s: float, num_shards: int, now: float,
               tokens: int = 1 << 30) -> Decision:
        c = self.config
        self._high = self._high + 1 if balance >= c.up_balance else 0
        self._low = self._low + 1 if balance <= c.down_balance else 0
        d = self._decide(balance, tokens_per_s, num_shards, now, tokens)
        self.history.append({"time": now, "balance": balance, "tokens_per_s": tokens_per_s, "shards": num_shards,
                             "action": d.action, "target": d.target, "reason": d.reason})
        return d

    def _decide(self, balance: float, tps: float, n: int, now: float, tokens: int) -> Decision:
        c = self.config
        if n > c.max_shards:
            return Decision("remove", c.max_shards, f"{n} shards above max_shards={c.max_shards}")
        if n < c.min_shards:
            return Decision("add", c.min_shards, f"{n} shards below min_shards={c.min_shards}")
        if now - self.last_change < c.cooldown_s:
            return Decision("keep", n, f"cooldown ({now - self.last_change:.1f} < {c.cooldown_s} s)")
        if tokens < c.min_tokens:
            return Decision("keep", n, f"too little evidence ({tokens} < {c.min_tokens} tokens)")
        if self.tps_before_add is not None and tps < (1.0 - c.rollback_drop) * self.tps_before_add and n > c.min_shards:
            return Decision("remove", n - 1, f"rollback: {tps:.1f} tok/s after the add vs {self.tps_before_add:.1f} "
                                             "before")
        if self._high >= c.patience:
            if n >= c.max_shards:
                return Decision("keep", n, f"balance {balance:.3f} high but at max_shards={c.max_shards}")
            if now < self.hold_adds_until:
                return Decision("keep", n, "adds held after a rollback")
            return Decision("add", n + 1, f"balance {balance:.3f} >= {c.up_balance} for {self._high} observations")
        if self._low >= c.patience and n > c.min_shards:
            return Decision("remove", n - 1, f"balance {balance:.3f} <= {c.down_balance} for {self._low} "
                                             "observations")
        return Decision("keep", n, f"balance {balance:.3f} within [{c.down_balance}, {c.up_balance})")

    def applied(self, decision: Decision, now: float, tokens_per_s: float) -> None:
        """Record that ``decision`` was carried out at ``now`` (starts the cooldown, resets the patience)."""
        if not decision.changes:
            return
        self.last_change = now
        self._high = self._low = 0
        if decision.action == "add":
            self.tps_before_add = tokens_per_s
        else:
            if decision.reason.startswith("rollback"):
                self.hold_adds_until = now + self.config.rollback_hold_s
            self.tps_before_add = None


class RedundancyController:
    """Runs :class:`RedundancyPolicy` against a live :class:`~raymoe.engine.experts.ReplicatedExperts` (module
    docstring). ``clock`` is injectable for tests."""

    def __init__(self, backend: Any, policy: RedundancyPolicy, *, logger: Any = None, decide_every_steps: int = 20,
                 metrics_every_steps: int = 10, tps_window_s: float = 10.0, clock=time.monotonic) -> None:
        self.backend, self.policy, self.logger = backend, policy, logger
        self.decide_every_steps, self.metrics_every_steps = decide_every_steps, metrics_every_steps
        self.tps_window_s = tps_window_s
        self.clock = clock
        self.steps = 0
        self.generated = 0
        self._tok: collections.deque = collections.deque()  # (time, cumulative generated tokens)
        self.ttft: list[float] = []
        self.tpot: list[float] = []
        self.decisions: list[dict[str, Any]] = []
        self._logged_placement = False

    def tokens_per_s(self) -> float:
        if len(self._tok) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._tok[0], self._tok[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def after_step(self, outputs: list, generated_tokens: Optional[int] = None) -> Optional[dict[str, Any]]:
        """Call after each ``engine.step()`` with its outputs (and the engine's cumulative generated-token count).
        Returns the applied event when the shard count changed."""
        now = self.clock()
        self.steps += 1
        if generated_tokens is not None:
            self.generated = int(generated_tokens)
        self._tok.append((now, self.generated))
        while len(self._tok) > 2 and now - self._tok[0][0] > self.tps_window_s:
            self._tok.popleft()
        for o in outputs:
            m = getattr(o, "metrics", {}) or {}
            if getattr(o, "finished", False) and "first_token_time" in m:
                self.ttft.append(m["first_token_time"] - m["arrival_time"])
                ntok = max(len(c.token_ids) for c in o.outputs) if o.outputs else 0
                if ntok > 1 and "finish_time" in m:
                    self.tpot.append((m["finish_time"] - m["first_token_time"]) / (ntok - 1))
        event = None
        if self.decide_every_steps and self.steps % self.decide_every_steps == 0:
            event = self.decide(now)
        if self.logger is not None and (event is not None or self.steps % max(self.metrics_every_steps, 1) == 0):
            self.log_metrics(event)
        return event

    def decide(self, now: Optional[float] = None) -> Optional[dict[str, Any]]:
        now = self.clock() if now is None else now
        b = self.backend
        bal = float(b.measured_balance().mean())
        tps = self.tokens_per_s()
        d = self.policy.decide(bal, tps, b.num_shards, now, tokens=b.recorder.slot_tokens)
        if not d.changes:
            return None
        ev = b.replan(num_shards=d.target, kind=f"scale_{'up' if d.action == 'add' else 'down'}")
        ev.update(action=d.action, reason=d.reason, balance_before=bal, tokens_per_s_before=tps)
        self.policy.applied(d, self.clock(), tps)
        self.decisions.append(ev)
        return ev

    def metrics(self) -> dict[str, Any]:
        """The ``serving/*`` record (scalars + the per-layer ``[layer][slot]`` load and placement)."""
        snap = self.backend.snapshot()
        out: dict[str, Any] = {
            "serving/balance": snap["balance"], "serving/num_shards": snap["num_shards"],
            "serving/redundant_slots": snap["redundant_slots"], "serving/tokens_per_s": self.tokens_per_s(),
            "serving/replans": snap["replans"], "serving/replan_pause_ms": 1e3 * snap["last_pause_s"],
            "serving/slot_load": snap["slot_load"], "serving/placement": snap["phy2log"],
        }
        out.update({f"serving/balance/layer_{i}": v for i, v in enumerate(snap["balance_per_layer"])})
        out.update({f"serving/shard_load/shard_{i}": v for i, v in enumerate(snap["shard_rows"])})
        if self.ttft:
            out["serving/ttft_s"] = sum(self.ttft[-64:]) / len(self.ttft[-64:])
        if self.tpot:
            out["serving/tpot_s"] = sum(self.tpot[-64:]) / len(self.tpot[-64:])
        return out

    def log_metrics(self, event: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        rec = self.metrics()
        if not self._logged_placement:  # what training handed over: its load and the initial placement
            self._logged_placement = True
            if self.backend.prior_load is not None:
                rec["serving/train_expert_load"] = self.backend.prior_load.tolist()
            rec["serving/initial_placement"] = rec["serving/placement"]
        if event is not None:
            rec["serving/scale_event_ms"] = 1e3 * event["pause_s"]
        if self.logger is not None:
            self.logger.log(rec, step=self.steps)
        return rec
