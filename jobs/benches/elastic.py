"""`python -m raymoe.jobs.bench elastic [steps=24 kill_at=7 checkpoint_every=4 ckpt_model=tiny ckpt_saves=4
first_ip=2]`: node loss and storage.

Two measurements, each side by side in one run:

1. **Checkpoint write time, local disk vs a local S3 server** (moto on 127.0.0.1): the same in-process training run
   (``ckpt_model``, one checkpoint per step, ``ckpt_saves`` of them) with ``train.storage_path`` a local directory and
   then ``s3://...``; reported per save from the controller's own ``checkpoint`` phase time, with the bytes written.
2. **Node loss on a real multi-node Ray cluster on this machine** (:class:`raymoe.jobs.local_cluster.LocalCluster`:
   head 127.0.0.2 without CPUs, two 2-CPU worker nodes; checkpoints on the local S3 server, every node with its own
   local directory; head on ``127.0.0.<first_ip>``): a pp=2 × dp=2 tiny run with a checkpoint every
   ``checkpoint_every`` steps, uninterrupted (the reference), then the same run twice with the worker node of one
   replica SIGKILLed as a whole process tree at step ``kill_at`` and a new node joining once the run has shrunk to
   dp=1 — recovering by **hand-off** (``elastic.recovery=handoff``: the surviving replica keeps its state, the new
   replica takes it over the process group) and **from the checkpoint** (``elastic.recovery=checkpoint``), side by
   side. Reported per recovery event: mode, reason, node, DP before → after, seconds, steps recomputed, the step
   redone; and per mode the largest per-step loss difference against the reference and whether every step consumed
   the same samples (the bench fails above 1e-5 relative, on any sample difference, or when a hand-off recomputed
   a step).

:func:`train_with_node_loss` is shared with ``tests/e2e/test_multinode.py``.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

from rich.console import Console
from rich.table import Table

from raymoe.jobs.local_cluster import LocalCluster, LocalS3

console = Console() if sys.stdout.isatty() else Console(width=160)

# a small pp=2 x dp=2 run of the tiny model (1 CPU per rank: one replica = one 2-CPU worker node)
# parallel.zero_stage=0: the optimizer state replicated over DP, which a hand-off needs (ZeRO-1 shards it)
TRAIN_ARGS = ["model=tiny", "parallel=pp2", "parallel.dp=2", "parallel.dp_impl=native", "parallel.zero_stage=0",
              "parallel.num_cpus_per_rank=1",
              "train.micro_batch_size=2", "train.num_microbatches=2", "data.seq_len=32", "train.eval_every=1000",
              "train.checkpoint_every=2", "train.warmup_tokens=200", "train.export_hf=false", "logger=none"]
MODES = ("handoff", "checkpoint")  # elastic.recovery, measured side by side
ELASTIC_ARGS = ["elastic.min_dp=1", "elastic.max_dp=2", "elastic.monitor_every_steps=2", "elastic.settle_s=1",
                "elastic.wait_for_resources_s=60"]


def data_cache() -> str:
    """The tokenizer/shard cache every process of a local-cluster run shares (``RAYMOE_CACHE_DIR``)."""
    return os.environ.get("RAYMOE_CACHE_DIR", str(pathlib.Path.home() / ".cache" / "raymoe"))


def driver_env(cluster: LocalCluster, with_address: bool = True, **extra: str) -> dict[str, str]:
    """The environment of a process on the cluster's machine: the nodes' own, CPU DeepSpeed, offline wandb, the
    shared data cache, and (``with_address``) RAY_ADDRESS for a driver."""
    env = dict(cluster.env)
    env.update(DS_ACCELERATOR="cpu", WANDB_MODE="offline", RAYMOE_CACHE_DIR=data_cache(),
               TOKENIZERS_PARALLELISM="false")
    if with_address:
        env["RAY_ADDRESS"] = cluster.address
    env.update(extra)
    return env


def read_metrics(run_dir: pathlib.Path) -> list[dict[str, Any]]:
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written
                pass
    return rows


def step_samples(run_dir: pathlib.Path) -> dict[int, list[int]]:
    """Sample ids per step; a step re-run after a recovery overwrites its first attempt."""
    return {r["step"]: r["data/sample_ids"] for r in read_metrics(run_dir) if "data/sample_ids" in r}


def train_with_node_loss(cluster: LocalCluster, run_dir: pathlib.Path, args: list[str], kill_at: Optional[int],
                         add_node: bool = True, timeout_s: float = 600,
                         cwd: Optional[str] = None) -> dict[str, Any]:
    """``RAY_ADDRESS=<cluster> python -m raymoe.jobs.train <args>`` as a separate driver process. With ``kill_at``,
    the last worker node is SIGKILLed (its whole process tree) once the run reaches that step; with ``add_node``, a
    new worker node starts as soon as the run reports dp=1, while the run is held at its next step (the cluster's
    ``RAYMOE_TEST_PAUSE_FILE`` exists) until that node is ALIVE, so the grow-back happens on any machine load.
    Returns the summary plus ``victim``/``added`` IPs."""
    pause_file = cluster.env.get("RAYMOE_TEST_PAUSE_FILE") if add_node else None
    pause = pathlib.Path(pause_file) if pause_file else None
    run_dir = pathlib.Path(run_dir)
    log_path = run_dir.parent / f"{run_dir.name}-driver.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "raymoe.jobs.train", *args, f"hydra.run.dir={run_dir}"],
                            cwd=cwd, env=driver_env(cluster), stdout=log, stderr=subprocess.STDOUT)
    victim = cluster.workers[-1] if kill_at is not None else None
    killed_at = added = None
    try:
        deadline = time.time() + timeout_s
        while proc.poll() is None and time.time() < deadline:
            rows = read_metrics(run_dir)
            step = max((r.get("step", 0) for r in rows), default=0)
            if victim is not None and killed_at is None and step >= kill_at:
                cluster.kill_node(victim.index)
                killed_at = time.time()
            if killed_at and add_node and added is None and any(r.get("elastic/dp") == 1 for r in rows):
                if pause is not None:
                    pause.touch()  # the ranks hold at their next step until the node is up
                try:
                    added = cluster.add_worker(num_cpus=victim.num_cpus, wait=True)
                finally:
                    if pause is not None:
                        pause.unlink(missing_ok=True)
            time.sleep(0.2)
        rc = proc.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    if rc != 0:
        raise RuntimeError(f"training driver exited with {rc}:\n{log_path.read_text()[-4000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["victim"] = victim.ip if victim else None
    summary["added"] = added.ip if added else None
    return summary


def max_rel_diff(a: list[float], b: list[float]) -> float:
    if len(a) != len(b):
        return float("inf")
    return max((abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b)), default=0.0)


# ---------------------------------------------------------------------------------------------- checkpoint timing
def checkpoint_timing(s3: LocalS3, work: pathlib.Path, model: str, saves: int) -> list[dict[str, Any]]:
    """The same in-process run with its checkpoints on a local directory and on the local S3 server."""
    from raymoe.config import DataConfig, LoggerConfig, ModelConfig, ParallelConfig, RunConfig, TrainConfig
    from raymoe.data import prepare_data
    from raymoe.train.controller import TrainController
    from raymoe.train.worker_group import LocalWorkerGroup

    rows = []
    for name, storage in (("local disk", str(work / "local-store")), ("local S3 (moto)", s3.uri("bench-ckpt"))):
        run = RunConfig(model=ModelConfig.preset(model), parallel=ParallelConfig(dp=1, dp_impl="native"),
                        train=TrainConfig(steps=saves, micro_batch_size=2, num_microbatches=1, checkpoint_every=1,
                                          eval_every=1000, warmup_tokens=0, export_hf=False, keep_checkpoints=2,
                                          storage_path=storage),
                        data=DataConfig(seq_len=32), logger=LoggerConfig(kind="none"),
                        run_dir=str(work / f"run-{len(rows)}"))
        info = prepare_data(run, progress=False)
        group = LocalWorkerGroup(run, 0)
        ctrl = TrainController(run, group, info["train_samples"], info["val_samples"], data_info=info)
        try:
            summary = ctrl.run_loop()
            nbytes = sum(m["bytes"] for m in ctrl.last_ckpt.files.values())  # the manifest's table
        finally:
            ctrl.close()
            group.shutdown()
        per_save = summary["phase_s"].get("checkpoint", 0.0) / saves
        rows.append({"storage": name, "saves": saves, "s_per_save": per_save, "bytes_per_save": nbytes})
    base = rows[0]["s_per_save"]
    for r in rows:
        r["vs_local"] = r["s_per_save"] / base if base > 0 else None
    return rows


def run(args: dict[str, str]) -> dict[str, Any]:
    steps, kill_at = int(args.get("steps", 24)), int(args.get("kill_at", 7))
    ckpt_every, first_ip = int(args.get("checkpoint_every", 4)), int(args.get("first_ip", 2))
    work = pathlib.Path(tempfile.mkdtemp(prefix="raymoe-elastic-"))
    s3 = LocalS3().start()
    old_env = {k: os.environ.get(k) for k in s3.env}
    os.environ.update(s3.env)
    try:
        ckpt_rows = checkpoint_timing(s3, work, args.get("ckpt_model", "tiny"), int(args.get("ckpt_saves", 4)))
        t = Table(title="checkpoint write: local disk vs local S3 server (same run, one save per step)")
        for col in ("storage", "saves", "s/save", "MB/save", "vs local"):
            t.add_column(col, justify="right")
        for r in ckpt_rows:
            mb = f"{r['bytes_per_save'] / 2**20:.1f}" if r["bytes_per_save"] else "-"
            t.add_row(r["storage"], str(r["saves"]), f"{r['s_per_save']:.3f}", mb, f"{r['vs_local']:.2f}x")
        console.print(t)

        cluster = LocalCluster(work / "cluster", extra_env={**s3.env,
                                                           "RAYMOE_TEST_PAUSE_FILE": str(work / "pause")},
                               first_ip=first_ip)
        cluster.start(workers=2, cpus_per_worker=2, head_cpus=0)
        got: dict[str, dict[str, Any]] = {}
        try:
            common = [*TRAIN_ARGS, f"train.steps={steps}", f"train.checkpoint_every={ckpt_every}"]
            ref = train_with_node_loss(cluster, work / "ref", [*common, f"train.storage_path={s3.uri('ref')}"],
                                       kill_at=None)
            for mode in MODES:
                got[mode] = train_with_node_loss(cluster, work / mode, [
                    *common, *ELASTIC_ARGS, f"elastic.recovery={mode}", f"train.storage_path={s3.uri(mode)}"],
                    kill_at=kill_at)
        finally:
            cluster.stop()
    finally:
        s3.stop()
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    t = Table(title=f"node loss on a local 3-node cluster: pp=2 x dp=2 tiny, {steps} steps, checkpoint every "
                    f"{ckpt_every}, a worker node killed at step {kill_at}, a new node joins later")
    for col in ("recovery", "event", "node", "dp", "seconds", "resumed at step", "steps recomputed", "step redone"):
        t.add_column(col, justify="right")
    out: dict[str, Any] = {}
    problems = []
    for mode in MODES:
        g = got[mode]
        for r in g["recoveries"]:
            t.add_row(r.get("recovery", "-"), r["reason"][:60], str(r.get("node") or "-"),
                      f"{r['dp_before']} -> {r['dp_after']}", f"{r['seconds']:.1f}", str(r["resumed_step"]),
                      str(r.get("steps_recomputed", "-")), str(r.get("redone_step", "-")))
        diff = max_rel_diff(g["losses"], ref["losses"])
        same = step_samples(work / mode) == step_samples(work / "ref")
        out[mode] = {"victim": g["victim"], "added": g["added"], "recoveries": g["recoveries"],
                     "max_rel_loss_diff": diff, "same_samples": same, "placement_after": g["placement"],
                     "tokens_per_s": g["tokens_per_s"],
                     "recovery_s": [r["seconds"] for r in g["recoveries"]],
                     "steps_recomputed": sum(r.get("steps_recomputed", 0) for r in g["recoveries"])}
        if diff > 1e-5 or not same:
            problems.append(f"{mode}: max rel loss diff {diff:.2e}, same samples {same}")
        if mode == "handoff" and (out[mode]["steps_recomputed"] or any(
                r.get("recovery") != "handoff" for r in g["recoveries"])):
            problems.append(f"handoff: {out[mode]['steps_recomputed']} step(s) recomputed, recoveries "
                            f"{[r.get('recovery') for r in g['recoveries']]}")
    console.print(t)
    for mode in MODES:
        console.print(f"{mode}: max per-step loss difference vs the uninterrupted run {out[mode]['max_rel_loss_diff']:.2e} "
                      f"(relative); same samples per step: {out[mode]['same_samples']}; steps recomputed: "
                      f"{out[mode]['steps_recomputed']}")
    if problems:
        raise RuntimeError("the runs with a node loss diverged from the reference: " + "; ".join(problems))
    return {"checkpoint": ckpt_rows, "node_loss": {
        "steps": steps, "kill_at": kill_at, "checkpoint_every": ckpt_every, "ref_tokens_per_s": ref["tokens_per_s"],
        **out}}
