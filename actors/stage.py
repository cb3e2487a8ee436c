"""``StageActor``: a Ray actor hosting one rank of the training layout (its stage chunk(s) and expert shard).

The actor is a thin shell around the worker from :func:`raymoe.train.worker_group.make_worker` (which runs without
Ray): it offers a rendezvous address, builds the worker (model, process groups, optimizer) and forwards typed
calls — ``step(StepPlan) -> StepResult``, ``evaluate(EvalPlan) -> EvalResult``, ``save(dest) -> {relpath: {sha256,
bytes}}``, ``load(CheckpointRef)``. Methods are
spelled out (no dispatch by method name), so the boundary is typed end to end.
"""
from __future__ import annotations

import os
import socket
from typing import Any, Optional

import ray
import torch

from raymoe.checkpoint import CheckpointRef
from raymoe.config import RunConfig
from raymoe.train.plans import EvalPlan, EvalResult, StepPlan, StepResult
from raymoe.train.rendezvous import reserve_port

__all__ = ["StageActor"]


def interface_of(ip: str) -> Optional[str]:
    """The network interface whose address range holds ``ip`` (``lo`` for any 127.x address), or None."""
    import ipaddress

    import psutil

    addr = ipaddress.ip_address(ip)
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family != socket.AF_INET or not a.netmask:
                continue
            if addr in ipaddress.ip_network(f"{a.address}/{a.netmask}", strict=False):
                return name
    return None


@ray.remote
class StageActor:
    def __init__(self, run: RunConfig, rank: int) -> None:
        from raymoe.malloc import process_rss

        self._rss = {"start": process_rss()["rss"]}  # torch and Ray imported, no model yet (bench memory)
        self.run, self.rank = run, rank
        self.worker: Any = None
        self._sock: Optional[socket.socket] = None

    def pid(self) -> int:
        """The actor's process id (fault tests kill it with SIGKILL)."""
        return os.getpid()

    def rendezvous_address(self) -> tuple[str, int]:
        """(node IP, a reserved free TCP port bound on that IP): rank 0's answer is the group's rendezvous."""
        ip = ray.util.get_node_ip_address()
        self._sock, port = reserve_port(ip)
        return ip, port

    def init(self, master_addr: str, master_port: int, threads: int) -> dict[str, Any]:
        from raymoe.train.worker_group import make_worker

        if self._sock is not None:  # release the reserved port just before the store binds it
            self._sock.close()
            self._sock = None
        ip = ray.util.get_node_ip_address()
        iface = interface_of(ip)
        if iface and "GLOO_SOCKET_IFNAME" not in os.environ:
            # gloo otherwise picks its interface from the hostname's resolution, which on a cluster node may be
            # another network than the one Ray (and the rendezvous) uses
            os.environ["GLOO_SOCKET_IFNAME"] = iface
        self.worker = make_worker(self.run, self.rank, master_addr, master_port, threads=threads)
        from raymoe.malloc import process_rss

        self._rss["after_init"] = process_rss()["rss"]
        return self._where()

    def probe(self) -> dict[str, Any]:
        """After a peer failed: the last step this rank completed and its result (:mod:`raymoe.train.handoff`)."""
        return self._w().probe()

    def reform(self, run: RunConfig, rank: int, master_addr: str, master_port: int) -> dict[str, Any]:
        """Keep this rank's state and join the new layout ``run`` as ``rank`` (a surviving replica's rank)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._w().reform(run, rank, master_addr, master_port)
        self.run, self.rank = run, rank
        return self._where()

    def handoff(self) -> int:
        """Collective: survivors broadcast their state to the new ranks of their share; bytes sent or received."""
        return self._w().handoff()

    def _where(self) -> dict[str, Any]:
        import raymoe

        return {"rank": self.rank, "node": ray.util.get_node_ip_address(),
                "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "gloo_iface": os.environ.get("GLOO_SOCKET_IFNAME"),
                "code": os.path.dirname(os.path.abspath(raymoe.__file__)),
                "version": getattr(raymoe, "__version__", None)}

    def _w(self) -> Any:
        if self.worker is None:
            raise RuntimeError("StageActor.init() was not called")
        return self.worker

    def step(self, plan: StepPlan) -> StepResult:
        return self._w().step(plan)

    def evaluate(self, plan: EvalPlan) -> EvalResult:
        return self._w().evaluate(plan)

    def save(self, dest: str) -> dict[str, dict[str, Any]]:
        return self._w().save(dest)

    def load(self, ref: CheckpointRef) -> None:
        self._w().load(ref)

    def set_biases(self, biases: torch.Tensor) -> None:
        self._w().set_biases(biases)

    def get_biases(self) -> Any:
        return self._w().get_biases()

    def param_state(self) -> dict[str, torch.Tensor]:
        return self._w().param_state()

    def peak_flops(self) -> float:
        return self._w().peak_flops()

    def memory_stats(self) -> dict[str, int]:
        """The worker's tensor bytes (``PipelineWorker.memory_stats``) and this process's resident memory: at
        actor start (``rss_start``), after ``init`` built the model (``rss_after_init``), now and at its peak."""
        from raymoe.malloc import process_rss

        now = process_rss()
        stats = self._w().memory_stats() if hasattr(self._w(), "memory_stats") else {}
        return {**stats, "rss_start": self._rss["start"], "rss_after_init": self._rss.get("after_init", 0),
                "rss_now": now["rss"], "rss_peak": now["peak"]}

    def export_hf(self, path: str, biases: torch.Tensor) -> str:
        return self._w().export_hf(path, biases)

    def bias_in_optimizer(self) -> bool:
        w = self._w()
        bias_ids = {id(b) for b in (getattr(r, "expert_bias", None) for r in w.model.modules()) if b is not None}
        return any(id(p) in bias_ids for g in w.optimizer.param_groups for p in g["params"])

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
