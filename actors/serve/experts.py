"""Redundant experts inside the Serve engine replica: build the expert backend and the redundancy controller.

Design decision (stated plainly): the expert shards are **in-process** :class:`raymoe.engine.SlotShard` objects of a
:class:`raymoe.engine.ReplicatedExperts` backend inside each ``EngineDeployment`` replica, not a separate Serve
deployment. A Serve deployment's replicas are interchangeable (its router picks any of them), while an expert shard
holds specific slots, so a remote path needs one deployment (or one multiplexed model id) per shard plus one
``DeploymentHandle`` round trip per shard per MoE layer per step; that was not built. The redundancy therefore means
more slots / shard objects in the replica, and :class:`raymoe.engine.redundancy.RedundancyPolicy` decides their
number (``experts.min_shards .. experts.max_shards``) from measured balance and throughput; each decision re-plans
the placement and copies the weights between two engine steps (the pause is measured and logged).

``experts`` args of the app (``conf/serve.yaml`` ``experts:``): :class:`raymoe.engine.placement.ExpertsConfig`
fields; ``policy`` holds :class:`raymoe.engine.redundancy.PolicyConfig` fields (``min_shards``/``max_shards``
default to ``experts.min_shards``/``max_shards``, else ``num_shards``); ``decide_every_steps`` (default 50) is how
often the policy is consulted. With ``metrics_dir`` set, serving metrics (``serving/*``) go to
``<metrics_dir>/metrics.jsonl`` through :class:`raymoe.metrics.MetricsLogger` (no wandb: ``kind=none``), rendered by
``dashboards/render_local.py``.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

__all__ = ["ExpertServing"]

log = logging.getLogger(__name__)


class ExpertServing:
    """Owns the replicated backend, the controller and the metrics sink of one engine replica."""

    def __init__(self, model_path: str, experts: Optional[dict[str, Any]]) -> None:
        from raymoe.engine import ExpertsConfig, ReplicatedExperts
        from raymoe.engine.redundancy import PolicyConfig, RedundancyController, RedundancyPolicy

        d = dict(experts or {})
        decide_every = int(d.pop("decide_every_steps", 50))
        self.config = ExpertsConfig.from_dict(d)
        self.backend: Optional[ReplicatedExperts] = None
        self.controller: Optional[RedundancyController] = None
        self.logger = None
        if self.config.backend != "replicated":
            return
        c = self.config
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

    def after_step(self, outputs: list, generated_tokens: int) -> None:
        """After each engine step, under the replica's engine lock (a scale decision moves weights here)."""
        if self.controller is None:
            return
        ev = self.controller.after_step(outputs, generated_tokens)
        if ev is not None:
            log.info("expert shards %s -> %d (%s); pause %.1f ms", ev["action"], ev["num_shards"], ev["reason"],
                     1e3 * ev["pause_s"])

    def info(self) -> dict[str, Any]:
        if self.backend is None or self.backend.placement is None:
            return {"backend": self.config.backend}
        snap = self.backend.snapshot()
        return {"backend": "replicated", "num_shards": snap["num_shards"], "num_slots": snap["num_slots"],
                "redundant_slots": snap["redundant_slots"], "balance": snap["balance"],
                "placement_source": snap["placement_source"], "replans": snap["replans"],
                "shard_rows": snap["shard_rows"], "phy2log": snap["phy2log"], "tokens": snap["tokens"],
                "decisions": [{k: v for k, v in e.items() if isinstance(v, (int, float, str)) or v is None}
                              for e in self.controller.decisions],
                "policy_min_shards": self.controller.policy.config.min_shards,
                "policy_max_shards": self.controller.policy.config.max_shards}

    def close(self) -> None:
        if self.logger is not None:
            self.logger.finish()
            self.logger = None
