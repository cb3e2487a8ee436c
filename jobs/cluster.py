"""Connecting to Ray: the embedded local default or an existing multi-node cluster, and shipping our code to it.

Two modes, decided once per process, before ``import ray`` (:func:`configure_process_env`):

- **embedded** (no ``RAY_ADDRESS``, no ``ray.address=`` override): the job starts its own Ray on this machine.
  Only here is ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` set: on Linux it makes every Ray port bind 127.0.0.1 (nothing
  listens beyond loopback), at the price of switching multi-node support off. ``RAY_AUTH_MODE`` defaults to
  ``disabled`` (a loopback-only Ray; an embedded ``ray.init`` would otherwise write a token that later CLI calls
  lack).
- **cluster** (``RAY_ADDRESS`` set — ``ray job submit`` sets it for the entrypoint — or ``ray.address=<host:port>``):
  nothing here disables multi-node support. A ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` the user exported is kept, with
  a warning: it fits only a single-node Ray started on 127.0.0.1 with the same setting (the driver then reports
  127.0.0.1 as its node IP). Ray's own settings (auth, ports) are the cluster owner's and are left alone.

**Code shipping** (why this way). Every process a job starts must run the code the job was launched with — on
nodes where no checkout, or another version, is installed. Ray offers ``working_dir``, ``py_modules`` and ``pip``.
Our package is not a plain folder (``raymoe`` is ``platform/raymoe``; ``raymoe.actors``/``jobs``/``conf`` are
top-level folders), so neither a bare working dir nor ``py_modules: [platform/raymoe]`` makes it importable, and an
editable install's finder would win over both. A wheel in ``pip`` would reinstall dependencies per node (and pull
torch from an index). So the driver **stages** the package it is itself running — the files of the imported
``raymoe``, ``raymoe.actors``, ``raymoe.jobs``, ``raymoe.conf`` — into one content-addressed folder ``raymoe/``
(:func:`stage_package`) and passes it as the job's ``py_modules``. Ray uploads it once (cached by hash) and puts it
first on every worker's ``PYTHONPATH``; the path finder then resolves ``raymoe`` there before any installed copy
(setuptools' editable finder is appended to ``sys.meta_path`` after it). Actors, tasks and Serve replicas of the
job inherit it. For the driver itself under ``ray job submit --working-dir .``, the entrypoint must import the
uploaded tree: ``--runtime-env-json '{"env_vars": {"PYTHONPATH": "platform"}}'`` does that (see
``raymoe/__init__.py``: a bare source tree resolves its subpackages in the same tree). A driver whose current
directory is a raymoe source tree other than the one it imported warns, naming that fix.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import shutil
import sys
import tempfile
from typing import Any, Optional, Sequence

__all__ = ["configure_process_env", "cluster_address", "connect", "stage_package", "code_runtime_env"]

log = logging.getLogger(__name__)

_EMBEDDED_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def cluster_address(argv: Optional[Sequence[str]] = None) -> Optional[str]:
    """The cluster to connect to: a ``ray.address=...`` override on the command line wins over ``RAY_ADDRESS``;
    ``None`` means the embedded local default."""
    for a in (sys.argv[1:] if argv is None else argv):
        if a.startswith(("ray.address=", "+ray.address=", "++ray.address=")):
            v = a.split("=", 1)[1].strip().strip("'\"")
            return None if v.lower() in ("", "null", "none") else v
    return os.environ.get("RAY_ADDRESS") or None


def configure_process_env(argv: Optional[Sequence[str]] = None) -> str:
    """Set Ray's process environment for this process's mode; call before ``import ray``. Returns the mode."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if cluster_address(argv):
        if os.environ.get(_EMBEDDED_ONLY) == "0":  # the user's own setting (a single-node loopback head): kept
            print(f"raymoe: {_EMBEDDED_ONLY}=0 is set in the environment: this driver can only join a single-node "
                  "Ray on 127.0.0.1 (the variable switches multi-node support off; unset it for a cluster)",
                  file=sys.stderr)
        return "cluster"
    os.environ.setdefault(_EMBEDDED_ONLY, "0")  # embedded: every Ray port on 127.0.0.1
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    return "embedded"


# ------------------------------------------------------------------------------------------------ code shipping
def _package_dirs() -> dict[str, pathlib.Path]:
    """Where the running ``raymoe`` and its three mapped subpackages live (``""`` = raymoe itself)."""
    import importlib.util

    import raymoe

    def where(name: str) -> pathlib.Path:  # found, not imported: raymoe.actors would import ray
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(f"{name} not found next to {raymoe.__file__}")
        return pathlib.Path(list(spec.submodule_search_locations)[0])

    return {"": pathlib.Path(raymoe.__file__).parent, "actors": where("raymoe.actors"), "jobs": where("raymoe.jobs"),
            "conf": where("raymoe.conf")}


def _files(src: pathlib.Path, skip: set[pathlib.Path]) -> list[pathlib.Path]:
    out = []
    for p in sorted(src.rglob("*")):
        if not p.is_file() or "__pycache__" in p.parts or p.suffix in (".pyc", ".so"):
            continue
        if any(s == p or s in p.parents for s in skip):
            continue
        out.append(p)
    return out


def stage_package(root: Optional[str | pathlib.Path] = None) -> pathlib.Path:
    """Copy the running raymoe into ``<root>/<content hash>/raymoe/`` (one folder, subpackages as real
    subfolders) and return that ``raymoe`` folder. The same code gives the same path, so Ray's upload cache hits."""
    dirs = _package_dirs()
    sub = {d for k, d in dirs.items() if k}
    plan: list[tuple[str, pathlib.Path]] = []
    for key, src in dirs.items():
        for f in _files(src, sub if key == "" else set()):
            plan.append(((f"{key}/" if key else "") + f.relative_to(src).as_posix(), f))
    h = hashlib.sha256()
    for rel, f in plan:
        h.update(rel.encode() + b"\0" + f.read_bytes() + b"\0")
    base = pathlib.Path(root or os.path.join(tempfile.gettempdir(), "raymoe-stage")) / h.hexdigest()[:16]
    dest = base / "raymoe"
    if not (base / ".complete").exists():
        tmp = base.with_name(base.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        for rel, f in plan:
            out = tmp / "raymoe" / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, out)
        (tmp / ".complete").write_text("")
        try:
            os.replace(tmp, base)
        except OSError:  # another process staged the same content first
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _warn_if_other_tree() -> None:
    """A driver started in a raymoe source tree (a job's uploaded working dir) that imported another copy."""
    cwd = pathlib.Path.cwd().resolve()
    if not (cwd / "platform" / "raymoe" / "__init__.py").is_file():
        return
    here = _package_dirs()[""].resolve()
    if cwd not in here.parents:
        log.warning("the current directory %s is a raymoe source tree, but raymoe was imported from %s: this job "
                    "runs that copy. To run the submitted tree, submit with --runtime-env-json "
                    "'{\"env_vars\": {\"PYTHONPATH\": \"platform\"}}'", cwd, here)
        print(f"raymoe: WARNING: running raymoe from {here}, not from the submitted tree {cwd}; add "
              "--runtime-env-json '{\"env_vars\": {\"PYTHONPATH\": \"platform\"}}' to ray job submit",
              file=sys.stderr)


def code_runtime_env() -> dict[str, Any]:
    """The job-level runtime env that ships the running raymoe to every worker: ``{"py_modules": [staged]}``."""
    _warn_if_other_tree()
    return {"py_modules": [str(stage_package())]}


# ------------------------------------------------------------------------------------------------ connect
def connect(address: Optional[str] = None, *, num_cpus: Optional[int] = None, object_store_mb: int = 512,
            include_dashboard: bool = False, env_vars: Optional[dict[str, str]] = None,
            log_to_driver: bool = True, ship_code: bool = True) -> str:
    """``ray.init`` for this process's mode; returns ``"embedded"``, ``"cluster"`` or ``"connected"`` (Ray was
    already initialised by the caller, e.g. a test).

    Embedded: a local Ray with ``num_cpus`` logical CPUs and a capped object store, ``env_vars`` for every worker.
    Cluster: connect to ``address`` (or ``RAY_ADDRESS``) and ship the running code (:func:`code_runtime_env`) unless
    ``ship_code`` is false; ``env_vars`` are not forced on the cluster's workers (a submitted job sets its own)."""
    import ray

    if ray.is_initialized():
        return "connected"
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        runtime_env = code_runtime_env() if ship_code else None
        try:
            ray.init(address=address, log_to_driver=log_to_driver, runtime_env=runtime_env)
        except Exception as e:  # the submitted job already set py_modules: keep the job's and say so
            if runtime_env is None or "py_modules" not in str(e):
                raise
            log.warning("the job's runtime env already sets py_modules; not shipping raymoe separately (%s)", e)
            ray.init(address=address, log_to_driver=log_to_driver)
        return "cluster"
    ray.init(num_cpus=num_cpus or max(2, os.cpu_count() or 2), include_dashboard=include_dashboard,
             object_store_memory=object_store_mb * 2**20, log_to_driver=log_to_driver,
             runtime_env={"env_vars": dict(env_vars or {})})
    return "embedded"
