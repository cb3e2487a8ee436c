"""End to end: a local Ray head on 127.0.0.1, `ray job submit` of the real training entrypoint, results checked.

The head is started with ``ray start --head --block`` in its own process group and torn down by SIGTERM to that
process, then SIGKILL to whatever is left of its group, so it never touches another Ray on the machine.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = pathlib.Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the job's `python` must be this venv's
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               DS_ACCELERATOR="cpu", WANDB_MODE="offline")
    # the dashboard dies if one of its module subprocesses is not ready in 30 s (Ray's default), as on a busy box
    env.setdefault("RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT", "180")
    return env


def _wait_http(port: int, timeout: float) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=2)
            return
        except Exception:
            time.sleep(1)
    raise TimeoutError(f"Ray dashboard on 127.0.0.1:{port} did not come up in {timeout}s")


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    gcs, dash = _free_port(), _free_port()
    # every agent port explicit: the defaults (52365, ...) collide with any other Ray on the machine, whose agent
    # then holds them and this head's job agent never registers ("No available agent to submit job")
    agent_ports = [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
                   f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}"]
    tmp = pathlib.Path("/tmp") / f"rmh{os.getpid()}"  # short: Ray's socket paths have a length limit
    tmp.mkdir(exist_ok=True)
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--num-cpus=4", "--object-store-memory=400000000", "--include-dashboard=true",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--disable-usage-stats", f"--temp-dir={tmp}",
           *agent_ports]
    log = open(tmp_path_factory.mktemp("ray") / "head.log", "w")
    proc = subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_http(dash, 120)
        yield f"http://127.0.0.1:{dash}"
    finally:
        # SIGTERM to `ray start` alone: it drains the node through the GCS and stops its children itself (~3 s).
        # Signalling the whole group also stops the GCS, and the drain RPC then waits out its 30 s timeout.
        try:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        except Exception:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the group (normally nothing)
        except ProcessLookupError:
            pass
        shutil.rmtree(tmp, ignore_errors=True)


def test_ray_job_submit_trains_and_reports(ray_head, tmp_path) -> None:
    run_dir = tmp_path / "submitted"
    cache = os.environ.get("RAYMOE_CACHE_DIR", str(pathlib.Path.home() / ".cache" / "raymoe"))
    runtime_env = {"env_vars": {"WANDB_MODE": "offline", "DS_ACCELERATOR": "cpu", "RAYMOE_CACHE_DIR": cache}}
    cmd = [str(BIN / "ray"), "job", "submit", "--address", ray_head, "--working-dir", str(ROOT),
           "--runtime-env-json", json.dumps(runtime_env), "--",
           "python", "-m", "raymoe.jobs.train", "train.steps=6", "train.micro_batch_size=2", "data.seq_len=32",
           "train.eval_every=3", "train.checkpoint_every=3", "parallel.num_cpus_per_rank=1",
           # no warm-up: with the default 50k warm-up tokens, 6 steps x 64 tokens train at lr <= 2.3e-5 and the
           # model would stay indistinguishable from its initialization (val loss 8.354 vs 8.360)
           "train.warmup_tokens=0",
           f"hydra.run.dir={run_dir}"]
    for _ in range(24):  # on a busy box the head's job agent registers a while after the dashboard answers
        res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
        out = res.stdout + res.stderr
        if res.returncode == 0 or "No available agent to submit job" not in out:
            break
        time.sleep(5)
    assert res.returncode == 0, out[-4000:]
    assert "succeeded" in out, out[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] and summary["steps"] == 6
    assert summary["val_loss"] is not None  # compared with an untrained model below
    assert (run_dir / "checkpoints" / "step_00000006" / "manifest.json").exists()
    assert pathlib.Path(summary["wandb_dir"]).is_dir()
    assert str(run_dir / "summary.json") in out  # the job printed where its results are
    # the finished model is exported as a HF DeepseekV3 checkpoint that evaluates like the job's own validation
    assert summary["hf_export"] == str(run_dir / "hf") and str(run_dir / "hf") in out
    from omegaconf import OmegaConf

    from raymoe.data.build import build_dataset
    from raymoe.model import DeepSeekV3, hf

    model = hf.load(run_dir / "hf").eval()
    biases = torch.stack([m.mlp.router.expert_bias for m in model.layers if m.is_moe])
    assert 0 < biases.abs().max() <= 6 * 1e-3 + 1e-9  # 6 balancer updates of ±γ (γ = 1e-3) reached the export
    # The job's validation set: sample ids 0..eval_batches*micro_batch_size-1 = 0..7, 32 tokens each (the mean over
    # its 4 micro-batches of 2 equals the mean over these 8 sequences).
    _, val, _ = build_dataset(vocab_size=4096, seq_len=32, cache_dir=cache, progress=False)
    x, y = val.batch(list(range(8)))
    # The reference that must lose: the same architecture with the job's initial weights, i.e. what the stage
    # workers build before step 1 (torch.manual_seed(train.seed), then DeepSeekV3(cfg)).
    seed = OmegaConf.load(run_dir / ".hydra" / "config.yaml").train.seed
    torch.manual_seed(seed)
    untrained = DeepSeekV3(model.config).eval()
    with torch.no_grad():
        loss = model(x, labels=y, compute_mtp=False).main_loss.item()
        loss0 = untrained(x, labels=y, compute_mtp=False).main_loss.item()
    assert loss0 > 8.0, loss0  # ≈ ln(4096) = 8.32 at initialization
    # 6 steps at lr ≤ 3e-3 take the tiny model ≈ 0.6 below its initialization on these batches; an export of the
    # untrained (or of a barely trained) model fails here
    assert loss < loss0 - 0.3, (loss, loss0)
    # and the export is the model the job validated: same batches, same weights, same biases
    assert abs(loss - summary["val_loss"]) < 0.05, (loss, summary["val_loss"], loss0)


def test_invalid_override_fails_before_any_actor(tmp_path) -> None:
    res = subprocess.run([sys.executable, "-m", "raymoe.jobs.train", "model.n_group=3", f"hydra.run.dir={tmp_path}"],
                         env=_env(), capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 2
    assert "model.n_routed_experts=8 must be divisible by model.n_group=3" in res.stderr
    assert "Traceback" not in res.stderr
    res = subprocess.run([sys.executable, "-m", "raymoe.jobs.train", "train.nosuchkey=1", f"hydra.run.dir={tmp_path}"],
                         env=_env(), capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode != 0 and "nosuchkey" in res.stderr and "Traceback" not in res.stderr
