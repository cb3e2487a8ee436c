"""Cache-aware routing of requests to engine replicas: a Ray Serve custom request router (``RequestRouter``, Serve's
alpha API) around :class:`raymoe.engine.routing.PrefixAffinity`.

The router runs inside every ``DeploymentHandle`` of the engine deployment (the ingress replicas'), so its index is
per ingress replica; new prefixes go where rendezvous hashing puts them, which all routers agree on. Calls that carry
no prompt (``info``) are routed like Serve's default (two random replicas, the less loaded wins). Queue lengths come
from Serve's queue-length cache (what replicas reported on their last probe or accepted request). Serve calls
``choose_replicas`` again for a request no offered replica took; the router counts those calls on the request's
routing context and offers the other replicas only after ``spill_after`` of them (see ``PrefixAffinity``).
"""
from __future__ import annotations

import random
from typing import Any, List, Optional

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from raymoe.engine.routing import PrefixAffinity

__all__ = ["PrefixAffinityRouter", "ROUTER_PATH"]

ROUTER_PATH = "raymoe.actors.serve.router.PrefixAffinityRouter"


def _prompt(req: Optional[PendingRequest]) -> Any:
    """The prompt of an engine ``generate(prompt, params)`` call (text or token ids), else None."""
    if req is None or req.metadata.call_method != "generate":
        return None
    p = req.args[0] if req.args else req.kwargs.get("prompt")
    if isinstance(p, str) or (isinstance(p, list) and all(isinstance(t, int) for t in p)):
        return p
    return None


class PrefixAffinityRouter(RequestRouter):
    def initialize_state(self, **kwargs: Any) -> None:
        self.policy = PrefixAffinity(**kwargs)

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # every rank offered: back off before retrying
        prompt = _prompt(pending_request)
        if prompt is None or len(candidate_replicas) < 2:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        cache = self.replica_queue_len_cache
        load = {i: cache.get(r.replica_id) for i, r in by_id.items()}
        ctx = pending_request.routing_context
        attempt = getattr(ctx, "raymoe_attempts", 0)
        ctx.raymoe_attempts = attempt + 1
        return [[by_id[i] for i in rank] for rank in self.policy.rank(prompt, list(by_id), load, attempt)]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        prompt = _prompt(pending_request)
        if prompt is not None:
            self.policy.record(prompt, replica_id.unique_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.policy.forget(replica_id.unique_id)
