"""A real multi-node Ray cluster on one machine: ``python -m raymoe.jobs.local_cluster up|down``.

Every node is a separate ``ray start`` (its own raylet, object store, agents and workers) on its **own loopback
address** — head ``127.0.0.2``, workers ``127.0.0.3``, ``127.0.0.4``, ... Ray keeps such an address as the node IP
(it replaces only ``127.0.0.1``/``localhost`` by the machine's routable address), so all traffic stays in
127.0.0.0/8 and nothing reaches the machine's external address. Each node gets:

- its own ports (GCS/node manager/object manager/agents/metrics: two nodes on one machine otherwise collide);
- its own local directory, exported to every worker it starts as ``RAYMOE_LOCAL_DIR`` (node-local scratch: the
  training runtime stages checkpoint files there), so no two nodes share a disk path by accident;
- its own session (``setsid``), so losing a node is ``kill -9`` of every process in that session: ``ray start``,
  its raylet, its agents and every worker it spawned die together, the way a machine dies (the workers are in
  process groups of their own, so a ``killpg`` alone would not reach them).

``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` is removed from every node's environment: set to 0 it switches multi-node
support off on Linux (a worker's ``ray start --address`` aborts). The head starts with ``--num-cpus=0`` (no work on
it, as on a real cluster's head) unless told otherwise; the dashboard (needed for ``ray job submit``) listens on
127.0.0.1.

Usage::

    python -m raymoe.jobs.local_cluster up --workers 2 --cpus-per-worker 2     # prints RAY_ADDRESS / dashboard
    RAY_ADDRESS=127.0.0.2:<port> python -m raymoe.jobs.train parallel=dp2 ...   # a driver on the cluster
    ray job submit --address http://127.0.0.1:<dash> --working-dir . -- python -m raymoe.jobs.train ...
    python -m raymoe.jobs.local_cluster add-node --resources '{"shard": 1}'   # a worker with a custom resource
    python -m raymoe.jobs.local_cluster kill-node 1     # SIGKILL worker node 1's whole process tree
    python -m raymoe.jobs.local_cluster down

The state (pids, addresses, ports) is kept in ``<state_dir>/cluster.json`` (default ``/tmp/raymoe-cluster``).
Tests use :class:`LocalCluster` directly.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Optional

__all__ = ["LocalCluster", "LocalS3", "NodeProc", "ClusterConfigError", "cluster_env", "free_port"]



_HANDED_OUT: set[int] = set()


def free_port(host: str = "") -> int:
    """A TCP port free on every address (Ray's raylet and agents bind 0.0.0.0 whatever the node IP, so a port free
    only on one loopback alias may be taken by another node's agent), never one this process handed out before
    (the nodes bind them only later)."""
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def cluster_env(base: Optional[dict[str, str]] = None) -> dict[str, str]:
    """The environment for a cluster process: multi-node support left on, usage stats and token auth off (a
    loopback-only cluster), this interpreter's ``bin/`` first on PATH (the job's ``python`` and ``ray``)."""
    env = dict(os.environ if base is None else base)
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    env.pop("RAY_ADDRESS", None)
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    bin_dir = str(pathlib.Path(sys.executable).parent)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return env


def _session_pids(sid: int) -> list[int]:
    """PIDs of the live processes in session ``sid`` (Linux ``/proc``)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp session ...
        except OSError:  # exited meanwhile
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            out.append(int(d))
    return out


def _kill_session(sid: int) -> None:
    """SIGKILL every process of a node. A node is one session (``ray start`` runs with ``setsid``), but not one
    process group: the raylet starts each Ray worker in a process group of its own (Ray's per-worker process group
    cleanup), so a ``killpg`` of the node's group leaves its workers (actors, Serve replicas) running until they
    notice their raylet is gone, seconds later. Sweeps until nothing of the session is left (a process forked
    during a sweep is caught by the next)."""
    for _ in range(10):
        pids = _session_pids(sid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


class ClusterConfigError(RuntimeError):
    """The nodes' environment makes a start impossible (no retry on fresh ports can help): e.g. Ray token
    authentication inherited by the nodes."""


@dataclass
class NodeProc:
    """One node: its loopback IP, the pid of its ``ray start --block`` (= its session and process group), its local
    dir."""

    index: int  # 0 = head
    ip: str
    pid: int
    local_dir: str
    num_cpus: float
    ports: dict[str, int] = field(default_factory=dict)
    resources: dict[str, float] = field(default_factory=dict)  # Ray custom resources (``ray start --resources``)

    @property
    def alive(self) -> bool:
        """Whether any process of the node's session still runs. Zombies do not count: right after
        :meth:`LocalCluster.kill_node` the killed workers can linger as zombies until init reaps them, and a
        ``killpg(pid, 0)`` probe (what this was) still found them, so a killed node could read alive for a moment."""
        return bool(_session_pids(self.pid))


class LocalCluster:
    """Start/stop/kill nodes of a loopback multi-node Ray cluster (see the module docstring)."""

    def __init__(self, state_dir: str | pathlib.Path = "/tmp/raymoe-cluster", object_store_mb: int = 300,
                 extra_env: Optional[dict[str, str]] = None, first_ip: int = 2) -> None:
        # short: Ray's unix socket paths under the temp dir have a length limit
        self.state_dir = pathlib.Path(state_dir)
        self.object_store_mb = object_store_mb
        self.env = cluster_env()
        # Ray's dashboard waits 30 s (its default) for each of its ~9 module subprocesses to report ready, then dies
        # while the head runs on without it (no `ray job submit`, no state API). Several nodes starting on a busy
        # 2-core machine miss that; a local cluster gives them 3 minutes.
        self.env.setdefault("RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT", "180")
        self.env.update(extra_env or {})  # e.g. LocalS3.env: every node reaches the same object store
        # head on 127.0.0.<first_ip>, workers on the following addresses: two clusters on one machine (two test
        # modules, a test beside a manual cluster) use disjoint ranges
        self.first_ip = first_ip
        self.nodes: list[NodeProc] = []
        self._procs: dict[int, subprocess.Popen] = {}  # pid -> `ray start` of the nodes this object started
        self.gcs_port = 0
        self.dashboard_port = 0
        self.ray_tmp: Optional[pathlib.Path] = None  # Ray's --temp-dir, chosen by start()

    def _short_temp_dir(self) -> pathlib.Path:
        """Ray's ``--temp-dir``: ``<state_dir>/ray`` when short enough, else a new ``/tmp/rmr*`` (removed by
        :meth:`stop`). Ray puts unix sockets at ``<temp>/session_<date>_<time>_<pid>/sockets/<name>`` (40 + 9 +
        names up to ``dash_MetricsHead``), and a socket path has 107 bytes at most: a longer temp dir makes the
        dashboard's module subprocesses fail to bind ("Module MetricsHead failed to start") and the dashboard exit."""
        tmp = self.state_dir.resolve() / "ray"
        if len(str(tmp)) <= 30:
            return tmp
        return pathlib.Path(tempfile.mkdtemp(prefix="rmr", dir="/tmp"))

    # ------------------------------------------------------------------ addresses
    @property
    def address(self) -> str:
        """``RAY_ADDRESS`` for a driver on this machine (the GCS)."""
        return f"{self.head_ip}:{self.gcs_port}"

    @property
    def head_ip(self) -> str:
        return f"127.0.0.{self.first_ip}"

    def _ip(self, index: int) -> str:
        if not 0 < self.first_ip + index < 255:
            raise ValueError(f"no loopback address left for node {index} (first_ip={self.first_ip})")
        return f"127.0.0.{self.first_ip + index}"

    @property
    def dashboard(self) -> str:
        """Address for ``ray job submit --address``."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def workers(self) -> list[NodeProc]:
        return [n for n in self.nodes if n.index > 0]

    # ------------------------------------------------------------------ lifecycle
    def _ports(self, ip: str) -> dict[str, int]:
        names = ("node-manager-port", "object-manager-port", "metrics-export-port", "dashboard-agent-listen-port",
                 "dashboard-agent-grpc-port", "runtime-env-agent-port")
        return {n: free_port() for n in names}

    def _spawn(self, index: int, ip: str, num_cpus: float, extra: list[str],
               resources: Optional[dict[str, float]] = None) -> NodeProc:
        local = self.state_dir / f"node{index}"
        shutil.rmtree(local, ignore_errors=True)
        local.mkdir(parents=True)
        ports = self._ports(ip)
        cmd = [str(pathlib.Path(sys.executable).parent / "ray"), "start", "--block", f"--node-ip-address={ip}",
               f"--num-cpus={int(num_cpus)}", f"--object-store-memory={self.object_store_mb * 2**20}",
               "--disable-usage-stats", *[f"--{k}={v}" for k, v in ports.items()],
               f"--min-worker-port={20000 + 400 * ((self.first_ip + index) % 100)}",
               f"--max-worker-port={20399 + 400 * ((self.first_ip + index) % 100)}", *extra]
        if resources:
            cmd.append(f"--resources={json.dumps(resources)}")
        env = dict(self.env, RAYMOE_LOCAL_DIR=str(local), RAYMOE_NODE_INDEX=str(index))
        log = open(local / "ray-start.log", "w")
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        node = NodeProc(index, ip, proc.pid, str(local), num_cpus, ports, dict(resources or {}))
        self.nodes.append(node)
        self._procs[proc.pid] = proc
        return node

    def start(self, workers: int = 2, cpus_per_worker: float = 2, head_cpus: float = 0,
              timeout_s: float = 180.0, worker_resources: Optional[list[Optional[dict[str, float]]]] = None
              ) -> "LocalCluster":
        """Head on 127.0.0.<first_ip> plus ``workers`` worker nodes on the next addresses; waits until all are ALIVE.
        ``worker_resources[i]``: Ray custom resources of worker ``i`` (e.g. ``{"shard": 1}``), to pin deployments to
        nodes."""
        worker_resources = list(worker_resources or [])
        if len(worker_resources) > workers:
            raise ValueError(f"worker_resources has {len(worker_resources)} entries for {workers} workers")
        worker_resources += [None] * (workers - len(worker_resources))
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.ray_tmp = self.ray_tmp or self._short_temp_dir()
        self._start_head(head_cpus, timeout_s)
        for res in worker_resources:
            self.add_worker(cpus_per_worker, wait=True, timeout_s=timeout_s, resources=res)
        self.wait_nodes(workers + 1, timeout_s)
        self.save()
        return self

    def _start_head(self, head_cpus: float, timeout_s: float, tries: int = 2) -> None:
        """The head node, up once its dashboard answers. A head whose dashboard does not answer within
        ``timeout_s`` (a port handed out by :func:`free_port` taken by another process before Ray bound it, a
        dashboard process that died at start-up) is killed as a whole session and started again on fresh ports;
        after ``tries`` the error carries the tails of the head's logs, so a CI failure says what happened."""
        failures = []
        for attempt in range(tries):
            self.gcs_port, self.dashboard_port = free_port(), free_port()
            tmp = self.ray_tmp
            node = self._spawn(0, self.head_ip, head_cpus, [
                "--head", f"--port={self.gcs_port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={free_port()}",
                f"--temp-dir={tmp}"])
            try:
                self._wait_dashboard(timeout_s)
                return
            except (TimeoutError, RuntimeError) as e:
                if not isinstance(e, ClusterConfigError):
                    failures.append(f"try {attempt + 1}: {e}\n{self._head_logs()}")
                self.nodes.remove(node)
                _kill_session(node.pid)
                proc = self._procs.pop(node.pid, None)
                if proc is not None:
                    proc.wait(timeout=30)
                shutil.rmtree(tmp, ignore_errors=True)
                if isinstance(e, ClusterConfigError):
                    raise
        raise TimeoutError(f"the Ray head on {self.head_ip} did not start {tries} times:\n" + "\n".join(failures))

    def _head_logs(self, lines: int = 15) -> str:
        """The last ``lines`` lines of the head's ``ray start`` output and of its dashboard and GCS logs."""
        head = self.state_dir / "node0"
        logs = self.ray_tmp / "session_latest" / "logs"
        out = []
        for f in [head / "ray-start.log", *(logs / n for n in ("dashboard.log", "dashboard.err", "dashboard.out",
                                                               "gcs_server.err", "gcs_server.out"))]:
            try:
                tail = f.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            if tail:
                out.append(f"--- {f}\n" + "\n".join(tail))
        return "\n".join(out) or f"(no log lines yet under {head} or {logs})"

    def add_worker(self, num_cpus: float = 2, wait: bool = True, timeout_s: float = 120.0,
                   resources: Optional[dict[str, float]] = None) -> NodeProc:
        """A new worker node on the next unused loopback address (a killed node's address is not reused), with
        optional Ray custom ``resources`` (e.g. ``{"shard": 1}``).

        With ``wait`` (what :meth:`start` does for each worker, one after the other) it returns once the GCS reports
        the node ALIVE. Nodes are started one at a time because every ``ray start`` of a cluster picks its raylet's
        socket name in the shared session directory by probing for the first unused ``sockets/raylet.<n>`` (Ray
        2.60's ``ray start`` has no option to name it): two raylets starting together can pick the same name, and
        the second aborts with "bind: Address already in use". Its ``ray start`` then waits for a start-up deadline
        and exits; so does one whose raylet missed that deadline on a loaded machine. Either way the node is
        started again on the same address (up to 3 tries). ``wait=False`` (a node joining a running job) returns at
        once: do not start another node before this one is up."""
        index = max((n.index for n in self.nodes), default=0) + 1
        ip = self._ip(index)
        for attempt in range(3 if wait else 1):
            node = self._spawn(index, ip, num_cpus, [f"--address={self.address}"], resources)
            if not wait or self._wait_up(node, timeout_s):
                break
            self.nodes.remove(node)
            _kill_session(node.pid)  # whatever of the failed try is left (agents of an aborted raylet)
        else:
            raise RuntimeError(f"worker node {index} ({ip}) failed to start 3 times; see {node.local_dir}/"
                               "ray-start.log and the raylet logs under the state dir")
        self.save()
        return node

    def _wait_up(self, node: NodeProc, timeout_s: float) -> bool:
        """True once the GCS reports ``node`` ALIVE; False if its ``ray start`` exited first."""
        proc = self._procs.get(node.pid)
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if proc is not None and proc.poll() is not None:
                return False
            try:
                if node.ip in self.alive_node_ips():
                    return True
            except Exception:  # noqa: BLE001 - state API busy
                pass
            time.sleep(0.3)
        raise TimeoutError(f"worker node {node.index} ({node.ip}) not ALIVE within {timeout_s:.0f} s")

    def kill_node(self, index: int) -> NodeProc:
        """SIGKILL every process of a node (``ray start``, raylet, agents, workers) at once: a machine lost."""
        node = next(n for n in self.nodes if n.index == index)
        _kill_session(node.pid)
        proc = self._procs.get(node.pid)
        if proc is not None:
            proc.wait(timeout=30)
        return node

    def freeze_node(self, index: int) -> NodeProc:
        """SIGSTOP every process of a node: a machine that vanishes without closing anything (power loss, network
        partition). Its sockets stay open and its kernel still accepts data, but nothing answers; peers notice only
        by their own timeouts, and the GCS by missed health checks. :meth:`kill_node` (SIGKILL) ends it."""
        node = next(n for n in self.nodes if n.index == index)
        for _ in range(3):  # a process forked during a sweep is caught by the next
            for pid in _session_pids(node.pid):
                try:
                    os.kill(pid, signal.SIGSTOP)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        return node

    def stop(self) -> None:
        """Workers first, then the head: SIGTERM to each ``ray start`` (it drains through the live GCS), then
        SIGKILL of whatever is left of each node."""
        for node in sorted(self.nodes, key=lambda n: -n.index):
            try:
                os.kill(node.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for pid in _session_pids(node.pid):  # a frozen node (freeze_node) must run to handle its SIGTERM
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        deadline = time.time() + 30
        for node in self.nodes:
            proc = self._procs.get(node.pid)
            while node.alive and time.time() < deadline:
                if proc is not None and proc.poll() is not None:
                    break
                time.sleep(0.2)
        for node in self.nodes:
            _kill_session(node.pid)
        self.nodes = []
        shutil.rmtree(self.state_dir, ignore_errors=True)  # node dirs, Ray's temp dir, cluster.json: all ours
        if self.ray_tmp is not None:
            shutil.rmtree(self.ray_tmp, ignore_errors=True)  # the short one outside the state dir

    # ------------------------------------------------------------------ waiting / state
    def _wait_dashboard(self, timeout_s: float) -> None:
        deadline = time.time() + timeout_s
        err = self.ray_tmp / "session_latest" / "logs" / "dashboard.err"
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2)
                return
            except urllib.error.HTTPError as e:
                if e.code == 401:  # up, but every later call of ours would be refused the same way
                    raise ClusterConfigError(
                        f"the Ray dashboard on {self.dashboard} wants a token: the nodes inherited "
                        f"{self._auth_hint()}") from None
                time.sleep(0.5)
            except Exception:  # noqa: BLE001 - not up yet
                head = self.nodes[0]
                proc = self._procs.get(head.pid)
                if (proc is not None and proc.poll() is not None) or not head.alive:  # `ray start --block` ended
                    log = pathlib.Path(head.local_dir) / "ray-start.log"
                    try:
                        text = log.read_text(errors="replace")
                    except OSError:
                        text = ""
                    if "AuthenticationError" in text:  # token auth on, no token file: `ray start` refuses at once
                        raise ClusterConfigError(
                            f"ray start refused the head: token authentication is on and no token was found "
                            f"(see {log}); the nodes inherited {self._auth_hint()}")
                    raise RuntimeError(f"ray head exited; see {log}")
                try:  # the dashboard died at start-up (the head lives on without it): no use waiting
                    died = "Traceback" in err.read_text(errors="replace")
                except OSError:
                    died = False
                if died:
                    raise RuntimeError(f"the Ray dashboard exited at start-up (see {err})")
                time.sleep(0.5)
        raise TimeoutError(f"Ray dashboard on {self.dashboard} did not come up within {timeout_s:.0f} s")

    def _auth_hint(self) -> str:
        return (f"RAY_AUTH_MODE={self.env.get('RAY_AUTH_MODE')!r} (an earlier ray.init in this process sets 'token' "
                "when it is unset); a local cluster runs with RAY_AUTH_MODE=disabled")

    def alive_node_ips(self) -> list[str]:
        """IPs of the nodes the GCS reports ALIVE (via the dashboard's state API)."""
        with urllib.request.urlopen(f"{self.dashboard}/api/v0/nodes?limit=100", timeout=10) as r:
            data = json.loads(r.read())
        rows = data.get("data", {}).get("result", {}).get("result", [])
        return sorted(n["node_ip"] for n in rows if n.get("state") == "ALIVE")

    def wait_nodes(self, count: int, timeout_s: float = 120.0) -> list[str]:
        deadline = time.time() + timeout_s
        ips: list[str] = []
        while time.time() < deadline:
            try:
                ips = self.alive_node_ips()
            except Exception:  # noqa: BLE001 - state API warming up
                ips = []
            if len(ips) >= count:
                return ips
            time.sleep(0.5)
        raise TimeoutError(f"{count} Ray nodes not ALIVE within {timeout_s:.0f} s (alive: {ips})")

    def save(self) -> None:
        state = {"gcs_port": self.gcs_port, "dashboard_port": self.dashboard_port, "first_ip": self.first_ip,
                 "ray_tmp": str(self.ray_tmp), "nodes": [asdict(n) for n in self.nodes]}
        (self.state_dir / "cluster.json").write_text(json.dumps(state, indent=1))

    @classmethod
    def load(cls, state_dir: str | pathlib.Path = "/tmp/raymoe-cluster") -> "LocalCluster":
        c = cls(state_dir)
        state = json.loads((c.state_dir / "cluster.json").read_text())
        c.gcs_port, c.dashboard_port = state["gcs_port"], state["dashboard_port"]
        c.first_ip = state.get("first_ip", 2)
        c.ray_tmp = pathlib.Path(state["ray_tmp"]) if state.get("ray_tmp") else c.state_dir / "ray"
        c.nodes = [NodeProc(**n) for n in state["nodes"]]
        return c


class LocalS3:
    """A real S3-compatible server on 127.0.0.1 (moto's server mode, a dev dependency) with one bucket: storage that
    no two nodes share through a disk. ``env`` holds the standard variables pyarrow reads (endpoint, fake keys,
    region); give them to every node (``LocalCluster(env=...)``) and to the driver."""

    def __init__(self, bucket: str = "raymoe") -> None:
        self.bucket = bucket
        self.port = 0
        self.server = None

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}", "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                # never a user's ~/.aws profile or an instance role: only this server's fake keys
                "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/nonexistent",
                "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}

    def uri(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix.strip('/')}"

    def start(self) -> "LocalS3":
        import logging

        import pyarrow.fs as pafs
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one INFO line per request otherwise
        self.port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        fs = pafs.S3FileSystem(endpoint_override=self.env["AWS_ENDPOINT_URL"], access_key="testing",
                               secret_key="testing", region="us-east-1", allow_bucket_creation=True)
        fs.create_dir(self.bucket)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m raymoe.jobs.local_cluster", description=__doc__.split("\n")[0])
    ap.add_argument("--state-dir", default="/tmp/raymoe-cluster")
    ap.add_argument("--first-ip", type=int, default=2, help="head on 127.0.0.<first-ip>, workers on the next ones")
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start a head (127.0.0.2) and worker nodes (127.0.0.3, ...)")
    up.add_argument("--workers", type=int, default=2)
    up.add_argument("--cpus-per-worker", type=float, default=2)
    up.add_argument("--head-cpus", type=float, default=0)
    up.add_argument("--object-store-mb", type=int, default=300)
    add = sub.add_parser("add-node", help="start one more worker node")
    add.add_argument("--cpus", type=float, default=2)
    add.add_argument("--resources", type=json.loads, default=None,
                     help='Ray custom resources of the node as JSON, e.g. \'{"shard": 1}\'')
    kill = sub.add_parser("kill-node", help="SIGKILL one node's whole process tree")
    kill.add_argument("index", type=int)
    sub.add_parser("status", help="print the nodes the GCS reports alive")
    sub.add_parser("down", help="stop every node")
    a = ap.parse_args(argv)
    if a.cmd == "up":
        c = LocalCluster(a.state_dir, a.object_store_mb, first_ip=a.first_ip).start(a.workers, a.cpus_per_worker,
                                                                                    a.head_cpus)
        # the `ray start` processes are our children: detach them so they outlive this command
        print(f"cluster up: nodes {c.alive_node_ips()}")
        print(f"export RAY_ADDRESS={c.address}        # a driver on this machine")
        print(f"ray job submit --address {c.dashboard} --working-dir . -- python -m raymoe.jobs.train ...")
        return
    c = LocalCluster.load(a.state_dir)
    if a.cmd == "add-node":
        n = c.add_worker(a.cpus, resources=a.resources)
        print(f"node {n.index} up on {n.ip}")
    elif a.cmd == "kill-node":
        n = c.kill_node(a.index)
        print(f"node {n.index} ({n.ip}) killed")
    elif a.cmd == "status":
        print("alive:", c.alive_node_ips())
    elif a.cmd == "down":
        c.stop()
        print("cluster down")


if __name__ == "__main__":
    main()
