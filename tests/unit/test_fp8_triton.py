"""Runs the Triton kernel cases (``fp8_triton_cases.py``) under ``TRITON_INTERPRET=1`` in a fresh interpreter.

The interpreter switch must be on before ``triton`` is first imported, and other tests in this process may already
have imported it (DeepSpeed and Inductor do), so the cases always run in a subprocess.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")

HERE = pathlib.Path(__file__).resolve().parent


def test_triton_kernels_under_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "pytest", str(HERE / "fp8_triton_cases.py"), "-q", "-p", "no:cacheprovider", "-x"],
        cwd=HERE.parents[1], env=env, capture_output=True, text=True, timeout=300,
    )
    tail = (res.stdout + res.stderr)[-6000:]
    assert res.returncode == 0, tail
    assert " passed" in res.stdout and "skipped" not in res.stdout, tail


def test_gpu_check_script_skips_cleanly_without_gpu(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "gpu.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(HERE.parents[1] / "scripts" / "gpu_check_fp8.py"), "--out", str(out)],
                         cwd=HERE.parents[1], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    import json

    assert "skipped" in json.loads(out.read_text())


def test_gpu_check_script_cpu_dry_run_exercises_every_path(tmp_path: pathlib.Path) -> None:
    """Same code as on a GPU (Triton quant + GEMM + Wgrad form + FP8Linear on the triton back-end), interpreted."""
    import json

    out = tmp_path / "dry.json"
    res = subprocess.run([sys.executable, str(HERE.parents[1] / "scripts" / "gpu_check_fp8.py"), "--cpu-dry-run",
                          "--out", str(out)], cwd=HERE.parents[1], env=dict(os.environ), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    rec = json.loads(out.read_text())
    assert len(rec["shapes"]) == 2 and set(rec["fp8linear"]) == {"y", "dx", "dW"}
    for row in rec["shapes"]:
        assert row["triton_vs_emulation"] < 1e-10  # fp8 tl.dot is exact in the interpreter
        assert row["wgrad_triton_vs_emulation"] < 1e-10
        assert row["act_codes_equal"] > 0.9  # the interpreter's e4m3 cast is wrong on ~2-3 % of elements
    assert all(v < 1e-2 for v in rec["fp8linear"].values())
