"""Embedded vs cluster mode (decided before `import ray`) and code shipping, each in a fresh interpreter (no Ray)."""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]

PROBE = ("import os, sys; from raymoe.jobs.cluster import configure_process_env as c; m = c(sys.argv[1:]); "
         "print(m, os.environ.get('RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER'), os.environ.get('RAY_AUTH_MODE'))")


def _probe(env_extra: dict[str, str], *argv: str) -> tuple[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE")}
    env.update(env_extra)
    r = subprocess.run([sys.executable, "-c", PROBE, *argv], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip(), r.stderr


def test_embedded_default_binds_loopback_and_cluster_mode_never_disables_multinode() -> None:
    assert _probe({})[0] == "embedded 0 disabled"
    assert _probe({"RAY_ADDRESS": "10.1.2.3:6379"})[0] == "cluster None None"  # nothing set, auth left alone
    assert _probe({}, "train.steps=3", "ray.address=10.1.2.3:6379")[0] == "cluster None None"
    assert _probe({"RAY_ADDRESS": "10.1.2.3:6379"}, "ray.address=null")[0] == "embedded 0 disabled"
    assert _probe({"RAY_ADDRESS": "10.1.2.3:6379", "RAY_AUTH_MODE": "token"})[0] == "cluster None token"
    # the user's own setting is kept (a single-node loopback head), with a warning that says what it does
    out, err = _probe({"RAY_ADDRESS": "127.0.0.1:6379", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    assert out == "cluster 0 None" and "single-node" in err and "unset it for a cluster" in err


def test_a_bare_copy_of_the_tree_imports_itself_with_pythonpath_platform(tmp_path) -> None:
    for d in ("platform", "actors", "jobs", "conf"):
        shutil.copytree(ROOT / d, tmp_path / d, ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import raymoe, raymoe.actors.errors, raymoe.jobs.cluster, raymoe.conf, raymoe.model, platform; "
            "print(raymoe.__file__, raymoe.actors.errors.__file__, raymoe.jobs.cluster.__file__, "
            "raymoe.conf.__path__[0], raymoe.model.__file__, platform.__file__)")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "platform"))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                       cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    paths = r.stdout.split()
    assert all(p.startswith(str(tmp_path)) for p in paths[:5]), paths  # never the installed checkout
    assert not paths[5].startswith(str(tmp_path))  # the stdlib `platform`, not the folder


def test_staged_package_is_complete_content_addressed_and_importable(tmp_path) -> None:
    from raymoe.jobs.cluster import stage_package

    a = stage_package(tmp_path)
    # staging finds actors/ without importing it (raymoe.actors imports ray)
    code = f"import sys; from raymoe.jobs.cluster import stage_package; stage_package({str(tmp_path)!r}); " \
           "print('ray' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", (r.stdout, r.stderr)
    assert a.name == "raymoe" and stage_package(tmp_path) == a  # same code, same folder (Ray's upload cache)
    for rel in ("__init__.py", "actors/__init__.py", "actors/stage.py", "jobs/cluster.py", "conf/train.yaml",
                "conf/model/tiny.yaml", "train/placement.py", "model/__init__.py"):
        assert (a / rel).is_file(), rel
    assert not list(a.rglob("__pycache__"))
    code = "import raymoe.actors.errors as e, raymoe.conf as c; print(e.__file__, c.__path__[0])"
    env = dict(os.environ, PYTHONPATH=str(a.parent))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert all(p.startswith(str(a)) for p in r.stdout.split()), r.stdout  # the staged copy wins over the install
