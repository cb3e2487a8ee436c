"""A non-finite step is skipped whole, under both data-parallel implementations (DeepSpeed ZeRO-1 and native).

A 4-step world-of-one run through :class:`TrainController` + :class:`LocalWorkerGroup` with a fault at step 1:

* ``nan_loss``: ``controller.fault_at = {1: "nan_loss"}`` (every micro-batch loss of step 1 is NaN, so are the
  gradients);
* ``amax``: the FP8 guard reports a non-finite amax at step 1 while loss and gradients stay finite (a stand-in guard
  object; the tiny model runs without FP8). Under ZeRO this is the case DeepSpeed's own overflow check cannot see.

Step 1 must be reported skipped (``train/skipped`` = 1 in the history), leave the weights and the optimizer state
exactly as step 0 left them (Adam's step counter included), leave the balancer's biases unchanged, log a warning
naming the step (logger ``raymoe.train.controller``), and steps 2-3 must run with finite losses and change the weights
(and the optimizer state of every parameter group: a veto must not leak into the next step). ``warmup_tokens=0`` so
that step 0 already changes the weights (with warmup, lr is 0 at step 0).

The native worker runs in the pytest process (``caplog``); the DeepSpeed one runs in a subprocess (this file run as a
script, one ``RESULT {json}`` line) so torch.distributed state and the DeepSpeed import stay out of the pytest
process (the project's pattern, see ``test_fp8_deepspeed.py``); its warnings are collected there by a logging
handler on the same logger.
"""
from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import socket
import subprocess
import sys
import time
from typing import Any

import pytest
import torch

HERE = pathlib.Path(__file__).resolve()
ROOT = HERE.parents[2]
CONTROLLER_LOG = "raymoe.train.controller"
STEPS, BAD = 4, 1
MODES = ("nan_loss", "amax")
AMAX_PROBLEM = "layers.1.mlp.experts: non-finite amax in fprop.input"


class AmaxAlarm:
    """Stands in for :class:`raymoe.fp8.FP8Guard` (both workers ask ``fp8_guard.problems()`` after the micro-batches):
    reports a non-finite amax during step ``BAD`` only."""

    def __init__(self) -> None:
        self.step = -1

    def problems(self) -> list[str]:
        return [AMAX_PROBLEM] if self.step == BAD else []


def observe(impl: str, mode: str, work: pathlib.Path) -> dict[str, Any]:
    """Run the 4-step job with fault ``mode`` at step ``BAD``; return what the checks need (JSON-able)."""
    from raymoe.config import BalanceConfig, DataConfig, LoggerConfig, ModelConfig, ParallelConfig, RunConfig, TrainConfig
    from raymoe.data import prepare_data
    from raymoe.train.controller import TrainController
    from raymoe.train.worker_group import LocalWorkerGroup

    run = RunConfig(
        model=ModelConfig.preset("tiny"),
        parallel=ParallelConfig(dp=1, dp_impl=impl),
        train=TrainConfig(steps=STEPS, micro_batch_size=2, num_microbatches=2, checkpoint_every=100, eval_every=100,
                          eval_batches=1, warmup_tokens=0, seed=0, resume="never", export_hf=False),
        data=DataConfig(seq_len=32),
        logger=LoggerConfig(kind="none"),
        balance=BalanceConfig(histogram_every=100),
        run_dir=str(work / f"{impl}-{mode}"),
    )
    t0 = time.perf_counter()
    info = prepare_data(run, progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    group = LocalWorkerGroup(run, port)
    ctrl = TrainController(run, group, info["train_samples"], info["val_samples"])
    worker = group.worker
    alarm = AmaxAlarm()
    if mode == "nan_loss":
        ctrl.fault_at = {BAD: "nan_loss"}
    else:
        assert worker.fp8_guard is None
        worker.fp8_guard = alarm
    params = [worker.param_state()]  # params[k + 1]: after step k
    bias = []  # bias[k]: the balancer's bias when step k starts (= after step k - 1's BALANCE)
    plan_bias = []
    inner = group.step

    def step(plans):
        alarm.step = plans[0].step
        bias.append(ctrl.balancer.bias.clone())
        plan_bias.append(plans[0].biases.clone())
        out = inner(plans)
        params.append(worker.param_state())
        return out

    group.step = step  # type: ignore[method-assign]
    t1 = time.perf_counter()
    try:
        summary = ctrl.run_loop()
        bias.append(ctrl.balancer.bias.clone())
        opt_steps = sorted({float(st["step"]) for st in worker.optimizer.state.values() if "step" in st})
    finally:
        ctrl.close()
        group.shutdown()

    def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
        return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)

    return {
        "impl": impl,
        "mode": mode,
        "steps": summary["steps"],
        "history_steps": len(ctrl.history),
        "skipped": [h["train/skipped"] for h in ctrl.history],
        "losses": [h["train/loss"] for h in ctrl.history],
        # weights_unchanged[k]: step k left every parameter bit-identical
        "weights_unchanged": [same(params[k], params[k + 1]) for k in range(STEPS)],
        "weights_finite": [all(bool(torch.isfinite(t).all()) for t in p.values()) for p in params],
        # bias_unchanged[k]: the balancer did not move during step k
        "bias_unchanged": [torch.equal(bias[k], bias[k + 1]) for k in range(STEPS)],
        "plans_carry_balancer_bias": all(torch.equal(a, b) for a, b in zip(plan_bias, bias)),
        "optimizer_step_counts": opt_steps,
        "timings": {"init_s": t1 - t0, "train_s": time.perf_counter() - t1},
    }


def check(obs: dict[str, Any], warnings: list[tuple[str, int, str]]) -> None:
    assert obs["steps"] == STEPS and obs["history_steps"] == STEPS
    assert obs["skipped"] == [int(k == BAD) for k in range(STEPS)], obs["skipped"]
    if obs["mode"] == "nan_loss":
        assert math.isnan(obs["losses"][BAD]), obs["losses"]
    else:
        assert math.isfinite(obs["losses"][BAD]), obs["losses"]
    assert all(math.isfinite(obs["losses"][k]) for k in range(STEPS) if k != BAD), obs["losses"]
    # weights: step 1 changed nothing, every other step changed them, and nothing turned non-finite
    assert obs["weights_unchanged"] == [k == BAD for k in range(STEPS)], obs["weights_unchanged"]
    assert all(obs["weights_finite"]), obs["weights_finite"]
    # optimizer: step 1 vetoed for every parameter group, no other step (Adam's step counter: the 3 applied steps)
    assert obs["optimizer_step_counts"] == [float(STEPS - 1)], obs["optimizer_step_counts"]
    # balancer: no bias update from step 1's counts; every other step moved the biases
    assert obs["bias_unchanged"] == [k == BAD for k in range(STEPS)], obs["bias_unchanged"]
    assert obs["plans_carry_balancer_bias"]
    named = [m for name, level, m in warnings
             if name == CONTROLLER_LOG and level == logging.WARNING and f"step {BAD} skipped" in m]
    assert len(named) == 1, warnings
    if obs["mode"] == "amax":
        assert AMAX_PROBLEM in named[0], named  # the guard's report names the layer


def _deepspeed_run(mode: str, work: pathlib.Path) -> dict[str, Any]:
    """One fault mode under DeepSpeed in a fresh subprocess (a DeepSpeed engine cannot be built twice in one process:
    DeepSpeed keeps the first process group in its ``groups`` cache)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(HERE), "deepspeed", mode, str(work)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, out[-6000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("mode", MODES)
def test_native_worker_skips_a_nonfinite_step(tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture,
                                              mode: str) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like the subprocess (OMP_NUM_THREADS=1): 2 threads on a busy 2-core box ran 10x slower
    try:
        with caplog.at_level(logging.WARNING, logger=CONTROLLER_LOG):
            obs = observe("native", mode, tmp_path)
    finally:
        torch.set_num_threads(threads)
    check(obs, [(r.name, r.levelno, r.getMessage()) for r in caplog.records])


@pytest.mark.parametrize("mode", MODES)
def test_deepspeed_worker_skips_a_nonfinite_step(tmp_path: pathlib.Path, mode: str) -> None:
    pytest.importorskip("deepspeed")
    res = _deepspeed_run(mode, tmp_path)
    check(res["obs"], [tuple(w) for w in res["warnings"]])


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    records: list[tuple[str, int, str]] = []

    class Collect(logging.Handler):
        def emit(self, r: logging.LogRecord) -> None:
            records.append((r.name, r.levelno, r.getMessage()))

    lg = logging.getLogger(CONTROLLER_LOG)
    lg.setLevel(logging.WARNING)
    lg.addHandler(Collect(logging.WARNING))
    result = {"obs": observe(sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])), "warnings": records}
    print("RESULT " + json.dumps(result), flush=True)
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown (gloo / DeepSpeed comm threads; see fp8_ds_worker.py)
