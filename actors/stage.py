"""``StageActor``: a Ray actor hosting one data-parallel replica of a pipeline stage.

The actor is a thin shell around :class:`raymoe.stage.StageWorker` (which runs without Ray): it picks its
rendezvous address, builds the worker (model, DeepSpeed engine, torch.distributed group) and forwards calls. The
coordinator sends one ``call("run_step", plan)`` per rank per step.
"""
from __future__ import annotations

import socket
from typing import Any

import ray

from raymoe.config import RunConfig

__all__ = ["StageActor"]


@ray.remote
class StageActor:
    def __init__(self, run: RunConfig, dp_rank: int) -> None:
        self.run, self.dp_rank = run, dp_rank
        self.worker = None

    def rendezvous_address(self) -> tuple[str, int]:
        """(node IP, free TCP port) on this actor's node — rank 0's answer is the group's MASTER_ADDR/PORT."""
        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ip, port

    def init(self, master_addr: str, master_port: int, threads: int) -> dict[str, Any]:
        from raymoe.stage import StageWorker

        self.worker = StageWorker(self.run, self.dp_rank, master_addr, master_port, threads=threads)
        return {"dp_rank": self.dp_rank, "node": ray.util.get_node_ip_address()}

    def call(self, method: str, *args: Any) -> Any:
        if self.worker is None:
            raise RuntimeError("StageActor.init() was not called")
        return getattr(self.worker, method)(*args)
