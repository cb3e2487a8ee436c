"""Expert shards as a Ray Serve deployment whose replica count Serve's autoscaler sets from expert balance.

Pieces (``experts.backend: remote``)::

    EngineDeployment replica ──gloo pair per shard (raymoe.engine.remote)──► ExpertShards replica × n
        ReplicatedExperts (placement, split, recorder)                         ShardServer: slots, grouped GEMMs
        ExpertMembership: polls the registry, connects / drops shards           registers itself, reports rows/s
                  ▲                                                                       │
                  └──────────── ExpertRegistry (named Ray actor, one per app) ◄───────────┘
    Serve controller: ExpertRedundancyPolicy(ctx) reads every replica's ``expert_rows_per_s`` (its
    ``record_autoscaling_stats``), computes balance = max / mean over replicas, runs RedundancyPolicy
    (hysteresis, cooldown, rollback) and returns the replica count → Serve starts or stops a replica.

* **Why a registry.** A Serve deployment's handle routes a call to *some* replica; an expert shard holds *specific*
  slots, so the engine must address each replica. Every ``ExpertShards`` replica starts a
  :class:`raymoe.engine.remote.ShardServer` and registers ``(replica id, host, port)`` in the app's
  :class:`ExpertRegistry`; engines read the member list and open one gloo pair per shard. The data plane never goes
  through Serve or Ray calls; the control plane is one non-blocking registry poll per engine step.
* **Scale up.** The policy returns n + 1 → Serve starts a replica → it registers → at the next step boundary the
  engine connects, re-plans the placement over n + 1 shards from its live load window (more redundant slots for hot
  experts) and sends the moved weights. The pause is measured (``ExpertMembership.events``).
* **Scale down.** Serve stops a replica and calls its ``__del__``: the replica marks itself *draining* in the
  registry and waits (up to ``drain_timeout_s``) until every engine has re-planned without it and closed its
  connection, so no in-flight step loses its shard.
* **Failure.** A killed replica breaks its gloo pairs; the engine drops it at once and re-plans over the rest
  (:class:`raymoe.engine.experts.ReplicatedExperts`), with no failed request; Serve replaces the replica and the new
  one joins as in a scale up.
* **Several engines.** Each engine replica connects to every shard; slot contents are per connection, so engines
  may run different placements (memory grows with disagreeing placements; they converge on the same load).

The registry is a detached named actor (``raymoe-experts-<app name>`` in namespace ``raymoe``) so it outlives any
single replica; ``python -m raymoe.jobs.serve`` kills it at shutdown (:func:`kill_registry`). It holds the members'
addresses and the app's data-plane secret.

**Where the data plane listens.** A shard listens on its node's IP as Ray reports it
(``ray.util.get_node_ip_address()``, i.e. the address Ray itself uses between nodes) and binds its gloo pairs there;
an engine binds its end of each pair to its own node's IP. Never ``0.0.0.0``, never what the hostname resolves to.
``experts.remote.host`` overrides both (one-machine setups: ``127.0.0.1``).

**Who may connect: the app's secret.** Every connection proves a per-app secret (32 random bytes) by an HMAC
challenge–response over its own gloo pair before the shard serves it, and the shard proves it back
(:mod:`raymoe.engine.shard_protocol`). The secret is generated with ``secrets.token_bytes(32)`` by the app's
:class:`ExpertRegistry` when the app's first replica creates it (deploy time), and every ``ExpertShards`` and
``EngineDeployment`` replica fetches it from there with one actor call at start. Why there and not elsewhere:

* not a deployment argument, an env var in ``ray_actor_options.runtime_env`` or an arg of ``build_app``: those
  are part of the Serve config / deployment config that ``serve status``, ``serve config`` and the dashboard show
  and that the controller checkpoints;
* not generated in ``build_app``: under ``serve deploy`` it runs in a throwaway build task that does not know the
  app's name, and anything it hands the replicas would be such an argument;
* the registry is already the one per-app object both sides consult, is keyed by the app name both know, lives as
  long as the app (detached; killed with it), and an actor call's return value is never printed or logged.

The trust boundary this draws: anyone who can call Ray actors in the cluster can read the secret (and could run any
code on the nodes anyway); a process that can only reach a shard's port over the network cannot be served, and an
engine never talks to a listener that cannot prove the secret. The payload is not encrypted: rows and weights cross
the network in the clear, so the network between nodes must be private.
"""
from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any, Optional

import ray
from ray import serve

__all__ = ["RemoteShardsConfig", "ExpertRegistry", "ExpertShardDeployment", "ExpertRedundancyPolicy", "ExpertMembership",
           "registry_name", "get_registry", "kill_registry", "POLICY_PATH"]

log = logging.getLogger(__name__)

REGISTRY_NAMESPACE = "raymoe"
POLICY_PATH = "raymoe.actors.serve.expert_shards:ExpertRedundancyPolicy"


@dataclass
class RemoteShardsConfig:
    """``experts.remote`` (backend ``remote``): the ``ExpertShards`` deployment. ``host``: the IP address shard
    data planes listen on and engines bind their end of the pairs to; None (default): each replica's node IP as Ray
    reports it (set ``127.0.0.1`` only where every replica runs on one machine); ``num_cpus`` / ``torch_threads`` per
    replica;
    ``wait_s``: how long an engine replica waits at start for ``experts.num_shards`` shards to register;
    ``interval_s``: Serve's ``metrics_interval_s`` for the shards and the policy's decision interval;
    ``drain_timeout_s``: how long a stopping shard waits for engines to move its slots away."""

    host: Optional[str] = None
    num_cpus: float = 1.0
    torch_threads: int = 1
    wait_s: float = 120.0
    interval_s: float = 1.0
    drain_timeout_s: float = 30.0

    @classmethod
    def from_dict(cls, d: Optional[dict[str, Any]]) -> "RemoteShardsConfig":
        from raymoe.engine.redundancy import options_from_dict

        return options_from_dict(cls, d, "experts.remote")


def registry_name(app_name: str) -> str:
    return f"raymoe-experts-{app_name}"


@ray.remote(num_cpus=0)
class ExpertRegistry:
    """Member list of one app's expert shards: ``{id: {host, port, draining, since}}`` and a version that changes
    with every update (engines re-sync only when it moved); and the app's data-plane secret (module docstring),
    generated here once and returned only by :meth:`secret`."""

    def __init__(self) -> None:
        self.members: dict[str, dict[str, Any]] = {}
        self.version = 0
        self._secret = secrets.token_bytes(32)

    def secret(self) -> bytes:
        return self._secret

    def register(self, member_id: str, host: str, port: int) -> int:
        self.members[member_id] = {"host": host, "port": int(port), "draining": False, "since": time.time()}
        self.version += 1
        return self.version

    def drain(self, member_id: str) -> int:
        if member_id in self.members:
            self.members[member_id]["draining"] = True
            self.version += 1
        return self.version

    def remove(self, member_id: str) -> int:
        if self.members.pop(member_id, None) is not None:
            self.version += 1
        return self.version

    def snapshot(self) -> tuple[int, dict[str, dict[str, Any]]]:
        return self.version, {k: dict(v) for k, v in self.members.items()}


def get_registry(app_name: str):
    return ExpertRegistry.options(name=registry_name(app_name), namespace=REGISTRY_NAMESPACE, get_if_exists=True,
                                  lifetime="detached").remote()


def kill_registry(app_name: Optional[str] = None) -> int:
    """Kill the registry actor of ``app_name`` (every app's when None, as after ``serve.shutdown()``); returns how
    many were killed."""
    names = [registry_name(app_name)] if app_name is not None else [
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
        if a.get("namespace") == REGISTRY_NAMESPACE and a["name"].startswith(registry_name(""))]
    killed = 0
    for name in names:
        try:
            ray.kill(ray.get_actor(name, namespace=REGISTRY_NAMESPACE))
            killed += 1
        except ValueError:
            pass
    return killed


@serve.deployment(name="ExpertShards")
class ExpertShardDeployment:
    """One expert shard (module docstring). Args: ``host`` the IP address its data plane listens on (None: this
    node's IP as Ray reports it), ``torch_threads`` intra-op threads, ``drain_timeout_s`` how long a stopping replica
    waits for engines to move its slots away."""

    def __init__(self, host: Optional[str] = None, torch_threads: int = 1, drain_timeout_s: float = 30.0) -> None:
        import torch

        from raymoe.engine.remote import ShardServer

        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        ctx = serve.get_replica_context()
        self.app_name = ctx.app_name
        self.member_id = ctx.replica_id.unique_id
        self.drain_timeout_s = drain_timeout_s
        host = host or ray.util.get_node_ip_address()
        self.registry = get_registry(self.app_name)
        self.server = ShardServer(host, secret=ray.get(self.registry.secret.remote()))
        ray.get(self.registry.register.remote(self.member_id, self.server.host, self.server.port))
        log.info("expert shard %s listening on %s:%d", self.member_id, host, self.server.port)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Custom metrics for :class:`ExpertRedundancyPolicy`: rows run per second (sliding window) and live engine
        connections (0: not yet part of any placement)."""
        st = self.server.stats()
        return {"expert_rows_per_s": float(st["rows_per_s"]), "expert_connections": float(st["connections"])}

    async def stats(self) -> dict[str, Any]:
        st = self.server.stats()
        import os

        return {"member_id": self.member_id, "pid": os.getpid(), "address": list(self.server.address), **st}

    async def __del__(self) -> None:
        """Graceful stop (scale down): drain, wait for the engines to close their connections, leave."""
        import asyncio

        try:
            await self.registry.drain.remote(self.member_id)
            idle = await asyncio.to_thread(self.server.wait_idle, self.drain_timeout_s)
            if not idle:
                log.warning("expert shard %s stopped with engines still connected", self.member_id)
            await self.registry.remove.remote(self.member_id)
        except Exception:  # noqa: BLE001 - the registry may already be gone at app shutdown
            pass
        self.server.close()


class ExpertRedundancyPolicy:
    """Serve custom autoscaling policy of ``ExpertShards`` (``autoscaling_config.policy.policy_function``): a
    :class:`raymoe.engine.redundancy.RedundancyPolicy` over the replicas' ``expert_rows_per_s``.

    balance = max / mean of the per-replica rates (1.0 = perfectly even), throughput = their sum. While a replica
    has no engine connection yet (just started, not yet in a placement) or reports no metrics, the policy holds the
    current target: a half-applied change is not evidence. ``policy_kwargs`` are PolicyConfig fields plus
    ``interval_s``: Serve calls the policy every control-loop tick, but the metrics only change every
    ``metrics_interval_s``, so a decision (one observation for ``patience``) is taken at most every ``interval_s``.
    """

    def __init__(self, interval_s: float = 1.0, **policy: Any) -> None:
        from raymoe.engine.redundancy import PolicyConfig, RedundancyPolicy

        self.policy = RedundancyPolicy(PolicyConfig.from_dict(policy))
        self.interval_s = float(interval_s)
        self._last_decision = float("-inf")

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        metrics = ctx.aggregated_metrics or {}
        rates = metrics.get("expert_rows_per_s", {})
        conns = metrics.get("expert_connections", {})
        n = int(ctx.current_num_replicas)
        target = int(ctx.target_num_replicas)
        vals = [float(rates[r]) for r in ctx.running_replicas if r in rates]
        state = dict(ctx.policy_state or {})
        if n == 0 or len(vals) < n or any(float(conns.get(r, 0.0)) < 1.0 for r in ctx.running_replicas) \
                or target != n:
            state["last"] = {"action": "hold", "reason": f"{len(vals)} of {n} replicas reporting / in placement"}
            return max(target, self.policy.config.min_shards), state
        mean = sum(vals) / len(vals)
        balance = max(vals) / mean if mean > 0 else 1.0
        now = float(ctx.current_time) if ctx.current_time is not None else time.time()
        if now - self._last_decision < self.interval_s:
            return target, state
        self._last_decision = now
        del self.policy.history[:-256]  # the controller runs for days: keep a bounded decision log
        rows = int(sum(vals) * 5.0)  # rows in the replicas' 5 s rate window: the evidence the decision rests on
        d = self.policy.decide(balance, sum(vals), n, now, tokens=rows)
        if d.changes:
            self.policy.applied(d, now, sum(vals))
            log.info("expert shards %d -> %d: %s", n, d.target, d.reason)
        lo, hi = int(ctx.capacity_adjusted_min_replicas), int(ctx.capacity_adjusted_max_replicas)
        state["last"] = {"action": d.action, "reason": d.reason, "balance": balance, "rows_per_s": sum(vals)}
        return min(max(d.target, lo), hi), state


class ExpertMembership:
    """Engine side: keeps a :class:`~raymoe.engine.experts.ReplicatedExperts` backend's shards equal to the
    registry's live members. :meth:`poll` is called after every engine step (under the engine lock): it never
    blocks on Ray — it collects the previous step's registry snapshot if ready and issues the next request — and
    when the member set changed it connects the new shards / drops draining ones and re-plans
    (``backend.replace_shards``), returning the event (pause, moved slots, shard count).

    Connections bind their end of the gloo pairs to ``local_host`` (None: this node's IP as Ray reports it) and
    prove the app's secret, fetched from the registry once here."""

    def __init__(self, app_name: str, connect_timeout_s: float = 30.0, local_host: Optional[str] = None) -> None:
        self.registry = get_registry(app_name)
        self.connect_timeout_s = connect_timeout_s
        self.local_host = local_host or ray.util.get_node_ip_address()
        self._secret: bytes = ray.get(self.registry.secret.remote())
        self.version = -1
        self.failed: set[str] = set()  # member ids whose connection failed (dead replicas never come back)
        self.shards: dict[str, Any] = {}  # member id -> RemoteShard
        self.events: list[dict[str, Any]] = []
        self._ref: Optional[ray.ObjectRef] = None

    def wait_for(self, count: int, timeout_s: float) -> list:
        """Block until ``count`` live members are registered (engine start-up); connect them; return the shards."""
        end = time.monotonic() + timeout_s
        while True:
            version, members = ray.get(self.registry.snapshot.remote())
            live = {k: v for k, v in members.items() if not v["draining"]}
            if len(live) >= count:
                self.version = version
                return self._connect(live)
            if time.monotonic() > end:
                raise TimeoutError(f"only {len(live)} of {count} expert shards registered after {timeout_s:.0f} s "
                                   "(is the ExpertShards deployment running? check `serve status`)")
            time.sleep(0.2)

    def _connect(self, live: dict[str, dict[str, Any]]) -> list:
        from raymoe.engine.remote import RemoteShard, ShardUnavailable

        out = []
        for mid in sorted(live):
            if mid in self.failed:
                continue
            sh = self.shards.get(mid)
            if sh is None or sh.dead:
                try:
                    sh = RemoteShard((live[mid]["host"], live[mid]["port"]), mid,
                                     connect_timeout_s=self.connect_timeout_s, secret=self._secret,
                                     local_host=self.local_host)
                except ShardUnavailable as e:
                    log.warning("expert shard %s unreachable; skipped: %s", mid, e)
                    self.failed.add(mid)
                    continue
            out.append(sh)
        self.shards = {s.name: s for s in out}
        return out

    def poll(self, backend: Any) -> Optional[dict[str, Any]]:
        for s in list(backend.shards):
            if getattr(s, "dead", False):
                self.failed.add(s.name)
        if self._ref is None:
            self._ref = self.registry.snapshot.remote()
            return None
        ready, _ = ray.wait([self._ref], timeout=0)
        if not ready:
            return None
        version, members = ray.get(self._ref)
        self._ref = self.registry.snapshot.remote()
        if version == self.version:
            return None
        self.version = version
        live = {k: v for k, v in members.items() if not v["draining"] and k not in self.failed}
        current = [s.name for s in backend.shards]
        if sorted(live) == sorted(current) or not live:
            return None
        t0 = time.perf_counter()
        shards = self._connect(live)
        if not shards or sorted(s.name for s in shards) == sorted(current):  # nothing joined (e.g. refused)
            return None
        kind = "scale_up" if len(shards) > len(current) else "scale_down" if len(shards) < len(current) \
            else "membership"
        ev = backend.replace_shards(shards, kind=kind)
        ev = dict(ev, pause_s=time.perf_counter() - t0, members=sorted(s.name for s in shards))
        self.events.append(ev)
        log.info("expert shards %d -> %d (%s); pause %.1f ms", len(current), len(shards), kind, 1e3 * ev["pause_s"])
        return ev

    def close(self) -> None:
        for s in self.shards.values():
            s.close()
        self.shards.clear()
