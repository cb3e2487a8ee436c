"""Redundant experts of an engine replica: build the expert backend and whatever drives its shard count.

Two placements of the shards (``experts.backend``):

* ``replicated``: in-process :class:`raymoe.engine.SlotShard` objects of a :class:`raymoe.engine.ReplicatedExperts`
  backend inside the ``EngineDeployment`` replica. :class:`raymoe.engine.redundancy.RedundancyPolicy` runs in the
  replica (every ``decide_every_steps`` engine steps, default 50) and decides the number of shards
  (``experts.min_shards .. experts.max_shards``) from measured balance and throughput; each decision re-plans and
  copies weights between two engine steps (the pause is measured and logged).
* ``remote``: the shards are replicas of the ``ExpertShards`` Serve deployment
  (:mod:`raymoe.actors.serve.expert_shards`), reached over gloo pairs; Serve's autoscaler runs the same
  ``RedundancyPolicy`` over the replicas' reported load and sets the replica count, and this replica follows the
  registry's member list (:class:`raymoe.actors.serve.expert_shards.ExpertMembership`), re-planning at step
  boundaries when shards join or leave. With ``experts.remote.expert_weights: checkpoint`` (default) the shards
  read their experts from the checkpoint and this replica's model holds no routed expert
  (:class:`raymoe.model.moe.AbsentExperts`): it needs at least one shard to serve, waits up to
  ``experts.remote.wait_s`` for one at start (else fails to start) and whenever every shard is gone.

``experts`` args of the app (``conf/serve.yaml`` ``experts:``): :class:`raymoe.engine.placement.ExpertsConfig`
fields; ``policy`` holds :class:`raymoe.engine.redundancy.PolicyConfig` fields (``min_shards``/``max_shards``
default to ``experts.min_shards``/``max_shards``, else ``num_shards``); ``remote`` holds
:class:`raymoe.actors.serve.expert_shards.RemoteShardsConfig` fields. With ``metrics_dir`` set, serving metrics
(``serving/*``) go to ``<metrics_dir>/replica-<pid>/metrics.jsonl`` through :class:`raymoe.metrics.MetricsLogger`
(no wandb: ``kind=none``), rendered by ``dashboards/render_local.py``.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

__all__ = ["ExpertServing"]

log = logging.getLogger(__name__)


class ExpertServing:
    """Owns the replicated backend, the controller and the metrics sink of one engine replica."""

    def __init__(self, model_path: str, experts: Optional[dict[str, Any]], app_name: Optional[str] = None) -> None:
        from raymoe.engine import ExpertsConfig, ReplicatedExperts
        from raymoe.engine.redundancy import PolicyConfig, RedundancyController, RedundancyPolicy

        d = dict(experts or {})
        decide_every = int(d.pop("decide_every_steps", 50))
        remote = d.pop("remote", None)
        self.config = ExpertsConfig.from_dict(d)
        self.backend: Optional[ReplicatedExperts] = None
        self.controller: Optional[RedundancyController] = None
        self.membership = None
        self.logger = None
        if self.config.backend == "local":
            return
        c = self.config
        if c.backend == "remote":  # shards are ExpertShards replicas; Serve's autoscaler sets their number
            from raymoe.actors.serve.expert_shards import ExpertMembership, RemoteShardsConfig

            rc = RemoteShardsConfig.from_dict(remote)
            # the engine's end of each gloo pair binds the same explicit host as the shards, else this node's IP
            self.membership = ExpertMembership(app_name or "default", local_host=rc.host,
                                               op_timeout_s=rc.op_timeout_s, member_ttl_s=rc.member_ttl_s)
            shards = self.membership.wait_for(c.num_shards, rc.wait_s)[: c.num_shards]
            decide_every = 0  # the Serve autoscaling policy decides, not the replica
            from_ckpt = rc.expert_weights == "checkpoint"
            if not shards and from_ckpt:
                self.membership.close()
                raise RuntimeError(f"no expert shard reachable after experts.remote.wait_s={rc.wait_s} s; this "
                                   "engine holds no routed experts (experts.remote.expert_weights=checkpoint), so it "
                                   "cannot serve without one (is the ExpertShards deployment running? `serve "
                                   "status`)")
            if shards:
                c.num_shards = len(shards)
                self.backend = ReplicatedExperts.from_config(c, model_path)
                self.backend.shard_factory = lambda i: shards[i]
            else:  # no shard reachable: in-process shards (local experts) until members join (poll re-plans)
                self.backend = ReplicatedExperts.from_config(c, model_path)
            if from_ckpt:
                self.backend.needs_expert_weights = False
                self.backend.refill = lambda: self._refill(rc.wait_s)
        else:
            self.backend = ReplicatedExperts.from_config(c, model_path)
        pol = dict(c.policy or {})
        pol.setdefault("min_shards", c.min_shards or c.num_shards)
        pol.setdefault("max_shards", c.max_shards or c.num_shards)
        if c.metrics_dir:
            from raymoe.config import LoggerConfig
            from raymoe.metrics import MetricsLogger

            self.logger = MetricsLogger(os.path.join(c.metrics_dir, f"replica-{os.getpid()}"),
                                        LoggerConfig(kind="none"), {"experts": d})
        self.controller = RedundancyController(self.backend, RedundancyPolicy(PolicyConfig.from_dict(pol)),
                                               logger=self.logger, decide_every_steps=decide_every,
                                               metrics_every_steps=c.metrics_every_steps)

    def _refill(self, wait_s: float) -> list:
        """Every shard is gone and this replica holds no experts: wait (inside the step) for live members."""
        self.membership._note_dead(self.backend)
        log.warning("every expert shard is gone; waiting up to %.0f s for one to join", wait_s)
        return self.membership.wait_for(1, wait_s)

    def after_step(self, outputs: list, generated_tokens: int) -> None:
        """After each engine step, under the replica's engine lock (a scale decision moves weights here)."""
        if self.controller is None:
            return
        if self.membership is not None:
            mev = self.membership.poll(self.backend)
            if mev is not None:
                self.controller.decisions.append(mev)
                if self.logger is not None:
                    self.controller.log_metrics(mev)
        ev = self.controller.after_step(outputs, generated_tokens)
        if ev is not None:
            log.info("expert shards %s -> %d (%s); pause %.1f ms", ev["action"], ev["num_shards"], ev["reason"],
                     1e3 * ev["pause_s"])

    def info(self) -> dict[str, Any]:
        if self.backend is None or self.backend.placement is None:
            return {"backend": self.config.backend}
        snap = self.backend.snapshot()
        return {"backend": self.config.backend, "shard_names": [getattr(x, "name", str(i))
                                                                for i, x in enumerate(self.backend.shards)],
                # remote shards: (ip, port) each listens on (its node's IP unless experts.remote.host is set)
                "shard_addresses": [list(x.address) for x in self.backend.shards if hasattr(x, "address")],
                "events": [{k: v for k, v in e.items() if isinstance(v, (int, float, str)) or v is None}
                           for e in self.backend.events], "num_shards": snap["num_shards"], "num_slots": snap["num_slots"],
                "redundant_slots": snap["redundant_slots"], "balance": snap["balance"],
                "placement_source": snap["placement_source"], "replans": snap["replans"],
                "shard_rows": snap["shard_rows"], "phy2log": snap["phy2log"], "tokens": snap["tokens"],
                "decisions": [{k: v for k, v in e.items() if isinstance(v, (int, float, str)) or v is None}
                              for e in self.controller.decisions],
                "policy_min_shards": self.controller.policy.config.min_shards,
                "policy_max_shards": self.controller.policy.config.max_shards}

    def close(self) -> None:
        if self.membership is not None:
            self.membership.close()
        if self.logger is not None:
            self.logger.finish()
            self.logger = None
