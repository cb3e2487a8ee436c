"""`python -m raymoe.jobs.schedule` (Hydra) and the `schedule` bench suite."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import raymoe.jobs.schedule as job


def _compose(overrides: list[str]):
    with initialize_config_module(config_module="raymoe.conf", version_base="1.3"):
        return compose(config_name="schedule", overrides=overrides)


def test_composed_config_keys_and_schema():
    cfg = _compose([])
    assert sorted(cfg.keys()) == ["comms", "costs", "html", "microbatches", "name", "ops", "plot", "ranks"]
    assert sorted(cfg.costs.keys()) == ["B", "F", "FB", "W", "p2p"]
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, job.ScheduleJobConfig) and obj.name == "dualpipe" and obj.ranks == 8
    with pytest.raises(Exception, match="ranks"):
        _compose(["ranks=abc"])


def test_run_prints_tables_and_plots(tmp_path, capsys):
    cfg = OmegaConf.to_object(_compose(["name=dualpipev", "ranks=3", "microbatches=6", f"plot={tmp_path}/t.png",
                                        f"html={tmp_path}/t.html", "comms=true"]))
    res = job.run(cfg)
    out = capsys.readouterr().out
    assert res.bubble == [4.0, 4.0, 4.0]
    assert "rank 2:" in out and "recvF0" in out and "paper formula 4 (equal)" in out
    assert (tmp_path / "t.png").stat().st_size > 1000 and "rank 0" in (tmp_path / "t.html").read_text()


def test_invalid_name_is_a_clear_error():
    with pytest.raises(Exception, match="choose one of"):
        OmegaConf.to_object(_compose(["name=gpipe"]))


def _cli(args: list[str], cwd: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raymoe.jobs.schedule", *args], cwd=cwd, env=dict(os.environ),
                          capture_output=True, text=True, timeout=120)


def test_cli_end_to_end(tmp_path):
    ok = _cli(["name=dualpipe", "ranks=4", "microbatches=8", "plot=tl.png"], tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "max bubble 2 (simulated), paper formula 2 (equal)" in ok.stdout
    assert (tmp_path / "tl.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tl.png"]  # no outputs/ or .hydra/ in cwd
    bad = _cli(["name=dualpipe", "ranks=4", "microbatches=6"], tmp_path)
    assert bad.returncode != 0
    assert "even micro-batch count >= 2*ranks" in bad.stderr and "Traceback" not in bad.stderr


def test_bench_suite_small():
    from raymoe.jobs.benches import schedule as bench

    out = bench.run({"pps": "4", "mults": "2", "model": "mlp", "reps": "1"})
    assert set(out["cost_sets"]) == {"paper", "measured"} and out["measured"]["costs"]["F"] == 1.0
    rows = {(r["impl"], r["schedule"]): r for r in out["tables"]["paper"]}
    assert rows[("ours", "dualpipe")]["max_bubble"] == 2.0
    assert rows[("ours", "dualpipev")]["max_bubble"] == 6.0
    if out["tables"]["paper"][-1]["impl"] == "torch":
        assert rows[("torch", "DualPipeV")]["max_bubble"] == 6.0
