"""The real entrypoints reject every bad override with exit status 2 and exactly one line on stderr (no Ray started).

Each case runs ``python -m raymoe.jobs.train <override>`` in a subprocess, as a user would. Hydra composes the config
before our code runs, so these also check that :func:`raymoe.jobs.configs.hydra_app` turns Hydra's own multi-line
reports (status 1) into our one-liners: unknown key, wrong type, a value a dataclass ``__post_init__`` rejects, an
unknown config group option and malformed override syntax. None of these may get as far as starting Ray: the line
comes out within seconds, before any actor exists.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("HYDRA_FULL_ERROR", None)  # that switch asks for Hydra's full traceback instead of the one-liner
    env.pop("RAY_ADDRESS", None)
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               DS_ACCELERATOR="cpu", WANDB_MODE="offline")
    return env


def _run(module: str, *args: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], env=_env(), cwd=cwd, capture_output=True,
                          text=True, timeout=120)


# (override, substrings the one line must contain: the key, and what is allowed)
CASES = {
    "unknown key": ("train.nosuchkey=1", ["'train.nosuchkey'", "valid keys under 'train':", "steps", "lr"]),
    "misspelt key": ("train.stpes=3", ["'train.stpes'", "did you mean train.steps"]),
    "unknown top-level key": ("nosuch=1", ["'nosuch'", "valid keys at the top level:", "model", "train"]),
    "appended unknown key": ("+train.nosuchkey=1", ["'train.nosuchkey'", "valid keys under 'train':"]),
    "unknown nested key": ("model.nosuch.x=1", ["'model.nosuch'", "valid keys under 'model':", "n_group"]),
    "wrong type (int)": ("train.steps=abc", ["train.steps", "expects int", "'abc'"]),
    "wrong type (bool)": ("train.export_hf=maybe", ["train.export_hf", "expects bool", "'maybe'"]),
    "__post_init__ combination": ("model.n_group=3", ["model.n_routed_experts=8 must be divisible by model.n_group=3"]),
    "unknown group option": ("model=nosuch", ["'model=nosuch'", "config group 'model'", "'nosuch'",
                                              "available: deepseek-v3, small, tiny, tiny-v2lite"]),
    "malformed: no '='": ("train.steps", ["malformed override 'train.steps'", "expected key=value"]),
    "malformed: bad value": ("train.steps=[", ["malformed override 'train.steps=['"]),
    "deleting a schema field": ("~train.steps", ["'train.steps'", "cannot be deleted"]),
}


@pytest.mark.parametrize("override, needles", list(CASES.values()), ids=list(CASES))
def test_bad_override_exits_2_with_one_line(override: str, needles: list[str], tmp_path) -> None:
    res = _run("raymoe.jobs.train", override, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    lines = res.stderr.splitlines()
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert len(lines) == 1 and lines[0].strip(), res.stderr[-3000:]
    line = lines[0]
    assert line.startswith("invalid configuration: "), line
    for needle in needles:
        assert needle in line, (needle, line)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing ran


def test_the_failing_override_is_named_among_several(tmp_path) -> None:
    res = _run("raymoe.jobs.train", "train.steps=5", "model=small", "train.lr=fast", "logger=none",
               f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert res.returncode == 2 and len(res.stderr.splitlines()) == 1, res.stderr[-3000:]
    assert "'train.lr=fast'" in res.stderr and "train.lr expects float" in res.stderr, res.stderr


def test_valid_override_with_cfg_job_exits_0(tmp_path) -> None:
    res = _run("raymoe.jobs.train", "--cfg", "job", "train.steps=7", "model=small", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "steps: 7" in res.stdout and "name: small" in res.stdout, res.stdout[-2000:]
    help_ = _run("raymoe.jobs.train", "--help", cwd=tmp_path)
    assert help_.returncode == 0 and "model: deepseek-v3, small, tiny, tiny-v2lite" in help_.stdout, help_.stderr


def test_schedule_job_shares_the_behaviour(tmp_path) -> None:
    """Every entrypoint built with hydra_app behaves the same; the schedule job is the second one."""
    for args, needle in ((["ranks=abc"], "ranks expects int, got 'abc'"),
                         (["name=dualpipe", "ranks=4", "microbatches=6"], "even micro-batch count >= 2*ranks")):
        res = _run("raymoe.jobs.schedule", *args, cwd=tmp_path)
        assert res.returncode == 2 and len(res.stderr.splitlines()) == 1, res.stderr[-3000:]
        assert needle in res.stderr, res.stderr
    assert list(tmp_path.iterdir()) == []  # no outputs/ written for a rejected config


def test_serve_refuses_too_few_cpus_and_a_command_line_key_at_once(tmp_path) -> None:
    """`jobs.serve` with 2 remote expert shards and `ray.num_cpus=2`: the app needs 3 CPUs (an engine replica + two
    shards), so it fails at once naming each part, instead of a replica Serve can never schedule; a key on the
    command line is refused (it would show in `ps`). Neither starts Ray."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    res = _run("raymoe.jobs.serve", f"model_path={ckpt}", "experts.backend=remote", "experts.num_shards=2",
               "ray.num_cpus=2", cwd=tmp_path)
    assert res.returncode == 2 and len(res.stderr.splitlines()) == 1, res.stderr[-3000:]
    for needle in ("needs 3 Ray CPUs", "1 engine replica(s) x serve.engine_num_cpus=1 = 1",
                   "2 expert shard(s) x experts.remote.num_cpus=1 = 2", "ray.num_cpus=2 has 2"):
        assert needle in res.stderr, (needle, res.stderr)
    res = _run("raymoe.jobs.serve", f"model_path={ckpt}", "serve.api_key=secret", cwd=tmp_path)
    assert res.returncode == 2 and "serve.api_key is refused" in res.stderr, res.stderr[-3000:]
    assert "RAYMOE_API_KEY" in res.stderr and "secret" not in res.stderr.replace("RAYMOE_API_KEY", "")
