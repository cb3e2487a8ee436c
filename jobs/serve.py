"""`python -m raymoe.jobs.serve model_path=<dir> [overrides]`: serve a checkpoint with an OpenAI-compatible API.

Compose ``conf/serve.yaml`` → connect to Ray (``ray.address``/``RAY_ADDRESS``, else a local Ray) → start Serve's HTTP
proxy on ``serve.host:serve.port`` → deploy :func:`raymoe.actors.serve.app.build_app` → wait for ``GET /health`` →
print the URL → block until SIGINT/SIGTERM → delete the app, shut Serve and Ray down.

Examples::

    python -m raymoe.jobs.serve model_path=/ckpts/tiny
    RAYMOE_API_KEY=secret python -m raymoe.jobs.serve model_path=/ckpts/tiny serve.port=9000 engine.num_blocks=4096
    curl -s localhost:8000/v1/completions -H 'content-type: application/json' \\
         -d '{"prompt": "The river", "max_tokens": 16, "temperature": 0}'
"""
from __future__ import annotations

import os

from raymoe.jobs.cluster import configure_process_env

configure_process_env()  # before `import ray`: embedded (loopback only) or cluster mode, see raymoe.jobs.cluster

import pathlib  # noqa: E402
import signal  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from typing import Any, Optional  # noqa: E402

from omegaconf import DictConfig, OmegaConf  # noqa: E402

from raymoe.jobs.configs import InvalidConfig, hydra_app  # noqa: E402

__all__ = ["app_args", "start_server", "stop_server", "main"]


def app_args(cfg: DictConfig | dict) -> dict[str, Any]:
    """The composed config → ``build_app`` args."""
    c = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    s = c.get("serve", {})
    if s.get("api_key"):
        raise InvalidConfig("serve.api_key is refused: a key on the command line is visible to every user of the "
                            "machine (ps); put it in a file (serve.api_key_file=<path>) or in $RAYMOE_API_KEY")
    path = c.get("model_path")
    if not path or path == "???":
        raise InvalidConfig("model_path is required: python -m raymoe.jobs.serve model_path=<checkpoint dir>")
    from raymoe.storage import Storage, check_uri, is_local

    if is_local(str(path)):
        if not (pathlib.Path(path) / "config.json").exists():
            raise InvalidConfig(f"model_path={path} is not a checkpoint directory (no config.json)")
        path = str(pathlib.Path(path).resolve())
    else:  # a storage URI (s3://bucket/run/hf): every engine replica copies it to its node (raymoe.storage)
        try:
            if not Storage(check_uri(str(path), "model_path")).exists("config.json"):
                raise InvalidConfig(f"model_path={path} is not a checkpoint (no config.json there)")
        except ValueError as e:
            raise InvalidConfig(str(e)) from e
    return {
        "model_path": str(path),
        "tokenizer_path": c.get("tokenizer_path"),
        "served_model_name": c.get("served_model_name"),
        "api_key_file": s.get("api_key_file"),
        "engine": {k: v for k, v in (c.get("engine") or {}).items() if v is not None},
        "experts": c.get("experts"),
        "torch_threads": s.get("torch_threads", 1),
        "engine_num_cpus": s.get("engine_num_cpus", 1),
        "engine_resources": s.get("engine_resources"),
        "ingress_resources": s.get("ingress_resources"),
        "autoscaling": s.get("autoscaling"),
        "engine_max_ongoing_requests": s.get("engine_max_ongoing_requests"),
        "engine_max_queued_requests": s.get("engine_max_queued_requests"),
        "ingress_max_ongoing_requests": s.get("ingress_max_ongoing_requests"),
        "max_body_bytes": s.get("max_body_bytes"),
        "prefix_routing": s.get("prefix_routing"),
        "ingress_max_pending_requests": s.get("ingress_max_pending_requests"),
        "engine_step_timeout_s": s.get("engine_step_timeout_s"),
        "engine_health_check_period_s": s.get("engine_health_check_period_s"),
    }


def required_cpus(args: dict[str, Any]) -> tuple[float, list[str]]:
    """Ray CPUs the app needs to start: its initial engine replicas and (``experts.backend=remote``) expert shards;
    the ingress, the expert registry and Serve's own actors take none. Returns (total, what each part takes)."""
    from raymoe.actors.serve.app import DEFAULT_ARGS
    from raymoe.actors.serve.expert_shards import RemoteShardsConfig
    from raymoe.engine import ExpertsConfig

    a = {**DEFAULT_ARGS, **{k: v for k, v in dict(args or {}).items() if v is not None}}
    auto = dict(a["autoscaling"] or {})
    n_eng = int(auto.get("initial_replicas") or auto.get("min_replicas") or 1)
    per_eng = float(a["engine_num_cpus"])
    parts = [(f"{n_eng} engine replica(s) x serve.engine_num_cpus={per_eng:g}", n_eng * per_eng)]
    experts = dict(a["experts"] or {})
    if experts.get("backend") == "remote":
        n = int(experts.get("num_shards") or ExpertsConfig.num_shards)
        per = float((experts.get("remote") or {}).get("num_cpus") or RemoteShardsConfig.num_cpus)
        parts.append((f"{n} expert shard(s) x experts.remote.num_cpus={per:g}", n * per))
    return sum(c for _, c in parts), [f"{what} = {c:g}" for what, c in parts]


def _check_cpus(need: float, parts: list[str], have: float, where: str) -> None:
    if have + 1e-9 < need:
        raise InvalidConfig(f"the app needs {need:g} Ray CPUs to start ({'; '.join(parts)}) but {where} has "
                            f"{have:g}: add CPUs (ray.num_cpus / more nodes) or lower serve.engine_num_cpus, "
                            "serve.autoscaling.initial_replicas, experts.num_shards or experts.remote.num_cpus")


def _app_state(app_name: str) -> str:
    """One line on why an app is not serving yet (Serve's status of it and its deployments)."""
    try:
        from ray import serve

        app = serve.status().applications.get(app_name)
        if app is None:
            return f"application {app_name!r} not deployed"
        deps = "; ".join(f"{n}: {d.status}{' - ' + d.message if d.message else ''}"
                         for n, d in app.deployments.items())
        return f"application {app_name!r} {app.status}{' - ' + app.message if app.message else ''}; {deps}"
    except Exception as e:  # noqa: BLE001 - diagnostics only
        return f"(serve status unavailable: {e})"


def _wait_healthy(url: str, timeout_s: float, app_name: str) -> None:
    """Poll ``GET /health`` until 200 (it answers 503 while the model loads); on timeout say what Serve reports."""
    from ray import serve

    deadline = time.time() + timeout_s
    last: Optional[Exception] = None
    next_status = time.time() + 2
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except Exception as e:  # noqa: BLE001 - proxy not up yet, or 503 while loading
            last = e
        if time.time() > next_status:  # a replica whose constructor keeps failing: say so now, not at the timeout
            next_status = time.time() + 2
            app = serve.status().applications.get(app_name)
            if app is not None and str(app.status).endswith("DEPLOY_FAILED"):
                raise RuntimeError(f"the app failed to deploy: {_app_state(app_name)}")
        time.sleep(0.25)
    raise TimeoutError(f"{url}/health did not answer 200 within {timeout_s:.0f} s ({last}); "
                       f"{_app_state(app_name)}")


def start_server(args: dict[str, Any], host: str = "127.0.0.1", port: int = 8000, app_name: str = "raymoe",
                 route_prefix: str = "/", ray_address: Optional[str] = None, num_cpus: Optional[int] = None,
                 timeout_s: float = 300.0, proxy_location: Optional[str] = None) -> str:
    """Start (or connect to) Ray, start Serve's proxy, deploy the app, wait for /health; return the base URL.

    Resources: an embedded Ray gets ``num_cpus`` CPUs, by default ``max(what the app needs, this machine's)``
    (:func:`required_cpus`), so a config asking for more replicas than cores still starts; an explicit ``num_cpus``
    or a cluster with fewer CPUs than the app needs fails at once with what is missing (rather than a replica
    Serve can never schedule). Deployment does not wait for the replicas: ``GET /health`` answers 503 while the
    model loads, and this waits for its 200.

    ``proxy_location``: Serve's ``HeadOnly`` / ``EveryNode`` / ``Disabled`` (None: Serve's default, EveryNode: a
    proxy on every node with a replica, each bound to ``host`` on its own node). ``HeadOnly`` keeps the one proxy on
    the head, so no HTTP connection runs through a worker node that may be lost (docs/cluster.md)."""
    import math

    import ray
    from ray import serve

    from raymoe.actors.serve.app import build_app
    from raymoe.jobs.cluster import connect

    need, parts = required_cpus(args)
    if num_cpus is not None:
        _check_cpus(need, parts, float(num_cpus), f"ray.num_cpus={num_cpus}")
    app = build_app(args)  # validates the args before anything starts
    mode = connect(ray_address, num_cpus=num_cpus or max(2, math.ceil(need), os.cpu_count() or 2),
                   log_to_driver=False, env_vars={"TOKENIZERS_PARALLELISM": "false"})
    if mode != "embedded":
        _check_cpus(need, parts, float(ray.cluster_resources().get("CPU", 0)), "the Ray cluster")
    serve.start(http_options={"host": host, "port": int(port)},
                **({"proxy_location": proxy_location} if proxy_location else {}))
    serve.run_many([serve.RunTarget(app, name=app_name, route_prefix=route_prefix)],
                   wait_for_applications_running=False)
    url = f"http://{host}:{port}{route_prefix.rstrip('/')}"
    _wait_healthy(url, timeout_s, app_name)
    return url


def stop_server(app_name: Optional[str] = "raymoe", shutdown: bool = True) -> None:
    """Delete the app ``app_name`` and kill its expert registry (only that app's: other apps in the cluster keep
    theirs); with ``shutdown``, then stop Serve and disconnect from (an embedded: stop) Ray."""
    import ray
    from ray import serve

    if not ray.is_initialized():  # nothing started (a config refused before connecting); serve.* would start Ray
        return
    try:
        if app_name is not None:
            try:
                serve.delete(app_name)
            finally:  # the registry is a detached actor: deleting the app leaves it
                from raymoe.actors.serve.expert_shards import kill_registry

                kill_registry(app_name)
        if shutdown:
            serve.shutdown()
    finally:
        if shutdown and ray.is_initialized():
            ray.shutdown()


@hydra_app("serve")  # @hydra.main over conf/serve.yaml; an invalid override -> one line on stderr, exit 2
def main(cfg: DictConfig) -> None:
    if OmegaConf.is_missing(cfg, "model_path"):
        raise InvalidConfig("model_path is required: python -m raymoe.jobs.serve model_path=<checkpoint dir>")
    args = app_args(cfg)
    s = cfg.serve
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        url = start_server(args, s.host, s.port, s.app_name, s.route_prefix, cfg.ray.address, cfg.ray.num_cpus,
                           proxy_location=s.get("proxy_location"))
        name = args["served_model_name"] or pathlib.Path(args["model_path"]).name
        print(f"raymoe: serving '{name}' at {url} (OpenAI API base {url}/v1); Ctrl-C to stop", flush=True)
        while not stop.wait(0.5):
            pass
        print("raymoe: shutting down", flush=True)
    finally:
        stop_server(s.app_name)


if __name__ == "__main__":
    main()
