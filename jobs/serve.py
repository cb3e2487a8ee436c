"""`python -m raymoe.jobs.serve model_path=<dir> [overrides]`: serve a checkpoint with an OpenAI-compatible API.

Compose ``conf/serve.yaml`` → connect to Ray (``ray.address``/``RAY_ADDRESS``, else a local Ray) → start Serve's HTTP
proxy on ``serve.host:serve.port`` → deploy :func:`raymoe.actors.serve.app.build_app` → wait for ``GET /health`` →
print the URL → block until SIGINT/SIGTERM → delete the app, shut Serve and Ray down.

Examples::

    python -m raymoe.jobs.serve model_path=/ckpts/tiny
    python -m raymoe.jobs.serve model_path=/ckpts/tiny serve.port=9000 serve.api_key=secret engine.num_blocks=4096
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
        "api_key": s.get("api_key"),
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
    }


def _wait_healthy(url: str, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    last: Optional[Exception] = None
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except Exception as e:  # noqa: BLE001 - proxy not up yet
            last = e
        time.sleep(0.25)
    raise TimeoutError(f"{url}/health did not answer 200 within {timeout_s:.0f} s: {last}")


def start_server(args: dict[str, Any], host: str = "127.0.0.1", port: int = 8000, app_name: str = "raymoe",
                 route_prefix: str = "/", ray_address: Optional[str] = None, num_cpus: Optional[int] = None,
                 timeout_s: float = 300.0, proxy_location: Optional[str] = None) -> str:
    """Start (or connect to) Ray, start Serve's proxy, deploy the app, wait for /health; return the base URL.

    ``proxy_location``: Serve's ``HeadOnly`` / ``EveryNode`` / ``Disabled`` (None: Serve's default, EveryNode: a
    proxy on every node with a replica, each bound to ``host`` on its own node). ``HeadOnly`` keeps the one proxy on
    the head, so no HTTP connection runs through a worker node that may be lost (docs/cluster.md)."""
    from ray import serve

    from raymoe.actors.serve.app import build_app
    from raymoe.jobs.cluster import connect

    connect(ray_address, num_cpus=num_cpus or max(2, (os.cpu_count() or 2)), log_to_driver=False,
            env_vars={"TOKENIZERS_PARALLELISM": "false"})
    serve.start(http_options={"host": host, "port": int(port)},
                **({"proxy_location": proxy_location} if proxy_location else {}))
    serve.run(build_app(args), name=app_name, route_prefix=route_prefix)
    url = f"http://{host}:{port}{route_prefix.rstrip('/')}"
    _wait_healthy(url, timeout_s)
    return url


def stop_server() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
        if ray.is_initialized():  # the expert-shard registries are detached actors: serve.shutdown leaves them
            from raymoe.actors.serve.expert_shards import kill_registry

            kill_registry()
    finally:
        if ray.is_initialized():
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
        stop_server()


if __name__ == "__main__":
    main()
