"""A real multi-node Ray cluster on this machine (:mod:`raymoe.jobs.local_cluster`): a head on 127.0.0.40 with no CPUs
for work and two worker nodes on 127.0.0.41 / 127.0.0.42 (each its own raylet, object store, ports and local
directory), started with ``ray start`` and never told ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``; checkpoints go to a real
S3-compatible server on 127.0.0.1 (moto), never through a shared disk. Drivers are separate processes, as users run
them: ``ray job submit`` and ``RAY_ADDRESS=... python -m raymoe.jobs.train``.

- Code shipping: a job submitted from a *copy* of the repository whose code differs from the installed checkout runs
  that copy in the driver and in every rank (summary.json records, per rank, where its ``raymoe`` came from).
- Placement: DP replicas spread over the worker nodes, each replica's ranks together.
- Node loss: every process of one worker node is SIGKILLed mid-run; training continues at dp=1 on the surviving node
  (whose replica keeps its in-memory state: hand-off, ``elastic.recovery`` default), grows back to dp=2 on a node
  that joins later, and its per-step losses and samples equal the uninterrupted run's.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest

from raymoe.jobs.benches.elastic import (ELASTIC_ARGS, TRAIN_ARGS, data_cache, driver_env, max_rel_diff, step_samples,
                                        train_with_node_loss)
from raymoe.jobs.local_cluster import LocalCluster, LocalS3

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = pathlib.Path(sys.executable).parent

pytestmark = pytest.mark.timeout(900)

@pytest.fixture(scope="module")
def s3():
    server = LocalS3().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def cluster(s3):
    # head 127.0.0.40, workers .41 and .42 (a node that joins later: .43); other cluster tests use other ranges
    state = pathlib.Path("/tmp") / f"rmc{os.getpid()}"
    # RAYMOE_TEST_PAUSE_FILE: the node-loss test holds the run while the replacement node starts (see
    # train_with_node_loss), so the grow-back does not depend on how fast this machine starts a node
    c = LocalCluster(state, extra_env={**s3.env, "RAYMOE_TEST_PAUSE_FILE": f"{state}-pause"}, first_ip=40)
    try:
        c.start(workers=2, cpus_per_worker=2, head_cpus=0)
        yield c
    finally:
        c.stop()


def _copy_repo(dest: pathlib.Path, version: str) -> pathlib.Path:
    """The repository's code (not its venv, runs or caches), with ``raymoe.__version__`` changed."""
    for d in ("platform", "actors", "jobs", "conf"):
        shutil.copytree(ROOT / d, dest / d, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    init = dest / "platform" / "raymoe" / "__init__.py"
    text = init.read_text()
    assert '__version__ = "0.1.0"' in text
    init.write_text(text.replace('__version__ = "0.1.0"', f'__version__ = "{version}"'))
    return dest


def _submit(cluster: LocalCluster, workdir: pathlib.Path, args: list[str], timeout: float = 600) -> str:
    runtime_env = {"env_vars": {"PYTHONPATH": "platform", "WANDB_MODE": "offline", "DS_ACCELERATOR": "cpu",
                                "RAYMOE_CACHE_DIR": data_cache()}}
    cmd = [str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard, "--working-dir", str(workdir),
           "--runtime-env-json", json.dumps(runtime_env), "--", "python", "-m", "raymoe.jobs.train", *args]
    for _ in range(24):  # the head's job agent registers a while after the dashboard answers
        res = subprocess.run(cmd, env=driver_env(cluster, with_address=False), capture_output=True, text=True, timeout=timeout)
        out = res.stdout + res.stderr
        if res.returncode == 0 or "No available agent to submit job" not in out:
            break
        time.sleep(5)
    assert res.returncode == 0 and "succeeded" in out, out[-5000:]
    return out


STEPS = 24


@pytest.fixture(scope="module")
def submitted(cluster, s3, tmp_path_factory):
    """``ray job submit`` of a modified copy of the repository: an uninterrupted pp=2 x dp=2 run with its
    checkpoints in S3 (the reference of the node-loss test: the copy differs only in its version string)."""
    tmp = tmp_path_factory.mktemp("submitted")
    version = f"0.1.0+copy{os.getpid()}"
    work = _copy_repo(tmp / "copy", version)
    run_dir = tmp / "run"
    out = _submit(cluster, work, [*TRAIN_ARGS, f"train.steps={STEPS}", f"train.storage_path={s3.uri('ref')}",
                                  f"hydra.run.dir={run_dir}"])
    return {"version": version, "out": out, "run_dir": run_dir,
            "summary": json.loads((run_dir / "summary.json").read_text())}


def test_submitted_copy_runs_everywhere_and_replicas_spread(submitted) -> None:
    version, s = submitted["version"], submitted["summary"]
    assert f"raymoe {version}" in submitted["out"], submitted["out"][-3000:]  # the driver imported the copy
    assert s["finished"] and s["steps"] == STEPS and not s["recoveries"]
    placement = s["placement"]
    assert len(placement) == 4
    for r in placement:  # every rank ran the submitted copy, uploaded by Ray, not the installed checkout
        assert r["version"] == version, placement
        assert not r["code"].startswith(str(ROOT)), placement
    # replicas spread: replica d (ranks d and 2 + d: pp_rank * dp + dp_rank) on one node, the two on different nodes
    nodes = {r["rank"]: r["node"] for r in placement}
    assert nodes[0] == nodes[2] and nodes[1] == nodes[3] and nodes[0] != nodes[1], nodes
    assert sorted({nodes[0], nodes[1]}) == ["127.0.0.41", "127.0.0.42"]
    # checkpoints went to S3, nothing to the run directory's disk
    assert s["checkpoint"].startswith("s3://") and not (submitted["run_dir"] / "checkpoints").exists()


def test_node_loss_shrinks_then_grows_back_with_equal_losses(cluster, s3, submitted, tmp_path) -> None:
    """A driver started with RAY_ADDRESS from the installed checkout (its code shipped as py_modules). At step 6
    the worker node holding one replica is SIGKILLed as a whole process tree; the run goes on at dp=1 on the
    surviving replica's in-memory state, a new node (127.0.0.43) joins, the run grows back to dp=2, and every step's loss equals the
    uninterrupted run's."""
    run_dir = tmp_path / "run"
    s = train_with_node_loss(cluster, run_dir, [*TRAIN_ARGS, *ELASTIC_ARGS, f"train.steps={STEPS}",
                                                f"train.storage_path={s3.uri('loss')}"], kill_at=6, cwd=str(ROOT))
    ref = submitted["summary"]
    assert s["finished"] and s["steps"] == STEPS
    rec = s["recoveries"]
    assert [(r["dp_before"], r["dp_after"]) for r in rec] == [(2, 1), (1, 2)], json.dumps(rec, indent=1)
    assert rec[0]["node"] == s["victim"] and s["victim"] in rec[0]["lost_nodes"], rec[0]
    assert rec[0]["seconds"] < 60 and 0 <= rec[0]["steps_recomputed"] <= 2, rec[0]  # checkpoint every 2 steps
    assert rec[1]["steps_recomputed"] == 0, rec[1]  # growing waits for a step boundary and checkpoints there
    assert max_rel_diff(s["losses"], ref["losses"]) <= 1e-5, (s["losses"], ref["losses"])
    assert step_samples(run_dir) == step_samples(submitted["run_dir"])  # 0 samples lost or repeated
    nodes = {r["node"] for r in s["placement"]}
    assert s["victim"] not in nodes and s["added"] in nodes, s["placement"]
    assert s["checkpoint"].startswith("s3://") and not (run_dir / "checkpoints").exists()
