"""DeepSpeed 0.19.8 on CPU with FP8 swapped in before ``initialize``: bf16 + ZeRO-1 over gloo, deferred Wgrad,
NaN/overflow skip, checkpoint resume, gradient clipping, and a 2-rank data-parallel group.

Every scenario runs in a subprocess (``fp8_ds_worker.py``) so torch.distributed state never leaks into pytest.
"""
from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

pytest.importorskip("deepspeed")

HERE = pathlib.Path(__file__).resolve().parent
WORKER = HERE / "fp8_ds_worker.py"


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **extra}
    env.pop("TRITON_INTERPRET", None)
    return env


def _result(out: str) -> dict:
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    assert lines, out[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single() -> dict:
    res = subprocess.run([sys.executable, str(WORKER), "single"], cwd=HERE.parents[1], env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-6000:]
    return _result(res.stdout)


def test_engine_is_bf16_zero1_with_fp8_layers(single: dict) -> None:
    assert single["converted"] == ["fc1", "fc2", "fc3"]
    assert single["head_type"] == "Linear"  # the head stays high precision
    assert single["param_dtype"] == "torch.bfloat16"
    assert single["optimizer"] == "DeepSpeedZeroOptimizer"


def test_training_progresses_with_finite_clipped_norms(single: dict) -> None:
    losses = single["losses"]
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(0 < g < 10 for g in single["grad_norms"])


def test_deferred_wgrad_matches_immediate_bit_for_bit(single: dict) -> None:
    assert single["deferred_identical"] and single["deferred_store_empty"]


def test_nonfinite_step_is_named_and_skipped(single: dict) -> None:
    assert single["nan_applied"] is False
    probs = single["nan_problems"]
    assert "fc1: non-finite amax in fprop.input" in probs, probs
    assert any(p.startswith("loss=") for p in probs)
    assert single["nan_params_unchanged"] and single["nan_skipped_delta"] == 1
    assert single["after_nan_applied"]


def test_checkpoint_resume_reproduces_the_run(single: dict) -> None:
    assert "mp_rank_00_model_states.pt" in single["ckpt_files"]
    assert any("optim_states" in f for f in single["ckpt_files"])
    cont, again = single["ckpt_losses"]
    assert cont == again
    assert single["ckpt_params_identical"]


def test_gradient_clipping_bounds_the_update(single: dict) -> None:
    clip = single["clip"]
    assert clip["applied"] and clip["grad_norm"] > 10  # raw norm reported, far above the 0.25 clip
    assert clip["update_norm"] == pytest.approx(0.25, rel=0.05)  # SGD lr=1: update = clipped gradient


@pytest.mark.slow
def test_two_rank_zero1_over_gloo() -> None:
    port = str(_free_port())
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), "dp2"], cwd=HERE.parents[1],
                         env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                  MASTER_PORT=port),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(2)
    ]
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=300)
            assert p.returncode == 0, out[-6000:]
            outs.append(_result(out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert {o["rank"] for o in outs} == {0, 1} and all(o["world"] == 2 for o in outs)
    assert all(o["ranks_identical"] for o in outs)  # ZeRO-1 all-gathers the same updated weights everywhere
    for o in outs:
        assert all(l == l and l < 2.0 for l in o["losses"])  # finite
    assert outs[0]["losses"] != outs[1]["losses"]  # each rank saw its own data
