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
  one joins as in a scale up. A replica whose node vanished without closing its connections is dropped the same way
  once an operation waited ``experts.remote.op_timeout_s``. Every replica heartbeats its entry every
  ``experts.remote.heartbeat_s``; the registry expires an entry not renewed for ``experts.remote.member_ttl_s``, so
  a dead replica's entry goes away (engines try a listed member once, in the background: :class:`ExpertMembership`).
  With no shard reachable at all (at start, or after losing every one), the engine runs the experts in process
  (local fallback): placement never sees zero shards.
* **Several engines.** Each engine replica connects to every shard; slot contents are per connection, so engines
  may run different placements (memory grows with disagreeing placements; they converge on the same load).

**The registry's lifecycle.** One named actor per app (``raymoe-experts-<app name>`` in namespace ``raymoe``, found by
the app's name), pinned to the head node (:func:`get_registry`); detached, so it outlives any single replica and
any worker node, and restartable (``max_restarts=-1``): a registry process that dies comes back with the same
secret (its constructor argument) and an empty member list that the shards' heartbeats refill within
``heartbeat_s``. Meanwhile engines keep serving on the shards they hold (the data plane does not go through it;
a failed poll is logged and retried). ``stop_server(app)`` kills that app's registry only (:func:`kill_registry`).
It holds the members' addresses and the app's data-plane secret.

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

__all__ = ["RemoteShardsConfig", "check_resources", "ExpertRegistry", "ExpertShardDeployment",
           "ExpertRedundancyPolicy", "ExpertMembership",
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
    ``drain_timeout_s``: how long a stopping shard waits for engines to move its slots away;
    ``op_timeout_s``: how long an engine waits on one shard operation (a RUN's reply, a LOAD's ack) before it drops
    the shard as lost and re-plans. A killed shard process is noticed at once (its kernel closes the connection);
    this bounds the stall of every running request when a shard's node vanishes silently (power loss, partition).
    Too short drops a healthy but slow shard for good (the engine never reconnects a failed member);
    ``heartbeat_s`` / ``member_ttl_s``: a replica renews its registry entry every ``heartbeat_s``; the registry drops
    an entry not renewed for ``member_ttl_s`` (a replica that died without leaving);
    ``resources``: Ray custom resources each replica requires (``ray_actor_options["resources"]``), e.g.
    ``{"shard": 1}`` to put shards only on nodes started with ``--resources '{"shard": N}'`` (at most N per node),
    away from the engine replicas (``engine_resources`` of the app). Empty (default): Serve places them anywhere;
    ``expert_weights``: ``checkpoint`` (default) — every shard reads its slots' expert rows from the model's
    checkpoint itself (``model_path``: a local directory or storage URI, only those rows) and the engine replicas
    load their model **without** routed experts (attention, dense and shared-expert weights only: the
    DP-attention / EP-experts split); a dead shard's slots are read again by the survivors, and with no shard left
    the engine waits up to ``wait_s`` for one instead of running the experts itself. ``engine`` — the engine holds
    every routed expert, sends the rows to the shards, and runs the experts in process while no shard is
    reachable."""

    host: Optional[str] = None
    num_cpus: float = 1.0
    torch_threads: int = 1
    wait_s: float = 120.0
    interval_s: float = 1.0
    drain_timeout_s: float = 30.0
    op_timeout_s: float = 60.0
    resources: Optional[dict[str, float]] = None
    heartbeat_s: float = 2.0
    member_ttl_s: float = 10.0
    expert_weights: str = "checkpoint"

    def __post_init__(self) -> None:
        if self.expert_weights not in ("checkpoint", "engine"):
            raise ValueError(f"experts.remote.expert_weights={self.expert_weights!r}; allowed: checkpoint (shards "
                             "read their experts from the checkpoint, engines hold none), engine (engines hold "
                             "and send them)")
        if not self.op_timeout_s > 0:
            raise ValueError(f"experts.remote.op_timeout_s must be > 0, got {self.op_timeout_s}")
        if not 0 < self.heartbeat_s < self.member_ttl_s:
            raise ValueError(f"experts.remote needs 0 < heartbeat_s < member_ttl_s, got {self.heartbeat_s} and "
                             f"{self.member_ttl_s}")
        self.resources = check_resources(self.resources, "experts.remote.resources")

    @classmethod
    def from_dict(cls, d: Optional[dict[str, Any]]) -> "RemoteShardsConfig":
        from raymoe.engine.redundancy import options_from_dict

        return options_from_dict(cls, d, "experts.remote")


# Ray sets these through num_cpus / num_gpus / memory, and refuses them in `resources`
_RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def check_resources(d: Optional[Any], where: str) -> dict[str, float]:
    """A Ray custom-resource requirement ``{name: amount}`` (for ``ray_actor_options["resources"]``), validated here
    so a typo fails at deploy time with the setting's name, not as a replica that never schedules: names non-empty
    strings other than Ray's built-ins, amounts finite numbers >= 0 (fractions allowed; amounts above 1 must be
    whole numbers, as Ray requires)."""
    import math

    if d is None:
        return {}
    if not isinstance(d, dict) and hasattr(d, "items"):  # an OmegaConf DictConfig
        d = dict(d.items())
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be a mapping {{resource name: amount}}, got {type(d).__name__}")
    out: dict[str, float] = {}
    for k, v in d.items():
        if not isinstance(k, str) or not k:
            raise ValueError(f"{where}: resource names must be non-empty strings, got {k!r}")
        if k in _RAY_BUILTIN_RESOURCES:
            raise ValueError(f"{where}: {k!r} is a Ray built-in resource; use the num_cpus setting (or Ray's own "
                             "options) instead")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{where}.{k} must be a finite number >= 0, got {v!r}")
        if v > 1 and float(v) != int(v):
            raise ValueError(f"{where}.{k}: amounts above 1 must be whole numbers (Ray's rule), got {v}")
        out[k] = float(v)
    return out


def registry_name(app_name: str) -> str:
    return f"raymoe-experts-{app_name}"


@ray.remote(num_cpus=0)
class ExpertRegistry:
    """Member list of one app's expert shards: ``{id: {host, port, draining, since, seen}}`` and a version that
    changes with every update (engines re-sync only when it moved); and the app's data-plane secret (module
    docstring), returned only by :meth:`secret`. Members renew their entry with :meth:`heartbeat`; an entry not
    renewed for ``ttl_s`` is dropped at the next :meth:`snapshot`."""

    def __init__(self, secret: bytes, ttl_s: float = 10.0) -> None:
        self.members: dict[str, dict[str, Any]] = {}
        self.version = 0
        self._secret = secret
        self.ttl_s = float(ttl_s)
        self.expired: list[str] = []  # member ids dropped for a missed heartbeat (newest last, bounded)

    def secret(self) -> bytes:
        return self._secret

    def register(self, member_id: str, host: str, port: int) -> int:
        now = time.time()
        self.members[member_id] = {"host": host, "port": int(port), "draining": False, "since": now, "seen": now}
        self.version += 1
        return self.version

    def heartbeat(self, member_id: str, host: str, port: int, draining: bool = False) -> int:
        """Renew an entry; re-create it if missing (a restarted registry, or an entry expired while its replica was
        only slow)."""
        m = self.members.get(member_id)
        if m is None or (m["host"], m["port"]) != (host, int(port)) or m["draining"] != draining:
            self.register(member_id, host, port)
            self.members[member_id]["draining"] = bool(draining)
        else:
            m["seen"] = time.time()
        return self.version

    def _expire(self) -> None:
        now = time.time()
        gone = [k for k, v in self.members.items() if now - v["seen"] > self.ttl_s]
        for k in gone:
            del self.members[k]
            self.expired = (self.expired + [k])[-64:]
        if gone:
            self.version += 1

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
        self._expire()
        return self.version, {k: dict(v) for k, v in self.members.items()}

    def expired_members(self) -> list[str]:
        return list(self.expired)


# Ray gives the head node this resource (amount 1); Ray Train pins its own state actor the same way
HEAD_NODE_RESOURCE = "node:__internal_head__"


def get_registry(app_name: str, ttl_s: float = 10.0):
    """The app's registry actor, created by the first caller. It is pinned to the **head node** (a sliver of the
    head's ``node:__internal_head__`` resource; it needs no CPU): whichever replica calls first would otherwise host
    it on *its* node — often an ``ExpertShards`` replica's — and losing that node would take the member list and
    the secret with it (every engine's membership poll failing, no replacement shard able to register). The head
    also holds the GCS and Serve's controller, so the registry dies only with the cluster.

    Restartable (``max_restarts=-1``): Ray re-runs the constructor with the same arguments, so the secret (generated
    here by the creating caller; ignored when the actor exists) survives a restart. ``ttl_s`` applies on creation."""
    return ExpertRegistry.options(name=registry_name(app_name), namespace=REGISTRY_NAMESPACE, get_if_exists=True,
                                  lifetime="detached", max_restarts=-1, max_task_retries=3,
                                  resources={HEAD_NODE_RESOURCE: 0.001}).remote(secrets.token_bytes(32), ttl_s)


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
    waits for engines to move its slots away, ``model_path`` the checkpoint (local directory or storage URI) it
    reads its slots' expert rows from when engines place them (None: engines send the weights)."""

    def __init__(self, host: Optional[str] = None, torch_threads: int = 1, drain_timeout_s: float = 30.0,
                 heartbeat_s: float = 2.0, member_ttl_s: float = 10.0, model_path: Optional[str] = None) -> None:
        import threading

        import torch

        from raymoe.engine.remote import ShardServer

        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        ctx = serve.get_replica_context()
        self.app_name = ctx.app_name
        self.member_id = ctx.replica_id.unique_id
        self.drain_timeout_s = drain_timeout_s
        host = host or ray.util.get_node_ip_address()
        self.registry = get_registry(self.app_name, member_ttl_s)
        source = None
        if model_path:  # reads config.json and the safetensors headers now; expert rows when slots are placed
            from raymoe.engine.checkpoint_experts import CheckpointExperts

            source = CheckpointExperts(model_path)
        self.server = ShardServer(host, secret=ray.get(self.registry.secret.remote()), expert_source=source)
        ray.get(self.registry.register.remote(self.member_id, self.server.host, self.server.port))
        log.info("expert shard %s listening on %s:%d", self.member_id, host, self.server.port)
        self.heartbeat_s, self.member_ttl_s = heartbeat_s, member_ttl_s
        self.draining = False
        self._stop = threading.Event()
        self._paused = False  # test hook: stop heartbeating (pause_heartbeat)
        self._beat = threading.Thread(target=self._heartbeats, name="registry-heartbeat", daemon=True)
        self._beat.start()

    def _heartbeats(self) -> None:
        """Renew the registry entry every ``heartbeat_s`` (a thread: the replica's event loop may be busy). A failed
        call (registry restarting) is retried at the next beat; a registry gone for good is looked up again."""
        failures = 0
        while not self._stop.wait(self.heartbeat_s):
            if self._paused:
                continue
            try:
                ray.get(self.registry.heartbeat.remote(self.member_id, self.server.host, self.server.port,
                                                       self.draining), timeout=max(self.heartbeat_s, 5.0))
                failures = 0
            except Exception as e:  # noqa: BLE001 - control plane only: keep serving, try again
                failures += 1
                if failures & (failures - 1) == 0:
                    log.warning("expert shard %s: registry heartbeat failed (%d times): %s", self.member_id,
                                failures, e)
                try:
                    self.registry = get_registry(self.app_name, self.member_ttl_s)
                except Exception:  # noqa: BLE001
                    pass

    async def pause_heartbeat(self) -> None:
        """Tests: stop renewing the registry entry (as a replica that died without leaving would), refused unless
        ``RAYMOE_TEST_HOOKS=1`` is set in the replica's environment."""
        import os

        if os.environ.get("RAYMOE_TEST_HOOKS") != "1":
            raise PermissionError("test hooks are off (set RAYMOE_TEST_HOOKS=1 in the replica's environment)")
        self._paused = True

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Custom metrics for :class:`ExpertRedundancyPolicy`: rows run per second (sliding window) and live engine
        connections (0: not yet part of any placement)."""
        st = self.server.stats()
        return {"expert_rows_per_s": float(st["rows_per_s"]), "expert_connections": float(st["connections"])}

    async def stats(self) -> dict[str, Any]:
        st = self.server.stats()
        import os

        return {"member_id": self.member_id, "pid": os.getpid(), "node_ip": ray.util.get_node_ip_address(),
                "address": list(self.server.address), **st}

    async def __del__(self) -> None:
        """Graceful stop (scale down): drain, wait for the engines to close their connections, leave."""
        import asyncio

        self.draining = True
        try:
            await self.registry.drain.remote(self.member_id)
            idle = await asyncio.to_thread(self.server.wait_idle, self.drain_timeout_s)
            if not idle:
                log.warning("expert shard %s stopped with engines still connected", self.member_id)
            self._stop.set()
            await self.registry.remove.remote(self.member_id)
        except Exception:  # noqa: BLE001 - the registry may already be gone at app shutdown
            pass
        self._stop.set()
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
    registry's live members. :meth:`poll` is called after every engine step (under the engine lock) and never
    blocks: it collects the previous step's registry snapshot if ready and issues the next request, starts
    connecting members it has no connection to **in background threads**, and when the set of live members with an
    open connection differs from the backend's shards, re-plans onto exactly those (``backend.replace_shards``:
    joiners get their slots, draining members are moved away from and closed), returning the event (pause, moved
    slots, shard count).

    Why connect off the step path: a member can be listed and unreachable — a replica whose node died keeps its
    registry entry (it never ran its ``__del__``), and connecting to a dead address waits ``connect_timeout_s``
    (TCPStore retries a refused connection until then; a vanished machine never answers). Done between steps, that
    wait stalled every running request and the replica's event loop (Serve health checks included), once per dead
    member, whenever *any* member joined. Members whose connection failed, or whose shard the backend found dead
    during a forward, are never tried again (a dead replica does not come back; Serve replaces it under a new id).

    Connections bind their end of the gloo pairs to ``local_host`` (None: this node's IP as Ray reports it), prove
    the app's secret (fetched from the registry once here) and wait at most ``op_timeout_s`` per operation."""

    def __init__(self, app_name: str, connect_timeout_s: float = 30.0, local_host: Optional[str] = None,
                 op_timeout_s: float = 60.0, member_ttl_s: float = 10.0) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.app_name, self.member_ttl_s = app_name, member_ttl_s
        self.registry = get_registry(app_name, member_ttl_s)
        self.connect_timeout_s = connect_timeout_s
        self.op_timeout_s = op_timeout_s  # RemoteShard timeout_s: bounds the wait on a shard whose node went silent
        self.local_host = local_host or ray.util.get_node_ip_address()
        self._secret: bytes = ray.get(self.registry.secret.remote())
        self.version = -1
        self.failed: set[str] = set()  # member ids whose connection failed or died (never tried again)
        self.shards: dict[str, Any] = {}  # member id -> open RemoteShard (in the backend, or about to join it)
        self.events: list[dict[str, Any]] = []
        self._live: dict[str, dict[str, Any]] = {}  # the registry's latest members that are not draining
        self._connecting: dict[str, Any] = {}  # member id -> Future of its RemoteShard
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="expert-connect")
        self._ref: Optional[ray.ObjectRef] = None
        self.registry_errors = 0  # registry snapshots that failed (poll goes on without it)

    # ------------------------------------------------------------------ connections
    def _open(self, mid: str, info: dict[str, Any]) -> Any:
        """One connection (a pool thread): store rendezvous, gloo pair, mutual proof of the secret."""
        from raymoe.engine.remote import RemoteShard

        return RemoteShard((info["host"], info["port"]), mid, timeout_s=self.op_timeout_s,
                           connect_timeout_s=self.connect_timeout_s, secret=self._secret, local_host=self.local_host)

    def _start_connects(self) -> None:
        for mid in sorted(self._live):
            if mid not in self.failed and mid not in self.shards and mid not in self._connecting:
                self._connecting[mid] = self._pool.submit(self._open, mid, self._live[mid])

    def _collect(self) -> None:
        for mid, fut in list(self._connecting.items()):
            if not fut.done():
                continue
            del self._connecting[mid]
            try:
                self.shards[mid] = fut.result()
            except Exception as e:  # noqa: BLE001 - ShardUnavailable, or a malformed registered address
                log.warning("expert shard %s unreachable; skipped: %s", mid, e)
                self.failed.add(mid)

    def _note_dead(self, backend: Any) -> None:
        """Shards found dead: the backend drops a shard from its own list inside the forward that found it dead, so
        the connections handed out here are checked too (else a dead member would look like a new one)."""
        for sh in list(backend.shards) + list(self.shards.values()):
            if getattr(sh, "dead", False):
                self.failed.add(sh.name)
        for mid in [m for m, sh in self.shards.items() if sh.dead]:
            del self.shards[mid]

    def _set_members(self, version: int, members: dict[str, dict[str, Any]]) -> None:
        self.version = version
        self._live = {k: v for k, v in members.items() if not v["draining"]}

    def wait_for(self, count: int, timeout_s: float) -> list:
        """Block until ``count`` live members are registered (engine start-up) and connected — or every registered
        live member was tried and at least one connected; return the connected shards (sorted by member id), or
        none after ``timeout_s`` (the caller then runs the experts in process)."""
        end = time.monotonic() + timeout_s
        while True:
            self._set_members(*ray.get(self.registry.snapshot.remote()))
            self._start_connects()
            self._collect()
            ready = [m for m in sorted(self._live) if m in self.shards]
            tried = len(self._live) >= count and not any(m in self._connecting for m in self._live)
            if len(ready) >= count or (ready and tried):
                return [self.shards[m] for m in ready]
            if time.monotonic() > end:
                if not ready:
                    log.warning("only %d of %d expert shards registered after %.0f s, none reachable: serving "
                                "the experts in process until shards join (is the ExpertShards deployment "
                                "running? check `serve status`)", len(self._live), count, timeout_s)
                return [self.shards[m] for m in ready]
            time.sleep(0.2)

    # ------------------------------------------------------------------ per step
    def _snapshot(self) -> None:
        """Take the registry snapshot requested at the previous step if it arrived (never waits); request the next."""
        if self._ref is None:
            self._ref = self.registry.snapshot.remote()
            return
        ready, _ = ray.wait([self._ref], timeout=0)
        if not ready:
            return
        try:
            version, members = ray.get(self._ref)
        except Exception as e:  # noqa: BLE001 - see below
            # The registry is control plane only: the engine keeps serving on the shards it holds (their gloo pairs
            # do not go through it). Raising here would fail the engine step and with it every running request.
            # It lives on the head (get_registry), so this means a head hiccup or the app shutting down: log (1st,
            # 2nd, 4th, 8th, ... failure) and ask again at the next step.
            self.registry_errors += 1
            if self.registry_errors & (self.registry_errors - 1) == 0:
                log.warning("expert registry snapshot failed (%d times); keeping the current shards: %s",
                            self.registry_errors, e)
            self._ref = None
            try:  # a restarting registry answers on the same handle; one killed for good is looked up again
                self.registry = get_registry(self.app_name, self.member_ttl_s)
            except Exception:  # noqa: BLE001 - next step
                pass
            return
        self._ref = self.registry.snapshot.remote()
        if version != self.version:
            self._set_members(version, members)

    def poll(self, backend: Any) -> Optional[dict[str, Any]]:
        self._note_dead(backend)
        self._collect()
        self._snapshot()
        if self.version < 0:  # no member list yet
            return None
        self._start_connects()
        target = [m for m in sorted(self._live) if m in self.shards]
        # in-process shards (the local fallback, no remote shard reachable at start) have no member name
        current = sorted(getattr(sh, "name", "") for sh in backend.shards)
        if not target or target == current:
            return None
        for mid in [m for m in self.shards if m not in target and m not in current]:
            self.shards.pop(mid).close()  # connected, then drained before it joined
        t0 = time.perf_counter()
        kind = "scale_up" if len(target) > len(current) else "scale_down" if len(target) < len(current) \
            else "membership"
        ev = backend.replace_shards([self.shards[m] for m in target], kind=kind)  # closes the ones left out
        for mid in current:
            if mid not in target:
                self.shards.pop(mid, None)
        ev = dict(ev, pause_s=time.perf_counter() - t0, members=target)
        self.events.append(ev)
        log.info("expert shards %d -> %d (%s); pause %.1f ms", len(current), len(target), kind, 1e3 * ev["pause_s"])
        return ev

    def close(self) -> None:
        for fut in self._connecting.values():  # a connection still forming is closed when it completes
            fut.add_done_callback(lambda f: f.result().close() if f.exception() is None else None)
        self._connecting.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
        for sh in self.shards.values():
            sh.close()
        self.shards.clear()
